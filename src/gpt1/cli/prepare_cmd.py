"""`gpt1 prepare`: tokenize a corpus into train.bin / val.bin token shards + meta.json."""

from __future__ import annotations

import argparse

from gpt1.cli.args import DefaultsHelpFormatter, folder_arg, path_arg, positive_int, val_split
from gpt1.core.constants import PREPARE_BATCH_DOCS, PREPARE_SEED, PREPARE_VAL
from gpt1.core.tokenizer import Tokenizer

# gpt1.data.shards (numpy) is imported by the functions that use it: `gpt1 --help` imports this module.


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare", help="tokenize a corpus into train.bin/val.bin token shards",
        description="Tokenize text files, directories, globs or hf:DATASET into OUT/train.bin and OUT/val.bin "
                    "(uint16 token ids, [EOS] after every document), OUT/meta.json and a copy of the tokenizer. "
                    "An interrupted run resumes when rerun with the same arguments.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("sources", nargs="+", type=path_arg, metavar="SOURCE",
                        help="text/.jsonl(.gz)/.parquet files, directories, globs, or hf:NAME[:SPLIT] (or hf:NAME:CONFIG:SPLIT) "
                             "(e.g. hf:Skylion007/openwebtext), or stdlib (the Python standard library source)")
    parser.add_argument("--tokenizer", required=True, type=path_arg, help="tokenizer.json or a folder (model dir) holding it")
    parser.add_argument("--out", required=True, type=folder_arg, help="output data folder")
    parser.add_argument("--val", type=val_split, default=PREPARE_VAL,
                        help="validation split: a fraction of the documents (< 1) or a number of documents (>= 1)")
    parser.add_argument("--seed", type=int, default=PREPARE_SEED, help="seed of the (deterministic) validation split")
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet/datasets")
    parser.add_argument("--max-documents", type=positive_int, default=None, help="stop after this many documents")
    parser.add_argument("--batch-docs", type=positive_int, default=PREPARE_BATCH_DOCS, help="documents per tokenizer batch")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="skip (and count) files with invalid UTF-8 and malformed lines instead of failing")
    parser.add_argument("--overwrite", action="store_true", help="replace data prepared differently in --out")
    parser.set_defaults(func=prepare_command, rerun_hint=prepare_rerun_hint)


def prepare_command(args: argparse.Namespace) -> int:
    from gpt1.data.prepare import prepare

    prepare(args.sources, Tokenizer.load(args.tokenizer), args.out, val=args.val, seed=args.seed,
            text_field=args.text_field, skip_invalid=args.skip_invalid, max_documents=args.max_documents,
            batch_docs=args.batch_docs, overwrite=args.overwrite)
    return 0


def prepare_rerun_hint(args: argparse.Namespace) -> str:
    """What a rerun of an interrupted prepare does: resume from its last commit, or start over
    when it was stopped before its first (its partial files are deleted on the way out)."""
    from gpt1.data.prepare import COMMIT_BYTES, interrupted_prepare

    state = interrupted_prepare(args.out)
    if state is None:
        return f" before its first commit (one every {COMMIT_BYTES / 1e6:,.0f} MB of text); a rerun starts over"
    return f"; run the same command again to resume after its last commit ({state['bytes'] / 1e6:,.1f} MB of text)"
