"""Named places where the crash-safety tests kill a run (GPT1_CRASH_AT)."""

from __future__ import annotations

import os

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
