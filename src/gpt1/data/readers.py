"""Readers: the one place where data files and dataset names are opened and decoded.

Text sources (`gpt1.data.sources`) and chat sources (`gpt1.data.chat_sources`) both read
through here, so every stage (`tokenizer train`, `prepare`, `eval`, `finetune`) accepts the
same things and fails the same way.

The source grammar:
- `hf:NAME`, `hf:NAME:SPLIT`, `hf:NAME:CONFIG:SPLIT`, each with `@REVISION` after NAME: a Hugging
  Face dataset (a hub name or a local dataset folder), streamed with `datasets`; CONFIG is one of
  its configs (subsets: wikitext's `wikitext-2-raw-v1`), REVISION a branch, tag or commit
  (e.g. `refs/convert/parquet`). A folder written by `save_to_disk` is read with
  `load_from_disk` (its arrow files, memory-mapped). Parsed by `parse_hf` only;
- a file, a folder (the files below it) or a glob: read by suffix; `.gz`, `.bz2` and `.xz` are
  decompressed (Python's own codecs); `.zst` is refused, naming the fix (decompress it).

A plain local folder given as `hf:FOLDER` (not written by `save_to_disk`, no card listing its
files) is refused when `datasets` would leave some of its data files out (it reads only the most
common file type, and, when some files name a split, only those).

The error policy: a file that cannot be read at all (missing, not gzip, truncated gzip,
not parquet, not YAML) is a Gpt1Error naming the file. A bad record inside a readable file
(invalid UTF-8, invalid JSON, a lone surrogate from a `\\udXXX` escape, JSON nested deeper
than Python's recursion limit, a missing field) is a `BadRecord` naming the file, the line or row and
what was expected; with `skip_invalid` the caller skips and counts it instead. A UTF-8 byte
order mark (Windows editors start files with one) is dropped at the start of a text file and
of a JSON line; byte offsets in errors still count it.

Memory: a text file is read in pieces of at most PIECE_CHARS characters (cut before a space
between words where one is near, so BPE sees the same words: `gpt1.core.text_pieces`), whatever its line lengths; a
JSON line is held whole (its size is the record's), and so is a `.json` file that holds one array
of records (`read_json_array`: up to JSON_ARRAY_MAX_BYTES of text, 1 GiB).

Progress: inside `with ReadMeter() as meter:`, `meter.bytes` counts the bytes of the files read
so far in the unit of their sizes on disk (compressed bytes for a `.gz`, row groups for parquet),
so that a progress bar's count and its total (the files' sizes) agree.
"""

from __future__ import annotations

import bisect
import bz2
import codecs
import contextlib
import gzip
import itertools
import json
import lzma
import os
import re
import shlex
import sys
import zlib
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import yaml

from gpt1.core.errors import Gpt1Error, first_line
from gpt1.core.imports import require
from gpt1.core.reading import walk_folder
from gpt1.core.text_pieces import PIECE_CHARS, cut_point

HF_PREFIX = "hf:"
READ_BYTES = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
# The compressions gpt1 reads (Python's standard library has their codecs): suffix -> name,
# the bytes a file of it starts with, its opener. bzip2's "BZh" is followed by the block size.
COMPRESSIONS = {".gz": ("gzip", GZIP_MAGIC, gzip.open), ".bz2": ("bzip2", b"BZh", bz2.open),
                ".xz": ("xz", b"\xfd7zXZ\x00", lzma.open)}
# zstd (the usual format of large web corpora) needs a package: refused with the command that
# decompresses it, rather than read as text with "invalid UTF-8" at byte 1.
ZSTD_SUFFIXES, ZSTD_MAGIC = (".zst", ".zstd"), b"\x28\xb5\x2f\xfd"
# JSON Lines, for text and chat sources alike: .json too, as `datasets` reads it (one object a line).
JSONL_SUFFIXES = tuple(base + c for base in (".jsonl", ".ndjson", ".json") for c in ("", *COMPRESSIONS))
# A .json file may instead hold one array of records (Alpaca's alpaca_data.json): `holds_json_array`.
JSON_SUFFIXES = tuple(".json" + c for c in ("", *COMPRESSIONS))
# An array is parsed whole, and its records take a few times its size in memory: a larger one is
# refused, naming the command that makes it JSON Lines (read a line at a time).
JSON_ARRAY_MAX_BYTES = 1 << 30
PARQUET_SUFFIXES = (".parquet",)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class BadRecord(Gpt1Error):
    """One unusable record in a readable file; `skip_invalid` turns it into a count."""


