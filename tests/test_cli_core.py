"""The command line for the core library: real subprocesses, checking exit codes and stderr."""

import json
import subprocess
import sys

import pytest

from gpt1.core.tokenizer import Tokenizer


def gpt1(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "gpt1", *args], capture_output=True, text=True, timeout=300, **kwargs)


def assert_clean_error(result, pattern):
    import re

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("gpt1 ") and ": error: " in last, result.stderr
    assert re.search(pattern, last), last


def test_tokenizer_train_cli(tmp_path, corpus_dir):
    result = gpt1("tokenizer", "train", "--vocab-size", "400", "--out", str(tmp_path / "tok"), str(corpus_dir / "json"))
    assert result.returncode == 0, result.stderr
    assert "documents" in result.stderr and "MB" in result.stderr
    assert Tokenizer.load(tmp_path / "tok").vocab_size == 400


def test_info_shows_reference_parameter_count():
    result = gpt1("info", "gpt1")
    assert result.returncode == 0, result.stderr
    assert "parameters: 257,525,760" in result.stderr
    assert json.loads(result.stdout)["n_layer"] == 12  # stdout is the config alone: `gpt1 info gpt1 | jq` reads it


@pytest.mark.parametrize("case", ["missing", "empty_dir", "invalid_utf8", "small_vocab", "unknown_preset"])
def test_bad_input_gives_one_clear_line(tmp_path, case):
    out = str(tmp_path / "tok")
    if case == "missing":
        r = gpt1("tokenizer", "train", "--out", out, str(tmp_path / "missing.txt"))
        assert_clean_error(r, r"missing.txt: no such file")
    elif case == "empty_dir":
        (tmp_path / "empty").mkdir()
        r = gpt1("tokenizer", "train", "--out", out, str(tmp_path / "empty"))
        assert_clean_error(r, r"empty: directory has no text files")
    elif case == "invalid_utf8":
        (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
        r = gpt1("tokenizer", "train", "--vocab-size", "300", "--out", out, str(tmp_path / "latin1.txt"))
        assert_clean_error(r, r"latin1.txt: invalid UTF-8 at byte offset 3")
    elif case == "small_vocab":
        (tmp_path / "a.txt").write_text("hello")
        r = gpt1("tokenizer", "train", "--vocab-size", "100", "--out", out, str(tmp_path / "a.txt"))
        assert_clean_error(r, r"vocab size 100 is too small.*at least 262")
    else:
        r = gpt1("info", "gpt-5")
        assert_clean_error(r, r"unknown model preset 'gpt-5'")


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path, corpus_dir, tokenizer_dir):
    """Issue 16: tqdm's \\r redraws flooded logs; off a terminal a bar prints whole lines."""
    import os

    env = {**os.environ, "GPT1_QUIET": "0"}
    result = gpt1("prepare", "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "d"), "--val", "2",
                  str(corpus_dir / "json"), env=env)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    assert any(line.startswith("prepare: 100%") for line in result.stderr.splitlines()), result.stderr


def test_a_plain_bar_prints_its_last_state_once(monkeypatch, capsys):
    """Closing a bar redrew its last state with only the clock moved on: every training log
    ended with two 100% lines. A line with a new count or postfix is still printed."""
    from gpt1.core import progress as progress_module

    monkeypatch.setattr(progress_module, "PLAIN_INTERVAL", 0.0)  # a line at every update
    monkeypatch.setenv("GPT1_QUIET", "0")
    bar = progress_module.progress(total=3, desc="run", unit="step")
    for _ in range(3):
        bar.update(1)
    bar.set_postfix(val="5.0")  # a validation at the end: new information, a line of its own
    bar.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("run:")]
    assert [line.split("|")[2].split(" [")[0].strip() for line in lines] == ["0/3", "1/3", "2/3", "3/3", "3/3"], lines
    assert "val=5.0" not in lines[-2] and "val=5.0" in lines[-1]


