"""A time budget's run, as its user times it: a stop in its first steps (Ctrl-Z, SIGSTOP), a stage
that ends with its last validation and checkpoint (and the quickstart's printed time of it), the
projected wall time of a machine that slowed down, and what a resume and the last line say of the
time spent. `TimeBudget` and `RunRate` on a fake clock (as the loop drives them), then tiny runs."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gpt1.quickstart import QuickstartConfig, run_quickstart
from gpt1.train import checkpoint as ckpt
from gpt1.train.budget import RunRate, TimeBudget
from gpt1.train.checkpoint import STATE_FILE, latest_checkpoint
from gpt1.train.config import TrainConfig, load_config
from gpt1.train.distributed import current
from gpt1.train.pretrain import pretrain
from tests.test_time_budget_pauses import MIN_LR, TINY, simulate
from tests.test_train import _run


def _messages(caplog, part: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if part in r.getMessage()]


# ---- a stop in the first steps -----------------------------------------------------------------

@pytest.mark.parametrize("pause_at", [2, 3, 6])
def test_a_stop_in_the_first_steps_is_not_charged(caplog, pause_at):
    """A 30 s SIGSTOP in the third, fourth or seventh step of a 30 s run (0.1 s steps): the pause
    check waited for five timed steps (the eighth), so the stop was charged in full and the run
    ended at its 10-step minimum, exit 0. Now the fastest step before it is the reference."""
    with caplog.at_level(logging.INFO, logger="gpt1"):
        lrs, _, budget = simulate(30.0, 0.4, lambda step: 0.1, pause_at=pause_at, pause=30.0)
    steady, _, _ = simulate(30.0, 0.4, lambda step: 0.1)
    assert abs(len(lrs) - len(steady)) <= 1 and lrs[-1] == pytest.approx(MIN_LR)
    assert budget.spent() == pytest.approx(30.0, abs=0.2)
    assert _messages(caplog, "paused") == [f"step {pause_at + 1}: paused for ~30 s: not counted against the time budget"]


def test_an_early_slow_step_under_the_pause_seconds_is_charged():
    """A 4 s step (40x the 0.1 s steps, a thread probe or an allocation, not a stop) among the first
    ones is the machine's time: under the fastest step + 5 s, it is charged."""
    _, _, budget = simulate(30.0, 0.0, lambda step: 4.0 if step == 4 else 0.1)
    assert budget.paused == 0.0 and budget.spent() == pytest.approx(30.0, abs=0.2)


# ---- the run's end within the budget -----------------------------------------------------------

def _stage(budget: float, eval_every: int, validation: float, checkpoint: float, plot: float, save_every: int = 20,
           **guesses) -> float:
    """A budget run on a fake clock, as the loop drives it: 0.1 s steps, a validation of `validation`
    s every `eval_every` steps, a checkpoint of `checkpoint` s every `save_every`, and at its end the
    last validation, the final checkpoint and loss.png (`plot` s): its whole time."""
    now, dist = [0.0], current()
    clock = TimeBudget(budget, 0.0, 100_000, eval_every, 0.4, clock=lambda: now[0], **guesses)
    end, done = 100_000, 0
    while done < end:
        done += 1
        now[0] += 0.1
        end = clock.plan(done, end, dist)
        for kind, every, seconds in (("validation", eval_every, validation), ("checkpoint", save_every, checkpoint)):
            if done % every == 0 or done == end:
                now[0] += seconds
                clock.timed(seconds, kind)
    return now[0] + plot


@pytest.mark.parametrize("budget", [30.0, 60.0, 300.0])
def test_the_stage_ends_on_time_with_its_last_validation_and_checkpoint(budget):
    """A 30 s budget whose steps ended at 30.4 s, then a 4.4 s validation and a 2.3 s checkpoint:
    37 s. The plan keeps the time of the run's end, each part as long as the latest took (and
    loss.png's guess). Those due a few steps before the end may still take it over (the plan
    spreads them over the steps between them), by less than their time: 30 s ended at 32.4 s
    and 60 s at 60.0 s, where they ended at 36.4 s and 68.2 s."""
    validation, checkpoint = 3.0, 1.0
    seconds = _stage(budget, eval_every=10, validation=validation, checkpoint=checkpoint, plot=1.0, plot_seconds=1.0)
    assert budget * 0.97 <= seconds < budget + validation + checkpoint


def test_before_they_are_timed_the_end_is_guessed():
    """No validation before the end (eval_every beyond the run) and no checkpoint: the end's guesses,
    a validation of 8 batches at a third of a step each and a checkpoint from the bytes it writes."""
    seconds = _stage(30.0, eval_every=1_000, validation=8 / 3 * 0.1, checkpoint=0.4, plot=0.5, save_every=1_000,
                     validation_steps=8 / 3, save_seconds=0.4, plot_seconds=0.5)
    assert seconds == pytest.approx(30.0, abs=0.2)


def test_a_short_budget_reserves_at_most_its_overrun_for_the_plot():
    """loss.png's guess (never timed before the end) does not cut a 2 s budget's plan by 1 s."""
    budget = TimeBudget(2.0, 0.0, 100_000, 100, plot_seconds=1.0)
    assert budget.reserve() == pytest.approx(0.1)


