"""A run's best model and its early stop (`keep_best`, `early_stop`, `keep_checkpoints`): RUN/best is
a model dir with its record (best.json), a resume (keep_best turned on, off, on again; under torchrun
too) never leaves it holding a model of a step the resumed run did not keep, and an overfitting run
keeps its best model and stops early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gpt1
from gpt1.cli import main
from gpt1.core.errors import Gpt1Error
from gpt1.data.shards import fixed_windows, load_meta
from gpt1.train import checkpoint
from gpt1.train.config import TrainConfig, load_config
from gpt1.train.evaluate import evaluate_chat, evaluate_loss
from gpt1.train.finetune import FinetuneConfig, finetune
from gpt1.train.pretrain import pretrain
from tests.conftest import TEST_VOCAB
from tests.test_config_edges import _stopped
from tests.test_ddp_resume_and_failures import _metrics as _ddp_metrics
from tests.test_ddp_resume_and_failures import _torchrun
from tests.test_finetune import RUN as FT_RUN
from tests.test_finetune import _oasst_file
from tests.test_train import TINY_DEFAULT_LR, _cfg, _metrics, _run


def _best(run) -> dict:
    return json.loads((run / "best" / "best.json").read_text())


# ---- RUN/best holds a model the resumed run never kept -----------------------------------------

def _stopped_after_best_past_its_checkpoint(data_dir, run, stop_training_at, monkeypatch, args) -> None:
    """keep_best=true, validations at steps 3 and 6, checkpoint 5: stopped in step 7, after step 6's
    validation wrote RUN/best (a lower loss than step 3's) past the checkpoint the resume starts from."""
    stop_training_at(7, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(data_dir, run, [*args, "eval_every=3", "keep_best=true"])
    monkeypatch.undo()
    losses = {m["step"]: m["val_loss"] for m in _metrics(run) if "val_loss" in m}
    assert losses[6] < losses[3] and _best(run) == {"step": 6, "val_loss": losses[6]}  # what best/ holds, recorded


def test_a_resume_with_keep_best_off_removes_the_best_of_a_step_past_its_checkpoint(
        data_dir, tmp_path, stop_training_at, monkeypatch, caplog):
    """best/ kept step 6's model, written by the stopped attempt after step 5's checkpoint, and the
    resume with keep_best=false said it kept step 3's (the lowest as of the checkpoint)."""
    run, args = tmp_path / "run", ["max_steps=11", "save_every=5", "lr=3e-3"]
    _stopped_after_best_past_its_checkpoint(data_dir, run, stop_training_at, monkeypatch, args)
    with caplog.at_level("INFO", logger="gpt1"):
        assert _run(data_dir, run, [*args, "eval_every=3", "keep_best=false"]).resumed_from == 5
    assert not (run / "best").exists()
    said = [r.message for r in caplog.records if "best" in r.message and "step 6's model" in r.message]
    assert said == [f"removed {run / 'best'}: it held step 6's model (val loss {_metrics_loss(run, 6):.4f}), written "
                    "after the checkpoint this run resumes from (step 5); nothing writes it again (keep_best=false)"]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # no "keeps step 3's model"


def test_a_best_linked_to_a_folder_of_the_run_is_removed_and_written_again(data_dir, tmp_path, stop_training_at,
                                                                            monkeypatch):
    """A RUN/best that is a link (best/ writes go through it): the resume failed with `OSError: Cannot
    call rmtree on a symbolic link`."""
    run, args = tmp_path / "run", ["max_steps=11", "save_every=5", "lr=3e-3"]
    _stopped_after_best_past_its_checkpoint(data_dir, run, stop_training_at, monkeypatch, args)
    (run / "best").rename(run / "best-real")
    (run / "best").symlink_to(run / "best-real")
    assert _run(data_dir, run, [*args, "eval_every=3", "keep_best=true"]).resumed_from == 5
    assert not (run / "best-real").exists()  # step 6's model: the discarded attempt's
    assert _best(run)["step"] > 5  # written again by this run's own validations


def _metrics_loss(run, step: int) -> float:
    return next(m["val_loss"] for m in _metrics(run) if m["step"] == step and "val_loss" in m)


def test_a_resumed_keep_best_run_names_the_model_best_really_holds(data_dir, tmp_path, stop_training_at, monkeypatch,
                                                                  caplog):
    """A resume that validated at other steps (eval_every 3 -> 9) never went below step 3's loss
    again: best/ kept step 6's model from the stopped attempt, and the run's last line named step
    3's as the one in best/. lr=0.3 makes the losses climb after step 1 (step 6's dips below 3's)."""
    run, args = tmp_path / "run", ["max_steps=11", "save_every=5", "lr=0.3", "min_lr=0.3", "warmup=0"]
    _stopped_after_best_past_its_checkpoint(data_dir, run, stop_training_at, monkeypatch, args)
    with caplog.at_level("INFO", logger="gpt1"):
        result = _run(data_dir, run, [*args, "eval_every=9", "keep_best=true"])
    done = next(r.message for r in caplog.records if r.message.startswith("done:"))
    if (run / "best").exists():  # a validation of the resume went below step 3's: best/ is its model
        assert _best(run)["step"] == result.best_step > 5 and done.endswith(f"at step {result.best_step} ({run / 'best'})")
        return
    assert result.best_step == 3
    assert done.endswith(f"the lowest val loss {result.best_val_loss:.4f} at step 3 (its model not kept: there is no "
                         f"{run / 'best'})")


def test_best_is_a_model_dir_with_its_record(data_dir, tmp_path):
    """best.json beside the model: gpt1.load and export take the folder as they did."""
    import gpt1

    run = tmp_path / "run"
    result = _run(data_dir, run, ["max_steps=2", "eval_every=1", "keep_best=true"])
    assert _best(run) == {"step": result.best_step, "val_loss": result.best_val_loss}
    assert gpt1.load(run / "best").model.config.n_layer
    assert main(["export", "--model", str(run / "best"), "--out", str(tmp_path / "hf")]) == 0


# torchrun (2 gloo processes on the CPU): a keep_best run resumes on every rank.

TORCHRUN_ARGS = ["model=tiny", "block_size=16", "batch_size=2", "eval_batches=2", "device=cpu", "lr=3e-3", "max_steps=4",
                 "eval_every=1", "save_every=2", "keep_best=true"]


@pytest.mark.slow
def test_a_torchrun_keep_best_run_resumes(data_dir, tmp_path):
    """Rank 1 read train_config.json's record, which only rank 0 holds, to decide whether keep_best
    was on at the lowest validation: every resume of a keep_best run with a validation before its
    checkpoint failed there (AttributeError: 'NoneType' object has no attribute 'setting_at')."""
    args = ["pretrain", "--data", data_dir, "--out", tmp_path / "run", *TORCHRUN_ARGS]
    # Killed after step 2's checkpoint (before its model files): best/ holds step 1's or 2's model.
    killed = _torchrun(*args, env={"GPT1_CRASH_AT": "before-outputs:1"})
    assert killed.returncode != 0 and (tmp_path / "run" / "best").is_dir(), killed.stderr[-3000:]
    resumed = _torchrun(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {tmp_path / 'run'} from step 2 of 4" in resumed.stderr
    last = _ddp_metrics(tmp_path / "run")[-1]
    assert [m["step"] for m in _ddp_metrics(tmp_path / "run")] == [1, 2, 3, 4] and last["val_loss"] is not None
    best = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    assert best["step"] == json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["best_step"]


# A run's best model and early stop (`keep_best`, `early_stop`) on a run that overfits at once, and
# the checks of the keys of keeping and stopping (`keep_checkpoints` too).

# lr 0.1 without warmup or decay: the validation loss is lowest after the first step and far
# above it (by 4 nats and more) at every later one, so the run overfits at once, as a 60-epoch
# fine-tune of 46 chats did at step 25 of 360.
OVERFIT = [*TINY_DEFAULT_LR, "max_steps=12", "eval_every=1", "save_every=1", "lr=0.1", "min_lr=0.1", "warmup=0",
           "keep_best=true", "early_stop=3", "keep_checkpoints=2"]


def _validations(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["val_loss"] for m in lines if "val_loss" in m}


def _val_loss(model_dir: Path, data_dir: Path) -> float:
    """The loss of the model in `model_dir` on the windows the run validates on."""
    val = fixed_windows(data_dir / load_meta(data_dir)["val"]["file"], 32, 4, 2, vocab_size=TEST_VOCAB)
    loss, _ = evaluate_loss(gpt1.load(model_dir, device="cpu").model, val, torch.device("cpu"))
    return loss


@pytest.fixture(scope="module")
def overfit_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("overfit") / "run"
    return out, pretrain(_cfg(OVERFIT), data_dir, out)


def test_an_overfitting_run_keeps_its_best_model_and_stops_early(overfit_run, data_dir):
    out, result = overfit_run
    vals = _validations(out)
    best_step = min(vals, key=vals.get)
    assert result.steps < 12, vals  # stopped early
    # The run ended after early_stop=3 validations in a row without a new lowest loss.
    assert (result.best_step, result.best_val_loss) == (best_step, vals[best_step])
    assert result.steps == best_step + 3 and all(vals[s] > vals[best_step] for s in vals if s > best_step)
    # best/ is a model dir holding the model of that validation; the run dir's own is the last step's.
    assert _val_loss(out / "best", data_dir) == pytest.approx(result.best_val_loss, abs=1e-6)
    assert _val_loss(out, data_dir) == pytest.approx(result.val_loss, abs=1e-6)
    assert result.val_loss > result.best_val_loss + 1
    # The metrics say where the best is at every validation; the two newest checkpoints are kept.
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert (last["best_step"], last["best_val_loss"]) == (best_step, vals[best_step])
    assert [checkpoint.checkpoint_step(c) for c in checkpoint.list_checkpoints(out)] == [result.steps - 1, result.steps]


def test_a_rerun_of_an_early_stopped_run_is_that_of_a_finished_run(overfit_run, data_dir, caplog):
    out, result = overfit_run
    assert result.steps < 12
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    with caplog.at_level("INFO", logger="gpt1"):
        again = pretrain(_cfg(OVERFIT), data_dir, out)
    assert (again.steps, again.resumed_from, again.best_step, again.best_val_loss) == (
        result.steps, result.steps, result.best_step, result.best_val_loss)
    assert f"already finished its {result.steps} steps; nothing to do" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_a_run_killed_before_its_early_stop_resumes_to_the_same_best_and_stop(overfit_run, data_dir, tmp_path,
                                                                              stop_training_at, monkeypatch):
    """The lowest loss, its step and the validations since are in the checkpoint: a resumed run
    does not take its first validation for a new best (and overwrite best/ with a worse model)."""
    reference, result = overfit_run
    out = tmp_path / "run"
    stop_training_at(3, KeyboardInterrupt)  # in step 3, after the step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        pretrain(_cfg(OVERFIT), data_dir, out)
    monkeypatch.undo()
    resumed = pretrain(_cfg(OVERFIT), data_dir, out)
    assert resumed.resumed_from == 2
    assert (resumed.steps, resumed.best_step, resumed.best_val_loss) == (result.steps, result.best_step,
                                                                          result.best_val_loss)
    assert _validations(out) == _validations(reference)
    best, expected = (load_file(run / "best" / "model.safetensors") for run in (out, reference))
    assert best.keys() == expected.keys() and all(torch.equal(best[k], expected[k]) for k in best)


def test_a_fresh_start_drops_the_best_of_an_attempt_that_saved_no_checkpoint(data_dir, tmp_path, stop_training_at,
                                                                             monkeypatch):
    out = tmp_path / "run"
    stop_training_at(2, KeyboardInterrupt)  # after step 1's validation wrote best/, before the first checkpoint
    with pytest.raises(KeyboardInterrupt):
        pretrain(_cfg([*TINY_DEFAULT_LR, "max_steps=3", "eval_every=1", "save_every=3", "keep_best=true"]), data_dir, out)
    monkeypatch.undo()
    assert (out / "best" / "model.safetensors").is_file() and checkpoint.latest_checkpoint(out) is None
    pretrain(_cfg([*TINY_DEFAULT_LR, "max_steps=3", "eval_every=3"]), data_dir, out)  # another recipe starts over
    assert not (out / "best").exists()


def test_a_finetunes_best_is_a_chat_model_dir_that_scores_its_validation(tiny_model_dir, tmp_path):
    """RUN/best holds what a fine-tune's model dir holds (adapter, base.json, chat template, the
    run's train_config.json): `gpt1 generate --model RUN/best --chat` and `eval --chat` take it."""
    data, out = _oasst_file(tmp_path / "oasst.jsonl"), tmp_path / "ft"
    cfg = load_config(FinetuneConfig, None, [*FT_RUN, "max_steps=4", "eval_every=1", "save_every=2", "lr=3",
                                             "keep_best=true"], data=str(data))
    result = finetune(cfg, tiny_model_dir, out)
    llm = gpt1.load(out / "best", device="cpu")
    assert llm.is_chat_model and (out / "best" / "adapter").is_dir()
    # The run's held-out conversations, as the run's validation batched them: the best loss exactly.
    scored = evaluate_chat(llm, str(data), batch_size=4, max_batches=2, show_progress=False)
    assert "held-out" in scored.source and scored.loss == pytest.approx(result.best_val_loss, abs=1e-6)
    assert result.best_val_loss == min(_validations(out).values())
    assert main(["generate", "--model", str(out / "best"), "--chat", "--prompt", "Hi", "--max-new-tokens", "2",
                 "--device", "cpu"]) == 0


def test_keys_of_keeping_and_stopping_are_checked():
    cfg = TrainConfig()
    assert (cfg.keep_best, cfg.early_stop, cfg.keep_checkpoints, cfg.dropout) == (False, 0, 1, -1.0)
    for override, pattern in [("keep_checkpoints=0", "keep_checkpoints must be at least 1"),
                              ("early_stop=-1", "early_stop must be >= 0"),
                              ("dropout=1", r"dropout is a rate in \[0, 1\)"),
                              ("dropout=-0.5", r"dropout is a rate in \[0, 1\)")]:
        with pytest.raises(Gpt1Error, match=pattern):
            _cfg([override])


# keep_best turned on, off and on again by resumes, and another process writing into best/.

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


def test_a_keep_best_run_goes_on_when_another_process_writes_into_best(data_dir, tmp_path, monkeypatch, caplog):
    """`gpt1 eval --suite RUN/best` wrote report.md into best/ while the run replaced it: the run
    stopped ("another process wrote there while this command was writing it"), before its first
    checkpoint. best/ is the run's own now: replaced whole, the foreign file dropped with a warning."""
    import shutil

    from tests.test_train import _run

    run = tmp_path / "run"
    copy = shutil.copyfile

    def copy_while_another_writes(src, dst, *args, **kwargs):  # best/'s last file, as eval writes its report
        result = copy(src, dst, *args, **kwargs)
        if (run / "best").is_dir() and str(dst).endswith("train_config.json") and "best" in str(dst):
            (run / "best" / "report.md").write_text("# Evaluation of run/best\n")
        return result

    monkeypatch.setattr(shutil, "copyfile", copy_while_another_writes)
    with caplog.at_level("INFO", logger="gpt1"):
        result = _run(data_dir, run, ["max_steps=3", "eval_every=1", "eval_batches=1", "keep_best=true",
                                      "lr=3e-3"])
    assert result.steps == 3 and (run / "best" / "model.safetensors").is_file()
    assert any("report.md" in r.message for r in caplog.records if r.levelname == "WARNING")


def test_keep_best_back_on_keeps_the_best_that_best_holds(data_dir, tmp_path, stop_training_at, monkeypatch, caplog):
    """on to step 2 (best/ written), off from 2 to 4, on again from 4: the resume that turned it
    back on took the lowest (step 2's, in best/) for one reached while it was off, started over,
    and a worse model replaced the one best/ held."""
    from tests.test_config_edges import _stopped
    from tests.test_train import _metrics, _run

    args = ["max_steps=6", "eval_every=1", "save_every=2", "eval_batches=1", "lr=0.5", "min_lr=0.5", "warmup=0"]
    run = tmp_path / "run"
    _stopped(data_dir, run, stop_training_at, monkeypatch, [*args, "keep_best=true"], at=3)  # checkpoint 2
    kept = {p.name: p.read_bytes() for p in (run / "best").iterdir()}
    lowest = _metrics(run)[-1]
    stop_training_at(3, KeyboardInterrupt)  # the resume (from 2) killed in its step 5: checkpoint 4
    with pytest.raises(KeyboardInterrupt):
        _run(data_dir, run, [*args, "keep_best=false"])
    monkeypatch.undo()
    with caplog.at_level("INFO", logger="gpt1"):
        result = _run(data_dir, run, [*args, "keep_best=true"])
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "keep_best=true from" in r.message]
    later = [m["val_loss"] for m in _metrics(run) if m["step"] > 2 and "val_loss" in m]
    if min(later) >= lowest["best_val_loss"]:  # the rate this high makes the loss climb: best/ stays
        assert {p.name: p.read_bytes() for p in (run / "best").iterdir()} == kept
        assert result.best_step == lowest["best_step"]
