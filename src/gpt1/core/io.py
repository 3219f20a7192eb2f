"""Atomic file writes: a reader never sees a half-written file.

Everything gpt1 writes that a later step trusts (checkpoints, shards, configs, exports) goes
through `atomic_path`: write to a temporary name in the same folder, fsync, then `os.replace`,
which is atomic on POSIX and Windows. A run killed mid-write leaves the old file (or none).
A folder (an export) is written the same way with `atomic_dir`, swapped with the folder it
replaces in one step where the system can (`_exchange`). A write that fails (a full
disk, a file-size limit) is an OSError naming the file (`writing`), which the CLI reports in one
line, and leaves neither the temporary file nor a folder it made for it.

An output that is a link is written through it, as `cp` and `>` do: the file or folder it names
is replaced (its temporary beside it, so the rename stays on one file system) and the link stays;
a dangling link is an error naming where it points. Not so for a file that gpt1 names in a folder
it writes into (`within`: a run dir's loss.png, metrics.jsonl, model.safetensors): a folder made
elsewhere (downloaded, unpacked) could hold a link there to a file of the user's (~/.bashrc), which
the write would replace; a link out of that folder is an error (`check_within`). An output that
is not a file to replace (a device, a FIFO, a socket, or an open descriptor: /dev/null, a named
pipe, /dev/stdout, bash's `>(jq .)`) is written into, as `>` does: a rename would put a plain file
in its place (`plot --out /dev/null` as root turned /dev/null into a PNG). `file_target` and
`folder_target` check an output flag's path before the work: nothing in the way, and a trial file
can be made where it goes.

No torch here (only in the functions that take tensors): the command line checks its output
paths, and `gpt1 --help` builds its parser, without loading it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import glob
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from itertools import takewhile
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator

from gpt1.core.errors import Gpt1Error, open_files_hint
from gpt1.core.progress import warn

if sys.platform == "win32":  # no flock, and no os.kill(pid, 0) probe: see `_try_lock`, `_alive_windows`
    import msvcrt
else:
    import fcntl

if TYPE_CHECKING:
    import torch

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

def file_target(path: str | os.PathLike, hint: str = "choose another path") -> Path:
    """`path` as a file an output flag names (plot --out, eval --json, bench --json): not a
    folder, not one of the files a model, run or data dir owns (a new file there is fine), and
    its folder writable (`hint` says what to do if not); else a Gpt1Error naming what is in the
    way. A command checks it early, before hours of work; `atomic_path`, which also writes those
    folders' own files, checks only the first. Nothing is made: the write makes its folders. A
    stream (`is_stream`: /dev/null, a FIFO, /dev/stdout) need only be writable."""
    path = _writable_file(path)
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


def _writable_file(path: str | os.PathLike) -> Path:
    """`path` as a file to write, not a folder (a Gpt1Error naming it): what `atomic_path`
    checks of every write, gpt1's own files in its folders included."""
    if isinstance(path, str) and path.endswith(("/", os.sep)):  # Path() would drop the slash that says "a folder"
        raise Gpt1Error(f"{path}: names a folder (a trailing /); expected the name of a file to write")
    path = Path(path)
    if path.is_dir():  # os.replace would refuse a folder only once the file is written
        raise Gpt1Error(f"{path}: is a folder; expected the name of a file to write")
    return path


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


# A temp's name is `.NAME.PID.XXXXXXXX.tmp` (mkstemp's 8 random characters, ".tmp" or ".old"):
# NAME is cut to what leaves room for the rest (a pid of up to 10 digits) in a name's 255 bytes.
_TEMP_NAME_BYTES = 255 - len(".." + "9" * 10 + "." + "X" * 8 + ".tmp")


def _temp_stem(path: Path) -> str:
    return os.fsdecode(os.fsencode(path.name)[:_TEMP_NAME_BYTES])  # a cut character stays bytes


def _temp_prefix(path: Path) -> str:
    # The writer's pid in the name: a later writer of `path` can tell a dead one's leftovers
    # (SIGKILL runs no cleanup) from a live one's temp.
    return f".{_temp_stem(path)}.{os.getpid()}."


