"""torchrun's round (2026-12-05): a chat step's sequences follow its global batch however it is
split, a resumed torchrun run with dropout is the uninterrupted one, a failure on one rank is that
rank's line plus one from the others (no traceback), an error every rank meets is printed once,
and metrics.jsonl's failed write is named. torchrun runs are 2 gloo processes on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from gpt1.data.chat import ChatBatches, EncodedChats
from gpt1.data.shards import ShardWindows, prepare
from gpt1.train import finetune as ft
from gpt1.train.config import TrainConfig, load_config
from tests.test_battery import assert_one_clear_line
from tests.test_resource_limits import gpt1
from tests.test_train_ddp import ARGS, _assert_one_line_from_rank_0


def _torchrun(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    # torchrun checks its processes every --monitor-interval seconds and then SIGTERMs the others
    # when one has failed; 1 s (not 0.1) lets a survivor say its line first on a loaded machine.
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "--monitor-interval", "1", "-m", "gpt1", *map(str, args)], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "GPT1_QUIET": "1", "OMP_NUM_THREADS": "1", **(env or {})})


def _metrics(run) -> list[dict]:
    """metrics.jsonl's numbers that do not depend on the machine's speed."""
    keys = ("step", "loss", "grad_norm", "tokens", "val_loss")
    return [{k: r.get(k) for k in keys} for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


# ---- chat batches: a step's sequences follow its global batch -----------------------------

def _numbered(n: int) -> EncodedChats:
    """n sequences; sequence i is three tokens i + 1 (0 is the padding), all of them targets."""
    tokens = np.repeat(np.arange(1, n + 1, dtype=np.int32), 3)
    return EncodedChats(tokens=tokens, loss_mask=np.ones(len(tokens), bool), offsets=np.arange(0, 3 * n + 1, 3))


def _steps(data: EncodedChats, world_size: int, micro_batch: int, grad_accum: int, steps: int) -> list[list[list[int]]]:
    """Each step's micro-batches (sequence numbers): rank 0's, then rank 1's, ..."""
    ranks = [ChatBatches(data, micro_batch, seed=3, rank=r, world_size=world_size) for r in range(world_size)]
    return [[(x[:, 0] - 1).tolist() for rank in ranks for x, _ in rank.next_step(grad_accum)] for _ in range(steps)]


def test_a_chat_step_takes_the_same_sequences_however_its_batch_is_split():
    """Drawn per micro-batch, an epoch's end fell part-way through a step of several micro-batches:
    1 process x 2 x grad_accum 2 trained on other sequences than 2 processes x 2 (or 1 x 4) from
    the second epoch on."""
    data = _numbered(18)  # 18 is no multiple of 4: epochs end inside steps 5, 9, ...
    whole = _steps(data, 1, 4, 1, 12)
    for split in [(2, 2, 1), (1, 2, 2), (1, 1, 4), (2, 1, 2)]:
        steps = _steps(data, *split, 12)
        assert [sorted(sum(s, [])) for s in steps] == [sorted(s[0]) for s in whole], split
    # N ranks with grad_accum A take exactly the micro-batches of 1 process with N x A (as pretraining does).
    two_ranks = _steps(data, 2, 2, 2, 12)
    one = _steps(data, 1, 2, 4, 12)
    assert [sorted(s) for s in two_ranks] == [sorted(s) for s in one]
    # An epoch's 5 steps cover every sequence (20 places: the last step is topped up from the start).
    assert {i for step in _steps(data, 2, 1, 2, 5) for micro in step for i in micro} == set(range(18))


def test_a_resumed_chat_source_with_grad_accum_goes_on_as_the_original():
    data = _numbered(18)
    source = ChatBatches(data, 2, seed=3)
    for _ in range(4):
        source.next_step(2)
    state = json.loads(json.dumps(source.state_dict()))
    resumed = ChatBatches(data, 2, seed=3)
    resumed.load_state_dict(state)
    for _ in range(6):  # across two epochs' ends
        for (x, y), (x2, y2) in zip(source.next_step(2), resumed.next_step(2)):
            assert torch.equal(x, x2) and torch.equal(y, y2)


