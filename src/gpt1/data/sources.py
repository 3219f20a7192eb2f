"""Text corpora: local files, directories, globs and Hugging Face datasets, as documents.

One reader for every stage that takes raw text (`tokenizer train`, `prepare`, `eval`):

- a text file (`.txt`, `.md`, `.py`, ... or any file named explicitly) is one document;
- `.jsonl` / `.jsonl.gz` / `.json.gz`: one document per line, from its `text` field;
- `.parquet`: one document per row, from its `text` column (read in batches);
- a directory: the files below it with a known suffix, links to folders followed (hidden
  folders and caches skipped, a folder reached twice read once; an entry that is not a regular
  file, such as a pipe or a dangling link, is skipped and counted);
- a glob (`data/**/*.txt`), its entries taken as a directory's are;
- `hf:NAME` or `hf:NAME:SPLIT` (default split `train`): a dataset read with `datasets`, streamed,
  so a 40 GB corpus never sits in memory. `NAME` may also be a local dataset folder, and
  `NAME@REVISION` reads another branch, tag or commit (e.g. `@refs/convert/parquet`);
- `stdlib`: the running Python's standard library source (`.py` files: code, comments and
  docstrings, ~10 MB), a real corpus on every machine with Python (the quickstart's default).

Files are read through `gpt1.data.readers` (its error policy: file, line or byte offset, and
what was expected). With `skip_invalid=True` a bad document (a file with invalid UTF-8, a
malformed line) is skipped and counted instead.

A document longer than `readers.PIECE_CHARS` characters arrives in pieces (`iter_pieces`), so
memory stays bounded whatever the line length; `iter_documents` joins them for the callers
that need whole documents.
"""

from __future__ import annotations

import glob
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, NamedTuple

from gpt1.core.errors import Gpt1Error
from gpt1.core.io import walk_folder
from gpt1.data.readers import (
    HF_PREFIX,
    READ_BYTES,
    BadRecord,
    HfSpec,
    load_hf_dataset,
    parse_hf,
    read_jsonl,
    read_parquet,
    read_text,
)

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".py", ".tex", ".html", ".htm", ".xml", ".csv", ".tsv"}
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SKIPPED_DIRS = {"__pycache__", "node_modules", ".git"}
STDLIB = "stdlib"
# Installed packages differ per machine and the test suite is not shipped everywhere (Debian
# splits it out); encodings/ is mostly code-page tables. Without them the corpus is the same
# for everyone with the same Python version.
STDLIB_SKIPPED = {"site-packages", "dist-packages", "test", "encodings"}
SKIPPED = "skipped"  # the kind of a folder's or glob's entry that is not a regular file (see _entry)


@dataclass
class Source:
    kind: str  # "text", "jsonl", "parquet", "hf" or SKIPPED
    location: str  # a file path, or the spec for "hf"
    hf: HfSpec | None = None

    def __str__(self) -> str:
        return str(self.hf) if self.hf else self.location


class Piece(NamedTuple):
    text: str
    ends_document: bool


@dataclass
class SourceStats:
    """What reading the sources found: filled in as documents are yielded."""

    documents: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count

    def summary(self) -> str:
        text = f"{self.documents:,} documents, {self.bytes / 1e6:,.1f} MB"
        if self.skipped:
            text += f" (skipped: {describe_skipped(self.skipped)})"
        return text


def describe_skipped(skipped: Mapping[str, int]) -> str:
    """What was skipped, for people: "1 files with invalid UTF-8, 2 malformed lines"."""
    return ", ".join(f"{n:,} {why}" for why, n in sorted(skipped.items()))


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


def source_specs(specs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Source specs as a list of strings: one path may be given alone (in Python, a lone
    string was iterated into one-character specs: "data" looked for files named d, a, t)."""
    if isinstance(specs, (str, os.PathLike)):
        return [os.fspath(specs)]
    return [os.fspath(spec) for spec in specs]


def normalized_spec(spec: str) -> str:
    """What a source spec names, in one spelling: a local path (or glob) absolute and normalized,
    so that `corpus/`, `./corpus` and `/abs/corpus` are one source; hf: and stdlib as typed."""
    if spec.startswith(HF_PREFIX) or (spec == STDLIB and not os.path.exists(spec)):
        return spec
    return os.path.abspath(spec)


def resolve_sources(specs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Source]:
    """Expand source specs into files and datasets, failing early on anything missing."""
    specs = source_specs(specs)
    if not specs:
        raise Gpt1Error("no sources given: pass files, directories, globs or hf:DATASET names")
    sources: list[Source] = []
    for spec in specs:
        if (hf := parse_hf(spec)) is not None:
            sources.append(Source("hf", spec, hf))
        elif spec == STDLIB and not os.path.exists(spec):
            sources.extend(Source("text", path) for path in stdlib_files())
        elif os.path.isdir(spec):
            found = []
            for root, dirs, files in walk_folder(spec):  # links to folders followed, each folder once
                dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS]
                for name in files:
                    path = os.path.join(root, name)
                    if not name.startswith(".") and (kind := _kind_of(path)):
                        found.append(_entry(kind, path))
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
            matches = sorted(p for p in glob.glob(spec, recursive=True) if not os.path.isdir(p))
            if not matches:
                raise Gpt1Error(f"{spec}: the pattern matches no files")
            sources.extend(_entry(_kind_of(p) or "text", p) for p in matches)
        elif os.path.exists(spec):  # /dev/null, a pipe <(...): not data that can be read again, or named
            raise Gpt1Error(f"{spec}: not a regular file or directory (a device, pipe or socket); "
                            "give text files, folders, globs or hf:DATASET names")
        else:
            raise Gpt1Error(f"{spec}: no such file or directory")
    return sources


def _entry(kind: str, path: str) -> Source:
    """A file found in a folder or by a glob. A pipe, socket or device there would block the
    read (or never end) and a dangling link cannot be read: such an entry is skipped, and counted
    when the sources are read (a folder is a collection; a path named alone is refused instead)."""
    return Source(kind if os.path.isfile(path) else SKIPPED, path)


def stdlib_files() -> list[str]:
    """The `.py` files of the running Python's standard library (see STDLIB_SKIPPED), sorted."""
    root = Path(os.__file__).resolve().parent
    files = [p for p in root.rglob("*.py")
             if not STDLIB_SKIPPED.intersection(p.relative_to(root).parts[:1]) and "__pycache__" not in p.parts]
    if not files:
        raise Gpt1Error(f"{STDLIB}: found no .py files of the standard library under {root}")
    return sorted(str(p) for p in files)


def iter_pieces(specs: list[str] | list[Source], *, text_field: str = "text", skip_invalid: bool = False,
                stats: SourceStats | None = None, max_documents: int | None = None) -> Iterator[Piece]:
    """Every document of the sources in order (the first `max_documents`), as pieces of at most
    `readers.PIECE_CHARS` characters; a document's last piece has `ends_document`. Fills `stats`."""
    check_max_documents(max_documents)
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    sources = specs if all(isinstance(s, Source) for s in specs) else resolve_sources(specs)
    stats = stats if stats is not None else SourceStats()
    readers = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet, "hf": _read_hf,
               SKIPPED: _read_nothing}
    for source in sources:
        for pieces in readers[source.kind](source, text_field, skip_invalid, stats):
            if stats.documents == max_documents:
                return
            first = next(pieces)
            if not first:
                stats.skipped["empty documents"] += 1
                continue
            stats.documents += 1
            text = first
            for following in pieces:
                stats.bytes += _utf8_size(text)
                yield Piece(text, False)
                text = following
            stats.bytes += _utf8_size(text)
            yield Piece(text, True)


