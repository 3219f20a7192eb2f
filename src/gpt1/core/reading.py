"""Reading files that may come from elsewhere: bounded, and only regular files.

A model folder, a run or a corpus may be downloaded or unpacked: its config.json may be a link to
/dev/zero, a FIFO or a 10 GB file. `read_bytes` and `read_json` read at most a limit, refuse what
is not a regular file before they open it (`check_regular_file`), and name the file in a one-line
Gpt1Error. `walk_folder` walks a source folder once, links to folders included.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from gpt1.core.errors import Gpt1Error, open_files_hint

# The most read_json reads. gpt1's JSON files are a few KB (config.json, base.json, meta.json) to
# a few MB (a sharded model's index; prepare-state.json, whose count-mode heap holds 2 numbers per
# held-out document); a model folder from elsewhere may hold anything under those names.
MAX_JSON_BYTES = 64 << 20


def read_json(path: str | os.PathLike, limit: int = MAX_JSON_BYTES) -> Any:
    """Read a JSON file; a missing, malformed or oversized file (more than `limit` bytes), or
    one that is not a regular file, raises Gpt1Error naming it."""
    path = Path(path)
    data = read_bytes(path, limit)
    try:
        return json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as e:
        raise Gpt1Error(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise Gpt1Error(f"{path}: invalid UTF-8 at byte offset {e.start}") from None
    except ValueError:  # a number past Python's int conversion limit
        raise Gpt1Error(f"{path}: invalid JSON: a number of more than {sys.get_int_max_str_digits():,} digits") from None
    except RecursionError:  # "[[[[...": json's C scanner recurses once per level
        raise Gpt1Error(f"{path}: invalid JSON: nested too deeply") from None


def read_bytes(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of `path`, a regular file (links followed) of at most `limit` bytes; else a
    Gpt1Error naming it. A model folder is data from elsewhere: its adapter_config.json linked to
    /dev/zero filled the memory, and a FIFO by that name hung every command. What is not a regular
    file is refused before it is opened (opening a device can act on it), and once more after:
    the open does not block on a FIFO put there meanwhile (O_NONBLOCK)."""
    path = Path(path)
    try:
        st = os.stat(path)
        _check_small_file(path, st.st_mode, st.st_size, limit)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            _check_small_file(path, st.st_mode, st.st_size, limit)
            data = _read_at_most(f, st.st_size, limit)
    except FileNotFoundError:
        raise Gpt1Error(f"{path}: file not found") from None
    except OSError as e:  # permission denied, a loop of links: the CLI would word it as a failed write
        hint = open_files_hint(e)
        raise Gpt1Error(f"{path}: cannot read ({e.strerror}){f'; {hint}' if hint else ''}") from None
    _check_small_file(path, stat.S_IFREG, len(data), limit)  # it grew since the stat
    return data


def _read_at_most(f: BinaryIO, size: int, limit: int) -> bytes:
    """The bytes of `f` up to `limit` + 1 (one more tells a file that grew past the limit), in a
    buffer the size the file has: `f.read(n)` allocates all n bytes first, so reading a 265-byte
    config.json with read(limit + 1) took 64 MiB and failed under `ulimit -v`. A file longer than
    its stat said (it grew, or /proc's, which say 0) is read on in steps of 1 MiB."""
    data = bytearray()
    want = min(size, limit) + 1
    while len(data) <= limit and (chunk := f.read(want)):
        data += chunk
        want = min(1 << 20, limit + 1 - len(data))
    return bytes(data)


_NOT_FILES = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
              (stat.S_ISSOCK, "a socket"))


def check_regular_file(path: str | os.PathLike, mode: int | None = None) -> None:
    """A Gpt1Error naming `path` when it is there but is not a regular file (links followed): a
    folder, or a device, a FIFO or a socket, which a reader would read forever or block on.
    `mode`: its st_mode, when known. Nothing there passes: the reader says "not found"."""
    path = Path(path)
    if mode is None:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return
    if stat.S_ISDIR(mode):
        raise Gpt1Error(f"{path}: is a folder; expected a file")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _NOT_FILES if test(mode)), "not a file")
        via = f"a link to {os.path.realpath(path)}, " if path.is_symlink() else ""
        raise Gpt1Error(f"{path}: {via}{kind}; expected a regular file")


def _check_small_file(path: Path, mode: int, size: int, limit: int) -> None:
    check_regular_file(path, mode)
    if size > limit:
        raise Gpt1Error(f"{path}: larger than {limit:,} bytes, the most gpt1 reads from this file (the ones it "
                        "writes are far smaller)")


def walk_folder(folder: str | os.PathLike) -> Iterator[tuple[str, list[str], list[str]]]:
    """`os.walk(folder)`, top-down and sorted, into links to folders too (a source folder may
    gather its parts from elsewhere, as a glob does). A folder reached again (a link back up,
    a second link to it) is walked once. Prune `dirs` in place as with os.walk."""
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        try:
            st = os.stat(root)
        except OSError:  # gone meanwhile
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        yield root, dirs, sorted(files)
