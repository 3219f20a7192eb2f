"""`gpt1 export`: a model dir as a Hugging Face `transformers` folder (+ PEFT adapter)."""

from __future__ import annotations

import argparse

from gpt1.formats.hf import export_model


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write a Hugging Face transformers folder (and PEFT adapter)",
        description="Write a model dir as a folder that transformers' AutoModelForCausalLM and AutoTokenizer "
                    "load offline: config.json (GPT-2 architecture), model.safetensors, generation_config.json, "
                    "the tokenizer (with the chat template for a chat model). A LoRA fine-tuned model is written "
                    "as its base plus OUT/adapter in PEFT's layout, or with --merge as one merged model.")
    parser.add_argument("--model", required=True, metavar="DIR", help="the gpt1 model dir to export")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must not exist or be empty)")
    parser.add_argument("--merge", action="store_true",
                        help="merge a fine-tuned model's LoRA adapter into the weights instead of writing OUT/adapter")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    parser.set_defaults(func=export_command)


def export_command(args: argparse.Namespace) -> int:
    out = export_model(args.model, args.out, merge=args.merge, overwrite=args.force)
    print(out)
    return 0
