"""Text corpora: local files, directories, globs and Hugging Face datasets, as documents.

One reader for every stage that takes raw text (`tokenizer train`, `prepare`, `eval`):

- a text file (`.txt`, `.md`, `.py`, ... or any file named explicitly) is one document;
- `.jsonl` / `.jsonl.gz` / `.json.gz`: one document per line, from its `text` field;
- `.parquet`: one document per row, from its `text` column (read in batches);
- a directory: the files below it with a known suffix (hidden folders and caches skipped);
- a glob (`data/**/*.txt`);
- `hf:NAME` or `hf:NAME:SPLIT` (default split `train`): a dataset read with `datasets`, streamed,
  so a 40 GB corpus never sits in memory. `NAME` may also be a local dataset folder, and
  `NAME@REVISION` reads another branch, tag or commit (e.g. `@refs/convert/parquet`);
- `stdlib`: the running Python's standard library source (`.py` files: code, comments and
  docstrings, ~10 MB), a real corpus on every machine with Python (the quickstart's default).

Bad input is reported with the file (and line or byte offset): a missing file, a directory
with no text, invalid UTF-8 or a malformed JSON line. With `skip_invalid=True` the offending
document is skipped and counted instead.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from gpt1.core.errors import Gpt1Error

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".py", ".tex", ".html", ".htm", ".xml", ".csv", ".tsv"}
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SKIPPED_DIRS = {"__pycache__", "node_modules", ".git"}
STDLIB = "stdlib"
# Installed packages differ per machine and the test suite is not shipped everywhere (Debian
# splits it out); encodings/ is mostly code-page tables. Without them the corpus is the same
# for everyone with the same Python version.
STDLIB_SKIPPED = {"site-packages", "dist-packages", "test", "encodings"}


@dataclass
class Source:
    kind: str  # "text", "jsonl", "parquet" or "hf"
    location: str  # a file path, or the dataset name for "hf"
    split: str = "train"

    def __str__(self) -> str:
        return f"hf:{self.location}:{self.split}" if self.kind == "hf" else self.location


@dataclass
class SourceStats:
    """What reading the sources found: filled in as documents are yielded."""

    documents: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count

    def summary(self) -> str:
        text = f"{self.documents:,} documents, {self.bytes / 1e6:,.1f} MB"
        if self.skipped:
            text += " (skipped: " + ", ".join(f"{n:,} {why}" for why, n in sorted(self.skipped.items())) + ")"
        return text


def _kind_of(path: str) -> str | None:
    name = path.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    suffix = Path(name[:-3] if name.endswith(".gz") else name).suffix
    if suffix in TEXT_SUFFIXES:
        return "text"
    return None


def resolve_sources(specs: list[str]) -> list[Source]:
    """Expand source specs into files and datasets, failing early on anything missing."""
    if not specs:
        raise Gpt1Error("no sources given: pass files, directories, globs or hf:DATASET names")
    sources: list[Source] = []
    for spec in specs:
        if spec.startswith("hf:"):
            name, _, split = spec[3:].partition(":")
            if not name:
                raise Gpt1Error(f"{spec!r}: expected hf:NAME or hf:NAME:SPLIT")
            sources.append(Source("hf", name, split or "train"))
        elif spec == STDLIB and not os.path.exists(spec):
            sources.extend(Source("text", path) for path in stdlib_files())
        elif os.path.isdir(spec):
            found = []
            for root, dirs, files in os.walk(spec):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS)
                for name in sorted(files):
                    path = os.path.join(root, name)
                    if not name.startswith(".") and (kind := _kind_of(path)):
                        found.append(Source(kind, path))
            if not found:
                raise Gpt1Error(
                    f"{spec}: directory has no text files (looked for {', '.join(sorted(TEXT_SUFFIXES))}, "
                    f"{', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)})"
                )
            sources.extend(found)
        elif os.path.isfile(spec):
            if not os.access(spec, os.R_OK):
                raise Gpt1Error(f"{spec}: file is not readable (permission denied)")
            sources.append(Source(_kind_of(spec) or "text", spec))  # a file named explicitly is text
        elif glob.has_magic(spec):
            matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not matches:
                raise Gpt1Error(f"{spec}: the pattern matches no files")
            sources.extend(Source(_kind_of(p) or "text", p) for p in matches)
        else:
            raise Gpt1Error(f"{spec}: no such file or directory")
    return sources


def stdlib_files() -> list[str]:
    """The `.py` files of the running Python's standard library (see STDLIB_SKIPPED), sorted."""
    root = Path(os.__file__).resolve().parent
    files = [p for p in root.rglob("*.py")
             if not STDLIB_SKIPPED.intersection(p.relative_to(root).parts[:1]) and "__pycache__" not in p.parts]
    if not files:
        raise Gpt1Error(f"{STDLIB}: found no .py files of the standard library under {root}")
    return sorted(str(p) for p in files)


