"""Text corpora: local files, directories, globs and Hugging Face datasets, as documents.

One reader for every stage that takes raw text (`tokenizer train`, `prepare`, `eval`):

- a text file (`.txt`, `.md`, `.py`, ... or any file named explicitly) is one document; a `.txt`
  file's `<|endoftext|>` (GPT-2's end of text, as TinyStories' and other GPT-2-era dumps separate
  their documents: SEPARATOR) ends a document, with a newline each side of it;
- `.jsonl` / `.ndjson` / `.json` (JSON Lines, as `datasets` and chat sources read them): one
  document per line, from its `text` field; a `.json` file that holds one array of records is
  read as that array (as `datasets` reads it; `readers.read_json_array`: parsed whole, up to 1 GiB);
  a first record without the field is the file's layout, refused naming its fields and --text-field;
- `.parquet`: one document per row, from its `text` column (read in batches);
- text and JSON Lines files may be compressed: `.gz`, `.bz2`, `.xz` (`readers.COMPRESSIONS`);
- a directory: the files below it with a known suffix, links to folders followed (hidden
  folders and caches skipped, a folder reached twice read once; an entry that is not a regular
  file, such as a pipe or a dangling link, is skipped and counted); files of other types are
  left out and named in a warning. A dataset repository downloaded from the hub (a README.md
  whose YAML lists the data files of each split: `configs:`) is read as `hf:FOLDER`, its train
  split, as `datasets` reads it (its other splits, and its card, are no training text); a folder
  holding `datasets`' own files (.arrow beside dataset_info.json: `load_dataset`'s cache, a
  `save_to_disk` folder) is refused, naming `hf:` for it;
- a glob (`data/**/*.txt`), its entries found and taken as a directory's are; a pattern that
  ends in a suffix (`logs/*.log`) names its files' type, and they are read as text;
- `hf:NAME` or `hf:NAME:SPLIT` (default split `train`): a dataset read with `datasets`, streamed,
  so a 40 GB corpus never sits in memory. `NAME` may also be a local dataset folder,
  `NAME@REVISION` reads another branch, tag or commit (e.g. `@refs/convert/parquet`), and
  `hf:NAME:CONFIG:SPLIT` one of its configs (`readers.parse_hf`);
- `stdlib`: the running Python's standard library source (`.py` files: code, comments and
  docstrings, ~10 MB), a real corpus on every machine with Python (the quickstart's default).

Files are read through `gpt1.data.readers` (its error policy: file, line or byte offset, and
what was expected). With `skip_invalid=True` a bad document (a file with invalid UTF-8, a
malformed line or row) is skipped and counted instead. A null text (JSON `null`, a parquet or
dataset null) is skipped and counted in every format.

A document longer than `core.text_pieces.PIECE_CHARS` characters arrives in pieces (`iter_pieces`), so
memory stays bounded whatever the line length (a JSON line or parquet row is held whole, its
text cut with `core.text_pieces.text_pieces`); `iter_documents` joins them for the callers that need
whole documents.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import reprlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, NamedTuple

from gpt1.core.errors import Gpt1Error
from gpt1.core.imports import require
from gpt1.core.progress import info, warn
from gpt1.core.reading import walk_folder
from gpt1.core.text_pieces import PIECE_CHARS, text_pieces
from gpt1.data.readers import (
    COMPRESSIONS,
    HF_PREFIX,
    JSON_SUFFIXES,
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    ZSTD_SUFFIXES,
    BadRecord,
    HfSpec,
    MissingColumn,
    compression_suffix,
    declares_data_files,
    holds_json_array,
    load_hf_dataset,
    parse_hf,
    read_json_array,
    read_jsonl,
    read_parquet,
    read_text,
    saved_to_disk,
    without_compression,
)

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".py", ".tex", ".html", ".htm", ".xml", ".csv", ".tsv"}
# What a folder is searched for, for people.
KNOWN_TYPES = (f"{', '.join(sorted(TEXT_SUFFIXES))}, .jsonl, .ndjson, .json (each also as {', '.join(COMPRESSIONS)}), "
               f"{', '.join(PARQUET_SUFFIXES)}")
SKIPPED_DIRS = {"__pycache__", "node_modules", ".git"}
STDLIB = "stdlib"
# Installed packages differ per machine and the test suite is not shipped everywhere (Debian
# splits it out); encodings/ is mostly code-page tables. Without them the corpus is the same
# for everyone with the same Python version.
STDLIB_SKIPPED = {"site-packages", "dist-packages", "test", "encodings"}
SKIPPED = "skipped"  # the kind of a folder's or glob's entry that is not a regular file (see _entry)
# GPT-2's end-of-text token as text: the document separator of TinyStories' .txt files and other
# dumps made for GPT-2 ("story\n<|endoftext|>\nstory"). gpt1's tokenizer reads it as 13 characters
# of text, so it was trained as text, inside one document for the whole file. In a .txt file it
# ends a document (a newline each side of it goes with it); other text files (code, markup) keep it.
SEPARATOR = "<|endoftext|>"
SEPARATED_SUFFIXES = (".txt",)
_SEPARATOR = re.compile(r"\n?" + re.escape(SEPARATOR) + r"\n?")
# A folder that holds `datasets`' own files: its arrow files beside dataset_info.json (the cache
# that `load_dataset` writes, or a `save_to_disk` folder), which `datasets` reads, not gpt1.
DATASET_INFO = "dataset_info.json"
# Fields of a JSON record that say it is chat data (gpt1 finetune's formats), not text.
_CHAT_FIELDS = ({"messages"}, {"conversations"}, {"instruction", "output"}, {"prompt", "completion"}, {"message_id"})


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
    separated_files: int = 0  # .txt files whose SEPARATOR ended documents (said once, at the first)

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
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if Path(without_compression(name)).suffix in TEXT_SUFFIXES:
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
            if saved_to_disk(spec):  # its arrow files are read by `datasets`, not as a folder of files
                raise Gpt1Error(f"{spec}: a dataset folder written by `datasets` (save_to_disk): "
                                f"read it as {HF_PREFIX}{spec}")
            if declares_data_files(spec):
                sources.append(_dataset_repository(spec))
                continue
            found, left_out = _files_below(spec, spec, ["**"], names_type=False)
            if not found:
                suffix = Path(left_out[0]).suffix if left_out else ""
                named = (f"; a file named on its own is read as text whatever its suffix ("
                         f"{os.path.join(spec, left_out[0])}), and so are the files of a pattern that ends in theirs "
                         f"({os.path.join(spec, '*' + suffix)})") if suffix else ""
                raise Gpt1Error(f"{spec}: directory has no text files (looked for {KNOWN_TYPES}){named}")
            sources.extend(found)
        elif os.path.isfile(spec):
            if not os.access(spec, os.R_OK):
                raise Gpt1Error(f"{spec}: file is not readable (permission denied)")
            sources.append(Source(_kind_of(spec) or "text", spec))  # a file named explicitly is text
        elif glob.has_magic(spec):
            sources.extend(_glob_sources(spec))
        elif os.path.exists(spec):  # /dev/null, a pipe <(...): not data that can be read again, or named
            raise Gpt1Error(f"{spec}: not a regular file or directory (a device, pipe or socket); "
                            "give text files, folders, globs or hf:DATASET names")
        else:
            raise Gpt1Error(f"{spec}: no such file or directory")
    return sources


def _dataset_repository(folder: str) -> Source:
    """A dataset repository downloaded from the hub (its card lists the data files of each split),
    read as `hf:FOLDER` with `datasets`: its train split, not every split's files and the card as
    text (the test split was trained on). Named by its absolute path, as `normalized_spec` names a
    folder: prepare's record of it is the same however the path is spelled."""
    hf = HfSpec(os.path.abspath(folder))
    info(f"{folder}: a dataset repository (its README.md lists the data files of each split): read as "
         f"{HF_PREFIX}{folder}:train, as `datasets` reads it; {HF_PREFIX}{folder}:SPLIT names another split, "
         f"{HF_PREFIX}{folder}:CONFIG:SPLIT a config")
    return Source("hf", folder, hf)


