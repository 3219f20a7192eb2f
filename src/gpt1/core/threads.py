"""How many threads a CPU step (of training, or of the inference engine) runs on, re-chosen as
the machine's load changes.

PyTorch splits every op of a CPU step across its intra-op threads (one per core by default) and
waits for the slowest. When another process keeps one of those cores busy, the thread that
shares it is descheduled for milliseconds at a time and every op waits for it: on a 2-core
machine with one CPU-bound neighbour, the quickstart's step ran 6.5x slower on 2 threads than
on 1 (0.78 against 5.05 steps/s), where on quiet cores 2 threads are 1.7x faster than 1.

`ThreadTuner` keeps the step on the faster count while the load comes and goes. It is fed each
step's time; once the first few steps are timed, then at doubling intervals, it tries one thread
fewer (or one more, up to where it started) for a few steps and keeps whichever is faster; when
the step time jumps it tries at once, one fewer if steps got slower (a neighbour arrived), one
more if they got faster (it left). A probe that is clearly slower ends after one step, so a
steady machine pays ~1-2% for them. The training loop uses it on CPUs under a time budget (such
runs are not bit-reproducible anyway: the thread count can change how a sum is split), and the
inference engine on CPUs, where one busy neighbour made decoding 30x slower on 2 threads than
on 1 (10 against 298 tokens/s); OMP_NUM_THREADS, when set to a positive integer, fixes the count instead
(`cpu_thread_tuner`).

The engine's tuner is shared by the engines of a process (`shared=True`): `gpt1 chat` and the
Python API make one engine per call, and each starts on the count the last one found.

Steps of different kinds take different times (the engine's decode step with 1 row or 16, over
a short context or a long one), so each step may say its `kind`: only steps of one kind are
compared, each kind keeps its own reference time, and a new kind starts a new window (a probe
under way ends, undecided, and is tried again on the next window).

A count the tuner sets is its stepping thread's alone (`_set_own_threads`): with OpenMP,
torch.set_num_threads also sets the count every thread started later begins with, and a thread
that began on the tuner's 1 kept it for life (and its own engines, keyed on it, never tuned).

A forked child (multiprocessing's default start method on Linux, gunicorn --preload) runs on one
thread (`_after_fork_in_child`), as PyTorch's DataLoader workers do: GNU OpenMP is not fork-safe,
and once the parent has run a parallel op the child's first op on more threads waits forever.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import statistics
import threading
import time
from typing import Callable, Hashable, Iterator

import torch


def cpu_thread_tuner(device, shared: bool = False) -> "ThreadTuner | None":
    """A tuner for steps on `device`: None unless it is a CPU with more than one thread to tune
    and OMP_NUM_THREADS (a positive integer) does not fix the count. `shared`: the process's one tuner for this
    thread count (what it learnt outlives the caller), else a new one."""
    threads = torch.get_num_threads()
    if getattr(device, "type", device) != "cpu" or _threads_fixed() or threads < 2:
        return None
    if not shared:
        return ThreadTuner(threads)
    with _SHARED_LOCK:
        return _SHARED.setdefault(threads, ThreadTuner(threads))


def _threads_fixed() -> bool:
    """Whether OMP_NUM_THREADS fixes the thread count: a positive integer. torch ignores an empty,
    zero or non-numeric value (`export OMP_NUM_THREADS=` in a profile), and so does the tuner."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return value.isdigit() and int(value) > 0


@contextlib.contextmanager
def tuned_threads(device, enabled: bool = True) -> Iterator["ThreadTuner | None"]:
    """The process's shared tuner for a loop of steps on `device` (None when there is nothing to
    tune, or not `enabled`); the calling thread's own count is put back when the loop ends."""
    tuner = cpu_thread_tuner(device, shared=True) if enabled else None
    callers_threads = torch.get_num_threads()
    try:
        yield tuner
    finally:
        if tuner is not None and torch.get_num_threads() != callers_threads:
            torch.set_num_threads(callers_threads)


