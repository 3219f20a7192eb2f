"""Pass 23's training findings: RUN/best of a step the resumed run never kept (best.json), the
early stop a time budget was taken for, the WSD cooldown's last rate, a fine-tune's max_tokens,
validation windows that overlapped, a fine-tune's held-out batches built whole, a refusal in
Python's spelling, and a continuation (`init_from=RUN`, `--base RUN`) that replayed its parent's
batches. (torchrun's keep_best resume: tests/test_train_pass23_ddp.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import gpt1.train.loop as loop
from gpt1.cli import main
from gpt1.core.errors import Gpt1Error
from gpt1.data.shards import fixed_windows
from gpt1.train import finetune as ft
from gpt1.train.config import load_config
from gpt1.train.schedule import lr_at
from tests.test_train import _metrics, _run


def _record_steps(monkeypatch, steps: list) -> list:
    """Each step's input batches into `steps`, as the loop draws them from its (real) batch source."""
    real = loop._next_step

    def recording(source, n):
        batches = real(source, n)
        steps.append([x.clone() for x, _ in batches])
        return batches

    monkeypatch.setattr(loop, "_next_step", recording)
    return steps


@pytest.fixture
def drawn(monkeypatch):
    return _record_steps(monkeypatch, [])


def _same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for s, t in zip(a, b) for x, y in zip(s, t, strict=True))


def _best(run) -> dict:
    return json.loads((run / "best" / "best.json").read_text())


# ---- RUN/best holds a model the resumed run never kept -----------------------------------------

