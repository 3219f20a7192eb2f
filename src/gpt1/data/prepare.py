"""`gpt1 prepare`: a corpus -> a prepared data dir (`train.bin` + `val.bin` + `meta.json` +
`tokenizer.json`; the format is `gpt1.data.shards`').

`prepare` tokenizes documents in batches with the Rust tokenizer (all cores; the next batch is
encoded in a worker thread while this one is written) and appends `[EOS]` after every
document (`ShardWriter`).

Validation split, deterministic and independent of batch size or core count, by a document's
hash: hash(seed, sha256 of its first piece), so that copies of a document (the same first
PIECE_CHARS characters) fall on the same side:
- a fraction `val` in (0, 1): a document is held out iff its hash < val;
- a count `val` >= 1: the documents of the `val` smallest hashes are held out, copies of one
  counted once (kept in memory until the end, so keep the count modest: thousands, not millions).

Every fraction holds at least one validation document: when none fell under it (a small
corpus), the document with the smallest hash is held out, with its copies.

Memory is bounded whatever the document lengths: documents arrive in pieces
(`gpt1.core.text_pieces.PIECE_CHARS`) and are tokenized in batches of at most BATCH_CHARS
characters; only count mode keeps its `val` held-out documents in memory.

Crash safety (`ShardWriter`): tokens go to `train.bin.partial` / `val.bin.partial`; every
`commit_bytes` of text the files are flushed to disk and `prepare-state.json` records, in one
atomic rename, how far they are valid (and which heap file holds the count-mode candidates):
whole documents, plus the pieces of the next one when a commit falls inside a long document
(a 1.5 GB text file is one document). A rerun with the same arguments resumes from there
(files truncated to the committed length, the committed documents and pieces skipped: pieces
are cut the same way every time); a rerun with other arguments starts over. At the end
`tokenizer.json` is written, the partial files are renamed, and `meta.json` is written last: a
folder without `meta.json` is never taken as complete. A run stopped after the renames (a full
disk at `meta.json`, a kill) is finished by the rerun, which moves the shards back to their
partial names instead of tokenizing everything again.
One prepare at a time writes a data dir: it holds the folder's `.lock` (`gpt1.core.locks.exclusive`).
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import itertools
import math
import os
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

from gpt1.core.atomic import atomic_path, replace_file, write_json
from gpt1.core.constants import DATA_META_FILE as META_FILE
from gpt1.core.constants import PREPARE_BATCH_DOCS, PREPARE_SEED, PREPARE_VAL
from gpt1.core.crash_points import crash_point
from gpt1.core.errors import Gpt1Error
from gpt1.core.locks import exclusive, held_by_another
from gpt1.core.paths import folder_target, json_path, owner_of, write_through
from gpt1.core.progress import info, progress, warn
from gpt1.core.reading import read_json
from gpt1.core.tokenizer import TOKENIZER_FILE, Tokenizer
from gpt1.core.write_errors import writing
from gpt1.data.readers import ReadMeter, declares_data_files
from gpt1.data.shards import (
    DTYPE,
    HEAP_FILE,
    MAX_VOCAB,
    PARTIAL,
    STATE_FILE,
    TRAIN_FILE,
    VAL_FILE,
    meta_problem,
    newer_format,
    shards_complete,
    write_meta,
)
from gpt1.data.sources import (
    SKIPPED,
    Piece,
    Source,
    SourceStats,
    check_max_documents,
    describe_skipped,
    files_size,
    iter_pieces,
    normalized_spec,
    resolve_sources,
    separates_documents,
    source_specs,
)
from gpt1.data.splitmix import hash01_int

# How documents are split, in the preparation's key: a data dir prepared by gpt1 before 2026-12-07
# split by hash(seed, index), so copies of a document fell on both sides; its key has no "split",
# so its interrupted prepare starts over rather than resume with the other rule (its finished
# shards still train: only the split was made the old way).
SPLIT_RULE = "sha256 of each document's first piece"
_REDO_SPLIT = "prepare it again (--overwrite) to split it by text, which keeps copies on one side"
_SPLIT_SALT = 0x5EED_5A17  # of the split's hash (SplitMix64)
BATCH_CHARS = 2_000_000  # characters per tokenizer batch at most (with --batch-docs documents)
COPY_TOKENS = 1 << 24
WRITE_BUFFER = 1 << 20  # bytes of tokens each shard file holds in memory between writes to disk
COMMIT_BYTES = 256_000_000  # characters of text between two commits of an interrupted prepare's progress
# What a document is, said where a corpus has too few of them.
TEXT_FILE_IS_ONE_DOCUMENT = ("a text file is one document: split it into several files, "
                             "or use .jsonl with one document per line")


def _split_hash(seed: int, first_piece: str) -> int:
    """A document's hash for the split (the module docstring): of the seed and its first piece,
    which is cut the same way every time and is in hand when the document opens."""
    digest = hashlib.sha256(first_piece.encode("utf-8", "surrogatepass")).digest()
    return hash01_int(seed, _SPLIT_SALT, int.from_bytes(digest[:8], "little"))


def piece_batches(pieces: Iterator[Piece], max_pieces: int) -> Iterator[list[Piece]]:
    """Batches of at most `max_pieces` pieces and about BATCH_CHARS characters (a long document
    arrives as many pieces: the characters bound a batch's memory)."""
    batch: list[Piece] = []
    chars = 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece.text)
        if len(batch) == max_pieces or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _key(specs: list[str], sources: list[Source], tokenizer: Tokenizer, val: float, seed: int, text_field: str,
         skip_invalid: bool, max_documents: int | None) -> dict:
    """What makes two preparations the same: a resumed run must see the same documents in order.
    Sources are recorded by what they name (`normalized_spec`): `corpus/` is `corpus` again."""
    return {"sources": [json_path(normalized_spec(s)) for s in specs], "files": _files_hash(sources),
            "tokenizer_fingerprint": tokenizer.fingerprint, "val": val, "seed": seed, "text_field": text_field,
            "skip_invalid": skip_invalid, "max_documents": max_documents, "split": SPLIT_RULE}