def iter_documents(specs: list[str] | list[Source], *, text_field: str = "text", skip_invalid: bool = False,
                   stats: SourceStats | None = None) -> Iterator[str]:
    """Yield every document of the sources (specs or already resolved), in order. Fill `stats` if given."""
    sources = specs if all(isinstance(s, Source) for s in specs) else resolve_sources(list(specs))
    stats = stats if stats is not None else SourceStats()
    readers = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet, "hf": _read_hf}
    for source in sources:
        for text in readers[source.kind](source, text_field, skip_invalid, stats):
            if not text:
                stats.skipped["empty documents"] += 1
                continue
            stats.documents += 1
            stats.bytes += len(text.encode("utf-8", errors="surrogatepass"))
            yield text


def _open_bytes(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _read_text(source: Source, text_field: str, skip_invalid: bool, stats: SourceStats) -> Iterator[str]:
    try:
        with _open_bytes(source.location) as f:
            raw = f.read()
    except OSError as e:
        raise Gpt1Error(f"{source.location}: cannot read ({e.strerror or e})") from None
    try:
        yield raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if not skip_invalid:
            raise Gpt1Error(
                f"{source.location}: invalid UTF-8 at byte offset {e.start} "
                "(convert the file to UTF-8, or pass --skip-invalid to skip such files)"
            ) from None
        stats.skipped["files with invalid UTF-8"] += 1


def _read_jsonl(source: Source, text_field: str, skip_invalid: bool, stats: SourceStats) -> Iterator[str]:
    try:
        f = _open_bytes(source.location)
    except OSError as e:
        raise Gpt1Error(f"{source.location}: cannot read ({e.strerror or e})") from None
    with f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
                if not isinstance(record, dict):
                    raise ValueError("expected a JSON object")
                text = record[text_field]
                if not isinstance(text, str):
                    raise ValueError(f"field {text_field!r} must be a string, got {type(text).__name__}")
            except (UnicodeDecodeError, ValueError, KeyError) as e:
                if skip_invalid:
                    stats.skipped["malformed lines"] += 1
                    continue
                why = f"missing field {text_field!r}" if isinstance(e, KeyError) else (
                    "invalid UTF-8" if isinstance(e, UnicodeDecodeError) else str(e))
                raise Gpt1Error(f"{source.location}, line {line_no}: {why} (pass --skip-invalid to skip bad lines)") from None
            yield text


def _read_parquet(source: Source, text_field: str, skip_invalid: bool, stats: SourceStats) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source.location)
    except Exception as e:  # pyarrow raises several types for a corrupt or non-parquet file
        raise Gpt1Error(f"{source.location}: not a readable parquet file ({e})") from None
    if text_field not in parquet.schema_arrow.names:
        raise Gpt1Error(f"{source.location}: no column {text_field!r} (columns: {', '.join(parquet.schema_arrow.names)})")
    for batch in parquet.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is None:
                stats.skipped["null rows"] += 1
                continue
            yield text


def _read_hf(source: Source, text_field: str, skip_invalid: bool, stats: SourceStats) -> Iterator[str]:
    dataset = load_hf_dataset(source.location, source.split)
    for row_no, row in enumerate(dataset):
        text = row.get(text_field)
        if not isinstance(text, str):
            if skip_invalid:
                stats.skipped["rows without text"] += 1
                continue
            raise Gpt1Error(f"{source}: row {row_no} has no string field {text_field!r} (fields: {', '.join(row)})")
        yield text


def hf_name_and_revision(name: str) -> tuple[str, str | None]:
    """`NAME@REVISION` (a branch, tag, commit or e.g. refs/convert/parquet) -> (NAME, REVISION)."""
    name, _, revision = name.partition("@")
    return name, revision or None


def hf_error(spec: str, name: str, error: Exception) -> Gpt1Error:
    """A clear error for a dataset that `datasets` cannot open, with the fix for script datasets."""
    hint = ""
    if "scripts are no longer supported" in str(error):
        # datasets >= 4 runs no loading scripts; the hub's parquet conversion of such a dataset
        # lives on another branch (for very large datasets it may hold only part of the data).
        hint = (f"; read the hub's parquet conversion with hf:{hf_name_and_revision(name)[0]}"
                "@refs/convert/parquet, or download the data files and pass their folder")
    return Gpt1Error(f"{spec}: cannot open the dataset ({type(error).__name__}: {error}){hint}")


def load_hf_dataset(name: str, split: str):
    """Open a Hugging Face dataset (hub name or local folder, `NAME@REVISION` for another
    branch) as a streaming iterable."""
    try:
        import datasets
    except ImportError:
        raise Gpt1Error("reading hf: sources needs the `datasets` package (pip install datasets)") from None
    path, revision = hf_name_and_revision(name)
    try:
        return datasets.load_dataset(path, split=split, streaming=True, revision=revision)
    except Exception as e:  # network, missing dataset or split: datasets raises many types
        raise hf_error(f"hf:{name}:{split}", name, e) from None
