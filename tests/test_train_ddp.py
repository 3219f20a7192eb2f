"""DDP through torchrun on CPU (gloo, 2 processes): it runs, and its losses match one process
with the same global batch (2 ranks x 1 micro-batch == 1 process x 2 accumulated micro-batches)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gpt1.data.shards import prepare
from gpt1.train.config import TrainConfig, load_config
from gpt1.train.pretrain import pretrain

# Spawns torchrun worker processes: seconds, not milliseconds.
pytestmark = pytest.mark.slow

ARGS = ["model=tiny", "block_size=16", "batch_size=2", "eval_batches=2", "device=cpu", "max_steps=3",
        "eval_every=3", "save_every=3", "lr=3e-3"]


def test_ddp_gloo_two_processes_match_one(corpus_dir, tokenizer, tmp_path):
    prepare([str(corpus_dir / "json")], tokenizer, tmp_path / "data", val=2)
    env = {**os.environ, "GPT1_QUIET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "gpt1", "pretrain", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "ddp"), *ARGS,
         "grad_accum=1"],
        capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = pretrain(load_config(TrainConfig, None, ARGS + ["grad_accum=2"]), tmp_path / "data", tmp_path / "one")

    ddp = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ddp] == [1, 2, 3]  # rank 0 alone writes the metrics
    for a, b in zip(ddp, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["tokens"] == b["tokens"]
    assert ddp[-1]["val_loss"] == pytest.approx(single.val_loss, rel=1e-5)
    assert (tmp_path / "ddp" / "model.safetensors").is_file()
