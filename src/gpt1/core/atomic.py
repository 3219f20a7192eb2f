"""Atomic file writes: a reader never sees a half-written file.

Everything gpt1 writes that a later step trusts (checkpoints, shards, configs, exports) goes
through `atomic_path`: write to a temporary name in the same folder (`gpt1.core.temp_files`),
fsync, then `os.replace`, which is atomic on POSIX and Windows. A run killed mid-write leaves the
old file (or none). A folder (an export) is written the same way with `atomic_dir`, swapped with
the folder it replaces in one step where the system can (`_exchange`). A write that fails (a full
disk, a file-size limit) is an OSError naming the file (`gpt1.core.write_errors.writing`), which
the CLI reports in one line, and leaves neither the temporary file nor a folder it made for it.

Where a write goes (through a link, into a stream, not out of the folder it belongs to) is
`gpt1.core.paths`'s to say.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import shutil
import stat
import sys
import tempfile
from itertools import takewhile
from pathlib import Path
from typing import Any, Iterator

from gpt1.core.errors import Gpt1Error
from gpt1.core.locks import check_unlocked
from gpt1.core.paths import check_within, file_to_write, is_stream, make_dirs, write_through
from gpt1.core.progress import warn
from gpt1.core.temp_files import TEMP_NAME, sweep_leftovers, temp_prefix, temp_stem
from gpt1.core.write_errors import writing


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
    path = file_to_write(path)
    if within is not None:  # before the stream's case: a link out to a disk device is written into
        check_within(path, within)
    if is_stream(path):
        with writing(path):
            yield path
        return
    target = write_through(path)
    make_dirs(target.parent)
    sweep_leftovers(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent)
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
    sweep_leftovers(target)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent))
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


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore
    os.umask(mask)
    return mask


def _delete_replaced(aside: Path, path: Path) -> None:
    """Delete the folder the new one replaced; the new one is in place already, so a part that
    cannot be deleted (another user's files in a shared folder) is a warning, not a failed write."""
    failed: list[tuple[str, OSError]] = []
    if sys.version_info >= (3, 12):  # onerror is deprecated there
        shutil.rmtree(aside, onexc=lambda _func, name, e: failed.append((name, e)))
    else:
        shutil.rmtree(aside, onerror=lambda _func, name, info: failed.append((name, info[1])))
    if failed:
        # Under a name `gpt1.core.temp_files` does not take for a killed writer's temp: every later write of
        # `path` would try again, and warn again with the wrong cause.
        left = aside.with_name(f".{temp_stem(path)}.replaced.{aside.name.rsplit('.', 2)[-2]}")
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
            old = Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix=".old", dir=target.parent))
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


def _say_dropped(path: Path, old: Path, written: frozenset[str]) -> None:
    """Warn of the files of `old`, the folder just replaced at `path`, that the new folder does
    not hold (`written`): another process put them there (`owned`), and they went with it."""
    try:
        dropped = sorted(name for name in os.listdir(old) if name not in written and not TEMP_NAME.fullmatch(name))
    except OSError:  # gone meanwhile: nothing to say
        return
    if dropped:
        listing = ", ".join(dropped[:5]) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
        warn(f"{path}: replaced whole, without {listing}, which another process put in the earlier folder "
             f"(this command does not write {'it' if len(dropped) == 1 else 'them'})")


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


def write_text(path: str | os.PathLike, text: str, *, within: str | os.PathLike | None = None) -> None:
    with atomic_path(path, within=within) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any, *, within: str | os.PathLike | None = None) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n", within=within)