class MissingColumn(Gpt1Error):
    """A parquet file without a column asked for: its every row lacks it (not a record to skip)."""


# ---- the hf: grammar -----------------------------------------------------------------------

@dataclass(frozen=True)
class HfSpec:
    name: str  # a hub name or a local dataset folder
    revision: str | None = None
    split: str | None = None  # None: the caller's default
    config: str | None = None  # a dataset's config (subset); None: its only or default one

    def __str__(self) -> str:
        revision = f"@{self.revision}" if self.revision else ""
        config = f":{self.config}" if self.config else ""
        return f"{HF_PREFIX}{self.name}{revision}{config}:{self.split or 'train'}"


HF_GRAMMAR = "hf:NAME[@REVISION][:SPLIT] or hf:NAME[@REVISION]:CONFIG:SPLIT"


def parse_hf(spec: str) -> HfSpec | None:
    """`hf:NAME[@REVISION][:SPLIT]` or `hf:NAME[@REVISION]:CONFIG:SPLIT` -> HfSpec (an empty
    part is the default: `hf:NAME:CONFIG:` reads the caller's split of CONFIG); None for anything
    else (a file, folder or glob). Split names, configs and git revisions hold no ':', so the parts
    after NAME are told apart by count. A local folder whose path holds ':' or '@' (`C:\\data` on
    Windows) is its whole path when that exists, and the parts after it follow it."""
    if not spec.startswith(HF_PREFIX):
        return None
    body = spec[len(HF_PREFIX):]
    parts = body.split(":")
    local = next((k for k in range(len(parts), 0, -1) if os.path.exists(":".join(parts[:k]))), None)
    if local is not None:  # a local folder: no revision (`datasets` reads a folder as it is)
        name, revision, parts = ":".join(parts[:local]), "", parts[local:]
    else:
        name, _, revision = parts[0].partition("@")
        parts = parts[1:]
    if not name or len(parts) > 2:
        raise Gpt1Error(f"{spec!r}: expected {HF_GRAMMAR}")
    config, split = parts if len(parts) == 2 else (None, parts[0] if parts else None)
    return HfSpec(name, revision or None, split or None, config or None)


# What an error about an unreachable hub proposes instead (a caller knows better: eval's --data).
LOCAL_INSTEAD = "pass the data as local files (a folder of .jsonl or .parquet files works)"


def load_hf_dataset(spec: HfSpec, default_split: str = "train", config: str | None = None,
                    instead: str = LOCAL_INSTEAD):
    """Open a Hugging Face dataset (`config`: its subset, e.g. ARC-Easy; default: the spec's) as a streaming
    iterable of rows (dicts). `instead`: the way round an unreachable hub that the error names.
    A folder written by `save_to_disk` is opened with `load_from_disk` (`load_dataset` refuses it)."""
    datasets = _datasets()
    if saved_to_disk(spec.name):
        return _rows(spec, _saved_split(spec, spec.split or default_split))
    _check_plain_folder(spec)
    try:
        dataset = datasets.load_dataset(spec.name, config or spec.config, split=spec.split or default_split,
                                        streaming=True, revision=spec.revision)
    except Exception as e:  # network, missing dataset, config or split: datasets raises many types
        raise hf_error(spec, e, instead) from None
    return _rows(spec, dataset)


def _rows(spec: HfSpec, dataset) -> Iterator[dict]:
    """The streamed dataset's rows. Reading is where a local folder's damaged file fails (pyarrow's
    JSON parse error, columns that differ between files): named here, not a traceback from
    inside `datasets`."""
    rows = iter(dataset)
    for number in itertools.count():
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:
            raise Gpt1Error(f"{spec}: cannot read the dataset after {number:,} rows ({first_line(e)}); "
                            "`datasets` reads a folder's files whole, so --skip-invalid cannot skip this: fix the file, "
                            "or pass the files one at a time (their errors name the line)") from None
        yield row


def dataset_split_names(spec: HfSpec) -> list[str]:
    datasets = _datasets()
    if saved_to_disk(spec.name):  # a Dataset saved alone has no splits: its rows are the train split
        saved = _load_from_disk(spec)
        return list(saved) if isinstance(saved, datasets.DatasetDict) else ["train"]
    _check_plain_folder(spec)
    try:
        return list(datasets.get_dataset_split_names(spec.name, spec.config, revision=spec.revision))
    except Exception as e:  # network, missing dataset or config: datasets raises many types
        raise hf_error(spec, e) from None


