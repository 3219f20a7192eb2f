"""How many threads a CPU training step runs on, re-chosen as the machine's load changes.

PyTorch splits every op of a CPU step across its intra-op threads (one per core by default) and
waits for the slowest. When another process keeps one of those cores busy, the thread that
shares it is descheduled for milliseconds at a time and every op waits for it: on a 2-core
machine with one CPU-bound neighbour, the quickstart's step ran 6.5x slower on 2 threads than
on 1 (0.78 against 5.05 steps/s), where on quiet cores 2 threads are 1.7x faster than 1.

`ThreadTuner` keeps the step on the faster count while the load comes and goes. It is fed each
step's time; once the first few steps are timed, then now and then, and at once when the step
time jumps, it tries one thread fewer (or one more, up to where it started) for a few steps and
keeps whichever is faster. A probe that is clearly slower ends after one step, and probes that
change nothing come at doubling intervals, so a steady machine pays ~1-2% for them. The
training loop uses it on CPUs under a time budget (such runs are not bit-reproducible anyway:
the thread count can change how a sum is split), unless OMP_NUM_THREADS fixes the count.
"""

from __future__ import annotations

import collections
import statistics
from typing import Callable

import torch


class ThreadTuner:
    WINDOW = 5  # steps timed per setting (their median is compared)
    FIRST_INTERVAL = 10.0  # seconds of steps before a probe; doubled after each probe that changed nothing
    MAX_INTERVAL = 120.0
    BETTER = 0.95  # a probe wins when its median step takes < 95% of the current one's
    JUMP = 1.3  # the current step time moving by this factor since the last decision: probe now
    GIVE_UP = 1.5  # a probe step this much slower than the current median ends the probe

    def __init__(self, max_threads: int, set_threads: Callable[[int], None] = torch.set_num_threads):
        if max_threads < 2:
            raise ValueError(f"nothing to tune with {max_threads} thread")
        self.max_threads = self.threads = max_threads
        self._set_threads = set_threads
        self._recent: collections.deque[float] = collections.deque(maxlen=self.WINDOW)  # at self.threads
        self._reference: float | None = None  # the median step time at the last decision
        # The first probe comes as soon as a window is timed: a run may start on a loaded machine.
        self._interval = self._since_decision = self.FIRST_INTERVAL
        self._direction = -1  # the next probe tries one thread fewer (-1) or one more (+1)
        self._probe: int | None = None  # the count being tried
        self._probe_times: list[float] = []
        self._untimed = 0  # the first step after a change is not timed (the thread pool settles)

    def step_done(self, seconds: float) -> str | None:
        """Record one step's time; returns a message when the thread count changed for good."""
        if self._untimed:
            self._untimed -= 1
            return None
        if self._probe is not None:
            return self._probe_step(seconds)
        self._recent.append(seconds)
        self._since_decision += seconds
        if len(self._recent) < self.WINDOW:
            return None
        now = statistics.median(self._recent)
        if self._reference is None:
            self._reference = now
        jumped = not self._reference / self.JUMP <= now <= self._reference * self.JUMP
        if jumped or self._since_decision >= self._interval:
            self._start_probe()
        return None

    def _start_probe(self) -> None:
        candidate = self.threads + self._direction
        if not 1 <= candidate <= self.max_threads:
            self._direction = -self._direction
            candidate = self.threads + self._direction
        self._probe, self._probe_times = candidate, []
        self._switch(candidate)

    def _probe_step(self, seconds: float) -> str | None:
        current = statistics.median(self._recent)
        self._probe_times.append(seconds)
        if seconds < self.GIVE_UP * current and len(self._probe_times) < self.WINDOW:
            return None
        tried, old, probe = statistics.median(self._probe_times), self.threads, self._probe
        self._probe, self._since_decision = None, 0.0
        if tried < self.BETTER * current:  # keep it, and try one more the same way at once if there is one
            self.threads, self._reference, self._interval = probe, tried, self.FIRST_INTERVAL
            if 1 <= probe + self._direction <= self.max_threads:
                self._since_decision = self.FIRST_INTERVAL
            self._recent.clear()
            self._recent.extend(self._probe_times)
            return (f"CPU threads {old} -> {self.threads}: a step takes {tried * 1e3:,.0f} ms on {self.threads}, "
                    f"{current * 1e3:,.0f} ms on {old} (another process is busy on these cores, or stopped being)")
        self._switch(self.threads)
        self._reference, self._interval = current, min(2 * self._interval, self.MAX_INTERVAL)
        self._direction = -self._direction
        return None

    def _switch(self, threads: int) -> None:
        self._set_threads(threads)
        self._untimed = 1
