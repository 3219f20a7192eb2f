"""Learning-rate schedules: linear warmup, then either a cosine decay to a floor (GPT-2/3,
nanoGPT; the default) or warmup-stable-decay: constant, then a linear cooldown to the floor
over the last steps (MiniCPM, modded-nanogpt; `cooldown` > 0)."""

from __future__ import annotations

import math


def warmup_steps(max_steps: int, warmup: float) -> int:
    """Steps of linear warmup for a warmup fraction: at least one when warmup > 0, and at most
    all but the last step, which is the decay's end (`min_lr`). A run of one step has none."""
    if warmup <= 0 or max_steps <= 1:
        return 0
    # round(0.95 * 10) = 10 made every step warmup: the run ended at the peak, never decayed.
    return min(max(1, round(warmup * max_steps)), max_steps - 1)


def lr_at(step: int, max_steps: int, lr: float, min_lr: float, warmup: float, cooldown: float = 0.0) -> float:
    """The learning rate of optimizer step `step` (0-based) of `max_steps`.

    Warmup rises linearly to `lr`, reached at the last warmup step (step 0 already gets
    lr / warmup_steps, not 0, so no step is wasted). Then, with `cooldown` 0, a half cosine
    falls from `lr` to exactly `min_lr` at the last step; with `cooldown` > 0 the rate stays
    at `lr` until the last `cooldown` fraction of the steps, which fall linearly to exactly
    `min_lr`. A time budget re-plans `max_steps` as the run goes: under a cooldown only the
    cooldown's steps depend on the plan, under the cosine every step does.

    The edges: the warmup takes at most all but the last step (`warmup_steps`), so a run of two
    or more steps always ends at `min_lr` (one whose warmup takes all but the last step falls from
    `lr` to `min_lr` at its last step); a run of one step takes it at `lr`, as transformers'
    get_cosine_schedule_with_warmup and nanoGPT's get_lr do at step 0 (it has no decay).
    """
    if max_steps <= 1:
        return lr
    n_warm = warmup_steps(max_steps, warmup)
    if step < n_warm:
        return lr * (step + 1) / n_warm
    if cooldown > 0:
        # At most the step before the last: the last one is min_lr even after a warmup of all the others.
        decay_start = min(max_steps - 2, max(n_warm, max_steps - 1 - max(1, round(cooldown * max_steps))))
        if step <= decay_start:
            return lr
        if step >= max_steps - 1:  # exactly: lr + 1.0 * (min_lr - lr) rounds (3e-4 to 1e-6 ended at 1.0000000000000243e-06)
            return min_lr
        return lr + (step - decay_start) / (max_steps - 1 - decay_start) * (min_lr - lr)
    return _cosine(step, n_warm, max_steps, lr, min_lr)


def _cosine(step: int, start: int, end: int, lr: float, min_lr: float) -> float:
    """The half cosine from `lr` at step `start` to exactly `min_lr` at the last step `end - 1`;
    one that starts at the last step is its end (`min_lr`), unless the run has one step (`lr`)."""
    if end <= 1:
        return lr
    if start >= end - 1:
        return min_lr
    progress = min(1.0, (step - start) / (end - 1 - start))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