def saved_to_disk(path: str | Path) -> bool:
    """Whether `path` is a folder written by `datasets`' `save_to_disk` (a Dataset or a
    DatasetDict): `load_from_disk` reads it, `load_dataset` refuses it."""
    folder = Path(path)
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file())


# What `save_to_disk` writes beside its arrow files: not data of a plain folder.
_SAVED_FILES = {"state.json", "dataset_info.json", "dataset_dict.json"}
# The files of a plain folder that hold rows (`datasets`' tabular and text types, compressed or not).
_DATA_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + (".arrow", ".csv", ".tsv", ".txt")


def _check_plain_folder(spec: HfSpec) -> None:
    """Refuse a local folder that `datasets` would read in part, naming the files it would leave
    out: it reads only the most common file type, and, when some files name a split (train.jsonl),
    only those (the rule of gpt1's chat folders; `datasets` drops the rest without a word). A folder
    that `save_to_disk` wrote but that lost its dataset_info.json is named as damaged (`datasets`
    says to call load_from_disk). A folder whose card lists its files is read as the card says. A
    file is refused, naming the spec without hf: (`datasets` says it finds no data file there)."""
    folder = Path(spec.name)
    if folder.is_file():  # `datasets` takes a name or a folder: "Couldn't find any data file at" the file
        raise Gpt1Error(f"{spec}: a local file, which `datasets` does not read by its path alone: pass it without "
                        f"{HF_PREFIX} ({spec.name})")
    if not folder.is_dir() or declares_data_files(folder):
        return
    if (folder / "state.json").is_file() and not (folder / "dataset_info.json").is_file():
        raise Gpt1Error(f"{spec}: a folder written by `save_to_disk` without its dataset_info.json (damaged, or "
                        "copied in part): copy the whole folder again, or save the dataset again")
    try:
        builder = _datasets().load_dataset_builder(str(folder))
    except Exception as e:  # no data files, unknown types: datasets raises many types
        raise hf_error(spec, e) from None
    if not builder.config.data_files:  # a loading script's folder (datasets < 4): the script says what it reads
        return
    read = {Path(f).resolve() for files in builder.config.data_files.values() for f in files}
    left_out = [path for path in _data_files_below(folder) if path.resolve() not in read]
    if left_out:
        names = [path.relative_to(folder).as_posix() for path in left_out]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5:,} more" if len(names) > 5 else "")
        raise Gpt1Error(f"{spec}: `datasets` would read only part of this folder (the most common file type; when "
                        f"some files name a split, only those) and leave out {shown}; pass the folder without "
                        f"{HF_PREFIX} (gpt1 reads every file of a type it knows), or move those files out")


def _data_files_below(folder: Path) -> list[Path]:
    """The files below `folder` that hold rows (_DATA_SUFFIXES), hidden ones and caches skipped
    as `datasets` skips them."""
    found = []
    for root, dirs, names in walk_folder(folder):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        found += [Path(root, name) for name in names
                  if not name.startswith((".", "__")) and name not in _SAVED_FILES
                  and without_compression(name.lower()).endswith(_DATA_SUFFIXES)]
    return found


def _load_from_disk(spec: HfSpec):
    try:
        return _datasets().load_from_disk(spec.name)
    except Exception as e:  # a damaged folder: datasets and pyarrow raise many types
        raise hf_error(spec, e) from None


def _saved_split(spec: HfSpec, split: str):
    if spec.config:
        raise Gpt1Error(f"{spec}: a folder written by `save_to_disk` has no configs: name its split alone, "
                        f"{HfSpec(spec.name, split=split)}")
    saved = _load_from_disk(spec)
    if not isinstance(saved, _datasets().DatasetDict):
        if split != "train":
            raise Gpt1Error(f"{spec}: saved as one Dataset (save_to_disk), which has no split {split!r}; "
                            "its rows are the train split")
        return saved
    if split not in saved:
        raise Gpt1Error(f"{spec}: no split {split!r} (splits: {', '.join(saved)})")
    return saved[split]


def declares_data_files(folder: str | Path) -> bool:
    """Whether `folder` is a Hugging Face dataset repository whose card (README.md) lists its
    data files (`configs:` in its YAML header), as the hub's downloads do: `datasets` reads
    exactly those files, as the hub does."""
    card = Path(folder) / "README.md"
    try:
        text = card.read_text(encoding="utf-8").removeprefix("\ufeff") if card.is_file() else ""
    except (OSError, UnicodeDecodeError):  # not a card that datasets could read either
        return False
    header = re.match(r"---\r?\n(.*?)\r?\n---\s*(\n|$)", text, re.DOTALL)
    if header is None:
        return False
    try:
        metadata = yaml.safe_load(header.group(1))
    except yaml.YAMLError:
        return False
    return isinstance(metadata, dict) and isinstance(metadata.get("configs"), list)


