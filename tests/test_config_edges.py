"""Training config keys at their edges (an exploratory pass, 2026-12-06): each value either takes
effect as documented or is refused before any work, in one line."""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys

import pytest

from gpt1.core.errors import Gpt1Error
from gpt1.data.shards import fixed_windows
from gpt1.train.config import TrainConfig, load_config
from gpt1.train.loop import _fmt
from gpt1.train.pretrain import pretrain
from gpt1.train.schedule import lr_at
from tests.test_battery import assert_one_clear_line
from tests.test_train import TINY, _metrics, _run


def test_a_run_that_ends_skipping_every_step_fails_instead_of_writing_its_model(data_dir, tmp_path):
    # lr=1e6: step 1 wrecks the weights, steps 2-6 are NaN and skipped; it printed "done" and exited 0
    # with a model whose logits are NaN (a run shorter than max_bad_steps was never stopped).
    with pytest.raises(Gpt1Error, match=r"NaN/inf for the last 5 of the run's 6 steps; stopped"):
        _run(data_dir, tmp_path / "big", ["max_steps=6", "lr=1e6", "min_lr=1e6", "warmup=0", "eval_every=2"])
    assert not (tmp_path / "big" / "model.safetensors").exists()
    # One skipped step at the end of a healthy run is no reason to fail it.
    assert _run(data_dir, tmp_path / "ok", ["max_steps=4"]).steps == 4


def test_eval_batches_is_capped_at_what_the_split_holds(data_dir, tmp_path, caplog):
    # eval_batches=1000000 built 100,000 overlapping windows (23 GB) before the first step.
    capped = fixed_windows(data_dir / "val.bin", 32, 4, 1_000_000)
    tokens = (data_dir / "val.bin").stat().st_size // 2
    assert len(capped) == (tokens - 1) // 32 // 4 < 1_000_000  # whole batches: no target scored twice
    assert len(fixed_windows(data_dir / "val.bin", 32, 4, 2)) == 2  # below the cap: as asked
    with caplog.at_level("INFO", logger="gpt1"):
        _run(data_dir, tmp_path / "run", ["max_steps=1", "eval_batches=1000000"])
    assert any(f"validation: {len(capped)} batches, all that val.bin holds" in r.message for r in caplog.records)


def test_the_last_step_of_a_run_whose_warmup_takes_the_rest_is_at_min_lr():
    assert lr_at(9, 10, 3e-4, 1e-6, 0.9) == 1e-6 and lr_at(8, 10, 3e-4, 1e-6, 0.9) == 3e-4
    assert [lr_at(s, 2, 3e-4, 1e-6, 0.03) for s in range(2)] == [3e-4, 1e-6]  # the default warmup, 2 steps


def test_a_run_length_key_that_would_do_nothing_is_said(data_dir, tmp_path, caplog):
    with caplog.at_level("INFO", logger="gpt1"):
        pretrain(load_config(TrainConfig, None, TINY + ["max_steps=2", "max_tokens=100"]), data_dir, tmp_path / "r")
    assert any("max_steps=2 decides the length, not max_tokens=100" in r.message for r in caplog.records)


def test_keys_that_do_not_change_the_math_may_change_on_resume(data_dir, tmp_path):
    run = tmp_path / "run"
    _run(data_dir, run, ["max_steps=4", "save_every=2"])
    again = _run(data_dir, run, ["max_steps=4", "save_every=1", "max_bad_steps=5", "gradient_checkpointing=true",
                                 "eval_every=3"])  # eval_every: without a time budget
    assert again.steps == 4 and again.resumed_from == 4 and len(_metrics(run)) == 4
    with pytest.raises(Gpt1Error, match=r"different config \(lr: "):
        _run(data_dir, run, ["max_steps=4", "lr=1e-3"])


def test_a_diverged_perplexity_is_printed_short():
    assert _fmt(1.0142e308, ".2f") == "1.014e+308" and _fmt(12.3456, ".2f") == "12.35" and _fmt(None) == "n/a"