def test_finetune_grad_accum_matches_one_micro_batch_across_epochs(tiny_model_dir, tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} and {i}?"},
                                                     {"role": "assistant", "content": "it is " + "ha " * (i % 5)}]})
                            + "\n" for i in range(10)))
    runs = {}
    for batch, accum in [(4, 1), (2, 2)]:  # 10 sequences, 4 a step: epochs end inside steps 3 and 5
        args = ["block_size=48", "eval_batches=1", "device=cpu", "lora_r=2", "val_fraction=0", "max_steps=6",
                "lr=1e-3", f"batch_size={batch}", f"grad_accum={accum}"]
        ft.finetune(load_config(ft.FinetuneConfig, None, args, data=str(chat)), tiny_model_dir, tmp_path / f"b{batch}")
        runs[batch] = _metrics(tmp_path / f"b{batch}")
    for a, b in zip(runs[4], runs[2], strict=True):
        assert a["tokens"] == b["tokens"], a["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]


# ---- torchrun: resume with dropout, one rank's failure, errors once -------------------------

@pytest.mark.slow
def test_a_resumed_torchrun_run_with_dropout_is_the_uninterrupted_one(tiny_model_dir, tmp_path):
    """Only rank 0's RNG states were saved: rank 1 reseeded on resume and drew other dropout masks.
    Also: rank 0 dying (here after its step-2 checkpoint) left rank 1's gloo traceback."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                                                     {"role": "assistant", "content": f"{2 * i}"}]}) + "\n"
                            for i in range(12)))
    args = ["finetune", "--base", tiny_model_dir, "--data", chat, "batch_size=2", "block_size=32", "eval_batches=1",
            "device=cpu", "max_steps=4", "save_every=2", "lora_r=2", "lora_dropout=0.2", "val_fraction=0"]
    assert (whole := _torchrun(*args, "--out", tmp_path / "whole")).returncode == 0, whole.stderr[-3000:]
    killed = _torchrun(*args, "--out", tmp_path / "cut", env={"GPT1_CRASH_AT": "before-outputs:1"})
    assert killed.returncode != 0 and "gpt1 finetune: error:" not in killed.stderr, killed.stderr
    assert "[rank" not in killed.stderr and "gpt1/train" not in killed.stderr, killed.stderr  # no traceback
    assert (resumed := _torchrun(*args, "--out", tmp_path / "cut")).returncode == 0, resumed.stderr[-3000:]
    assert _metrics(tmp_path / "whole") == _metrics(tmp_path / "cut")


@pytest.mark.slow
def test_a_damaged_batch_of_one_rank_is_its_line_and_one_from_the_other(corpus_dir, tokenizer, tmp_path):
    """Rank 1 alone draws a window holding an id outside the vocabulary: it prints that, and
    rank 0, whose all-reduce lost its peer, printed gloo's traceback ("Connection closed by peer")."""
    data = tmp_path / "data"
    prepare([str(corpus_dir / "json")], tokenizer, data, val=2)
    train_bin = np.memmap(data / "train.bin", dtype=np.uint16, mode="r+")
    # The windows each rank draws, from gpt1's own sampler over a shard whose tokens are their positions.
    positions = tmp_path / "positions.bin"
    np.arange(len(train_bin), dtype=np.uint16).tofile(positions)
    assert len(train_bin) < 2**16

    def covered(rank: int, draws: int) -> set[int]:
        source = ShardWindows(positions, 16, 2, TrainConfig.seed, rank=rank, world_size=2)
        return {int(p) for _ in range(draws) for x, y in [source.next_batch()] for p in torch.cat([x, y], 1).flatten()}

    bad = min(covered(1, 4) - covered(1, 3) - covered(0, 6))  # in rank 1's 4th draw (step 4) only
    train_bin[bad] = 600  # the test tokenizer has 512 tokens
    train_bin.flush()

    proc = _torchrun("pretrain", "--data", data, "--out", tmp_path / "run", *ARGS, "max_steps=6")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("gpt1 pretrain: error: ")]
    assert len(errors) == 2, proc.stderr
    assert any(f"train.bin: token id 600 at token {bad:,} is not below the vocabulary size 512" in e for e in errors)
    assert any("rank 0: stopped because another process of this torchrun run failed" in e for e in errors)
    assert "[rank" not in proc.stderr and "gpt1/train" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_an_error_every_rank_meets_is_one_line(data_dir, tmp_path):
    """device=cuda without CUDA: torch.cuda.set_device ran before the device was checked (an
    AttributeError traceback from each rank), and errors all ranks raise alike came once per rank."""
    _assert_one_line_from_rank_0(_torchrun("pretrain", "--data", data_dir, "--out", tmp_path / "run",
                                           *ARGS, "device=cuda"),
                                 "device: cuda requested but no CUDA GPU is available here")


# ---- metrics.jsonl on a full disk ----------------------------------------------------------

@pytest.mark.slow
def test_a_failed_metrics_write_names_the_file(data_dir, tmp_path):
    """The loop's `finally` closed metrics.jsonl, whose flush of the line still buffered failed
    again without a file name and replaced the error: "standard output: cannot write"."""
    args = ["pretrain", "--data", data_dir, "--out", tmp_path / "run", "model=tiny", "block_size=16", "batch_size=2",
            "device=cpu", "eval_batches=1", "max_steps=1000", "save_every=1000", "eval_every=1000"]
    # train_config.json (~2.5 KB with its provenance) fits; metrics.jsonl reaches the limit in ~45 steps
    result = gpt1(*args, file_size=8192)
    assert_one_clear_line(result.returncode, result.stderr.decode(),
                          r"run/metrics.jsonl: cannot write \(File too large\); raise the file-size limit")