def _datasets():
    return require("datasets", "reading hf: sources", "pip install datasets")


def hf_error(spec: HfSpec, error: Exception, instead: str = LOCAL_INSTEAD) -> Gpt1Error:
    """A clear error for a dataset that `datasets` cannot open, with the fix for script datasets
    and the ways round a hub it cannot reach (`instead`: the local alternative)."""
    hint = ""
    if isinstance(error, ConnectionError):  # `datasets`' "Couldn't reach ... on the Hub", offline or not
        if _datasets().config.HF_HUB_OFFLINE:
            hint = f"; HF_HUB_OFFLINE is set and the Hugging Face cache holds no copy of it: {instead}"
        else:
            hint = f"; without a network, HF_HUB_OFFLINE=1 reads a copy in the Hugging Face cache, or {instead}"
    elif configs := _configs_named(spec, error):
        # `datasets` says "Config name is missing" (or "BuilderConfig 'x' not found") with a Python example
        example = HfSpec(spec.name, spec.revision, spec.split, configs[0])
        listed = ", ".join(configs)
        what = f"has several configs (subsets): {listed}" if spec.config is None \
            else f"has no config {spec.config!r} (configs: {listed})"
        return Gpt1Error(f"{spec}: the dataset {what}; name one as {HF_PREFIX}NAME[@REVISION]:CONFIG:SPLIT, "
                         f"e.g. {example}")
    elif "scripts are no longer supported" in str(error):
        # datasets >= 4 runs no loading scripts; the hub's parquet conversion of such a dataset
        # lives on another branch (for very large datasets it may hold only part of the data).
        hint = ("; convert the data to files (.parquet, .jsonl) and pass their folder, or install `datasets<4`, "
                "which runs loading scripts" if Path(spec.name).is_dir() else  # a local folder has no hub branches
                f"; read the hub's parquet conversion with {HF_PREFIX}{spec.name}@refs/convert/parquet, "
                "or download the data files and pass their folder")
    return Gpt1Error(f"{spec}: cannot open the dataset ({type(error).__name__}: {error}){hint}")


def _configs_named(spec: HfSpec, error: Exception) -> list[str]:
    """The configs of a dataset that `error` says lacks a config, or has not the one named
    (`datasets`' ValueErrors, told by their words); [] for any other error."""
    text = str(error)
    if not isinstance(error, ValueError) or not ("Config name is missing" in text
                                                 or ("BuilderConfig" in text and "not found" in text)):
        return []
    try:
        return list(_datasets().get_dataset_config_names(spec.name, revision=spec.revision))
    except Exception:  # the error names them too: "...among the available configs: ['a', 'b']"
        return re.findall(r"'([^']+)'", text.partition("vailable")[2].partition("]")[0])


# ---- how far the files are read ------------------------------------------------------------

class ReadMeter:
    """The bytes of their files that the readers have consumed, in the unit of the files' sizes
    on disk: a `.gz` counts its compressed bytes, a parquet file its row groups as their rows
    are read. A progress bar whose total is the files' sizes counts this: the decoded text of a
    compressed file is 2-3x its size, and a bar counting text passed 100% a third of the way.

    It counts the reading done inside `with meter:`, however deep in the generators between the
    caller and the reader (a context variable: none of them needs to hand it on). A file read
    twice in a row (`--skip-invalid` checks a long text file before it reads it) counts once.
    """

    def __init__(self) -> None:
        self.closed = 0  # the bytes counted of the files read and closed
        self._position: Callable[[], int] | None = None  # the open file's bytes consumed so far
        self._start = 0  # where the open file's count starts (after what a first read of it counted)
        self._last: tuple[str, int] = ("", 0)  # the last file closed, and how far it was read
        self._token = None

    @property
    def bytes(self) -> int:
        return self.closed + (max(0, self._position() - self._start) if self._position else 0)

    def __enter__(self) -> ReadMeter:
        self._token = _METER.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _METER.reset(self._token)

    def _open(self, path: str, position: Callable[[], int]) -> None:
        self._position, self._start = position, self._last[1] if self._last[0] == path else 0

    def _close(self, path: str, position: Callable[[], int]) -> None:
        if self._position is not position:  # a reader abandoned earlier, finalized late: counted already
            return
        end = position()
        self.closed += max(0, end - self._start)
        self._last, self._position = (path, max(end, self._start)), None


