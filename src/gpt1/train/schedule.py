"""Learning-rate schedule: linear warmup, then cosine decay to a floor (GPT-2/3, nanoGPT)."""

from __future__ import annotations

import math


def warmup_steps(max_steps: int, warmup: float) -> int:
    """Steps of linear warmup for a warmup fraction (at least one when warmup > 0)."""
    return max(1, round(warmup * max_steps)) if warmup > 0 else 0


def lr_at(step: int, max_steps: int, lr: float, min_lr: float, warmup: float) -> float:
    """The learning rate of optimizer step `step` (0-based) of `max_steps`.

    Warmup rises linearly to `lr`, reached at the last warmup step (step 0 already gets
    lr / warmup_steps, not 0, so no step is wasted); then a half cosine falls from `lr`
    to exactly `min_lr` at the last step.
    """
    n_warm = warmup_steps(max_steps, warmup)
    if step < n_warm:
        return lr * (step + 1) / n_warm
    decay_steps = max_steps - 1 - n_warm
    if decay_steps <= 0:
        return lr
    progress = min(1.0, (step - n_warm) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
