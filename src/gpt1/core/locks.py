"""Folder locks: one process at a time writes a run, a data dir or an export.

A `.lock` file in the folder, locked with flock (on Windows, a byte-range lock: `_try_lock`), which
the OS releases when the process ends, even by SIGKILL: a killed run never leaves a stale lock.
The file holds the holder's pid, which a refused command names.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from pathlib import Path
from typing import Iterator

from gpt1.core.errors import Gpt1Error
from gpt1.core.paths import make_dirs
from gpt1.core.write_errors import writing

if sys.platform == "win32":  # no flock: see `_try_lock`
    import msvcrt
else:
    import fcntl


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


def held_by_another(folder: str | os.PathLike) -> bool:
    """Whether another process holds `folder`'s lock (`exclusive`) now. Needs only read access."""
    return lock_holder(folder) is not None


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
