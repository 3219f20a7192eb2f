"""The temporary names of writes in progress (`gpt1.core.atomic`), and their leftovers.

A write goes to `.NAME.PID.XXXXXXXX.tmp` beside NAME (a folder moved aside to `.old`), renamed
onto NAME when complete. A writer killed by SIGKILL runs no cleanup, so the pid in the name tells a
dead writer's leftovers, which the next write of NAME deletes (`sweep_leftovers`), from a live
writer's (`writer_of`).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import re
import shutil
import sys
from pathlib import Path

from gpt1.core.progress import warn

# A temp's name is `.NAME.PID.XXXXXXXX.tmp` (mkstemp's 8 random characters, ".tmp" or ".old"):
# NAME is cut to what leaves room for the rest (a pid of up to 10 digits) in a name's 255 bytes.
_NAME_BYTES = 255 - len(".." + "9" * 10 + "." + "X" * 8 + ".tmp")


def temp_stem(path: Path) -> str:
    return os.fsdecode(os.fsencode(path.name)[:_NAME_BYTES])  # a cut character stays bytes


def temp_prefix(path: Path) -> str:
    # The writer's pid in the name: a later writer of `path` can tell a dead one's leftovers
    # (SIGKILL runs no cleanup) from a live one's temp.
    return f".{temp_stem(path)}.{os.getpid()}."


# A temporary name of `atomic_path` or `atomic_dir` (see `temp_prefix`): a write in progress, not a file.
TEMP_NAME = re.compile(r"\..+\.\d+\.\w{8}\.(?:tmp|old)")


def _temps_of(path: Path) -> list[tuple[Path, int]]:
    """The temporary names of writers of `path` beside it, each with its writer's pid."""
    stem = temp_stem(path)
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


def writer_of(path: str | os.PathLike) -> int | None:
    """The process id of a live writer of `path` (`atomic_path`, `atomic_dir`: its temporary
    name beside it, this process's own included); None when there is none."""
    return next((pid for _, pid in _temps_of(Path(path)) if _alive(pid)), None)


def sweep_leftovers(path: Path) -> None:
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
