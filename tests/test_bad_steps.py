"""Steps the loop must not apply (a NaN/inf gradient with a finite loss, in every precision),
the stop when they persist (max_bad_steps; fp16-mixed: its loss scale below 1), and the
projected wall time line, which counts validations and checkpoints once they have been timed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gpt1.train.loop as loop
from gpt1.core.config import ModelConfig
from gpt1.core.errors import Gpt1Error
from gpt1.core.model import GPT
from gpt1.data.shards import ShardWindows, fixed_windows
from gpt1.formats.modeldir import load_model, save_model
from gpt1.train.budget import RunRate
from gpt1.train.checkpoint import latest_checkpoint
from gpt1.train.config import TrainConfig, load_config
from gpt1.train.loop import train
from gpt1.train.pretrain import pretrain
from tests.test_battery import assert_one_clear_line, run_main

# tests/test_train.py's runs, a quarter as wide: fp16 matmuls are slow on a CPU.
TINY = ["model=tiny", "n_layer=1", "n_head=2", "n_embd=32", "block_size=32", "batch_size=4", "eval_batches=2",
        "device=cpu", "lr=3e-3", "min_lr=3e-4"]


def nan_gradient(model: torch.nn.Module, steps) -> None:
    """From a real backward pass, one bias's gradient is NaN at the given (1-based) steps; the
    loss stays finite (as a broken custom layer or an fp16 overflow in the backward would do)."""
    calls = [0]

    def hook(grad):
        calls[0] += 1
        return grad * float("nan") if calls[0] in steps else grad

    model.transformer.h[0].mlp.c_fc.bias.register_hook(hook)


def _train(data_dir, tokenizer, run_dir: Path, steps, overrides) -> loop.TrainResult:
    cfg = load_config(TrainConfig, None, TINY + overrides)
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32))
    nan_gradient(model, steps)
    val = fixed_windows(data_dir / "val.bin", 32, 4, 2)
    return train(model, cfg, run_dir, ShardWindows(data_dir / "train.bin", 32, 4, cfg.seed), lambda: val,
                 lambda d, m: save_model(d, m, tokenizer))


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_a_nan_gradient_with_a_finite_loss_is_skipped_and_the_weights_stay_finite(data_dir, tokenizer, tmp_path,
                                                                                  precision):
    """Applied, the step's clip scaled every gradient by max_norm/NaN: every weight became NaN,
    the next steps' losses NaN, and the run stopped with advice for fp16."""
    result = _train(data_dir, tokenizer, tmp_path / "run", {3},
                    ["max_steps=5", "save_every=3", "eval_every=100", "max_bad_steps=2", f"precision={precision}"])
    records = _metrics(tmp_path / "run")
    assert [(r["step"], r["skipped"]) for r in records if "skipped" in r] == [(3, "non-finite gradient")]
    assert all(r["loss"] is not None and r["loss"] == r["loss"] for r in records)  # every loss finite, step 3's too
    assert result.steps == 5 and result.val_loss == result.val_loss
    assert all(torch.isfinite(p).all() for p in load_model(tmp_path / "run").parameters())


def test_a_persistent_nan_gradient_stops_after_max_bad_steps_in_one_line(data_dir, tmp_path, capsys, monkeypatch):
    """Through the CLI: the fault is in the model the command builds (a hook on its gradient)."""
    real = loop.build_optimizer

    def build_optimizer_of_a_broken_model(model, cfg, device):
        nan_gradient(model, range(5, 10**6))
        return real(model, cfg, device)

    monkeypatch.setattr(loop, "build_optimizer", build_optimizer_of_a_broken_model)
    rc, err = run_main(capsys, "pretrain", "--data", data_dir, "--out", tmp_path / "run", *TINY,
                       "max_steps=20", "save_every=2", "eval_every=100", "max_bad_steps=3")
    line = assert_one_clear_line(rc, err, r"the gradient norm was NaN/inf for 3 consecutive steps \(last at step 7\)")
    assert "step-00000006" in line and "Lower lr, or check the data" in line
    assert "fp16" not in line  # the run is fp32: no advice to leave fp16
    # (step 6 was skipped with finite weights: its checkpoint is as good as step 4's)
    assert latest_checkpoint(tmp_path / "run").name == "step-00000006"