def test_a_plain_bar_whose_clock_changes_length_is_still_one_line():
    """The bar between the `|`s fills what the clock leaves of 100 columns, so a closing redraw with
    a longer rate (`5888.12step/s` after `?step/s`) drew a shorter bar: CI's log had 3/3 three times."""
    import io

    from gpt1.core.progress import _PlainLines

    sink = io.StringIO()
    plain = _PlainLines(sink)
    plain.write("\rrun: 100%|##########| 3/3 [00:00<?, ?step/s, val=5.0]")
    plain.write("\rrun: 100%|#######| 3/3 [00:00<00:00, 5888.12step/s, val=5.0]")
    plain.write("\rrun: 100%|#######| 3/3 [00:01<00:00, 2.10step/s, val=4.0]")
    assert [line.split("[")[1] for line in sink.getvalue().splitlines()] == ["00:00<?, ?step/s, val=5.0]",
                                                                            "00:01<00:00, 2.10step/s, val=4.0]"]


# ---- paths and flags refused with one clear line (in-process: no interpreter start-up) --------

def test_an_output_file_that_is_a_folder_is_one_clear_line(tmp_path, tiny_model_dir, data_dir, capsys):
    from tests.task_files import hellaswag, write_jsonl
    from tests.test_battery import assert_one_clear_line, run_main

    folder = tmp_path / "empty"
    folder.mkdir()
    task = write_jsonl(tmp_path / "hs.jsonl", [hellaswag(i) for i in range(2)])
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 8.0, "tokens": 64}\n{"step": 2, "loss": 7.0, "tokens": 128}\n')
    for argv in (["eval", "--model", tiny_model_dir, "--data", data_dir, "--max-batches", "1", "--json", folder],
                 ["eval", "--model", tiny_model_dir, "--task", "hellaswag", "--data", task, "--samples", folder],
                 ["plot", run, "--out", folder]):
        assert_one_clear_line(*run_main(capsys, *argv), r"empty: is a folder; expected the name of a file to write")
        assert list(folder.iterdir()) == []
    assert_one_clear_line(*run_main(capsys, "plot", run, "--out", f"{tmp_path}/new/"),
                          r"new/: names a folder \(a trailing /\); expected the name of a file to write")
    assert not (tmp_path / "new").exists()


def test_plot_skips_records_that_are_not_numbers_and_says_which(tmp_path, capsys, caplog):
    """A string loss made matplotlib draw a categorical axis (ticks '2.0, nan, x, inf'), silently."""
    from gpt1.train.plot import read_metrics
    from tests.test_battery import run_main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"step":1,"loss":2.0}\nnot json\n{"step":2,"loss":NaN}\n{"step":3,"loss":"x"}\n{"step":4,"loss":Infinity}\n'
        '{"step":5,"loss":1.5}\n{"step":6,"loss":null,"skipped":"non-finite loss"}\n{"step":7,"loss":1.4,"val_loss":1.6}\n'
        '{"step":8,"lo')  # the last line, cut short by a kill: skipped without a word
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 5, 6, 7]
    assert "skipped 4 lines that are not a step's record with finite numbers (lines 2, 3, 4, 5)" in caplog.text
    capsys.readouterr()
    code, _ = run_main(capsys, "plot", run)
    assert code == 0 and (run / "loss.png").stat().st_size > 1000


def test_a_prepare_out_that_is_or_lies_under_a_file_is_one_clear_line(tmp_path, tokenizer_dir, corpus_dir, capsys):
    from tests.test_battery import assert_one_clear_line, run_main

    file = tmp_path / "a.txt"
    file.write_text("text")
    for out in (file, file / "data"):
        rc, err = run_main(capsys, "prepare", "--tokenizer", tokenizer_dir, "--out", out, corpus_dir / "json")
        assert_one_clear_line(rc, err, r"a\.txt.*not a folder")
    assert file.read_text() == "text"


