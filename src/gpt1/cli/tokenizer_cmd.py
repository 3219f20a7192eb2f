"""`gpt1 tokenizer train`: train the byte-level BPE tokenizer on files or a dataset."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterator

from gpt1.cli.args import DefaultsHelpFormatter, folder_arg, path_arg, positive_int
from gpt1.core.config import ModelConfig
from gpt1.core.errors import Gpt1Error
from gpt1.core.paths import folder_target, owner_of
from gpt1.core.progress import info, progress
from gpt1.core.tokenizer import MIN_FREQUENCY, TOKENIZER_FILE, train_tokenizer
from gpt1.data.readers import ReadMeter
from gpt1.data.sources import SKIPPED, SourceStats, files_size, iter_texts, resolve_sources


def register(subparsers) -> None:
    parser = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer",
                                   description="Tokenizer commands.")
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    train = sub.add_parser(
        "train", help="train a tokenizer on text files, directories, globs or hf:DATASET",
        description="Train a byte-level BPE tokenizer with [PAD]=0, [UNK]=1, [EOS]=2 and the chat role "
                    "markers, to exactly --vocab-size tokens. Writes OUT/tokenizer.json.",
        formatter_class=DefaultsHelpFormatter,
    )
    train.add_argument("sources", nargs="+", type=path_arg, metavar="SOURCE",
                       help="text/.jsonl(.gz)/.parquet files, directories, globs, or hf:NAME[:SPLIT], or stdlib (the Python standard library source)")
    # The library's defaults, never repeated here: the model card's vocabulary and train_tokenizer's own.
    train.add_argument("--vocab-size", type=int, default=ModelConfig.vocab_size, help="exact size of the vocabulary")
    train.add_argument("--out", required=True, type=folder_arg, help="output folder for tokenizer.json")
    train.add_argument("--min-frequency", type=int, default=MIN_FREQUENCY,
                       help="a merge must occur at least this often")
    train.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet/datasets")
    train.add_argument("--max-documents", type=positive_int, default=None, help="stop after this many documents")

    train.add_argument("--skip-invalid", action="store_true",
                       help="skip (and count) files with invalid UTF-8 and malformed lines instead of failing")
    train.add_argument("--overwrite", action="store_true", help="replace a different tokenizer.json in --out")
    train.set_defaults(func=train_command)


def train_command(args: argparse.Namespace) -> int:
    sources = resolve_sources(args.sources)
    folder_target(args.out)  # writable: found now, not after the training (an hour on OpenWebText)
    owner = owner_of(args.out)
    # A training run writes its own tokenizer.json at its next save, even where none is there yet.
    if owner == "a training run dir" or (owner and (Path(args.out) / TOKENIZER_FILE).exists()):
        raise Gpt1Error(f"{args.out} is {owner}: its {TOKENIZER_FILE} belongs to it and a new tokenizer would break it; "
                        "choose another --out")
    stats = SourceStats()
    # Long documents arrive in bounded pieces: BPE counts words, so pieces learn the same merges.
    texts = iter_texts(sources, text_field=args.text_field, skip_invalid=args.skip_invalid, stats=stats,
                       max_documents=args.max_documents)
    readable = sum(source.kind != SKIPPED for source in sources)  # the rest are counted as skipped below
    texts = _announced(_metered(texts, files_size(sources), stats),
                       f"training a {args.vocab_size:,}-token BPE tokenizer on {readable:,} file(s) or "
                       f"dataset(s) from {len(args.sources):,} SOURCE argument(s)")
    tokenizer, result = train_tokenizer(texts, args.vocab_size, min_frequency=args.min_frequency, skipped=stats.skipped,
                                        show_progress=False)  # the bar is `_metered`'s: it knows the files
    info(f"corpus: {stats.summary()}; trained in {result['seconds']:.1f} s "
         f"({stats.bytes / 1e6 / max(result['seconds'], 1e-9):.1f} MB/s)")
    path = Path(args.out) / TOKENIZER_FILE
    # Known only now (tokenizer.json records no training settings): data prepared with the old
    # one, and models trained on it, would no longer match it. The same one again is no change.
    if path.is_file() and not args.overwrite:
        if path.read_bytes() == tokenizer.to_json().encode("utf-8"):
            info(f"{path} already holds this tokenizer (fingerprint {tokenizer.fingerprint}); nothing to do")
            return 0
        raise Gpt1Error(f"{path}: holds another tokenizer; pass --overwrite to replace it, or choose another --out")
    tokenizer.save(args.out)
    info(f"wrote {path} (vocab {tokenizer.vocab_size:,}, fingerprint {tokenizer.fingerprint})")
    return 0


def _metered(texts: Iterator[str], total: int | None, stats: SourceStats) -> Iterator[str]:
    """`texts`, with a bar on stderr that counts the bytes of the files read (a `ReadMeter`), the
    unit of its total, as `gpt1 prepare`'s bar does: counting the decoded text instead, a .jsonl
    written with `\\uXXXX` escapes ended at 48% and a .gz passed 100%. Without a total (a hub
    dataset) it counts the text's UTF-8 bytes. Closed once everything is read, before the merges."""
    meter = ReadMeter()
    bar = progress(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="tokenizer")
    try:
        while True:
            # Entered at each step: the BPE trainer pulls the texts from threads of its own, and a
            # reader finds the meter through a context variable, which each thread has its own of.
            with meter:
                text = next(texts, None)
            bar.update((meter.bytes if total is not None else stats.bytes) - bar.n)
            if text is None:
                bar.close()
                info("all text read; BPE is counting the last of it, then computes the merges")
                return
            yield text
    finally:
        bar.close()


def _announced(texts: Iterator[str], message: str) -> Iterator[str]:
    """`texts`, saying `message` when the training asks for the first one: once train_tokenizer
    has checked its settings (a --vocab-size it refuses was announced as being trained on)."""
    info(message)
    yield from texts
