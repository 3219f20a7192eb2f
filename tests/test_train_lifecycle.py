"""A run dir's life: what a resume accepts as the same run (base, data), what a reader sees while
it trains, what a killed run leaves in its logs, and who is told what when two runs start at once."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gpt1.cli import main
from gpt1.core.errors import Gpt1Error
from gpt1.core.io import exclusive
from gpt1.core.tokenizer import Tokenizer
from gpt1.data.shards import load_meta, prepare
from gpt1.formats.modeldir import load_model
from gpt1.train import checkpoint
from gpt1.train import finetune as ft
from gpt1.train.config import TrainConfig, load_config
from gpt1.train.finetune import FinetuneConfig, finetune
from gpt1.train.pretrain import pretrain
from tests.test_battery import assert_one_clear_line, run_main

TINY = ["model=tiny", "block_size=32", "batch_size=4", "eval_batches=2", "device=cpu", "lr=3e-3", "min_lr=3e-4"]
FT = ["batch_size=4", "block_size=48", "eval_batches=1", "device=cpu", "lora_r=2", "val_fraction=0"]


def _chat_file(path: Path, reply: str = "{}") -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                                                     {"role": "assistant", "content": reply.format(2 * i)}]}) + "\n"
                            for i in range(12)))
    return path


def _finetune(base: Path, out: Path, chat: Path, *overrides: str):
    return ft.finetune(load_config(ft.FinetuneConfig, None, [*FT, *overrides], data=str(chat)), base, out)


def _interrupt_at_save(monkeypatch, n: int) -> None:
    """Ctrl-C in the middle of the n-th checkpoint save (its earlier ones are complete)."""
    real_save, calls = checkpoint.save_safetensors, []

    def save_then_stop(path, *args):
        calls.append(path)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real_save(path, *args)

    monkeypatch.setattr(checkpoint, "save_safetensors", save_then_stop)


# ---- a fine-tune's base is its weights and its adapter -------------------------------------

def test_a_finetune_of_a_finetuned_model_does_not_resume_on_another_base(tiny_model_dir, tmp_path):
    """fb fine-tuned from fa (itself fine-tuned without special tokens: its model.safetensors is
    its base's byte for byte, the adapter alone differs) resumed on fa's base without a word: the
    base was identified by its model.safetensors only."""
    chat = _chat_file(tmp_path / "chat.jsonl")
    fa, fb = tmp_path / "fa", tmp_path / "fb"
    _finetune(tiny_model_dir, fa, chat, "max_steps=1", "train_special_tokens=false")
    assert (fa / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    # A plain base's record is its weights file's sha256, as before adapters counted: those runs resume.
    plain = hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert json.loads((fa / "base.json").read_text())["sha256"] == plain
    _finetune(fa, fb, chat, "max_steps=1")
    with pytest.raises(Gpt1Error, match=r"fb was fine-tuned from other base weights than .*\(base\.json differs\)"):
        _finetune(tiny_model_dir, fb, chat, "max_steps=1")
    # fa copied elsewhere is the same base; with its adapter changed, it is another one.
    copy = shutil.copytree(fa, tmp_path / "copy")
    assert _finetune(copy, fb, chat, "max_steps=1").resumed_from == 1
    weights = copy / "adapter" / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    state = load_file(str(weights))
    key = next(k for k in state if k.endswith("lora_B.weight"))
    save_file({**state, key: state[key] + 0.01}, str(weights), metadata=metadata)
    with pytest.raises(Gpt1Error, match="fine-tuned from other base weights"):
        _finetune(copy, fb, chat, "max_steps=1")


def test_a_finetune_killed_before_its_first_outputs_does_not_resume_on_another_base(tiny_model_dir, tmp_path):
    """base.json is written with the outputs, after the checkpoint: a run killed between the two
    resumed on other weights at the same path (steps 1-2 on one base, 3-4 on another, and the
    finished base.json naming the second only). The fingerprint is in train_config.json now."""
    import subprocess
    import sys

    chat, base, out = _chat_file(tmp_path / "chat.jsonl"), tmp_path / "base", tmp_path / "ft"
    shutil.copytree(tiny_model_dir, base)
    args = ["--base", str(base), "--data", str(chat), "--out", str(out), *FT, "max_steps=4", "save_every=2"]
    killed = subprocess.run([sys.executable, "-m", "gpt1", "finetune", *args], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "GPT1_CRASH_AT": "before-outputs:1"})
    assert killed.returncode == 137 and not (out / "base.json").exists(), killed.stderr
    weights = load_file(str(base / "model.safetensors"))
    name = next(iter(weights))
    save_file({**weights, name: weights[name] + 0.01}, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(Gpt1Error, match=r"ft was fine-tuned from other base weights than .*base \(its train_config.json"):
        _finetune(base, out, chat, "max_steps=4", "save_every=2")
    shutil.copy(tiny_model_dir / "model.safetensors", base / "model.safetensors")  # the base it began on
    assert _finetune(base, out, chat, "max_steps=4", "save_every=2").resumed_from == 2


# ---- a fine-tune's data is its encoded sequences -------------------------------------------

def test_a_finetune_does_not_resume_on_edited_chat_data_of_the_same_size(tiny_model_dir, tmp_path, monkeypatch,
                                                                          stop_training_at):
    """Resuming compared only the number of sequences: an edit that kept it trained on. (A run
    with a step left: a finished one has nothing to resume, and its rerun reads no data.)"""
    chat, out = _chat_file(tmp_path / "chat.jsonl"), tmp_path / "ft"
    steps = ("max_steps=2", "save_every=1")
    stop_training_at(2, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        _finetune(tiny_model_dir, out, chat, *steps)
    monkeypatch.undo()
    _chat_file(chat, reply="{} it is")
    with pytest.raises(Gpt1Error, match=r"ft holds a run on other training data \(.*sha256: '[0-9a-f]{64}' -> "
                                        r"'[0-9a-f]{64}'.*\); rerun with the data it was trained on"):
        _finetune(tiny_model_dir, out, chat, *steps)
    # A run dir from before the data was recorded resumes (and records it from then on).
    config_file = out / "train_config.json"
    config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items() if k != "data"}))
    assert _finetune(tiny_model_dir, out, chat, *steps).resumed_from == 1
    assert "sha256" in json.loads(config_file.read_text())["data"]


# ---- a fine-tune run dir read while it trains ----------------------------------------------

@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    model, tokenizer = ft.prepare_model(tiny_model_dir, ft.FinetuneConfig(data="x"))
    return model, tokenizer


def _train_a_little(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_reader_between_the_weights_and_the_adapter_gets_one_snapshot(lora_model, tmp_path):
    """A save replaces model.safetensors, then adapter/: a reader in between pairs the newer
    weights file with the older adapter. The weights file differs from the base only in the
    special-token rows, and the adapter holds those rows too (applied over them on load), so the
    pair loads as the adapter's snapshot, whole."""
    model, tokenizer = lora_model
    base = {"path": "base", "sha256": "0" * 64}
    _train_a_little(model)
    ft.save_finetuned(tmp_path / "old", model, tokenizer, base)
    _train_a_little(model)
    ft.save_finetuned(tmp_path / "new", model, tokenizer, base)
    torn = shutil.copytree(tmp_path / "new", tmp_path / "torn", ignore=shutil.ignore_patterns("adapter"))
    shutil.copytree(tmp_path / "old" / "adapter", torn / "adapter")
    assert (torn / "model.safetensors").read_bytes() != (tmp_path / "old" / "model.safetensors").read_bytes()
    old, loaded = _state(load_model(tmp_path / "old")), _state(load_model(torn))
    assert old.keys() == loaded.keys() and all(torch.equal(old[k], loaded[k]) for k in old)


def test_a_first_save_cut_before_its_adapter_does_not_load_as_the_base(lora_model, tmp_path, monkeypatch):
    """Killed (or read) after the first save's weights and chat template but before its adapter,
    the run dir loaded as the base model with a chat template: base.json, which marks a dir whose
    weights need their adapter, came last."""
    model, tokenizer = lora_model

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "save_adapter", killed)
    with pytest.raises(KeyboardInterrupt):
        ft.save_finetuned(tmp_path / "cut", model, tokenizer, {"path": "base", "sha256": "0" * 64})
    assert (tmp_path / "cut" / "model.safetensors").is_file() and Tokenizer.load(tmp_path / "cut")
    with pytest.raises(Gpt1Error, match=r"cut: a fine-tuned model dir \(base\.json\) without its adapter/ folder"):
        load_model(tmp_path / "cut")


