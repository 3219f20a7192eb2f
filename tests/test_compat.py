"""Run dirs made by an earlier gpt1, read by this one: what they recorded (or did not) decides
what a resume and `eval --chat` may take for granted. The old formats are written directly
(the records a run of that time lacked are removed from a run made now)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import gpt1
from gpt1.cli import main
from gpt1.core.errors import Gpt1Error
from gpt1.data.chat_sources import read_conversations, split_conversations
from gpt1.train import checkpoint
from gpt1.train import finetune as ft
from gpt1.train.config import TrainConfig, load_config
from gpt1.train.evaluate import evaluate_chat
from gpt1.train.pretrain import pretrain
from gpt1.train.schedule import BudgetSchedule, lr_at
from tests.test_battery import gpt1 as gpt1_cli

FT = ["batch_size=4", "block_size=48", "eval_batches=1", "eval_every=2", "device=cpu", "lora_r=2", "val_fraction=0.2"]


def _chat_file(path: Path, n: int = 30) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                                                     {"role": "assistant", "content": f"{2 * i}."}]}) + "\n"
                            for i in range(n)))
    return path


def _finetune(base: Path, out: Path, chat: Path, *overrides: str):
    return ft.finetune(load_config(ft.FinetuneConfig, None, [*FT, *overrides], data=str(chat)), base, out)


def _rewrite_record(run: Path, drop: tuple[str, ...] = (), drop_data: tuple[str, ...] = ()) -> None:
    """train_config.json as an earlier gpt1 wrote it: without the keys it did not record yet."""
    file = run / "train_config.json"
    record = json.loads(file.read_text())
    for key in drop_data:
        del record["data"][key]
    file.write_text(json.dumps({k: v for k, v in record.items() if k not in drop}))


# ---- eval --chat: the run's held-out conversations, or a warning -------------------------------

def test_eval_chat_calls_a_score_held_out_only_where_the_run_s_record_says_so(tiny_model_dir, tmp_path, caplog):
    """A run fine-tuned before 2026-12-05 split {"messages"} records by file and line; `eval --chat`
    split them by content and scored conversations the run had trained on as "held-out"."""
    chat, out = _chat_file(tmp_path / "chat.jsonl"), tmp_path / "chat"
    _finetune(tiny_model_dir, out, chat, "max_steps=2")
    train, held_out = split_conversations(read_conversations(str(chat)), 0.2, seed=ft.FinetuneConfig.seed)
    llm = gpt1.load(out, device="cpu")

    def score(data: Path = chat) -> tuple[str, str]:
        caplog.clear()
        return evaluate_chat(llm, str(data), batch_size=4, max_batches=1, show_progress=False).source, caplog.text

    held = f"{chat} (held-out 20% of the conversations)"
    unverified = f"{chat} (20% of the conversations as this gpt1 splits them, not known to be those the run held out)"
    record, lines = (out / "train_config.json").read_text(), chat.read_text()
    # Before 2026-12-05 12:05 UTC: no record of the data or of the number of processes. The split of
    # {"messages"} records may have been another.
    _rewrite_record(out, drop=("data", "world_size"))
    source, log = score()
    assert source == unverified
    assert "the run predates gpt1's record of its split" in log and "by file and line" in log
    # Another chat source than the run's: no record applies to it, as before.
    other = Path(shutil.copy(chat, tmp_path / "other.jsonl"))
    assert score(other) == (f"{other} (held-out 20% of the conversations)", "")

    # A run made now: what it held out is recorded, and is what is scored.
    (out / "train_config.json").write_text(record)
    assert json.loads(record)["data"]["validation"]["conversations"] == len(held_out)
    assert score() == (held, "")
    # From 2026-12-05 15:58 UTC (the training set's sha256, not the held-out set): today's split rebuilds the same.
    _rewrite_record(out, drop_data=("validation",))
    assert score() == (held, "")
    # From 12:05 (the number of processes, not the data): after {"messages"} records were split by content.
    _rewrite_record(out, drop=("data",))
    assert score() == (held, "")

    def edit(conversation) -> None:  # the data edited since the run, in this conversation
        assert json.dumps(conversation.messages) in lines
        chat.write_text(lines.replace(json.dumps(conversation.messages), json.dumps(
            [{**m, "content": m["content"] + " Yes."} for m in conversation.messages]), 1))

    (out / "train_config.json").write_text(record)
    edit(held_out[0])
    source, log = score()
    assert source == unverified and f"the conversations held out now are not the {len(held_out)} the run held out" in log
    # A run that recorded its training set only: an edit of it is told.
    _rewrite_record(out, drop_data=("validation",))
    edit(train[0])
    source, log = score()
    assert source == unverified and "the training sequences split from it now are not the run's" in log


def test_eval_chat_json_names_an_unverified_split(tiny_model_dir, tmp_path, capsys):
    """`gpt1 eval --chat --json` on a run from before the record: its "source" does not say held-out."""
    chat, out = _chat_file(tmp_path / "chat.jsonl"), tmp_path / "chat"
    _finetune(tiny_model_dir, out, chat, "max_steps=1")
    _rewrite_record(out, drop=("data", "world_size"))
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--data", str(chat), "--chat", "--json",
                 "--batch-size", "4", "--max-batches", "1"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["source"] == \
        f"{chat} (20% of the conversations as this gpt1 splits them, not known to be those the run held out)"
    assert "the run predates gpt1's record of its split" in captured.err


# ---- a resume on {"messages"} records that an earlier gpt1 split otherwise ----------------------

def test_a_resume_refused_on_the_split_of_an_earlier_gpt1_says_so(tiny_model_dir, tmp_path, caplog):
    """`cannot resume: the checkpoint was made on 192 chat sequences, the data now gives 191` sent
    the user looking for an edit of a chat file that had not changed: gpt1's split had."""
    chat, out = _chat_file(tmp_path / "chat.jsonl"), tmp_path / "chat"
    args = ["finetune", "--base", tiny_model_dir, "--data", chat, "--out", out, *FT, "max_steps=4", "save_every=2"]
    killed = gpt1_cli(*args, env={"GPT1_CRASH_AT": "before-outputs:1"})  # stopped right after step 2's save
    assert killed.returncode == 137, killed.stderr
    _rewrite_record(out, drop=("data", "world_size"))
    state_file = checkpoint.latest_checkpoint(out) / checkpoint.STATE_FILE
    state = torch.load(state_file, weights_only=True)
    sequences = state["sampler"]["sequences"]
    state["sampler"]["sequences"] = sequences + 1  # the old split put one more conversation on the train side
    torch.save(state, state_file)
    with pytest.raises(Gpt1Error) as refused:
        _finetune(tiny_model_dir, out, chat, "max_steps=4", "save_every=2")
    message = str(refused.value)
    assert f"made on {sequences + 1} chat sequences and the data now gives {sequences}" in message
    assert "the data may not have changed: the run predates 2026-12-05" in message and "by file and line" in message
    # The same number: it resumes, and says what it cannot check.
    state["sampler"]["sequences"] = sequences
    torch.save(state, state_file)
    caplog.clear()
    assert _finetune(tiny_model_dir, out, chat, "max_steps=4", "save_every=2").resumed_from == 2
    assert "the resumed steps may train on conversations that the run held out" in caplog.text