def test_a_budget_run_reports_its_final_save_and_a_rerun_the_same(data_dir, tmp_path, caplog):
    """budget_spent was taken as the final checkpoint began: its writes (and loss.png) were left
    out of the time the run reported. It is kept in the checkpoint's mark, which a rerun reads."""
    run, overrides = tmp_path / "run", [*TINY, "max_steps=100000", "time_budget=2", "eval_every=25", "save_every=25"]
    with caplog.at_level(logging.INFO, logger="gpt1"):
        first = pretrain(load_config(TrainConfig, None, overrides), data_dir, run)
    state = torch.load(latest_checkpoint(run) / STATE_FILE, weights_only=True)
    assert first.budget_spent > state["budget_spent"]
    assert first.budget_spent == ckpt.final_budget_spent(latest_checkpoint(run))
    again = pretrain(load_config(TrainConfig, None, overrides), data_dir, run)
    assert again.budget_spent == first.budget_spent and again.budget_spent_before == first.budget_spent
    done = _messages(caplog, "done: ")[0]
    assert done.startswith(f"done: {first.steps:,} steps (ended by its time_budget=2 s: ")


@pytest.mark.slow  # the whole pipeline, on a small corpus: ~25 s
def test_the_quickstart_prints_each_stage_s_wall_time(corpus_dir, tmp_path, caplog):
    """A training stage's time was the budget its run spent to the start of its final checkpoint:
    "pretrain 34 s (planned 30 s)" for a stage of 39 s. Now it is the stage's wall time, from its
    header to the next one's (a fine-tune's setup, its data read and encoded, included)."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus {i}? " * 4},
                                                     {"role": "assistant", "content": f"{2 * i}"}]}) + "\n"
                            for i in range(200)))
    cfg = QuickstartConfig(out=str(tmp_path / "qs"), minutes=0.03, corpus=str(corpus_dir), chat_data=str(chat),
                           vocab_size=300, device="cpu")
    with caplog.at_level(logging.INFO, logger="gpt1"):
        result = run_quickstart(cfg)
    began = {r.getMessage().split()[2]: r.created for r in caplog.records if r.getMessage().startswith("\n== ")}
    assert result.seconds["pretrain"] == pytest.approx(began["finetune:"] - began["pretrain:"], abs=0.05)
    assert result.seconds["finetune"] == pytest.approx(began["samples:"] - began["finetune:"], abs=0.05)
    assert result.seconds["pretrain"] >= ckpt.final_budget_spent(latest_checkpoint(result.base))


# ---- the projected wall time -------------------------------------------------------------------

@pytest.mark.parametrize("stop", [0.0, 60.0], ids=["steady", "stopped"])
def test_the_revised_projection_measures_the_steps_since(monkeypatch, caplog, stop):
    """0.1 s steps, then 0.3 s from step 50 (a neighbour starts), a validation and a checkpoint
    (1 s each) every 100 steps: the revision at step 100 kept the first line's 0.1 s/step, "2 min"
    for a run of 310 s. It takes the median of the steps since (a 60 s stop is one step of them)."""
    now = [0.0]
    monkeypatch.setattr("gpt1.train.budget.time", SimpleNamespace(perf_counter=lambda: now[0]))
    rate = RunRate(0, 1000, 100, 100)
    with caplog.at_level(logging.INFO, logger="gpt1"):
        for step in range(1, 1001):
            now[0] += (0.1 if step <= 50 else 0.3) + (stop if step == 70 else 0.0)
            if step % 100 == 0:
                for kind in ("validation", "checkpoint"):
                    now[0] += 1.0
                    rate.timed(kind, 1.0)
            rate.step_done(step)
    first, revised = _messages(caplog, "projected wall time")
    assert first.startswith("projected wall time: 2 min for 1,000 steps at 0.1 s/step")
    assert revised.startswith(f"projected wall time, revised: {round(now[0] / 60)} min for 1,000 steps at 0.3 s/step "
                              "(validation and checkpoints included)")


# ---- what a resume and the last line say -------------------------------------------------------

@pytest.mark.parametrize("budget", [0, 600], ids=["no-budget", "budget"])
def test_a_resume_says_what_its_budget_spent_and_the_metrics_keep_the_time(data_dir, tmp_path, caplog,
                                                                           stop_training_at, monkeypatch, budget):
    """A resume said nothing of the budget spent before it, and metrics.jsonl had no time: now
    each line has `elapsed`, the run's seconds (its budget's, or wall time) across resumes."""
    run, overrides = tmp_path / "run", [*TINY, "max_steps=8", "save_every=4", "eval_every=4", f"time_budget={budget}"]
    stop_training_at(6, RuntimeError)
    with pytest.raises(RuntimeError):
        pretrain(load_config(TrainConfig, None, overrides), data_dir, run)
    before = torch.load(latest_checkpoint(run) / STATE_FILE, weights_only=True)
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="gpt1"):
        result = pretrain(load_config(TrainConfig, None, overrides), data_dir, run)
    [resuming] = _messages(caplog, "resuming ")
    if budget:
        spent = before["budget_spent"]
        assert resuming.endswith(f"from step 4 of 8 (step-00000004); {spent:.0f} s of its 10 min time budget spent, "
                                 f"{(600 - spent) / 60:.0f} min left")
        assert json.loads((run / "train_config.json").read_text())["provenance"][-1]["budget_spent"] == spent
        assert result.budget_spent_before == spent
    else:
        assert resuming.endswith("from step 4 of 8 (step-00000004)") and result.budget_spent_before is None
    elapsed = [json.loads(line)["elapsed"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(elapsed) == 8 and all(a < b for a, b in zip(elapsed, elapsed[1:]))
    assert elapsed[4] > before["elapsed"] >= elapsed[3]  # step 5 goes on from the checkpoint of step 4
    [done] = _messages(caplog, "done: ")
    assert done.startswith("done: 8 steps (its full length" + (", within its time_budget=600 s), " if budget else "), "))


def test_the_last_line_says_an_early_stop_ended_the_run(data_dir, tmp_path, caplog):
    """lr 0.1 without warmup or decay overfits at once (tests/test_keep_best.py): early_stop=3 ends it."""
    overrides = [*TINY, "max_steps=12", "eval_every=1", "save_every=12", "lr=0.1", "min_lr=0.1", "warmup=0",
                 "early_stop=3"]
    with caplog.at_level(logging.INFO, logger="gpt1"):
        result = pretrain(load_config(TrainConfig, None, overrides), data_dir, tmp_path / "run")
    [done] = _messages(caplog, "done: ")
    assert result.steps < 12 and re.match(rf"done: {result.steps} steps \(ended by early_stop=3\), ", done)


def test_metric_lines_with_elapsed_plot(data_dir, tmp_path):
    """`gpt1 plot` (and the loop's loss.png) read a line with `elapsed` as any other."""
    from gpt1.train.plot import read_metrics

    pretrain(load_config(TrainConfig, None, [*TINY, "max_steps=3", "eval_every=3", "save_every=3"]), data_dir,
             tmp_path / "run")
    records = read_metrics(Path(tmp_path / "run" / "metrics.jsonl"))
    assert len(records) == 3 and all("elapsed" in r for r in records) and (tmp_path / "run" / "loss.png").is_file()


# `gpt1 pretrain --help` under a time budget.

def test_pretrain_help_does_not_promise_a_projected_time_to_a_time_budget(capsys):
    """A time_budget run prints no projected wall time (its end is the budget), which the help promised."""
    from gpt1.cli import main

    with pytest.raises(SystemExit) as done:
        main(["pretrain", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0 and "projected wall time of the whole run (not with a time_budget" in help_text


# The early stop a time budget was taken for.

# ---- the early stop a time budget was taken for -----------------------------------------------

def test_a_time_budget_that_ends_a_run_where_early_stop_was_due_is_named(data_dir, tmp_path, caplog):
    """A 10-step time-budget run (its minimum) validated at steps 4, 8 and 10 (lr=1e-30: the weights,
    and so the losses, never change): early_stop=2's count reached 2 at the last step, where the
    budget ended the run, and the done line said "ended by early_stop=2"."""
    args = ["max_steps=1000", "time_budget=0.01", "eval_every=4", "early_stop=2", "lr=1e-30", "min_lr=0"]
    with caplog.at_level("INFO", logger="gpt1"):
        result = _run(data_dir, tmp_path / "run", args)
    assert result.steps == 10
    done = next(r.message for r in caplog.records if r.message.startswith("done:"))
    assert "(ended by its time_budget=0.01 s" in done and "early_stop" not in done
    assert not [r for r in caplog.records if "early stop:" in r.message]
    # An early stop that fired says so, and a rerun of the finished run too (from its checkpoint).
    caplog.clear()
    args = ["max_steps=20", "eval_every=2", "early_stop=2", "lr=1e-30", "min_lr=0"]
    with caplog.at_level("INFO", logger="gpt1"):
        assert _run(data_dir, tmp_path / "stopped", args).steps == 6
        assert _run(data_dir, tmp_path / "stopped", args).resumed_from == 6
    done = [r.message for r in caplog.records if r.message.startswith("done:")]
    assert len(done) == 2 and all("(ended by early_stop=2)" in line for line in done)


# The budget a run spent over every invocation.

def test_a_budget_run_reports_the_budget_it_spent_over_every_invocation(tmp_path, data_dir):
    """The quickstart took a reused (or killed and resumed) stage's time from this invocation:
    "pretrain reused (made in 1 s)" for a run that trained 18 s."""
    cfg = TrainConfig(max_steps=10_000, time_budget=1.5, device="cpu", batch_size=2, block_size=16, eval_every=50,
                      save_every=50)
    first = pretrain(cfg, data_dir, tmp_path / "run")
    assert first.budget_spent >= 1.5
    again = pretrain(cfg, data_dir, tmp_path / "run")
    assert again.resumed_from == again.steps == first.steps
    assert again.budget_spent == pytest.approx(first.budget_spent, abs=0.5) and again.seconds < first.budget_spent