# ---- TensorBoard after a resume ------------------------------------------------------------

def test_tensorboard_drops_the_steps_a_killed_run_logged_after_its_checkpoint(data_dir, tmp_path, monkeypatch):
    """Killed at step 4 and resumed from the step-2 checkpoint, the event file held steps
    1, 2, 3, 4, 3, 4 (metrics.jsonl is trimmed to the checkpoint; the events were not)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = load_config(TrainConfig, None, [*TINY, "max_steps=4", "save_every=2", "eval_every=2", "tensorboard=true"])
    _interrupt_at_save(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, data_dir, run)
    monkeypatch.undo()
    assert pretrain(cfg, data_dir, run).resumed_from == 2
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([r["loss"] for r in records])
    assert [e.step for e in events.Scalars("val_loss")] == [2, 4]


# ---- two runs started at once --------------------------------------------------------------

def test_a_run_dir_being_created_by_another_process_is_named_as_such(data_dir, tmp_path, capsys):
    """Two pretrains started at once on a new --out: the loser read the winner's half-made run
    dir (its lock, no train_config.json yet) as a folder of other files."""
    out = tmp_path / "new"
    with exclusive(out / "checkpoints", "training"):  # the winner, before it wrote anything else
        rc, err = run_main(capsys, "pretrain", "--data", data_dir, "--out", out, *TINY, "max_steps=2")
    assert_one_clear_line(rc, err, r"new/checkpoints: another thread of this process is training there already")
    assert os.listdir(out) == ["checkpoints"]  # the loser wrote nothing
    # A run killed just after taking its lock left only that: the folder is still a new one.
    cfg = load_config(TrainConfig, None, [*TINY, "max_steps=2"])
    assert pretrain(cfg, data_dir, out).resumed_from == 0
    # A folder of other files is refused before anything is written in it.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(Gpt1Error, match="mine is not empty and holds no gpt1 run"):
        pretrain(cfg, data_dir, tmp_path / "mine")
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_a_finished_finetune_whose_data_is_gone_reruns_as_nothing_to_do(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """The docs: a finished run's rerun does not check its data, "which may be gone". Recorded
    resolved, the path typed relative no longer matched once the file was deleted: "different config
    (data: '/abs/chats.jsonl' -> 'chats.jsonl')". And a finished run said "resuming" first."""
    monkeypatch.chdir(tmp_path)
    chat = _chat_file(tmp_path / "chats.jsonl")
    _finetune(tiny_model_dir, tmp_path / "ft", Path("chats.jsonl"), "max_steps=2")
    chat.unlink()
    with caplog.at_level("INFO", logger="gpt1"):
        again = _finetune(tiny_model_dir, tmp_path / "ft", Path("chats.jsonl"), "max_steps=2")
    assert again.resumed_from == 2 and again.steps == 2
    said = [r.message for r in caplog.records]
    assert any("already finished its 2 steps; nothing to do" in m for m in said)
    assert not any(m.startswith("resuming") for m in said)


