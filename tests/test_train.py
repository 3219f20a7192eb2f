"""Training: recipe loading, the LR schedule, the shared loop (accumulation, NaN stop, resume),
checkpoints that survive a SIGKILL in the middle of a save, and `gpt1 pretrain` end to end."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import gpt1
from gpt1.cli import main
from gpt1.core.config import ModelConfig
from gpt1.core.errors import Gpt1Error
from gpt1.core.model import GPT
from gpt1.core.tokenizer import train_tokenizer
from gpt1.data.shards import ShardWindows, fixed_windows, load_data_tokenizer, prepare
from gpt1.data.sources import iter_documents
from gpt1.formats.modeldir import load_model, save_model
from gpt1.train.checkpoint import STATE_FILE, latest_checkpoint
from gpt1.train.config import TrainConfig, load_config
from gpt1.train.loop import peak_flops, train
from gpt1.train.pretrain import init_model, pretrain
from gpt1.train.schedule import BudgetSchedule, lr_at, warmup_steps
from tests.conftest import TEST_VOCAB

# A run small enough for a few dozen steps per second on one CPU core.
TINY = ["model=tiny", "block_size=32", "batch_size=4", "eval_batches=2", "device=cpu", "lr=3e-3", "min_lr=3e-4"]


# ---- config loading ------------------------------------------------------------------------

def test_recipe_and_overrides(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "small"\nlr = 1e-3\nbetas = [0.8, 0.99]\nmax_steps = 10\n')
    cfg = load_config(TrainConfig, recipe, ["lr=5e-4", "precision=bf16-mixed", "compile=true", "warmup=0",
                                           "init_from=hf:/models/gpt2", "grad_clip=1"])
    assert (cfg.model, cfg.lr, cfg.betas, cfg.max_steps) == ("small", 5e-4, (0.8, 0.99), 10)
    assert cfg.precision == "bf16-mixed" and cfg.compile is True and cfg.warmup == 0.0
    assert cfg.init_from == "hf:/models/gpt2" and isinstance(cfg.grad_clip, float)


def test_shipped_reference_recipe_is_the_model_card():
    cfg = load_config(TrainConfig, "gpt1-openwebtext")
    assert (cfg.model, cfg.block_size, cfg.batch_size, cfg.grad_accum) == ("gpt1", 512, 48, 4)
    assert (cfg.lr, cfg.min_lr, cfg.warmup, cfg.weight_decay, cfg.betas) == (3e-4, 1e-6, 0.03, 0.0, (0.9, 0.95))
    assert cfg.epochs == 1.0 and cfg.max_steps == 0
    # the fast defaults on a GPU (fp16-mixed, the card's, is the fallback without bf16)
    assert cfg.precision == "bf16-mixed" and cfg.compile is True
    # one epoch of the card's ~8.8B tokens at 192 x 512 tokens per step
    assert cfg.resolve_steps(48 * 512 * 4, 8_800_000_000) == math.ceil(8.8e9 / 98_304)
    assert load_config(TrainConfig, "tiny-cpu").model == "tiny"


@pytest.mark.parametrize("recipe, override, pattern", [
    ("lr = 1e-3\nlearning_rate = 1\n", None, r"r\.toml: unknown key 'learning_rate'"),
    ("lr = 'fast'\n", None, r"r\.toml: key 'lr' expects float"),
    ("max_steps = 1.5\n", None, r"key 'max_steps' expects int"),
    ("betas = [0.9]\n", None, r"key 'betas' expects tuple\[float, float\]"),
    ("compile = 1\n", None, r"key 'compile' expects bool"),
    ("lr = [\n", None, r"invalid TOML"),
    ("", "warmup_steps=10", r"override 'warmup_steps=10': unknown key"),
    ("", "batch_size=four", r"override 'batch_size=four': key 'batch_size' expects int"),
    ("", "lr", r"expected key=value"),
    ("", "precision=fp8", r"precision must be one of"),
    ("", "optimizer=sgd", r"optimizer must be one of adamw, muon, got 'sgd'"),
    ("", "muon_lr_scale=0", r"muon_lr_scale must be a number > 0"),
    ("", "embedding_lr_scale=nan", r"embedding_lr_scale must be a number > 0"),
    ("", "cooldown=1.2", r"cooldown is a fraction of the steps in \[0, 1 - warmup\], got 1.2"),
    ("warmup = 0.5\n", "cooldown=0.6", r"cooldown .* got 0.6 \(warmup 0.5\)"),
])
def test_bad_recipes_name_the_key(tmp_path, recipe, override, pattern):
    path = tmp_path / "r.toml"
    path.write_text(recipe)
    with pytest.raises(Gpt1Error, match=pattern):
        load_config(TrainConfig, path, [override] if override else [])


def test_loader_works_for_subclasses():
    @dataclasses.dataclass
    class LoraConfig(TrainConfig):
        lora_r: int = 8
        targets: list[str] = dataclasses.field(default_factory=lambda: ["c_attn"])
        alpha: float | None = None

    cfg = load_config(LoraConfig, None, ["lora_r=4", "targets=['c_fc', 'c_proj']", "alpha=16", "lr=1e-4"])
    assert (cfg.lora_r, cfg.targets, cfg.alpha, cfg.lr) == (4, ["c_fc", "c_proj"], 16.0, 1e-4)
    with pytest.raises(Gpt1Error, match="key 'lora_r' expects int"):
        load_config(LoraConfig, None, ["lora_r=big"])


# ---- schedule ------------------------------------------------------------------------------

def test_schedule_warmup_and_cosine_endpoints():
    steps, lr, min_lr = 1000, 3e-4, 1e-6
    n_warm = warmup_steps(steps, 0.03)
    assert n_warm == 30
    lrs = [lr_at(s, steps, lr, min_lr, 0.03) for s in range(steps)]
    assert lrs[0] == pytest.approx(lr / 30)  # warmup starts above 0: no wasted step
    assert lrs[29] == pytest.approx(lr)  # warmup ends exactly at the peak
    assert all(a < b for a, b in zip(lrs[:29], lrs[1:30]))  # linear rise
    assert lrs[30] == pytest.approx(lr)  # cosine starts at the peak ...
    assert lrs[-1] == pytest.approx(min_lr)  # ... and ends exactly at min_lr
    mid = 30 + (steps - 1 - 30) / 2
    assert lr_at(int(mid), steps, lr, min_lr, 0.03) == pytest.approx((lr + min_lr) / 2, rel=1e-2)
    assert all(a >= b for a, b in zip(lrs[30:], lrs[31:]))
    assert lr_at(0, 10, 1e-3, 1e-5, 0.0) == pytest.approx(1e-3)


def test_warmup_stable_decay_holds_the_peak_then_falls_linearly_to_min_lr():
    steps, lr, min_lr = 1000, 3e-3, 1e-5
    lrs = [lr_at(s, steps, lr, min_lr, 0.03, cooldown=0.2) for s in range(steps)]
    cosine = [lr_at(s, steps, lr, min_lr, 0.03) for s in range(steps)]
    assert lrs[:30] == cosine[:30]  # the same warmup
    # the peak until the last 20% of the steps (200 of them, the first at the peak itself) ...
    assert lrs[30:800] == [lr] * 770
    assert lrs[800] < lr and lrs[-1] == pytest.approx(min_lr)  # ... then down to exactly min_lr
    drops = [a - b for a, b in zip(lrs[799:], lrs[800:])]
    assert max(drops) == pytest.approx(min(drops)) and min(drops) > 0  # in equal steps: linear
    # a cooldown of the whole run (no warmup) is a linear decay from the first step
    assert [lr_at(s, 5, 1.0, 0.0, 0.0, cooldown=1.0) for s in range(5)] == pytest.approx([1, 0.75, 0.5, 0.25, 0])



@pytest.mark.parametrize("cooldown", [0.0, 0.3], ids=["cosine", "warmup-stable-decay"])
def test_a_re_planned_schedule_never_rises_after_its_warmup_and_ends_at_min_lr(cooldown):
    """Under a time budget the last step moves as the load changes; the rate must not follow
    the plan back up (a cooldown begun on a slow spell and undone, a cosine re-stretched)."""
    lr, min_lr = 1.0, 0.1

    def run(plans, due_from):
        schedule = BudgetSchedule(lr, min_lr, 0.05, cooldown)
        return [schedule.at(step, end, cooldown_due=step >= due_from) for step, end in enumerate(plans)]

    # A steady plan is lr_at's schedule, the cooldown due at its own first step.
    steady = run([200] * 200, due_from=200 - 1 - round(cooldown * 200) + 1)
    assert steady == pytest.approx([lr_at(s, 200, lr, min_lr, 0.05, cooldown) for s in range(200)])

    # A plan that swings: 200 steps, then 60 (a slow spell), then 300, then 250 to the end.
    plans = [200] * 40 + [60] * 20 + [300] * 100 + [250] * 90
    lrs = run(plans, due_from=170)  # the cooldown's share of the time left from step 170 on
    n_warm = warmup_steps(200, 0.05)
    assert lrs[n_warm - 1] == pytest.approx(lr)
    after = lrs[n_warm - 1:]
    assert all(b <= a for a, b in zip(after, after[1:]))  # never rises again ...
    assert lrs[-1] == pytest.approx(min_lr)  # ... and ends exactly at min_lr
    if cooldown:  # the slow spell did not start the cooldown: the peak held until it was due
        assert lrs[n_warm - 1:170] == [lr] * (170 - n_warm + 1)
        drops = [a - b for a, b in zip(lrs[170:], lrs[171:])]
        assert min(drops) > 0 and max(drops) == pytest.approx(min(drops))  # linear, to the planned end
    else:  # the cosine fell faster on the short plan and waited for the new one to catch up
        assert lrs[59] < lr_at(59, 200, lr, min_lr, 0.05) and min(lrs[60:80]) == lrs[59]

    # Resumed from its state, it goes on where it was.
    schedule = BudgetSchedule(lr, min_lr, 0.05, cooldown)
    first = [schedule.at(s, end, s >= 170) for s, end in enumerate(plans[:180])]
    resumed = BudgetSchedule(lr, min_lr, 0.05, cooldown, schedule.state_dict())
    assert first + [resumed.at(s, end, s >= 170) for s, end in enumerate(plans[180:], 180)] == lrs



def test_a_time_budget_plans_from_the_recent_step_time_and_finishes_a_plan_a_little_short():
    from gpt1.train.budget import TimeBudget
    from gpt1.train.distributed import current

    now = [0.0]
    budget = TimeBudget(10.0, 0.0, 100_000, eval_every=20, cooldown=0.3, clock=lambda: now[0])
    end, dist = 100_000, current()
    for done in range(1, 31):  # 0.1 s a step: 100 steps fit
        now[0] += 0.1
        end = budget.plan(done, end, dist)
    assert 99 <= end <= 100 and not budget.cooldown_due  # (to float rounding)
    for done in range(31, 52):  # slower (0.2 s a step): what is left of the plan shrinks to fit
        now[0] += 0.2
        end = budget.plan(done, end, dist)
    assert 64 <= end <= 65 and budget.cooldown_due  # 2.8 s left of 10: the cooldown's 30% of the time

    def out_of_time(short: int, per_step: float) -> int:
        now[0] = 0.0
        b = TimeBudget(10.0, 0.0, 100_000, eval_every=20, clock=lambda: now[0])
        b.plan(1, 100_000, dist)
        for done in range(2, 30):
            now[0] += per_step
            b.plan(done, 30 + short, dist)
        b.timed(10.5 - now[0])  # a checkpoint took the rest of the budget (the loop times it: not a pause)
        now[0] = 10.5
        return b.plan(30, 30 + short, dist)

    assert out_of_time(short=2, per_step=0.3) == 32  # two steps: always
    assert out_of_time(short=5, per_step=0.05) == 35  # 0.25 s: within 5% of the budget
    # 1 s does not fit: the plan is cut to the 10 steps that fit in 0.5 s, and the decay ends there
    # (it stopped at once, where warmup-stable-decay had not begun its cooldown: at the peak LR)
    assert 39 <= out_of_time(short=20, per_step=0.05) <= 40  # (to float rounding)


def test_a_stall_in_the_first_timed_steps_does_not_cut_the_warmup_short():
    """A plan from the mean of the first three timed steps took a two-step stall for the machine's
    speed: a 600-step plan became ~60, the warmup ended at step 5 and the rate jumped to the
    peak. The warmup follows a plan from the median step time instead."""
    from gpt1.train.budget import TimeBudget
    from gpt1.train.distributed import current

    def rates(stalled_steps):
        now, dist = [0.0], current()
        budget = TimeBudget(60.0, 0.0, 100_000, eval_every=20, clock=lambda: now[0])
        schedule, end, lrs = BudgetSchedule(1.0, 0.01, 0.03, 0.0), 100_000, []
        for step in itertools.count():
            if step >= end:
                return lrs
            lrs.append(schedule.at(step, end, budget.cooldown_due, warm_end=budget.warm_end))
            now[0] += 3.0 if step in stalled_steps else 0.1  # 0.1 s a step: 600 steps fit
            end = budget.plan(step + 1, end, dist)

    def rises(lrs):  # from the first step that follows a measured plan to the peak
        return [b - a for a, b in zip(lrs[5:], lrs[6:lrs.index(1.0) + 1])]

    steady, stalled = rates(()), rates((4, 5))
    n_warm = warmup_steps(len(steady), 0.03)
    assert len(steady) == 600 and steady.index(1.0) == n_warm - 1
    # The stall cost 10% of the budget, so the warmup is ~10% shorter, not 3x: it rises on a
    # slope close to the steady one, step by step, to the peak.
    assert min(rises(stalled)) > 0 and max(rises(stalled)) <= 1.25 * max(rises(steady))
    assert stalled.index(1.0) >= 0.8 * (n_warm - 1)


def test_a_budget_warmup_bends_with_its_plan_but_never_jumps_or_falls_back():
    """A warmup on a moving plan: the rate rose again to the line of each new plan (the first
    measured plan of a run capped at 100,000 steps jumped it from 0.2% to 39% of lr in one step),
    and fell when the plan grew. It re-aims from where it is instead; then the cosine begins at
    the peak, from the step after the warmup, and ends at min_lr at the planned last step."""
    schedule = BudgetSchedule(1.0, 0.1, 0.05, 0.0)
    plans = [100_000] * 6 + [400] * 4 + [600] * 6 + [400] * 384  # measured from step 6; grows; shrinks
    lrs = [schedule.at(step, end, False) for step, end in enumerate(plans)]
    peak = lrs.index(1.0)
    rises = [b - a for a, b in zip(lrs, lrs[1:peak + 1])]
    assert min(rises) > 0 and max(rises) < 0.15  # never a fall; on the plan's line, step 6 jumped 0.35
    assert peak == warmup_steps(400, 0.05) - 1  # the warmup of the last plan
    assert lrs[peak + 1] == pytest.approx(1.0, abs=1e-3) and lrs[-1] == pytest.approx(0.1)
    assert all(b <= a for a, b in zip(lrs[peak:], lrs[peak + 1:]))


@pytest.mark.parametrize("cooldown", [0.0, 0.3], ids=["cosine", "warmup-stable-decay"])
def test_under_random_load_a_budget_schedule_rises_to_its_peak_then_never_rises(cooldown):
    """Step times drawn from a heavy-tailed spread (10 ms to 6 s, as a busy machine gives) under a
    3 s budget: the warmup's rates rise strictly to the peak and never rise again after it. A
    warmup-stable-decay cooldown once ended one ulp under min_lr and rose to it at the next step
    (test_a_time_budget_ends_the_run_and_its_schedule_when_spent failed so under load)."""
    import random

    from gpt1.train.budget import TimeBudget
    from gpt1.train.distributed import current

    for seed in range(300):
        rng, now = random.Random(seed), [0.0]
        budget = TimeBudget(3.0, 0.0, 100_000, eval_every=25, cooldown=cooldown, clock=lambda: now[0])
        schedule, end, lrs = BudgetSchedule(3e-3, 3e-4, 0.05, cooldown), 100_000, []
        for step in itertools.count():
            if step >= end:
                break
            due = budget.cooldown_due or (end == 100_000 and schedule.in_planned_cooldown(step, end))
            lrs.append(schedule.at(step, end, due, warm_end=budget.warm_end))
            now[0] += rng.choice([0.01, 0.02, 0.05, 0.3]) * rng.choice([1, 1, 1, 5, 20])
            end = budget.plan(step + 1, end, current())
        peak = lrs.index(max(lrs))
        assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1])), seed
        assert all(b <= a for a, b in zip(lrs[peak:], lrs[peak + 1:])), seed


# ---- the loop ------------------------------------------------------------------------------

def _run(data_dir, out, overrides, **kw):
    return pretrain(load_config(TrainConfig, None, TINY + overrides), data_dir, out, **kw)


def _metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_gradient_accumulation_matches_a_larger_batch(data_dir, tmp_path):
    """4 sequences x 1 micro-batch == 2 sequences x 2 accumulated micro-batches (the same windows)."""
    import gpt1

    common = ["max_steps=3", "eval_every=3", "save_every=3"]
    big = _run(data_dir, tmp_path / "big", common + ["batch_size=4", "grad_accum=1"])
    acc = _run(data_dir, tmp_path / "acc", common + ["batch_size=2", "grad_accum=2", "eval_batches=4"])
    for a, b in zip(_metrics(tmp_path / "big"), _metrics(tmp_path / "acc")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["tokens"] == b["tokens"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert big.val_loss == pytest.approx(acc.val_loss, rel=1e-5)
    # Adam divides by sqrt(v): weights whose gradients are ~0 amplify float rounding, so the
    # weights agree to 1e-4 after 3 updates of ~3e-3 each, not to the last bit.
    wa, wb = gpt1.load(tmp_path / "big", device="cpu").model, gpt1.load(tmp_path / "acc", device="cpu").model
    for (name, pa), pb in zip(wa.named_parameters(), wb.parameters()):
        torch.testing.assert_close(pa.detach(), pb.detach(), rtol=0, atol=1e-4, msg=name)


def test_recipe_keys_shape_a_model_from_scratch(data_dir, tmp_path):
    import gpt1
    _run(data_dir, tmp_path / "run", ["max_steps=2", "n_layer=3", "n_embd=48", "n_head=3"])
    config = gpt1.load(tmp_path / "run", device="cpu").config
    assert (config.n_layer, config.n_embd, config.n_head, config.block_size) == (3, 48, 3, 32)
    with pytest.raises(Gpt1Error, match="n_embd .48. must be divisible by n_head .5."):
        _run(data_dir, tmp_path / "bad", ["max_steps=2", "n_embd=48", "n_head=5"])
    with pytest.raises(Gpt1Error, match=r"^n_layer=2: init_from=.* is 3 layers x 48 wide, 3 heads, and init_from "
                                        r"decides the model; leave n_layer out, or set n_layer=3$"):
        _run(data_dir, tmp_path / "from", ["max_steps=1", f"init_from={tmp_path / 'run'}", "n_layer=2"])
    from gpt1.train.finetune import FinetuneConfig
    with pytest.raises(Gpt1Error, match="fine-tuning keeps the base model's shape"):
        load_config(FinetuneConfig, None, ["n_embd=64"])


def test_run_dir_is_a_model_dir_with_metrics_and_plot(data_dir, tmp_path):
    import gpt1
    result = _run(data_dir, tmp_path / "run", ["max_steps=8", "eval_every=4", "save_every=4"])
    assert result.steps == 8 and result.tokens == 8 * 4 * 32 and result.resumed_from == 0
    assert result.val_perplexity == pytest.approx(math.exp(result.val_loss))
    records = _metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8]
    assert all({"loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(r) for r in records)
    assert records[-1]["mfu"] is None  # no peak FLOPs on a CPU
    assert records[-1]["loss"] < records[0]["loss"]
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    llm = gpt1.load(tmp_path / "run", device="cpu")
    assert llm.tokenizer.fingerprint == load_data_tokenizer(data_dir).fingerprint
    assert llm.config.block_size == 32 and llm.config.vocab_size == llm.tokenizer.vocab_size
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [".lock", "step-00000008"]
    # running it again is a no-op that reports the finished run
    again = _run(data_dir, tmp_path / "run", ["max_steps=8", "eval_every=4", "save_every=4"])
    assert again.resumed_from == 8 and again.val_loss == result.val_loss
    assert len(_metrics(tmp_path / "run")) == 8


def test_tensorboard_logs_the_same_values_as_metrics(data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(data_dir, tmp_path / "run", ["max_steps=4", "eval_every=2", "tensorboard=true"])
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    records = _metrics(tmp_path / "run")
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in records])
    assert [e.step for e in events.Scalars("val_ppl")] == [2, 4]


def test_embedding_lr_scale_gives_the_input_embeddings_their_own_lr(data_dir, tmp_path):
    from gpt1.train.optim import build_optimizer

    def groups(config: ModelConfig, overrides: list[str]) -> list[tuple[set[str], float]]:
        model = GPT(config)
        names = {id(p): n for n, p in model.named_parameters()}
        optimizer = build_optimizer(model, load_config(TrainConfig, None, overrides), torch.device("cpu"))
        return [({names[id(p)] for p in g["params"]}, g.get("lr_scale", 1.0)) for g in optimizer.param_groups]

    tiny = ModelConfig.preset("tiny")
    # At the default scale the groups are those of before the knob (old checkpoints resume).
    assert [scale for _, scale in groups(tiny, [])] == [1.0, 1.0]
    scaled = groups(tiny, ["embedding_lr_scale=10"])
    assert ({"transformer.wte.weight", "transformer.wpe.weight"}, 10.0) in scaled and len(scaled) == 3
    assert all(scale == 1.0 for names, scale in scaled if "lm_head.weight" in names)
    # A tied token embedding is the output head too: it keeps lr; the positions still scale.
    tied = groups(dataclasses.replace(tiny, tie_embeddings=True), ["embedding_lr_scale=10"])
    assert ({"transformer.wpe.weight"}, 10.0) in tied
    assert all(scale == 1.0 for names, scale in tied if "transformer.wte.weight" in names)
    # With Muon: the blocks' matrices on Muon, the embeddings scaled on AdamW, the rest at lr.
    assert ({"transformer.wte.weight", "transformer.wpe.weight"}, 10.0) in groups(
        tiny, ["optimizer=muon", "embedding_lr_scale=10"])

    # A run: the embeddings' group ran at lr x embedding_lr_scale of the schedule.
    _run(data_dir, tmp_path / "run", ["max_steps=6", "save_every=6", "eval_every=6", "embedding_lr_scale=5",
                                      "warmup=0"])
    state = torch.load(latest_checkpoint(tmp_path / "run") / STATE_FILE, weights_only=True)
    lrs = sorted(g["lr"] for g in state["optimizer"]["param_groups"])
    last_lr = lr_at(5, 6, 3e-3, 3e-4, 0.0)
    assert len(lrs) == 3 and math.isclose(lrs[0], last_lr) and math.isclose(lrs[-1], 5 * last_lr)


def test_another_config_or_a_foreign_dir_is_refused(data_dir, tmp_path):
    _run(data_dir, tmp_path / "run", ["max_steps=2", "save_every=2"])
    def files():  # the run's; not the lock, which the refused run held while it checked (its pid in it)
        return {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.name != ".lock"}

    before = files()
    with pytest.raises(Gpt1Error, match=r"different config \(lr: 0.003 -> 0.001\)"):
        _run(data_dir, tmp_path / "run", ["max_steps=2", "save_every=2", "lr=1e-3"])
    assert files() == before
    # A run dir written before a config key existed had that key's default: it still resumes.
    config_file = tmp_path / "run" / "train_config.json"
    written = json.loads(config_file.read_text())
    del written["config"]["optimizer"], written["config"]["muon_lr_scale"]
    config_file.write_text(json.dumps(written))
    assert _run(data_dir, tmp_path / "run", ["max_steps=2", "save_every=2"]).resumed_from == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(Gpt1Error, match="not empty and holds no gpt1 run"):
        _run(data_dir, tmp_path / "other", ["max_steps=2"])
    assert os.listdir(tmp_path / "other") == ["notes.txt"]


def test_resuming_on_other_data_is_refused_but_a_moved_data_folder_resumes(data_dir, corpus_dir, tokenizer, tmp_path):
    import shutil

    run, args = tmp_path / "run", ["max_steps=2", "save_every=2"]
    _run(data_dir, run, args)
    other = tmp_path / "other"
    prepare([str(corpus_dir / "json")], tokenizer, other, val=1)
    with pytest.raises(Gpt1Error, match=r"holds a run on other training data \(.*train_tokens: \d+ -> \d+.*"
                                        r"val_documents: 8 -> 1.*\); rerun with the data it was trained on"):
        _run(other, run, args)
    assert _run(shutil.copytree(data_dir, tmp_path / "moved"), run, args).resumed_from == 2
    # A run dir from before the data was recorded resumes (and records it from then on).
    config_file = run / "train_config.json"
    written = json.loads(config_file.read_text())
    del written["data"]
    config_file.write_text(json.dumps(written))
    assert _run(data_dir, run, args).resumed_from == 2
    assert "data" not in json.loads(config_file.read_text())  # a finished run's rerun writes nothing


@pytest.mark.parametrize("shard", ["train.bin", "val.bin"])
def test_a_token_id_outside_the_vocabulary_is_one_clear_line(shard, data_dir, tokenizer, tmp_path, capsys):
    """A damaged shard fails on the batch that reads the bad id, not in the embedding."""
    import shutil

    import numpy as np

    from tests.test_battery import assert_one_clear_line, run_main

    data = shutil.copytree(data_dir, tmp_path / "data")
    ids = np.memmap(data / shard, dtype=np.uint16, mode="r+")
    ids[::20] = 60_000
    ids.flush()
    del ids
    result = run_main(capsys, "pretrain", "--data", data, "--out", tmp_path / "run", *TINY, "max_steps=1")
    message = rf"{shard}: token id 60,000 at token [\d,]+ is not below the vocabulary size {tokenizer.vocab_size:,}; the shard is damaged"
    assert_one_clear_line(*result, message)
    if shard == "val.bin":  # `gpt1 eval` on the data dir reads it too
        model = run_main(capsys, "pretrain", "--data", data_dir, "--out", tmp_path / "good", *TINY, "max_steps=1")
        assert model[0] == 0, model[1]
        assert_one_clear_line(*run_main(capsys, "eval", "--model", tmp_path / "good", "--data", data), message)


class PoisonAfter:
    """Real training windows; from draw `at` on, the model's weights hold a NaN (as after a bad update)."""

    def __init__(self, source, model, at):
        self.source, self.model, self.at = source, model, at

    def next_batch(self):
        if self.source.draws == self.at:
            with torch.no_grad():
                self.model.transformer.ln_f.weight[0] = float("nan")
        return self.source.next_batch()

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state):
        self.source.load_state_dict(state)


