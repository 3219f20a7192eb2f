"""A training step is the same whatever the split of its batch into micro-batches (grad_accum)
and processes: its loss is the mean over all of the step's targets. Chat batches hold different
numbers of targets (reply tokens), and each micro-batch's mean loss used to count as much as any
other's. Token counts leave padding out; a run stopped before its first checkpoint says that a
rerun starts over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt1.core.constants import IGNORE_INDEX
from gpt1.core.model import GPT
from gpt1.data.chat import ChatBatches, encode_conversations
from gpt1.train import finetune as ft
from gpt1.train.config import TrainConfig, load_config
from gpt1.train.loop import train
from tests.test_battery import run_main

PAD = 0


def _global_batch(vocab: int):
    """5 rows of 12 positions, right-padded: rows 0-1 have 1 target each (a short reply), rows
    2-3 have 8 and 10, row 4 has none (a prompt alone)."""
    g = torch.Generator().manual_seed(0)
    lengths, targets = [5, 7, 12, 10, 6], [1, 1, 8, 10, 0]
    x = torch.full((5, 12), PAD, dtype=torch.long)
    y = torch.full((5, 12), IGNORE_INDEX, dtype=torch.long)
    for row, (n, t) in enumerate(zip(lengths, targets)):
        ids = torch.randint(6, vocab, (n + 1,), generator=g)
        x[row, :n] = ids[:-1]
        y[row, n - t:n] = ids[n + 1 - t:]
    return x, y


class Batches:
    """The same micro-batches every step; each is cut to its own longest row, as chat batches are."""

    pad_id = PAD

    def __init__(self, x, y, split: list[list[int]]):
        self.micro = []
        for rows in split:
            width = int((x[rows] != PAD).sum(1).max())
            self.micro.append((x[rows, :width], y[rows, :width]))
        self.draws = 0

    def next_batch(self):
        self.draws += 1
        return self.micro[(self.draws - 1) % len(self.micro)]

    def state_dict(self):
        return {"draws": self.draws}

    def load_state_dict(self, state):
        self.draws = state["draws"]


def _one_step(tiny_config, tmp_path, monkeypatch, split: list[list[int]], name: str):
    """One step's result, metrics record and gradients (as clipped: AdamW's first update is about
    lr x sign(gradient), which blows up float noise in the gradients that are 0, e.g. key biases')."""
    x, y = _global_batch(tiny_config.vocab_size)
    torch.manual_seed(0)
    model = GPT(tiny_config)
    grads = {}
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip_and_record(params, *args, **kwargs):
        norm = real_clip(params, *args, **kwargs)
        grads.update({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_record)
    cfg = TrainConfig(device="cpu", max_steps=1, grad_accum=len(split), lr=1e-3, warmup=0.0, eval_every=1,
                      save_every=1)
    result = train(model, cfg, tmp_path / name, Batches(x, y, split), lambda: [(x, y)], lambda d, m: None)
    record = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
    return result, record, grads


def _assert_same_gradients(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-4, atol=1e-7, msg=key)


@pytest.mark.parametrize("split", [[[0, 1], [2, 3]], [[0], [1], [2], [3]], [[3], [0, 1, 2]]],
                         ids=["2x2", "1x4", "uneven"])
def test_a_step_split_into_micro_batches_is_the_whole_batch_step(tiny_config, tmp_path, monkeypatch, split):
    """Before: micro-batches with 2 and 18 targets each had the weight 1/2, so the loss, the
    gradient and the update differed from one batch of the same 4 rows."""
    whole, whole_record, whole_grads = _one_step(tiny_config, tmp_path, monkeypatch, [[0, 1, 2, 3]], "whole")
    parts, parts_record, parts_grads = _one_step(tiny_config, tmp_path, monkeypatch, split, "parts")
    assert parts.train_loss == pytest.approx(whole.train_loss, rel=1e-5)
    assert parts_record["grad_norm"] == pytest.approx(whole_record["grad_norm"], rel=1e-5)
    _assert_same_gradients(whole_grads, parts_grads)
    # The logged loss is the mean over the 20 targets (as validation's), of the weights before the step.
    torch.manual_seed(0)
    x, y = _global_batch(tiny_config.vocab_size)
    assert whole.train_loss == pytest.approx(GPT(tiny_config)(x, y)[1].item(), rel=1e-5)
    # Tokens are the inputs that are not padding, however the rows are padded: 5 + 7 + 12 + 10.
    assert parts.tokens == whole.tokens == 34


def test_a_micro_batch_without_targets_adds_nothing_to_the_step(tiny_config, tmp_path, monkeypatch):
    """A micro-batch of prompts alone has a NaN mean loss (0/0): the whole step was skipped as
    non-finite. Its weight is 0 now, and its gradient 0 (not NaN)."""
    whole, _, whole_grads = _one_step(tiny_config, tmp_path, monkeypatch, [[0, 1, 2, 3]], "whole")
    parts, record, parts_grads = _one_step(tiny_config, tmp_path, monkeypatch, [[0, 1], [4], [2, 3]], "parts")
    assert "skipped" not in record
    assert parts.train_loss == pytest.approx(whole.train_loss, rel=1e-5)
    _assert_same_gradients(whole_grads, parts_grads)
    assert parts.tokens == whole.tokens + 6  # its inputs are trained on (as context): counted


# ---- through `gpt1 finetune`: the tester's case, chat replies of 1 word and of 30 ----------

FT = ["block_size=64", "eval_batches=1", "device=cpu", "lora_r=2", "val_fraction=0", "max_steps=1", "lr=1e-3"]


def _unbalanced_chats(path: Path) -> Path:
    words = "the cat sat on a mat and ran far away over big red hills".split()
    path.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                 {"role": "assistant", "content": " ".join(words * 2) if i % 2 else "yes"}]}) + "\n"
        for i in range(16)))
    return path