@pytest.mark.parametrize("argv, pattern", [
    (["prepare", "--batch-docs", "0"], r"--batch-docs: expected a whole number >= 1, got 0"),
    (["prepare", "--batch-docs", "-5"], r"--batch-docs: expected a whole number >= 1, got -5"),
    (["tokenizer", "train", "--vocab-size", "300", "--min-frequency", "-1"], r"min_frequency \(--min-frequency\) must be a whole number >= 0 .*got -1"),
])
def test_a_bad_count_flag_is_one_clear_line(tmp_path, tokenizer_dir, corpus_dir, capsys, argv, pattern):
    from tests.test_battery import assert_one_clear_line, run_main

    if argv[0] == "prepare":
        argv = [*argv, "--tokenizer", tokenizer_dir]
    assert_one_clear_line(*run_main(capsys, *argv, "--out", tmp_path / "out", corpus_dir / "json"), pattern)
    assert not (tmp_path / "out").exists()


def test_a_recipe_that_is_not_utf8_is_one_clear_line(tmp_path, data_dir, capsys):
    from tests.test_battery import assert_one_clear_line, run_main

    recipe = tmp_path / "bad.toml"
    recipe.write_bytes(b"max_steps = 3\n\xff\xfe")
    rc, err = run_main(capsys, "pretrain", "--config", recipe, "--data", data_dir, "--out", tmp_path / "run")
    assert_one_clear_line(rc, err, r"bad\.toml: invalid UTF-8 at byte offset 14")
    assert not (tmp_path / "run").exists()


def test_an_unknown_config_json_field_names_the_file_once(tmp_path, tiny_model_dir, capsys):
    import json
    import shutil

    from tests.test_battery import assert_one_clear_line, run_main

    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "extra": 1}))
    line = assert_one_clear_line(*run_main(capsys, "info", model), r"config\.json: unknown model config field\(s\) extra; known: ")
    assert line.count("config.json") == 1, line
    # A Hugging Face export is named as one (it listed GPT-2's 25 config fields as unknown), as
    # generate and serve name it.
    from gpt1.formats.hf import export_model

    export_model(tiny_model_dir, tmp_path / "hf")
    assert_one_clear_line(*run_main(capsys, "info", tmp_path / "hf"),
                          r"hf: a Hugging Face transformers folder, not a gpt1 model dir; import it with ")


def test_an_error_line_joins_lines_but_keeps_the_spaces_it_quotes(capsys):
    """The line joined every run of whitespace, so a quoted value of three spaces showed as one."""
    from gpt1.cli import _error

    assert _error("eval", 'tasks.jsonl, line 1: field \'text\' must be a string ending in a word, got "   "\n  (more)\n') == 2
    assert capsys.readouterr().err == ('gpt1 eval: error: tasks.jsonl, line 1: field \'text\' must be a string ending '
                                       'in a word, got "   " (more)\n')


def test_quickstart_refuses_a_bad_seed_device_or_out_before_any_stage(tmp_path, capsys):
    """A seed out of range failed after the five minutes of pretraining (in the fine-tune's numpy
    generator), a bad device after the tokenizer and prepare stages, an --out under a file with a
    traceback."""
    from tests.test_battery import assert_one_clear_line, run_main

    a_file = tmp_path / "a.txt"
    a_file.write_text("x")
    out = tmp_path / "qs"
    cases = [(["--out", out, "--seed=-1"], r"--seed must be a whole number in \[0, 2\*\*63\), got -1"),
             (["--out", out, f"--seed={2**64}"], r"--seed must be a whole number in \[0, 2\*\*63\)"),
             (["--out", out, "--device", "banana"], r"device: unknown device 'banana'"),
             (["--out", a_file], rf"{a_file}: exists and is not a folder"),
             (["--out", a_file / "qs"], rf"{a_file / 'qs'}: cannot create the folder: {a_file} is not a folder")]
    for args, pattern in cases:
        assert_one_clear_line(*run_main(capsys, "quickstart", "--minutes", "0.05", *args), pattern)
    assert not out.exists()


