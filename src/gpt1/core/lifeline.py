"""Child processes that end with their parent.

A parent killed with SIGKILL (or the OOM killer, or a crash) runs no `finally` block, so the
children it would have stopped run on, re-parented to init: an engine process holding a GPU, a
`gpt1 serve` still listening, a busy loop at 100% of a core. Two ways to tie a child to its
parent, for the two kinds of child:

- a child running this package's code calls `exit_with_parent(parent_pid)`: a daemon thread
  that ends the process once its parent is gone (any POSIX system);
- a command started with `subprocess.Popen(..., preexec_fn=parent_death_signal())` gets a
  signal from the kernel when its parent dies (Linux's PR_SET_PDEATHSIG; None elsewhere).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Callable

PR_SET_PDEATHSIG = 1  # from linux/prctl.h


def exit_with_parent(parent_pid: int, interval_s: float = 0.5) -> None:
    """In a child process: exit (os._exit, no cleanup: the parent is gone) once `parent_pid` is
    no longer this process's parent. Pass the pid the parent had when it started the child, not
    `os.getppid()` read here: a parent that died before this call would go unnoticed."""

    def watch() -> None:
        while os.getppid() == parent_pid:  # a dead parent's children are re-parented (init, a subreaper)
            time.sleep(interval_s)
        os._exit(1)

    threading.Thread(target=watch, name="gpt1-lifeline", daemon=True).start()


def parent_death_signal(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` for `subprocess.Popen`: the child gets `sig` when this process dies (Linux;
    None elsewhere, where the child is not tied). The kernel sends it when the *thread* that
    started the child exits: start such a child from a thread that lives as long as it should
    (the main thread), or use `exit_with_parent` in the child instead."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not between fork and exec
    except (OSError, AttributeError):
        return None
    parent_pid = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before the signal was armed
            os._exit(1)

    return preexec
