"""Pass 23, torchrun (2 gloo processes on the CPU): a keep_best run resumes on every rank."""

from __future__ import annotations

import json

import pytest

from tests.test_ddp_findings import _metrics, _torchrun

ARGS = ["model=tiny", "block_size=16", "batch_size=2", "eval_batches=2", "device=cpu", "lr=3e-3", "max_steps=4",
        "eval_every=1", "save_every=2", "keep_best=true"]


@pytest.mark.slow
def test_a_torchrun_keep_best_run_resumes(data_dir, tmp_path):
    """Rank 1 read train_config.json's record, which only rank 0 holds, to decide whether keep_best
    was on at the lowest validation: every resume of a keep_best run with a validation before its
    checkpoint failed there (AttributeError: 'NoneType' object has no attribute 'setting_at')."""
    args = ["pretrain", "--data", data_dir, "--out", tmp_path / "run", *ARGS]
    # Killed after step 2's checkpoint (before its model files): best/ holds step 1's or 2's model.
    killed = _torchrun(*args, env={"GPT1_CRASH_AT": "before-outputs:1"})
    assert killed.returncode != 0 and (tmp_path / "run" / "best").is_dir(), killed.stderr[-3000:]
    resumed = _torchrun(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {tmp_path / 'run'} from step 2 of 4" in resumed.stderr
    last = _metrics(tmp_path / "run")[-1]
    assert [m["step"] for m in _metrics(tmp_path / "run")] == [1, 2, 3, 4] and last["val_loss"] is not None
    best = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    assert best["step"] == json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["best_step"]