# ---- a fine-tune of a fine-tuned base, recorded before the adapter counted ---------------------

def test_a_finetune_of_a_finetuned_base_recorded_before_adapters_counted_resumes(tiny_model_dir, tmp_path):
    """base.json of a fine-tune made before 2026-12-05 (243c308) holds the sha256 of its base's
    model.safetensors alone; today's fingerprint covers the base's adapter, and the same base was
    refused as "other base weights"."""
    chat = _chat_file(tmp_path / "chat.jsonl")
    fa, fb = tmp_path / "fa", tmp_path / "fb"
    _finetune(tiny_model_dir, fa, chat, "max_steps=1")
    _finetune(fa, fb, chat, "max_steps=1")
    legacy = {"path": str(fa.resolve()), "sha256": hashlib.sha256((fa / "model.safetensors").read_bytes()).hexdigest()}
    (fb / "base.json").write_text(json.dumps(legacy))
    _rewrite_record(fb, drop=("data",))
    assert _finetune(fa, fb, chat, "max_steps=1").resumed_from == 1  # a finished run: rerun (e.g. to merge)
    assert _finetune(fa, fb, chat, "max_steps=1").resumed_from == 1  # ... again, once train_config.json has its data
    # Elsewhere, that record cannot tell the base from another model with that model.safetensors: the path must say.
    copy = shutil.copytree(fa, tmp_path / "copy")
    with pytest.raises(Gpt1Error, match=rf"predates 2026-12-05 .* pass --base {fa.resolve()} \(the path it names\)"):
        _finetune(copy, fb, chat, "max_steps=1")
    # A base.json marked as made now (as fa's is) is compared on the whole fingerprint: the weights file's is not enough.
    assert json.loads((fa / "base.json").read_text())["sha256_of"] == "model.safetensors and adapter/"
    (fb / "base.json").write_text(json.dumps({**legacy, "sha256_of": "model.safetensors and adapter/"}))
    with pytest.raises(Gpt1Error, match=r"fb was fine-tuned from other base weights than .*copy \(base\.json differs\)"):
        _finetune(copy, fb, chat, "max_steps=1")