_METER: ContextVar[ReadMeter | None] = ContextVar("gpt1_read_meter", default=None)


@contextlib.contextmanager
def _metered(path: str | Path, position: Callable[[], int]) -> Iterator[None]:
    """Count the reading of `path` on the active ReadMeter, if any (`position`: its bytes
    consumed so far, read while the file is open)."""
    meter = _METER.get()
    if meter is None:
        yield
        return
    meter._open(str(path), position)
    try:
        yield
    finally:
        meter._close(str(path), position)


def _file_position(f: BinaryIO) -> Callable[[], int]:
    """How many bytes of the file on disk `f` (from `open_binary`) has consumed: of a compressed
    file, the compressed file's position (its descriptor's), not the decompressed one."""
    if isinstance(f, (gzip.GzipFile, bz2.BZ2File, lzma.LZMAFile)):
        fd = f.fileno()
        return lambda: os.lseek(fd, 0, os.SEEK_CUR)
    return f.tell


def _parquet_position(metadata, file_size: int) -> Callable[[int], int]:
    """The bytes of a parquet file consumed once `rows` rows are read: each row group's
    compressed size spread over its rows, scaled to the file's size (footer included), so all
    rows read is the whole file."""
    row_ends, byte_ends = [0], [0]
    for i in range(metadata.num_row_groups):
        group = metadata.row_group(i)
        row_ends.append(row_ends[-1] + group.num_rows)
        byte_ends.append(byte_ends[-1] + sum(group.column(j).total_compressed_size for j in range(group.num_columns)))

    def position(rows: int) -> int:
        i = bisect.bisect_right(row_ends, rows) - 1
        if i >= len(row_ends) - 1 or byte_ends[-1] <= 0:
            return file_size if rows >= row_ends[-1] else 0
        within = (rows - row_ends[i]) / max(row_ends[i + 1] - row_ends[i], 1)
        return int(file_size * (byte_ends[i] + within * (byte_ends[i + 1] - byte_ends[i])) / byte_ends[-1])

    return position


# ---- files ---------------------------------------------------------------------------------

def open_binary(path: str | Path) -> BinaryIO:
    """Open a file for reading bytes; `.gz`, `.bz2` and `.xz` files are checked to be what their
    name says and decompressed. A zstd file, or a compressed file whose name does not say so
    (its first bytes do), is a Gpt1Error saying that, not "invalid UTF-8" once read."""
    name = str(path).lower()
    try:
        with open(path, "rb") as f:
            head = f.read(6)
        suffix = compression_suffix(name)
        if suffix:
            codec, magic, opener = COMPRESSIONS[suffix]
            if not head.startswith(magic):
                raise Gpt1Error(f"{path}: not a {codec} file (the name ends in {suffix}; decompress or rename it)")
            return opener(path, "rb")
        if name.endswith(ZSTD_SUFFIXES) or head.startswith(ZSTD_MAGIC):
            raise Gpt1Error(f"{path}: compressed with zstd, which gpt1 does not read: decompress it first (zstd -d)")
        for suffix, (codec, magic, _) in COMPRESSIONS.items():
            if suffix != ".bz2" and head.startswith(magic):  # bzip2's magic is text ("BZh"); the others are not
                raise Gpt1Error(f"{path}: compressed with {codec}, but its name does not end in {suffix}: "
                                f"add {suffix} to its name")
        return open(path, "rb")
    except OSError as e:
        raise Gpt1Error(f"{path}: cannot read ({e.strerror or e})") from None


def compression_suffix(name: str) -> str | None:
    """The COMPRESSIONS suffix that `name` ends in, if any."""
    return next((suffix for suffix in COMPRESSIONS if name.lower().endswith(suffix)), None)


def without_compression(name: str) -> str:
    """`name` less its COMPRESSIONS suffix (`a.jsonl.xz` -> `a.jsonl`)."""
    suffix = compression_suffix(name)
    return name[:-len(suffix)] if suffix else name


# What a damaged (corrupt, truncated) compressed file raises while it is read.
_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)


def _chunks(path: str | Path, f: BinaryIO, size: int) -> Iterator[bytes]:
    done = 0
    try:
        while chunk := f.read(size):
            done += len(chunk)
            yield chunk
    except _READ_ERRORS as e:
        raise Gpt1Error(f"{path}: cannot read after byte {done:,} ({_reason(e)})") from None


