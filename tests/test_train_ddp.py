"""DDP through torchrun on CPU (gloo, 2 processes): it runs, and its losses match one process
with the same global batch (2 ranks x 1 micro-batch == 1 process x 2 accumulated micro-batches);
a refusal is one line from rank 0, not a traceback from every other rank."""

from __future__ import annotations

import json
import os
import re
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


def test_ddp_gloo_two_processes_match_one(corpus_dir, tokenizer, tmp_path, capsys):
    from tests.test_battery import assert_one_clear_line, run_main

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
    # Resumed by another number of processes (its global batch and its ranks' share of the data
    # change), a run is refused: here the 2-process run in one; the other way round below.
    assert_one_clear_line(*run_main(capsys, "pretrain", "--data", tmp_path / "data", "--out", tmp_path / "ddp", *ARGS,
                                    "grad_accum=1"),
                          r"ddp was trained by 2 processes, this run has 1: resume it with 2 processes "
                          r"\(torchrun --nproc_per_node 2\)")


def _torchrun(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "gpt1", *map(str, args)], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "GPT1_QUIET": "1", "OMP_NUM_THREADS": "1"})


def _assert_one_line_from_rank_0(proc: subprocess.CompletedProcess, pattern: str) -> None:
    assert proc.returncode != 0, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gpt1 ") and ": error: " in line]
    assert len(errors) == 1 and re.search(pattern, errors[0]), proc.stderr
    # No rank's traceback (rank 1 failed at a barrier once rank 0 had exited); torchrun's own report may follow.
    assert "[rank" not in proc.stderr and "gpt1/train" not in proc.stderr, proc.stderr


def test_a_refusal_under_torchrun_is_one_line(data_dir, tmp_path, capsys):
    """Rank 0 alone checks the run dir: its refusal showed rank 1's traceback from the barrier it
    waited at. Also: a 1-process run resumed by 2 is refused (2 by 1: test_ddp_gloo_two_processes_match_one)."""
    from tests.test_battery import run_main

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    _assert_one_line_from_rank_0(_torchrun("pretrain", "--data", data_dir, "--out", tmp_path / "junk", *ARGS),
                                 "junk is not empty and holds no gpt1 run")

    assert run_main(capsys, "pretrain", "--data", data_dir, "--out", tmp_path / "one", *ARGS, "max_steps=2")[0] == 0
    _assert_one_line_from_rank_0(_torchrun("pretrain", "--data", data_dir, "--out", tmp_path / "one", *ARGS, "max_steps=2"),
                                 r"one was trained by 1 process, this run has 2: resume it in one process")


def test_finetune_under_torchrun_merges_and_reports_once(tiny_model_dir, tmp_path):
    """--merge ran on every rank (all writing OUT/merged) and its lines came once per rank."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                                                     {"role": "assistant", "content": f"{2 * i}"}]}) + "\n"
                            for i in range(30)))
    proc = _torchrun("finetune", "--base", tiny_model_dir, "--data", chat, "--out", tmp_path / "ft", "--merge",
                     "batch_size=4", "block_size=48", "eval_batches=1", "device=cpu", "max_steps=2", "lora_r=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("chat model: ") == 1 and proc.stderr.count("merged model: ") == 1, proc.stderr
    assert (tmp_path / "ft" / "merged" / "model.safetensors").is_file()