def _temps_of(path: Path) -> list[tuple[Path, int]]:
    """The temporary names of writers of `path` beside it, each with its writer's pid."""
    stem = _temp_stem(path)
    try:
        entries = list(path.parent.glob(f".{glob.escape(stem)}.*"))
    except OSError:
        return []
    found = []
    for entry in entries:
        pid, _, rest = entry.name[len(stem) + 2:].partition(".")
        if pid.isdigit() and rest.endswith((".tmp", ".old")):
            found.append((entry, int(pid)))
    return found


def _sweep_leftovers(path: Path) -> None:
    """Delete the temps that writers of `path` killed before they could clean up left beside it
    (a killed export of a 257M model leaves 1 GB). Those of live processes are left alone."""
    for entry, pid in _temps_of(path):
        if _alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            if entry.exists():  # another user's leftover, say: it would stay for good without a word
                warn(f"{entry}: a folder left by a killed writer of {path.name} that cannot be deleted; delete it by hand")
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if sys.platform == "win32":
        return _alive_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


# Windows' os.kill(pid, 0) is no probe: it is TerminateProcess (it killed the other writer), and
# a pid that is gone raises a plain OSError. Its kernel tells instead whether the process has ended.
_PROCESS_QUERY_LIMITED_INFORMATION, _STILL_ACTIVE, _ERROR_ACCESS_DENIED = 0x1000, 259, 5