def test_hints_name_what_the_command_has(tmp_path, capsys):
    """The quickstart, on an --out whose data was prepared otherwise (another --seed), said
    "pass --overwrite" (a flag of `gpt1 prepare` only); `bench --json FOLDER` failed only once
    the benchmarks had run."""
    import json

    from tests.test_battery import assert_one_clear_line, run_main

    out = tmp_path / "qs"
    (out / "data").mkdir(parents=True)
    (out / "data" / "meta.json").write_text(json.dumps({"key": {"seed": 5}}))
    line = assert_one_clear_line(*run_main(capsys, "quickstart", "--out", out, "--minutes", "0.05", "--device", "cpu"),
                                 rf"{out / 'data'} already holds data prepared with other settings \(.*seed: 5 -> 1337.*\); "
                                 rf"choose another --out, or delete {out / 'data'} \(and the stages after it\)")
    assert "--overwrite" not in line
    assert_one_clear_line(*run_main(capsys, "bench", "--quick", "--json", tmp_path, "train"),
                          rf"{tmp_path}: is a folder; expected the name of a file to write")


def test_overrides_after_a_flag_are_overrides_and_other_strays_are_refused(tmp_path, data_dir, capsys):
    """argparse takes one run of positionals: `gpt1 finetune --base B model=x --data D lora_r=4`
    failed with "unrecognized arguments: lora_r=4"."""
    import json

    from gpt1.cli import main

    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "model=tiny", "block_size=32", "--data", str(data_dir), "device=cpu",
                 "batch_size=4", "max_steps=2", "eval_every=2", "save_every=2"]) == 0
    config = json.loads((out / "train_config.json").read_text())["config"]
    assert (config["model"], config["block_size"], config["batch_size"], config["max_steps"]) == ("tiny", 32, 4, 2)
    for stray in (["--bogus"], ["x=1"]):  # a flag nobody takes; an override where no command takes them
        argv = ["info", "tiny", *stray] if stray == ["x=1"] else ["pretrain", "--out", str(out), "--data", str(data_dir),
                                                                  "a=1", *stray]
        capsys.readouterr()
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        assert code == 2 and f"unrecognized arguments: {stray[0]}" in capsys.readouterr().err


def test_a_ctrl_c_while_the_command_loads_is_one_line_not_a_traceback(monkeypatch, capsys):
    """A Ctrl-C in the first seconds (while torch loads) printed a KeyboardInterrupt traceback:
    `import gpt1.cli` loads no torch now, and `run` catches what the loading raises."""
    loaded = subprocess.run([sys.executable, "-c", "import sys, gpt1.cli; print('torch' in sys.modules)"],
                            capture_output=True, text=True, timeout=60)
    assert loaded.stdout.strip() == "False", loaded.stderr
    public: dict = {}
    exec("from gpt1 import *", public)  # the public names still load, on first use
    assert {"GPT", "LLM", "load", "Tokenizer", "Gpt1Error"} <= public.keys() and callable(public["load"])
    import gpt1.cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(gpt1.cli, "build_parser", interrupted)
    with pytest.raises(SystemExit) as exited:
        gpt1.cli.run()
    assert exited.value.code == 130 and capsys.readouterr().err.strip() == "gpt1: interrupted"


def test_info_of_a_file_or_a_missing_path_names_it_not_a_preset(tmp_path, capsys, monkeypatch):
    """Anything not a folder was taken for a preset name: "unknown model preset 'x.gguf'"."""
    from tests.test_battery import assert_one_clear_line, run_main

    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    for arg in (tmp_path / "model.gguf", "model.gguf"):
        assert_one_clear_line(*run_main(capsys, "info", arg), r"model\.gguf: a file, not a model directory$")
    assert_one_clear_line(*run_main(capsys, "info", "runs/no-such-run"), r"runs/no-such-run: model directory not found$")
    assert_one_clear_line(*run_main(capsys, "info", "gpt-5"), r"unknown model preset 'gpt-5'; known presets: gpt1, ")
    (tmp_path / "tiny").write_text("a file named as a preset")
    assert run_main(capsys, "info", "tiny")[0] == 0  # the preset's name still means the preset