def _glob_sources(spec: str) -> list[Source]:
    """The files a glob matches, found as a folder's are (`_files_below`): `glob.glob` followed a
    link back up ~40 folders deep and read a folder once per link to it (train and val shared
    documents), and read editor backups (`x.txt~`) that a folder leaves out. `**` is any number of
    folders, as in `glob`; the folders before the first wildcard are where the search starts."""
    # Windows takes both separators, and its shells leave globs to the program: `corpus/*.txt`
    # split only at "\\" was one component that no single name could match.
    parts = (spec.replace(os.altsep, os.sep) if os.altsep else spec).split(os.sep)
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = os.sep.join(parts[:fixed]) or (os.sep if fixed else os.curdir)
    pattern = [part for part in parts[fixed:] if part not in ("", os.curdir)]
    suffix = Path(spec).suffix
    found, _ = _files_below(spec, root, pattern, names_type=bool(suffix) and not glob.has_magic(suffix))
    if not found:
        raise Gpt1Error(f"{spec}: the pattern matches no files")
    if not fixed:  # a pattern relative to here ("*.txt") names its files without "./", as glob did
        found = [Source(s.kind, s.location.removeprefix(os.curdir + os.sep)) for s in found]
    return sorted(found, key=lambda s: s.location)


def _files_below(spec: str, root: str, pattern: list[str], *, names_type: bool) -> tuple[list[Source], list[str]]:
    """The files below `root` whose path inside it matches `pattern` (glob components; a folder
    is ["**"]), in sorted order, and those left out: links to folders followed, a folder reached
    twice walked once, hidden files and folders and caches skipped. A file of a type gpt1 does not
    read is left out and named in a warning, unless `names_type` (a glob ending in a suffix: its
    files are text). A folder of `datasets`' own files (DATASET_INFO) is refused, naming `hf:` for it."""
    found, left_out = [], []
    for folder, dirs, files in walk_folder(root):
        inside = Path(os.path.relpath(folder, root)).parts
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS
                   and _glob_match([*inside, d], pattern, partial=True)]
        if _glob_match([*inside, DATASET_INFO], pattern):
            check_not_datasets_files(spec, folder, files, "text files")
        for name in files:
            path = os.path.join(folder, name)
            if name.startswith(".") or not _glob_match([*inside, name], pattern):
                continue
            kind = _kind_of(path) or ("text" if names_type else None)
            if kind:
                found.append(_entry(kind, path))
            else:
                left_out.append(os.path.relpath(path, root))
    if left_out:
        zstd = "; decompress the .zst files first (zstd -d)" if any(n.endswith(ZSTD_SUFFIXES) for n in left_out) else ""
        shown = ", ".join(left_out[:5]) + (f" and {len(left_out) - 5:,} more" if len(left_out) > 5 else "")
        warn(f"{spec}: left out {len(left_out):,} file{'s' if len(left_out) > 1 else ''} of types gpt1 does not read "
             f"(it reads {KNOWN_TYPES}): {shown}{zstd}")
    return found, left_out