def _stopped_after_best_past_its_checkpoint(data_dir, run, stop_training_at, monkeypatch, args) -> None:
    """keep_best=true, validations at steps 3 and 6, checkpoint 5: stopped in step 7, after step 6's
    validation wrote RUN/best (a lower loss than step 3's) past the checkpoint the resume starts from."""
    stop_training_at(7, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(data_dir, run, [*args, "eval_every=3", "keep_best=true"])
    monkeypatch.undo()
    losses = {m["step"]: m["val_loss"] for m in _metrics(run) if "val_loss" in m}
    assert losses[6] < losses[3] and _best(run) == {"step": 6, "val_loss": losses[6]}  # what best/ holds, recorded


def test_a_resume_with_keep_best_off_removes_the_best_of_a_step_past_its_checkpoint(
        data_dir, tmp_path, stop_training_at, monkeypatch, caplog):
    """best/ kept step 6's model, written by the stopped attempt after step 5's checkpoint, and the
    resume with keep_best=false said it kept step 3's (the lowest as of the checkpoint)."""
    run, args = tmp_path / "run", ["max_steps=11", "save_every=5", "lr=3e-3"]
    _stopped_after_best_past_its_checkpoint(data_dir, run, stop_training_at, monkeypatch, args)
    with caplog.at_level("INFO", logger="gpt1"):
        assert _run(data_dir, run, [*args, "eval_every=3", "keep_best=false"]).resumed_from == 5
    assert not (run / "best").exists()
    said = [r.message for r in caplog.records if "best" in r.message and "step 6's model" in r.message]
    assert said == [f"removed {run / 'best'}: it held step 6's model (val loss {_metrics_loss(run, 6):.4f}), written "
                    "after the checkpoint this run resumes from (step 5); nothing writes it again (keep_best=false)"]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # no "keeps step 3's model"


def test_a_best_linked_to_a_folder_of_the_run_is_removed_and_written_again(data_dir, tmp_path, stop_training_at,
                                                                            monkeypatch):
    """A RUN/best that is a link (best/ writes go through it): the resume failed with `OSError: Cannot
    call rmtree on a symbolic link`."""
    run, args = tmp_path / "run", ["max_steps=11", "save_every=5", "lr=3e-3"]
    _stopped_after_best_past_its_checkpoint(data_dir, run, stop_training_at, monkeypatch, args)
    (run / "best").rename(run / "best-real")
    (run / "best").symlink_to(run / "best-real")
    assert _run(data_dir, run, [*args, "eval_every=3", "keep_best=true"]).resumed_from == 5
    assert not (run / "best-real").exists()  # step 6's model: the discarded attempt's
    assert _best(run)["step"] > 5  # written again by this run's own validations


def _metrics_loss(run, step: int) -> float:
    return next(m["val_loss"] for m in _metrics(run) if m["step"] == step and "val_loss" in m)


def test_a_resumed_keep_best_run_names_the_model_best_really_holds(data_dir, tmp_path, stop_training_at, monkeypatch,
                                                                  caplog):
    """A resume that validated at other steps (eval_every 3 -> 9) never went below step 3's loss
    again: best/ kept step 6's model from the stopped attempt, and the run's last line named step
    3's as the one in best/. lr=0.3 makes the losses climb after step 1 (step 6's dips below 3's)."""
    run, args = tmp_path / "run", ["max_steps=11", "save_every=5", "lr=0.3", "min_lr=0.3", "warmup=0"]
    _stopped_after_best_past_its_checkpoint(data_dir, run, stop_training_at, monkeypatch, args)
    with caplog.at_level("INFO", logger="gpt1"):
        result = _run(data_dir, run, [*args, "eval_every=9", "keep_best=true"])
    done = next(r.message for r in caplog.records if r.message.startswith("done:"))
    if (run / "best").exists():  # a validation of the resume went below step 3's: best/ is its model
        assert _best(run)["step"] == result.best_step > 5 and done.endswith(f"at step {result.best_step} ({run / 'best'})")
        return
    assert result.best_step == 3
    assert done.endswith(f"the lowest val loss {result.best_val_loss:.4f} at step 3 (its model not kept: there is no "
                         f"{run / 'best'})")


def test_best_is_a_model_dir_with_its_record(data_dir, tmp_path):
    """best.json beside the model: gpt1.load and export take the folder as they did."""
    import gpt1

    run = tmp_path / "run"
    result = _run(data_dir, run, ["max_steps=2", "eval_every=1", "keep_best=true"])
    assert _best(run) == {"step": result.best_step, "val_loss": result.best_val_loss}
    assert gpt1.load(run / "best").model.config.n_layer
    assert main(["export", "--model", str(run / "best"), "--out", str(tmp_path / "hf")]) == 0


# ---- the early stop a time budget was taken for -----------------------------------------------

def test_a_time_budget_that_ends_a_run_where_early_stop_was_due_is_named(data_dir, tmp_path, caplog):
    """A 10-step time-budget run (its minimum) validated at steps 4, 8 and 10 (lr=1e-30: the weights,
    and so the losses, never change): early_stop=2's count reached 2 at the last step, where the
    budget ended the run, and the done line said "ended by early_stop=2"."""
    args = ["max_steps=1000", "time_budget=0.01", "eval_every=4", "early_stop=2", "lr=1e-30", "min_lr=0"]
    with caplog.at_level("INFO", logger="gpt1"):
        result = _run(data_dir, tmp_path / "run", args)
    assert result.steps == 10
    done = next(r.message for r in caplog.records if r.message.startswith("done:"))
    assert "(ended by its time_budget=0.01 s" in done and "early_stop" not in done
    assert not [r for r in caplog.records if "early stop:" in r.message]
    # An early stop that fired says so, and a rerun of the finished run too (from its checkpoint).
    caplog.clear()
    args = ["max_steps=20", "eval_every=2", "early_stop=2", "lr=1e-30", "min_lr=0"]
    with caplog.at_level("INFO", logger="gpt1"):
        assert _run(data_dir, tmp_path / "stopped", args).steps == 6
        assert _run(data_dir, tmp_path / "stopped", args).resumed_from == 6
    done = [r.message for r in caplog.records if r.message.startswith("done:")]
    assert len(done) == 2 and all("(ended by early_stop=2)" in line for line in done)


# ---- the WSD cooldown's last rate -------------------------------------------------------------

def test_the_cooldowns_last_step_is_exactly_min_lr():
    """lr + 1.0 * (min_lr - lr) ended 3e-4 -> 1e-6 at 1.0000000000000243e-06."""
    for lr, min_lr in [(3e-4, 1e-6), (3e-3, 3e-4), (1e-3, 1e-4), (0.1, 0.01)]:
        for steps in (10, 37, 1000):
            assert lr_at(steps - 1, steps, lr, min_lr, 0.1, 0.3) == min_lr
            rates = [lr_at(s, steps, lr, min_lr, 0.1, 0.3) for s in range(steps // 10, steps)]  # past the warmup
            assert all(a >= b > min_lr for a, b in zip(rates, rates[1:-1]))  # falling, above min_lr to the last
    assert lr_at(8, 10, 3e-4, 1e-6, 0.0, 0.3) == 3e-4 + (2 / 3) * (1e-6 - 3e-4)  # unchanged before the last


# ---- a fine-tune's max_tokens -----------------------------------------------------------------

def _short_chats(path, n: int = 20):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i}?"},
                                                     {"role": "assistant", "content": f"{i % 7}"}]}) + "\n"
                            for i in range(n)))
    return path