def _files_hash(sources: list[Source], as_spelled: bool = False) -> str:
    """A hash of the files' paths (absolute; `as_spelled`: as the specs spelled them, the key of
    gpt1 before 2026-12), sizes and modification times."""
    files = hashlib.sha256()
    for s in sources:
        st = os.stat(s.location) if s.kind not in ("hf", SKIPPED) else None  # a skipped one may be a dangling link
        name = str(s) if as_spelled or s.kind == "hf" else os.path.abspath(s.location)
        # fsencode: a file name that is not UTF-8 (surrogate-escaped by Python) is still a name
        files.update(os.fsencode(name) + f"\0{st.st_size if st else ''}\0{st.st_mtime_ns if st else ''}\n".encode())
        if s.kind == "hf" and s.hf is not None and declares_data_files(s.hf.name):
            _hash_folder(files, Path(s.hf.name))
    return files.hexdigest()[:16]


def _hash_folder(files, folder: Path) -> None:
    """Add a downloaded dataset repository's files (read by `datasets`, as its card says) to the
    hash: their paths, sizes and modification times, as a folder of files is keyed. Named alone, a
    prepare interrupted and rerun over a newer download resumed onto it and mixed the two."""
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):  # .cache/, .git/
            st = path.stat()
            files.update(os.fsencode(relative.as_posix()) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())


def _recorded_key(key: object) -> object:
    """A key read from a data dir, in this gpt1's terms. One recorded before 2026-12 holds the
    sources as typed, and its files hashed as spelled: its sources are normalized, and its hash
    recomputed as `_key` does when the files are the ones it hashed, so a folder prepared then
    is still this preparation (its exact command, or a respelling of it)."""
    specs = key.get("sources") if isinstance(key, dict) else None
    if not (isinstance(specs, list) and all(isinstance(s, str) for s in specs)):
        return key
    normalized = [normalized_spec(s) for s in specs]
    if normalized == specs:  # recorded so: today's key
        return key
    upgraded = {**key, "sources": normalized}
    with contextlib.suppress(Gpt1Error, OSError):  # sources gone or moved: other files, as the hash says
        sources = resolve_sources(specs)
        if _files_hash(sources, as_spelled=True) == key.get("files"):
            upgraded["files"] = _files_hash(sources)
    return upgraded


def _prepared_already(out: Path, key: dict, overwrite: bool = False) -> dict | None:
    """The meta of `out` when it holds exactly the preparation `key` names, complete (or the same
    preparation split by place, unless `overwrite`); else None."""
    meta_path = out / META_FILE
    if not meta_path.is_file():
        return None
    old = read_json(meta_path)
    recorded = _recorded_key(old.get("key")) if isinstance(old, dict) else None
    # Prepared before the split followed the text (2026-12-07): the same data, kept (a rerun of a
    # quickstart folder stopped at its data stage), and said what its held-out share may hold.
    by_place = not overwrite and isinstance(recorded, dict) and "split" not in recorded and recorded == {
        k: v for k, v in key.items() if k != "split"}
    if not ((recorded == key or by_place) and meta_problem(old) is None and newer_format(old) is None
            and shards_complete(out, old)):
        return None
    info(f"{out} already holds this prepared data ({old['train']['tokens']:,} train tokens); nothing to do")
    if by_place:
        warn(f"{out} was split by each document's place (gpt1 before 2026-12-07): a copy of a held-out document "
             f"may be in its training share, so its validation loss may be low; {_REDO_SPLIT}")
    return old