def check_not_datasets_files(spec: str, folder: str, names: list[str], instead: str) -> None:
    """Refuse a folder (`spec`, or `folder` below it, whose files are `names`) that holds `datasets`'
    own files, arrow files beside DATASET_INFO: `load_dataset`'s cache, or a `save_to_disk` folder.
    Its dataset_info.json was read as JSON Lines and its arrow files left out; `hf:` reads it."""
    if DATASET_INFO in names and any(name.lower().endswith(".arrow") for name in names):
        where = "is" if os.path.normpath(folder) == os.path.normpath(spec) else "holds"
        raise Gpt1Error(f"{spec}: {where} a folder of `datasets`' own files (.arrow files beside {DATASET_INFO}: "
                        f"load_dataset's cache, or save_to_disk's), not {instead}: read it as {HF_PREFIX}{folder}")


def _glob_match(parts: list[str], pattern: list[str], partial: bool = False) -> bool:
    """Whether path components `parts` match glob components `pattern` ("**": any number of
    them, as `glob`'s recursive `**`); `partial`: whether a path below `parts` may."""
    if not parts:
        return partial or all(p == "**" for p in pattern)
    if not pattern:
        return False
    if pattern[0] == "**":
        return _glob_match(parts, pattern[1:], partial) or _glob_match(parts[1:], pattern, partial)
    # fnmatch: without regard to case where the OS's names are (Windows), as glob matches there
    return fnmatch.fnmatch(parts[0], pattern[0]) and _glob_match(parts[1:], pattern[1:], partial)


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
    `core.text_pieces.PIECE_CHARS` characters; a document's last piece has `ends_document`. Fills `stats`."""
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


def files_size(sources: list[Source]) -> int | None:
    """The bytes on disk of local sources, the total of a progress bar that counts a
    `readers.ReadMeter`; None with an hf: dataset (streamed: its size is not known)."""
    if any(s.kind == "hf" for s in sources):
        return None
    return sum(os.path.getsize(s.location) for s in sources if s.kind != SKIPPED)


def _utf8_size(text: str) -> int:
    return len(text.encode("utf-8"))


# Each reader yields one iterator of pieces per document (it has at least one piece).