def _alive_windows(pid: int) -> bool:
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    handle = kernel32.OpenProcess(_PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    if not handle:  # no such process (ERROR_INVALID_PARAMETER), or one we may not ask: alive
        return ctypes.get_last_error() == _ERROR_ACCESS_DENIED
    try:
        code = ctypes.c_ulong()
        return not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)) or code.value == _STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, replace: bool = True,
                within: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path` (next to what it names, for a link); on success it
    is renamed onto `path`. A stream (a device, a FIFO, a socket, an open descriptor: `is_stream`)
    is yielded itself, to be written into once: there is nothing to replace, or to make atomic.
    `replace=False` (a new output: nothing was there when the command checked it): a file that
    another process wrote at `path` meanwhile (the same export started twice) is left as it is,
    and the write is a Gpt1Error. `within`: the folder that `path` is gpt1's own file of, which a
    link at `path` may not lead out of (`check_within`)."""
    new_folders = _missing_folders(Path(path))
    path = _writable_file(path)
    if within is not None:  # before the stream's case: a link out to a disk device is written into
        check_within(path, within)
    if is_stream(path):
        with writing(path):
            yield path
        return
    target = write_through(path)
    make_dirs(target.parent)
    _sweep_leftovers(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise Gpt1Error(f"{target.parent}: cannot write {target.name} there ({e.strerror})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with writing(path):
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
        # mkstemp creates the file private (0600); give it the mode a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        if replace:
            os.replace(tmp_path, target)
        else:
            _rename_new(tmp_path, target, path)
    finally:
        if tmp_path.exists():  # the write failed
            tmp_path.unlink()
            _remove_empty(new_folders)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, within: str | os.PathLike | None = None,
               owned: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `path` (next to what it names, for a link); on success
    it takes `path`'s place, so `path` is either complete or untouched. A folder at `path` on
    entry is swapped with the new one in one step where the system can (`_exchange`: a reader of
    `path` finds a folder there at every moment; elsewhere it is moved aside first, an instant
    without one) and deleted once the new folder is in place (the caller decides, right before,
    whether replacing it is allowed). Only that folder is replaced: one that another process
    made or wrote into meanwhile (a training run started in the export's --out, a second export)
    is left as it is, and the write is a Gpt1Error. `owned`: a folder that is the command's own
    (a run's best/), replaced whatever another process wrote into it meanwhile (`gpt1 eval
    --suite RUN/best`'s report.md); a warning names the files it drops that way. `within`: as
    `atomic_path`'s (a run's best/ linked out of it would be replaced whole)."""
    path = Path(path)
    if within is not None:
        check_within(path, within)
    target = write_through(path)
    if target.exists() and not target.is_dir():
        raise Gpt1Error(f"{path}: exists and is not a folder")
    if target.is_dir():
        check_unlocked(target, "replace it")
    found = _folder_state(target)  # what the caller checked, and allowed to be replaced
    new_folders = _missing_folders(path)
    make_dirs(target.parent)
    _sweep_leftovers(target)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent))
    except OSError as e:
        raise Gpt1Error(f"{target.parent}: cannot write {target.name} there ({e.strerror})") from None
    placed = False
    try:
        _take_folder_mode(tmp, target if found is not None and stat.S_ISDIR(found[2]) else None)
        try:
            yield tmp
        except OSError as e:  # a file of the folder named as the user knows it (OUT/x), not by OUT's temporary name
            if e.filename is None or not Path(e.filename).is_relative_to(tmp):
                raise
            raise OSError(e.errno, e.strerror, str(path / Path(e.filename).relative_to(tmp))) from e
        # The work took minutes: look again at what is there now, right before the swap.
        now = _folder_state(target)
        if now is not None:
            if stat.S_ISDIR(now[2]):
                check_unlocked(target, "replace it")
            elif owned:
                raise Gpt1Error(f"{path}: exists and is not a folder")
            if not owned and (found is None or now[:2] != found[:2] or not now[3] <= found[3]):
                raise Gpt1Error(_changed_meanwhile(path))
        written = frozenset(os.listdir(tmp))
        old, aside = _put_in_place(tmp, target, path, replacing=now is not None)
        placed = True
        if old is not None:
            if owned:
                _say_dropped(path, old, written)
            _delete_replaced(aside, path)
    finally:
        if not placed and tmp.exists():  # the write failed
            shutil.rmtree(tmp)
            _remove_empty(new_folders)


def _take_folder_mode(tmp: Path, replaced: Path | None) -> None:
    """Give the folder mkdtemp made private (0700) the mode and group a plain mkdir would: the
    umask's mode, plus the setgid bit it inherited in a shared group folder (chmod(2) clears what it
    is not given, and the files written into it then took the writer's own group, unreadable by the
    rest of the group). A folder it replaces passes on its group and setgid bit (an export --force
    over a folder made the group's keeps it the group's); its other bits would not do (read-only,
    the writes into it would fail)."""
    mode = 0o777 & ~_umask() | os.stat(tmp).st_mode & stat.S_ISGID
    if replaced is not None:
        with contextlib.suppress(OSError):  # gone meanwhile, or a group the writer is not in
            before = os.stat(replaced)
            if before.st_gid != os.stat(tmp).st_gid:
                os.chown(tmp, -1, before.st_gid)
            mode |= before.st_mode & stat.S_ISGID
    os.chmod(tmp, mode)


def _delete_replaced(aside: Path, path: Path) -> None:
    """Delete the folder the new one replaced; the new one is in place already, so a part that
    cannot be deleted (another user's files in a shared folder) is a warning, not a failed write."""
    failed: list[tuple[str, OSError]] = []
    if sys.version_info >= (3, 12):  # onerror is deprecated there
        shutil.rmtree(aside, onexc=lambda _func, name, e: failed.append((name, e)))
    else:
        shutil.rmtree(aside, onerror=lambda _func, name, info: failed.append((name, info[1])))
    if failed:
        # Under a name `_temps_of` does not take for a killed writer's temp: every later write of
        # `path` would try again, and warn again with the wrong cause.
        left = aside.with_name(f".{_temp_stem(path)}.replaced.{aside.name.rsplit('.', 2)[-2]}")
        with contextlib.suppress(OSError):
            os.rename(aside, left)
            aside = left
        name, error = failed[0]
        warn(f"{path}: written; the folder it replaced could not be deleted whole ({error.strerror}: {name}); "
             f"delete {aside} by hand")


def _put_in_place(tmp: Path, target: Path, path: Path, replacing: bool) -> tuple[Path | None, Path | None]:
    """Put the folder `tmp` at `target` (the caller's `path`): swapped with the one there in one
    step where the system can, else that one moved aside first. Returns where the folder it
    replaced now is, and what to delete for it (None, None: nothing was there)."""
    old = None
    try:
        if replacing and _exchange(tmp, target):
            return tmp, tmp
        if replacing and os.path.lexists(target):  # else gone meanwhile: nothing to move aside
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".old", dir=target.parent))
            os.rename(target, old / target.name)
        # rename(2) onto a folder made in the instant since (with files in it) fails: kept too.
        os.rename(tmp, target)
    except OSError as e:  # the new folder is complete, but not in place: the old one goes back
        if old is not None:
            with contextlib.suppress(OSError):
                os.rename(old / target.name, target)  # fails where it was never moved aside
            with contextlib.suppress(OSError):
                old.rmdir()
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise Gpt1Error(_changed_meanwhile(path)) from None
        raise Gpt1Error(f"{path}: cannot put the new folder in place ({e.strerror})") from None
    return (old / target.name, old) if old is not None else (None, None)


# renameat2(2)'s flag that swaps two names (Linux 3.15+, glibc 2.28+), and "paths from the current folder".
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100
# What renameat2 answers where the swap cannot be made there: no such call (an older kernel), a file
# system that does not support the flag, or a path gone meanwhile. Two renames do it then.
_NO_EXCHANGE = frozenset({errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT})


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders at `a` and `b` in one step (renameat2's RENAME_EXCHANGE): a reader of
    `b` finds the old folder or the new one, never nothing. Moving the old folder aside and the
    new one in, two renames, left an instant without one: 6,637 of 4.46M looks at a run's best/
    saved by a fine-tune found no folder, and `gpt1.load` said "model directory not found" or,
    missing adapter/ in that instant, ran the base model without a word. False where the system
    cannot swap (not Linux, a C library without renameat2, a file system that refuses the flag),
    for the caller's two renames; another failure is the OSError."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(b))


@functools.cache
def _renameat2():
    """The C library's renameat2, or None (not Linux, or a C library without it: glibc before 2.28)."""
    if sys.platform != "linux":
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


# A temporary name of `atomic_path` or `atomic_dir` (see `_temp_prefix`): a write in progress, not a file.
_TEMP_NAME = re.compile(r"\..+\.\d+\.\w{8}\.(?:tmp|old)")


def _say_dropped(path: Path, old: Path, written: frozenset[str]) -> None:
    """Warn of the files of `old`, the folder just replaced at `path`, that the new folder does
    not hold (`written`): another process put them there (`owned`), and they went with it."""
    try:
        dropped = sorted(name for name in os.listdir(old) if name not in written and not _TEMP_NAME.fullmatch(name))
    except OSError:  # gone meanwhile: nothing to say
        return
    if dropped:
        listing = ", ".join(dropped[:5]) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
        warn(f"{path}: replaced whole, without {listing}, which another process put in the earlier folder "
             f"(this command does not write {'it' if len(dropped) == 1 else 'them'})")


def writer_of(path: str | os.PathLike) -> int | None:
    """The process id of a live writer of `path` (`atomic_path`, `atomic_dir`: its temporary
    name beside it, this process's own included); None when there is none."""
    return next((pid for _, pid in _temps_of(Path(path)) if _alive(pid)), None)


def _rename_new(tmp: Path, target: Path, path: Path) -> None:
    """Rename `tmp` onto `target` only where nothing is there: a hard link fails on an existing
    name (rename(2) would replace it); the temporary name goes once the link is made. Where the
    file system has no hard links, a look just before the rename."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise Gpt1Error(_changed_meanwhile(path)) from None
    except OSError:  # no hard links here (FAT, some network and FUSE file systems)
        if target.exists() or target.is_symlink():
            raise Gpt1Error(_changed_meanwhile(path)) from None
        os.replace(tmp, target)
        return
    os.unlink(tmp)


def _folder_state(path: Path) -> tuple[int, int, int, frozenset[str]] | None:
    """What is at `path`: its device, inode, mode and (a folder's) names; None for nothing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    try:
        names = frozenset(os.listdir(path)) if stat.S_ISDIR(st.st_mode) else frozenset()
    except OSError:  # unreadable: its identity still tells it from another
        names = frozenset()
    return st.st_dev, st.st_ino, st.st_mode, names


def _changed_meanwhile(path: Path) -> str:
    return (f"{path}: another process wrote there while this command was writing it; left it as it is and put "
            "nothing in place: check what it holds, then run the command again")


def replace_file(src: str | os.PathLike, dest: str | os.PathLike, *, within: str | os.PathLike | None = None) -> None:
    """`os.replace(src, dest)`, through a link at `dest` (`write_through`): the file it names is
    replaced, and the link stays. Onto another file system, by a copy written atomically.
    `within`: as `atomic_path`'s."""
    if within is not None:
        check_within(dest, within)
    target = write_through(Path(dest))
    try:
        os.replace(src, target)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        with atomic_path(target) as tmp:
            shutil.copyfile(src, tmp)
        os.unlink(src)


def _missing_folders(path: Path) -> list[Path]:
    """The folders above `path` that do not exist yet, deepest first."""
    return list(takewhile(lambda p: not (p.exists() or p.is_symlink()), path.parents))


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed write made (`tokenizer train --out new/` on a full disk left
    an empty new/); one that holds something meanwhile stays."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Name `path` in the error of a write to it that fails in the block (a full disk, a
    file-size limit), so that the CLI can say which file in one line. The writers gpt1 uses
    leave it out: a plain write's OSError has no file name; numpy's `tofile` has no errno either
    ("16329 requested and 5217 written"); safetensors raises a SafetensorError that holds the
    OS error as text; torch.save replaces the OSError with a RuntimeError of its own ("unexpected
    pos") as it closes its zip writer. An error that names its file already passes unchanged."""
    try:
        yield
    except Exception as e:
        cause = _os_error(e)
        if cause is None or cause.filename is not None:
            raise
        if cause.errno is None:
            raise Gpt1Error(f"{path}: cannot write (the disk is full or a file-size limit was reached); "
                            "free some space or raise the limit (ulimit -f)") from e
        raise OSError(cause.errno, cause.strerror, str(path)) from e


def _os_error(error: Exception) -> OSError | None:
    """The OSError behind a failed write, whatever the writer raised (see `writing`)."""
    if isinstance(error, OSError):
        return error
    # Only a write that imported safetensors can have raised its error.
    safetensors = sys.modules.get("safetensors")
    if safetensors is not None and isinstance(error, safetensors.SafetensorError) and \
            (code := re.search(r"\(os error (\d+)\)", str(error))):
        return OSError(int(code[1]), os.strerror(int(code[1])))
    if isinstance(error, RuntimeError) and isinstance(error.__context__, OSError):
        return error.__context__
    return None


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


def held_by_another(folder: str | os.PathLike) -> bool:
    """Whether another process holds `folder`'s lock (`exclusive`) now. Needs only read access."""
    return lock_holder(folder) is not None


def lock_holder(folder: str | os.PathLike) -> str | None:
    """Who holds `folder`'s lock (`exclusive`) now, as its lock file says ("process 123"); None
    when nobody does. Needs only read access."""
    try:
        f = _open_lock(Path(folder) / ".lock")
    except OSError:  # no lock file: nobody ever locked the folder
        return None
    if f is None:
        return None
    with f:
        if not _try_lock(f, shared=True):
            return f.read(200).strip() or "a process"  # empty in the instant before the holder writes its pid
        _unlock(f)
        return None


def _open_lock(lock: Path):
    """`lock` opened to ask flock who holds it; None where it is not a regular file, which gpt1
    never made: a FIFO by that name (in a model folder from elsewhere) blocked the open forever.
    Checked before the open (opening a device can act on it) and after (O_NONBLOCK: no waiting)."""
    if not lock.is_file():
        return None
    fd = os.open(lock, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return open(fd, encoding="utf-8")


# Windows has no flock: msvcrt locks bytes, and a locked byte cannot be read by anyone else. So the
# byte locked is one far past the pid text that `lock_holder` reads. msvcrt has no shared lock: a
# probe there holds the lock for an instant, in which a second probe would see it held.
_LOCK_BYTE = 1 << 30


def _try_lock(f, shared: bool = False) -> bool:
    """Lock the open lock file `f` without waiting (`shared`: as a reader where the OS can);
    False when another process holds it. `f` is left at its start."""
    try:
        if sys.platform == "win32":
            f.seek(_LOCK_BYTE)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        f.seek(0)
    return True


def _unlock(f) -> None:
    if sys.platform == "win32":
        f.seek(_LOCK_BYTE)
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
    else:
        fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def exclusive(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold `folder`'s lock (a `.lock` file in it) for the block: a second process writing the
    same folder (a command started twice, or still running in another terminal) is refused
    instead of interleaving its files with this one's. The OS releases the lock when the process
    ends, even by SIGKILL, so a killed run never leaves a stale lock (flock; on Windows, a
    byte-range lock: `_try_lock`). A `.lock` that gpt1 did not make, a link or not a file, is a
    Gpt1Error: taking the lock empties the file and writes the pid in it (a downloaded run whose
    checkpoints/.lock linked to ~/.bashrc emptied that), and a device would be written into."""
    folder = make_dirs(folder)
    _check_lock_file(folder / ".lock")
    with open(folder / ".lock", "a+", encoding="utf-8") as f:
        if not _try_lock(f):
            holder = f.read().strip() or "a process"
            # flock is per open file: another thread of this process (a notebook's run in the
            # background) holds it against this one, with this process's pid in the file.
            if holder == f"process {os.getpid()}":
                raise Gpt1Error(f"{folder}: another thread of this process is {what} there already; "
                                "wait for it to end")
            raise Gpt1Error(f"{folder}: {holder} is {what} there already; wait for it to end (or stop it) "
                            "and run the command again")
        with writing(f.name):
            f.seek(0)
            f.truncate()
            f.write(f"process {os.getpid()}")
            f.flush()
        try:
            yield
        finally:
            _unlock(f)


def _check_lock_file(lock: Path) -> None:
    try:
        mode = os.lstat(lock).st_mode  # the link itself: what a link names is no lock of gpt1's
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        what = f"a link to {os.path.realpath(lock)}" if stat.S_ISLNK(mode) else "not a regular file"
        raise Gpt1Error(f"{lock}: {what}, where gpt1 keeps its lock file (taking the lock would empty it); "
                        "remove it and run the command again")


def check_unlocked(folder: str | os.PathLike, action: str) -> None:
    """A Gpt1Error when a process holds a lock (`exclusive`) anywhere in `folder`: a run that is
    training (or preparing) there would lose its files to whatever `action` does to the folder."""
    for lock in Path(folder).rglob(".lock"):
        try:
            f = _open_lock(lock)
            if f is None:
                continue
            with f:
                if not _try_lock(f, shared=True):
                    holder = f.read(200).strip() or "a process"
                    raise Gpt1Error(f"{lock.parent}: {holder} is using it; cannot {action} while it runs "
                                    "(wait for it to end, or stop it)")
                _unlock(f)
        except OSError:
            continue  # gone or unreadable meanwhile: nothing holds it that we can see


_crash_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Die here, as a SIGKILL would, when GPT1_CRASH_AT is NAME (or NAME:N, the Nth time the run
    gets here): the crash-safety tests kill a run at its exact dangerous moments, between two
    writes, instead of at random times."""
    wanted, _, nth = os.environ.get("GPT1_CRASH_AT", "").partition(":")
    if wanted != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] == int(nth or 1):
        os._exit(137)


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str, *, within: str | os.PathLike | None = None) -> None:
    with atomic_path(path, within=within) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any, *, within: str | os.PathLike | None = None) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n", within=within)


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


# The dtypes a weights file may hold (torch's names): converted to the model's on load.
WEIGHT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def check_weight_values(file: str | Path, state: dict[str, torch.Tensor], what: str = "model") -> None:
    """Refuse weights that load but compute garbage: integer (or float8, quantized) tensors, which
    loading would convert silently, and NaN or infinite values (a diverged training). fp16, bf16
    and f64 are fine: they are converted on load."""
    for name, tensor in state.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in WEIGHT_DTYPES:
            raise Gpt1Error(f"{file}: {name} holds {dtype} numbers, expected "
                            "floating-point weights (float32, float16, bfloat16 or float64; integer or quantized "
                            "weights are not supported)")
        if not tensor.isfinite().all():
            raise Gpt1Error(f"{file}: {name} holds NaN or infinite values: the {what} is broken "
                            "(e.g. saved from a diverged training); use an earlier checkpoint")


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None, *,
                     within: str | os.PathLike | None = None) -> None:
    """Save a state dict as safetensors, atomically (tensors are made contiguous first); `within`:
    as `atomic_path`'s."""
    from safetensors.torch import save_file  # torch: see the module docstring

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(path, within=within) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        if metadata and len(metadata) > 1:
            _sort_metadata(tmp)


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its metadata keys in sorted order. safetensors' writer
    keeps them in a Rust HashMap, whose order changes from process to process: the same adapter
    came out as two different files (and fingerprints) from two runs of one command."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:  # the same JSON in another order: as long, padded with spaces as the writer pads
            f.seek(8)
            f.write(text.ljust(size))


SAMPLE_BYTES = 1 << 20


def sample_fingerprint(path: Path) -> str:
    """sha256 (16 hex digits) of a file's size and its first and last MiB (all of it, up to 2 MiB):
    other content with the same token counts (another preparation, shuffled or shifted) is told
    apart on resume at the cost of reading 2 MiB, not the whole file (about 18 GB for the card's
    OpenWebText); an edit confined to the middle of a larger file is not."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}\n".encode())
    with open(path, "rb") as f:
        digest.update(f.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]