def test_persistent_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, tokenizer):
    cfg = load_config(TrainConfig, None, TINY + ["max_steps=20", "save_every=2", "eval_every=100", "max_bad_steps=3"])
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, block_size=32))
    source = PoisonAfter(ShardWindows(data_dir / "train.bin", 32, 4, cfg.seed), model, at=3)
    val = fixed_windows(data_dir / "val.bin", 32, 4, 2)
    with pytest.raises(Gpt1Error, match=r"NaN/inf for 3 consecutive steps \(last at step 6\).*step-00000002"):
        train(model, cfg, tmp_path / "run", source, lambda: val, lambda d, m: save_model(d, m, tokenizer))
    assert latest_checkpoint(tmp_path / "run").name == "step-00000002"
    saved = load_model(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in saved.parameters())
    skipped = [r for r in _metrics(tmp_path / "run") if r.get("skipped")]
    assert [r["step"] for r in skipped] == [4, 5]  # the third bad step raised before logging


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from gpt1.train import checkpoint
    from gpt1.train.config import TrainConfig, load_config
    import gpt1.train.pretrain as pretrain_module

    data, out, kill_step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    real = checkpoint.save_safetensors

    def save_then_die(path, tensors, metadata=None):
        real(path, tensors, metadata)
        if Path(path).parent.name == f".step-{kill_step:08d}.tmp":
            os.kill(os.getpid(), signal.SIGKILL)  # the weights are written, the trainer state is not

    checkpoint.save_safetensors = save_then_die
    cfg = load_config(TrainConfig, None, sys.argv[4:])
    pretrain_module.pretrain(cfg, data, out)
