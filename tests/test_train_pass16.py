"""Training findings of the sixteenth pass (a property-based comparison with reference loops):
LoRA r=1 on part of c_attn under autocast, the schedule's edges (one step, a warmup of every
step), fine-tuning epochs that stopped inside the last one, and warmup + cooldown = 1."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gpt1.cli import main
from gpt1.core.errors import Gpt1Error
from gpt1.data.chat import ChatBatches, EncodedChats
from gpt1.train import checkpoint
from gpt1.train.config import TrainConfig, load_config
from gpt1.train.finetune import FinetuneConfig, finetune
from gpt1.train.schedule import BudgetSchedule, lr_at, warmup_steps
from tests.test_battery import assert_one_clear_line, run_main

FT = ["block_size=48", "eval_batches=1", "device=cpu", "lora_r=2", "val_fraction=0"]


def _chat_file(path: Path, n: int) -> Path:
    """`n` one-exchange conversations: `n` training sequences (nothing held out with val_fraction=0)."""
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                                                     {"role": "assistant", "content": f"{2 * i}."}]}) + "\n"
                            for i in range(n)))
    return path


def _cfg(chat: Path, *overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, [*FT, *overrides], data=str(chat))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _sampler(run: Path) -> dict:
    state = torch.load(checkpoint.latest_checkpoint(run) / checkpoint.STATE_FILE, weights_only=True)
    return {k: state["sampler"][k] for k in ("epoch", "position")}


# ---- 1. LoRA r=1 on part of c_attn under autocast ----------------------------------------------

@pytest.mark.parametrize("targets, precision", [('["q","v"]', "bf16-mixed"), ('["v"]', "fp16-mixed")])
def test_lora_r1_on_part_of_c_attn_trains_under_autocast(tiny_model_dir, tmp_path, targets, precision):
    """With r=1 the einsum of the LoRA update stays fp32 under CPU autocast, and index_add into the
    bf16/fp16 output raised `index_add_(): self (BFloat16) and source (Float)` at the first step."""
    chat, out = _chat_file(tmp_path / "chat.jsonl", 6), tmp_path / "run"
    cfg = _cfg(chat, "batch_size=2", "max_steps=2", "lora_r=1", f"lora_targets={targets}", f"precision={precision}",
               "lr=1e-2", "val_fraction=0.3", "eval_every=1")
    result = finetune(cfg, tiny_model_dir, out)
    assert result.steps == 2 and all(m["loss"] > 0 for m in _metrics(out) if "loss" in m)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())  # it trained


# ---- 2. the schedule's edges -------------------------------------------------------------------

@pytest.mark.parametrize("warmup, cooldown", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.5)])
def test_a_one_step_run_takes_its_step_at_lr(warmup, cooldown):
    """Without warmup the one step was the cosine's end, min_lr (transformers and nanoGPT: lr)."""
    assert lr_at(0, 1, 1e-4, 1e-6, warmup, cooldown) == 1e-4
    schedule = BudgetSchedule(1e-4, 1e-6, warmup, cooldown)  # as the loop calls it on a plan capped at 1 step
    assert schedule.at(0, 1, schedule.in_planned_cooldown(0, 1)) == 1e-4


def test_a_finetune_of_one_global_batch_trains_at_lr(tiny_model_dir, tmp_path):
    """`gpt1 finetune` with its defaults (epochs=1, warmup=0) on 3 conversations, batch 4: one
    step, which moved the adapter at min_lr (1e-6) instead of lr (1e-4)."""
    chat, out = _chat_file(tmp_path / "chat.jsonl", 3), tmp_path / "run"
    result = finetune(_cfg(chat, "batch_size=4"), tiny_model_dir, out)
    assert result.steps == 1
    assert [m["lr"] for m in _metrics(out) if "lr" in m] == [FinetuneConfig.lr]


@pytest.mark.parametrize("steps, warmup, cooldown", [(10, 0.95, 0.0), (2, 0.75, 0.0), (3, 0.9, 0.0),
                                                     (10, 0.95, 0.05), (4, 0.9, 0.1)])
