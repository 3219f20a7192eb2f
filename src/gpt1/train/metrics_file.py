"""metrics.jsonl, as a resume finds it: the lines a killed run logged after its last checkpoint dropped.

The training loop (`gpt1.train.loop`) appends one JSON record a step to RUN/metrics.jsonl (a
validation adds to its step's). A run killed after its last checkpoint logged steps that its
resume trains again: `trim_metrics` cuts the file back to the checkpoint's step before the resumed
run appends, so that the file holds each step once, as an uninterrupted run's does. It reads the
file from its end (`_reversed_lines`), so that a resume of a week-long run costs the few lines
after its checkpoint, not the whole file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from gpt1.core.atomic import write_text
from gpt1.core.write_errors import writing

TRIM_BLOCK = 1 << 20  # bytes of metrics.jsonl read at a time, from its end, by a resume


def trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines after `step` (written by a run killed after its last checkpoint), and
    those that are not JSON records. A file as the loop writes it (a record a step, in order) is
    read from its end back to the last record at or before `step`, and cut there; nothing is
    written when none follows it (every resume read, parsed and rewrote a week-long run's 3M
    lines: 29 s and 2.4 GB). Where a line read so is not such a record (other than a last line
    cut short by a kill), the file was not written by the loop alone: all of it is filtered."""
    if not path.is_file():
        return
    cut = _metrics_cut(path, step)
    if cut is None:
        _filter_metrics(path, step)
        return
    keep, add_newline = cut
    if keep == path.stat().st_size and not add_newline:
        return
    with writing(path), open(path, "r+b") as f:
        f.truncate(keep)
        if add_newline:  # a whole record a kill left without its newline: the next one goes on a line of its own
            f.seek(keep)
            f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())


def _metrics_cut(path: Path, step: int) -> tuple[int, bool] | None:
    """The length metrics.jsonl keeps, up to its last record at or before `step`, and whether that
    record needs a newline; None where a line after it is not one JSON record of a step."""
    with open(path, "rb") as f:
        for i, (line, end) in enumerate(_reversed_lines(f)):
            if i == 0 and not line:  # the file ends with a newline (or is empty)
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                return None
            if text.splitlines() != [text]:  # a "\r" or "\u2028" that `_filter_metrics` splits lines at
                return None
            try:
                record = json.loads(text)
            except (ValueError, RecursionError):  # not JSON, 4,300+ digits, "[[[..." too deep
                if i == 0:
                    continue  # the last line, cut short by a kill
                return None
            record_step = record.get("step", 0) if isinstance(record, dict) else None
            if not isinstance(record_step, int):
                return None
            if record_step <= step:
                return (end, True) if i == 0 else (end + 1, False)
    return 0, False


def _reversed_lines(f) -> Iterator[tuple[bytes, int]]:
    """The lines of the binary file `f` (split at b"\n"), the last first, each with the offset of
    its end; read TRIM_BLOCK bytes at a time. The first is what follows the last newline."""
    pos, head = f.seek(0, os.SEEK_END), b""
    while pos > 0:
        start = max(0, pos - TRIM_BLOCK)
        f.seek(start)
        block = f.read(pos - start) + head
        end = start + len(block)
        lines = block.split(b"\n")
        head = lines.pop(0)  # it may begin in the block before
        for line in reversed(lines):
            yield line, end
            end -= len(line) + 1
        pos = start
    yield head, len(head)


def _filter_metrics(path: Path, step: int) -> None:
    """Every line of metrics.jsonl read, and those kept that are JSON records at or before `step`."""
    kept = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # cut by a kill, damaged, 4,300+ digits, "[[[..." too deep (as `gpt1 plot`)
            continue
        if isinstance(record, dict) and isinstance(record.get("step", 0), int) and record.get("step", 0) <= step:
            kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))