""")


@pytest.mark.parametrize("variant", [["optimizer=adamw"], ["optimizer=muon"], ["precision=bf16-mixed", "float8=true"]],
                         ids=["adamw", "muon", "float8"])
def test_resume_after_sigkill_mid_save_ends_at_the_same_loss(data_dir, tmp_path, variant):
    """A run killed in the middle of its step-4 checkpoint resumes from step 2 and ends exactly
    where an uninterrupted run ends (same loss, same weights, same metrics), with either
    optimizer and with FP8 matmuls."""
    from safetensors.torch import load_file

    if "float8=true" in variant:
        pytest.importorskip("torchao.float8")
    args = TINY + ["max_steps=6", "save_every=2", "eval_every=3", *variant]
    straight = _run(data_dir, tmp_path / "straight", args[len(TINY):])
    script = tmp_path / "kill.py"
    script.write_text(KILL_DURING_SAVE)
    proc = subprocess.run([sys.executable, str(script), str(data_dir), str(tmp_path / "killed"), "4", *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "GPT1_QUIET": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    killed = tmp_path / "killed"
    assert (killed / "checkpoints" / ".step-00000004.tmp").is_dir()  # the interrupted save
    assert latest_checkpoint(killed).name == "step-00000002"  # the previous one is intact

    resumed = _run(data_dir, killed, args[len(TINY):])
    assert resumed.resumed_from == 2
    assert resumed.train_loss == straight.train_loss and resumed.val_loss == straight.val_loss
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(killed) == [{**r, "tokens_per_sec": m["tokens_per_sec"], "elapsed": m["elapsed"]}
                                for r, m in zip(_metrics(tmp_path / "straight"), _metrics(killed))]
    assert not (killed / "checkpoints" / ".step-00000004.tmp").exists()


def test_pretrain_cli_bad_inputs_change_nothing(data_dir, tmp_path, capsys):
    out = tmp_path / "r"
    cases = [
        (["--data", str(tmp_path / "nope")], "data directory not found"),
        (["--data", str(data_dir), "max_steps=1", "lr=fast"], "key 'lr' expects float"),
        (["--data", str(data_dir), "--config", "nope.toml"], "config file not found"),
        (["--data", str(data_dir), "model=huge"], "unknown model preset 'huge'"),
        (["--data", str(data_dir), "batch_size=0"], "batch_size must be at least 1"),
        # a NaN/inf run length, seed, lr or weight decay reached numpy/torch (tracebacks) or
        # trained to NaN weights and exited 0
        (["--data", str(data_dir), "epochs=nan"], "epochs must be a finite number >= 0, got nan"),
        (["--data", str(data_dir), "max_steps=2", "epochs=inf"], "epochs must be a finite number >= 0, got inf"),
        (["--data", str(data_dir), "max_steps=2", "seed=-1"], "seed must be a whole number in [0, 2**63), got -1"),
        (["--data", str(data_dir), "max_steps=2", f"seed={2**64}"], "seed must be a whole number in [0, 2**63)"),
        (["--data", str(data_dir), "max_steps=2", "lr=inf"], "need lr > 0 and 0 <= min_lr <= lr, got lr=inf"),
        (["--data", str(data_dir), "max_steps=2", "weight_decay=nan"], "weight_decay and grad_clip must be finite"),
    ]
    for args, pattern in cases:  # key=value overrides go after the options
        assert main(["pretrain", "--out", str(out), *args]) == 2
        assert pattern in capsys.readouterr().err
    assert not out.exists()


def test_corpus_smaller_than_a_context_window(tmp_path, tokenizer):
    (tmp_path / "c").mkdir()
    for i in range(4):
        (tmp_path / "c" / f"{i}.txt").write_text(f"tiny document {i}")
    prepare([str(tmp_path / "c")], tokenizer, tmp_path / "data", val=1)
    with pytest.raises(Gpt1Error, match=r"training split has 33 tokens, fewer than one context window \(65\); "
                                        r"prepare more text or a smaller --val, or use a smaller block_size"):
        _run(tmp_path / "data", tmp_path / "run", ["max_steps=1", "block_size=64"])
    assert not (tmp_path / "run").exists()
    with pytest.raises(Gpt1Error, match=r"validation split has 11 tokens, fewer than one context window \(17\); "
                                        r"prepare more text or a larger --val, or use a smaller block_size"):
        _run(tmp_path / "data", tmp_path / "run", ["max_steps=1", "block_size=16"])


def test_init_from_model_dir_and_tokenizer_mismatch(data_dir, tmp_path, tiny_model_dir, corpus_dir):
    import shutil

    result = _run(data_dir, tmp_path / "run", ["max_steps=2", f"init_from={tiny_model_dir}", "block_size=0"])
    assert result.steps == 2 and (tmp_path / "run" / "config.json").is_file()
    other, _ = train_tokenizer(iter_documents([str(corpus_dir / "json")]), 300, show_progress=False)
    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_model_dir, foreign)
    other.save(foreign)  # the model dir itself is now inconsistent: its config.json records another tokenizer
    with pytest.raises(Gpt1Error, match="not the tokenizer this model was trained with"):
        _run(data_dir, tmp_path / "run2", ["max_steps=2", f"init_from={foreign}"])
    assert not (tmp_path / "run2").exists()


def test_fp16_mixed_precision_saves_its_grad_scaler(data_dir, tmp_path):
    result = _run(data_dir, tmp_path / "run", ["max_steps=2", "save_every=2", "precision=fp16-mixed"])
    assert math.isfinite(result.train_loss)
    state = torch.load(latest_checkpoint(tmp_path / "run") / STATE_FILE, weights_only=True)
    assert state["scaler"]["scale"] > 0 and state["sampler"] == {"draws": 2, "order": "epochs"} and state["step"] == 2
    assert set(state["rng"]) == {"torch", "cuda", "numpy", "python"}


def _pretrain_cli(data_dir, out, overrides, crash_at=None):
    env = {**os.environ, "GPT1_QUIET": "1", **({"GPT1_CRASH_AT": crash_at} if crash_at else {})}
    return subprocess.run([sys.executable, "-m", "gpt1", "pretrain", "--data", str(data_dir), "--out", str(out),
                           *TINY, *overrides], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_a_kill_between_the_final_checkpoint_and_the_outputs_is_completed_on_rerun(data_dir, tmp_path, capsys):
    """Issue 17 item 2: killed after the final checkpoint, before the model files and loss.png,
    the rerun said "already finished" and kept the step-2 model without a plot."""
    from safetensors.torch import load_file

    from tests.test_battery import run_main

    overrides = ["max_steps=4", "save_every=2", "eval_every=2"]
    killed = _pretrain_cli(data_dir, tmp_path / "run", overrides, crash_at="before-outputs:2")
    assert killed.returncode == 137, killed.stderr
    run = tmp_path / "run"
    assert latest_checkpoint(run).name == "step-00000004" and not (run / "loss.png").exists()
    final = load_file(str(latest_checkpoint(run) / "trainable.safetensors"))
    assert not all(torch.equal(final[k], t) for k, t in load_file(str(run / "model.safetensors")).items() if k in final)
    rc, stderr = run_main(capsys, "pretrain", "--data", data_dir, "--out", run, *TINY, *overrides)  # in-process
    assert rc == 0, stderr
    assert "outputs are older than its last checkpoint" in stderr
    written = load_file(str(run / "model.safetensors"))
    assert all(torch.equal(final[k], written[k]) for k in final)
    assert (run / "loss.png").is_file() and (latest_checkpoint(run) / "outputs.done").is_file()


class NanForwardOnce:
    """Real windows; at draw `at` one forward pass gives a NaN loss (as an fp16 overflow in the
    forward would) while the weights stay finite."""

    def __init__(self, source, model, at):
        self.source, self.model, self.at = source, model, at

    def next_batch(self):
        if self.source.draws == self.at:
            def nan_loss(module, inputs, output):
                handle.remove()
                logits, loss = output
                return logits, loss * float("nan")

            handle = self.model.register_forward_hook(nan_loss)
        return self.source.next_batch()

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state):
        self.source.load_state_dict(state)


@pytest.mark.slow
def test_a_non_finite_loss_on_a_save_step_still_saves_or_warns(data_dir, tmp_path, tokenizer, caplog):
    """Issue 16: a NaN loss on a save step (here the final one) skipped the checkpoint silently,
    so the run never finished. With finite weights it is saved; with NaN weights a warning says so,
    and the run fails (it printed "done" and exited 0 with no final model)."""
    cfg = load_config(TrainConfig, None, TINY + ["max_steps=4", "save_every=2", "eval_every=100", "max_bad_steps=5"])
    val = fixed_windows(data_dir / "val.bin", 32, 4, 2)
    for poison, run in ((NanForwardOnce, "finite"), (PoisonAfter, "nan")):
        torch.manual_seed(0)
        model = GPT(ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, block_size=32))
        source = poison(ShardWindows(data_dir / "train.bin", 32, 4, cfg.seed), model, at=3)
        with (pytest.raises(Gpt1Error, match=r"ended at step 4 with non-finite weights.*step-00000002")
              if run == "nan" else contextlib.nullcontext()):
            train(model, cfg, tmp_path / run, source, lambda: val, lambda d, m: save_model(d, m, tokenizer))
        assert [r["step"] for r in _metrics(tmp_path / run) if r.get("skipped")] == [4]
    assert latest_checkpoint(tmp_path / "finite").name == "step-00000004"
    assert all(torch.isfinite(p).all() for p in load_model(tmp_path / "finite").parameters())
    assert latest_checkpoint(tmp_path / "nan").name == "step-00000002"
    assert "step 4: no checkpoint saved: the loss and the weights are not finite" in caplog.text


RESAVE = textwrap.dedent("""
    import sys
    import torch
    from gpt1.train.checkpoint import save_checkpoint
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    save_checkpoint(sys.argv[1], 5, model, {"n": 1})
    with torch.no_grad():
        model.weight.add_(1)
    save_checkpoint(sys.argv[1], 5, model, {"n": 2})