@pytest.mark.parametrize("nan_steps, stops", [(range(3, 10**6), True), ({1, 2, 3}, False)],
                         ids=["persistent", "a-few-overflows"])
def test_fp16_stops_once_the_loss_scale_falls_below_1_but_rides_out_a_few_overflows(data_dir, tokenizer, tmp_path,
                                                                                    nan_steps, stops):
    """fp16-mixed: the GradScaler skipped every step forever (the run printed "done" with nothing
    trained after step 2). Halving from 65,536, its scale is below 1 after 17 consecutive skips.
    A few overflows (as at the start of a run) only lower the scale: max_bad_steps is for
    NaN losses and, in fp32/bf16, NaN gradients."""
    overrides = ["max_steps=20", "save_every=4", "eval_every=100", "max_bad_steps=2", "precision=fp16-mixed"]
    if stops:
        with pytest.raises(Gpt1Error, match=r"NaN/inf for 17 consecutive steps \(last at step 19\) although the fp16 "
                                            r"loss scale fell to 0\.5; stopped\. .*step-00000016.*try bf16-mixed"):
            _train(data_dir, tokenizer, tmp_path / "run", nan_steps, overrides)
    else:
        assert _train(data_dir, tokenizer, tmp_path / "run", nan_steps, overrides).steps == 20
    skipped = [r["step"] for r in _metrics(tmp_path / "run") if r.get("skipped") == "fp16 overflow"]
    assert skipped == (list(range(3, 19)) if stops else [1, 2, 3])  # the 17th raised before logging


def test_the_projected_wall_time_counts_validations_and_checkpoints_once_timed(data_dir, tmp_path, caplog):
    """It was printed from steps 4-13 as "(validation and checkpoints included)" though none had
    run: 4-5x low on a run with frequent validation. Now it says it counts steps only, and once
    a validation and a checkpoint have run one revised line includes them (when the projection
    moved by more than 10%: the rule is checked on a clock of its own below, as real timings
    under load may move it less)."""
    def projected(overrides):
        with caplog.at_level("INFO", logger="gpt1"):
            caplog.clear()
            pretrain(load_config(TrainConfig, None, TINY + overrides), data_dir, tmp_path / overrides[0])
        return [r.message for r in caplog.records if r.message.startswith("projected wall time")]

    lines = projected(["eval_batches=24", "max_steps=20", "eval_every=15", "save_every=15"])
    assert 1 <= len(lines) <= 2 and "(steps only: no validation or checkpoint has run yet)" in lines[0], lines
    assert all(line.startswith("projected wall time, revised: ") and "(validation and checkpoints included)" in line
               for line in lines[1:])
    # Validation and checkpoints that have run when the rate settles (step 13) count in its only line.
    lines = projected(["eval_batches=2", "max_steps=14", "eval_every=5", "save_every=5"])
    assert len(lines) == 1 and "(validation and checkpoints included)" in lines[0], lines


@pytest.mark.parametrize("validation_s, revised", [(0.8, True), (0.02, False)])
def test_the_projection_is_revised_once_when_it_moved_by_more_than_a_tenth(monkeypatch, caplog, validation_s, revised):
    from types import SimpleNamespace

    clock = [0.0]
    monkeypatch.setattr("gpt1.train.budget.time", SimpleNamespace(perf_counter=lambda: clock[0]))
    rate = RunRate(0, 20, eval_every=15, save_every=15)
    with caplog.at_level("INFO", logger="gpt1"):
        for done in range(1, 21):
            clock[0] += 0.1  # a step
            rate.step_done(done)
            if done == 15:
                rate.timed("validation", validation_s)
                rate.timed("checkpoint", 0.02)
                clock[0] += validation_s + 0.02
    lines = [r.message for r in caplog.records if r.message.startswith("projected wall time")]
    assert lines[0].startswith("projected wall time: 2 s for 20 steps at 0.1 s/step (steps only: no validation or "
                               "checkpoint has run yet)")
    # 20 steps of 0.1 s, two validations (steps 15 and 20) and two checkpoints: 3.64 s, or 2.08 s (4% more).
    assert len(lines) == 1 + revised, lines
    if revised:
        assert lines[1].startswith("projected wall time, revised: 4 s for 20 steps at 0.1 s/step "
                                   "(validation and checkpoints included)"), lines