FT = ["block_size=48", "eval_batches=1", "device=cpu", "lora_r=2", "val_fraction=0", "save_every=1000"]


def test_a_max_tokens_finetune_trains_at_least_max_tokens(tiny_model_dir, tmp_path):
    """max_tokens / mean sequence length counted each sequence's last token, a target only: a run
    of one epoch's tokens stopped a step or more short of it (19 steps of 20 here)."""
    chats = _short_chats(tmp_path / "chat.jsonl")
    epoch = ft.finetune(load_config(ft.FinetuneConfig, None, [*FT, "batch_size=1", "epochs=1"], data=str(chats)),
                        tiny_model_dir, tmp_path / "epoch")
    assert epoch.steps == 20  # one sequence a step: its tokens are every input of the data
    run = ft.finetune(load_config(ft.FinetuneConfig, None, [*FT, "batch_size=1", "max_steps=0", "epochs=0",
                                                           f"max_tokens={epoch.tokens}"], data=str(chats)),
                      tiny_model_dir, tmp_path / "tokens")
    longest = max(m["tokens"] - p["tokens"] for p, m in zip([{"tokens": 0}, *_metrics(tmp_path / "tokens")],
                                                            _metrics(tmp_path / "tokens")))
    assert epoch.tokens <= run.tokens < epoch.tokens + longest


# ---- validation windows --------------------------------------------------------------------

@pytest.mark.parametrize("tokens, batches, rows", [(16 * 4 * 3 + 30, 3, 4), (50, 1, 3)])
def test_validation_windows_never_score_a_target_twice(tmp_path, tokens, batches, rows):
    """Capped with math.ceil, 221 targets gave 4 batches of 4 windows of 16 (256 targets: overlap),
    logged as "all that val.bin holds without overlap"; a shard shorter than one batch, 4 windows."""
    path = tmp_path / "val.bin"
    np.arange(tokens, dtype=np.uint16).tofile(path)  # each token is its position
    val = fixed_windows(path, 16, 4, 1_000_000)
    assert len(val) == batches and val[-1][0].shape[0] == rows
    targets = torch.cat([y.reshape(-1) for _, y in val]).tolist()
    assert len(targets) == len(set(targets))


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
    ft.finetune(load_config(ft.FinetuneConfig, None, [*FT, "batch_size=2", "max_steps=1", "val_fraction=0.5"],
                            data=str(chats)), tiny_model_dir, tmp_path / "run")
    assert len(built) == 1  # eval_batches=1, of ~50


# ---- a refusal in the recipes' spelling -----------------------------------------------------------

def test_a_refused_lora_key_is_named_as_a_recipe_writes_it():
    with pytest.raises(Gpt1Error, match=r"^lora_targets=\['q', 'v'\], train_special_tokens=false: LoRA keys"):
        ft.FinetuneConfig(full=True, lora_targets=["q", "v"], train_special_tokens=False)


# ---- a continuation goes on where its parent's batches ended ------------------------------------

