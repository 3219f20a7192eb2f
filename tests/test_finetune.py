"""Chat fine-tuning end to end on a tiny base model: what changes, what loads, resume, the CLI."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import gpt1
from gpt1.cli import main
from gpt1.core.errors import Gpt1Error
from gpt1.core.lora import LoRALinear
from gpt1.data.chat import ChatBatches, EncodedChats
from gpt1.data.chat_sources import read_conversations, split_conversations
from gpt1.formats.modeldir import load_model
from gpt1.train import checkpoint
from gpt1.train import finetune as ft
from gpt1.train.config import load_config
from gpt1.train.evaluate import evaluate_chat
from gpt1.train.finetune import FinetuneConfig, finetune, merge_model_dir
from tests.test_battery import assert_one_clear_line, run_main
from tests.test_train_lifecycle import _sums_chat_file

RUN = ["batch_size=4", "block_size=48", "eval_batches=2", "device=cpu", "lr=5e-3", "min_lr=1e-4",
       "lora_r=4", "lora_alpha=8", "val_fraction=0.2"]


def _oasst_file(path: Path, trees: int = 24) -> Path:
    """Flat OASST messages: small ranked trees (plus a deleted reply and a German tree)."""
    lines = []
    for t in range(trees):
        tree = f"tree-{t}"
        lines += [
            {"message_id": f"{tree}-p", "parent_id": None, "message_tree_id": tree, "role": "prompter",
             "text": f"What is {t} plus {t}?", "lang": "en", "rank": None, "deleted": False, "review_result": True},
            {"message_id": f"{tree}-a", "parent_id": f"{tree}-p", "message_tree_id": tree, "role": "assistant",
             "text": f"{t} plus {t} is {2 * t}.", "lang": "en", "rank": 0, "deleted": False, "review_result": True},
            {"message_id": f"{tree}-b", "parent_id": f"{tree}-p", "message_tree_id": tree, "role": "assistant",
             "text": "I do not know.", "lang": "en", "rank": 1, "deleted": t % 3 == 0, "review_result": True},
        ]
    lines.append({"message_id": "de-p", "parent_id": None, "message_tree_id": "de", "role": "prompter",
                  "text": "Wie geht's?", "lang": "de", "rank": None, "deleted": False, "review_result": True})
    lines.append({"message_id": "de-a", "parent_id": "de-p", "message_tree_id": "de", "role": "assistant",
                  "text": "Gut, danke.", "lang": "de", "rank": 0, "deleted": False, "review_result": True})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def oasst(tmp_path_factory) -> Path:
    return _oasst_file(tmp_path_factory.mktemp("oasst") / "oasst.messages.jsonl")


def _cfg(data: Path, *overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, [*RUN, *overrides], data=str(data))


@pytest.fixture(scope="module")
def run(tiny_model_dir, oasst, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "run"
    return out, finetune(_cfg(oasst, *STEPS), tiny_model_dir, out)


STEPS = ["max_steps=4", "eval_every=2", "save_every=2", "weight_decay=0.1"]


def test_only_lora_and_special_token_rows_change(run, tiny_model_dir, tokenizer):
    out, result = run
    assert result.steps == 4 and math.isfinite(result.val_loss)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    tuned = load_file(str(out / "model.safetensors"))  # the base the adapter applies to
    assert set(base) == set(tuned)
    special = tokenizer.special_ids
    for name, tensor in base.items():
        if name == "transformer.wte.weight":
            others = [i for i in range(tensor.size(0)) if i not in special]
            assert torch.equal(tuned[name][others], tensor[others])  # bit-identical, despite weight decay
            assert not torch.equal(tuned[name][tokenizer.eos_id], tensor[tokenizer.eos_id])
        else:
            assert torch.equal(tuned[name], tensor), name
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {"attn.c_attn": 12}
    assert config["trainable_token_indices"] == {"wte": special}
    base_json = json.loads((out / "base.json").read_text())
    assert base_json["path"] == str(tiny_model_dir.resolve()) and len(base_json["sha256"]) == 64
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val_ppl" in m] == [2, 4]


def test_finetuned_dir_loads_merged_and_unmerged_and_chats(run, tmp_path):
    out, _ = run
    llm = gpt1.load(out, device="cpu")
    assert llm.is_chat_model and not any(isinstance(m, LoRALinear) for m in llm.model.modules())
    unmerged = load_model(out, adapter="keep")
    assert any(isinstance(m, LoRALinear) for m in unmerged.modules())
    x = torch.tensor([[4, 40, 41, 42, 5, 50, 51, 2, 4, 60, 5]])
    with torch.no_grad():
        expected = unmerged(x)
        torch.testing.assert_close(llm.model(x), expected, atol=1e-5, rtol=0)
        merged = merge_model_dir(out, tmp_path / "merged")
        assert not (merged / "adapter").exists() and (merged / "chat_template.jinja").is_file()
        plain = gpt1.load(merged, device="cpu")
        torch.testing.assert_close(plain.model(x), expected, atol=1e-5, rtol=0)
    reply = llm.chat([{"role": "user", "content": "What is 3 plus 3?"}], max_new_tokens=8, seed=0)
    assert isinstance(reply, str)


def test_chat_eval_matches_the_training_validation(run, oasst):
    """`gpt1 eval --chat` scores the conversations fine-tuning held out (the run's val_fraction
    and seed), not the whole chat set, and gives the loop's final validation loss."""
    out, result = run
    llm = gpt1.load(out, device="cpu")
    evaluated = evaluate_chat(llm, str(oasst), batch_size=4, max_batches=2, show_progress=False)
    assert evaluated.loss == pytest.approx(result.val_loss, rel=1e-4)
    assert evaluated.perplexity == pytest.approx(math.exp(evaluated.loss))
    _, val = split_conversations(read_conversations(str(oasst)), 0.2, seed=FinetuneConfig.seed)
    assert evaluated.conversations == len(val) and "held-out 20%" in evaluated.source
    # bits per byte: the same summed loss, over the UTF-8 bytes of the assistant tokens
    assert evaluated.bits_per_byte == pytest.approx(evaluated.loss * evaluated.tokens / (math.log(2) * evaluated.bytes))
    assert 0 < evaluated.bytes