# The lines that name the way on: the refusal of a run dir holding another config, Ctrl-C's.

TINY_RARE_EVAL = ["model=tiny", "block_size=32", "batch_size=4", "eval_batches=1", "device=cpu", "eval_every=100"]


def test_a_finished_run_asked_for_more_steps_names_what_may_change_and_how_to_train_on(data_dir, tmp_path):
    """`max_steps: 2 -> 4` was refused with "rerun with the same config": no way on. The refusal
    names the keys a resume may change and the new run that trains on from the weights, which works."""
    run, more = tmp_path / "run", tmp_path / "more"
    pretrain(load_config(TrainConfig, None, [*TINY_RARE_EVAL, "max_steps=2"]), data_dir, run)
    with pytest.raises(Gpt1Error) as refused:
        pretrain(load_config(TrainConfig, None, [*TINY_RARE_EVAL, "max_steps=4"]), data_dir, run)
    message = str(refused.value)
    assert "different config (max_steps: 2 -> 4)" in message
    assert ("a resume may change only device, eval_batches, eval_every, gradient_checkpointing, keep_best, "
            "keep_checkpoints, max_bad_steps, save_every, tensorboard") in message
    assert message.endswith(f"with a fresh optimizer and LR warmup): --out NEW init_from={run}")
    result = pretrain(load_config(TrainConfig, None, [*TINY_RARE_EVAL, "max_steps=4", f"init_from={run}"]), data_dir, more)
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


