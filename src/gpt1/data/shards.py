"""Token shards: the prepared data dir `gpt1 prepare` writes, and opening and checking one.

A data dir holds `train.bin` and `val.bin` (token ids as uint16, every document followed by
`[EOS]`: read as NumPy memmaps, so a vocabulary must fit in 65,536 ids), `tokenizer.json` (a
copy of the tokenizer that made them, so `gpt1 pretrain --data DIR` needs nothing else) and
`meta.json`, written last: a folder without it is never taken as complete. meta.json records the
format and its version, each shard's file name and token and document counts, the tokenizer's
fingerprint (checked against any model later) and how the data was prepared.

`PreparedData.open` opens and checks one once (meta.json, its shards' sizes, its tokenizer);
`load_meta`, `load_data_tokenizer` and `open_shard` are its steps. Writing a data dir is
`gpt1.data.prepare`'s (where the unfinished one's files below come from); drawing training and
evaluation windows from its shards, `gpt1.data.windows`'s. Their names are importable from here
too, where they lived until 2026-12 (`__getattr__` at the end).
"""

from __future__ import annotations

import importlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt1.core.atomic import write_json
from gpt1.core.constants import DATA_META_FILE as META_FILE
from gpt1.core.errors import Gpt1Error
from gpt1.core.locks import lock_holder
from gpt1.core.reading import read_json
from gpt1.core.tokenizer import TOKENIZER_FILE, Tokenizer

TRAIN_FILE, VAL_FILE = "train.bin", "val.bin"
# What an unfinished `gpt1 prepare` leaves (gpt1.data.prepare): its committed state, its shards
# under their partial names, and count mode's held-out candidates.
STATE_FILE = "prepare-state.json"
HEAP_FILE = ".val-heap.partial"
PARTIAL = ".partial"
DTYPE = np.uint16
MAX_VOCAB = int(np.iinfo(DTYPE).max) + 1
FORMAT = "gpt1-shards"
# meta.json's "version": raised when a data dir changes in a way this gpt1 would misread (another
# dtype, other entries); one a newer gpt1 wrote is refused, not read as this one (`load_meta`).
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PreparedData:
    """A prepared data dir, opened and checked once: its meta.json (`load_meta`: a format this gpt1
    reads, complete shards), its tokenizer (`load_data_tokenizer`: the one the shards were made
    with) and its shards' paths."""

    folder: Path
    meta: dict
    tokenizer: Tokenizer

    @classmethod
    def open(cls, folder: str | Path) -> PreparedData:
        folder = Path(folder)
        meta = load_meta(folder)
        return cls(folder, meta, load_data_tokenizer(folder, meta))

    @property
    def train_path(self) -> Path:
        return self.folder / self.meta["train"]["file"]

    @property
    def val_path(self) -> Path:
        return self.folder / self.meta["val"]["file"]

    def check_tokenizer(self, tokenizer: Tokenizer, what: str) -> None:
        """Refuse a tokenizer (of `what`: a run dir, a model) that is not the one of the shards."""
        check_fingerprint(self.meta, tokenizer, what)


