"""Chat fine-tuning end to end on a tiny base model: what changes, what loads, resume, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gpt1
from gpt1.cli import main
from gpt1.core.errors import Gpt1Error
from gpt1.core.lora import LoRALinear
from gpt1.data.chat_sources import read_conversations, split_conversations
from gpt1.formats.modeldir import load_model
from gpt1.train import checkpoint
from gpt1.train.config import load_config
from gpt1.train.evaluate import evaluate_chat
from gpt1.train.finetune import FinetuneConfig, finetune, merge_model_dir

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