""")


def test_resaving_a_step_killed_between_the_renames_keeps_a_checkpoint(tmp_path):
    """Issue 16: re-saving an existing step deleted it before renaming the new one in; a kill
    between the two left no checkpoint at all. Now the old one is moved aside and restored."""
    from gpt1.train.checkpoint import load_checkpoint, remove_partial_saves

    script = tmp_path / "resave.py"
    script.write_text(RESAVE)
    killed = subprocess.run([sys.executable, str(script), str(tmp_path / "run")], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "GPT1_CRASH_AT": "checkpoint-aside"})
    assert killed.returncode == 137, killed.stderr
    remove_partial_saves(tmp_path / "run")
    assert latest_checkpoint(tmp_path / "run").name == "step-00000005"
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"), torch.nn.Linear(3, 2))["n"] == 1
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "run2")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(latest_checkpoint(tmp_path / "run2"), torch.nn.Linear(3, 2))["n"] == 2
    assert sorted(p.name for p in (tmp_path / "run2" / "checkpoints").iterdir()) == ["step-00000005"]


def test_a_checkpoint_holding_nan_is_refused_by_name_on_resume(tmp_path):
    """A NaN in a checkpoint's trainable weights (a step that diverged, a hand-edited file) was
    loaded and only caught a step later as a non-finite loss: now refused by file and tensor."""
    from gpt1.train.checkpoint import load_checkpoint, save_checkpoint

    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.bias[1] = float("nan")
    save_checkpoint(tmp_path / "run", 5, model, {"n": 1})
    with pytest.raises(Gpt1Error, match=r"trainable\.safetensors: bias holds NaN or infinite values: the checkpoint"):
        load_checkpoint(latest_checkpoint(tmp_path / "run"), torch.nn.Linear(3, 2))


@pytest.mark.slow
def test_a_finetune_killed_before_its_adapter_is_completed_on_rerun(tiny_model_dir, tmp_path, capsys):
    """Issue 17 item 2 for `finetune`: the run is finished only once its adapter and loss.png
    were written from the final checkpoint."""
    from tests.test_battery import run_main

    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                                                     {"role": "assistant", "content": f"{2 * i}"}]}) + "\n"
                            for i in range(30)))
    args = ["finetune", "--base", str(tiny_model_dir), "--data", str(chat), "--out", str(tmp_path / "ft"),
            "batch_size=4", "block_size=48", "eval_batches=1", "device=cpu", "max_steps=2", "save_every=2",
            "val_fraction=0.2", "lora_r=2"]
    env = {**os.environ, "GPT1_QUIET": "1"}
    killed = subprocess.run([sys.executable, "-m", "gpt1", *args], capture_output=True, text=True, timeout=300,
                            env={**env, "GPT1_CRASH_AT": "before-outputs:1"})
    assert killed.returncode == 137, killed.stderr
    run = tmp_path / "ft"
    assert latest_checkpoint(run).name == "step-00000002" and not (run / "adapter").exists()
    rc, stderr = run_main(capsys, *args)  # the rerun: in-process (the kill above needs a process of its own)
    assert rc == 0, stderr
    assert "outputs are older than its last checkpoint" in stderr
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "loss.png").is_file()
    lora = load_model(run, adapter="keep")
    from safetensors.torch import load_file

    trained = load_file(str(latest_checkpoint(run) / "trainable.safetensors"))
    params = dict(lora.named_parameters())
    assert all(torch.equal(params[name], tensor) for name, tensor in trained.items())

# ---- speed features: projected time, compile fallback, bf16 -----------------------------------

def test_projected_wall_time_is_logged_once_the_rate_settles(data_dir, tmp_path, caplog):
    with caplog.at_level("INFO", logger="gpt1"):
        _run(data_dir, tmp_path / "run", ["max_steps=20", "eval_every=20", "save_every=20"])
    projected = [r.message for r in caplog.records if "projected wall time" in r.message]
    assert len(projected) == 1 and "for 20 steps at" in projected[0]


@pytest.mark.slow
def test_a_failing_torch_compile_falls_back_to_eager_with_one_warning(data_dir, tmp_path, compile_fallback_run):
    """Inductor's C++ build fails for real (no compiler): the run warns once and trains eagerly."""
    proc, run, steps = compile_fallback_run
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("torch.compile failed") == 1, proc.stderr
    assert "training continues without it" in proc.stderr
    eager = _run(data_dir, tmp_path / "eager", steps)
    assert [r["loss"] for r in _metrics(run)] == [r["loss"] for r in _metrics(tmp_path / "eager")]
    assert eager.steps == 3