class ThreadTuner:
    WINDOW = 5  # steps timed per setting (their median is compared)
    FIRST_INTERVAL = 10.0  # seconds of steps before a probe; doubled after each probe that changed nothing
    MAX_INTERVAL = 120.0
    BETTER = 0.95  # a probe wins when its median step takes < 95% of the current one's
    JUMP = 1.3  # the step time moving by this factor since the last decision: probe now, that way
    SETTLE = 0.05  # seconds of steps not timed after a change (at least one step): the pool settles
    GIVE_UP = 1.5  # a probe step this much slower than the current median ends the probe
    ABANDON = 3.0  # ... and one on more threads this much slower ends it even while the switch settles

    def __init__(self, max_threads: int, set_threads: Callable[[int], None] | None = None):
        """`set_threads`: sets the count (default: the stepping thread's, `_set_own_threads`)."""
        if max_threads < 2:
            raise ValueError(f"nothing to tune with {max_threads} thread")
        self.max_threads = self.threads = max_threads
        self._set_threads = set_threads
        self._recent: collections.deque[float] = collections.deque(maxlen=self.WINDOW)  # at self.threads
        # Per kind of step, its median time at the last decision (on the current count).
        self._references: dict[Hashable, float] = {}
        # The first probe comes as soon as a window is timed: a run may start on a loaded machine.
        self._interval = self._since_decision = self.FIRST_INTERVAL
        self._direction = -1  # the next probe tries one thread fewer (-1) or one more (+1)
        self._probe: int | None = None  # the count being tried
        self._probe_times: list[float] = []
        self._settling = 0.0  # seconds of steps still to leave untimed after a change
        self._kind: Hashable = None  # the kind of step being timed
        self._lock = threading.Lock()  # a shared tuner may be fed by several threads

    @property
    def running(self) -> int:
        """The count steps run on now: the one being tried while a probe lasts."""
        return self._probe if self._probe is not None else self.threads

    def apply(self) -> int:
        """Put the calling thread on `running` (a thread's count is its own); returns it. For a
        shared tuner, whose last switch may have been made on another thread or undone since."""
        if torch.get_num_threads() != self.running:
            self._set(self.running)
        return self.running

    @contextlib.contextmanager
    def step(self, kind: Hashable = None, size: float = 1.0) -> Iterator[None]:
        """Run the block as one step: on the tuned count, timed, recorded (see `step_done`)."""
        self.apply()
        started = time.perf_counter()
        yield
        self.step_done(time.perf_counter() - started, kind, size)

    def step_done(self, seconds: float, kind: Hashable = None, size: float = 1.0) -> str | None:
        """Record one step's time. `kind`: steps of another kind are not compared with it;
        `size`: the step's work (e.g. its tokens, when batches differ in length), times are
        compared per unit of it. Returns a message when the thread count changed for good."""
        with self._lock:
            return self._step_done(seconds, kind, seconds / size)

    def _step_done(self, seconds: float, kind: Hashable, pace: float) -> str | None:
        if self.max_threads == 1:  # a forked child's (`_after_fork_in_child`): nothing to try
            return None
        if kind != self._kind:
            self._new_kind(kind)
        if self._settling > 0:
            self._settling -= seconds
            # More threads beside a busy neighbour: no need to wait for a timed step. (The first
            # step on fewer threads may be slow for other reasons, and trying it costs little.)
            if self._probe is not None and self._probe > self.threads and \
                    pace > self.ABANDON * statistics.median(self._recent):
                self._probe_lost(statistics.median(self._recent))
            return None
        if self._probe is not None:
            return self._probe_step(pace)
        self._recent.append(pace)
        self._since_decision += seconds
        if len(self._recent) < self.WINDOW:
            return None
        now = statistics.median(self._recent)
        reference = self._references.setdefault(kind, now)
        # Slower steps may mean a neighbour arrived (try fewer threads), faster ones that it left
        # (try more); a jump the other way, or with no count that way, is a new normal. Trying
        # more threads beside a busy neighbour is expensive (a step 15-50x slower), so only then.
        if now > reference * self.JUMP or now < reference / self.JUMP:
            direction = -1 if now > reference else +1
            if 1 <= self.threads + direction <= self.max_threads:
                self._start_probe(direction)
            else:
                self._references[kind] = now
        elif self._since_decision >= self._interval:
            self._start_probe(self._direction)
        return None

    def _start_probe(self, direction: int) -> None:
        if not 1 <= self.threads + direction <= self.max_threads:
            direction = -direction
        self._direction = direction
        self._probe, self._probe_times = self.threads + direction, []
        self._switch(self._probe)

    def _probe_step(self, pace: float) -> str | None:
        current = statistics.median(self._recent)
        self._probe_times.append(pace)
        if pace < self.GIVE_UP * current and len(self._probe_times) < self.WINDOW:
            return None
        tried, old, probe = statistics.median(self._probe_times), self.threads, self._probe
        if tried >= self.BETTER * current:
            self._probe_lost(current)
            return None
        # Keep it, and try one more the same way at once if there is one.
        self._probe, self._since_decision = None, 0.0
        self.threads, self._interval = probe, self.FIRST_INTERVAL
        self._references = {self._kind: tried}  # times on the old count say nothing about the new
        if 1 <= probe + self._direction <= self.max_threads:
            self._since_decision = self.FIRST_INTERVAL
        self._recent.clear()
        self._recent.extend(self._probe_times)
        return (f"CPU threads {old} -> {self.threads}: steps {current / tried:.1f}x as fast on {self.threads} "
                f"as on {old} (another process is busy on these cores, or stopped being)")

    def _probe_lost(self, current: float) -> None:
        self._probe, self._since_decision = None, 0.0
        self._switch(self.threads)
        self._references[self._kind] = current
        self._interval = min(2 * self._interval, self.MAX_INTERVAL)
        self._direction = -self._direction

    def _new_kind(self, kind: Hashable) -> None:
        self._kind = kind
        self._recent.clear()
        if self._probe is not None:  # its steps so far cannot be compared with the new kind's
            self._probe = None
            self._switch(self.threads)
            self._since_decision = self._interval  # probe again once the new kind has its window

    def _switch(self, threads: int) -> None:
        self._set(threads)
        self._settling = self.SETTLE

    def _set(self, threads: int) -> None:
        if self._set_threads is not None:
            self._set_threads(threads)
        else:
            _set_own_threads(threads, default=self.max_threads)

    def _after_fork(self) -> None:
        """In a forked child: one thread for good, and a lock no thread of the parent holds."""
        self._lock = threading.Lock()
        self.max_threads = self.threads = 1
        self._probe = None


