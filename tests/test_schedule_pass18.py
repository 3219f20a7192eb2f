"""Pass 18: a time budget's warmup that never jumps (a first measured plan whose warmup was already
over ended it in one 12.5x jump), and the lines that name the way on: the refusal of a run dir
holding another config, Ctrl-C's, `gpt1 pretrain --help`'s, `gpt1 finetune`'s."""

from __future__ import annotations

import itertools
import json

import pytest

from gpt1.core.errors import Gpt1Error
from gpt1.train.budget import TimeBudget
from gpt1.train.config import TrainConfig, load_config
from gpt1.train.distributed import current
from gpt1.train.finetune import FinetuneConfig, finetune
from gpt1.train.pretrain import pretrain
from gpt1.train.schedule import BudgetSchedule, lr_at, warmup_steps
from tests.test_battery import assert_one_clear_line, run_main

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


# ---- the warmup of a plan that shrinks past its end ----------------------------------------------

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


# ---- the refusal of another config names the way on --------------------------------------------

TINY = ["model=tiny", "block_size=32", "batch_size=4", "eval_batches=1", "device=cpu", "eval_every=100"]


def test_a_finished_run_asked_for_more_steps_names_what_may_change_and_how_to_train_on(data_dir, tmp_path):
    """`max_steps: 2 -> 4` was refused with "rerun with the same config": no way on. The refusal
    names the keys a resume may change and the new run that trains on from the weights, which works."""
    run, more = tmp_path / "run", tmp_path / "more"
    pretrain(load_config(TrainConfig, None, [*TINY, "max_steps=2"]), data_dir, run)
    with pytest.raises(Gpt1Error) as refused:
        pretrain(load_config(TrainConfig, None, [*TINY, "max_steps=4"]), data_dir, run)
    message = str(refused.value)
    assert "different config (max_steps: 2 -> 4)" in message
    assert ("a resume may change only device, eval_batches, eval_every, gradient_checkpointing, keep_best, "
            "keep_checkpoints, max_bad_steps, save_every, tensorboard") in message
    assert message.endswith(f"with a fresh optimizer and LR warmup): --out NEW init_from={run}")
    result = pretrain(load_config(TrainConfig, None, [*TINY, "max_steps=4", f"init_from={run}"]), data_dir, more)
    assert result.steps == 4 and result.resumed_from == 0


def _sums_chat_file(path, count: int) -> None:
    """`count` one-turn chats ("what is i plus i?" / "2i.") as {"messages"} records in `path`."""
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                                                     {"role": "assistant", "content": f"{2 * i}."}]}) + "\n"
                            for i in range(count)))


def test_a_finished_finetune_asked_for_more_steps_names_its_base_flag(tiny_model_dir, tmp_path):
    chat, run = tmp_path / "chat.jsonl", tmp_path / "run"
    _sums_chat_file(chat, 4)

    def cfg(*overrides: str) -> FinetuneConfig:
        return load_config(FinetuneConfig, None, ["block_size=48", "batch_size=2", "device=cpu", "lora_r=2",
                                                  "val_fraction=0", *overrides], data=str(chat))

    finetune(cfg("max_steps=1"), tiny_model_dir, run)
    with pytest.raises(Gpt1Error, match=r"\(max_steps: 1 -> 2\); .*a resume may change only .*"
                                        rf"LR warmup\): --out NEW --base {run}$"):
        finetune(cfg("max_steps=2"), tiny_model_dir, run)
    assert finetune(cfg("max_steps=2"), run, tmp_path / "more").steps == 2  # the way it names works


# ---- Ctrl-C names the checkpoint a rerun resumes from ---------------------------------------------

def test_ctrl_c_names_the_step_a_rerun_resumes_from(data_dir, tmp_path, capsys, stop_training_at):
    """`interrupted; run the same command again to resume` did not say from where: the steps
    after the latest checkpoint are lost."""
    stop_training_at(4, KeyboardInterrupt)  # inside step 4: steps 1-3 done, checkpoints every 2
    rc, err = run_main(capsys, "pretrain", "--data", data_dir, "--out", tmp_path / "run", *TINY, "max_steps=6",
                       "save_every=2")
    assert rc == 130
    assert err.rstrip().endswith("gpt1 pretrain: interrupted; its latest checkpoint is step 2 (any steps after it "
                                 "are lost); run the same command again to resume"), err


def test_pretrain_help_does_not_promise_a_projected_time_to_a_time_budget(capsys):
    """A time_budget run prints no projected wall time (its end is the budget), which the help promised."""
    from gpt1.cli import main

    with pytest.raises(SystemExit) as done:
        main(["pretrain", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0 and "projected wall time of the whole run (not with a time_budget" in help_text


# ---- gpt1 finetune's lines -----------------------------------------------------------------------

def test_finetune_names_a_missing_base_folder_as_missing(tmp_path, capsys):
    """`--base nonexist` said "pass the base model with --base", as if --base were not given."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    line = assert_one_clear_line(*run_main(capsys, "finetune", "--base", tmp_path / "nonexist", "--data", chat,
                                           "--out", tmp_path / "run"), r"nonexist: not a model dir \(no such folder\)$")
    assert "--base" not in line


def test_finetune_says_one_validation_batch_in_the_singular(tiny_model_dir, tmp_path, caplog):
    import logging

    chat = tmp_path / "chat.jsonl"
    _sums_chat_file(chat, 10)
    cfg = load_config(FinetuneConfig, None, ["block_size=48", "batch_size=2", "device=cpu", "lora_r=2", "max_steps=1",
                                             "val_fraction=0.2", "eval_batches=1"], data=str(chat))
    with caplog.at_level(logging.INFO, logger="gpt1"):
        finetune(cfg, tiny_model_dir, tmp_path / "run")
    assert "(1 batch used)" in caplog.text and "batches used" not in caplog.text



def test_a_finetune_with_nothing_held_out_logs_no_nan_validation(tiny_model_dir, tmp_path, caplog):
    """val_fraction=0 holds nothing out (its start says so); each validation logged
    `val loss nan, perplexity nan` all the same."""
    import logging

    chat = tmp_path / "chat.jsonl"
    _sums_chat_file(chat, 4)
    cfg = load_config(FinetuneConfig, None, ["block_size=48", "batch_size=2", "device=cpu", "lora_r=2", "max_steps=2",
                                             "val_fraction=0", "eval_every=1"], data=str(chat))
    with caplog.at_level(logging.INFO, logger="gpt1"):
        result = finetune(cfg, tiny_model_dir, tmp_path / "run")
    assert result.steps == 2 and "step 1:" not in caplog.text and "nan" not in caplog.text