class BudgetSchedule:
    """The learning rate of a run with a time budget, whose last step is re-planned after every
    step (`gpt1.train.loop`). Under load the plan swings, and `lr_at` on a moving plan swings with
    it: a plan that grows raises a cosine's rate again; a plan that shrinks early (a slow spell)
    starts the cooldown, and one that grows again stops it. So here, once the warmup is over, the
    rate never rises:

    - warmup-stable-decay holds `lr` until the cooldown is due (its share of the budget's *time*
      is what is left, or a run capped by max_steps reaches it by steps), then falls linearly from
      wherever it is to `min_lr` at the planned last step, re-aimed at every re-plan;
    - the cosine falls from `lr` at the step after the warmup to `min_lr` at the planned last
      step, but never above the step before.

    The warmup rises from the last rate to `lr` in equal steps ending at its planned last step,
    re-aimed at every re-plan, so that a plan that grows or shrinks bends it but never makes it
    jump or fall back: no step rises more than `MAX_RISE` times the rate before or `MAX_RISE`
    times the plan's own warmup slope (`lr` / its warmup steps), whichever allows more. (The first
    plan, made after a few timed steps, once jumped it ~250x; a first measured plan whose warmup
    was already over, 12.5x to `lr` in one step.) A plan that shrinks past the warmup's end leaves
    the rate below `lr`: it goes on rising, doubling at most, until it reaches `lr` a few steps
    later, unless the plan ends first (its last step is the decay's end, `min_lr`, all the same).

    On a steady machine this is `lr_at` to within rounding. Its state (the last rate, whether
    the warmup and the cooldown began, where the cosine began) goes into checkpoints, so a
    resumed run goes on from it.
    """

    MAX_RISE = 2.0  # a warmup step rises at most this times the rate before, or the plan's slope (see `at`)

    def __init__(self, lr: float, min_lr: float, warmup: float, cooldown: float, state: dict | None = None):
        self.lr, self.min_lr, self.warmup, self.cooldown = lr, min_lr, warmup, cooldown
        state = state or {}
        self.previous: float | None = state.get("lr")
        self.warmed: bool = state.get("warmed", False)
        self.cooling: bool = state.get("cooling", False)
        # The first step after the warmup: the cosine's start (None from a state saved before it was).
        self.decay_start: int | None = state.get("decay_start")

    def at(self, step: int, end: int, cooldown_due: bool, warm_end: int | None = None) -> float:
        """The rate of step `step` (0-based) when the run is planned to end after step `end` - 1;
        `cooldown_due` says the budget's time left is the cooldown's share (ignored by the cosine).
        The warmup's length is `warmup` of `warm_end` (default `end`): a plan less swayed by a
        short slow spell than `end` is (see gpt1.train.budget.TimeBudget)."""
        n_warm = warmup_steps(end if warm_end is None else warm_end, self.warmup)
        # Below lr past the warmup's planned end (the plan shrank past it): the warmup goes on,
        # but not at the plan's last step, which is the decay's end.
        behind = self.previous is not None and self.previous < self.lr and step < end - 1
        if not self.warmed and (step < n_warm or behind):
            start = 0.0 if self.previous is None else self.previous
            # lr exactly at step n_warm - 1 (or at once, past it): a rate an ulp short would be `behind`.
            rate = self.lr if n_warm - step <= 1 else start + (self.lr - start) / (n_warm - step)
            # The slope's bound lets the first measured plan bend the tiny rates of a long first plan
            # onto its own line (37x in one step, on its slope); the ratio's keeps a plan whose warmup
            # ends a step or two from here, or is over, from lifting the rate to lr at once.
            slope = self.lr / n_warm if step < n_warm else 0.0
            rate = min(rate, max(self.MAX_RISE * start, start + self.MAX_RISE * slope))
        else:
            if not self.warmed:  # the rates below start from the peak, not from a warmup's rate
                self.warmed, self.previous, self.decay_start = True, None, step
            if self.cooldown > 0:
                self.cooling = self.cooling or cooldown_due
                if not self.cooling:
                    rate = self.lr
                else:  # linear from the last rate to min_lr at the last planned step
                    start = self.lr if self.previous is None else self.previous
                    rate = start + (self.min_lr - start) / max(1, end - step)
                    # Exactly min_lr at the end, and never a rise by float rounding (start + (min_lr -
                    # start) / 1 can fall one ulp short, and the next step's then lands on min_lr).
                    rate = min(start, max(self.min_lr, rate))
            else:
                start = warmup_steps(end, self.warmup) if self.decay_start is None else self.decay_start
                rate = _cosine(max(step, start), start, end, self.lr, self.min_lr)
                if self.previous is not None:
                    rate = min(rate, self.previous)
        self.previous = rate
        return rate

    def in_planned_cooldown(self, step: int, end: int) -> bool:
        """Whether `step` lies in the cooldown of a plan ending at `end`: the cooldown by steps,
        for a plan that is exact (capped by max_steps rather than by the time)."""
        past_warmup = step >= warmup_steps(end, self.warmup)
        return past_warmup and lr_at(step, end, self.lr, self.min_lr, self.warmup, self.cooldown) < self.lr

    def state_dict(self) -> dict:
        return {"lr": self.previous, "warmed": self.warmed, "cooling": self.cooling, "decay_start": self.decay_start}

    @staticmethod
    def state_from_rate(lr: float, warmup: float, step: int, end: int, last_rate: float) -> dict:
        """The state to resume with from a checkpoint that has none (saved before 2026-12-05,
        ef57fb6), from what it has: `step` steps done of a plan ending at `end`, the last at
        `last_rate` (the optimizer's saved lr, less a group's lr_scale). Without it the cooldown
        would begin again at the peak: here it goes on from `last_rate`, as a state saved then would."""
        warmed = step > warmup_steps(end, warmup)  # the last step done was past the warmup
        # Below the peak after the warmup: the cooldown had begun (the rounding of lr x lr_scale / lr_scale aside).
        return {"lr": last_rate, "warmed": warmed, "cooling": warmed and last_rate < lr * (1 - 1e-6),
                "decay_start": warmup_steps(end, warmup) if warmed else None}