def test_ctrl_c_names_the_step_a_rerun_resumes_from(data_dir, tmp_path, capsys, stop_training_at):
    """`interrupted; run the same command again to resume` did not say from where: the steps
    after the latest checkpoint are lost."""
    stop_training_at(4, KeyboardInterrupt)  # inside step 4: steps 1-3 done, checkpoints every 2
    rc, err = run_main(capsys, "pretrain", "--data", data_dir, "--out", tmp_path / "run", *TINY_RARE_EVAL, "max_steps=6",
                       "save_every=2")
    assert rc == 130
    assert err.rstrip().endswith("gpt1 pretrain: interrupted; its latest checkpoint is step 2 (any steps after it "
                                 "are lost); run the same command again to resume"), err


# A trainer_state.pt that loads but is not gpt1's, metrics.jsonl lines that `gpt1 plot` skips,
# and a prepared data dir with an empty split: each one line, never a traceback.

TRAIN = ["model=tiny", "block_size=32", "batch_size=2", "device=cpu", "max_steps=3", "save_every=1", "eval_batches=1",
         "eval_every=100"]


@pytest.fixture(scope="module")
def stopped_run(corpus_dir, tokenizer, tmp_path_factory) -> tuple[Path, Path]:
    """A prepared data dir and a run of 3 steps interrupted in its third, after its checkpoint at step 2."""
    import gpt1.train.loop as loop

    root = tmp_path_factory.mktemp("stopped")
    prepare([str(corpus_dir / "json")], tokenizer, root / "data", val=4)
    real, calls = loop._loss_and_backward, []

    def stopping(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "_loss_and_backward", stopping)
        assert main([str(a) for a in ["pretrain", "--data", root / "data", "--out", root / "run", *TRAIN]]) == 130
    return root / "data", root / "run"


def resume(capsys, data: Path, run: Path) -> tuple[int, str]:
    return run_main(capsys, "pretrain", "--data", data, "--out", run, *TRAIN)