def test_chat_eval_shapes_the_conversations_as_the_run_did(tiny_model_dir, oasst, tmp_path, capsys):
    """`eval --chat` cut conversations at the model's context, not the run's block_size, and read
    every language where the run kept some; `--block-size` with `--chat` was silently ignored."""
    from gpt1.cli import main
    from tests.test_battery import run_main

    out = tmp_path / "en"
    result = finetune(_cfg(oasst, *STEPS, 'languages=["en"]', "block_size=16", "val_fraction=0.5"), tiny_model_dir, out)
    llm = gpt1.load(out, device="cpu")
    evaluated = evaluate_chat(llm, str(oasst), batch_size=4, max_batches=2, show_progress=False)
    assert evaluated.loss == pytest.approx(result.val_loss, rel=1e-4)
    _, val = split_conversations(read_conversations(str(oasst), languages=["en"]), 0.5, seed=FinetuneConfig.seed)
    _, every_language = split_conversations(read_conversations(str(oasst)), 0.5, seed=FinetuneConfig.seed)
    assert evaluated.conversations == len(val) < len(every_language)  # the German tree is held out too
    longer = evaluate_chat(llm, str(oasst), batch_size=4, max_batches=2, block_size=48, show_progress=False)
    assert longer.loss != pytest.approx(evaluated.loss, rel=1e-4)
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--data", str(oasst), "--chat", "--block-size", "48", "--batch-size", "4",
                 "--max-batches", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(longer.loss, rel=1e-5)
    code, err = run_main(capsys, "eval", "--model", out, "--data", oasst, "--chat", "--text-field", "body")
    assert code == 2 and "--text-field applies to text sources, not to --chat" in err
    # In task mode the perplexity flags would be ignored, silently: refused.
    for flag in (["--chat"], ["--block-size", "16"], ["--max-batches", "1"], ["--text-field", "body"]):
        code, err = run_main(capsys, "eval", "--model", out, "--task", "hellaswag", "--data", oasst, *flag)
        assert code == 2 and f"{flag[0]} applies to perplexity (--data without --task/--suite), not to benchmarks" in err