def read_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """The numbered lines (bytes) of a file or a .gz; a corrupt or truncated file is a Gpt1Error."""
    with open_binary(path) as f, _metered(path, _file_position(f)):
        line_no = 0
        try:
            for line_no, raw in enumerate(f, start=1):
                yield line_no, raw
        except _READ_ERRORS as e:
            raise Gpt1Error(f"{path}: cannot read after line {line_no:,} ({_reason(e)})") from None


def _reason(error: Exception) -> str:
    if isinstance(error, EOFError):
        return "the compressed file is truncated"
    return getattr(error, "strerror", None) or str(error)


def read_text(path: str | Path) -> Iterator[str]:
    """A text file's content in pieces of at most PIECE_CHARS characters (one piece if shorter).

    Invalid UTF-8 is a BadRecord with its byte offset. A byte order mark at the start (Windows
    editors write one) is dropped, and line ends are "\n" whatever the file's ("\r\n", "\r"), as
    Python's text files and `datasets`' text loader read them: the same text saved on Windows
    trains, tokenizes and scores the same. Each piece but the last ends before a space between two words
    when one lies in its second half, so tokenizing the pieces gives the ids of tokenizing the whole.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    fed = 0
    pending = held = ""  # held: a "\r" that ended a chunk, whose "\n" may start the next
    with open_binary(path) as f, _metered(path, _file_position(f)):
        for chunk in itertools.chain(_chunks(path, f, READ_BYTES), [b""]):  # b"": flush the decoder
            if not fed and chunk.startswith(codecs.BOM_UTF8):  # not text: it would start a document with U+FEFF
                chunk, fed = chunk[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)  # offsets still count it
            buffered = len(decoder.getstate()[0])
            try:
                text = held + decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                raise BadRecord(f"{path}: invalid UTF-8 at byte offset {fed - buffered + e.start}") from None
            fed += len(chunk)
            text, held = (text[:-1], "\r") if chunk and text.endswith("\r") else (text, "")
            pending += text.replace("\r\n", "\n").replace("\r", "\n")
            while len(pending) > PIECE_CHARS:
                cut = cut_point(pending, PIECE_CHARS)
                yield pending[:cut]
                pending = pending[cut:]
    yield pending




def read_jsonl(path: str | Path, convert: Callable[[Any, str], Any] = lambda value, where: value, *,
               skip_invalid: bool = False, skipped: Counter | None = None,
               first_skipped: dict[str, str] | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, convert(parsed JSON value, where)) of each non-blank line.

    A bad line (here or a BadRecord from `convert`) raises, or with `skip_invalid` is counted
    in `skipped["malformed lines"]` and skipped (its error kept in `first_skipped`, if not
    one already: what a caller names when every line was skipped). Callers that can skip pass
    `skipped`; only their errors suggest --skip-invalid. A first line of "{" or "[" alone is named as
    what it is, the start of one JSON value pretty-printed over several lines (no line is JSON).
    """
    first = True
    for line_no, raw in read_lines(path):
        if not (stripped := raw.removeprefix(codecs.BOM_UTF8).strip()):
            continue
        where = f"{path}, line {line_no}"
        pretty, first = first and stripped in (b"{", b"["), False  # json.dump(..., indent=2)'s first line
        try:
            if pretty:  # never JSON; "invalid JSON (Expecting property name ...)" said nothing of why
                raise BadRecord(_pretty_printed(path, where, stripped))
            yield line_no, convert(parse_json(raw, where), where)
        except BadRecord as e:
            _skip_or_raise(e, "line", skip_invalid, skipped, first_skipped)


def _pretty_printed(path: str | Path, where: str, opening: bytes) -> str:
    """The error for a JSON Lines file that holds one JSON value written over several lines
    (`json.dump(..., indent=2)`), with the `jq` command that writes its records one a line."""
    suffix, quoted = compression_suffix(str(path)), shlex.quote(str(path))

    def jq(program: str) -> str:
        return f"{COMPRESSIONS[suffix][0]} -dc {quoted} | jq -c {program}" if suffix else f"jq -c {program} {quoted}"

    each, under_key = jq("'.[]'"), jq("'.KEY[]'")
    if opening == b"[":
        return (f"{where}: one JSON array written over several lines (pretty-printed); JSON Lines holds one record "
                f"a line: name the file .json{suffix or ''} (read as one array of records), or write it so: {each}")
    return (f"{where}: one JSON object written over several lines (pretty-printed); JSON Lines holds one record "
            f"a line: write it so, with {under_key} for records in a list under KEY, or {jq('.')} for one record")


