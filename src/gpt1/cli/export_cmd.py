"""`gpt1 export`: a model dir as a Hugging Face `transformers` folder (+ PEFT adapter) or a GGUF file."""

from __future__ import annotations

import argparse

from gpt1.cli.args import path_arg
from gpt1.core.errors import Gpt1Error

# gpt1.formats (torch) is imported by the command: `gpt1 --help` imports this module.

FORMATS = ("hf", "gguf")
# gpt1.formats.gguf.GGUF_TYPES, for --help (a test keeps the two equal).
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write a Hugging Face transformers folder (and PEFT adapter) or a GGUF file",
        description="Write a model dir for other tools. --format hf (default): a folder that transformers' "
                    "AutoModelForCausalLM and AutoTokenizer load offline: config.json (GPT-2 architecture), "
                    "model.safetensors, generation_config.json, the tokenizer (with the chat template for a chat "
                    "model); a LoRA fine-tuned model is written as its base plus OUT/adapter in PEFT's layout, or "
                    "with --merge as one merged model. --format gguf: one .gguf file for llama.cpp, Ollama, "
                    "LM Studio and llama-cpp-python (a fine-tuned model's adapter merged in), see docs/gguf.md.")
    parser.add_argument("--model", required=True, type=path_arg, metavar="DIR", help="the gpt1 model dir to export")
    parser.add_argument("--out", required=True, type=path_arg, metavar="PATH",
                        help="hf: the folder to write (must not exist or be empty); gguf: the .gguf file to write")
    parser.add_argument("--format", default="hf", metavar="FORMAT", help=f"one of {', '.join(FORMATS)} (default: hf)")
    parser.add_argument("--type", metavar="TYPE",
                        help=f"gguf only: the weights' type, one of {', '.join(GGUF_TYPES)} (default: f16; "
                             "f32 is exact, q8_0 is a quarter of f32's size)")
    parser.add_argument("--merge", action="store_true",
                        help="hf: merge a fine-tuned model's LoRA adapter into the weights instead of writing "
                             "OUT/adapter (gguf always merges)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists (and, for hf, is not empty)")
    parser.set_defaults(func=export_command)


def export_command(args: argparse.Namespace) -> int:
    from gpt1.formats.gguf import export_gguf
    from gpt1.formats.hf import export_model

    if args.out == "-":  # where plot --out - and eval --json - mean stdout: not a file named "-" here
        raise Gpt1Error("--out -: a GGUF or HF export is written to files, not to standard output; name a path")
    if args.format not in FORMATS:
        raise Gpt1Error(f"unknown --format {args.format!r}; known formats: {', '.join(FORMATS)}")
    if args.format == "gguf":
        out = export_gguf(args.model, args.out, "f16" if args.type is None else args.type, overwrite=args.force)
    elif args.type is not None:
        raise Gpt1Error("--type applies to --format gguf only (an hf export keeps the model's float32 weights)")
    else:
        out = export_model(args.model, args.out, merge=args.merge, overwrite=args.force)
    print(out)
    return 0
