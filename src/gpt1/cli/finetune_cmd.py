"""`gpt1 finetune`: LoRA chat fine-tuning of a base model dir (resumable)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from gpt1.cli import pretrain_cmd
from gpt1.cli.args import folder_arg, path_arg, print_recipe, require, training_rerun_hint
from gpt1.core.errors import Gpt1Error
from gpt1.core.progress import info

# gpt1.train (torch) is imported by the command: `gpt1 --help` imports this module.

# Pretraining's keys that a fine-tune refuses to change (FinetuneConfig, `finetune`): the base
# decides the model, and there is no Muon, no FP8 and no embedding training. --print-config leaves
# them out rather than list them as if they could be set.
PRETRAINING_KEYS = ("model", "init_from", "n_layer", "n_head", "n_embd", "muon_lr_scale", "embedding_lr_scale",
                    "optimizer", "float8", "data_order")
# FinetuneConfig's fields less those (a test keeps them equal): the keys `--lora-r 16` is told to write as lora_r=16.
RECIPE_KEYS = tuple(key for key in pretrain_cmd.RECIPE_KEYS if key not in PRETRAINING_KEYS) + (
    "data", "full", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "train_special_tokens", "all_paths", "languages",
    "skip_invalid", "val_fraction")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune", help="LoRA (or full) chat fine-tuning of a base model on OASST2 or other chat data (resumable)",
        description="Fine-tune a base model dir with LoRA (or every weight: the recipe key `full`, set to true) on "
                    "chat data, with the loss on assistant replies only. "
                    "--data: OpenAssistant/oasst2 (or any hf:NAME[:SPLIT] or hf:NAME:CONFIG:SPLIT), an OASST export "
                    "(*.messages.jsonl[.gz], *.trees.jsonl[.gz], .parquet), chat records in a .jsonl or a .json ({\"messages\": [...]}, ShareGPT, Alpaca, "
                    "prompt/completion; a .json may hold one array), "
                    ".yml dialogs, a folder of such files, or `chatterbot` (the dialogs of the chatterbot-corpus "
                    "package); repeat --data to train on several sources together. The recipe is a "
                    "TOML file (a path or a shipped name: gpt1-oasst2-lora); any key can be overridden as key=value, "
                    "e.g. max_steps=100 lora_r=16 'lora_targets=[\"q\",\"v\"]' (quoted: a shell drops the "
                    "quotes of a bare one); OASST options are recipe keys too: "
                    "'languages=[\"en\",\"de\"]' keeps those languages, all_paths=true trains on every root-to-leaf "
                    "path of each message tree. --out is the run dir and a chat model "
                    "dir; rerunning the same command resumes. Multi-GPU: torchrun --nproc_per_node N -m gpt1 finetune ...",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides (every key: docs/finetuning.md and docs/training.md, or --print-config)")
    parser.add_argument("--base", type=path_arg, help="the base model: a gpt1 model dir (from gpt1 pretrain) or a transformers GPT-2 folder with a gpt1 tokenizer (e.g. from gpt1 export; hf:OWNER/NAME[@REVISION]: one on the Hugging Face Hub); required")
    parser.add_argument("--data", type=path_arg, action="append",
                        help="chat data source (see above); repeat it for a mixture; overrides the recipe's `data`")
    parser.add_argument("--out", type=folder_arg, help="run folder: checkpoints, metrics.jsonl, and the fine-tuned model; required")
    parser.add_argument("--config", type=path_arg, metavar="FILE", help="TOML recipe, or the name of a shipped one (default: built-in defaults)")
    parser.add_argument("--skip-invalid", action="store_true", default=None,
                        help="skip (and count) malformed lines instead of stopping at the first one")
    parser.add_argument("--merge", action="store_true",
                        help="after training, also write OUT/merged: a plain model dir with the adapter merged in "
                             "(LoRA only: a full fine-tune's run dir is one already)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as TOML and exit (needs no --base or --out)")
    parser.set_defaults(func=finetune_command, rerun_hint=training_rerun_hint, recipe_keys=RECIPE_KEYS,
                        stdout_product=lambda args: "the recipe (--print-config)" if args.print_config else None)


def finetune_command(args: argparse.Namespace) -> int:
    from gpt1.train.config import load_config
    from gpt1.train.finetune import FinetuneConfig, finetune, merge_model_dir

    values = {}
    if args.data is not None:  # one source stays a string, as recipes and run dirs have it
        values["data"] = args.data[0] if len(args.data) == 1 else args.data
    # `--data a.jsonl b.jsonl` (or a glob the shell expanded) left b.jsonl among the overrides.
    if stray := next((item for item in args.overrides if "=" not in item and os.path.exists(item)), None):
        raise Gpt1Error(f"{stray}: not a KEY=VALUE override; to train on several chat sources, repeat --data "
                        "(--data a.jsonl --data b.jsonl) or list them in the recipe (data = [\"a.jsonl\", \"b.jsonl\"])")
    if args.skip_invalid:
        values["skip_invalid"] = True
    cfg = load_config(FinetuneConfig, args.config, args.overrides, **values)
    if args.print_config:
        print_recipe({key: value for key, value in cfg.to_dict().items() if key not in PRETRAINING_KEYS})
        return 0
    require(args, "--base", "--out")
    if args.merge and cfg.full:  # known now, not after the run: there is no adapter to merge
        raise Gpt1Error("--merge merges a LoRA adapter into the weights; a full=true run dir holds every weight "
                        "already (a plain model dir): leave --merge out")
    result = finetune(cfg, args.base, args.out)
    # Under torchrun rank 0 speaks for the run and merges. From the environment: finetune has
    # left the process group, so distributed.current() says rank 0 on every rank by now.
    if os.environ.get("RANK", "0") != "0":
        return 0
    info(f"chat model: {result.run_dir} (try `gpt1 chat --model {result.run_dir}`)")
    if args.merge:
        merged = merge_model_dir(args.out, Path(args.out) / "merged")
        info(f"merged model: {merged}")
    return 0