def prepare(sources: str | os.PathLike | list[str], tokenizer: Tokenizer, out: str | Path, *, val: float = PREPARE_VAL, seed: int = PREPARE_SEED,
            text_field: str = "text", skip_invalid: bool = False, max_documents: int | None = None,
            batch_docs: int = PREPARE_BATCH_DOCS, commit_bytes: int = COMMIT_BYTES, overwrite: bool = False,
            redo_hint: str = "pass --overwrite to replace it") -> dict:
    """Tokenize `sources` into `out`/train.bin, val.bin, meta.json, tokenizer.json; return the meta.

    `val` < 1 is the fraction of documents held out for validation, `val` >= 1 their count.
    Resumes an interrupted run with the same arguments; returns the existing meta when `out`
    already holds exactly this preparation; refuses (unless `overwrite`) a finished different one,
    with `redo_hint` saying how to redo it (the CLI's flag, or what a caller like the quickstart offers).
    """
    out = Path(out)
    if tokenizer.vocab_size > MAX_VOCAB:
        raise Gpt1Error(f"the tokenizer has {tokenizer.vocab_size:,} tokens: shards store ids as uint16, "
                        f"so the vocabulary must be at most {MAX_VOCAB:,}")
    if (not isinstance(val, (int, float)) or not math.isfinite(val) or not val > 0
            or (val >= 1 and val != int(val))):
        raise Gpt1Error(f"val (--val) must be a fraction in (0, 1) or a whole number of documents >= 1, got {val}")
    check_max_documents(max_documents)
    if not isinstance(batch_docs, int) or batch_docs < 1:
        raise Gpt1Error(f"batch_docs (--batch-docs) must be a whole number >= 1, got {batch_docs!r}")
    _check_out_dir(out)
    owner = owner_of(out)
    if owner in ("a model dir", "a training run dir"):
        raise Gpt1Error(f"{out} is {owner}: prepared data (with its {TOKENIZER_FILE}) needs a folder of its own; "
                        "choose another --out")
    val = int(val) if val >= 1 else val
    sources = source_specs(sources)
    resolved = resolve_sources(sources)
    if not skip_invalid:  # with it, a file may be skipped: the count is known once read
        _check_enough_documents(resolved, val, max_documents)
    key = _key(sources, resolved, tokenizer, val, seed, text_field, skip_invalid, max_documents)
    # Finished already and nobody rewriting it: nothing to write, so no lock either (the folder may
    # be read-only, e.g. a shared copy). meta.json is written last, so it names complete shards.
    if not held_by_another(out) and (done := _prepared_already(out, key, overwrite)) is not None:
        return done
    folder_target(out)  # not writable: said with what to do, before the lock's "cannot create the folder"
    # One prepare writes a data dir at a time: a second one would delete the first's partial files
    # and its meta.json. Released when the process ends, however it ends.
    with exclusive(out, "preparing data"):
        if (done := _prepared_already(out, key, overwrite)) is not None:  # by a run that held the lock before us
            return done
        if (out / META_FILE).is_file():
            if not overwrite:
                raise Gpt1Error(f"{out} already holds data prepared {_differences(out, key)}; "
                                f"choose another --out, or {redo_hint}")
        writer = ShardWriter(out, key, val, seed, tokenizer.eos_id)
        stats = SourceStats()
        pieces = iter_pieces(resolved, text_field=text_field, skip_invalid=skip_invalid, stats=stats,
                             max_documents=max_documents)
        documents = pieces  # closed at the end, however it ends: its open file with it, not at exit
        total, meter = files_size(resolved), ReadMeter()

        def read_so_far() -> int:
            # In the unit of the bar's total: the files' bytes (a .gz's compressed ones, not its
            # text, 3x as many); without a total (a streamed dataset), the text's.
            return meter.bytes if total is not None else stats.bytes

        with meter:
            _skip_committed(pieces, writer.state["documents"], writer.state["pieces"])
            # The next piece read before the bar shows: a source that cannot be opened (a hub
            # dataset offline) fails without an empty bar drawn twice above its error.
            pieces = itertools.chain([piece] if (piece := next(pieces, None)) else [], pieces)
        start_time = time.perf_counter()
        resumed_tokens = writer.tokens
        bar = progress(total=total, initial=read_so_far(), unit="B", unit_scale=True, unit_divisor=1000, desc="prepare")

        def show() -> None:
            bar.update(read_so_far() - bar.n)
            seconds = max(time.perf_counter() - start_time, 1e-9)
            bar.set_postfix(refresh=False, tokens=f"{writer.tokens:,}", tok_s=f"{(writer.tokens - resumed_tokens) / seconds:,.0f}")

        try:
            with writer, meter, ThreadPoolExecutor(1) as pool:
                pending = None
                for batch in piece_batches(pieces, batch_docs):
                    future = pool.submit(tokenizer.encode_batch, [p.text for p in batch])  # overlaps reading the next batch
                    if pending is not None:
                        _write(writer, *pending, commit_bytes)
                    pending = (batch, future)
                    show()
                if pending is not None:
                    _write(writer, *pending, commit_bytes)
                    show()  # the bar's last state counts the last batch's tokens too (it ended at 0 for one batch)
                writer.commit()
        finally:
            bar.close()
            documents.close()
        seconds = time.perf_counter() - start_time
        extra = {"sources": [json_path(s) for s in sources], "text_field": text_field, "skipped": dict(stats.skipped),
                 "seconds_last_run": round(seconds, 3)}
        meta = writer.finish(tokenizer, extra, what=", ".join(map(str, resolved)))
        state = writer.state
        skipped = f" (skipped: {describe_skipped(stats.skipped)})" if stats.skipped else ""
        info(f"prepared {state['documents']:,} documents, {state['bytes'] / 1e6:,.1f} MB{skipped} -> {writer.tokens:,} tokens "
             f"(train {state['train_tokens']:,}, val {state['val_tokens']:,}) in {seconds:.1f} s")
        return meta


