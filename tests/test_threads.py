"""The CPU step's thread count follows the machine's load (`gpt1.core.threads`), in training and
in the inference engine: on a simulated machine whose step times are the ones measured on the
2-core dev machine, and for real, with a busy process pinned to one of the two cores the training
or the decoding runs on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gpt1.core.threads import ThreadTuner

# Seconds per quickstart step on the dev machine's 2 cores: quiet, and beside one busy process.
QUIET = {2: 0.113, 1: 0.195}
LOADED = {2: 1.28, 1: 0.198}


class Machine:
    """Runs steps whose time depends on the thread count the tuner set and on the load."""

    def __init__(self, threads: int):
        self.threads, self.clock, self.history = threads, 0.0, []

    def set_threads(self, threads: int) -> None:
        self.threads = threads

    def run(self, tuner: ThreadTuner, seconds: float, times, kind=None) -> list[str]:
        """`times`: {threads: seconds per step}, or a function of (threads, clock)."""
        messages, end = [], self.clock + seconds
        while self.clock < end:
            step = times(self.threads, self.clock) if callable(times) else times[self.threads]
            self.clock += step
            self.history.append((self.clock, self.threads, step))
            if message := tuner.step_done(step, kind):
                messages.append(message)
        return messages

    def switches_to(self, threads: int, since: float = 0.0) -> int:
        counts = [count for clock, count, _ in self.history if clock > since]
        return sum(1 for a, b in zip(counts, counts[1:]) if b == threads and a != threads)

    def time_on(self, threads: int, since: float = 0.0) -> float:
        return sum(step for clock, count, step in self.history if count == threads and clock > since)


def test_a_quiet_machine_stays_on_every_thread_and_pays_little_for_the_probes():
    machine = Machine(2)
    tuner = ThreadTuner(2, machine.set_threads)
    assert machine.run(tuner, 300, QUIET) == []
    assert tuner.threads == machine.threads == 2
    probing = machine.time_on(1)
    assert 0 < probing < 0.01 * 300  # it did look, at doubling intervals: under 1% of the time


def test_a_busy_neighbour_moves_the_step_to_fewer_threads_and_back_when_it_stops():
    machine = Machine(2)
    tuner = ThreadTuner(2, machine.set_threads)
    machine.run(tuner, 60, QUIET)
    assert machine.threads == 2

    arrived = machine.clock
    [message] = machine.run(tuner, 120, LOADED)
    assert message.startswith("CPU threads 2 -> 1") and tuner.threads == 1
    assert machine.threads == tuner.running  # 1, or 2 if it stopped in a probe
    # Moved within a few slow steps: the jump in step time starts a probe at once.
    assert machine.time_on(2, since=arrived) < 12 * LOADED[2]
    # Staying on 1 thread under load, the probes back to 2 cost a few percent of the time.
    settled = machine.clock - 60
    assert machine.time_on(2, since=settled) < 0.05 * 60

    left = machine.clock
    [message] = machine.run(tuner, 200, QUIET)
    assert message.startswith("CPU threads 1 -> 2") and machine.threads == 2
    back = next(clock for clock, count, _ in machine.history if clock > left and count == 2)
    assert back - left <= ThreadTuner.MAX_INTERVAL + 5


def test_on_more_cores_it_climbs_to_the_fastest_count():
    # Four threads, two cores taken by neighbours: two threads is fastest.
    times = {4: 2.0, 3: 1.5, 2: 0.30, 1: 0.50}
    machine = Machine(4)
    tuner = ThreadTuner(4, machine.set_threads)
    messages = machine.run(tuner, 120, times)
    assert [m.split(":")[0] for m in messages] == ["CPU threads 4 -> 3", "CPU threads 3 -> 2"]
    assert machine.threads == 2 and machine.time_on(2) > 0.75 * 120


def test_noise_does_not_move_it():
    machine = Machine(2)
    tuner = ThreadTuner(2, machine.set_threads)
    generator = torch.Generator().manual_seed(0)

    def noisy(threads: int) -> float:  # +-20% per step around the quiet times, occasional 2x hiccups
        factor = 1 + 0.4 * (torch.rand((), generator=generator).item() - 0.5)
        return QUIET[threads] * (2 if torch.rand((), generator=generator).item() < 0.03 else factor)

    messages = []
    for _ in range(3000):
        if message := tuner.step_done(noisy(machine.threads)):
            messages.append(message)
    assert messages == [] and tuner.threads == 2


def test_steps_of_another_kind_are_not_compared():
    """The engine's decode steps: 1 row or 8 rows take different times. Alternating between them
    is not a change of load, and a probe cut short by a new kind ends without a decision."""
    decode = {1: {2: 0.0024, 1: 0.0034}, 8: {2: 0.0047, 1: 0.0068}}  # seconds, measured (`small`)
    machine = Machine(2)
    tuner = ThreadTuner(2, machine.set_threads)
    messages = []
    for turn in range(300):  # 300 s: turns of 1 s with one row, then with eight
        rows = 1 if turn % 2 == 0 else 8
        messages += machine.run(tuner, 1.0, lambda threads, clock: decode[rows][threads], kind=rows)
    assert messages == [] and tuner.threads == 2
    assert machine.time_on(1) < 0.01 * machine.clock  # no probe for every change of width

    while tuner.running == tuner.threads:  # into the next probe
        machine.run(tuner, 0.0001, lambda threads, clock: decode[8][threads], kind=8)
    assert machine.threads == 1
    machine.run(tuner, 0.0001, lambda threads, clock: decode[1][threads], kind=1)
    assert tuner.running == machine.threads == 2


def test_slower_steps_on_the_fewest_threads_do_not_probe_more():
    """On one thread beside a busy neighbour, a step on two is 30x slower, so a probe there costs
    30 steps: steps that slow down as the context grows (on one thread, with no fewer to try) are
    not a reason to probe it; only the doubling intervals are."""
    def loaded(threads: int, clock: float) -> float:
        return 0.1 if threads == 2 else 0.003 * (1 + clock / 10)  # 3 ms, growing 10% a second

    machine = Machine(2)
    tuner = ThreadTuner(2, machine.set_threads)
    machine.run(tuner, 1.0, loaded)
    assert tuner.threads == 1
    moved = machine.clock
    machine.run(tuner, 30.0, loaded)  # the step time grows from 3 ms to 12 ms
    assert machine.switches_to(2, since=moved) <= 2  # after 10 s, then 20 s of steps


def test_batches_of_different_lengths_are_compared_per_token():
    """Chat fine-tuning pads each batch to its longest dialog: steps of 560 to 2,048 tokens take
    0.05 to 0.19 s on one thread beside a busy neighbour (the quickstart's, measured), 8x that
    on two. Compared per token they are one pace, so the tuner moves once and then probes two
    threads only at its doubling intervals, not whenever a short batch makes a step fast."""
    generator = torch.Generator().manual_seed(0)
    machine, messages = Machine(2), []
    tuner = ThreadTuner(2, machine.set_threads)
    while machine.clock < 60:
        tokens = int(torch.randint(560, 2049, (), generator=generator))
        step = (0.0007 + 85e-6 * tokens) * (8 if machine.threads == 2 else 1)
        machine.clock += step
        machine.history.append((machine.clock, machine.threads, step))
        if message := tuner.step_done(step, size=tokens):
            messages.append(message)
    assert [m.split(":")[0] for m in messages] == ["CPU threads 2 -> 1"]
    assert machine.switches_to(2, since=5.0) <= 3  # after 10, 20 and 40 s of steps at most


def test_one_thread_leaves_nothing_to_tune():
    with pytest.raises(ValueError):
        ThreadTuner(1)


def test_a_budgeted_cpu_run_records_its_threads_and_restores_the_count(data_dir, tmp_path, monkeypatch):
    from gpt1.train.config import TrainConfig, load_config
    from gpt1.train.pretrain import pretrain

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        overrides = ["model=tiny", "block_size=32", "batch_size=4", "device=cpu", "max_steps=100000",
                     "time_budget=1", "eval_every=50", "save_every=50"]  # what is checked is its threads, not its length
        pretrain(load_config(TrainConfig, None, overrides), data_dir, tmp_path / "tuned")
        assert torch.get_num_threads() == 2
        records = [json.loads(line) for line in (tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()]
        assert {r["threads"] for r in records if "loss" in r} <= {1, 2} and "threads" in records[-1]

        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's fixed choice: left alone
        pretrain(load_config(TrainConfig, None, overrides), data_dir, tmp_path / "fixed")
        records = [json.loads(line) for line in (tmp_path / "fixed" / "metrics.jsonl").read_text().splitlines()]
        assert not any("threads" in r for r in records)
    finally:
        torch.set_num_threads(before)


NEIGHBOUR = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"

TRAIN = textwrap.dedent("""
    import logging, os, sys
    import torch
    from gpt1.train.config import TrainConfig, load_config
    from gpt1.train.pretrain import pretrain
    logging.basicConfig(level=logging.INFO)  # the library's messages, as the CLI shows them
    os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(",")})
    torch.set_num_threads(2)
    overrides = ["model=tiny", "block_size=128", "batch_size=16", "device=cpu", "max_steps=100000",
                 "time_budget=15", "eval_every=1000", "save_every=1000"]
    pretrain(load_config(TrainConfig, None, overrides), sys.argv[2], sys.argv[3])
