"""Pass 22, the owner's fixes: keep_best turned on by a resume."""

from __future__ import annotations

import pytest

from tests.test_config_pass21 import _stopped
from tests.test_train import _metrics, _run


def test_keep_best_turned_on_by_a_resume_writes_best_from_there(data_dir, tmp_path, stop_training_at, monkeypatch,
                                                                 caplog):
    """The lowest validation before the resume (keep_best off, its model gone) stayed the lowest: a
    run whose later losses were higher never wrote RUN/best, and its last line named it anyway."""
    # A rate this high makes the loss climb after its first steps: the lowest is before the resume.
    args = ["max_steps=6", "eval_every=1", "save_every=2", "eval_batches=1", "lr=0.5", "min_lr=0.5", "warmup=0"]
    run = tmp_path / "run"
    _stopped(data_dir, run, stop_training_at, monkeypatch, args, at=3)  # checkpoint 2, no best/
    before = _metrics(run)
    with caplog.at_level("INFO", logger="gpt1"):
        result = _run(data_dir, run, [*args, "keep_best=true"])
    after = [m for m in _metrics(run) if m["step"] > 2 and "val_loss" in m]
    warnings = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"keep_best=true from step 2: step {before[-1]['best_step']}'s val loss "
                        f"({before[-1]['best_val_loss']:.4f}) was the lowest while keep_best was off, and its "
                        f"model was not kept; {run / 'best'} will hold the lowest validation from here on"]
    assert (run / "best").is_dir()
    lowest = min(after, key=lambda m: m["val_loss"])
    assert after[-1]["best_step"] == lowest["step"] and after[-1]["best_val_loss"] == lowest["val_loss"]
    assert result.best_step == lowest["step"]
