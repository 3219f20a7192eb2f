"""`gpt1 finetune`: LoRA chat fine-tuning of a base model dir (resumable)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from gpt1.core.progress import info
from gpt1.train.config import load_config
from gpt1.train.finetune import FinetuneConfig, finetune, merge_model_dir


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune", help="LoRA chat fine-tuning of a base model on OASST2 or other chat data (resumable)",
        description="Fine-tune a base model dir with LoRA on chat data, with the loss on assistant replies only. "
                    "--data: OpenAssistant/oasst2 (or any hf:NAME[:SPLIT] / local dataset folder), an OASST export "
                    "(*.messages.jsonl[.gz], *.trees.jsonl[.gz], .parquet), a .jsonl of {\"messages\": [...]}, "
                    ".yml dialogs, or `chatterbot` (the dialogs of the chatterbot-corpus package). The recipe is a "
                    "TOML file (a path or a shipped name: gpt1-oasst2-lora); any key can be overridden as key=value, "
                    "e.g. max_steps=100 lora_r=16 lora_targets=[\"q\",\"v\"]; OASST options are recipe keys too: "
                    "languages=[\"en\",\"de\"] keeps those languages, all_paths=true trains on every root-to-leaf "
                    "path of each message tree. --out is the run dir and a chat model "
                    "dir; rerunning the same command resumes. Multi-GPU: torchrun --nproc_per_node N -m gpt1 finetune ...",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides (see the README for every key)")
    parser.add_argument("--base", required=True, help="the base model: a gpt1 model dir (from gpt1 pretrain) or a transformers GPT-2 folder with a gpt1 tokenizer (e.g. from gpt1 export)")
    parser.add_argument("--data", help="chat data source (see above); overrides the recipe's `data`")
    parser.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, and the fine-tuned model")
    parser.add_argument("--config", metavar="FILE", help="TOML recipe, or the name of a shipped one (default: built-in defaults)")
    parser.add_argument("--skip-invalid", action="store_true", default=None,
                        help="skip (and count) malformed lines instead of stopping at the first one")
    parser.add_argument("--merge", action="store_true",
                        help="after training, also write OUT/merged: a plain model dir with the adapter merged in")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    parser.set_defaults(func=finetune_command)


def finetune_command(args: argparse.Namespace) -> int:
    values = {}
    if args.data is not None:
        values["data"] = args.data
    if args.skip_invalid:
        values["skip_invalid"] = True
    cfg = load_config(FinetuneConfig, args.config, args.overrides, **values)
    if args.print_config:
        # JSON scalars and arrays are valid TOML values: the output is a loadable recipe.
        print("".join(f"{key} = {json.dumps(value)}\n" for key, value in cfg.to_dict().items()), end="")
        return 0
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
