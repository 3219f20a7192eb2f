"""How long a run takes: the plan of a run with a time budget, and the projection of one without.

`TimeBudget` plans the last step of a run with a time budget (`time_budget` in a recipe): after
every step it re-plans it from the median time of the recent steps, so that the run (and its LR
schedule, `gpt1.train.schedule.BudgetSchedule`, which follows the plan) ends when the budget is
spent, whatever the machine's load does meanwhile. What the run does after its last step (its
last validation, its final checkpoint, loss.png) is kept out of the steps' time, validations and
checkpoints are charged but never taken for a step's time, and a pause (Ctrl-Z, SIGSTOP, a
debugger) is not charged. The training loop (`gpt1.train.loop`) calls `plan` after each step and
saves `step_time` and `spent` in its checkpoints, so that a resumed run goes on with its budget.

`RunRate` is what a run without a time budget prints instead: its projected wall time, once the
step rate settles, and revised once where validations and checkpoints moved it.
`duration` writes seconds as the loop's messages say them (`80 s`, `60 min`, `47.0 h`, `300.0 days`).
"""

from __future__ import annotations

import bisect
import collections
import statistics
import time

from gpt1.core.progress import info, warn
from gpt1.train import distributed

# A time budget's guesses for the run's end before it has timed a checkpoint (`TimeBudget.reserve`):
# a checkpoint writes the trainable weights about four times (the checkpoint's copy, the optimizer's
# two moments, the run dir's model) at SAVE_RATE bytes/s (tiny-cpu's 30 MB took 0.06 s on 2 cores);
# loss.png, drawn after the final one, PLOT_SECONDS (matplotlib's import and a drawing: 1.0 to 1.9 s
# on 2 busy cores, 0.7 s with matplotlib imported).
SAVE_RATE, PLOT_SECONDS = 500e6, 1.0


