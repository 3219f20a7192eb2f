"""The configuration surface, pass 21: a resume that changes the validation batches under
keep_best / early_stop, keep_best turned off on a resume, the hints of a mistyped key or flag, a
run's record read as a recipe, GPT1_DEBUG's spelling, and the fine-tuning defaults' table."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from gpt1.cli import SWITCH_KEYS, main
from gpt1.core.errors import Gpt1Error
from gpt1.train.config import FINETUNE_KEYS, TrainConfig, load_config
from gpt1.train.finetune import FinetuneConfig, finetune
from tests.test_battery import assert_one_clear_line, run_main
from tests.test_train import FT_ARGS, TINY, _chat_file, _metrics, _run

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _record(run: Path) -> dict:
    return json.loads((run / "train_config.json").read_text())


def _stopped(data_dir, run: Path, stop_training_at, monkeypatch, args: list[str], at: int) -> None:
    """A run killed during its `at`-th step (its earlier checkpoints kept)."""
    stop_training_at(at, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        _run(data_dir, run, args)
    monkeypatch.undo()


# ---- 1. eval_batches is held fixed where losses are compared across validations ---------------

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


# ---- 2. keep_best turned off on a resume -------------------------------------------------------

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


# ---- 3. the hints of a flag or value written otherwise -----------------------------------------

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


# ---- 5. small ones ---------------------------------------------------------------------------

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


# ---- 4. the fine-tuning defaults' table ----------------------------------------------------------

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
