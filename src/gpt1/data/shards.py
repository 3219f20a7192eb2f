"""Token shards: a corpus -> `train.bin` + `val.bin` + `meta.json` (+ `tokenizer.json`), and
the batch sources that read them.

`prepare` tokenizes documents in batches with the Rust tokenizer (all cores; the next batch is
encoded in a worker thread while this one is written) and appends `[EOS]` after every
document. Ids are stored as uint16 (NumPy memmap), so a vocabulary must fit in 65,536 ids.

Validation split, deterministic and independent of batch size or core count:
- a fraction `val` in (0, 1): document i is held out iff hash(seed, i) < val;
- a count `val` >= 1: the `val` documents with the smallest hash(seed, i) are held out
  (kept in memory until the end, so keep the count modest: thousands, not millions).

Crash safety: tokens go to `train.bin.partial` / `val.bin.partial`; every `commit_bytes` of
text the files are flushed to disk and `prepare-state.json` records how far they are valid.
A rerun with the same arguments resumes from there (files truncated to the committed length);
a rerun with other arguments starts over. At the end the partial files are renamed and
`meta.json` is written last: a folder without `meta.json` is never taken as complete.

The data dir holds a copy of the tokenizer (`tokenizer.json`), so `gpt1 pretrain --data DIR`
needs nothing else; `meta.json` records its fingerprint, checked against any model later.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from gpt1.core.errors import Gpt1Error
from gpt1.core.io import atomic_path, read_json, write_json
from gpt1.core.progress import info, progress
from gpt1.core.tokenizer import TOKENIZER_FILE, Tokenizer
from gpt1.data.sources import Source, SourceStats, iter_documents, resolve_sources

META_FILE = "meta.json"
TRAIN_FILE, VAL_FILE = "train.bin", "val.bin"
STATE_FILE = "prepare-state.json"
HEAP_FILE = ".val-heap.partial"
PARTIAL = ".partial"
DTYPE = np.uint16
MAX_VOCAB = int(np.iinfo(DTYPE).max) + 1
FORMAT = "gpt1-shards"
_SPLIT_SALT, _WINDOW_SALT = 0x5EED_5A17, 0x3A1D_0B75


def _hash01(seed: int, salt: int, index: np.ndarray) -> np.ndarray:
    """SplitMix64 of (seed, salt, index) as uint64: a fast, well-mixed, reproducible hash."""
    with np.errstate(over="ignore"):
        z = index.astype(np.uint64) + np.uint64((seed * 0x632BE59BD9B4E019 + salt) % 2**64)
        z = z * np.uint64(0x9E3779B97F4A7C15)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def _batches(documents: Iterator[str], docs: int, stats: SourceStats) -> Iterator[tuple[list[str], int]]:
    """Batches of documents with their UTF-8 size (counted once, by the reader)."""
    batch: list[str] = []
    seen = stats.bytes
    for text in documents:
        batch.append(text)
        if len(batch) == docs:
            yield batch, stats.bytes - seen
            batch, seen = [], stats.bytes
    if batch:
        yield batch, stats.bytes - seen


def _to_tokens(encoded: list[list[int]], eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Encoded documents -> (concatenated uint16 tokens with EOS after each, per-document lengths)."""
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.empty(int(lengths.sum()), dtype=DTYPE)
    ends = np.cumsum(lengths)
    for ids, end in zip(encoded, ends):
        try:
            tokens[end - len(ids) - 1:end - 1] = ids  # numpy rejects ids outside uint16 here
        except OverflowError:
            raise Gpt1Error(f"a token id ({max(ids):,}) does not fit in uint16: shards hold ids < {MAX_VOCAB:,}") from None
    tokens[ends - 1] = eos
    return tokens, lengths


def _key(specs: list[str], sources: list[Source], tokenizer: Tokenizer, val: float, seed: int, text_field: str,
         skip_invalid: bool, max_documents: int | None) -> dict:
    """What makes two preparations the same: a resumed run must see the same documents in order."""
    files = hashlib.sha256()
    for s in sources:
        st = os.stat(s.location) if s.kind != "hf" else None
        files.update(f"{s}\0{st.st_size if st else ''}\0{st.st_mtime_ns if st else ''}\n".encode())
    return {"sources": list(specs), "files": files.hexdigest()[:16], "tokenizer_fingerprint": tokenizer.fingerprint,
            "val": val, "seed": seed, "text_field": text_field, "skip_invalid": skip_invalid,
            "max_documents": max_documents}