""")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two CPU cores and CPU affinity (Linux)")
def test_a_real_busy_neighbour_on_one_core_moves_training_to_one_thread(data_dir, tmp_path):
    """Training pinned to two cores, a CPU-bound process pinned to the second: the run moves to
    one thread early and stays there."""
    first, second = sorted(os.sched_getaffinity(0))[:2]
    env = {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}, "GPT1_QUIET": "0"}
    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR, str(second)])
    try:
        run = subprocess.run([sys.executable, "-c", TRAIN, f"{first},{second}", str(data_dir), str(tmp_path / "run")],
                             capture_output=True, text=True, timeout=300, env=env)
    finally:
        neighbour.kill()
        neighbour.wait()
    assert run.returncode == 0, run.stderr[-3000:]
    assert "CPU threads 2 -> 1" in run.stderr
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    threads = [r["threads"] for r in steps if "loss" in r]
    assert threads.count(1) > 0.8 * len(threads), threads


def test_the_engine_steps_on_the_tuners_count_and_gives_the_caller_its_own_back(tiny_model_dir, learnt_one_thread,
                                                                               monkeypatch):
    """The engines of a process share a tuner: an engine steps on the count it chose, and the
    caller's count comes back afterwards; OMP_NUM_THREADS (or tune_threads=False) leaves it alone."""
    import gpt1
    from gpt1.core import threads as threads_module
    from gpt1.core.sampling_params import SamplingParams
    from gpt1.inference.engine import Engine

    llm = gpt1.load(tiny_model_dir, device="cpu")
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    assert learnt_one_thread is threads_module.cpu_thread_tuner("cpu", shared=True)
    assert learnt_one_thread.max_threads == 2

    def decode(**engine_args) -> Engine:
        engine = Engine(llm.model, llm.tokenizer, max_batch=2, **engine_args)
        engine.submit([llm.tokenizer.encode("def"), llm.tokenizer.encode("import")], params, lambda i: lambda chunk: None)
        while engine.busy:
            engine.step()
        return engine

    engine = decode()
    assert engine.stats.threads == 1 and torch.get_num_threads() == 1
    engine.restore_threads()
    assert torch.get_num_threads() == 2
    assert llm.generate("def", max_new_tokens=4) is not None and torch.get_num_threads() == 2  # gpt1.generate restores

    assert decode(tune_threads=False).stats.threads == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert decode().stats.threads == 2