def check_max_documents(max_documents: int | None) -> None:
    if max_documents is not None and (isinstance(max_documents, bool) or not isinstance(max_documents, int)
                                      or max_documents < 1):
        raise Gpt1Error(f"max_documents (--max-documents) must be a whole number >= 1, got {max_documents!r}")


def iter_documents(specs: list[str] | list[Source], **options) -> Iterator[str]:
    """Every document of the sources, whole, in order (see `iter_pieces` for bounded memory)."""
    parts: list[str] = []
    for text, ends_document in iter_pieces(specs, **options):
        parts.append(text)
        if ends_document:
            yield "".join(parts)
            parts = []


def iter_texts(specs: list[str] | list[Source], **options) -> Iterator[str]:
    """The pieces' texts (for tokenizer training, where document boundaries do not matter)."""
    return (piece.text for piece in iter_pieces(specs, **options))


def _utf8_size(text: str) -> int:
    return len(text.encode("utf-8"))


# Each reader yields one iterator of pieces per document (it has at least one piece).

def _read_text(source: Source, text_field: str, skip_invalid: bool, stats: SourceStats) -> Iterator[Iterator[str]]:
    if skip_invalid and _may_be_long(source.location):
        # Pieces are handed on as they are read: find invalid UTF-8 first, so that a skipped
        # file gives nothing rather than its first pieces.
        try:
            for _ in read_text(source.location):
                pass
        except BadRecord:
            stats.skipped["files with invalid UTF-8"] += 1
            return
    pieces = read_text(source.location)
    try:
        first = next(pieces)
    except BadRecord as e:
        if not skip_invalid:
            raise BadRecord(f"{e} (convert the file to UTF-8, or pass --skip-invalid to skip such files)") from None
        stats.skipped["files with invalid UTF-8"] += 1
        return
    yield _chain(first, pieces)


def _may_be_long(path: str) -> bool:
    return path.lower().endswith(".gz") or os.path.getsize(path) > READ_BYTES


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _read_jsonl(source: Source, text_field: str, skip_invalid: bool, stats: SourceStats) -> Iterator[Iterator[str]]:
    def text_of(record, where: str) -> str:
        if not isinstance(record, dict):
            raise BadRecord(f"{where}: expected a JSON object")
        if text_field not in record:
            raise BadRecord(f"{where}: missing field {text_field!r}")
        if not isinstance(record[text_field], str):
            raise BadRecord(f"{where}: field {text_field!r} must be a string, got {type(record[text_field]).__name__}")
        return record[text_field]

    for _, text in read_jsonl(source.location, text_of, skip_invalid=skip_invalid, skipped=stats.skipped):
        yield iter([text])


def _read_parquet(source: Source, text_field: str, skip_invalid: bool, stats: SourceStats) -> Iterator[Iterator[str]]:
    for _, record in read_parquet(source.location, columns=[text_field]):
        text = record[text_field]
        if text is None:
            stats.skipped["null rows"] += 1
            continue
        yield iter([text])


def _read_hf(source: Source, text_field: str, skip_invalid: bool, stats: SourceStats) -> Iterator[Iterator[str]]:
    for row_no, row in enumerate(load_hf_dataset(source.hf)):
        text = row.get(text_field)
        if not isinstance(text, str):
            if skip_invalid:
                stats.skipped["rows without text"] += 1
                continue
            raise Gpt1Error(f"{source}: row {row_no} has no string field {text_field!r} (fields: {', '.join(row)})")
        yield iter([text])


def _read_nothing(source: Source, text_field: str, skip_invalid: bool, stats: SourceStats) -> Iterator[Iterator[str]]:
    stats.skipped["entries that are not regular files"] += 1
    return iter(())