def _set_own_threads(threads: int, default: int) -> None:
    """torch.set_num_threads(threads) for the calling thread alone. With OpenMP the call also sets
    the count that a thread started later takes at its first torch op and keeps for life (a web
    server's worker threads started while a call was on the tuner's 1 stayed on 1); a thread kept
    for it sets that back to `default` (its own count is the only other one it sets). Not waited
    for: a stream switches at every token, and waiting for that thread to be scheduled on busy
    cores (0.8-3.5 ms) halved a stream's speed beside a busy neighbour; `own_threads` waits instead."""
    global _PENDING
    if threads == default:
        torch.set_num_threads(threads)
        return
    with _SWITCH_LOCK:
        torch.set_num_threads(threads)
        if (requests := _default_setter()) is not None:
            _PENDING = threading.Event()
            requests.put((default, _PENDING))


def own_threads() -> int:
    """The calling thread's CPU thread count (torch.get_num_threads()). A thread's first torch op
    takes the process's count for life, and a thread pool's new worker that first read a stream
    while `_set_own_threads` had that count on the tuner's (the setter not yet run) stayed on 1: a
    thread's first call waits for the setter; later ones read at once."""
    if getattr(_SEEN, "seen", False):
        return torch.get_num_threads()
    deadline = time.monotonic() + _SETTER_WAIT_S  # at most (a thread frozen at interpreter exit never answers)
    while True:
        with _SWITCH_LOCK:
            pending = _PENDING
            if pending is None or pending.is_set() or time.monotonic() > deadline:
                _SEEN.seen = True
                return torch.get_num_threads()
        pending.wait(max(deadline - time.monotonic(), 0.0))


# The thread that sets the count later threads start on. Kept, not one per call: a stream gives its
# reader its own count back at every piece (gpt1.inference.generate), so a step on the tuner's
# count sets it at every token, and starting a thread took 0.1-0.4 ms on 2 busy cores, 20x the wait.
_SETTER: queue.SimpleQueue | None = None
_SETTER_LOCK = threading.Lock()
_SWITCH_LOCK = threading.Lock()  # held while a switch sets the process's count (see own_threads)
_PENDING: threading.Event | None = None  # set once the setter has run the latest switch's request
_SEEN = threading.local()  # .seen: the thread has read its count through own_threads (it is fixed)
_SETTER_WAIT_S = 1.0  # own_threads waits at most this long for the setter


def _default_setter() -> queue.SimpleQueue | None:
    """The queue of the thread that runs torch.set_num_threads(n) for each (n, done) put on it,
    started at the first use; None when no thread can be started (a pids limit: later threads start
    on the caller's count)."""
    global _SETTER
    with _SETTER_LOCK:
        if _SETTER is None:
            requests: queue.SimpleQueue = queue.SimpleQueue()
            thread = threading.Thread(target=_run_setter, args=(requests,), name="gpt1-threads-default", daemon=True)
            try:
                thread.start()
            except RuntimeError:
                return None
            _SETTER = requests
        return _SETTER


def _run_setter(requests: queue.SimpleQueue) -> None:
    while True:
        threads, done = requests.get()
        torch.set_num_threads(threads)
        done.set()


_SHARED: dict[int, ThreadTuner] = {}
_SHARED_LOCK = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked child runs on one thread, as PyTorch's DataLoader workers do: GNU OpenMP (PyTorch's
    CPU threads on Linux) is not fork-safe, and once the parent has run a parallel op (loading a
    model does) the child's first op on more threads waits forever for the parent's OpenMP threads,
    which the child does not have; on one thread an op never uses them. The shared tuners, an
    engine's made before the fork included, stay on one too."""
    global _SHARED_LOCK, _SETTER, _SETTER_LOCK, _SWITCH_LOCK, _PENDING
    torch.set_num_threads(1)  # and the count of the threads the child starts
    _SHARED_LOCK = threading.Lock()  # another thread of the parent may have held it at the fork
    # The parent's setter thread is not the child's, and its locks may have been held at the fork.
    _SETTER, _SETTER_LOCK, _SWITCH_LOCK, _PENDING = None, threading.Lock(), threading.Lock(), None
    for tuner in _SHARED.values():
        tuner._after_fork()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


def forget_shared() -> None:
    """Forget what the shared tuners learnt (benchmarks and tests start from scratch)."""
    with _SHARED_LOCK:
        _SHARED.clear()