def _skip_or_raise(error: BadRecord, unit: str, skip_invalid: bool, skipped: Counter | None,
                   first_skipped: dict[str, str] | None) -> None:
    """A bad line or row: raise it, or with `skip_invalid` count it as "malformed {unit}s"
    (the first error of that kind kept in `first_skipped`). Callers that can skip pass `skipped`;
    only their errors suggest --skip-invalid."""
    if not skip_invalid:
        if skipped is None:
            raise error
        raise BadRecord(f"{error} (pass --skip-invalid to skip bad {unit}s)") from None
    if skipped is not None:
        skipped[f"malformed {unit}s"] += 1
    if first_skipped is not None:
        first_skipped.setdefault(f"malformed {unit}s", str(error))


def holds_json_array(path: str | Path) -> bool:
    """Whether a JSON file holds one array (its first character past spaces and a byte order mark
    is "["), rather than JSON Lines, whose records (objects) start with "{"."""
    with open_binary(path) as f:
        for chunk in _chunks(path, f, 1 << 16):
            if head := chunk.removeprefix(codecs.BOM_UTF8).lstrip(b" \t\r\n"):
                return head.startswith(b"[")
    return False


def read_json_array(path: str | Path, convert: Callable[[Any, str], Any] = lambda value, where: value, *,
                    max_bytes: int = JSON_ARRAY_MAX_BYTES, skip_invalid: bool = False, skipped: Counter | None = None,
                    first_skipped: dict[str, str] | None = None) -> Iterator[tuple[int, Any]]:
    """(index, convert(value, where)) of each item of a file holding one JSON array, numbered from
    0 as `jq '.[17]'` finds them.

    The file is parsed whole: one whose text is larger than `max_bytes` is refused, naming the `jq`
    command that writes it as JSON Lines. Text that is not one JSON array (invalid UTF-8 or JSON)
    is a Gpt1Error naming the file: no item can be told from the next. An item with a lone
    surrogate escape (or a BadRecord from `convert`) is a BadRecord naming it ("FILE, record 17:
    ..."), skipped and counted as "malformed records" with `skip_invalid`, as `read_jsonl` skips lines."""
    too_large = Gpt1Error(f"{path}: one JSON array of more than {max_bytes:,} bytes, which gpt1 would hold in memory "
                          f"whole; write it as JSON Lines, which is read a line at a time: {_to_json_lines(path)}")
    if compression_suffix(str(path)) is None and os.path.getsize(path) > max_bytes:  # said before reading it
        raise too_large
    data = bytearray()
    with open_binary(path) as f, _metered(path, _file_position(f)):
        for chunk in _chunks(path, f, READ_BYTES):
            data += chunk
            if len(data) > max_bytes:  # a compressed file's text: known only as it is read
                raise too_large
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise Gpt1Error(f"{path}: invalid UTF-8 at byte offset {e.start}") from None
    try:
        items = json.loads(text)
    except ValueError as e:
        raise Gpt1Error(f"{path}: not one valid JSON array ({e}); a .json file that starts with [ is read as one "
                        "array of records, any other as JSON Lines") from None
    except RecursionError:
        raise Gpt1Error(f"{path}: JSON nested too deeply (more than ~{sys.getrecursionlimit():,} levels)") from None
    surrogates = _SURROGATE_ESCAPE.search(data) is not None
    del data, text
    for index in range(len(items)):
        item, items[index] = items[index], None  # each record's memory is freed as its turn passes
        where = f"{path}, record {index}"
        try:
            if surrogates:
                check_no_lone_surrogates(item, where)
            item = convert(item, where)
        except BadRecord as e:
            _skip_or_raise(e, "record", skip_invalid, skipped, first_skipped)
            continue
        yield index, item


def _to_json_lines(path: str | Path) -> str:
    """The shell command that writes a file's JSON array as JSON Lines beside it."""
    suffix = compression_suffix(str(path))
    out = shlex.quote(re.sub(r"\.json$", "", without_compression(str(path)), flags=re.IGNORECASE) + ".jsonl")
    if suffix is None:
        return f"jq -c '.[]' {shlex.quote(str(path))} > {out}"
    return f"{COMPRESSIONS[suffix][0]} -dc {shlex.quote(str(path))} | jq -c '.[]' > {out}"


def parse_json(raw: bytes, where: str) -> Any:
    """Parse one JSON document (bytes) under the error policy; `where` names it in errors.
    A leading byte order mark (Windows editors write one at a file's start) is skipped."""
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # decoded first: byte offsets count the mark
    except UnicodeDecodeError as e:
        raise BadRecord(f"{where}: invalid UTF-8 at byte offset {e.start}") from None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise BadRecord(f"{where}: invalid JSON ({e})") from None
    except RecursionError:
        raise BadRecord(f"{where}: JSON nested too deeply (more than ~{sys.getrecursionlimit():,} levels)") from None
    if _SURROGATE_ESCAPE.search(raw):
        check_no_lone_surrogates(value, where)
    return value


