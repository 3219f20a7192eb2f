"""Steps the loop skips, and the errors that stop a run whose steps keep being skipped.

A step whose loss or gradient norm is not finite is skipped (`why_skipped`): its gradients are
dropped, the weights untouched. `cfg.max_bad_steps` consecutive skipped steps stop the run (a
resumed run counts on from its checkpoint's; `bad_steps_error`); fp16-mixed's overflows (skipped
by the GradScaler, which halves its loss scale for each; a NaN/inf loss, not the scale's doing,
leaves it as it is) stop it once its loss scale falls below 1 (`loss_scale_error`). The loop
(`gpt1.train.loop`) keeps the counts; this module says what went wrong and what to do.
"""

from __future__ import annotations

import math
from pathlib import Path

from gpt1.core.errors import Gpt1Error
from gpt1.train import checkpoint as ckpt
from gpt1.train import distributed


def why_skipped(loss: float, grad_norm: float, fp16: bool) -> str | None:
    """Why a step is skipped: its loss or gradient norm is NaN/inf (applied, the clip would scale
    every gradient by max_norm/NaN and the update turn every weight into NaN); None if it is not.
    (The loss is all-reduced, as DDP's gradients are: every rank skips alike.) In fp16-mixed a
    non-finite gradient is the GradScaler's overflow: `scaler.step` skips it (`_Run.optimizer_step`)."""
    if not math.isfinite(loss):
        return "non-finite loss"
    return "non-finite gradient" if not math.isfinite(grad_norm) and not fp16 else None


def what_was_not_finite(skipped: str) -> str:
    """What was not finite at a step `why_skipped` skipped, as the messages name it."""
    return "loss" if skipped == "non-finite loss" else "gradient norm"


def bad_steps_error(what: str, run_dir: Path, precision: str) -> Gpt1Error:
    """The error that stops a run whose steps keep being skipped (NaN/inf), with advice that fits its precision."""
    good = ckpt.latest_checkpoint(run_dir)
    advice = "Lower lr, try bf16-mixed instead of fp16-mixed, or check the data." if precision == "fp16-mixed" else \
        "Lower lr, or check the data."
    # The numbers it stops on are all-reduced: every rank stops here.
    return distributed.same_on_every_rank(
        f"{what}; stopped. The last good checkpoint is {good or 'none (no checkpoint was saved yet)'}. {advice}")


def loss_scale_error(done: int, scale: float, overflow: bool, fall: dict | None, backoff_factor: float | None,
                     run_dir: Path, precision: str) -> Gpt1Error:
    """fp16-mixed: the error that stops a run whose loss scale, as updated after step `done` (an
    `overflow` or a NaN loss), is below 1, as DeepSpeed stops at its minimum scale: gradients that
    stay NaN/inf however small the scale are not an overflow. It says what brought it there: the
    overflows since it last grew (`fall`: the first's step, how many, the scale the latest left;
    `backoff_factor`: what each overflow multiplied it by)."""
    if not overflow:  # a NaN loss leaves the scale as it is: this one comes from an older gpt1's checkpoint
        what = f"the fp16 loss scale was {scale:g} at step {done:,}"
    elif (overflows := fall["overflows"]) == (steps := done - fall["step"] + 1):
        what = (f"the gradient norm was NaN/inf for {overflows} consecutive steps (last at step {done:,}) "
                f"although the fp16 loss scale fell to {scale:g}")
    else:
        start = scale / backoff_factor ** overflows
        what = (f"{overflows} fp16 overflows (a NaN/inf gradient norm) in the last {steps:,} steps (last at "
                f"step {done:,}) brought the loss scale from {start:g} to {scale:g}")
    return bad_steps_error(what, run_dir, precision)


class SkippedSteps:
    """The run's skipped steps as its checkpoints keep them: how many in a row (`count`), and in
    fp16-mixed the overflows since the loss scale last grew (`scale_fall`: the first's step, how
    many, and the scale the latest left; None before the first). Each skip may stop the run."""

    def __init__(self, max_bad_steps: int, run_dir: Path, precision: str):
        self.max_bad_steps, self.run_dir, self.precision = max_bad_steps, run_dir, precision
        self.count = 0
        self.scale_fall: dict | None = None

    def state_dict(self) -> dict:
        return {"bad_steps": self.count, "scale_fall": dict(self.scale_fall) if self.scale_fall else None}

    def load_state_dict(self, state: dict) -> None:
        # A run killed inside a stretch of skipped steps stops where an uninterrupted one does (reset
        # to 0, it went on max_bad_steps more); an older gpt1's checkpoint has neither.
        self.count, self.scale_fall = state.get("bad_steps", 0), state.get("scale_fall")

    def applied(self) -> None:
        """A step changed the weights: the stretch of skipped steps is over."""
        self.count = 0

    def skipped(self, done: int, why: str, end: int, scale: float | None) -> None:
        """Step `done` (of a run that ends at `end`) was skipped, `why` (see `why_skipped`); `scale`:
        fp16-mixed's loss scale, left as it was. Stops the run after `max_bad_steps` in a row, or where
        it ends skipping."""
        self.count += 1
        if scale is not None:
            self._stop_below_1(done, scale, overflow=False)
        what = what_was_not_finite(why)
        if self.count >= self.max_bad_steps:
            raise bad_steps_error(f"the {what} was NaN/inf for {self.count} consecutive steps "
                                  f"(last at step {done:,})", self.run_dir, self.precision)
        if done == end and self.count >= max(1, done // 2):
            # A run shorter than max_bad_steps that ends skipping (all of it, or its second
            # half) has no model worth writing: it "finished" with exit 0 on garbage weights. Its
            # steps since step 0, as bad_steps counts across a resume: counted from this process's
            # start, a run resumed just before its last step (skipped) failed where one run straight finished.
            raise bad_steps_error(f"the {what} was NaN/inf for the last {self.count} of the run's "
                                  f"{done:,} steps", self.run_dir, self.precision)

    def overflowed(self, done: int, scale: float, backoff_factor: float) -> None:
        """fp16-mixed: step `done`'s gradients overflowed, and the GradScaler skipped it and lowered
        its loss `scale` (by `backoff_factor`). Stops the run once the scale is below 1."""
        self.count += 1
        fall = self.scale_fall
        if fall is None or scale >= fall["scale"]:  # the first overflow, or the scale grew since the last
            fall = {"step": done, "overflows": 0}
        self.scale_fall = {**fall, "overflows": fall["overflows"] + 1, "scale": scale}
        self._stop_below_1(done, scale, overflow=True, backoff_factor=backoff_factor)

    def _stop_below_1(self, done: int, scale: float, overflow: bool, backoff_factor: float | None = None) -> None:
        if scale < 1.0:
            raise loss_scale_error(done, scale, overflow, self.scale_fall, backoff_factor, self.run_dir, self.precision)