def prepare(sources: list[str], tokenizer: Tokenizer, out: str | Path, *, val: float = 0.0005, seed: int = 1337,
            text_field: str = "text", skip_invalid: bool = False, max_documents: int | None = None,
            batch_docs: int = 1024, commit_bytes: int = 256_000_000, overwrite: bool = False) -> dict:
    """Tokenize `sources` into `out`/train.bin, val.bin, meta.json, tokenizer.json; return the meta.

    `val` < 1 is the fraction of documents held out for validation, `val` >= 1 their count.
    Resumes an interrupted run with the same arguments; returns the existing meta when `out`
    already holds exactly this preparation; refuses (unless `overwrite`) a finished different one.
    """
    out = Path(out)
    if tokenizer.vocab_size > MAX_VOCAB:
        raise Gpt1Error(f"the tokenizer has {tokenizer.vocab_size:,} tokens: shards store ids as uint16, "
                        f"so the vocabulary must be at most {MAX_VOCAB:,}")
    if not val > 0 or (val >= 1 and val != int(val)):
        raise Gpt1Error(f"--val must be a fraction in (0, 1) or a whole number of documents >= 1, got {val}")
    val = int(val) if val >= 1 else val
    resolved = resolve_sources(list(sources))
    key = _key(sources, resolved, tokenizer, val, seed, text_field, skip_invalid, max_documents)

    meta_path = out / META_FILE
    if meta_path.is_file():
        old = read_json(meta_path)
        if old.get("key") == key and shards_complete(out, old):
            info(f"{out} already holds this prepared data ({old['train']['tokens']:,} train tokens); nothing to do")
            return old
        if not overwrite:
            raise Gpt1Error(f"{out} already holds data prepared from other sources or settings; "
                            "choose another --out, or pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)

    state_path = out / STATE_FILE
    train_tmp, val_tmp, heap_tmp = out / (TRAIN_FILE + PARTIAL), out / (VAL_FILE + PARTIAL), out / HEAP_FILE
    state = {"key": key, "documents": 0, "bytes": 0, "train_tokens": 0, "val_tokens": 0,
             "train_documents": 0, "val_documents": 0, "heap": []}
    if state_path.is_file():
        old_state = read_json(state_path)
        if old_state.get("key") == key and train_tmp.is_file() and val_tmp.is_file():
            state = old_state
            info(f"resuming an interrupted prepare in {out} after {state['documents']:,} documents")
        else:
            info(f"{out} holds an interrupted prepare with other settings; starting over")
    if state["documents"] == 0:
        for path in (train_tmp, val_tmp, heap_tmp):
            path.unlink(missing_ok=True)
        train_tmp.touch()
        val_tmp.touch()
    itemsize = np.dtype(DTYPE).itemsize
    os.truncate(train_tmp, state["train_tokens"] * itemsize)  # drop what was written after the last commit
    os.truncate(val_tmp, state["val_tokens"] * itemsize)

    by_count = val >= 1
    # Count mode: a max-heap (by hash) of the best candidates so far: entries (-hash, index, tokens).
    heap: list[tuple[int, int, np.ndarray]] = []
    if by_count and state["heap"]:
        flat = np.fromfile(heap_tmp, dtype=DTYPE)
        offsets = np.cumsum([0] + [n for _, n in state["heap"]])
        for (index, _), a, b in zip(state["heap"], offsets[:-1], offsets[1:]):
            h = int(_hash01(seed, _SPLIT_SALT, np.array([index]))[0])
            heap.append((-h, index, flat[a:b]))
        heapq.heapify(heap)
    threshold = int(val * 2**64) if not by_count else 0

    stats = SourceStats()
    documents = iter_documents(resolved, text_field=text_field, skip_invalid=skip_invalid, stats=stats)
    total_bytes = _known_size(resolved)
    skip = state["documents"]
    start_time = time.perf_counter()
    bar = progress(total=total_bytes, initial=0, unit="B", unit_scale=True, unit_divisor=1000, desc="prepare")
    eos = tokenizer.eos_id

    def commit() -> None:
        for f in (train_f, val_f):
            f.flush()
            os.fsync(f.fileno())
        if by_count:
            entries = sorted(heap, key=lambda e: e[1])
            with atomic_path(heap_tmp) as tmp:
                (np.concatenate([e[2] for e in entries]) if entries else np.empty(0, DTYPE)).tofile(tmp)
            state["heap"] = [[e[1], len(e[2])] for e in entries]
        write_json(state_path, state)

    def handle(batch: list[str], nbytes: int, encoded: list[list[int]]) -> None:
        tokens, lengths = _to_tokens(encoded, eos)
        first = state["documents"]
        index = np.arange(first, first + len(batch), dtype=np.uint64)
        hashes = _hash01(seed, _SPLIT_SALT, index)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        if by_count:
            to_train = []
            for i, h, a, b in zip(index.tolist(), hashes.tolist(), starts.tolist(), ends.tolist()):
                entry = (-h, i, tokens[a:b])
                if len(heap) < val:
                    heapq.heappush(heap, entry)
                elif h < -heap[0][0]:
                    to_train.append(heapq.heapreplace(heap, entry)[2])
                else:
                    to_train.append(entry[2])
            train_part = np.concatenate(to_train) if to_train else np.empty(0, DTYPE)
            val_part = np.empty(0, DTYPE)
            n_val = 0
        else:
            is_val = hashes < np.uint64(threshold)
            token_is_val = np.repeat(is_val, lengths)
            train_part, val_part = tokens[~token_is_val], tokens[token_is_val]
            n_val = int(is_val.sum())
        train_part.tofile(train_f)
        val_part.tofile(val_f)
        state["documents"] += len(batch)
        state["train_tokens"] += len(train_part)
        state["val_tokens"] += len(val_part)
        state["val_documents"] += n_val
        state["train_documents"] = state["documents"] - state["val_documents"] - len(heap)
        state["bytes"] += nbytes
        bar.update(nbytes)
        seconds = max(time.perf_counter() - start_time, 1e-9)
        bar.set_postfix(tokens=f"{state['train_tokens'] + state['val_tokens']:,}",
                        tok_s=f"{(state['train_tokens'] + state['val_tokens'] - resumed_tokens) / seconds:,.0f}")

    resumed_tokens = state["train_tokens"] + state["val_tokens"]
    with open(train_tmp, "ab") as train_f, open(val_tmp, "ab") as val_f, ThreadPoolExecutor(1) as pool:
        for _ in range(skip):  # documents already in the committed partial files
            if next(documents, None) is None:
                break
        if skip:
            bar.update(stats.bytes)
        if max_documents is not None:
            documents = (d for d, _ in zip(documents, range(max_documents - skip)))
        since_commit = 0
        pending = None
        try:
            for batch, nbytes in _batches(documents, batch_docs, stats):
                future = pool.submit(tokenizer.encode_batch, batch)  # overlaps reading the next batch
                if pending is not None:
                    handle(pending[0], pending[1], pending[2].result())
                    since_commit += pending[1]
                    if since_commit >= commit_bytes:
                        commit()
                        since_commit = 0
                pending = (batch, nbytes, future)
            if pending is not None:
                handle(pending[0], pending[1], pending[2].result())
        finally:
            bar.close()
        if by_count:
            for _, _, doc in sorted(heap, key=lambda e: e[1]):
                doc.tofile(val_f)
                state["val_tokens"] += len(doc)
            state["val_documents"] += len(heap)
            heap.clear()
            state["train_documents"] = state["documents"] - state["val_documents"]
        commit()

    if state["documents"] == 0:
        _remove(out, state_path, train_tmp, val_tmp, heap_tmp)
        raise Gpt1Error(f"the corpus is empty: {', '.join(map(str, resolved))} held no documents ({stats.summary()})")
    if state["train_documents"] == 0:
        _remove(out, state_path, train_tmp, val_tmp, heap_tmp)
        raise Gpt1Error(f"every one of the {state['documents']:,} documents went to validation (--val {val:g}); "
                        "lower --val")
    if state["val_documents"] == 0:
        _remove(out, state_path, train_tmp, val_tmp, heap_tmp)
        raise Gpt1Error(f"no document of the {state['documents']:,} went to validation with --val {val:g}; "
                        "use a larger fraction or a count (e.g. --val 10)")

    # Finish: no meta.json while the shards change, then shards, tokenizer, and meta.json last.
    meta_path.unlink(missing_ok=True)
    os.replace(train_tmp, out / TRAIN_FILE)
    os.replace(val_tmp, out / VAL_FILE)
    tokenizer.save(out)
    seconds = time.perf_counter() - start_time
    meta = {
        "format": FORMAT, "version": 1, "dtype": np.dtype(DTYPE).name,
        "tokenizer": {"file": TOKENIZER_FILE, "fingerprint": tokenizer.fingerprint,
                      "vocab_size": tokenizer.vocab_size, "eos_id": eos},
        "train": {"file": TRAIN_FILE, "tokens": state["train_tokens"], "documents": state["train_documents"]},
        "val": {"file": VAL_FILE, "tokens": state["val_tokens"], "documents": state["val_documents"]},
        "val_split": val, "split_seed": seed, "sources": list(sources), "text_field": text_field,
        "bytes": state["bytes"], "skipped": dict(stats.skipped), "seconds_last_run": round(seconds, 3),
        "key": key,
    }
    write_json(meta_path, meta)
    _remove(out, state_path, heap_tmp)
    tokens = state["train_tokens"] + state["val_tokens"]
    info(f"prepared {state['documents']:,} documents, {state['bytes'] / 1e6:,.1f} MB -> {tokens:,} tokens "
         f"(train {state['train_tokens']:,}, val {state['val_tokens']:,}) in {seconds:.1f} s")
    return meta


def _known_size(sources: list[Source]) -> int | None:
    """Bytes on disk of local sources (a progress-bar total; approximate for jsonl/gz/parquet)."""
    if any(s.kind == "hf" for s in sources):
        return None
    return sum(os.path.getsize(s.location) for s in sources)


def _remove(out: Path, *paths: Path) -> None:
    for path in paths:
        Path(path).unlink(missing_ok=True)


def shards_complete(data_dir: Path, meta: dict) -> bool:
    itemsize = np.dtype(DTYPE).itemsize
    return all((data_dir / meta[s]["file"]).is_file()
               and (data_dir / meta[s]["file"]).stat().st_size == meta[s]["tokens"] * itemsize
               for s in ("train", "val"))


def load_meta(data_dir: str | Path) -> dict:
    """The meta.json of a prepared data dir, checked: complete shards of the right size."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise Gpt1Error(f"{data_dir}: data directory not found (create it with `gpt1 prepare`)")
    if not (data_dir / META_FILE).is_file():
        raise Gpt1Error(f"{data_dir}: no {META_FILE}: not a prepared data dir, or `gpt1 prepare` did not finish "
                        "(rerun it to resume)")
    meta = read_json(data_dir / META_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise Gpt1Error(f"{data_dir / META_FILE}: not a gpt1 shards meta file")
    if meta.get("dtype") != np.dtype(DTYPE).name:
        raise Gpt1Error(f"{data_dir / META_FILE}: dtype {meta.get('dtype')!r}, expected {np.dtype(DTYPE).name}")
    if not shards_complete(data_dir, meta):
        raise Gpt1Error(f"{data_dir}: train.bin/val.bin are missing or their sizes do not match {META_FILE} "
                        "(rerun `gpt1 prepare`)")
    return meta


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
        raise Gpt1Error(f"{path}: the {what} split has {len(data):,} tokens, fewer than one context window "
                        f"({block_size + 1:,}); use more text, a larger validation split, or a smaller block_size")
    return data


def _windows(data: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    buf = np.stack([data[s:s + block_size + 1] for s in starts.tolist()]).astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(buf[:, :-1])), torch.from_numpy(np.ascontiguousarray(buf[:, 1:]))


class ShardWindows:
    """Random windows of a shard (a `BatchSource`): x = tokens[s:s+T], y = tokens[s+1:s+T+1].

    Window starts are a hash of (seed, global sequence number), so the stream is reproducible,
    resumable from a single counter, and split across torchrun ranks without overlap: draw c
    of rank r holds global micro-batch c * world_size + r. One process with grad_accum * W
    draws per step sees exactly the windows of W ranks with grad_accum draws each.
    """

    def __init__(self, path: str | Path, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.data = open_shard(path, block_size, "training")
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.draws = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        micro = self.draws * self.world_size + self.rank
        sequences = np.arange(micro * self.batch_size, (micro + 1) * self.batch_size, dtype=np.uint64)
        starts = (_hash01(self.seed, _WINDOW_SALT, sequences) % np.uint64(len(self.data) - self.block_size)).astype(np.int64)
        self.draws += 1
        return _windows(self.data, starts, self.block_size)

    def state_dict(self) -> dict:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.draws = int(state["draws"])


def fixed_windows(path: str | Path, block_size: int, batch_size: int, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n_batches` held-out batches of windows spread evenly over a shard (the same every time)."""
    data = open_shard(path, block_size, "validation")
    starts = np.linspace(0, len(data) - block_size - 1, batch_size * n_batches).astype(np.int64)
    return [_windows(data, starts[i:i + batch_size], block_size) for i in range(0, len(starts), batch_size)]


def sequential_windows(tokens: np.ndarray, block_size: int, batch_size: int,
                       max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows covering `tokens` in order (every token predicted once): perplexity."""
    n_windows = (len(tokens) - 1) // block_size
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    starts = np.arange(n_windows, dtype=np.int64) * block_size
    for i in range(0, n_windows, batch_size):
        yield _windows(tokens, starts[i:i + batch_size], block_size)