DECODE = textwrap.dedent("""
    import logging, os, sys, time
    import torch
    from gpt1.core import threads
    from gpt1.core.config import ModelConfig
    from gpt1.benchmarks.generate import benchmark_model
    from gpt1.core.sampling_params import SamplingParams
    from gpt1.core.tokenizer import Tokenizer
    from gpt1.inference.generate import generate_batch
    logging.basicConfig(level=logging.DEBUG)  # the engine's thread changes, for a failure's message
    logging.getLogger("gpt1").setLevel(logging.DEBUG)
    os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(",")})
    torch.set_num_threads(2)
    tokenizer = Tokenizer.load(sys.argv[2])
    # Big enough to use 2 threads; seeded, and its special tokens never win, so that every call
    # decodes its 48 tokens on all 4 rows (a row ending early changes the kind of step timed).
    model = benchmark_model(ModelConfig.preset("small", vocab_size=tokenizer.vocab_size), tokenizer.special_ids,
                            torch.device("cpu")).eval()
    prompts = [tokenizer.encode(f"def f{i}():") for i in range(4)]
    params = SamplingParams(temperature=0.0, max_new_tokens=48)
    tuner = threads.cpu_thread_tuner("cpu", shared=True)
    start, on_one = time.monotonic(), 0
    # Until it has decoded on one thread for 5 s (a few calls) or 30 s have passed: it moves in ~1 s.
    while time.monotonic() < start + 30 and on_one < 5:
        began = time.monotonic()
        generate_batch(model, tokenizer, prompts, params)
        on_one = on_one + time.monotonic() - began if tuner.threads == 1 else 0
    print("tuned", tuner.threads, torch.get_num_threads())
""")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two CPU cores and CPU affinity (Linux)")
def test_a_real_busy_neighbour_moves_decoding_to_one_thread(tokenizer_dir):
    """The engine decoding on two cores, a CPU-bound process pinned to the second: the shared
    tuner settles on one thread, and the caller has its two back after each call."""
    first, second = sorted(os.sched_getaffinity(0))[:2]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR, str(second)])
    try:
        run = subprocess.run([sys.executable, "-c", DECODE, f"{first},{second}", str(tokenizer_dir)],
                             capture_output=True, text=True, timeout=120, env=env)
    finally:
        neighbour.kill()
        neighbour.wait()
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-3:] == ["tuned", "1", "2"], run.stdout + run.stderr[-3000:]