def _read_text(source: Source, text_field: str, skip_invalid: bool, stats: SourceStats) -> Iterator[Iterator[str]]:
    if skip_invalid and _may_be_long(source.location):
        # Pieces are handed on as they are read, so invalid UTF-8 further on (or a character cut
        # off at the very end, found by the decoder's last flush) comes after the first pieces
        # went on: find it first, so that a skipped file gives nothing rather than its start.
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
            raise _with_hint(e) from None
        stats.skipped["files with invalid UTF-8"] += 1
        return
    if first and Path(without_compression(source.location.lower())).suffix in SEPARATED_SUFFIXES:  # (empty: counted)
        yield from _documents(_separated(source.location, _chain(first, pieces), stats))
    else:
        yield _chain(first, pieces)


def separates_documents(source: Source) -> bool:
    """Whether a text source is a .txt file whose first piece holds SEPARATOR: more than one
    document, unlike any other text file (what `gpt1 prepare` may ask before it reads a corpus
    of too few files to split)."""
    if source.kind != "text" or Path(without_compression(source.location.lower())).suffix not in SEPARATED_SUFFIXES:
        return False
    try:
        return SEPARATOR in next(read_text(source.location), "")
    except BadRecord:  # invalid UTF-8 in the first piece: said when it is read
        return False


def _separated(path: str, pieces: Iterator[str], stats: SourceStats) -> Iterator[tuple[str, bool]]:
    """A .txt file's pieces as (text, ends_document), its documents ended at SEPARATOR. A document
    of no text (two separators in a row, one at the start or end of the file) is none. A piece is
    handed on as it is, or in parts at the separators in it: a cut between pieces lies where
    `read_text` put it (where tokenizing the pieces gives the ids of the whole), and a separator
    across that cut is found by looking at the next piece's start."""
    started, skip, found = False, 0, False  # skip: the part of a separator begun in the piece before
    piece = next(pieces, None)
    while piece is not None:
        following = next(pieces, None)
        window = piece + (following or "")[:len(SEPARATOR) + 2]
        start = skip
        for match in _SEPARATOR.finditer(window, skip):
            if match.start() >= len(piece):  # begins in the next piece: found there
                break
            if text := piece[start:match.start()]:
                yield text, True
            elif started:
                yield "", True
            started, start, found = False, match.end(), True
        skip = max(start - len(piece), 0)
        if text := piece[start:]:
            yield text, following is None
            started = following is not None
        elif started and following is None:
            yield "", True
        piece = following
    if found:
        stats.separated_files += 1
        if stats.separated_files == 1:  # said once a run, at the first file
            info(f"{path}: {SEPARATOR} (GPT-2's end of text, as TinyStories' .txt files separate their stories) "
                 "ends a document in a .txt file: the text between two is one document")


def _documents(parts: Iterator[tuple[str, bool]]) -> Iterator[Iterator[str]]:
    """(text, ends_document) parts as one iterator of texts per document, as the readers yield them
    (each read to its end before the next is asked for)."""
    parts = iter(parts)
    for text, ends in parts:
        def document(text: str = text, ends: bool = ends) -> Iterator[str]:
            yield text
            while not ends:
                text, ends = next(parts)
                yield text
        yield document()


def _may_be_long(path: str) -> bool:
    """Whether `read_text` may hand on a piece of `path` before it has decoded all of it: when its
    text may be longer than PIECE_CHARS characters. A plain file holds at most as many characters
    as bytes; a compressed one may hold any number (a 166-byte .bz2 held 2.5 MB of text)."""
    return compression_suffix(path) is not None or os.path.getsize(path) > PIECE_CHARS


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    try:
        yield from rest
    except BadRecord as e:  # invalid UTF-8 past the first piece (read without skip_invalid): the same advice
        raise _with_hint(e) from None


def _with_hint(error: BadRecord) -> BadRecord:
    return BadRecord(f"{error} (convert the file to UTF-8, or pass --skip-invalid to skip such files)")


# A long record's text goes on as `text_pieces`, as a text file's does: tokenized whole, an 8 MB
# JSON line took 1.2 GB (the tokenizer's ~140 bytes a character), against 228 MB as a .txt.