def _differences(out: Path, key: dict) -> str:
    """How the finished preparation in `out` differs from `key`, named as training names a run's
    differing keys: "with other settings (seed: 1337 -> 3, files (changed on disk))", or "by a newer
    gpt1 (format version 2; ...)"."""
    old = read_json(out / META_FILE)
    if isinstance(old, dict) and (newer := newer_format(old)):  # its key may be another format's too
        return f"by {newer}"
    old_key = _recorded_key(old.get("key")) if isinstance(old, dict) else None
    if not isinstance(old_key, dict):  # damaged, or written by a gpt1 that did not record it
        return "from other sources or settings"
    changed = [k for k in key if old_key.get(k) != key.get(k)]
    # "files" hashes the files' names, sizes and times: say that they changed, not the two
    # hashes, and nothing when the sources differ (other sources are other files).
    # A key without "split" is gpt1's before 2026-12-07, which split documents by their index.
    diffs = [f"{k}: {old_key.get(k)!r} -> {key[k]!r}" if k != "split" or "split" in old_key
             else f"split: by each document's place (gpt1 before 2026-12-07) -> by its text ({key[k]})"
             for k in changed if k != "files"]
    if "files" in changed and "sources" not in changed:
        diffs.append("files (changed on disk)")
    if not diffs and (why := meta_problem(old)):  # the same preparation, but meta.json is damaged
        return f"with these settings, but its {META_FILE} is damaged ({why})"
    if not diffs:  # the same preparation, but its shards are not the ones meta.json describes
        return f"with these settings, but its {TRAIN_FILE}/{VAL_FILE} do not match {META_FILE} (damaged)"
    return f"with other settings ({', '.join(diffs)})"


def _check_out_dir(out: Path) -> None:
    """Refuse an --out that is, or lies under, a file (before any work: the folder is made later)."""
    for path in (out, *out.parents):
        if path.exists() or path.is_symlink():
            if not write_through(path).is_dir():  # a dangling link: said so, with where it points
                what = "is not a folder" if path == out else f"lies under {path}, which is not a folder"
                raise Gpt1Error(f"--out {out} {what}: the prepared data needs a folder; choose another --out")
            return