def test_a_warmup_of_every_step_is_cut_to_all_but_the_last_which_is_min_lr(steps, warmup, cooldown):
    """round(warmup x steps) >= steps made every step warmup: the run ended at the peak."""
    lr, min_lr = 1e-3, 1e-5
    rates = [lr_at(s, steps, lr, min_lr, warmup, cooldown) for s in range(steps)]
    assert warmup_steps(steps, warmup) == steps - 1
    assert rates[:-1] == pytest.approx([lr * (s + 1) / (steps - 1) for s in range(steps - 1)])  # the linear warmup
    assert rates[-1] == pytest.approx(min_lr, rel=1e-12)  # (the cooldown's line lands within an ulp or two)
    # A time budget on a steady plan: the same rates, never rising after the warmup, and a resume
    # from its state mid-way goes on bit for bit.
    def budget(schedule: BudgetSchedule, start: int = 0) -> list[float]:
        return [schedule.at(s, steps, schedule.in_planned_cooldown(s, steps)) for s in range(start, steps)]

    straight = budget(BudgetSchedule(lr, min_lr, warmup, cooldown))
    assert straight == pytest.approx(rates, rel=1e-12, abs=0)
    cut = BudgetSchedule(lr, min_lr, warmup, cooldown)
    first = [cut.at(s, steps, cut.in_planned_cooldown(s, steps)) for s in range(steps // 2)]
    assert first + budget(BudgetSchedule(lr, min_lr, warmup, cooldown, cut.state_dict()), steps // 2) == straight


def test_a_two_step_finetune_with_a_long_warmup_ends_at_min_lr(tiny_model_dir, tmp_path):
    """warmup=0.75 of 2 steps: [lr/2, lr], never decayed; now [lr, min_lr] as any 2-step run."""
    chat, out = _chat_file(tmp_path / "chat.jsonl", 4), tmp_path / "run"
    finetune(_cfg(chat, "batch_size=2", "max_steps=2", "warmup=0.75", "lr=1e-3", "min_lr=1e-5"), tiny_model_dir, out)
    assert [m["lr"] for m in _metrics(out) if "lr" in m] == [1e-3, 1e-5]


# ---- 3. fine-tuning epochs are whole epochs of the sampler -------------------------------------

@pytest.mark.parametrize("epochs, steps, done", [(3, 6, {"epoch": 3, "position": 0}),
                                                 (2.5, 5, {"epoch": 2, "position": 8})])
def test_finetune_epochs_are_whole_epochs_of_the_sampler(tiny_model_dir, tmp_path, caplog, epochs, steps, done):
    """11 sequences, 8 a step (4 x 2 accumulation): an epoch is 2 steps, its last topped up from its
    start. epochs=3 took ceil(3 x 11 / 8) = 5 steps, ending inside the third epoch, and said
    "3.64 epochs"; epochs=2.5 took 4 (2 epochs), not the 5 of two and a half."""
    chat, out = _chat_file(tmp_path / "chat.jsonl", 11), tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="gpt1"):
        result = finetune(_cfg(chat, "batch_size=4", "grad_accum=2", f"epochs={epochs}"), tiny_model_dir, out)
    assert result.steps == steps and _sampler(out) == done
    assert f"{steps} steps x 8 sequences = {steps / 2:.2f} epochs of 11" in caplog.text
    assert json.loads((out / "train_config.json").read_text())["max_steps"] == steps


def test_a_fraction_of_an_epoch_is_that_share_of_its_steps_rounded_up():
    """0.07 x 100 steps is 7.000000000000001 in floats: 7 steps, not 8."""
    data = EncodedChats(tokens=np.ones(400, np.int32), loss_mask=np.ones(400, bool), offsets=np.arange(0, 401, 2))
    batches = ChatBatches(data, 2)  # 200 sequences, 2 a step: 100 steps an epoch
    assert [batches.steps_for(e) for e in (0.07, 0.075, 0.001, 1, 2.5)] == [7, 8, 1, 100, 250]
    assert batches.epoch_steps(3) == 34 and batches.steps_for(2, grad_accum=3) == 68  # the 34th step topped up


def test_a_run_begun_on_epochs_before_the_fix_resumes_with_its_recorded_length(tiny_model_dir, tmp_path,
                                                                             stop_training_at, monkeypatch):
    """A run dir whose train_config.json (and checkpoint) recorded epochs=3 as 5 steps resumes to
    its 5 steps: the loop refuses a resolved max_steps other than the recorded one."""
    chat, out = _chat_file(tmp_path / "chat.jsonl", 11), tmp_path / "run"
    cfg = _cfg(chat, "batch_size=8", "epochs=3", "save_every=2")
    stop_training_at(3, KeyboardInterrupt)  # in step 3, after the step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, tiny_model_dir, out)
    monkeypatch.undo()
    record = json.loads((out / "train_config.json").read_text())
    assert record["max_steps"] == 6
    # A length that neither gpt1 resolves is another run's.
    (out / "train_config.json").write_text(json.dumps({**record, "max_steps": 4}))
    with pytest.raises(Gpt1Error, match=r"max_steps \(resolved: 4 -> 6\)"):
        finetune(cfg, tiny_model_dir, out)
    # As the gpt1 before the fix recorded it: ceil(3 x 11 / 8) = 5 steps.
    (out / "train_config.json").write_text(json.dumps({**record, "max_steps": 5}))
    state_file = checkpoint.latest_checkpoint(out) / checkpoint.STATE_FILE
    torch.save({**torch.load(state_file, weights_only=True), "max_steps": 5, "end": 5}, state_file)
    result = finetune(cfg, tiny_model_dir, out)
    assert result.resumed_from == 2 and result.steps == 5 and _sampler(out) == {"epoch": 2, "position": 8}


# ---- 4. warmup + cooldown = 1 ------------------------------------------------------------------

@pytest.mark.parametrize("warmup, cooldown", [(0.8, 0.2), (0.9, 0.1), (0.7, 0.3)])
def test_warmup_and_cooldown_may_add_up_to_one(capsys, warmup, cooldown):
    """1.0 - 0.8 is 0.19999999999999996: cooldown=0.2 was refused as outside [0, 1 - warmup]."""
    assert main(["pretrain", "--print-config", f"warmup={warmup}", f"cooldown={cooldown}"]) == 0
    assert f"cooldown = {cooldown}" in capsys.readouterr().out
    cfg = TrainConfig(warmup=warmup, cooldown=cooldown, max_steps=10)
    assert lr_at(9, 10, 1e-3, 1e-5, cfg.warmup, cfg.cooldown) == pytest.approx(1e-5, rel=1e-12)


def test_warmup_and_cooldown_over_one_are_still_refused(capsys):
    assert_one_clear_line(*run_main(capsys, "pretrain", "--print-config", "warmup=0.8", "cooldown=0.21"),
                          r"cooldown is a fraction of the steps in \[0, 1 - warmup\], got 0.21 \(warmup 0.8\)$")