def copy_run(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy, copy / "checkpoints" / "step-00000002" / "trainer_state.pt"


def _drop_rng(s: dict) -> dict:
    del s["rng"]
    return s


@pytest.mark.parametrize("edit, problem", [
    (lambda s: {}, r"missing key 'step'"),
    (_drop_rng, r"missing key 'rng'"),
    (lambda s: {**s, "sampler": {}}, r"missing key 'sampler\.draws'"),
    (lambda s: {**s, "step": str(s["step"])}, r"'step' is str, expected int"),
    (lambda s: {**s, "last": {}}, r"missing key 'last\.loss'"),
    (lambda s: {**s, "end": "3"}, r"'end' is str, expected int"),  # a key older checkpoints lack, checked when there
    (lambda s: [s], r"the state is list, expected dict"),
], ids=["empty", "no-rng", "sampler-without-draws", "step-a-string", "last-empty", "end-a-string", "a-list"])
def test_a_trainer_state_with_missing_keys_or_wrong_types_is_one_line(stopped_run, tmp_path, capsys, edit, problem):
    data, run = stopped_run
    run, state_file = copy_run(run, tmp_path)
    torch.save(edit(torch.load(state_file, weights_only=True)), state_file)
    assert_one_clear_line(*resume(capsys, data, run),
                          rf"{state_file}: cannot read the checkpoint \({problem}\); it is not a trainer state gpt1 saved")


def test_metrics_lines_that_plot_skips_do_not_stop_a_resume(stopped_run, tmp_path, capsys):
    data, run = stopped_run
    run, _ = copy_run(run, tmp_path)
    metrics = run / "metrics.jsonl"
    kept = metrics.read_text()
    # A 5,000-digit number (int() refuses over 4,300 digits) and JSON nested 100,000 deep.
    metrics.write_text(kept + '{"step": ' + "1" * 5000 + "}\n" + "[" * 100_000 + "\n")
    rc, err = resume(capsys, data, run)
    assert rc == 0, err
    lines = metrics.read_text().splitlines()
    assert metrics.read_text().startswith(kept) and [json.loads(line)["step"] for line in lines][-1] == 3


def test_a_data_dir_with_an_empty_split_is_one_line(stopped_run, tiny_model_dir, tokenizer_dir, corpus_dir, tmp_path, capsys):
    source, _ = stopped_run
    data = tmp_path / "data"
    shutil.copytree(source, data)
    meta = json.loads((data / "meta.json").read_text())
    meta["val"]["tokens"] = 0  # meta.json and val.bin agree: nothing to validate on
    (data / "meta.json").write_text(json.dumps(meta))
    (data / "val.bin").write_bytes(b"")
    expected = rf"{data / 'val.bin'}: no validation tokens \(meta.json counts 0\); .* damaged: prepare it again"
    assert_one_clear_line(*run_main(capsys, "eval", "--model", tiny_model_dir, "--device", "cpu", "--data", data), expected)
    assert_one_clear_line(*run_main(capsys, "pretrain", "--data", data, "--out", tmp_path / "run", *TRAIN), expected)
    # The same `prepare` again no longer says "nothing to do" over the damage; --overwrite redoes it.
    redo = ["prepare", "--tokenizer", tokenizer_dir, "--out", data, "--val", "4", corpus_dir / "json"]
    assert_one_clear_line(*run_main(capsys, *redo), r"train.bin/val.bin do not match meta.json \(damaged\)")
    assert run_main(capsys, *redo, "--overwrite")[0] == 0
    assert load_meta(data)["val"]["tokens"] == len(np.fromfile(data / "val.bin", dtype=np.uint16)) > 0


# A run started with relative paths, resumed from another folder.

def test_a_run_started_with_relative_paths_resumes_from_another_folder(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """`init_from=qs/base` from one folder and `init_from=../qs/base` from its subfolder (the same
    model) was "a different config": the recorded relative path was read from the new folder."""
    shutil.copytree(tiny_model_dir, tmp_path / "base")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(max_steps=2, device="cpu", batch_size=2, block_size=16, eval_every=1, save_every=1, init_from="base")
    assert pretrain(cfg, data_dir, "run").steps == 2
    monkeypatch.chdir(tmp_path / "sub")
    again = pretrain(dataclasses.replace(cfg, init_from="../base"), data_dir, "../run")
    assert again.steps == 2 and again.resumed_from == 2
    recorded = json.loads((tmp_path / "run" / "train_config.json").read_text())["config"]["init_from"]
    assert recorded == str((tmp_path / "base").resolve())