def _check_enough_documents(sources: list[Source], val: float, max_documents: int | None) -> None:
    """Refuse, before any work, a corpus of text files too few to split: each is one document,
    so their number is known before they are read. Found at the end instead, a 1.5 GB text file
    was tokenized for ten minutes first."""
    if any(s.kind not in ("text", SKIPPED) for s in sources):
        return
    texts = [s for s in sources if s.kind == "text" and os.path.getsize(s.location)]  # empty ones are skipped
    if not texts:  # the empty corpus: said, with what was skipped, once read
        return
    documents = min(len(texts), max_documents or len(texts))
    if (documents == 1 or documents <= val) and any(separates_documents(s) for s in texts):
        return  # a .txt file of documents separated by <|endoftext|> (TinyStories'): counted once read
    if documents == 1:
        which = texts[0] if len(texts) == 1 else "--max-documents 1"
        raise Gpt1Error(f"the corpus has 1 document ({which}): a validation split needs at least two; "
                        f"{TEXT_FILE_IS_ONE_DOCUMENT}")
    if 1 < documents <= val:  # count mode holds out `val` documents
        raise Gpt1Error(f"every one of the {documents:,} documents would go to validation (--val {val:g}); lower --val, "
                        f"or use more documents ({TEXT_FILE_IS_ONE_DOCUMENT})")


def _skip_committed(pieces: Iterator[Piece], documents: int, more_pieces: int) -> None:
    """Consume what the committed partial files hold already: `documents` whole documents, then
    the first `more_pieces` pieces of the next one (a commit inside a long document)."""
    done = 0
    while done < documents:
        piece = next(pieces, None)
        if piece is None:
            return
        done += piece.ends_document
    for _ in range(more_pieces):
        next(pieces, None)


def _write(writer: ShardWriter, batch: list[Piece], future: Future, commit_bytes: int) -> None:
    for piece, ids in zip(batch, future.result()):
        writer.add(piece, ids)
    if writer.uncommitted_bytes >= commit_bytes and writer.at_commit_point:
        writer.commit()