def test_finetune_batch_size_and_grad_accum_are_the_same_math(tiny_model_dir, tokenizer, tmp_path):
    """`batch_size=8 grad_accum=1` and `batch_size=2 grad_accum=4` (the recipe's promise): the
    loss was 6.35 vs 7.02 on the tester's data, the token count 896 vs 650 (padding counted)."""
    from safetensors.torch import load_file

    chat = _unbalanced_chats(tmp_path / "chat.jsonl")
    runs = {}
    for batch, accum in [(8, 1), (2, 4), (1, 8)]:
        out = tmp_path / f"b{batch}a{accum}"
        result = ft.finetune(load_config(ft.FinetuneConfig, None, [*FT, f"batch_size={batch}", f"grad_accum={accum}"],
                                         data=str(chat)), tiny_model_dir, out)
        record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        runs[batch] = result, record, load_file(str(out / "adapter" / "adapter_model.safetensors"))
    (whole, whole_record, whole_adapter) = runs[8]
    for batch in (2, 1):
        result, record, adapter = runs[batch]
        assert result.train_loss == pytest.approx(whole.train_loss, rel=1e-5), batch
        assert record["grad_norm"] == pytest.approx(whole_record["grad_norm"], rel=1e-5), batch
        for key, value in whole_adapter.items():
            torch.testing.assert_close(adapter[key], value, rtol=0, atol=1e-6, msg=key)
        assert result.tokens == whole.tokens
    # The step's 8 sequences, padding excluded (the first batch of the same shuffled order).
    data = encode_conversations(tokenizer, ft.load_chat_splits(ft.FinetuneConfig(data=str(chat), val_fraction=0))[0],
                                65)
    x, _ = ChatBatches(data, 8, seed=ft.FinetuneConfig.seed, pad_id=tokenizer.pad_id).next_batch()
    assert whole.tokens == int((x != tokenizer.pad_id).sum()) < x.numel()


@pytest.mark.slow
def test_finetune_two_processes_are_one_with_grad_accum(tiny_model_dir, tmp_path):
    """DDP averaged the ranks' mean losses: 2 ranks x 1 sequence weighed a 1-word reply as much
    as a 30-word one, unlike 1 process x 2 accumulated sequences (the same two)."""
    chat = _unbalanced_chats(tmp_path / "chat.jsonl")
    args = [*FT, "max_steps=2", "batch_size=1"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gpt1",
         "finetune", "--base", str(tiny_model_dir), "--data", str(chat), "--out", str(tmp_path / "ddp"), *args],
        capture_output=True, text=True, timeout=180, env={**os.environ, "GPT1_QUIET": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ft.finetune(load_config(ft.FinetuneConfig, None, [*args, "grad_accum=2"], data=str(chat)), tiny_model_dir,
                tmp_path / "one")
    ddp, one = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                for name in ("ddp", "one"))
    assert len(ddp) == len(one) == 2
    for a, b in zip(ddp, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["tokens"] == b["tokens"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


# ---- the line of a run stopped before its first checkpoint -------------------------------

TINY = ["model=tiny", "block_size=32", "batch_size=4", "eval_batches=2", "device=cpu", "max_steps=3", "eval_every=100"]


@pytest.mark.parametrize("save_every,hint", [(100, "terminated before its first checkpoint; a rerun starts over"),
                                             (1, "terminated; its latest checkpoint is step 2 (any steps after it are lost); "
                                                 "run the same command again to resume")])
def test_a_terminated_run_says_whether_a_rerun_resumes(data_dir, tmp_path, capsys, monkeypatch, save_every, hint):
    """SIGTERM at step 3 of a run saving every 100 steps said "run the same command again to
    resume": the rerun started over from step 0."""
    import gpt1.train.loop as loop

    real, calls = loop._loss_and_backward, []

    def terminated_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_loss_and_backward", terminated_at_step_3)
    rc, err = run_main(capsys, "pretrain", "--data", data_dir, "--out", tmp_path / "run", *TINY,
                       f"save_every={save_every}")
    assert rc == 128 + signal.SIGTERM
    assert err.rstrip().endswith(f"gpt1 pretrain: {hint}"), err