def load_meta(data_dir: str | Path) -> dict:
    """The meta.json of a prepared data dir, checked: a format version this gpt1 reads, complete
    shards of the right size."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise Gpt1Error(f"{data_dir}: data directory not found (create it with `gpt1 prepare`)")
    if not (data_dir / META_FILE).is_file():
        if holder := lock_holder(data_dir):  # a rerun now would be refused: it is running
            raise Gpt1Error(f"{data_dir}: `gpt1 prepare` ({holder}) is writing it (no {META_FILE} yet); "
                            "wait for it to end")
        raise Gpt1Error(f"{data_dir}: no {META_FILE}: not a prepared data dir, or `gpt1 prepare` did not finish "
                        "(rerun it to resume)")
    meta = read_json(data_dir / META_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise Gpt1Error(f"{data_dir / META_FILE}: not a gpt1 shards meta file")
    if newer := newer_format(meta):  # before the entries: a newer format may have other ones, or another dtype
        raise Gpt1Error(f"{data_dir}: prepared by {newer}: upgrade gpt1 to read it")
    if meta.get("dtype") != np.dtype(DTYPE).name:
        raise Gpt1Error(f"{data_dir / META_FILE}: dtype {meta.get('dtype')!r}, expected {np.dtype(DTYPE).name}")
    if why := meta_problem(meta):
        raise Gpt1Error(f"{data_dir / META_FILE}: {why}; the data dir is damaged: prepare it again "
                        "(`gpt1 prepare --overwrite`)")
    if not shards_complete(data_dir, meta):
        for split, what in (("train", "training"), ("val", "validation")):
            if meta[split]["tokens"] == 0:
                raise Gpt1Error(f"{data_dir / meta[split]['file']}: no {what} tokens ({META_FILE} counts 0); `gpt1 prepare` "
                                "puts at least one document in each split, so the data dir is damaged: prepare it again "
                                "(`gpt1 prepare --overwrite`)")
        raise Gpt1Error(f"{data_dir}: train.bin/val.bin are missing or their sizes do not match {META_FILE} "
                        "(rerun `gpt1 prepare`)")
    return meta


def newer_format(meta: dict) -> str | None:
    """"a newer gpt1 (format version 2; this gpt1 reads 1)" where meta.json's "version"
    is above `FORMAT_VERSION` (its shards were read as this gpt1's, unsaid), else None. (Every gpt1
    wrote a version: one missing is read as 1, one that is no whole number is damage, `meta_problem`.)"""
    version = meta.get("version", FORMAT_VERSION)
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        return f"a newer gpt1 (format version {version}; this gpt1 reads {FORMAT_VERSION})"
    return None


def meta_problem(meta: dict) -> str | None:
    """What in the entries of a meta.json that gpt1 reads is not as `write_meta` writes
    them, or None: "train" and "val" objects with a shard's file name and its token count (and
    document count, where recorded), a "tokenizer" object with a file name and a fingerprint. A
    string there was a TypeError, a missing count a KeyError; and each "file" is joined onto the
    data dir: a path ("/etc/x", "../x") would have read a file outside it. A "version", where
    present, is a whole number >= 1."""
    version = meta.get("version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return f'"version" must be a whole number >= 1, got {json.dumps(version):.100}'
    for part, keys in (("tokenizer", ("file", "fingerprint")), ("train", ("file", "tokens")), ("val", ("file", "tokens"))):
        entry = meta.get(part)
        if not isinstance(entry, dict):
            wanted = " and ".join(f'"{key}"' for key in keys)
            return f'"{part}" must be an object with {wanted}, got {json.dumps(entry):.100}'
        if missing := next((key for key in keys if key not in entry), None):
            return f'"{part}" has no "{missing}"'
        file = entry["file"]
        if not isinstance(file, str) or file in ("", ".", "..") or Path(file).name != file:
            return f'"{part}.file" must be the name of a file in the data dir, got {json.dumps(file):.100}'
    if not isinstance(fingerprint := meta["tokenizer"]["fingerprint"], str):
        return f'"tokenizer.fingerprint" must be a string, got {json.dumps(fingerprint):.100}'
    for part, count in itertools.product(("train", "val"), ("tokens", "documents")):
        value = meta[part].get(count, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f'"{part}.{count}" must be a whole number >= 0, got {json.dumps(value):.100}'
    return None


def shards_complete(data_dir: Path, meta: dict) -> bool:
    """Whether train.bin and val.bin hold the tokens meta.json counts, and some: `prepare` puts at
    least one document (and its [EOS]) in each split, so an empty one is damage even where meta.json
    agrees (NumPy cannot map an empty file; and a rerun of the same `prepare` said "nothing to do")."""
    itemsize = np.dtype(DTYPE).itemsize
    return all(meta[s]["tokens"] != 0 and (data_dir / meta[s]["file"]).is_file()
               and (data_dir / meta[s]["file"]).stat().st_size == meta[s]["tokens"] * itemsize
               for s in ("train", "val"))


def looks_prepared(folder: str | Path) -> bool:
    """Whether `folder` is (or was being made) a prepared data dir: its meta.json, or what an
    unfinished `gpt1 prepare` leaves (its state, partial shards, its lock file)."""
    folder = Path(folder)
    return any((folder / name).is_file() for name in (META_FILE, STATE_FILE, TRAIN_FILE + PARTIAL,
                                                     VAL_FILE + PARTIAL, ".lock"))


def load_data_tokenizer(data_dir: str | Path, meta: dict | None = None) -> Tokenizer:
    """The tokenizer stored with the shards, verified against meta.json's fingerprint."""
    data_dir = Path(data_dir)
    meta = meta or load_meta(data_dir)
    tokenizer = Tokenizer.load(data_dir / meta["tokenizer"]["file"])
    check_fingerprint(meta, tokenizer, f"{data_dir / meta['tokenizer']['file']}")
    return tokenizer


