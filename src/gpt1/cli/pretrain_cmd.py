"""`gpt1 pretrain`: train a base model from a TOML recipe plus key=value overrides; resumes."""

from __future__ import annotations

import argparse

from gpt1.cli.args import folder_arg, path_arg, print_recipe, require, training_rerun_hint
from gpt1.core.progress import info

# gpt1.train (torch) is imported by the command: `gpt1 --help` imports this module.

# TrainConfig's fields, the recipe's keys (a test keeps the two equal): `--device cpu` is told
# to write device=cpu, without loading torch for a mistyped flag.
RECIPE_KEYS = ("model", "block_size", "n_layer", "n_head", "n_embd", "init_from", "dropout", "max_steps", "max_tokens",
               "epochs", "data_order", "time_budget", "batch_size", "grad_accum", "lr", "min_lr", "warmup", "cooldown", "weight_decay",
               "betas", "optimizer", "muon_lr_scale", "embedding_lr_scale", "grad_clip", "precision", "float8", "compile",
               "gradient_checkpointing", "eval_every", "eval_batches", "save_every", "keep_checkpoints", "keep_best",
               "early_stop", "seed", "device", "max_bad_steps", "tensorboard")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain", help="pretrain a model on prepared shards (resumable)",
        description="Pretrain a GPT on the shards of `gpt1 prepare`. The recipe is a TOML file (a path or the name "
                    "of a shipped recipe: gpt1-openwebtext, tiny-cpu); any key can be overridden as key=value, "
                    "e.g. max_steps=200 lr=1e-3 precision=fp16-mixed compile=false. After the first dozen steps it prints "
                    "the projected wall time of the whole run (not with a time_budget: that run ends when its budget is "
                    "spent). Rerunning the same command on the same "
                    "--out resumes from the last checkpoint. Multi-GPU: torchrun --nproc_per_node N -m gpt1 pretrain ...",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides (every key: docs/training.md, or --print-config)")
    parser.add_argument("--config", type=path_arg, metavar="FILE", help="TOML recipe, or the name of a shipped one (default: built-in defaults)")
    parser.add_argument("--data", type=path_arg, help="prepared data folder (train.bin, val.bin, meta.json, tokenizer.json); required")
    parser.add_argument("--out", type=folder_arg, help="run folder: checkpoints, metrics.jsonl, loss.png, and the model; required")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as TOML and exit (needs no --data or --out)")
    parser.set_defaults(func=pretrain_command, rerun_hint=training_rerun_hint, recipe_keys=RECIPE_KEYS,
                        stdout_product=lambda args: "the recipe (--print-config)" if args.print_config else None)


def pretrain_command(args: argparse.Namespace) -> int:
    from gpt1.train import distributed
    from gpt1.train.config import TrainConfig, load_config
    from gpt1.train.pretrain import pretrain

    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.print_config:
        print_recipe(cfg.to_dict())
        return 0
    require(args, "--data", "--out")
    result = pretrain(cfg, args.data, args.out)
    # Under torchrun rank 0 speaks for the run. From the environment: pretrain has left the
    # process group, so distributed.current() says rank 0 on every rank by now.
    if distributed.launched().is_main:
        info(f"model: {result.run_dir} (load it with gpt1.load, or `gpt1 generate --model {result.run_dir}`)")
    return 0
