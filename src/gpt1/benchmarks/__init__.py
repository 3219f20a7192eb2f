"""Throughput benchmarks, each `run(quick=False) -> list[dict]`, printed as a table by `gpt1 bench`."""

import json
import sys


def progress(bench: str, row: dict) -> None:
    """A measured row on stderr as soon as it is known, so that a run cut short (a time limit on
    a lent GPU, a killed job) still leaves its numbers in the log."""
    print(f"[bench {bench}] {json.dumps(row, default=str)}", file=sys.stderr, flush=True)
