"""What a training run records and reports: a rerun of a finished run changes nothing; a resume
keeps the settings the run began with and records the ones it changes, with their step; each
start and resume records what it ran on (versions, command, device, precision, threads, data);
the data's content is checked on resume; every validation is a log line; a time budget's steps
are announced as a cap."""

from __future__ import annotations

import datetime
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gpt1
from gpt1.core.errors import Gpt1Error
from gpt1.core.io import sample_fingerprint
from gpt1.data.shards import load_meta
from gpt1.train.config import load_config
from gpt1.train.finetune import FinetuneConfig, finetune
from tests.test_train import FT_ARGS, _chat_file, _metrics, _run


def _record(run: Path) -> dict:
    return json.loads((run / "train_config.json").read_text())


def _files(run: Path) -> dict[str, tuple[int, bytes]]:
    """Every file and folder of a run dir with its mtime and bytes; not the lock, which each call takes."""
    return {str(p.relative_to(run)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in run.rglob("*") if p.name != ".lock"}


def _stopped_at_step_2(data_dir, run: Path, stop_training_at, monkeypatch, args: list[str]) -> None:
    """A run of 4 steps killed during its third (its checkpoint at step 2 kept)."""
    stop_training_at(3, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(data_dir, run, args)
    monkeypatch.undo()


# ---- 1. a rerun of a finished run; a resume's changed settings -------------------------------

def test_a_rerun_of_a_finished_run_changes_nothing_in_its_run_dir(data_dir, tmp_path, tiny_model_dir):
    """A rerun that said "already finished; nothing to do" rewrote train_config.json with its own
    resumable settings (eval_batches=1 for validations run on 2), trimmed metrics.jsonl again and
    made an empty tensorboard/ folder."""
    run = tmp_path / "run"
    _run(data_dir, run, ["max_steps=4", "eval_every=2", "save_every=2"])
    before = _files(run)
    again = _run(data_dir, run, ["max_steps=4", "eval_every=3", "save_every=3", "eval_batches=1", "tensorboard=true"])
    assert again.resumed_from == 4 and _files(run) == before
    assert not (run / "tensorboard").exists()
    # A fine-tune's rerun, which reads no chat data, too.
    chat, ft = _chat_file(tmp_path / "chat.jsonl"), tmp_path / "ft"
    finetune(load_config(FinetuneConfig, None, FT_ARGS, data=str(chat)), tiny_model_dir, ft)
    before = _files(ft)
    again = finetune(load_config(FinetuneConfig, None, [*FT_ARGS, "eval_batches=3", "device=auto"], data=str(chat)),
                     tiny_model_dir, ft)
    assert again.resumed_from == 2 and _files(ft) == before


def test_a_resume_keeps_the_settings_the_run_began_with_and_records_each_change(data_dir, tmp_path,
                                                                              stop_training_at, monkeypatch):
    """A resume with eval_batches=1 recorded eval_batches=1 alone: nothing said that the
    validations before it ran on 2 batches."""
    run, args = tmp_path / "run", ["max_steps=4", "eval_every=1", "save_every=2"]
    _stopped_at_step_2(data_dir, run, stop_training_at, monkeypatch, args)
    # A resume killed again before its next checkpoint: its change held for no step that was kept.
    stop_training_at(1, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(data_dir, run, [*args, "eval_batches=1", "save_every=3"])
    monkeypatch.undo()
    assert _record(run)["changes"] == [{"from_step": 2, "eval_batches": 1, "save_every": 3}]
    assert _run(data_dir, run, [*args, "eval_batches=3"]).steps == 4
    record = _record(run)
    assert record["config"]["eval_batches"] == 2 and record["config"]["save_every"] == 2  # as the run began
    assert record["changes"] == [{"from_step": 2, "eval_batches": 3}]
    assert [p["from_step"] for p in record["provenance"]] == [0, 2, 2]
    # A run dir of an older gpt1 (no changes, no provenance) resumes, and records them from then on.
    run2 = tmp_path / "old"
    _stopped_at_step_2(data_dir, run2, stop_training_at, monkeypatch, args)
    old = {k: v for k, v in _record(run2).items() if k not in ("changes", "provenance")}
    (run2 / "train_config.json").write_text(json.dumps(old))
    assert _run(data_dir, run2, [*args, "eval_batches=1"]).resumed_from == 2
    assert _record(run2)["changes"] == [{"from_step": 2, "eval_batches": 1}]
    assert [p["from_step"] for p in _record(run2)["provenance"]] == [2]
    # Another key is still refused.
    with pytest.raises(Gpt1Error, match=r"different config \(lr: 0.003 -> 0.001\)"):
        _run(data_dir, run2, [*args, "eval_batches=1", "lr=1e-3"])


# ---- 2. provenance ---------------------------------------------------------------------------

def test_each_start_and_resume_records_what_it_ran_on(data_dir, tmp_path, stop_training_at, monkeypatch):
    """train_config.json held the recipe alone: not which gpt1, torch or Python ran it, on which
    device, in which precision, on how many threads (which change a CPU run's bits), or how."""
    run, args = tmp_path / "run", ["max_steps=4", "eval_every=4", "save_every=2", "precision=bf16-mixed"]
    _stopped_at_step_2(data_dir, run, stop_training_at, monkeypatch, args)
    _run(data_dir, run, args)
    first, resumed = _record(run)["provenance"]
    assert (first["from_step"], resumed["from_step"]) == (0, 2)
    for entry in (first, resumed):
        assert entry["gpt1"] == gpt1.__version__ and entry["torch"] == torch.__version__
        assert entry["python"] == ".".join(map(str, sys.version_info[:3]))
        assert entry["argv"] == sys.argv and entry["threads"] == torch.get_num_threads()
        assert entry["device"] == "cpu" and entry["precision"] == "bf16-mixed" and entry["compiled"] is False
        started = datetime.datetime.fromisoformat(entry["started"])
        assert started.utcoffset() == datetime.timedelta(0)
        assert abs(datetime.datetime.now(datetime.timezone.utc) - started) < datetime.timedelta(minutes=10)
        assert entry["data"] == {"path": str(data_dir.resolve()), "key": load_meta(data_dir)["key"]}
    checkout = any((p / ".git").exists() for p in Path(gpt1.__file__).resolve().parents[1:3])
    if checkout and shutil.which("git"):
        assert first["git"] and " " not in first["git"]
    else:
        assert "git" not in first
    # Never compared, and the model's bits do not depend on it: an identical run, byte-identical weights.
    twin = tmp_path / "twin"
    _run(data_dir, twin, args)
    assert (twin / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_a_compile_that_falls_back_to_eager_is_recorded(compile_fallback_run):
    """Inductor's C++ build fails for real (no compiler): the record says the run ran eagerly, and why."""
    proc, run, _ = compile_fallback_run
    assert proc.returncode == 0, proc.stderr
    (entry,) = _record(run)["provenance"]
    assert entry["compiled"] is False and entry["compile_error"]


# ---- 3. the data's identity ------------------------------------------------------------------

def test_a_resume_on_another_train_bin_of_the_same_size_is_refused(data_dir, tmp_path, stop_training_at,
                                                                  monkeypatch):
    """Only the token and document counts were compared: a train.bin of other content and the
    same size resumed silently, and nothing recorded which data folder a run trained on."""
    run, args = tmp_path / "run", ["max_steps=4", "eval_every=4", "save_every=2"]
    _stopped_at_step_2(data_dir, run, stop_training_at, monkeypatch, args)
    rolled = shutil.copytree(data_dir, tmp_path / "rolled")
    tokens = np.fromfile(rolled / "train.bin", dtype=np.uint16)
    np.roll(tokens, 1000).tofile(rolled / "train.bin")
    with pytest.raises(Gpt1Error, match=r"^\S*run holds a run on other training data \(train\.bin: '[0-9a-f]{16}' -> "
                                        r"'[0-9a-f]{16}'\); rerun with the data it was trained on"):
        _run(rolled, run, args)
    # The same content elsewhere resumes; each invocation records the folder it read.
    moved = shutil.copytree(data_dir, tmp_path / "moved")
    stop_training_at(1, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(moved, run, args)
    monkeypatch.undo()
    # A run dir from before the check resumes unchecked, and is checked from then on.
    record = _record(run)
    for name in ("train.bin", "val.bin"):
        del record["data"][name]
    (run / "train_config.json").write_text(json.dumps(record))
    assert _run(rolled, run, args).steps == 4
    assert _record(run)["data"]["train.bin"] == sample_fingerprint(rolled / "train.bin")
    paths = [p["data"]["path"] for p in _record(run)["provenance"]]
    assert paths == [str(data_dir.resolve()), str(moved.resolve()), str(rolled.resolve())]


# ---- 4. and 5. what a run logs -------------------------------------------------------------

def test_every_validation_is_a_log_line_with_its_step(data_dir, tmp_path, caplog):
    """Off a terminal a validation only showed in the bar's postfix, printed every 10 s: a log
    kept the last one of each 10 s."""
    with caplog.at_level("INFO", logger="gpt1"):
        _run(data_dir, tmp_path / "run", ["max_steps=6", "eval_every=2", "save_every=6"])
    lines = [r.message for r in caplog.records if ": val loss " in r.message]
    expected = [(m["step"], m["val_loss"], m["val_ppl"]) for m in _metrics(tmp_path / "run") if "val_loss" in m]
    assert lines == [f"step {step}: val loss {loss:.4f}, perplexity {ppl:.2f}" for step, loss, ppl in expected]
    assert [step for step, _, _ in expected] == [2, 4, 6]


def test_the_steps_of_a_run_under_a_time_budget_are_announced_as_a_cap(data_dir, tiny_model_dir, tmp_path, caplog):
    """`model: ...; 600 steps x 2,048 tokens = 0.35 epochs` for a run that the budget ended after 33."""
    with caplog.at_level("INFO", logger="gpt1"):
        _run(data_dir, tmp_path / "plain", ["max_steps=1"])
        _run(data_dir, tmp_path / "budget", ["max_steps=3", "time_budget=600"])
        chat = _chat_file(tmp_path / "chat.jsonl")
        finetune(load_config(FinetuneConfig, None, [*FT_ARGS, "time_budget=600"], data=str(chat)), tiny_model_dir,
                 tmp_path / "ft")
    plain, budget = [r.message for r in caplog.records if r.message.startswith("model: ")]
    assert "; 1 steps x 128 tokens" in plain and "at most" not in plain and "time_budget" not in plain
    assert "; at most 3 steps x 128 tokens = " in budget and budget.endswith("; time_budget=600 s may end it sooner")
    (ft,) = [r.message for r in caplog.records if " steps x 4 sequences" in r.message]
    assert ft.startswith("at most 2 steps x 4 sequences = ") and ft.endswith("; time_budget=600 s may end it sooner")