class TimeBudget:
    """The last step of a run with a time budget: re-planned after every step from the time per
    step measured over the recent steps, so that the run (and its LR schedule) ends when the
    budget is spent, whatever the machine's load does meanwhile.

    A step's time is the *median* of the recent steps' own times (the last `eval_every`, at least
    20 and at most MEDIAN_STEPS), so that one slow step does not shrink the plan (the mean over a
    50-step window took a 5 s stall for a slower machine and cut a cosine by 45% in one step); the
    validations and checkpoints (`timed`) of the last `eval_every` steps (at least 20) are added,
    spread over those steps. The run's last validation and its final checkpoint (`reserve`) are kept
    out of the time the steps plan on: they come after the last step, and a 30 s run whose steps
    ended on time took 37 s with them. A step far slower than the median held a pause: the process
    was stopped (Ctrl-Z, SIGSTOP, a debugger); before the median is measured, a step far slower than
    the fastest step this process took before it (a stop in the first steps was charged in full and
    ended a 20 s run at its 10-step minimum). The pause is not charged, as neither a suspended machine
    (the monotonic clock stops then) nor the downtime between a kill and a resume is: charged, a 30 s
    pause ended a 20 s run at once, at the peak LR. A machine that runs slowly (a busy neighbour)
    slows every step and moves the median: that is charged."""

    WARMUP_STEPS = 3  # the first steps of a process (allocator, kernel selection, compilation) are not timed
    ROBUST_STEPS = 5  # timed steps before the plan (and the pause check) follows their median
    MIN_STEPS = 10  # whatever the budget: a loss curve, not a point
    OVERRUN = 0.05  # the share of the budget a run may go over to finish its schedule (see plan)
    # A step held a pause when it took PAUSE_FACTOR times the median and PAUSE_SECONDS more: the
    # slow steps of a running process (a neighbour's burst, page faults, a thread-count probe)
    # stay under both, and validations and checkpoints are timed apart (`timed`).
    PAUSE_FACTOR, PAUSE_SECONDS = 10.0, 5.0
    # Before the median: EARLY_PAUSE_FACTOR times the fastest step this process took before it (its
    # first one, which may compile, has none), and PAUSE_SECONDS more. Wider than the median's: the
    # first steps of a process vary more (allocation, kernel selection; the thread tuner's first probes).
    EARLY_PAUSE_FACTOR = 20.0
    # The most recent steps the median is taken over: enough for a steady value, and a plan a step
    # stays cheap (a median over eval_every = 1M steps took 236 ms a step).
    MEDIAN_STEPS = 1000

    def __init__(self, seconds: float, spent_before: float, max_steps: int, eval_every: int, cooldown: float = 0.0,
                 clock=time.perf_counter, end: int | None = None, step_time: float | None = None,
                 validation_steps: float = 0.0, save_seconds: float = 0.0, plot_seconds: float = 0.0):
        self.seconds, self.spent_before, self.max_steps, self.clock = seconds, spent_before, max_steps, clock
        # What the run's end adds after its last step (`reserve`), until a validation and a checkpoint
        # have been timed (`timed`): a validation of `validation_steps` steps' time, a checkpoint of
        # `save_seconds`; and loss.png, drawn after the final one, `plot_seconds` (never timed before
        # the end), at most OVERRUN of the budget: a guess does not cut a short budget's plan by more
        # than the overrun it allows.
        self.guess = {"validation": validation_steps, "checkpoint": save_seconds}
        self.plot_seconds = min(plot_seconds, self.OVERRUN * seconds)
        self.took: dict[str, float] = {}  # seconds of the latest validation and checkpoint
        end = max_steps if end is None else end
        self.cooldown = cooldown
        # The time left is the cooldown's share of the budget (updated by plan()).
        self.cooldown_due = cooldown > 0 and seconds - spent_before <= cooldown * seconds
        self.started = self.clock()
        self.paused = 0.0  # seconds of the pauses found in this process: not charged
        self.aside = 0.0  # seconds of validations and checkpoints since the latest plan (see timed)
        # The median step time (validations and checkpoints aside): measured, else the one the
        # checkpoint of a resumed run recorded (its steps left after the budget may still fit).
        self.step_time: float | None = step_time
        self.per_step: float | None = None  # seconds a step, validations and checkpoints included
        # The plan the LR warmup follows (BudgetSchedule.at's warm_end): the plan itself, now that
        # a stall in the first timed steps no longer sways it (their mean once shrank a 600-step
        # plan to 60 and ended the warmup at step 4).
        self.warm_end = end
        self.first: int | None = None  # the first step this process took
        self.fastest: float | None = None  # seconds a step, the fastest since it (the early pause check's reference)
        self.last: tuple[int, float] | None = None  # (steps done, clock) at the latest plan
        # The recent plans' seconds a step (validations and checkpoints aside), in order and sorted.
        self.times: collections.deque[float] = collections.deque(maxlen=max(20, min(eval_every, self.MEDIAN_STEPS)))
        self.sorted_times: list[float] = []
        self.spread = _Spread(max(20, eval_every))  # validations and checkpoints over a validation's interval
        self.cut = False  # the plan was cut to the steps that fit in the overrun (said once)

    def spent(self) -> float:
        return self.spent_before + self.clock() - self.started - self.paused

    def timed(self, seconds: float, kind: str | None = None) -> None:
        """A validation pass or a checkpoint (`kind`: "validation", "checkpoint") took `seconds`:
        charged, but not a step's time. The latest of each kind is what the run's last is planned to take."""
        self.aside += seconds
        if kind:
            self.took[kind] = seconds

    def reserve(self) -> float:
        """The seconds kept for what the run does after its last step: its last validation and its
        final checkpoint (each as long as the latest took, else guessed) and loss.png."""
        validation = self.took.get("validation", self.guess["validation"] * (self.step_time or 0.0))
        return validation + self.took.get("checkpoint", self.guess["checkpoint"]) + self.plot_seconds

    def _median(self) -> float:
        times, middle = self.sorted_times, len(self.sorted_times) // 2
        return times[middle] if len(times) % 2 else (times[middle - 1] + times[middle]) / 2  # as statistics.median

    def _add(self, steps: int, work: float, aside: float) -> None:
        if len(self.times) == self.times.maxlen:  # its oldest time leaves the window
            del self.sorted_times[bisect.bisect_left(self.sorted_times, self.times[0])]
        self.times.append(work / steps)
        bisect.insort(self.sorted_times, work / steps)
        self.spread.add(steps, aside)

    def _record(self, done: int, now: float, dist) -> None:
        """Times the steps since the latest plan (from the process's fourth on); a pause among them is
        not charged (from its third on: its first holds the setup, its second is the first reference)."""
        self.first = done if self.first is None else self.first
        if self.last is not None:
            steps, work = done - self.last[0], now - self.last[1] - self.aside
            if len(self.times) >= self.ROBUST_STEPS:
                usual, factor = self._median(), self.PAUSE_FACTOR
            else:
                usual, factor = self.fastest, self.EARLY_PAUSE_FACTOR
            if usual is not None and work > steps * max(factor * usual, usual + self.PAUSE_SECONDS):
                pause = work - steps * usual  # the steps are charged their usual time
                self.paused += pause
                work -= pause
                if dist.is_main:
                    info(f"step {done:,}: paused for ~{pause:.0f} s: not counted against the time budget")
            self.fastest = work / steps if self.fastest is None else min(work / steps, self.fastest)
            if self.last[0] - self.first + 1 >= self.WARMUP_STEPS:
                self._add(steps, work, self.aside)
        self.last, self.aside = (done, now), 0.0

    def plan(self, done: int, end: int, dist) -> int:
        self._record(done, self.clock(), dist)
        left = self.seconds - self.spent() - self.reserve()  # the steps' time: the run's end comes after them
        floor = min(self.max_steps, max(done, self.MIN_STEPS))
        measured = len(self.times) >= self.ROBUST_STEPS
        if measured:
            self.step_time = self._median()
            self.per_step = self.step_time + self.spread.per_step()
        if left <= 0:
            # Out of time. The steps left of the plan still run if they fit in OVERRUN of the
            # budget (a validation pass or a checkpoint near the end took longer than planned):
            # stopping now would leave the LR above min_lr, at the peak under warmup-stable-decay.
            # A plan that does not fit is cut to the steps that do (two at least), so that the
            # schedule still ends at min_lr, on a shorter decay.
            short = end - done
            fit = int(self.OVERRUN * self.seconds / self.step_time) if self.step_time else 0
            fitting = min(end, done + max(2, fit))
            new_end = max(floor, fitting)
            if new_end < end and not self.cut and dist.is_main:
                # Name what decided the steps left: the overrun, or the minimum run length (its
                # steps may take far longer than the overrun; "fit in 5% more time" hid a 12x overrun).
                why = (f"that fit in {self.OVERRUN:.0%} more time" if new_end == fitting else
                       f"left of the minimum of {self.MIN_STEPS} steps a run takes, whatever its time budget")
                warn(f"step {done:,}: the time budget ran out {short:,} steps before the planned end; the LR "
                     f"decays to min_lr over the {new_end - done:,} steps {why}")
            self.cut = self.cut or new_end < end
        elif not measured:
            new_end = end
        else:
            new_end = max(floor, min(self.max_steps, done + max(1, int(left / self.per_step))))
        due = self.cooldown > 0 and left <= self.cooldown * self.seconds
        # Every rank must stop at the same step, on the same rate: rank 0's plan is the plan.
        if dist.enabled:
            new_end, due = distributed.broadcast_object((new_end, due))
        self.cooldown_due, self.warm_end = bool(due), int(new_end)
        return int(new_end)


