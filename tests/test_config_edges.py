"""Training config keys at their edges (an exploratory pass, 2026-12-06): each value either takes
effect as documented or is refused before any work, in one line."""

from __future__ import annotations

import dataclasses
import json
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from gpt1.cli import SWITCH_KEYS, main
from gpt1.cli.finetune_cmd import PRETRAINING_KEYS
from gpt1.core.errors import Gpt1Error
from gpt1.data.shards import fixed_windows
from gpt1.train import finetune as ft
from gpt1.train.config import FINETUNE_KEYS, TrainConfig, load_config
from gpt1.train.finetune import FinetuneConfig, finetune
from gpt1.train.pretrain import pretrain
from gpt1.train.run_log import fmt
from gpt1.train.schedule import lr_at
from tests.test_battery import assert_one_clear_line, run_main
from tests.test_train import FT_ARGS, TINY, _chat_file, _metrics, _run


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
    assert fmt(1.0142e308, ".2f") == "1.014e+308" and fmt(12.3456, ".2f") == "12.35" and fmt(None) == "n/a"


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


# The configuration surface: a resume that changes the validation batches under keep_best /
# early_stop, keep_best turned off on a resume, the hints of a mistyped key or flag, a run's record
# read as a recipe, GPT1_DEBUG's spelling, and the fine-tuning defaults' table.

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _record(run: Path) -> dict:
    return json.loads((run / "train_config.json").read_text())


def _stopped(data_dir, run: Path, stop_training_at, monkeypatch, args: list[str], at: int) -> None:
    """A run killed during its `at`-th step (its earlier checkpoints kept)."""
    stop_training_at(at, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(data_dir, run, args)
    monkeypatch.undo()


# ---- eval_batches is held fixed where losses are compared across validations ---------------

def test_eval_batches_changed_on_resume_is_refused_under_keep_best_or_early_stop(data_dir, tmp_path, stop_training_at,
                                                                               monkeypatch):
    """A resume from eval_batches=1 to 8 compared the new validation set's losses with the lowest of
    the old one: the run stopped early (early_stop) at a loss that its uninterrupted twin had as the
    lowest so far, and best/ kept another model than the lowest. Refused now, naming why."""
    args = ["max_steps=4", "eval_every=1", "save_every=2", "eval_batches=1", "keep_best=true"]
    run = tmp_path / "run"
    _stopped(data_dir, run, stop_training_at, monkeypatch, args, at=3)  # checkpoint 2
    before = _record(run)
    with pytest.raises(Gpt1Error, match=r"different config \(eval_batches: 1 -> 2, which keep_best=true holds fixed: "
                                        r"each validation loss is compared with the lowest so far, measured on the "
                                        r"batches before\); .*a resume may change only device, eval_every, "):
        _run(data_dir, run, [*args, "eval_batches=2"])
    # Turned off on the same resume, keep_best held it still: the checkpoint's lowest is the old set's.
    with pytest.raises(Gpt1Error, match=r"eval_batches: 1 -> 2, which keep_best=true holds fixed"):
        _run(data_dir, run, [*args, "eval_batches=2", "keep_best=false"])
    assert _record(run) == before
    assert _run(data_dir, run, args).resumed_from == 2  # the same batches resume

    # early_stop alone; and keep_best turned on by the resume that changes the batches.
    stop = tmp_path / "stop"
    _run(data_dir, stop, ["max_steps=2", "eval_every=1", "eval_batches=1", "early_stop=3"])
    with pytest.raises(Gpt1Error, match=r"eval_batches: 1 -> 2, which early_stop=3 holds fixed"):
        _run(data_dir, stop, ["max_steps=2", "eval_every=1", "eval_batches=2", "early_stop=3"])
    plain = tmp_path / "plain"
    _run(data_dir, plain, ["max_steps=2", "eval_every=1", "eval_batches=1"])
    with pytest.raises(Gpt1Error, match=r"eval_batches: 1 -> 2, which keep_best=true holds fixed"):
        _run(data_dir, plain, ["max_steps=2", "eval_every=1", "eval_batches=2", "keep_best=true"])
    # Neither on: a resumable key as before (a finished run's rerun accepts it and changes nothing).
    assert _run(data_dir, plain, ["max_steps=2", "eval_every=1", "eval_batches=2"]).resumed_from == 2


def test_a_changed_eval_every_under_a_time_budget_says_why_it_is_refused(data_dir, tmp_path):
    run = tmp_path / "run"
    _run(data_dir, run, ["max_steps=2", "eval_every=1", "time_budget=600"])
    with pytest.raises(Gpt1Error, match=r"\(eval_every: 1 -> 2, which time_budget=600\.0 holds fixed: the "
                                        r"validations' time counts in the plan\)"):
        _run(data_dir, run, ["max_steps=2", "eval_every=2", "time_budget=600"])


# ---- keep_best turned off on a resume -------------------------------------------------------

def test_keep_best_turned_off_on_a_resume_says_what_best_keeps(data_dir, tmp_path, stop_training_at, monkeypatch,
                                                               caplog):
    """best/ stayed with an older model and the run's last line stopped naming it, without a word."""
    args = ["max_steps=6", "eval_every=1", "save_every=2", "eval_batches=1"]
    run = tmp_path / "run"
    _stopped(data_dir, run, stop_training_at, monkeypatch, [*args, "keep_best=true"], at=3)  # checkpoint 2
    best = _metrics(run)[1]  # step 2's validation: the lowest so far as of the checkpoint
    assert best["step"] == 2
    kept = {p.name: p.read_bytes() for p in (run / "best").iterdir()}
    stop_training_at(3, KeyboardInterrupt)  # the resume (from 2) killed in its step 5: checkpoint 4
    with caplog.at_level("INFO", logger="gpt1"), pytest.raises(KeyboardInterrupt):
        _run(data_dir, run, [*args, "keep_best=false"])
    monkeypatch.undo()
    warnings = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"keep_best=false: {run / 'best'} keeps step {best['best_step']}'s model (val loss "
                        f"{best['best_val_loss']:.4f}), the lowest while keep_best was on; later validations no "
                        "longer replace it, even with a lower loss"]
    assert {p.name: p.read_bytes() for p in (run / "best").iterdir()} == kept  # the user's files stay
    caplog.clear()
    with caplog.at_level("INFO", logger="gpt1"):  # said once: the next resume, off before too, says nothing
        assert _run(data_dir, run, [*args, "keep_best=false"]).resumed_from == 4
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


