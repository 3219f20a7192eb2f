"""`gpt1 eval`: loss and perplexity of a model dir on prepared shards or text files."""

from __future__ import annotations

import argparse
import json

import gpt1
from gpt1.core.errors import Gpt1Error
from gpt1.train.evaluate import evaluate_data
from gpt1.train.finetune import evaluate_chat


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="loss and perplexity of a model on held-out data",
        description="Print the loss and perplexity of a model dir on a prepared data dir's val.bin, or on text "
                    "files/directories/globs/hf:DATASET (tokenized with [EOS] after each document). The text is "
                    "cut into non-overlapping context windows, so every token is predicted once.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="model dir (or training run dir)")
    parser.add_argument("--data", required=True, nargs="+", metavar="DIR_OR_FILES",
                        help="a prepared data dir (its val.bin is used), or text sources")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--block-size", type=int, default=None, help="window length (default: the model's context)")
    parser.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches")
    parser.add_argument("--precision", choices=["fp32", "fp16-mixed", "bf16-mixed"], default="fp32",
                        help="autocast precision of the forward passes")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet/datasets")
    parser.add_argument("--chat", action="store_true",
                        help="the data is one chat source (OASST2 hub name or export, chat .jsonl, chatterbot; see "
                             "`gpt1 finetune --help`): report the loss and perplexity of the assistant tokens")
    parser.add_argument("--split", default=None,
                        help="with --chat: the dataset split (default: validation when the dataset has one)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.set_defaults(func=eval_command)


def eval_command(args: argparse.Namespace) -> int:
    llm = gpt1.load(args.model, device=args.device)
    if args.chat:
        return _chat_eval(llm, args)
    result = evaluate_data(llm, args.data, batch_size=args.batch_size, block_size=args.block_size,
                           max_batches=args.max_batches, precision=args.precision, text_field=args.text_field)
    if args.json:
        print(json.dumps({"loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens,
                          "source": result.source}))
    else:
        print(f"loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  ({result.tokens:,} tokens of {result.source})")
    return 0


def _chat_eval(llm, args: argparse.Namespace) -> int:
    if len(args.data) != 1:
        raise Gpt1Error("--chat takes one chat source in --data")
    result = evaluate_chat(llm, args.data[0], split=args.split, batch_size=args.batch_size,
                           max_batches=args.max_batches, precision=args.precision)
    if args.json:
        print(json.dumps({"loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens,
                          "conversations": result.conversations, "source": result.source}))
    else:
        print(f"assistant-token loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  "
              f"({result.tokens:,} tokens of {result.conversations:,} conversations in {result.source})")
    return 0
