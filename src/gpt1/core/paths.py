"""Paths: what an argument names, where a write to it goes, and what it must not replace.

An output that is a link is written through it, as `cp` and `>` do: the file or folder it names
is replaced (its temporary beside it, so the rename stays on one file system) and the link stays;
a dangling link is an error naming where it points (`write_through`). Not so for a file that gpt1
names in a folder it writes into (`within`: a run dir's loss.png, metrics.jsonl, model.safetensors):
a folder made elsewhere (downloaded, unpacked) could hold a link there to a file of the user's
(~/.bashrc), which the write would replace; a link out of that folder is an error (`check_within`).
An output that is not a file to replace (a device, a FIFO, a socket, or an open descriptor:
/dev/null, a named pipe, /dev/stdout, bash's `>(jq .)`) is written into, as `>` does: a rename
would put a plain file in its place (`plot --out /dev/null` as root turned /dev/null into a PNG;
`is_stream`). `file_target` and `folder_target` check an output flag's path before the work:
nothing in the way, and a trial file can be made where it goes.

The writes themselves are `gpt1.core.atomic`'s. No torch or numpy here: the command line checks
its output paths without loading them.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

from gpt1.core.errors import Gpt1Error

# The files a gpt1 folder (a model dir, a training run, prepared data: `owner_of`) owns by name,
# and its folders that hold only its own files. An output flag naming one of them replaced it:
# `plot --out RUN/model.safetensors` wrote a PNG over the weights, `--out DATA/train.bin` the shard.
OWN_FILES = frozenset({"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "base.json",
                       "train_config.json", "metrics.jsonl", "meta.json", "train.bin", "val.bin",
                       "prepare-state.json", ".lock"})
OWN_FOLDERS = frozenset({"checkpoints", "adapter"})


def as_path(value: Any, name: str, expected: str) -> Path:
    """`value` as a Path, or a Gpt1Error naming the argument: Path(None) raises a TypeError
    about "argument should be a str" that names neither the argument nor what it is for."""
    if not isinstance(value, (str, os.PathLike)):
        raise Gpt1Error(f"{name}: expected {expected} (a str or Path), got {type(value).__name__}")
    return Path(value)


def json_path(path: str | os.PathLike) -> str:
    """`path` as text to record in a JSON file (base.json, train_config.json, an adapter's
    config); a Gpt1Error if it is not UTF-8, which JSON needs (a folder name of other bytes).
    Its bytes decide, not the locale: under a non-UTF-8 locale Python holds "basé" as lone
    surrogates, which stand for its bytes, UTF-8 all the same. Text (a path read back from a
    record, such as base.json's) is returned as it is: os.fsencode would refuse its "é" there."""
    raw = os.fspath(path).encode("utf-8", "surrogateescape")  # lone surrogates back to their bytes
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Gpt1Error(f"{raw.decode('utf-8', 'backslashreplace')}: not valid UTF-8: gpt1 records this path in JSON, "
                        "which needs UTF-8 text; rename the folder, or work from a path that is UTF-8") from None


def file_target(path: str | os.PathLike, hint: str = "choose another path") -> Path:
    """`path` as a file an output flag names (plot --out, eval --json, bench --json): not a
    folder, not one of the files a model, run or data dir owns (a new file there is fine), and
    its folder writable (`hint` says what to do if not); else a Gpt1Error naming what is in the
    way. A command checks it early, before hours of work; `atomic_path`, which also writes those
    folders' own files, checks only the first. Nothing is made: the write makes its folders. A
    stream (`is_stream`: /dev/null, a FIFO, /dev/stdout) need only be writable."""
    path = file_to_write(path)
    if is_stream(path):  # written into, nothing replaced or made; a trial open would end a FIFO's reader
        if not os.access(path, os.W_OK):
            raise Gpt1Error(f"{path}: cannot write there (Permission denied); {hint}")
        return path
    target = write_through(path)
    if owner := _owner_of_file(target):
        raise Gpt1Error(f"{path}: belongs to {owner}: writing it would replace that file; choose another "
                        "file name (a new one in that folder is fine)")
    _check_writable(target.parent, target.name, hint)
    return path


def folder_target(path: str | os.PathLike, hint: str = "choose a writable --out") -> Path:
    """`path` as a folder an --out flag names (a run, a tokenizer, prepared data): a folder or
    nothing yet, not under a file, and writable, or where it can be made; else a Gpt1Error (with
    `hint`). Checked before the work; nothing is made."""
    path = Path(path)
    _check_writable(path, None, hint)
    return path


def _check_writable(folder: Path, name: str | None, hint: str) -> None:
    """Refuse `folder` (made later, with its parents, if missing) when `name` (a file in it; None:
    anything) cannot be written there: a trial file in its nearest existing folder is the honest
    test (os.access says yes to root whatever the modes, and knows nothing of some file systems)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p.is_symlink())
    if not write_through(existing).is_dir():  # a dangling link on the way is an error naming it
        raise Gpt1Error(f"{folder}: exists and is not a folder" if existing == folder
                        else f"{folder}: cannot create the folder: {existing} is not a folder")
    try:
        fd, trial = tempfile.mkstemp(prefix=".gpt1-write-check.", dir=existing)
        os.close(fd)
        os.unlink(trial)
    except OSError as e:
        if existing != folder:
            raise Gpt1Error(f"{folder}: cannot create the folder: {existing} is not writable ({e.strerror}); "
                            f"{hint}") from None
        raise Gpt1Error(f"{folder}: cannot write {name + ' ' if name else ''}there ({e.strerror}); {hint}") from None


def file_to_write(path: str | os.PathLike) -> Path:
    """`path` as a file to write, not a folder (a Gpt1Error naming it): what `atomic_path`
    checks of every write, gpt1's own files in its folders included."""
    if isinstance(path, str) and path.endswith(("/", os.sep)):  # Path() would drop the slash that says "a folder"
        raise Gpt1Error(f"{path}: names a folder (a trailing /); expected the name of a file to write")
    path = Path(path)
    if path.is_dir():  # os.replace would refuse a folder only once the file is written
        raise Gpt1Error(f"{path}: is a folder; expected the name of a file to write")
    return path


def write_through(path: Path) -> Path:
    """Where a write to `path` goes: `path`, or for a link the file or folder it names (links
    followed to the end), so that the link stays. A dangling link is a Gpt1Error saying where it
    points: what it names is not made (a typo in the link would be written somewhere unexpected).
    A stream (`is_stream`) is written into through the link: /dev/fd/63 names `pipe:[N]`, which
    no path reaches."""
    if not path.is_symlink() or is_stream(path):
        return path
    target = Path(os.path.realpath(path))  # a loop of links resolves to a path that does not exist
    if not target.exists():
        raise Gpt1Error(f"{path}: a link to {os.readlink(path)}, which does not exist; make what it names, "
                        "or remove the link")
    return target


def check_within(path: str | os.PathLike, folder: str | os.PathLike) -> None:
    """A Gpt1Error when `path`, a file or folder that gpt1 names in `folder` and writes (a run
    dir's loss.png), is a link to something outside `folder`, links followed to the end: a folder
    from elsewhere could name a file of the user's that way, which the write would replace (a
    downloaded run's loss.png linked to ~/.bashrc). A link within the folder, and the folder
    itself a link, are fine. Outputs the user names (--out LINK) are written through as ever."""
    path = Path(path)
    if not path.is_symlink():
        return
    target = os.path.realpath(path)
    if not Path(target).is_relative_to(Path(folder).resolve()):
        raise Gpt1Error(f"{path}: a link to {target}, outside {folder}; remove the link (gpt1 does not write "
                        "through links out of a folder it writes into)")


# Where the kernel shows a process's open descriptors (/dev/stdout leads there). Linux's /dev/fd is
# a link into /proc; macOS's and the BSDs' is a file system of its own, which `realpath` keeps.
_DESCRIPTOR_FOLDER = re.compile(r"/proc/(self|thread-self|\d+)(/task/\d+)?/fd|/dev/fd")


def is_stream(path: str | os.PathLike) -> bool:
    """Whether a write to `path` goes into what is there rather than replacing it (`>`, not
    `mv`): a device, a FIFO or a socket (/dev/null, a named pipe, a terminal), links followed;
    or an open descriptor (/dev/stdout, /dev/fd/N), whatever it is open on: renaming a file onto
    `> out.json`'s file would leave the shell's descriptor on the old one, without the output."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # nothing there, or a dangling link or a loop (write_through says which)
        return False
    if stat.S_ISDIR(mode):
        return False
    if not stat.S_ISREG(mode):
        return True
    hop = Path(path)
    for _ in range(40):  # Linux follows at most 40 links
        if _DESCRIPTOR_FOLDER.fullmatch(os.path.realpath(hop.parent)):
            return True
        if not hop.is_symlink():
            return False
        hop = hop.parent / os.readlink(hop)
    return False


def owner_of(directory: str | os.PathLike) -> str | None:
    """The kind of gpt1 folder `directory` is, if any, from the files that mark it: its files
    (tokenizer.json) belong to it, and a command writing elsewhere-made files there must not
    replace them. (The names are `gpt1.formats.modeldir`'s and `gpt1.train`'s; this layer
    cannot import them.)"""
    directory = Path(directory)
    if (directory / "config.json").is_file():
        return "a model dir"
    # A run writes config.json only at its first save: before that (or killed before it), its
    # train_config.json and checkpoints/ (gpt1.train.loop, gpt1.train.checkpoint) mark it.
    if (directory / "train_config.json").is_file() or (directory / "checkpoints").is_dir():
        return "a training run dir"
    if (directory / "meta.json").is_file():  # gpt1.data.shards
        return "a prepared data dir"
    return None


def _owner_of_file(path: Path) -> str | None:
    """The folder whose own file `path` is ("runs/a, a training run dir"), whether or not the
    file exists yet: a config.json written into a run before its first save, or into a data
    dir, would make it look like a model dir. A folder holding a tokenizer.json is a tokenizer's."""
    folder = path.parent.resolve()
    if _names_own_file(path):
        if kind := owner_of(folder) or ("a tokenizer dir" if (folder / "tokenizer.json").is_file() else None):
            return f"{path.parent}, {kind}"
    for inner in (folder, *folder.parents):  # RUN/checkpoints/step-00000020/trainer_state.pt
        if inner.name in OWN_FOLDERS and (kind := owner_of(inner.parent)):
            return f"{inner.parent}, {kind} (its {inner.name}/ folder)"
    return None


def _names_own_file(path: Path) -> bool:
    """Whether `path` is one of its folder's OWN_FILES. On a case-insensitive file system (macOS's
    APFS, Windows' NTFS) RUN/Model.safetensors is RUN/model.safetensors: a name that differs only in
    case is that file when both reach the same one (`samefile`), and a new one would become it."""
    own = path.name.casefold()  # OWN_FILES are lower case
    if own not in OWN_FILES:
        return False
    twin = path.parent / own
    if not path.exists():
        return True
    return twin.exists() and os.path.samefile(path, twin)


def make_dirs(path: str | os.PathLike) -> Path:
    """`mkdir -p path`, with a Gpt1Error naming the path (and the file in the way, if any)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        # The nearest existing ancestor tells why: a file where a folder should be, or no access.
        existing = next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), None)
        if existing is not None:
            write_through(existing)  # a dangling link: say where it points
        if existing == path:
            raise Gpt1Error(f"{path}: exists and is not a folder") from None
        if existing is not None and not existing.is_dir():
            raise Gpt1Error(f"{path}: cannot create the folder: {existing} is not a folder") from None
        raise Gpt1Error(f"{path}: cannot create the folder ({e.strerror})") from None
    return path
