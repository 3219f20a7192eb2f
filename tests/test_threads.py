"""The CPU training step's thread count follows the machine's load (`gpt1.train.threads`): on a
simulated machine whose step times are the ones measured on the 2-core dev machine, and for real,
with a busy process pinned to one of the two cores the training runs on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gpt1.train.threads import ThreadTuner

# Seconds per quickstart step on the dev machine's 2 cores: quiet, and beside one busy process.
QUIET = {2: 0.113, 1: 0.195}
LOADED = {2: 1.28, 1: 0.198}


class Machine:
    """Runs steps whose time depends on the thread count the tuner set and on the load."""

    def __init__(self, threads: int):
        self.threads, self.clock, self.history = threads, 0.0, []

    def set_threads(self, threads: int) -> None:
        self.threads = threads

    def run(self, tuner: ThreadTuner, seconds: float, times: dict[int, float]) -> list[str]:
        messages, end = [], self.clock + seconds
        while self.clock < end:
            step = times[self.threads]
            self.clock += step
            self.history.append((self.clock, self.threads, step))
            if message := tuner.step_done(step):
                messages.append(message)
        return messages

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
    assert message.startswith("CPU threads 2 -> 1") and tuner.threads == machine.threads == 1
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
                     "time_budget=2", "eval_every=50", "save_every=50"]
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