def test_evaluation_runs_on_the_tuners_count_and_gives_the_caller_its_own_back(tiny_model_dir, data_dir,
                                                                             learnt_one_thread, monkeypatch):
    """`gpt1 eval` (and the quickstart's held-out scores) tune the count too; the score is the
    same to float rounding, and the caller's count comes back."""
    import gpt1
    from gpt1.train.evaluate import evaluate_data

    llm = gpt1.load(tiny_model_dir, device="cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the tuner off: the reference score
    fixed = evaluate_data(llm, [str(data_dir)], batch_size=4, max_batches=6)
    monkeypatch.delenv("OMP_NUM_THREADS")
    seen = []
    real_step_done = learnt_one_thread.step_done
    monkeypatch.setattr(learnt_one_thread, "step_done", lambda seconds, kind=None, size=1.0: seen.append(
        (torch.get_num_threads(), size)) or real_step_done(seconds, kind, size))
    tuned = evaluate_data(llm, [str(data_dir)], batch_size=4, max_batches=6)
    assert seen and all(threads == 1 for threads, _ in seen[:3])  # on the tuner's count
    assert seen[0][1] == 4 * llm.model.config.block_size  # compared per token
    assert torch.get_num_threads() == 2
    assert tuned.tokens == fixed.tokens and abs(tuned.loss - fixed.loss) < 1e-5 * fixed.loss


def test_benchmark_scoring_runs_on_the_tuners_count_and_gives_the_caller_its_own_back(tiny_model_dir, learnt_one_thread,
                                                                                     monkeypatch):
    """`gpt1 eval --tasks`' log-likelihood scoring: each chunk on the tuned count, timed per token;
    the same scores as with the count fixed."""
    import gpt1
    from gpt1.train.harness import Scorer

    llm = gpt1.load(tiny_model_dir, device="cpu")
    generator = torch.Generator().manual_seed(0)
    examples = [[(torch.randint(3, 500, (12 + i,), generator=generator).tolist(),
                  torch.randint(3, 500, (3 + k,), generator=generator).tolist()) for k in range(4)] for i in range(40)]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the tuner off: the reference scores
    fixed = Scorer(llm.model, batch_size=4).score_examples(examples, show_progress=False)
    monkeypatch.delenv("OMP_NUM_THREADS")
    seen = []
    real_step_done = learnt_one_thread.step_done
    monkeypatch.setattr(learnt_one_thread, "step_done", lambda seconds, kind=None, size=1.0: seen.append(
        (torch.get_num_threads(), size)) or real_step_done(seconds, kind, size))
    tuned = Scorer(llm.model, batch_size=4).score_examples(examples, show_progress=False)
    assert len(seen) > 3 and all(threads == 1 for threads, _ in seen[:3]) and all(size > 16 for _, size in seen)
    assert torch.get_num_threads() == 2
    assert [[s.is_greedy for s in e] for e in tuned] == [[s.is_greedy for s in e] for e in fixed]
    assert all(abs(a.loglikelihood - b.loglikelihood) < 1e-4 for ea, eb in zip(tuned, fixed) for a, b in zip(ea, eb))


@pytest.mark.parametrize("value, fixed", [("", False), ("0", False), ("abc", False), (" 3 ", True), ("1", True)])
def test_only_a_positive_omp_num_threads_turns_the_tuner_off(monkeypatch, value, fixed):
    """torch ignores an empty, zero or non-numeric OMP_NUM_THREADS; the tuner took any value as
    a fixed count and was off, the thread count not fixed (`export OMP_NUM_THREADS=`)."""
    from gpt1.core import threads as threads_module

    monkeypatch.setenv("OMP_NUM_THREADS", value)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert (threads_module.cpu_thread_tuner("cpu") is None) == fixed
    finally:
        torch.set_num_threads(before)