def check_no_lone_surrogates(value: Any, where: str) -> None:
    """JSON allows "\\ud800" alone; UTF-8 cannot hold it and the tokenizer would fail far away."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                raise BadRecord(f"{where}: a lone surrogate escape (\\u{ord(item[e.start]):04x}) in a string: "
                                "not valid Unicode text") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def read_parquet(path: str | Path, columns: list[str] | None = None, *, skip_invalid: bool = False,
                 skipped: Counter | None = None,
                 first_skipped: dict[str, str] | None = None) -> Iterator[tuple[int, dict]]:
    """(row number, record) of a parquet file, read in batches; `columns` must exist (MissingColumn).

    A row whose string holds invalid UTF-8 (parquet writers other than pyarrow do not check) is a
    BadRecord naming the row and column, skipped and counted as "malformed rows" as `read_jsonl`
    skips lines. A file that pyarrow cannot decode (a corrupt page) is a Gpt1Error."""
    # pyarrow is not a gpt1 dependency of its own: `datasets` (one) requires it.
    pq = require("pyarrow.parquet", f"{path}: reading parquet files",
                 "pip install pyarrow (it comes with `datasets`, a gpt1 dependency)")
    pa = require("pyarrow", f"{path}: reading parquet files", "pip install pyarrow")
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt or non-parquet file
        raise Gpt1Error(f"{path}: not a readable parquet file ({e})") from None
    missing = [c for c in columns or [] if c not in parquet.schema_arrow.names]
    if missing:
        raise MissingColumn(f"{path}: no column {missing[0]!r} (columns: {', '.join(parquet.schema_arrow.names)})")
    row = 0
    position = _parquet_position(parquet.metadata, os.path.getsize(path))
    try:
        with _metered(path, lambda: position(row)):
            for batch in parquet.iter_batches(columns=columns, batch_size=4096):
                for record in _batch_records(path, batch, row):
                    if isinstance(record, BadRecord):
                        _skip_or_raise(record, "row", skip_invalid, skipped, first_skipped)
                    else:
                        yield row, record
                    row += 1
    except (OSError, pa.ArrowException) as e:  # a truncated or corrupt page ("Index not in dictionary bounds")
        raise Gpt1Error(f"{path}: cannot read after row {row:,} ({e})") from None


def _batch_records(path: str | Path, batch, first_row: int) -> list[dict | BadRecord]:
    """A record batch's rows as dicts; a row with invalid UTF-8 in a string as a BadRecord naming
    its column (found row by row only in a batch that has one: the fast path converts it whole)."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        pass
    records: list[dict | BadRecord] = []
    for i in range(batch.num_rows):
        record: dict | BadRecord = {}
        for name, column in zip(batch.schema.names, batch.columns):
            try:
                record[name] = column[i].as_py()
            except UnicodeDecodeError as e:
                record = BadRecord(f"{path}, row {first_row + i:,}: invalid UTF-8 in column {name!r} "
                                   f"(byte offset {e.start} of its text)")
                break
        records.append(record)
    return records


def read_yaml(path: str | Path) -> Any:
    """A YAML file with every scalar kept a string ("Yes" stays "Yes", not True). Invalid UTF-8
    is a BadRecord (a file to skip with `skip_invalid`, as a text file with it is)."""
    text = ""
    try:
        text = Path(path).read_text(encoding="utf-8")
        return yaml.load(text, Loader=yaml.BaseLoader)
    except OSError as e:
        raise Gpt1Error(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise BadRecord(f"{path}: invalid UTF-8 at byte offset {e.start}") from None
    except RecursionError:  # PyYAML's composer recurses once per level (as broken YAML: not skipped)
        raise Gpt1Error(f"{path}: not valid YAML for gpt1: nested too deeply (hundreds of levels, "
                        "past Python's recursion limit)") from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (NUL, other controls): no mark
        line, column = text.count("\n", 0, e.position) + 1, e.position - text.rfind("\n", 0, e.position)
        raise Gpt1Error(f"{path}: not valid YAML at line {line}, column {column} (the character "
                        f"U+{e.character:04X}, which YAML does not allow)") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise Gpt1Error(f"{path}: not valid YAML{at} ({getattr(e, 'problem', None) or type(e).__name__})") from None