class ShardWriter:
    """Writes one preparation into a data dir, resumably.

    Tokens are appended to `train.bin.partial` / `val.bin.partial` as documents arrive, piece by
    piece (a document's side is known from its first piece, before the rest is read), through a
    WRITE_BUFFER-byte buffer each: a partial file's size on disk says nothing; `commit` flushes and
    fsyncs, and only the committed state's counts are trusted (a resume truncates to them). In count
    mode the best validation candidates so far (smallest hashes, with their copies) stay in
    memory; in fraction mode the smallest-hash training document and its copies are
    remembered, to become the validation split if no document fell into it (a 20-document
    corpus with the default 0.0005 still validates).
    A commit may fall between two pieces of a document written to a file as it comes: the state
    then counts its pieces written (`pieces`) and holds its hash (`document_hash`: its first piece
    is not read again), and a resume opens that document again at its next piece, on the same
    side: a side depends on the document's hash and the committed heap alone (the heap changes
    only when a document ends), and the smallest-hash record already names it if it is one. A
    count-mode candidate's pieces are in memory, not in a file: a commit waits for its end.

    `commit` makes everything written so far durable in one atomic step: the shards are fsynced,
    the count-mode candidates go to a new numbered heap file, then `prepare-state.json` (which
    names that heap file) replaces the old state; only then is the previous heap file removed.
    A kill at any point leaves a state that matches its files.
    """

    def __init__(self, out: Path, key: dict, val: float, seed: int, eos: int):
        self.out, self.key, self.val, self.seed, self.eos = out, key, val, seed, eos
        self._eos = np.array([eos], dtype=DTYPE)  # what ends every document
        self.by_count = val >= 1
        self.threshold = 0 if self.by_count else int(val * 2**64)
        self.state_path = out / STATE_FILE
        self.train_tmp, self.val_tmp = out / (TRAIN_FILE + PARTIAL), out / (VAL_FILE + PARTIAL)
        self._renamed: list[tuple[Path, Path]] = []  # (final, partial): shards `finish` had moved already
        committed = self._load_state()
        self.resuming = committed is not None
        self.state = committed or self._fresh_state()
        self.heap = self._load_heap()  # count mode: a max-heap by hash of (-hash, index, tokens)
        self._heap_hashes = Counter(-entry[0] for entry in self.heap)  # its hashes: copies of one count once
        self.uncommitted_bytes = 0
        self._side: str | None = None  # "train", "val" or "heap" while a document is open
        self._hash = 0  # the open document's
        self._pieces: list[np.ndarray] = []  # the open document's, when it is a count-mode candidate

    @property
    def tokens(self) -> int:
        return self.state["train_tokens"] + self.state["val_tokens"]

    @property
    def at_commit_point(self) -> bool:
        """Whether every token added so far is in the files: not inside a count-mode candidate."""
        return self._side != "heap"

    def _fresh_state(self) -> dict:
        # `pieces`: of the open document (index `documents`), those written, when a commit fell inside
        # it; `document_hash`: its hash then. `heap`: [index, tokens, hash] of each count-mode candidate.
        # `smallest_train`: the smallest hash of a training document and [offset, tokens] of its copies.
        return {"key": self.key, "documents": 0, "pieces": 0, "document_hash": None, "bytes": 0, "train_tokens": 0,
                "val_tokens": 0, "train_documents": 0, "val_documents": 0, "heap": [], "heap_file": None,
                "commits": 0, "smallest_train": None}

    def _load_state(self) -> dict | None:
        """The committed state of an interrupted run of this preparation; None to start over."""
        if not self.state_path.is_file():
            return None
        fresh = self._fresh_state()
        old = read_json(self.state_path)
        if isinstance(old, dict):  # written before commits fell inside documents: at a document's end
            old = {"pieces": 0, **old}
        # Say why it cannot resume (missing partial files said "other settings": a wrong lead).
        if not (isinstance(old, dict) and set(fresh) <= set(old)):
            why = f"whose {STATE_FILE} is damaged or from another gpt1 version"
        elif _recorded_key(old["key"]) != self.key:
            why = "with other settings"
        elif (renamed := self._finished_shards(old)) is None or not (
                old["heap_file"] is None or (self.out / old["heap_file"]).is_file()):
            why = "whose partial files are missing"
        else:
            self._renamed = renamed
            if renamed:
                info(f"finishing an interrupted prepare in {self.out}: its {old['documents']:,} documents "
                     f"({old['bytes'] / 1e6:,.1f} MB of text) are tokenized already")
            else:
                info(f"resuming an interrupted prepare in {self.out} after {old['documents']:,} documents "
                     f"({old['bytes'] / 1e6:,.1f} MB of text)")
            return old
        info(f"{self.out} holds an interrupted prepare {why}; starting over")
        return None

    def _finished_shards(self, state: dict) -> list[tuple[Path, Path]] | None:
        """The committed shards that `finish` had already moved to their final names when it
        stopped (a full disk at meta.json, a kill; a gpt1 before 2026-12 wrote tokenizer.json after
        them too) as (final, partial) pairs, to move back: only `finish` moves them, so every
        document is in them and the rerun need not tokenize again. None when a shard is neither a partial file nor a final one of its
        committed size (a rerun starts over)."""
        moves = []
        itemsize = np.dtype(DTYPE).itemsize
        for partial, final, tokens in ((self.train_tmp, self.out / TRAIN_FILE, state["train_tokens"]),
                                       (self.val_tmp, self.out / VAL_FILE, state["val_tokens"])):
            if partial.is_file():
                continue
            if final.is_symlink() or not (final.is_file() and final.stat().st_size == tokens * itemsize):
                return None
            moves.append((final, partial))
        return moves

    def _load_heap(self) -> list[tuple[int, int, np.ndarray]]:
        if not self.state["heap"]:
            return []
        flat = np.fromfile(self.out / self.state["heap_file"], dtype=DTYPE)
        offsets = np.cumsum([0] + [n for _, n, _ in self.state["heap"]])
        heap = [(-hash_, index, flat[a:b])
                for (index, _, hash_), a, b in zip(self.state["heap"], offsets[:-1], offsets[1:])]
        heapq.heapify(heap)
        return heap

    def __enter__(self) -> ShardWriter:
        self.out.mkdir(parents=True, exist_ok=True)
        for final, partial in self._renamed:  # back where the committed state has them; `finish` moves them again
            os.rename(final, partial)
        if not self.resuming:
            # A state left by a run of other arguments goes with its files: kept, it would tell
            # a rerun (and `gpt1 prepare`'s line when stopped) that there is something to resume.
            self._abandon()
            self.train_tmp.touch()
            self.val_tmp.touch()
        itemsize = np.dtype(DTYPE).itemsize
        os.truncate(self.train_tmp, self.state["train_tokens"] * itemsize)  # drop what came after the last commit
        os.truncate(self.val_tmp, self.state["val_tokens"] * itemsize)
        # Buffered: a document's tokens are a write into memory, not numpy's `tofile` (~20 µs of
        # flushing and seeking each, twice a document); `commit` flushes them, before its fsync.
        self.files = {"train": open(self.train_tmp, "ab", buffering=WRITE_BUFFER),
                      "val": open(self.val_tmp, "ab", buffering=WRITE_BUFFER)}
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for f in self.files.values():
            # Closing flushes what is buffered: a full disk there names the file. After an error
            # that error is the one to say, and the tokens lie past the last commit (a resume cuts them).
            with writing(f.name) if exc_type is None else contextlib.suppress(OSError):
                f.close()
        if exc_type is not None and not self.state_path.exists():
            # Failed before its first commit: a rerun starts over, so the partial shards (up to
            # commit_bytes of tokens) are only disk taken.
            self._remove_partials()

    # ---- documents -----------------------------------------------------------------------
    def add(self, piece: Piece, ids: list[int]) -> None:
        if self._side is None:
            self._open_document(piece.text)
        tokens = _uint16(ids)
        if self._side == "heap":
            self._pieces.append(tokens)
        else:
            self._append(self._side, tokens)
        self.state["bytes"] += len(piece.text.encode("utf-8"))
        self.uncommitted_bytes += len(piece.text)
        if piece.ends_document:
            self._close_document()
        else:
            self.state["pieces"] += 1

    def _open_document(self, first_piece: str) -> None:
        # Opened again after a commit inside it (a resume): its first piece was written before, and
        # the smallest-hash record names it already if it is one.
        reopened = self.state["pieces"] > 0
        self._hash = self.state["document_hash"] if reopened else _split_hash(self.seed, first_piece)
        self.state["document_hash"] = self._hash
        if self.by_count:
            wanted = (self._hash in self._heap_hashes or len(self._heap_hashes) < self.val
                      or self._hash < -self.heap[0][0])
            self._side = "heap" if wanted else "train"
            return
        self._side = "val" if self._hash < self.threshold else "train"
        smallest = self.state["smallest_train"]
        if self._side != "train" or reopened:
            return
        if smallest is None or self._hash < smallest["hash"]:
            self.state["smallest_train"] = {"hash": self._hash, "copies": [[self.state["train_tokens"], 0]]}
        elif self._hash == smallest["hash"]:  # a copy: held out with it, if it is held out
            smallest["copies"].append([self.state["train_tokens"], 0])

    def _append(self, side: str, tokens: np.ndarray) -> None:
        file = self.files[side]
        try:
            file.write(tokens)
        except Exception:  # a full disk, said naming the file (a plain write's error does not)
            with writing(file.name):  # here, not around every write: ~4 µs each, two a document
                raise
        self.state[f"{side}_tokens"] += len(tokens)
        smallest = self.state["smallest_train"]
        if side == "train" and smallest is not None and smallest["hash"] == self._hash:
            smallest["copies"][-1][1] += len(tokens)  # the open document is its last copy

    def _close_document(self) -> None:
        if self._side == "heap":
            full = self._hash not in self._heap_hashes and len(self._heap_hashes) >= self.val
            heapq.heappush(self.heap, (-self._hash, self.state["documents"], np.concatenate([*self._pieces, self._eos])))
            self._heap_hashes[self._hash] += 1
            self._pieces = []
            if full:  # the largest hash leaves for training, every copy of it (in the order they came)
                worst = self.heap[0][0]
                while self.heap[0][0] == worst:
                    self._append("train", heapq.heappop(self.heap)[2])
                    self.state["train_documents"] += 1
                del self._heap_hashes[-worst]
        else:
            self._append(self._side, self._eos)
            self.state[f"{self._side}_documents"] += 1
        self.state["documents"] += 1
        self.state["pieces"] = 0
        self.state["document_hash"] = None
        self._side = None

    # ---- committing and finishing ----------------------------------------------------------
    def commit(self) -> None:
        for f in self.files.values():
            with writing(f.name):
                f.flush()
                os.fsync(f.fileno())
        old_heap_file = self.state["heap_file"]
        if self.by_count:
            self.state["commits"] += 1
            entries = sorted(self.heap, key=lambda e: e[1])
            heap_file = f"{HEAP_FILE}.{self.state['commits']}"
            with atomic_path(self.out / heap_file) as tmp:
                (np.concatenate([e[2] for e in entries]) if entries else np.empty(0, DTYPE)).tofile(tmp)
            self.state["heap"] = [[e[1], len(e[2]), -e[0]] for e in entries]
            self.state["heap_file"] = heap_file
        crash_point("prepare-commit")
        write_json(self.state_path, self.state)  # the commit point
        if old_heap_file and old_heap_file != self.state["heap_file"]:
            (self.out / old_heap_file).unlink(missing_ok=True)
        self.uncommitted_bytes = 0

    def _remove_partials(self) -> None:
        # The bare HEAP_FILE: the one name gpt1 before 2026-11-27 gave it (now one per commit).
        for path in (self.train_tmp, self.val_tmp, self.out / HEAP_FILE, *self.out.glob(HEAP_FILE + ".*")):
            path.unlink(missing_ok=True)

    def finish(self, tokenizer: Tokenizer, extra: dict, what: str) -> dict:
        """Move the count-mode candidates into val, check the split, and write the shards, the
        tokenizer and meta.json (last: a folder without it is never taken as complete)."""
        state = self.state
        if self.heap:
            with writing(self.val_tmp), open(self.val_tmp, "ab") as f:
                for _, _, doc in sorted(self.heap, key=lambda e: e[1]):
                    doc.tofile(f)
                    state["val_tokens"] += len(doc)
            state["val_documents"] += len(self.heap)
            self.heap.clear()
            self.files = {}
            self.commit()
        if state["documents"] == 0:
            self._abandon()
            raise Gpt1Error(f"the corpus is empty: {what} held no documents "
                            f"(skipped: {describe_skipped(extra['skipped']) or 'none'})")
        if state["train_documents"] == 0:
            self._abandon()
            raise Gpt1Error(f"every one of the {state['documents']:,} documents went to validation "
                            f"(--val {self.val:g}); lower --val, or use more documents")
        meta_path = self.out / META_FILE
        meta_path.unlink(missing_ok=True)
        tokenizer.save(self.out)  # before the shards leave their partial names: a full disk here resumes simply
        if state["val_documents"] == 0:
            self._move_smallest_to_val()
        else:
            replace_file(self.train_tmp, self.out / TRAIN_FILE)
            replace_file(self.val_tmp, self.out / VAL_FILE)
        crash_point("prepare-finish")  # shards in place, no meta.json: a rerun moves them back (`_finished_shards`)
        meta = write_meta(self.out, tokenizer, self.eos, state, {
            "val_split": self.val, "split_seed": self.seed, "bytes": state["bytes"], **extra, "key": self.key})
        self._remove_partials()
        self.state_path.unlink(missing_ok=True)
        return meta

    def _move_smallest_to_val(self) -> None:
        """No document fell into the validation fraction: hold out the smallest-hash one (of at
        least two), with its copies. Written as new files from the committed partials, so a kill
        here leaves them intact and a rerun does it again."""
        state, copies = self.state, self.state["smallest_train"]["copies"]
        if state["train_documents"] < 2:
            self._abandon()
            raise Gpt1Error(f"the corpus has {state['train_documents']} document: a validation split needs "
                            f"at least two; {TEXT_FILE_IS_ONE_DOCUMENT}")
        if len(copies) == state["train_documents"]:
            self._abandon()
            raise Gpt1Error(f"the corpus's {state['train_documents']:,} documents are copies of one: a validation "
                            "split needs two different ones (copies of a document are held out together)")
        train = np.memmap(self.train_tmp, dtype=DTYPE, mode="r")
        kept = zip([0] + [a + n for a, n in copies], [a for a, _ in copies] + [len(train)])  # between the copies
        with atomic_path(self.out / VAL_FILE) as tmp, open(tmp, "wb") as f:
            for a, n in copies:
                np.asarray(train[a:a + n]).tofile(f)
        with atomic_path(self.out / TRAIN_FILE) as tmp, open(tmp, "wb") as f:
            for start, end in kept:
                for chunk in range(start, end, COPY_TOKENS):
                    np.asarray(train[chunk:min(chunk + COPY_TOKENS, end)]).tofile(f)
        del train
        moved = sum(n for _, n in copies)
        state["train_tokens"] -= moved
        state["val_tokens"] += moved
        state["train_documents"] -= len(copies)
        state["val_documents"] = len(copies)

    def _abandon(self) -> None:
        self._remove_partials()
        self.state_path.unlink(missing_ok=True)


def _uint16(ids: list[int]) -> np.ndarray:
    try:
        return np.asarray(ids, dtype=DTYPE) if ids else np.empty(0, DTYPE)
    except OverflowError:
        raise Gpt1Error(f"a token id ({max(ids):,}) does not fit in uint16: shards hold ids < {MAX_VOCAB:,}") from None


def interrupted_prepare(out: str | Path) -> dict | None:
    """How far an interrupted `prepare` into `out` got (its committed state: `documents`,
    `bytes` of text, ...), which a rerun with the same arguments resumes from; None when it
    committed nothing (a rerun starts over)."""
    state_path = Path(out) / STATE_FILE
    with contextlib.suppress(Gpt1Error, OSError):  # unreadable: the rerun says what it finds
        state = read_json(state_path) if state_path.is_file() else None
        if isinstance(state, dict) and isinstance(state.get("bytes"), int):
            return state
    return None