# ---- a time-budget run resumed from a checkpoint without the schedule's state ------------------

@pytest.mark.parametrize("cooldown", [0.0, 0.3], ids=["cosine", "warmup-stable-decay"])
def test_a_budget_schedule_rebuilt_from_the_last_rate_goes_on_as_saved(cooldown):
    """A checkpoint saved before 2026-12-05 (ef57fb6) has no "schedule": the cooldown restarted
    from the peak LR. Rebuilt from the rate of its last step, the schedule goes on as one resumed
    from its saved state: in the warmup, at its last step, on the plateau, in the cooldown."""
    lr, min_lr, warmup = 1.0, 0.1, 0.05
    plans = [200] * 40 + [250] * 210
    straight = BudgetSchedule(lr, min_lr, warmup, cooldown)
    lrs = [straight.at(step, end, step >= 180) for step, end in enumerate(plans)]
    for done in (5, 10, 11, 100, 190, 249):
        state = BudgetSchedule.state_from_rate(lr, warmup, done, plans[done], lrs[done - 1])
        resumed = BudgetSchedule(lr, min_lr, warmup, cooldown, state)
        # Where the cosine began is not in such a checkpoint: it is taken where the warmup of the
        # checkpoint's plan ended (250 steps: 12), not where it did end (200 steps: 10).
        rel = 1e-12 if cooldown or done < 40 else 2e-2
        assert [resumed.at(step, end, step >= 180) for step, end in enumerate(plans[done:], done)] == \
            pytest.approx(lrs[done:], rel=rel), done


TINY = ["model=tiny", "block_size=32", "batch_size=4", "eval_batches=1", "device=cpu", "lr=3e-3", "min_lr=3e-4"]


def test_a_budget_run_resumed_from_a_checkpoint_without_the_schedule_keeps_its_cooldown(data_dir, tmp_path):
    """Needs `gpt1.train.loop` to rebuild a missing "schedule" with BudgetSchedule.state_from_rate.
    A run whose plan is capped by max_steps follows lr_at exactly: killed inside its cooldown and
    resumed from a checkpoint made as before ef57fb6, it still does."""
    run = tmp_path / "run"
    overrides = ["max_steps=20", "time_budget=1000", "eval_every=20", "save_every=12", "warmup=0.1", "cooldown=0.5"]
    killed = gpt1_cli("pretrain", "--data", data_dir, "--out", run, *TINY, *overrides,
                      env={"GPT1_CRASH_AT": "before-outputs:1"})  # stopped right after step 12's save
    assert killed.returncode == 137, killed.stderr
    state_file = checkpoint.latest_checkpoint(run) / checkpoint.STATE_FILE
    state = torch.load(state_file, weights_only=True)
    del state["schedule"]
    torch.save(state, state_file)
    assert pretrain(load_config(TrainConfig, None, TINY + overrides), data_dir, run).resumed_from == 12
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()
           if json.loads(line).get("loss") is not None]
    assert lrs == pytest.approx([lr_at(s, 20, 3e-3, 3e-4, 0.1, 0.5) for s in range(20)])