def test_bf16_mixed_trains_on_cpu(data_dir, tmp_path):
    result = _run(data_dir, tmp_path / "run", ["max_steps=3", "save_every=3", "eval_every=3", "precision=bf16-mixed"])
    assert math.isfinite(result.train_loss) and math.isfinite(result.val_loss)
    state = torch.load(latest_checkpoint(tmp_path / "run") / STATE_FILE, weights_only=True)
    assert state["scaler"] == {}  # bf16 needs no loss scaling


# ---- the time budget -------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", [[], ["cooldown=0.3"]], ids=["cosine", "warmup-stable-decay"])
def test_a_time_budget_ends_the_run_and_its_schedule_when_spent(data_dir, tmp_path, schedule):
    """time_budget stops the run when the budget is spent, long before max_steps, with the LR
    schedule planned on the steps that fit (it reaches min_lr at the last step); the last step
    is validated and saved, and a rerun knows the run is finished."""
    run = tmp_path / "budget"
    overrides = ["max_steps=100000", "time_budget=3", "eval_every=25", "save_every=25", "warmup=0.05", *schedule]
    result = _run(data_dir, run, overrides)
    assert 10 <= result.steps < 100000  # at least 10 steps, whatever the budget (a busy machine fits no more)
    lines = [m for m in _metrics(run) if m.get("loss") is not None]
    assert lines[-1]["step"] == result.steps
    rates = [m["lr"] for m in lines]
    peak = rates.index(max(rates))
    assert all(a < b for a, b in zip(rates[:peak], rates[1:peak + 1]))  # the warmup rose to the top
    assert all(b <= a for a, b in zip(rates[peak:], rates[peak + 1:]))  # then never rose again
    # On quiet cores (100+ steps in the 3 s) the warmup's 5% ends long before the cooldown: it
    # reaches lr, and the schedule runs to its end. A machine busy with other work may fit so few
    # steps, at times swinging 20x, that time runs short first (tested without a clock to race:
    # test_a_time_budget_plans_from_the_recent_step_time_and_finishes_a_plan_a_little_short).
    if result.steps >= 40:
        assert rates[-1] == pytest.approx(3e-4, rel=0.05)  # min_lr at the last step
        assert rates[peak] == pytest.approx(3e-3, rel=0.05)
        if schedule:  # the peak held until the cooldown (the last 30% of the budget's time)
            held = [m for m in lines[peak:] if m["lr"] == pytest.approx(3e-3)]
            assert len(held) >= 2 and held[-1]["step"] - held[0]["step"] == len(held) - 1
    assert "val_loss" in lines[-1] and (run / "loss.png").is_file()
    state = torch.load(latest_checkpoint(run) / STATE_FILE, weights_only=True)
    assert state["step"] == state["end"] == result.steps
    # Spent by the run's end, its final checkpoint included (saved after the state it holds), which the plan keeps time for.
    assert result.budget_spent > 0.9 * 3.0 and result.budget_spent > state["budget_spent"]
    again = _run(data_dir, run, overrides)
    assert again.steps == result.steps and again.resumed_from == result.steps


