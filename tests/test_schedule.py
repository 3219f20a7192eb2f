"""The learning-rate schedule under a time budget (`gpt1.train.schedule.BudgetSchedule`): a warmup
that never jumps (a first measured plan whose warmup was already over ended it in one 12.5x jump),
and on a steady machine the same rates as the fixed schedule."""

from __future__ import annotations

import itertools
import json

import pytest

from gpt1.cli import main
from gpt1.train.budget import TimeBudget
from gpt1.train.config import TrainConfig
from gpt1.train.distributed import current
from gpt1.train.finetune import FinetuneConfig, finetune
from gpt1.train.schedule import BudgetSchedule, lr_at, warmup_steps
from tests.test_battery import assert_one_clear_line, run_main
from tests.test_finetune import _cfg_no_val, _chat_file, _metrics

LR, MIN_LR, WARMUP = 3e-3, 1e-4, 0.05


def _rates(plans: list[int], cooldown: float, due_from: int, schedule: BudgetSchedule | None = None,
           start: int = 0) -> list[float]:
    """The rates of steps `start`.. on `plans` (the plan each step sees), the cooldown due by time from `due_from`."""
    schedule = schedule or BudgetSchedule(LR, MIN_LR, WARMUP, cooldown)
    return [schedule.at(step, plans[step], step >= due_from) for step in range(start, len(plans))]


def _rises_to_the_peak_then_never(rates: list[float]) -> int:
    peak = rates.index(max(rates))
    assert all(a < b for a, b in zip(rates[:peak], rates[1:peak + 1])), rates[:peak + 1]
    assert all(b <= a for a, b in zip(rates[peak:], rates[peak + 1:]))
    return peak


@pytest.mark.parametrize("cooldown", [0.0, 0.3], ids=["cosine", "warmup-stable-decay"])
def test_a_plan_that_shrinks_past_the_warmups_end_doubles_the_rate_at_most_up_to_lr(cooldown):
    """A time budget's steps 0-7 follow the recipe's 2,000 steps (a 100-step warmup); the first
    measured plan, 100 steps, wants a 5-step warmup, already over: the rate jumped from 8% of lr
    to lr at step 8 (12.5x). It doubles at most, reaches lr exactly a few steps later, then decays
    to min_lr at the planned end as before."""
    plans = [2000] * 8 + [100] * 92
    rates = _rates(plans, cooldown, due_from=70)
    peak = _rises_to_the_peak_then_never(rates)
    assert max(b / a for a, b in zip(rates[1:peak], rates[2:peak + 1])) <= 2.0 + 1e-12
    assert rates[peak] == LR and 8 < peak <= 8 + 4  # a few steps more: 8% x 2 x 2 x 2 x 2 >= 100%
    assert rates[-1] == pytest.approx(MIN_LR)

    # Resumed from its state anywhere (inside the longer warmup too), it goes on the same.
    for cut in (9, 10, 11, 12, 50):
        first = BudgetSchedule(LR, MIN_LR, WARMUP, cooldown)
        before = [first.at(step, plans[step], step >= 70) for step in range(cut)]
        resumed = BudgetSchedule(LR, MIN_LR, WARMUP, cooldown, json.loads(json.dumps(first.state_dict())))
        assert before + _rates(plans, cooldown, 70, resumed, start=cut) == rates, cut


@pytest.mark.parametrize("first_plan", [2000, 100_000])
def test_a_plan_whose_warmup_ends_a_few_steps_ahead_bends_the_ramp_without_a_jump(first_plan):
    """A first measured plan whose warmup ends at the next step lifted the rate straight to lr (a
    plan of 180 steps after 8 on 2,000: 12.5x). Each warmup step rises at most 2x the rate before,
    or twice the plan's own warmup slope (lr / its warmup steps) where that is more: a long first
    plan's tiny rates are bent onto the measured plan's line, as before."""
    for measured_at, plan in itertools.product(range(4, 12), range(20, 400, 7)):
        rates = _rates([first_plan] * measured_at + [plan] * (plan - measured_at), 0.0, due_from=plan)
        peak = _rises_to_the_peak_then_never(rates)
        # lr, unless the plan ends first (11 steps at 0.2% of lr, then a 20-step plan): its last step decays all the same
        assert (rates[peak] == LR or peak == len(rates) - 2) and rates[-1] == pytest.approx(MIN_LR)
        slope = LR / warmup_steps(plan, WARMUP)
        for step in range(measured_at, peak + 1):
            before, now = rates[step - 1], rates[step]
            bound = max(2 * before, before + 2 * slope) if step < warmup_steps(plan, WARMUP) else 2 * before
            assert now <= bound * (1 + 1e-12), (measured_at, plan, step, before, now)