def _read_jsonl(source: Source, text_field: str, skip_invalid: bool, stats: SourceStats) -> Iterator[Iterator[str]]:
    first = True  # whether no record was an object yet: the first says the file's layout

    def text_of(record, where: str) -> str | None:
        nonlocal first
        if not isinstance(record, dict):
            kind = ", got an array (JSON Lines: one object a line)" if isinstance(record, list) else ""
            raise BadRecord(f"{where}: expected a JSON object{kind}")
        if text_field not in record:
            if first:  # its fields are every record's (as a parquet file's columns): none to skip
                raise Gpt1Error(_no_text_field(where, text_field, record))
            raise BadRecord(f"{where}: missing field {text_field!r}")
        first = False
        text = record[text_field]
        if text is not None and not isinstance(text, str):
            raise BadRecord(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
        return text

    path = source.location
    array = path.lower().endswith(JSON_SUFFIXES) and holds_json_array(path)  # as `datasets` reads a .json
    records = (read_json_array if array else read_jsonl)(path, text_of, skip_invalid=skip_invalid, skipped=stats.skipped)
    for _, text in records:
        if text is None:  # as a parquet file's null row: no document, counted
            stats.skipped["null lines"] += 1
            continue
        yield text_pieces(text)


def _no_text_field(where: str, text_field: str, record: dict) -> str:
    """What is wrong with a JSON file whose first record lacks the text field: its fields, and what
    to do (--skip-invalid would skip every record, as it was proposed to)."""
    chat = "; it holds chat records: gpt1 finetune --data reads them" \
        if any(fields <= {key for key, value in record.items() if value is not None} for fields in _CHAT_FIELDS) else ""
    return (f"{where}: no field {text_field!r} (fields: {', '.join(map(str, record)) or 'none'}): the first record "
            f"says the file's layout, so --skip-invalid would skip every record; name the field of text with "
            f"--text-field{chat}")


def _read_parquet(source: Source, text_field: str, skip_invalid: bool, stats: SourceStats) -> Iterator[Iterator[str]]:
    try:
        yield from _parquet_texts(source, text_field, skip_invalid, stats)
    except MissingColumn as e:  # raised before the first row
        raise Gpt1Error(f"{e}: name the column of text with --text-field") from None


def _parquet_texts(source: Source, text_field: str, skip_invalid: bool, stats: SourceStats) -> Iterator[Iterator[str]]:
    for row, record in read_parquet(source.location, columns=[text_field], skip_invalid=skip_invalid,
                                    skipped=stats.skipped):
        text = record[text_field]
        if text is None:
            stats.skipped["null rows"] += 1
            continue
        if not isinstance(text, str):
            # A parquet column has one type, so the first row that is not a string says that every
            # row is not: --skip-invalid (a row at a time) would skip them all, and is not offered.
            raise Gpt1Error(_not_a_text_column(source.location, text_field, row, text))
        yield text_pieces(text)


def _not_a_text_column(path: str, column: str, row: int, value: object) -> str:
    """What is wrong with a parquet file whose text column holds `value` (not a str) at `row`:
    the column's Arrow type (int64, binary, list<element: string>), and the columns to choose from."""
    pq = require("pyarrow.parquet", f"{path}: reading parquet files", "pip install pyarrow")  # loaded by the reader
    schema = pq.read_schema(path)
    return (f"{path}: column {column!r} has type {schema.field(column).type}, not string "
            f"(row {row:,}: {reprlib.repr(value)}): "
            f"every row is of that type, so --skip-invalid cannot skip them; name the column of text with "
            f"--text-field (columns: {', '.join(schema.names)})")


def _read_hf(source: Source, text_field: str, skip_invalid: bool, stats: SourceStats) -> Iterator[Iterator[str]]:
    # A dataset's rows share its columns and their types, as a parquet file's do: null rows are
    # skipped and counted, and a missing or non-string column is one error, not a row to skip.
    for row_no, row in enumerate(load_hf_dataset(source.hf)):
        text = row.get(text_field)
        if text is None and text_field in row:
            stats.skipped["null rows"] += 1
            continue
        if not isinstance(text, str):
            what = f"is {type(text).__name__}, not a string (row {row_no:,}: {reprlib.repr(text)})" \
                if text_field in row else "is missing"
            raise Gpt1Error(f"{source}: field {text_field!r} {what}: every row of a dataset has its columns and "
                            f"their types, so --skip-invalid cannot skip them; name the column of text with "
                            f"--text-field (fields: {', '.join(row)})")
        yield text_pieces(text)


def _read_nothing(source: Source, text_field: str, skip_invalid: bool, stats: SourceStats) -> Iterator[Iterator[str]]:
    stats.skipped["entries that are not regular files"] += 1
    return iter(())
