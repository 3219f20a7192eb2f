"""CPU decoding beside a busy process: the engine's thread tuner (`gpt1.core.threads`) against
fixed thread counts, measured in the same run.

The benchmark pins itself to two cores and measures greedy decoding through `generate_batch`
(a new engine per call, as `gpt1 chat` and the Python API make) for a few seconds per setting:
on quiet cores, then with a process that keeps the second core busy (a single-threaded loop
pinned there), each on 2 threads fixed, on 1 fixed, and tuned (the default). Rows give tokens/s
and, for the tuned rows, `vs_2_fixed` and `vs_best_fixed` (its tokens/s over the fixed runs' in
the same conditions) and the count the tuner ended on. The `small` preset (`tiny` with
`--quick`), random weights whose special tokens never win, 120 new tokens per call (32 quick).
Linux only (it needs CPU affinity). On request: `gpt1 bench threads`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import torch

from gpt1.benchmarks import progress
from gpt1.benchmarks.generate import benchmark_model, synthetic_tokenizer
from gpt1.core import threads as thread_tuning
from gpt1.core.config import ModelConfig
from gpt1.core.errors import Gpt1Error
from gpt1.core.sampling_params import SamplingParams
from gpt1.inference.generate import generate_batch

# Pure Python work, with a look at its parent every ~20 ms: a benchmark killed outright (SIGKILL)
# runs no `finally`, and the loop would spin at 100% of a core forever.
BUSY_LOOP = """import os, sys
os.sched_setaffinity(0, {int(sys.argv[1])})
while os.getppid() == int(sys.argv[2]):
    for _ in range(10**6): pass
"""


@contextlib.contextmanager
def busy_neighbour(core: int):
    """A CPU-bound process pinned to `core` while the block runs."""
    process = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(core), str(os.getpid())])
    try:
        time.sleep(0.5)  # running before the first measurement
        yield
    finally:
        process.kill()
        process.wait()


def _tokens_per_s(model, tokenizer, prompts: list[list[int]], params: SamplingParams, seconds: float) -> float:
    generate_batch(model, tokenizer, prompts, params)  # warm-up
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += sum(c.completion_tokens for c in generate_batch(model, tokenizer, prompts, params))
    return tokens / (time.perf_counter() - start)


def run(quick: bool = False) -> list[dict]:
    if not hasattr(os, "sched_setaffinity"):
        raise Gpt1Error("gpt1 bench threads pins processes to cores: it runs on Linux only")
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise Gpt1Error(f"gpt1 bench threads needs two CPU cores; this process may use {len(cores)}")
    config = ModelConfig.preset("tiny" if quick else "small")
    tokenizer = synthetic_tokenizer(config.vocab_size)
    model = benchmark_model(config, tokenizer.special_ids, torch.device("cpu"))
    params = SamplingParams(temperature=0, max_new_tokens=32 if quick else 120)
    seconds = 1.0 if quick else 6.0
    label = f"{config.n_layer}x{config.n_embd} ({model.num_params() / 1e6:.1f}M, float32)"
    saved_threads, saved_omp = torch.get_num_threads(), os.environ.pop("OMP_NUM_THREADS", None)
    os.sched_setaffinity(0, cores[:2])
    rows: list[dict] = []
    try:
        for condition in ("quiet", "busy neighbour"):
            with busy_neighbour(cores[1]) if condition != "quiet" else contextlib.nullcontext():
                for batch in (1, 8):
                    prompts = [tokenizer.encode(f"{i} ") for i in range(batch)]
                    measured = {}
                    for setting in ("2 fixed", "1 fixed", "tuned"):
                        torch.set_num_threads(1 if setting == "1 fixed" else 2)
                        os.environ.pop("OMP_NUM_THREADS", None)
                        if setting != "tuned":
                            os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # the tuner stays off
                        thread_tuning.forget_shared()
                        measured[setting] = _tokens_per_s(model, tokenizer, prompts, params, seconds)
                        row = {"condition": condition, "threads": setting, "batch": batch, "model": label,
                               "tokens_per_s": measured[setting]}
                        if setting == "tuned":
                            row |= {"vs_2_fixed": measured["tuned"] / measured["2 fixed"],
                                    "vs_best_fixed": measured["tuned"] / max(measured["2 fixed"], measured["1 fixed"]),
                                    "tuned_to": thread_tuning.cpu_thread_tuner("cpu", shared=True).threads}
                        progress("threads", row)
                        rows.append(row)
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
        if saved_omp is not None:
            os.environ["OMP_NUM_THREADS"] = saved_omp
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(saved_threads)
        thread_tuning.forget_shared()
    return rows