def test_running_out_of_memory_in_training_is_one_line(data_dir, tmp_path):
    # A 65,536-wide model under a 4 GB address space: the CPU allocator's RuntimeError was a traceback.
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))

    proc = subprocess.run([sys.executable, "-m", "gpt1", "pretrain", "--data", str(data_dir), "--out", str(tmp_path / "big"),
                           "n_embd=65536", "n_head=1", "max_steps=1", "batch_size=1"],
                          capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert_one_clear_line(proc.returncode, proc.stderr,
                          r"out of memory: an allocation of [\d.]+ GiB failed; lower batch_size .*gradient_checkpointing=true$")


def test_a_run_stopped_before_its_first_checkpoint_starts_over_with_another_config(data_dir, tmp_path, caplog,
                                                                                     stop_training_at, monkeypatch):
    # Out of memory at its first step, the advice "lower batch_size" then met "holds a run with a
    # different config (batch_size: ...)": nothing was there to resume, or to lose.
    run = tmp_path / "run"
    stop_training_at(1, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(data_dir, run, ["max_steps=2", "batch_size=8"])
    monkeypatch.undo()
    with caplog.at_level("INFO", logger="gpt1"):
        assert _run(data_dir, run, ["max_steps=2", "batch_size=2"]).resumed_from == 0
    assert any("stopped before its first checkpoint; starting over" in r.message for r in caplog.records)
    with pytest.raises(Gpt1Error, match=r"different config \(batch_size: 2 -> 8\)"):  # once it has one, as before
        _run(data_dir, run, ["max_steps=2", "batch_size=8"])
    # A finished run whose checkpoints/ was deleted (to free the disk) still has its model: refused, not replaced.
    shutil.rmtree(run / "checkpoints")
    model = (run / "model.safetensors").read_bytes()
    with pytest.raises(Gpt1Error, match=r"different config \(batch_size: 2 -> 8\)"):
        _run(data_dir, run, ["max_steps=2", "batch_size=8"])
    assert (run / "model.safetensors").read_bytes() == model


def test_the_shipped_recipes_take_either_optimizer():
    # tiny-cpu sets muon_lr_scale = 1.0: a refusal of it beside optimizer=adamw broke that recipe
    # (and every run made with it), so a key of the other optimizer is kept, as it was.
    assert load_config(TrainConfig, "tiny-cpu", ["optimizer=adamw"]).optimizer == "adamw"


def test_a_chat_folder_read_by_gpt1_or_by_datasets_is_one_source(tmp_path):
    # A run begun on FOLDER when `datasets` read it resumes with hf:FOLDER, which reads as before
    # (the data's fingerprint, checked apart, decides); other paths stay other sources.
    from gpt1.train.run_record import _same_setting

    (tmp_path / "chats").mkdir()
    folder = str(tmp_path / "chats")
    assert _same_setting(tmp_path, "data", folder, "hf:" + folder)
    assert not _same_setting(tmp_path, "init_from", folder, "hf:" + folder)  # a GPT-2 import is another base
    assert not _same_setting(tmp_path, "data", folder, str(tmp_path))


def test_a_path_key_starting_with_a_tilde_is_under_the_home_folder(tmp_path, monkeypatch):
    """`data=~/chats.jsonl` reached the readers as a folder named `~` in the current one: TOML never
    expands it, nor does zsh (macOS's shell) in an argument such as `data=~/x`."""
    from gpt1.train.finetune import FinetuneConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = tmp_path / "r.toml"
    recipe.write_text('data = ["~/a.jsonl", "hf:~/chats", "OpenAssistant/oasst2"]\n')
    cfg = load_config(FinetuneConfig, recipe)
    assert cfg.data == [f"{tmp_path}/a.jsonl", f"hf:{tmp_path}/chats", "OpenAssistant/oasst2"]
    (tmp_path / "p.toml").write_text('init_from = "~/base"\n')  # a fine-tune's base is --base, not init_from
    assert load_config(TrainConfig, tmp_path / "p.toml").init_from == f"{tmp_path}/base"
    assert load_config(FinetuneConfig, None, ["data=~/b.jsonl"]).data == f"{tmp_path}/b.jsonl"
    assert load_config(FinetuneConfig, None, ["data=a~b"]).data == "a~b"  # a tilde inside a name stays


def test_a_recipe_or_override_nested_past_the_recursion_limit_is_one_line(tmp_path):
    """tomllib recurses once per level: `betas = [[[...]]]` 600 deep was a RecursionError
    traceback, in a recipe and as an override (with --print-config too)."""
    deep = "[" * 600 + "]" * 600
    (tmp_path / "deep.toml").write_text(f"betas = {deep}\n")
    with pytest.raises(Gpt1Error, match=r"deep.toml: invalid TOML for gpt1: arrays or tables nested too deeply"):
        load_config(TrainConfig, tmp_path / "deep.toml")
    with pytest.raises(Gpt1Error, match=r"key 'betas' expects tuple\[float, float\]"):
        load_config(TrainConfig, None, [f"betas={deep}"])


def test_a_config_path_that_is_a_folder_or_a_fifo_is_named_as_such(tmp_path):
    """It said `config file not found` for a path that exists."""
    import os

    (tmp_path / "dir.toml").mkdir()
    os.mkfifo(tmp_path / "fifo.toml")
    with pytest.raises(Gpt1Error, match=r"dir.toml: a folder, not a config file"):
        load_config(TrainConfig, tmp_path / "dir.toml")
    with pytest.raises(Gpt1Error, match=r"fifo.toml: not a regular file, not a config file"):
        load_config(TrainConfig, tmp_path / "fifo")