def test_a_budget_run_capped_by_max_steps_follows_the_plain_schedule(data_dir, tmp_path):
    """Where max_steps ends the run before the budget, the plan is exact: the cooldown starts by
    steps (the budget's time would never say so) and the rates are lr_at's."""
    run = tmp_path / "capped"
    _run(data_dir, run, ["max_steps=20", "time_budget=1000", "eval_every=20", "save_every=20", "warmup=0.1",
                         "cooldown=0.3"])
    lrs = [m["lr"] for m in _metrics(run) if m.get("loss") is not None]
    assert lrs == pytest.approx([lr_at(s, 20, 3e-3, 3e-4, 0.1, 0.3) for s in range(20)])
    assert lrs[-1] == pytest.approx(3e-4) and lrs[10] == pytest.approx(3e-3)


def test_training_progress_off_a_terminal_is_a_few_lines_not_one_per_step(data_dir, tmp_path, monkeypatch, capsys):
    """Off a terminal a bar prints a line every few seconds; the per-step loss in the bar's
    postfix must not force a line of its own at every step."""
    monkeypatch.setenv("GPT1_QUIET", "0")
    _run(data_dir, tmp_path / "run", ["max_steps=40", "eval_every=40", "save_every=40"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("run:")]
    assert 1 <= len(lines) <= 8, lines
    assert "40/40" in lines[-1]
    assert sum("40/40" in line for line in lines) == 1, lines


# ---- the optimizer -----------------------------------------------------------------------------
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(data_dir, tmp_path):
    from gpt1.train.optim import Optimizers, build_optimizer
    from gpt1.train.schedule import lr_at

    model = GPT(ModelConfig.preset("tiny"))
    cfg = load_config(TrainConfig, None, ["optimizer=muon", "muon_lr_scale=3"])
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(optimizer, Optimizers)
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    on_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert on_muon == {n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert on_muon | on_adamw == set(names.values()) and not on_muon & on_adamw
    assert {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"} <= on_adamw
    assert load_config(TrainConfig, None, []).optimizer == "adamw"  # the model card's, by default
    assert isinstance(build_optimizer(model, load_config(TrainConfig, None, []), torch.device("cpu")), torch.optim.AdamW)

    # A run: the loss falls, and Muon's group ran at lr x muon_lr_scale of the schedule.
    result = _run(data_dir, tmp_path / "run", ["max_steps=12", "save_every=12", "eval_every=12", "optimizer=muon",
                                               "muon_lr_scale=3", "warmup=0"])
    losses = [m["loss"] for m in _metrics(tmp_path / "run") if "loss" in m]
    assert math.isfinite(result.train_loss) and losses[-1] < losses[0]
    state = torch.load(latest_checkpoint(tmp_path / "run") / STATE_FILE, weights_only=True)
    muon_state, adamw_state = state["optimizer"]["optimizers"]
    last_lr = lr_at(11, 12, 3e-3, 3e-4, 0.0)
    assert math.isclose(muon_state["param_groups"][0]["lr"], 3 * last_lr)
    assert all(math.isclose(g["lr"], last_lr) for g in adamw_state["param_groups"])
    # A checkpoint of one optimizer is refused by the other, by name, not with a KeyError.
    with pytest.raises(Gpt1Error, match="optimizer"):
        _run(data_dir, tmp_path / "run", ["max_steps=14", "save_every=12", "eval_every=12", "warmup=0"])


def test_a_second_process_training_in_the_same_run_dir_is_refused(data_dir, tmp_path, capsys):
    """Two runs in one --out (a command started twice) deleted each other's partial saves and
    interleaved their metrics; the second is now refused while the first lives, and a SIGKILLed
    run leaves no stale lock behind."""
    from tests.test_battery import assert_one_clear_line, run_main

    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "gpt1", "pretrain", "--data", str(data_dir), "--out", str(out),
                              *TINY, "max_steps=100000", "save_every=100000", "eval_every=100000"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "GPT1_QUIET": "1"})
    try:
        deadline = time.monotonic() + 60
        while not (out / "metrics.jsonl").is_file():  # its first step is done: it holds the run dir
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        second = run_main(capsys, "pretrain", "--data", data_dir, "--out", out, *TINY, "max_steps=100000",
                          "save_every=100000", "eval_every=100000")
        assert_one_clear_line(*second, rf"checkpoints: process {first.pid} is training there already; wait for it")
    finally:
        first.kill()
        first.wait()
    from gpt1.core.io import exclusive

    with exclusive(out / "checkpoints", "training"):  # the killed process's lock went with it
        assert (out / "checkpoints" / ".lock").read_text() == f"process {os.getpid()}"


# ---- resuming: paths spelled otherwise, torchrun's rank 0 ------------------------------------

def _chat_file(path: Path) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                                                     {"role": "assistant", "content": f"{2 * i}"}]}) + "\n"
                            for i in range(30)))
    return path