# ---- the hints of a flag or value written otherwise -----------------------------------------

def test_the_advice_for_a_flag_that_is_a_recipe_key_is_accepted(capsys):
    """`--languages en` advised languages=en, then refused (a list); `--compile` advised compile=VALUE."""
    line = assert_one_clear_line(*run_main(capsys, "finetune", "--print-config", "--languages", "en"),
                                 r"unrecognized arguments: --languages \(a recipe key: write languages=en\)")
    assert main(["finetune", "--print-config", re.search(r"write (\S+)\)", line)[1]]) == 0
    assert 'languages = ["en"]' in capsys.readouterr().out.splitlines()
    line = assert_one_clear_line(*run_main(capsys, "pretrain", "--print-config", "--compile"),
                                 r"\(a recipe key: write compile=true\)")
    assert main(["pretrain", "--print-config", re.search(r"write (\S+)\)", line)[1]]) == 0
    assert "compile = true" in capsys.readouterr().out.splitlines()
    assert_one_clear_line(*run_main(capsys, "pretrain", "--print-config", "--lr"), r"\(a recipe key: write lr=VALUE\)")
    # One string for a list of strings is the list of it; [...] stays TOML.
    assert load_config(FinetuneConfig, None, ["lora_targets=q", "languages='de'"]).languages == ["de"]
    assert load_config(FinetuneConfig, None, ["lora_targets=q"]).lora_targets == ("q",)
    assert load_config(FinetuneConfig, None, ['languages=["en", "de"]']).languages == ["en", "de"]


