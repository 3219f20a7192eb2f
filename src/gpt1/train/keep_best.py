"""RUN/best: the model of the lowest validation loss, kept beside the run (`cfg.keep_best`).

The training loop (`gpt1.train.loop`) keeps the lowest validation loss so far and its step in its
trainer state and adds them to each validation's metrics (`best_val_loss`, `best_step`); with
`cfg.keep_best`, each validation that lowers it writes `save_model`'s files into `RUN/best`
(whole or not at all: `BEST_DIR`), with `best.json`: the step and loss it holds. A resume removes
a `RUN/best` of a step past its checkpoint's (written by the attempt that stopped after it, whose
steps the resume trains again), and says so: the next validation below the lowest writes it again.
With `cfg.early_stop` = N, N validations in a row that do not lower it end the run at that step.
`LowestValidation` is that state, as the loop holds it (and its checkpoints keep it); the free
functions are RUN/best's files, `lowest` the `{"step", "val_loss"}` they hold.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Callable

import torch

from gpt1.core.atomic import atomic_dir, write_json
from gpt1.core.errors import Gpt1Error
from gpt1.core.progress import info, warn
from gpt1.core.reading import read_json
from gpt1.train import distributed
from gpt1.train.config import TrainConfig
from gpt1.train.run_log import fmt
from gpt1.train.run_record import CONFIG_FILE, RunRecord

BEST_DIR = "best"  # RUN/best: the model of the lowest validation loss (keep_best=true)
BEST_RECORD = "best.json"  # in RUN/best: the step and validation loss of the model it holds


def best_held(best: Path) -> dict | None:
    """The step and validation loss of the model in RUN/best, from its `best.json`; None where there is
    no RUN/best, or one without a readable record (an older gpt1's)."""
    try:
        held = read_json(best / BEST_RECORD) if (best / BEST_RECORD).is_file() else None
    except Gpt1Error:
        return None
    ok = isinstance(held, dict) and isinstance(held.get("step"), int) and isinstance(held.get("val_loss"), (int, float))
    return {"step": held["step"], "val_loss": held["val_loss"]} if ok else None


def save_best(run_dir: Path, save_model: Callable[[Path, torch.nn.Module], None], model: torch.nn.Module,
              lowest: dict) -> None:
    """RUN/best: `save_model`'s files of the model as it is now, replacing the earlier best whole,
    with the run's train_config.json (`gpt1 eval --chat RUN/best` holds out what the run held out)."""
    # The run's own folder: a file another process put there (eval's report.md) is dropped with
    # a warning, never a reason to stop the run (it ended a keep_best run before its first checkpoint).
    with atomic_dir(run_dir / BEST_DIR, owned=True) as tmp:
        save_model(tmp, model)
        shutil.copyfile(run_dir / CONFIG_FILE, tmp / CONFIG_FILE)
        write_json(tmp / BEST_RECORD, lowest)  # which step it holds: a resume tells a later attempt's apart


def drop_later_best(run_dir: Path, start_step: int, lowest: dict, keep_best: bool) -> None:
    """Rank 0: remove a RUN/best that this run's checkpoint did not see written: the model of a
    validation after the checkpoint (its `best.json` says which step), by the attempt that stopped
    there, whose steps this one trains anew; kept, it stayed as the best (a run that validated at
    other steps, or turned keep_best off, never replaced it) and the run named another step's.
    A fresh start's RUN/best is an attempt's stopped before its first checkpoint. Said in one line
    on a resume, where the next validation below the lowest writes it again (with keep_best)."""
    best = run_dir / BEST_DIR
    held = best_held(best)
    if start_step and (held is None or held["step"] <= start_step):
        return  # an older gpt1's best/ (no best.json) cannot tell: it stays
    if not best.is_dir():
        return
    if best.is_symlink():  # a link the user made (to a folder in RUN): what it names, then the link
        shutil.rmtree(best.resolve())  # (rmtree refuses a link; a dangling one would stop the next write)
        best.unlink()
    else:
        shutil.rmtree(best)
    if start_step:
        again = ("nothing writes it again (keep_best=false)" if not keep_best else
                 "the first validation of this run writes it" if lowest["val_loss"] is None else
                 f"a validation below {fmt(lowest['val_loss'])} (step {lowest['step']:,}'s) writes it again")
        info(f"removed {best}: it held step {held['step']:,}'s model (val loss {fmt(held['val_loss'])}), written after "
             f"the checkpoint this run resumes from (step {start_step:,}); {again}")


def warn_best_kept(run_dir: Path, record: RunRecord, start_step: int, lowest: dict) -> None:
    """keep_best turned off on this resume: RUN/best stays (the user's files), holding the model
    of the lowest validation loss while it was on, which no later validation replaces (the run's
    last line no longer names it). Said on the resume that turns it off, naming the step its
    `best.json` records (an older gpt1's best/ has none: the lowest as of the checkpoint)."""
    best = run_dir / BEST_DIR
    if not best.is_dir() or not record.settings_before(start_step).get("keep_best"):
        return
    held = best_held(best) or lowest  # an older gpt1's best/ has no record: the lowest as of the checkpoint
    step, loss = held["step"], held["val_loss"]
    which = f"step {step:,}'s model (val loss {fmt(loss)})" if step is not None else "an earlier model"
    warn(f"keep_best=false: {best} keeps {which}, the lowest while keep_best was on; later validations no "
         "longer replace it, even with a lower loss")


class LowestValidation:
    """The lowest validation loss so far and its step (`best`, None before the first), the
    validations since it (`since`, which early_stop counts), and with keep_best its model in
    RUN/best. Every rank keeps its own alike (the losses are all-reduced); rank 0 writes and logs."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, save_model: Callable[[Path, torch.nn.Module], None],
                 dist: distributed.DistInfo):
        self.run_dir, self.cfg, self.save_model, self.dist = run_dir, cfg, save_model, dist
        self.best: dict = {"step": None, "val_loss": None}
        self.since = 0

    def state_dict(self) -> dict:
        """What a checkpoint keeps of it (in the trainer state)."""
        return {"best": dict(self.best), "since_best": self.since}

    def load_state_dict(self, state: dict) -> None:
        # A checkpoint of an older gpt1 has no best: the next validation is the first.
        self.best, self.since = dict(state.get("best", self.best)), state.get("since_best", 0)

    def resume(self, start_step: int, record: RunRecord | None) -> None:
        """On a run's start or resume at `start_step`, before its steps: where this resume turns keep_best
        on after the lowest ran without it, the lowest starts over (`_starts_over`); a RUN/best the
        checkpoint did not see written is removed (`drop_later_best`); where this resume turns keep_best
        off, say what RUN/best keeps (`warn_best_kept`). `record`: train_config.json, rank 0's."""
        cfg, dist = self.cfg, self.dist
        if start_step and cfg.keep_best and self.best["step"] is not None:
            # train_config.json is rank 0's (`train`): its answer is every rank's, which reset alike.
            off = distributed.broadcast_object(
                not record.setting_at(self.best["step"], "keep_best") if dist.is_main else None)
            if off:
                self._starts_over(start_step)
        distributed.main_only(lambda: drop_later_best(self.run_dir, start_step, self.best, cfg.keep_best))
        if dist.is_main and start_step and not cfg.keep_best:
            warn_best_kept(self.run_dir, record, start_step, self.best)

    def _starts_over(self, start_step: int) -> None:
        """keep_best on at this resume, off when the lowest validation so far ran: its model is
        gone (where keep_best was on then, RUN/best holds it, and it stays the lowest). Kept as the
        lowest, no later validation above it would ever write RUN/best (and the run's last line
        would name a RUN/best that is not there). So the lowest starts over from here, early_stop's
        count with it, and the resume says so. Every rank resets alike."""
        step, loss = self.best["step"], self.best["val_loss"]
        self.best, self.since = {"step": None, "val_loss": None}, 0
        if self.dist.is_main:
            warn(f"keep_best=true from step {start_step:,}: step {step:,}'s val loss ({fmt(loss)}) was the "
                 f"lowest while keep_best was off, and its model was not kept; {self.run_dir / BEST_DIR} will hold "
                 "the lowest validation from here on"
                 + (f", and early_stop={self.cfg.early_stop} counts from here" if self.cfg.early_stop else ""))

    def validated(self, done: int, val_loss: float, model: torch.nn.Module) -> bool:
        """The validation after step `done` measured `val_loss`: whether it is the lowest so far, whose
        `model` keep_best then writes to RUN/best (a failed write, a full disk, stops every rank)."""
        improved = math.isfinite(val_loss) and (self.best["val_loss"] is None or val_loss < self.best["val_loss"])
        if improved:
            self.best, self.since = {"step": done, "val_loss": val_loss}, 0
            if self.cfg.keep_best:
                distributed.main_only(lambda: save_best(self.run_dir, self.save_model, model, self.best))
        else:
            self.since += 1
        return improved

    def words(self, improved: bool) -> str:
        """What a validation line adds where the run keeps its best or may stop early: where the best is."""
        cfg = self.cfg
        if not (cfg.keep_best or cfg.early_stop) or self.best["step"] is None:
            return ""
        if improved:
            return f"; the lowest so far{f', written to {self.run_dir / BEST_DIR}' if cfg.keep_best else ''}"
        return (f"; the lowest: {fmt(self.best['val_loss'])} at step {self.best['step']:,}"
                + (f", {self.since} of early_stop={cfg.early_stop}" if cfg.early_stop else ""))

    def stops_early(self, done: int, end: int) -> bool:
        """Whether early_stop ends the run at step `done` (of a planned `end`); said on rank 0."""
        cfg = self.cfg
        if not (cfg.early_stop and self.since >= cfg.early_stop and done < end):
            return False
        if self.dist.is_main:
            kept = (", " + (self.not_kept() or f"its model in {self.run_dir / BEST_DIR}") if cfg.keep_best else "")
            info(f"step {done:,}: early stop: {self.since} validations in a row without a val loss below "
                 f"{fmt(self.best['val_loss'])} (step {self.best['step']:,}{kept}); the run ends here, "
                 f"{end - done:,} steps before its planned end (early_stop={cfg.early_stop})")
        return True

    def done_words(self, end: int) -> str:
        """What the run's last line (of a run that ended at `end`) says of the lowest: where it was, and
        with keep_best where its model is; nothing where the last validation was the lowest, unkept."""
        best = self.best["step"]
        if best is None or (best == end and not self.cfg.keep_best):
            return ""
        return (f"; the lowest val loss {fmt(self.best['val_loss'])} at step {best:,}"
                + (f" ({self.not_kept() or self.run_dir / BEST_DIR})" if self.cfg.keep_best else ""))

    def not_kept(self) -> str | None:
        """Rank 0, with keep_best: why the model of the lowest validation loss is not in RUN/best, as
        its `best.json` tells (a resume removed the RUN/best of a later step, and no validation since
        went below the lowest); None where it is there."""
        best = self.run_dir / BEST_DIR
        held = best_held(best)
        if not best.is_dir():
            return f"its model not kept: there is no {best}"
        if held is None or held["step"] == self.best["step"]:  # None: an older gpt1's best/, taken as it was
            return None
        return f"its model not kept: {best} holds step {held['step']:,}'s (val loss {fmt(held['val_loss'])})"