def check_fingerprint(meta: dict, tokenizer: Tokenizer, what: str) -> None:
    """Refuse to mix shards with a model whose tokenizer is not the one that made them."""
    expected = meta["tokenizer"]["fingerprint"]
    if tokenizer.fingerprint != expected:
        raise Gpt1Error(f"tokenizer mismatch: the shards were made with tokenizer {expected}, but {what} has "
                        f"{tokenizer.fingerprint}; prepare the data again with this tokenizer")


def open_shard(path: str | Path, block_size: int, what: str) -> np.memmap:
    """A read-only memmap of a shard holding at least one window of `block_size` + 1 tokens."""
    data = np.memmap(path, dtype=DTYPE, mode="r")
    if len(data) < block_size + 1:
        # A larger --val takes tokens from training: the advice depends on the split.
        grow = "prepare more text or a larger --val" if what == "validation" else "prepare more text or a smaller --val"
        raise Gpt1Error(f"{path}: the {what} split has {len(data):,} tokens, fewer than one context window "
                        f"({block_size + 1:,}); {grow}, or use a smaller block_size")
    return data


def write_meta(data_dir: Path, tokenizer: Tokenizer, eos: int, counts: dict, preparation: dict) -> dict:
    """Write the meta.json of a data dir whose shards and tokenizer are in place (last: a folder
    without it is never taken as complete), and return it: the format, the tokenizer, each shard's
    file and counts (`counts`: "train_tokens", "train_documents", "val_tokens", "val_documents"), then
    `preparation` (how it was made, `gpt1.data.prepare`)."""
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "dtype": np.dtype(DTYPE).name,
        "tokenizer": {"file": TOKENIZER_FILE, "fingerprint": tokenizer.fingerprint,
                      "vocab_size": tokenizer.vocab_size, "eos_id": eos},
        "train": {"file": TRAIN_FILE, "tokens": counts["train_tokens"], "documents": counts["train_documents"]},
        "val": {"file": VAL_FILE, "tokens": counts["val_tokens"], "documents": counts["val_documents"]},
        **preparation,
    }
    write_json(data_dir / META_FILE, meta)
    return meta


# ---- the names that lived here until 2026-12 ------------------------------------------------
# Looked up when asked (PEP 562), as both modules import this one: `from gpt1.data.shards import
# prepare, ShardWindows` goes on working. New code imports them from where they live.
_MOVED = {
    "gpt1.data.prepare": ("COMMIT_BYTES", "SPLIT_RULE", "BATCH_CHARS", "TEXT_FILE_IS_ONE_DOCUMENT", "piece_batches",
                          "prepare", "ShardWriter", "interrupted_prepare"),
    "gpt1.data.windows": ("WINDOW_ORDERS", "STORED_ORDER", "FEISTEL_ROUNDS", "ShardWindows", "sequences_drawn",
                          "fixed_windows", "sequential_windows"),
}
_HOMES = {name: (module, name) for module, names in _MOVED.items() for name in names}


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _HOMES[name]
    return getattr(importlib.import_module(module), attribute)