class _Spread:
    """The seconds of validations and checkpoints a step over the last `size` plans. A plan of
    one step with none (nearly every one) is counted, not kept: a window of eval_every = 1M
    steps holds a few entries, not a million."""

    def __init__(self, size: int):
        self.size, self.plans = size, 0
        self.kept: collections.deque[tuple[int, int, float]] = collections.deque()  # (plan number, steps, seconds)

    def add(self, steps: int, seconds: float) -> None:
        self.plans += 1
        if steps != 1 or seconds:
            self.kept.append((self.plans, steps, seconds))
        while self.kept and self.kept[0][0] <= self.plans - self.size:
            self.kept.popleft()

    def per_step(self) -> float:
        # Summed afresh, in order, over the few kept: a running float sum drifts as entries leave.
        steps = min(self.plans, self.size) + sum(n - 1 for _, n, _ in self.kept)
        return sum(seconds for _, _, seconds in self.kept) / steps


class RunRate:
    """Prints the projected wall time of the whole run: the time per step, measured over
    SETTLE_STEPS steps once the first WARMUP_STEPS (compilation, allocator warm-up) are behind it,
    plus each validation and checkpoint of the run at the time the latest one took. Printed once
    the step rate settles, where validations and checkpoints (every 2,000 steps in the card's
    recipe) have usually not run yet: the line says what it counts, and once both have run a
    revised line follows if the projection moved by more than REVISE. Two lines at most. The
    revision takes the time per step afresh, the median of the steps since the first line (the
    last MEDIAN_STEPS of them; validations and checkpoints aside, and a pause, Ctrl-Z, is one
    step's outlier): a machine that slowed down since was projected at its first speed (2 min for
    a run of 310 s). Its whole run is the time so far and the projection of the steps left."""

    WARMUP_STEPS = 3
    SETTLE_STEPS = 10
    REVISE = 0.1
    MEDIAN_STEPS = 1000

    def __init__(self, start_step: int, max_steps: int, eval_every: int, save_every: int):
        self.start_step, self.max_steps = start_step, max_steps
        self.every = {"validation": eval_every, "checkpoint": save_every}
        self.took: dict[str, float] = {}  # seconds of the latest validation pass and checkpoint
        self.started = time.perf_counter()
        self.since: tuple[int, float] | None = None
        self.paused = 0.0  # seconds of validations and checkpoints since `since`: not step time
        self.per_step: float | None = None
        # Seconds of each step since the first line (to the latest `step_done`), validations and
        # checkpoints aside: the revision's rate.
        self.steps: collections.deque[float] = collections.deque(maxlen=self.MEDIAN_STEPS)
        self.latest: tuple[int, float, float] | None = None  # (done, clock, paused) at the latest step_done
        self.projected: float | None = None  # the printed projection of the whole run
        self.final = False  # the projection counts validations and checkpoints: no revision to come

    def timed(self, kind: str, seconds: float) -> None:
        """A validation pass or checkpoint ("validation", "checkpoint") took `seconds`."""
        self.took[kind] = seconds
        self.paused += seconds

    def step_done(self, done: int) -> None:
        if self.final:
            return
        now = time.perf_counter()
        if self.per_step is not None:
            last, then, paused = self.latest
            self.steps.append((now - then - (self.paused - paused)) / (done - last))
        if done - self.start_step == self.WARMUP_STEPS:
            self.since, self.paused = (done, now), 0.0
        elif self.per_step is None and self.since and done - self.since[0] >= self.SETTLE_STEPS:
            self.per_step = (now - self.since[1] - self.paused) / (done - self.since[0])
            self.report(done, first=True, now=now)
        elif self.per_step is not None and len(self.took) == len(self.every) and done < self.max_steps:
            self.per_step = statistics.median(self.steps)
            self.report(done, first=False, now=now)
        self.latest = (done, now, self.paused)

    def seconds(self, after: int) -> float:
        """The projected seconds of the steps after step `after`, with their validations and checkpoints."""
        return (self.max_steps - after) * self.per_step + sum(
            took * _due_after(after, self.max_steps, self.every[kind]) for kind, took in self.took.items())

    def report(self, done: int, first: bool, now: float) -> None:
        left = self.seconds(done)
        total = self.seconds(self.start_step) if first else now - self.started + left
        self.final = len(self.took) == len(self.every)
        if not first and abs(total - self.projected) <= self.REVISE * self.projected:
            return
        self.projected = total
        counts = {(True, True): "validation and checkpoints included",
                  (True, False): "validation included; no checkpoint has run yet",
                  (False, True): "checkpoints included; no validation has run yet",
                  (False, False): "steps only: no validation or checkpoint has run yet"}
        info(f"projected wall time{'' if first else ', revised'}: {duration(total)} for "
             f"{self.max_steps - self.start_step:,} steps at {self.per_step:.3g} s/step "
             f"({counts['validation' in self.took, 'checkpoint' in self.took]}); {duration(left)} to go")


def _due_after(after: int, last: int, every: int) -> int:
    """How many of the steps after `after`, up to `last`, are multiples of `every` or `last` itself."""
    return last // every - after // every + (last % every != 0) if last > after else 0


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"  # 300 days read "7200.0 h"