FT_ARGS = ["batch_size=4", "block_size=48", "eval_batches=1", "device=cpu", "max_steps=2", "save_every=1",
           "val_fraction=0.2", "lora_r=2"]


def test_a_path_spelled_otherwise_resumes_the_run(data_dir, tiny_model_dir, tmp_path, monkeypatch):
    """init_from=base/ (or ./base, or its absolute path) after init_from=base was refused as
    another config."""
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    args = ["max_steps=2", "block_size=0"]
    assert _run(data_dir, "run", [*args, "init_from=base"]).resumed_from == 0
    for spelling in ("base/", "./base", str(tmp_path / "base")):
        assert _run(data_dir, "run", [*args, f"init_from={spelling}"]).resumed_from == 2
    with pytest.raises(Gpt1Error, match=r"different config \(init_from: '.*base' -> 'scratch'\)"):
        _run(data_dir, "run", args)


def test_a_finetune_resumes_from_a_copy_of_its_base_and_its_data_spelled_otherwise(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    """--data ./chat.jsonl after --data chat.jsonl, and the same base weights at another path
    (a fine-tune records its base's sha256 in base.json), were refused as another config."""
    import shutil

    from gpt1.train.finetune import FinetuneConfig, finetune

    shutil.copytree(tiny_model_dir, tmp_path / "copy")
    monkeypatch.chdir(tmp_path)
    _chat_file(tmp_path / "chat.jsonl")
    assert finetune(load_config(FinetuneConfig, None, FT_ARGS, data="chat.jsonl"), tiny_model_dir, "ft").steps == 2
    again = finetune(load_config(FinetuneConfig, None, FT_ARGS, data="./chat.jsonl"), "copy", "ft")
    assert again.resumed_from == 2


def test_finetune_merges_and_reports_on_rank_0_only(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """Under torchrun every rank ran --merge (all writing OUT/merged at once) and printed the
    "chat model:" line: the rank was read after finetune had left the process group. Here: what
    rank 1 does once finetune returned (the process group, joined and left, is left out)."""
    from gpt1.train import distributed

    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "setup", lambda device="auto": distributed.DistInfo())
    monkeypatch.setenv("GPT1_QUIET", "1")
    out = tmp_path / "ft"
    rc = main(["finetune", "--base", str(tiny_model_dir), "--data", str(_chat_file(tmp_path / "chat.jsonl")),
               "--out", str(out), "--merge", *FT_ARGS])
    assert rc == 0 and (out / "adapter").is_dir()
    assert not (out / "merged").exists() and "chat model:" not in caplog.text


def test_a_loss_plot_that_cannot_be_drawn_is_a_warning_not_a_failed_run(data_dir, tmp_path, caplog):
    """Drawing loss.png failed (matplotlib's fonts past `ulimit -n`, its extension past `ulimit -v`)
    after the model was written: a traceback, exit 1, and the outputs not marked as written. Here
    a run killed before its outputs is rerun with a folder where loss.png goes."""
    from gpt1.train import checkpoint as ckpt

    run, args = tmp_path / "run", ["max_steps=2", "eval_every=2", "save_every=2"]
    _run(data_dir, run, args)
    (run / "loss.png").unlink()
    (run / "loss.png").mkdir()
    (run / "loss.png" / "keep").write_text("x")  # a non-empty folder: the image cannot replace it
    marker = next((run / "checkpoints").glob("step-*")) / ckpt.OUTPUTS_FILE
    marker.unlink()
    caplog.clear()
    _run(data_dir, run, args)
    assert any("loss.png not drawn" in r.getMessage() and f"gpt1 plot {run}" in r.getMessage() for r in caplog.records)
    assert marker.is_file() and (run / "model.safetensors").is_file()


# The model's dropout (`dropout`), and what `gpt1 pretrain` says of its `init_from` (a GPT-2 import
# without a gpt1 tokenizer, its shape keys) and when it says it.

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: everything here is local

TINY_DEFAULT_LR = ["model=tiny", "block_size=32", "batch_size=4", "eval_batches=2", "device=cpu"]


def _cfg(overrides: list[str]) -> TrainConfig:
    return load_config(TrainConfig, None, overrides)


# ---- dropout ----------------------------------------------------------------------------------

def _gpt2_folder(path: Path, tokenizer=None) -> Path:
    """A random GPT-2 saved by transformers, at its default dropout (0.1), with `tokenizer` or none."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=TEST_VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save(path)
    return path


def _drops(model) -> bool:
    """Whether two forwards in training mode differ: the model drops activations."""
    x = torch.randint(0, TEST_VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.no_grad():
        return not torch.equal(model(x), model(x))


def test_dropout_of_a_gpt2_import_is_its_own_unless_the_key_sets_it(tmp_path, tokenizer):
    folder = _gpt2_folder(tmp_path / "gpt2", tokenizer)
    own = init_model(_cfg([f"init_from=hf:{folder}"]), tokenizer)
    assert own.config.dropout == pytest.approx(0.1) and _drops(own)
    off = init_model(_cfg([f"init_from=hf:{folder}", "dropout=0"]), tokenizer)
    assert off.config.dropout == 0.0 and not _drops(off)
    assert all(m.p == 0.0 for m in off.modules() if isinstance(m, torch.nn.Dropout))
    on = init_model(_cfg(["dropout=0.2"]), tokenizer)  # from scratch
    assert on.config.dropout == pytest.approx(0.2) and _drops(on)


def test_a_run_with_dropout_records_it_and_says_it(data_dir, tmp_path, caplog):
    with caplog.at_level("INFO", logger="gpt1"):
        pretrain(_cfg([*TINY_DEFAULT_LR, "max_steps=1", "dropout=0.1"]), data_dir, tmp_path / "run")
    assert gpt1.load(tmp_path / "run", device="cpu").config.dropout == pytest.approx(0.1)
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["config"]["dropout"] == 0.1
    (line,) = [r.message for r in caplog.records if r.message.startswith("model: ")]
    assert "(tiny, dropout 0.1); " in line


def test_a_gpt2_import_without_a_gpt1_tokenizer_is_said(tmp_path, tokenizer, caplog):
    with caplog.at_level("WARNING", logger="gpt1"):
        init_model(_cfg([f"init_from=hf:{_gpt2_folder(tmp_path / 'with', tokenizer)}"]), tokenizer)
    assert "no gpt1 tokenizer" not in caplog.text
    folder = _gpt2_folder(tmp_path / "without")
    with caplog.at_level("WARNING", logger="gpt1"):
        init_model(_cfg([f"init_from=hf:{folder}"]), tokenizer)
    (warning,) = [r.message for r in caplog.records if "no gpt1 tokenizer" in r.message]
    assert warning == (f"init_from=hf:{folder} has no gpt1 tokenizer: the data's token ids name other strings than "
                       "its embeddings and head learned; only the blocks carry over (docs/interop.md)")


# ---- init_from and the run's announcement --------------------------------------------------------

def test_shape_keys_equal_to_init_froms_are_accepted_and_others_named(tiny_model_dir, tokenizer):
    model = init_model(_cfg([f"init_from={tiny_model_dir}", "n_layer=2", "n_head=4", "n_embd=64"]), tokenizer)
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (2, 4, 64)
    with pytest.raises(Gpt1Error, match=r"^n_layer=3, n_embd=96: init_from=.* is 2 layers x 64 wide, 4 heads, and "
                                        r"init_from decides the model; leave n_layer and n_embd out, or set "
                                        r"n_layer=2, n_embd=64$"):
        init_model(_cfg([f"init_from={tiny_model_dir}", "n_layer=3", "n_head=4", "n_embd=96"]), tokenizer)


def test_a_refused_resume_does_not_announce_the_run(data_dir, tmp_path, caplog):
    with caplog.at_level("INFO", logger="gpt1"):
        pretrain(_cfg([*TINY_DEFAULT_LR, "max_steps=1"]), data_dir, tmp_path / "run")
    assert [r for r in caplog.records if r.message.startswith("model: ")]
    caplog.clear()
    with caplog.at_level("INFO", logger="gpt1"), pytest.raises(Gpt1Error, match="holds a run with a different config"):
        pretrain(_cfg([*TINY_DEFAULT_LR, "max_steps=1", "lr=1e-3"]), data_dir, tmp_path / "run")
    assert not [r for r in caplog.records if r.message.startswith("model: ")]


# The peak FLOP/s an MFU is reported against: the named card's own.

@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA GH200 480GB", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla T4", 65e12),
    ("NVIDIA GeForce RTX 4090", 165e12),
    # A substring of another card's name: an A100's peak for a small workstation card, a T4's for
    # a T400 (no tensor cores); unknown cards get no MFU rather than a wrong one.
    ("NVIDIA RTX A1000", None), ("NVIDIA T400 4GB", None), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12),
])
def test_the_peak_is_the_named_cards_own(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda")) == peak