def interrupt_the_second_checkpoint(monkeypatch, run) -> list:
    """run() with a Ctrl-C in the middle of its second checkpoint's save (of STEPS: step 4's); the
    paths the checkpoints were being saved to."""
    real_save, calls = checkpoint.save_safetensors, []

    def save_then_stop(path, *args):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(path, *args)

    monkeypatch.setattr(checkpoint, "save_safetensors", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(checkpoint, "save_safetensors", real_save)
    return calls


def test_resume_after_an_interruption_ends_where_a_straight_run_ends(run, tiny_model_dir, oasst, tmp_path, monkeypatch):
    straight_dir, straight = run
    cfg = _cfg(oasst, *STEPS)
    calls = interrupt_the_second_checkpoint(monkeypatch, lambda: finetune(cfg, tiny_model_dir, tmp_path / "cut"))
    assert [Path(p).parent.name for p in calls] == [".step-00000002.tmp", ".step-00000004.tmp"]
    resumed = finetune(cfg, tiny_model_dir, tmp_path / "cut")
    assert resumed.resumed_from == 2
    assert resumed.train_loss == straight.train_loss and resumed.val_loss == straight.val_loss
    a = load_file(str(straight_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Gpt1Error, match="different config"):
        finetune(_cfg(oasst, *STEPS, "lora_r=2"), tiny_model_dir, tmp_path / "cut")


def test_shipped_recipe_is_the_model_card():
    cfg = load_config(FinetuneConfig, "gpt1-oasst2-lora")
    assert cfg.data == "OpenAssistant/oasst2" and cfg.batch_size * cfg.grad_accum == 64
    assert (cfg.lr, cfg.min_lr, cfg.epochs, cfg.max_steps) == (1e-4, 1e-6, 1.0, 0)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_targets) == (8, 8.0, ("q", "k", "v", "o", "up", "down"))
    assert cfg.optimizer == "adamw"
    with pytest.raises(Gpt1Error, match="optimizer=muon is for pretraining; LoRA fine-tuning uses adamw"):
        load_config(FinetuneConfig, "gpt1-oasst2-lora", ["optimizer=muon"])


def test_cli_end_to_end_and_bad_inputs(tiny_model_dir, oasst, tmp_path, capsys):
    out = tmp_path / "chat"
    assert main(["finetune", "--base", str(tiny_model_dir), "--data", str(oasst), "--out", str(out), "--merge",
                 *RUN, "max_steps=2", 'languages=["en"]']) == 0
    assert gpt1.load(out / "merged", device="cpu").is_chat_model
    assert json.loads((out / "train_config.json").read_text())["config"]["languages"] == ["en"]
    # Killed between the merged weights and the chat template: no merged/ at all (it was a base
    # model that a rerun kept), and the rerun writes it whole and sweeps the dead run's temp.
    import os
    import shutil
    import subprocess
    import sys

    shutil.rmtree(out / "merged")
    argv = [sys.executable, "-m", "gpt1", "finetune", "--base", str(tiny_model_dir), "--data", str(oasst),
            "--out", str(out), "--merge", *RUN, "max_steps=2", 'languages=["en"]']
    killed = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "GPT1_CRASH_AT": "merge-template"})
    assert killed.returncode == 137 and not (out / "merged").exists(), killed.stderr
    assert [p.name for p in out.glob(".merged.*.tmp")]  # what a SIGKILL leaves
    assert subprocess.run(argv, capture_output=True, timeout=120).returncode == 0
    assert gpt1.load(out / "merged", device="cpu").is_chat_model and not list(out.glob(".merged.*"))
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--data", str(oasst), "--chat", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"])) and result["tokens"] > 0
    # merged/ (the model to ship) is scored on the run's held-out conversations too (it had no run
    # settings: the default split scored conversations the run had trained on).
    assert main(["eval", "--model", str(out / "merged"), "--data", str(oasst), "--chat", "--json"]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert merged["conversations"] == result["conversations"] and merged["loss"] == pytest.approx(result["loss"], abs=1e-4)

    bad = tmp_path / "bad.messages.jsonl"
    bad.write_text(oasst.read_text().split("\n", 1)[0] + "\n{oops\n")
    cases = [
        (["--base", str(tmp_path / "none"), "--data", str(oasst)], "not a model dir"),
        (["--base", str(tiny_model_dir), "--data", str(tmp_path / "missing.jsonl")], "no such file"),
        (["--base", str(tiny_model_dir), "--data", str(bad)], "bad.messages.jsonl, line 2: invalid JSON"),
        (["--base", str(tiny_model_dir), "--data", str(oasst), 'lora_targets=["q","gate"]'], "choose from q, k, v"),
        # A repeat made an adapter whose PEFT config claimed twice the rank it has.
        (["--base", str(tiny_model_dir), "--data", str(oasst), 'lora_targets=["q","v","q"]'],
         "LoRA targets: q given more than once; name each target once"),
        # Pretraining keys, accepted, ignored and recorded as if they applied.
        (["--base", str(tiny_model_dir), "--data", str(oasst), "model=gpt1", "embedding_lr_scale=10"],
         "model='gpt1', embedding_lr_scale=10.0: pretraining keys; a LoRA fine-tune takes its model from its base"),
        (["--base", str(tiny_model_dir), "--data", str(oasst), "init_from=/does/not/exist"],
         "init_from=/does/not/exist: a pretraining key; a fine-tune starts from its base (--base)"),
        (["--base", str(tiny_model_dir), "--data", str(oasst), "lora_rank=4"], "unknown key 'lora_rank'"),
    ]
    for args, message in cases:
        assert main(["finetune", "--out", str(tmp_path / "x"), *args, *RUN, "max_steps=1"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    # LoRA's scale is lora_alpha / lora_r: 0 would train an adapter that does nothing
    assert main(["finetune", "--out", str(tmp_path / "x"), "--base", str(tiny_model_dir), "--data", str(oasst),
                 *RUN, "max_steps=1", "lora_alpha=0"]) == 2
    err = capsys.readouterr().err
    assert "LoRA alpha must be a number > 0, got 0" in err and len(err.strip().splitlines()) == 1, err


def test_a_small_chat_set_still_holds_out_a_dialog(tiny_model_dir, tmp_path, caplog):
    """As `gpt1 prepare`: a val_fraction > 0 of two or more dialogs validates on one at least
    (here none of the 6 fell under 1e-6: the smallest-hash one is held out); a split that already
    held some out is unchanged."""
    import hashlib

    from gpt1.data.chat_sources import Conversation

    def old_split(conversations, fraction, seed):  # the split before the fallback
        score = [int.from_bytes(hashlib.sha256(f"{seed}:{c.group}".encode()).digest()[:8], "big") / 2**64
                 for c in conversations]
        return ([c for c, s in zip(conversations, score) if s >= fraction],
                [c for c, s in zip(conversations, score) if s < fraction])

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    dialogs = [Conversation(messages, f"d{i}") for i in range(6)]
    assert old_split(dialogs, 1e-6, FinetuneConfig.seed)[1] == []
    train, val = split_conversations(dialogs, 1e-6, FinetuneConfig.seed)
    assert len(val) == 1 and len(train) == 5
    assert split_conversations(dialogs, 0.0, FinetuneConfig.seed) == (dialogs, [])
    assert split_conversations(dialogs[:1], 1e-6, FinetuneConfig.seed) == (dialogs[:1], [])  # nothing to spare
    # ... even where its hash falls under the fraction: training keeps one tree.
    assert split_conversations(dialogs[:1], 0.999999, FinetuneConfig.seed) == (dialogs[:1], [])
    train, val = split_conversations(dialogs, 0.999999, FinetuneConfig.seed)
    assert len(train) == 1 and len(val) == 5
    many = [Conversation(messages, f"tree-{i // 3}") for i in range(300)]
    assert split_conversations(many, 0.05, 7) == old_split(many, 0.05, 7)

    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{**messages[0], "content": f"hi {i}"}, messages[1]]}) + "\n"
                            for i in range(6)))  # six trees (the dialogs of one first turn are one tree)
    result = finetune(_cfg(chat, "max_steps=1", "val_fraction=1e-6"), tiny_model_dir, tmp_path / "ft")
    assert result.val_loss is not None
    # One dialog has nothing to spare: the run trains, and says that it validates on nothing.
    chat.write_text(json.dumps({"messages": messages}) + "\n")
    result = finetune(_cfg(chat, "max_steps=1", "val_fraction=0.05"), tiny_model_dir, tmp_path / "ft1")
    assert result.val_loss is None
    assert "nothing held out for validation (val_fraction holds out whole message trees, and the data has 1 tree)" \
        in caplog.text