def test_a_list_whose_quotes_the_shell_dropped_says_how_to_quote_it():
    """lora_targets=["q","v"] unquoted reaches gpt1 as [q,v]: "Input should be a valid array"."""
    with pytest.raises(Gpt1Error) as refused:
        load_config(FinetuneConfig, None, ["lora_targets=[q,v]"])
    assert str(refused.value).endswith("""got '[q,v]' (the shell dropped the quotes around the strings: quote the whole \
argument, 'lora_targets=["q", "v"]')""")
    advice = re.search(r"argument, (.*)\)$", str(refused.value))[1]
    assert load_config(FinetuneConfig, None, shlex.split(advice)).lora_targets == ("q", "v")
    with pytest.raises(Gpt1Error, match=r"expects list\[str\], got 3 \(an array of strings, e\.g\. "
                                        r"languages=\[\"a\", \"b\"\]\)"):
        load_config(FinetuneConfig, None, ["languages=3"])


def test_the_switch_and_finetune_key_lists_are_the_configs():
    """The CLI's true/false keys (told `--compile` as compile=true, without loading torch) and the
    fine-tuning keys a pretraining recipe is told of are the configs' own fields."""
    fields = {f.name: f.type for cls in (TrainConfig, FinetuneConfig) for f in dataclasses.fields(cls)}
    assert set(SWITCH_KEYS) == {name for name, kind in fields.items() if kind == "bool"}
    own = {f.name for f in dataclasses.fields(FinetuneConfig)} - {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(FINETUNE_KEYS) == own


def test_a_mistyped_or_misplaced_key_is_told_the_key_it_may_be(capsys):
    for typo in ("max_step", "maxsteps", "Max_Steps"):
        with pytest.raises(Gpt1Error, match=rf"unknown key '{typo}' \(did you mean max_steps\?\); known keys: "):
            load_config(TrainConfig, None, [f"{typo}=5"])
    with pytest.raises(Gpt1Error, match=r"unknown key 'lora_rnk' \(did you mean lora_r\?\)"):
        load_config(FinetuneConfig, None, ["lora_rnk=4"])
    with pytest.raises(Gpt1Error, match=r"unknown key 'zzz'; known keys: "):  # nothing close: no guess
        load_config(TrainConfig, None, ["zzz=1"])
    for key in ("data=chats.jsonl", "lora_r=4"):
        with pytest.raises(Gpt1Error, match=rf"unknown key '{key.split('=')[0]}' \(a gpt1 finetune key\); known keys"):
            load_config(TrainConfig, None, [key])
    assert_one_clear_line(*run_main(capsys, "pretrain", "--config", "tiny-chat", "--print-config"),
                          r"tiny-chat\.toml: unknown key '\w+' \(a gpt1 finetune key\)")


# ---- small ones ---------------------------------------------------------------------------

def test_print_config_refuses_what_the_run_refuses(capsys):
    """finetune --print-config init_from=X printed a recipe without it (exit 0); model=Tiny and
    model= printed as they were, refused only once the data was read."""
    assert_one_clear_line(*run_main(capsys, "finetune", "--print-config", "init_from=runs/x"),
                          r"init_from=runs/x: a pretraining key; a fine-tune starts from its base \(--base\)$")
    for value in ("Tiny", ""):
        assert_one_clear_line(*run_main(capsys, "pretrain", "--print-config", f"model={value}"),
                              rf"model: unknown model preset '{value}'; known presets: gpt1, tiny, small, medium, gpt2$")
    with pytest.raises(Gpt1Error, match="unknown model preset 'huge'"):
        TrainConfig(model="huge")


def test_a_refused_resume_spells_values_as_a_recipe_does(data_dir, tmp_path):
    run = tmp_path / "run"
    _run(data_dir, run, ["max_steps=1"])
    with pytest.raises(Gpt1Error, match=r"different config \(compile: false -> true, lr: 0\.003 -> 0\.001\)"):
        _run(data_dir, run, ["max_steps=1", "compile=true", "lr=1e-3"])


def test_a_runs_record_is_a_recipe_that_trains_the_run_again(data_dir, tiny_model_dir, tmp_path, capsys):
    """`--config RUN/train_config.json` was "invalid TOML"."""
    run, again = tmp_path / "run", tmp_path / "again"
    cfg = load_config(TrainConfig, None, [*TINY, "max_steps=2", "eval_every=1", "lr=2e-3"])
    _run(data_dir, run, ["max_steps=2", "eval_every=1", "lr=2e-3"])
    assert load_config(TrainConfig, run / "train_config.json") == cfg
    assert main(["pretrain", "--config", str(run / "train_config.json"), "--data", str(data_dir),
                 "--out", str(again)]) == 0
    def losses(folder: Path) -> list[tuple]:
        return [(m["step"], m["loss"], m.get("val_loss")) for m in _metrics(folder)]

    assert losses(again) == losses(run)  # to the bit
    # A fine-tune's: its base is --base, not a recipe key (the record holds it as init_from).
    chat, ft = _chat_file(tmp_path / "chat.jsonl"), tmp_path / "ft"
    ft_cfg = load_config(FinetuneConfig, None, FT_ARGS, data=str(chat))
    finetune(ft_cfg, tiny_model_dir, ft)
    assert _record(ft)["config"]["init_from"] == str(tiny_model_dir.resolve())
    assert load_config(FinetuneConfig, ft / "train_config.json") == dataclasses.replace(ft_cfg, data=str(chat.resolve()))
    with pytest.raises(Gpt1Error, match=r"run: a folder, not a config file \(a TOML recipe such as configs/tiny-cpu\.toml, "
                                        r"or a run's train_config\.json\)$"):
        load_config(TrainConfig, run)
    # JSON that is no run's record.
    (tmp_path / "other.json").write_text('{"lr": 0.1}')
    with pytest.raises(Gpt1Error, match=r"other\.json: not a run's train_config\.json \(no \"config\" object\)"):
        load_config(TrainConfig, tmp_path / "other.json")


def test_a_key_given_twice_takes_the_last_value(capsys):
    """As docs/training.md says: later overrides win, and a flag wins over its key."""
    assert load_config(TrainConfig, None, ["lr=1e-3", "lr=2e-3"]).lr == 2e-3
    assert main(["finetune", "--print-config", "--data", "b.jsonl", "data=a.jsonl"]) == 0
    assert 'data = "b.jsonl"' in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize(("value", "on"), [("1", True), ("true", True), ("YES", True), ("on", True), ("", False),
                                           ("0", False), ("false", False), ("no", False), ("off", False)])
def test_gpt1_debug_is_on_only_when_set_on(value, on, monkeypatch, capsys):
    """GPT1_DEBUG=false (or no, off) printed the traceback: anything but "" and "0" was on."""
    monkeypatch.setenv("GPT1_DEBUG", value)
    assert main(["pretrain", "--print-config", "lr=x"]) == 2
    assert ("Traceback" in capsys.readouterr().err) == on


# ---- the fine-tuning defaults' table ----------------------------------------------------------

def test_the_finetuning_docs_table_holds_finetune_configs_own_defaults():
    """docs/finetuning.md pointed at training.md's table, whose max_steps, epochs, lr and warmup are
    not a fine-tune's; its own table lists each key FinetuneConfig adds or sets otherwise."""
    rows = {}
    for line in (DOCS / "finetuning.md").read_text().splitlines():
        if m := re.match(r"\| `(\w+)` \| (.+?) \| .+ \|$", line):
            rows[m[1]] = m[2].strip("`")
    pretraining = TrainConfig().to_dict()
    own = {k: v for k, v in FinetuneConfig().to_dict().items() if k not in pretraining or pretraining[k] != v}
    assert set(own) <= set(rows), set(own) - set(rows)
    for key, value in own.items():
        assert tomllib.loads(f"v = {rows[key]}")["v"] == value, (key, rows[key])  # TOML, as a recipe writes it


# A refusal in the recipes' spelling, not Python's.

# ---- a refusal in the recipes' spelling -----------------------------------------------------------

def test_a_refused_lora_key_is_named_as_a_recipe_writes_it():
    with pytest.raises(Gpt1Error, match=r"^lora_targets=\['q', 'v'\], train_special_tokens=false: LoRA keys"):
        ft.FinetuneConfig(full=True, lora_targets=["q", "v"], train_special_tokens=False)


# The Python API: a config changed by attribute after it was built is checked again where it is
# used, and the annotations accept what the docs pass.

RUN = dict(model="tiny", block_size=32, batch_size=2, max_steps=1, eval_every=1, eval_batches=1, device="cpu")


# ---- a config changed by attribute is checked again at the entry of a run -------------------

@pytest.mark.parametrize(("key", "value", "message"), [
    ("compile", "no", "TrainConfig: key 'compile' expects bool, got 'no'"),
    ("max_steps", 2.5, "TrainConfig: key 'max_steps' expects int, got 2.5"),
    ("max_steps", -1, "max_steps must be >= 0, got -1"),
    ("lr", "3e-4", "TrainConfig: key 'lr' expects float, got '3e-4'"),  # argparse's str
    ("seed", "1", "TrainConfig: key 'seed' expects int, got '1'"),
])
def test_a_train_config_changed_after_it_was_built_is_refused_by_pretrain_as_construction_would(
        data_dir, tmp_path, key, value, message):
    cfg = TrainConfig(**RUN)
    setattr(cfg, key, value)  # cfg = load_config(...); cfg.lr = args.lr
    with pytest.raises(Gpt1Error, match=f"^{message}"):
        pretrain(cfg, data_dir, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_pretrain_runs_and_records_the_checked_values_of_a_changed_config(data_dir, tmp_path):
    cfg = TrainConfig(**RUN)
    cfg.min_lr, cfg.eval_every, cfg.betas = 0, np.int64(1), [0.8, 0.9]  # an int for a float, NumPy's int, a list
    assert pretrain(cfg, data_dir, tmp_path / "run").steps == 1
    recorded = json.loads((tmp_path / "run" / "train_config.json").read_text())["config"]
    assert isinstance(recorded["min_lr"], float) and recorded["min_lr"] == 0.0
    assert recorded["eval_every"] == 1 and recorded["betas"] == [0.8, 0.9]


def test_a_finetune_config_changed_after_it_was_built_is_refused_by_finetune(tiny_model_dir, tmp_path):
    cfg = FinetuneConfig(data=str(tmp_path / "chats.jsonl"), max_steps=1, device="cpu")
    cfg.lora_r = "8"
    with pytest.raises(Gpt1Error, match="^FinetuneConfig: key 'lora_r' expects int, got '8'"):
        finetune(cfg, tiny_model_dir, tmp_path / "ft")
    cfg.lora_r, cfg.lora_targets = 8, ("q", "gate")  # a value construction refuses by its own check
    with pytest.raises(Gpt1Error, match="gate"):
        finetune(cfg, tiny_model_dir, tmp_path / "ft")
    assert not (tmp_path / "ft").exists()


# Another tool's name for a key.

def test_another_tools_name_for_a_key_says_gpt1s_and_r_0_says_there_is_no_full_fine_tuning():
    """`max_iters=` (nanoGPT), `learning_rate=` (Hugging Face), `early_stopping_patience=` got only the
    list of known keys; `lora_r=0`, how some tools ask for full fine-tuning, only "a positive integer"."""
    from gpt1.train.config import TrainConfig, load_config
    from gpt1.train.finetune import FinetuneConfig

    for key, ours in (("max_iters", "max_steps"), ("learning_rate", "lr"),
                      ("early_stopping_patience", "early_stop: validations, not steps"),
                      ("warmup_iters", "warmup: a fraction of the run's steps, e.g. warmup=0.05")):
        with pytest.raises(Gpt1Error, match=rf"unknown key '{key}' \(gpt1's is {re.escape(ours)}\); known keys: "):
            load_config(TrainConfig, None, [f"{key}=3"])
    with pytest.raises(Gpt1Error, match=r"unknown key 'r'; known keys"):  # a pretraining run has no lora_r
        load_config(TrainConfig, None, ["r=8"])
    with pytest.raises(Gpt1Error, match=r"unknown key 'r' \(gpt1's is lora_r\)"):
        load_config(FinetuneConfig, None, ["r=8"])
    with pytest.raises(Gpt1Error, match=r"^LoRA rank r must be a positive integer, got 0 \(for full fine-tuning, "
                                        r"which trains every weight: full=true\)$"):
        load_config(FinetuneConfig, None, ["lora_r=0"]).lora_config([])


# --print-config without paths, and the docs that list every key.

def test_print_config_needs_no_paths_and_lists_only_keys_that_apply(tmp_path, capsys):
    """It needed --data/--out (--base/--out) though nothing is read; finetune's listed model,
    init_from, muon_lr_scale, embedding_lr_scale, keys fine-tuning refuses."""
    assert main(["pretrain", "--print-config", "--config", "tiny-cpu", "lr=0.01"]) == 0
    (tmp_path / "pt.toml").write_text(capsys.readouterr().out)
    assert load_config(TrainConfig, tmp_path / "pt.toml").lr == 0.01  # a loadable recipe
    assert main(["finetune", "--print-config", "lora_r=4"]) == 0
    printed = capsys.readouterr().out
    assert not set(PRETRAINING_KEYS) & {line.split(" = ")[0] for line in printed.splitlines()}
    assert {"optimizer", "float8"} <= set(PRETRAINING_KEYS)  # refused too, and listed until pass 17
    (tmp_path / "ft.toml").write_text(printed)
    assert load_config(FinetuneConfig, tmp_path / "ft.toml").lora_r == 4
    # Each key left out is one fine-tuning refuses (the list does not drift from FinetuneConfig).
    assert set(PRETRAINING_KEYS) <= set(TrainConfig().to_dict())
    changed = {"model": "small", "init_from": "runs/x", "n_layer": 2, "n_head": 2, "n_embd": 64, "muon_lr_scale": 2.0,
               "embedding_lr_scale": 2.0, "optimizer": "muon", "float8": True, "data_order": "random"}
    for key in PRETRAINING_KEYS:
        assert_one_clear_line(*run_main(capsys, "finetune", "--base", tmp_path / "none", "--out", tmp_path / "o",
                                        f"{key}={json.dumps(changed[key])}"), rf"{key}")
    assert not (tmp_path / "o").exists()
    # Without --print-config a run still needs them, said as argparse says it.
    assert_one_clear_line(*run_main(capsys, "pretrain", "max_steps=1"),
                          r"the following arguments are required: --data, --out \(see gpt1 pretrain --help\)$")
    assert_one_clear_line(*run_main(capsys, "finetune", "--out", tmp_path / "o"),
                          r"the following arguments are required: --base \(see gpt1 finetune --help\)$")


def test_training_help_points_at_the_docs_that_list_every_key(capsys):
    """--help said "see the README for every key"; the keys are in docs/training.md and docs/finetuning.md."""
    for command, doc in (("pretrain", "docs/training.md"), ("finetune", "docs/finetuning.md")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert doc in text and "README" not in text
        assert (Path(__file__).resolve().parents[1] / doc).is_file()


# Device names no machine has.

@pytest.mark.parametrize("device", ["gpu", "cuda:x", "meta", "tpu"])
def test_a_device_no_machine_has_is_refused_as_the_config_is_built(device, tmp_path, data_dir, capsys):
    """TrainConfig(device="gpu") was accepted and refused only once the run started."""
    with pytest.raises(Gpt1Error, match=rf"^device: unknown device '{device}'; expected auto, cpu, cuda, cuda:N or mps$"):
        TrainConfig(device=device)
    assert_one_clear_line(*run_main(capsys, "pretrain", "--data", data_dir, "--out", tmp_path / "run", f"device={device}"),
                          "unknown device")
    assert not (tmp_path / "run").exists()


def test_a_device_this_machine_lacks_is_still_a_valid_recipe():
    """A recipe may be written on a laptop for a GPU box: only the run checks the machine."""
    assert TrainConfig(device="cuda:1").device == "cuda:1"
    assert FinetuneConfig(device="mps").device == "mps"