def test_plot_of_two_metrics_files_in_one_folder_draws_two_named_rows(tmp_path, capsys, monkeypatch):
    """Rows were keyed by the file's folder name: a.jsonl and b.jsonl in one folder overwrote each
    other, one row titled ".: loss"."""
    from PIL import Image

    import gpt1.cli.plot_cmd as plot_cmd
    from tests.test_battery import run_main

    drawn = []
    real_plot_runs = plot_cmd.plot_runs
    monkeypatch.setattr(plot_cmd, "plot_runs", lambda runs, out: drawn.append(list(runs)) or real_plot_runs(runs, out))
    monkeypatch.chdir(tmp_path)
    for name in ("a.jsonl", "b.jsonl", "x/m.jsonl", "y/m.jsonl", "run/metrics.jsonl"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text('{"step": 1, "loss": 8.0, "val_loss": 8.5}\n{"step": 2, "loss": 7.0}\n')
    assert run_main(capsys, "plot", "a.jsonl", "--out", "one.png")[0] == 0
    assert run_main(capsys, "plot", "a.jsonl", "b.jsonl", "--out", "two.png")[0] == 0
    assert drawn[-1] == ["a", "b"] and Image.open("two.png").height == 2 * Image.open("one.png").height
    assert run_main(capsys, "plot", "x/m.jsonl", "y/m.jsonl", "run", "run/metrics.jsonl", "--out", "four.png")[0] == 0
    assert drawn[-1] == ["x/m.jsonl", "y/m.jsonl", "run", "run/metrics.jsonl"]


@pytest.mark.parametrize("first, last", [(400.0, 68.0), (294.0, 197.0), (3e4, 12.0)])
def test_the_perplexity_axis_has_labels_to_read_values_from(tmp_path, first, last):
    """A log axis over 400 -> 68 had one label (10^2), over 294 -> 197 two: no value could be read."""
    import math

    from gpt1.train.plot import _draw

    steps = range(0, 1100, 100)
    values = [math.log(first) + (math.log(last) - math.log(first)) * i / 10 for i in range(11)]
    (tmp_path / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "val_loss": {v}}}\n' for s, v in zip(steps, values)))
    fig = _draw({"run": tmp_path / "metrics.jsonl"})
    fig.canvas.draw()
    ax = fig.axes[1]
    low, high = ax.get_ylim()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text() and low <= t.get_position()[1] <= high]
    assert len(labels) >= 3, labels
    assert ax.get_yscale() == ("linear" if first < 10 * last else "log")


def test_help_says_a_default_once_and_only_when_it_tells_something():
    """`gpt1 eval --help` said "(default: the best available) (default: None)", and argparse's
    ArgumentDefaultsHelpFormatter adds "(default: None)" / "(default: False)" everywhere."""
    import argparse

    from gpt1.cli.args import DefaultsHelpFormatter

    parser = argparse.ArgumentParser(prog="x", formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the best available)")
    parser.add_argument("--field", default="text", help="the field")
    parser.add_argument("--fewshot", type=int, default=0, help="examples")
    parser.add_argument("--out", help="the output")
    parser.add_argument("--skip", action="store_true", help="skip bad lines")
    text = " ".join(parser.format_help().split())
    assert "(default: the best available) --field" in text and "the field (default: text)" in text
    assert "examples (default: 0)" in text and "(default: None)" not in text and "(default: False)" not in text


def test_a_text_flag_typed_in_utf8_under_a_c_locale_is_decoded():
    """Under LANG=C without UTF-8 mode Python holds a typed "héllo" as lone surrogates, which the
    tokenizer refuses; bytes that are not UTF-8 stay so, for the CLI to refuse naming the argument."""
    from gpt1.cli.args import text

    assert text("h\udcc3\udca9llo") == "héllo" and text("héllo") == "héllo" and text("caf\udce9") == "caf\udce9"