# gpt1 finetune's lines: a missing base, one validation batch, nothing held out.

def test_finetune_names_a_missing_base_folder_as_missing(tmp_path, capsys):
    """`--base nonexist` said "pass the base model with --base", as if --base were not given."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    line = assert_one_clear_line(*run_main(capsys, "finetune", "--base", tmp_path / "nonexist", "--data", chat,
                                           "--out", tmp_path / "run"), r"nonexist: not a model dir \(no such folder\)$")
    assert "--base" not in line


def test_a_validation_split_that_left_no_conversation_is_named_as_such(tiny_model_dir, tmp_path, caplog):
    """A folder whose validation.jsonl holds only system-only conversations (all skipped) warned
    that val_fraction held nothing out of its trees, a fraction that had never applied."""
    folder = tmp_path / "chats"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}) + "\n"
        for i in range(6)))
    (folder / "validation.jsonl").write_text(json.dumps({"messages": [{"role": "system", "content": "be brief"}]}) + "\n")
    result = finetune(_cfg(folder, "max_steps=1"), tiny_model_dir, tmp_path / "ft")
    assert result.val_loss is None
    assert "nothing to validate on, the data's validation split left no conversation" in caplog.text
    assert "val_fraction holds out" not in caplog.text


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


# Found by a property-based comparison with reference loops: LoRA r=1 on part of c_attn under
# autocast, and fine-tuning epochs that stopped inside the last one.

FT = ["block_size=48", "eval_batches=1", "device=cpu", "lora_r=2", "val_fraction=0"]


def _chat_file(path: Path, n: int) -> Path:
    """`n` one-exchange conversations: `n` training sequences (nothing held out with val_fraction=0)."""
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                                                     {"role": "assistant", "content": f"{2 * i}."}]}) + "\n"
                            for i in range(n)))
    return path


def _cfg_no_val(chat: Path, *overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, [*FT, *overrides], data=str(chat))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _sampler(run: Path) -> dict:
    state = torch.load(checkpoint.latest_checkpoint(run) / checkpoint.STATE_FILE, weights_only=True)
    return {k: state["sampler"][k] for k in ("epoch", "position")}


# ---- LoRA r=1 on part of c_attn under autocast ----------------------------------------------

@pytest.mark.parametrize("targets, precision", [('["q","v"]', "bf16-mixed"), ('["v"]', "fp16-mixed")])
def test_lora_r1_on_part_of_c_attn_trains_under_autocast(tiny_model_dir, tmp_path, targets, precision):
    """With r=1 the einsum of the LoRA update stays fp32 under CPU autocast, and index_add into the
    bf16/fp16 output raised `index_add_(): self (BFloat16) and source (Float)` at the first step."""
    chat, out = _chat_file(tmp_path / "chat.jsonl", 6), tmp_path / "run"
    cfg = _cfg_no_val(chat, "batch_size=2", "max_steps=2", "lora_r=1", f"lora_targets={targets}", f"precision={precision}",
               "lr=1e-2", "val_fraction=0.3", "eval_every=1")
    result = finetune(cfg, tiny_model_dir, out)
    assert result.steps == 2 and all(m["loss"] > 0 for m in _metrics(out) if "loss" in m)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items())  # it trained


# ---- fine-tuning epochs are whole epochs of the sampler -------------------------------------

@pytest.mark.parametrize("epochs, steps, done", [(3, 6, {"epoch": 3, "position": 0}),
                                                 (2.5, 5, {"epoch": 2, "position": 8})])
def test_finetune_epochs_are_whole_epochs_of_the_sampler(tiny_model_dir, tmp_path, caplog, epochs, steps, done):
    """11 sequences, 8 a step (4 x 2 accumulation): an epoch is 2 steps, its last topped up from its
    start. epochs=3 took ceil(3 x 11 / 8) = 5 steps, ending inside the third epoch, and said
    "3.64 epochs"; epochs=2.5 took 4 (2 epochs), not the 5 of two and a half."""
    chat, out = _chat_file(tmp_path / "chat.jsonl", 11), tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="gpt1"):
        result = finetune(_cfg_no_val(chat, "batch_size=4", "grad_accum=2", f"epochs={epochs}"), tiny_model_dir, out)
    assert result.steps == steps and _sampler(out) == done
    assert f"{steps} steps x 8 sequences = {steps / 2:.2f} epochs of 11" in caplog.text
    assert json.loads((out / "train_config.json").read_text())["max_steps"] == steps


def test_a_fraction_of_an_epoch_is_that_share_of_its_steps_rounded_up():
    """0.07 x 100 steps is 7.000000000000001 in floats: 7 steps, not 8."""
    data = EncodedChats(tokens=np.ones(400, np.int32), loss_mask=np.ones(400, bool), offsets=np.arange(0, 401, 2))
    batches = ChatBatches(data, 2)  # 200 sequences, 2 a step: 100 steps an epoch
    assert [batches.steps_for(e) for e in (0.07, 0.075, 0.001, 1, 2.5)] == [7, 8, 1, 100, 250]
    assert batches.epoch_steps(3) == 34 and batches.steps_for(2, grad_accum=3) == 68  # the 34th step topped up


def test_a_run_begun_on_epochs_before_the_fix_resumes_with_its_recorded_length(tiny_model_dir, tmp_path,
                                                                             stop_training_at, monkeypatch):
    """A run dir whose train_config.json (and checkpoint) recorded epochs=3 as 5 steps resumes to
    its 5 steps: the loop refuses a resolved max_steps other than the recorded one."""
    chat, out = _chat_file(tmp_path / "chat.jsonl", 11), tmp_path / "run"
    cfg = _cfg_no_val(chat, "batch_size=8", "epochs=3", "save_every=2")
    stop_training_at(3, KeyboardInterrupt)  # in step 3, after the step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, tiny_model_dir, out)
    monkeypatch.undo()
    record = json.loads((out / "train_config.json").read_text())
    assert record["max_steps"] == 6
    # A length that neither gpt1 resolves is another run's.
    (out / "train_config.json").write_text(json.dumps({**record, "max_steps": 4}))
    with pytest.raises(Gpt1Error, match=r"max_steps \(resolved: 4 -> 6\)"):
        finetune(cfg, tiny_model_dir, out)
    # As the gpt1 before the fix recorded it: ceil(3 x 11 / 8) = 5 steps.
    (out / "train_config.json").write_text(json.dumps({**record, "max_steps": 5}))
    state_file = checkpoint.latest_checkpoint(out) / checkpoint.STATE_FILE
    torch.save({**torch.load(state_file, weights_only=True), "max_steps": 5, "end": 5}, state_file)
    result = finetune(cfg, tiny_model_dir, out)
    assert result.resumed_from == 2 and result.steps == 5 and _sampler(out) == {"epoch": 2, "position": 8}


# A fine-tune's max_tokens, and its held-out batches built whole.

# ---- a fine-tune's max_tokens -----------------------------------------------------------------

def _short_chats(path, n: int = 20):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i}?"},
                                                     {"role": "assistant", "content": f"{i % 7}"}]}) + "\n"
                            for i in range(n)))
    return path


FT_NO_SAVES = ["block_size=48", "eval_batches=1", "device=cpu", "lora_r=2", "val_fraction=0", "save_every=1000"]


def test_a_max_tokens_finetune_trains_at_least_max_tokens(tiny_model_dir, tmp_path):
    """max_tokens / mean sequence length counted each sequence's last token, a target only: a run
    of one epoch's tokens stopped a step or more short of it (19 steps of 20 here)."""
    chats = _short_chats(tmp_path / "chat.jsonl")
    epoch = ft.finetune(load_config(ft.FinetuneConfig, None, [*FT_NO_SAVES, "batch_size=1", "epochs=1"], data=str(chats)),
                        tiny_model_dir, tmp_path / "epoch")
    assert epoch.steps == 20  # one sequence a step: its tokens are every input of the data
    run = ft.finetune(load_config(ft.FinetuneConfig, None, [*FT_NO_SAVES, "batch_size=1", "max_steps=0", "epochs=0",
                                                           f"max_tokens={epoch.tokens}"], data=str(chats)),
                      tiny_model_dir, tmp_path / "tokens")
    longest = max(m["tokens"] - p["tokens"] for p, m in zip([{"tokens": 0}, *_metrics(tmp_path / "tokens")],
                                                            _metrics(tmp_path / "tokens")))
    assert epoch.tokens <= run.tokens < epoch.tokens + longest


