"""Throughput benchmarks, each `run(quick=False) -> list[dict]`, printed as a table by `gpt1 bench`."""

import contextlib
import datetime
import importlib.metadata
import json
import os
import sys

from gpt1.core.environment import environment as core_environment


def progress(bench: str, row: dict) -> None:
    """A measured row on stderr as soon as it is known, so that a run cut short (a time limit on
    a lent GPU, a killed job) still leaves its numbers in the log."""
    print(f"[bench {bench}] {json.dumps(row, default=str)}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def fixed_threads():
    """Both sides of a comparison on the same, stated torch thread count: gpt1's thread tuner,
    which lowers the count under load, is off (OMP_NUM_THREADS set, as `gpt1.core.threads` reads
    it), and the count and the variable are as they were afterwards. Tuned, gpt1's side of a "2
    threads" row ran 94-98% of its forwards on 1, and a benchmark after `generate` inherited the
    tuner's last count for its reference rows."""
    import torch

    threads, saved = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield threads
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
        torch.set_num_threads(threads)


def environment() -> dict:
    """What a row's numbers depend on beyond the code (`gpt1.core.environment`: versions, OS, CPU,
    torch's threads), with the date, transformers' version and the GPUs' names. `gpt1 bench`
    records it with the rows, so that a table in the README can say where it came from and two
    result files can be compared fairly."""
    import torch

    try:
        transformers = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        transformers = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **core_environment(), "transformers": transformers,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