def test_a_run_from_a_runs_weights_draws_the_windows_after_its_own(data_dir, tmp_path, drawn, stop_training_at,
                                                                   monkeypatch, caplog):
    """`--out NEW init_from=RUN` (the refusal's way on for a longer run) drew RUN's windows again,
    in the same order; now it draws those a run of both lengths would have drawn next, and a
    resume of it goes on with them."""
    common = ["eval_every=1000", "save_every=1"]
    _run(data_dir, tmp_path / "a", [*common, "max_steps=3"])
    _run(data_dir, tmp_path / "long", [*common, "max_steps=6"])
    long_run = list(drawn)
    assert len(long_run) == 9 and _same_batches(long_run[:3], long_run[3:6])  # a's 3 steps: the 6-step run's first
    drawn.clear()
    with caplog.at_level("INFO", logger="gpt1"):
        _run(data_dir, tmp_path / "b", [*common, "max_steps=3", f"init_from={tmp_path / 'a'}"])
    assert _same_batches(drawn, long_run[6:])  # the 6-step run's steps 4-6
    assert any(r.message == f"windows: init_from={tmp_path / 'a'} drew 12 windows of this data with seed 1337; this "
               "run draws the ones after them, as one longer run would" for r in caplog.records)
    record = json.loads((tmp_path / "b" / "train_config.json").read_text())
    assert record["continues"] == {"run": str((tmp_path / "a").resolve()), "sequences": 12}
    # Stopped in its step 3 (checkpoint 2) and resumed: the same windows.
    drawn.clear()
    stop_training_at(3, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(data_dir, tmp_path / "c", [*common, "max_steps=3", f"init_from={tmp_path / 'a'}"])
    monkeypatch.undo()  # the recording too
    _record_steps(monkeypatch, drawn)
    assert _run(data_dir, tmp_path / "c", [*common, "max_steps=3", f"init_from={tmp_path / 'a'}"]).resumed_from == 2
    assert _same_batches(drawn[:2] + drawn[3:], long_run[6:])  # its steps 1-2, then step 3 after the resume
    assert json.loads((tmp_path / "c" / "train_config.json").read_text())["continues"] == record["continues"]
    # Another seed draws other windows: from the first, as before.
    _run(data_dir, tmp_path / "d", [*common, "max_steps=1", "seed=7", f"init_from={tmp_path / 'a'}"])
    assert "continues" not in json.loads((tmp_path / "d" / "train_config.json").read_text())
    # A parent stopped between its latest checkpoint and its model files (a kill leaves no mark on the
    # checkpoint): its weights are an earlier step's, and the latest checkpoint's place skipped the
    # batches between the two; the run starts from the first, and says why.
    (tmp_path / "a" / "checkpoints" / "step-00000003" / "outputs.done").unlink()
    drawn.clear()
    caplog.clear()
    with caplog.at_level("INFO", logger="gpt1"):
        _run(data_dir, tmp_path / "e", [*common, "max_steps=3", f"init_from={tmp_path / 'a'}"])
    assert _same_batches(drawn, long_run[:3])
    assert "continues" not in json.loads((tmp_path / "e" / "train_config.json").read_text())
    assert [r.message for r in caplog.records if r.levelname == "WARNING"] == [
        f"{tmp_path / 'a'} was stopped after its step-3 checkpoint, before its model files were written from it: its "
        "weights are an earlier step's, so this run's batches start from the first ones; run its command again to "
        "complete it"]


def test_a_finetune_of_a_finetune_goes_on_with_the_next_epoch(tiny_model_dir, tmp_path, drawn, caplog):
    """`--base RUN` on RUN's own data began at epoch 0's order again: the epoch RUN trained first."""
    chats = _short_chats(tmp_path / "chat.jsonl", 12)
    args = [*FT, "batch_size=4"]
    ft.finetune(load_config(ft.FinetuneConfig, None, [*args, "epochs=2"], data=str(chats)), tiny_model_dir,
                tmp_path / "two")
    two_epochs = list(drawn)
    assert len(two_epochs) == 6
    drawn.clear()
    ft.finetune(load_config(ft.FinetuneConfig, None, [*args, "epochs=1"], data=str(chats)), tiny_model_dir,
                tmp_path / "a")
    assert _same_batches(drawn, two_epochs[:3])
    drawn.clear()
    with caplog.at_level("INFO", logger="gpt1"):
        ft.finetune(load_config(ft.FinetuneConfig, None, [*args, "epochs=1"], data=str(chats)), tmp_path / "a",
                    tmp_path / "b")
    assert _same_batches(drawn, two_epochs[3:])
    assert any(f"--base {tmp_path / 'a'} was fine-tuned on these 12 sequences with seed 1337 for 1 epoch: this run "
               "goes on with the next epochs' orders" in r.message for r in caplog.records)
    record = json.loads((tmp_path / "b" / "train_config.json").read_text())
    assert record["continues"] == {"run": str((tmp_path / "a").resolve()), "epoch": 1}