# ---- a fine-tune's held-out batches ------------------------------------------------------------

def test_a_finetune_builds_only_the_held_out_batches_it_uses(tiny_model_dir, tmp_path, monkeypatch):
    """Every held-out batch was padded and kept, then all but eval_batches dropped."""
    built = []

    def counting(*args, **kwargs):
        for batch in real(*args, **kwargs):
            built.append(1)
            yield batch

    real = ft.iter_batches
    monkeypatch.setattr(ft, "iter_batches", counting)
    chats = _short_chats(tmp_path / "chat.jsonl", 200)
    ft.finetune(load_config(ft.FinetuneConfig, None, [*FT_NO_SAVES, "batch_size=2", "max_steps=1", "val_fraction=0.5"],
                            data=str(chats)), tiny_model_dir, tmp_path / "run")
    assert len(built) == 1  # eval_batches=1, of ~50


# A LoRA rank above the model's width.

def test_a_lora_rank_above_the_models_width_is_refused(tmp_path, tiny_model_dir, capsys):
    """lora_r=100000 on a 128-wide model trained 99.8% of 923M parameters and wrote 15 GB."""
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    assert_one_clear_line(*run_main(capsys, "finetune", "--base", tiny_model_dir, "--data", tmp_path / "chat.jsonl",
                                    "--out", tmp_path / "ft", "max_steps=1", "lora_r=65"),
                          r"LoRA rank r=65 is larger than this model's width \(n_embd 64\): .* use r <= 64$")
    assert not (tmp_path / "ft").exists()
