"""Learning-rate schedules: linear warmup, then either a cosine decay to a floor (GPT-2/3,
nanoGPT; the default) or warmup-stable-decay: constant, then a linear cooldown to the floor
over the last steps (MiniCPM, modded-nanogpt; `cooldown` > 0)."""

from __future__ import annotations

import math


def warmup_steps(max_steps: int, warmup: float) -> int:
    """Steps of linear warmup for a warmup fraction (at least one when warmup > 0)."""
    return max(1, round(warmup * max_steps)) if warmup > 0 else 0


def lr_at(step: int, max_steps: int, lr: float, min_lr: float, warmup: float, cooldown: float = 0.0) -> float:
    """The learning rate of optimizer step `step` (0-based) of `max_steps`.

    Warmup rises linearly to `lr`, reached at the last warmup step (step 0 already gets
    lr / warmup_steps, not 0, so no step is wasted). Then, with `cooldown` 0, a half cosine
    falls from `lr` to exactly `min_lr` at the last step; with `cooldown` > 0 the rate stays
    at `lr` until the last `cooldown` fraction of the steps, which fall linearly to exactly
    `min_lr`. A time budget re-plans `max_steps` as the run goes: under a cooldown only the
    cooldown's steps depend on the plan, under the cosine every step does.
    """
    n_warm = warmup_steps(max_steps, warmup)
    if step < n_warm:
        return lr * (step + 1) / n_warm
    if cooldown > 0:
        decay_start = max(n_warm, max_steps - 1 - max(1, round(cooldown * max_steps)))
        if step <= decay_start:
            return lr
        return lr + min(1.0, (step - decay_start) / (max_steps - 1 - decay_start)) * (min_lr - lr)
    decay_steps = max_steps - 1 - n_warm
    if decay_steps <= 0:
        return lr
    progress = min(1.0, (step - n_warm) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