def test_a_time_budget_run_whose_warmup_outlasts_its_first_measured_plan_never_jumps():
    """As the loop drives it, on a fake clock: a 2,000-step recipe, 0.1 s a step, a 10 s budget
    (100 steps). The measured plan comes after eight steps on the recipe's warmup (runs/warm20)."""
    now = [0.0]
    budget = TimeBudget(10.0, 0.0, 2000, eval_every=1000, clock=lambda: now[0])
    schedule, end, rates = BudgetSchedule(LR, MIN_LR, WARMUP, 0.0), 2000, []
    for step in itertools.count():
        if step >= end:
            break
        due = budget.cooldown_due or (end == 2000 and schedule.in_planned_cooldown(step, end))
        rates.append(schedule.at(step, end, due, warm_end=budget.warm_end))
        now[0] += 0.1
        end = budget.plan(step + 1, end, current())
    assert 95 <= len(rates) <= 101
    peak = _rises_to_the_peak_then_never(rates)
    assert rates[peak] == LR and max(b / a for a, b in zip(rates[1:peak], rates[2:peak + 1])) <= 2.0 + 1e-12
    assert rates[-1] == pytest.approx(MIN_LR)


@pytest.mark.parametrize("steps, warmup, cooldown", [(200, 0.05, 0.0), (200, 0.05, 0.3), (2, 0.75, 0.0), (7, 0.3, 0.5)])
def test_a_steady_budget_schedule_is_still_the_fixed_one(steps, warmup, cooldown):
    """The bounds do not touch a warmup on a steady plan (its step 1 is 2x its step 0)."""
    schedule = BudgetSchedule(LR, MIN_LR, warmup, cooldown)
    rates = [schedule.at(s, steps, schedule.in_planned_cooldown(s, steps)) for s in range(steps)]
    assert rates == pytest.approx([lr_at(s, steps, LR, MIN_LR, warmup, cooldown) for s in range(steps)], rel=1e-12, abs=0)


# The schedule's edges (one step, a warmup of every step) and warmup + cooldown = 1, found by a
# property-based comparison with reference loops.

# ---- the schedule's edges -------------------------------------------------------------------

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
    result = finetune(_cfg_no_val(chat, "batch_size=4"), tiny_model_dir, out)
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
    finetune(_cfg_no_val(chat, "batch_size=2", "max_steps=2", "warmup=0.75", "lr=1e-3", "min_lr=1e-5"), tiny_model_dir, out)
    assert [m["lr"] for m in _metrics(out) if "lr" in m] == [1e-3, 1e-5]


# ---- warmup + cooldown = 1 ------------------------------------------------------------------

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


# The WSD cooldown's last rate.

# ---- the WSD cooldown's last rate -------------------------------------------------------------

def test_the_cooldowns_last_step_is_exactly_min_lr():
    """lr + 1.0 * (min_lr - lr) ended 3e-4 -> 1e-6 at 1.0000000000000243e-06."""
    for lr, min_lr in [(3e-4, 1e-6), (3e-3, 3e-4), (1e-3, 1e-4), (0.1, 0.01)]:
        for steps in (10, 37, 1000):
            assert lr_at(steps - 1, steps, lr, min_lr, 0.1, 0.3) == min_lr
            rates = [lr_at(s, steps, lr, min_lr, 0.1, 0.3) for s in range(steps // 10, steps)]  # past the warmup
            assert all(a >= b > min_lr for a, b in zip(rates, rates[1:-1]))  # falling, above min_lr to the last
    assert lr_at(8, 10, 3e-4, 1e-6, 0.0, 0.3) == 3e-4 + (2 / 3) * (1e-6 - 3e-4)  # unchanged before the last
