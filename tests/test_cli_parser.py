"""The command line's parser and start: a parser that loads no torch (and whose copies of
constants match their homes), Ctrl-C while torch loads, error lines that name the command,
`gpt1` alone, an empty --api-key refused before binding, --print-config's round trip, how a
boolean or a number is written, repeated flags that add up, a path flag written with `=`, and a
recipe key written as a flag."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from gpt1.cli import main
from tests.test_battery import assert_one_clear_line, run_main


def gpt1(*args, cwd=None, stdout=subprocess.PIPE, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt1", *map(str, args)], stdout=stdout, stderr=subprocess.PIPE,
                          cwd=cwd, timeout=timeout, env={**os.environ, "GPT1_QUIET": "1"})


# ---- an empty --api-key ------------------------------------------------------------------------

def test_serve_refuses_an_empty_api_key_before_binding(tiny_model_dir):
    """`--api-key "$KEY"` with KEY unset served with no key check (and no warning on 0.0.0.0) to a
    chat page that asked for a key."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.perf_counter()
    result = gpt1("serve", "--model", tiny_model_dir, "--host", "127.0.0.1", "--port", port, "--api-key", "",
                  timeout=60)
    assert result.returncode == 2 and time.perf_counter() - start < 30
    assert_one_clear_line(2, result.stderr.decode(),
                          r"^gpt1 serve: error: argument --api-key: is empty \(an unset shell variable\?\); "
                          "leave the flag out to serve without a key")
    with socket.socket() as free:  # nothing was bound
        free.bind(("127.0.0.1", port))


# ---- Ctrl-C while torch loads ------------------------------------------------------------------

# numpy imports this module from inside its C extension's import, which loses an exception raised
# there: a Ctrl-C at that moment was dropped (the command ran, exit 0), and at numpy._core.printoptions
# it became "ImportError: cannot load module more than once per process".
INTERRUPTED_IMPORT = """
import importlib.abc, os, signal, sys

MODULE = sys.argv[1]

class CtrlC(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == MODULE:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlC())
sys.argv = ["gpt1", "info", "tiny"]
from gpt1.cli import run
run()
"""


@pytest.mark.parametrize("module", ["numpy._core.memmap", "numpy._core.printoptions"])
def test_a_ctrl_c_while_torch_loads_exits_130_every_time(module):
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pytest.skip(f"this numpy has no {module}")
    # Started as a terminal starts a command, with Ctrl-C's default action: a background job of a
    # non-interactive shell (`pytest ... &`, as a CI script may run it) inherits SIGINT ignored.
    result = subprocess.run([sys.executable, "-c", INTERRUPTED_IMPORT, module], capture_output=True, text=True,
                            timeout=120, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert result.returncode == 130, result.stderr
    assert result.stdout == "" and result.stderr.strip() == "gpt1 info: interrupted"


# ---- the parser loads no torch -----------------------------------------------------------------

def test_building_the_parser_loads_no_torch_and_help_answers():
    """`gpt1 --help`, `--version` and every usage error imported torch (2-4 s)."""
    loaded = subprocess.run([sys.executable, "-c", "import sys; from gpt1.cli import build_parser; build_parser(); "
                             "print('torch' in sys.modules)"], capture_output=True, text=True, timeout=60)
    assert loaded.stdout.strip() == "False", loaded.stderr
    shown = gpt1("--help")
    assert shown.returncode == 0 and b"quickstart" in shown.stdout and b"serve" in shown.stdout
    assert gpt1("--version").stdout.startswith(b"gpt1 ")


def test_the_parsers_copies_of_constants_match_their_homes():
    """The constants the parsers show are copied from modules that load torch: kept equal here."""
    from gpt1.cli import args, export_cmd, quickstart_cmd
    from gpt1.formats.gguf import GGUF_TYPES
    from gpt1.inference.llm import DTYPES
    from gpt1.quickstart import QuickstartConfig

    assert args.DTYPES == tuple(DTYPES) and export_cmd.GGUF_TYPES == GGUF_TYPES
    defaults = QuickstartConfig()
    assert vars(quickstart_cmd.DEFAULTS) == {k: getattr(defaults, k) for k in ("out", "minutes", "device", "seed")}


# ---- error lines name the command they belong to -----------------------------------------------

def test_errors_name_the_subcommand_and_tokenizer_train_checks_before_it_announces(tmp_path):
    """`gpt1 pretrain --bogus` said `gpt1: error: ... (see gpt1 --help)`; `tokenizer train` errors
    had two prefixes, and a refused --vocab-size was first announced as being trained."""
    result = gpt1("pretrain", "--bogus")
    assert result.returncode == 2 and result.stderr.decode().strip() == \
        "gpt1 pretrain: error: unrecognized arguments: --bogus (see gpt1 pretrain --help)"
    (tmp_path / "a.txt").write_text("hello")
    for size, why in (("100", "too small"), ("70000", "too large")):
        result = gpt1("tokenizer", "train", "--vocab-size", size, "--out", tmp_path / "tok", tmp_path / "a.txt")
        assert_one_clear_line(result.returncode, result.stderr.decode(),
                              rf"^gpt1 tokenizer train: error: vocab size {size} is {why}")
        assert "training a" not in result.stderr.decode()
    result = gpt1("tokenizer", "train", "--bogus", "--out", tmp_path / "tok", tmp_path / "a.txt")
    assert result.stderr.decode().strip().startswith("gpt1 tokenizer train: error: unrecognized arguments: --bogus")


# ---- --print-config loads back ----------------------------------------------------------------

def test_print_config_of_text_outside_the_bmp_loads_back(tmp_path, capsys):
    """`init_from=runs/😀` was printed as "runs/\\ud83d\\ude00", which TOML refuses."""
    assert main(["pretrain", "--print-config", "init_from=runs/😀\x7f"]) == 0  # DEL: TOML wants it escaped
    printed = capsys.readouterr().out
    assert 'init_from = "runs/😀\\u007f"' in printed
    (tmp_path / "r.toml").write_text(printed, encoding="utf-8")
    assert main(["pretrain", "--config", str(tmp_path / "r.toml"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed


# ---- `gpt1` alone ------------------------------------------------------------------------------

def test_gpt1_without_a_command_is_a_usage_error_like_tokenizer_without_an_action():
    """`gpt1` printed the help to stdout and exited 1; `gpt1 tokenizer` was a usage error (2)."""
    for argv, line in ((["gpt1"], "gpt1: error: the following arguments are required: COMMAND (see gpt1 --help)"),
                       (["gpt1", "tokenizer"], "gpt1 tokenizer: error: the following arguments are required: ACTION "
                                               "(see gpt1 tokenizer --help)")):
        result = gpt1(*argv[1:])
        assert (result.returncode, result.stdout, result.stderr.decode().strip()) == (2, b"", line)


# ---- how a boolean or a number is written ------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("compile=True", "key 'compile' expects bool, got 'True' (true or false: TOML, lower case)"),
    ("compile=1", "key 'compile' expects bool, got 1 (true or false: TOML, lower case)"),
    ("lr=.5", "key 'lr' expects float, got '.5' (a TOML number such as 0.5)"),
    ("max_steps=2.5", "key 'max_steps' expects int, got 2.5 (a whole number such as 100)"),
    # pydantic's "(Field required)" of a betas one number short
    ("betas=[0.9]", "key 'betas' expects tuple[float, float], got [0.9] (an array of exactly 2 numbers)"),
    ("betas=[0.9, 0.95, 0.99]", "key 'betas' expects tuple[float, float], got [0.9, 0.95, 0.99] (an array of exactly "
                                "2 numbers)"),
])
def test_a_wrong_type_says_how_to_write_the_value(capsys, override, message):
    line = assert_one_clear_line(*run_main(capsys, "pretrain", "--print-config", override))
    assert line == f"gpt1 pretrain: error: override {override!r}: {message}"


# ---- repeated flags, paths and recipe keys as typed -----------------------------------------------

def test_eval_data_and_ppl_data_repeated_add_their_sources(tmp_path, tiny_model_dir, corpus_dir, capsys):
    """`eval --data A --data B` scored only B (nargs="+" keeps the last flag's list), exit 0; in task
    mode `--data piqa=... --data arc_easy=...` dropped piqa's file and then asked for it."""
    from tests.task_files import arc, piqa, write_jsonl

    a, b = corpus_dir / "json" / "decoder.py", corpus_dir / "json" / "encoder.py"
    scores = []
    for data in (["--data", a, b], ["--data", a, "--data", b]):
        assert main([str(a) for a in ["eval", "--model", tiny_model_dir, *data, "--device", "cpu", "--json", "-"]]) == 0
        scores.append(json.loads(capsys.readouterr().out))
    assert scores[0] == scores[1] and scores[1]["source"] == f"{a}, {b}"
    piqa_file = write_jsonl(tmp_path / "piqa.jsonl", [piqa(i) for i in range(3)])
    arc_file = write_jsonl(tmp_path / "arc.jsonl", [arc(i) for i in range(3)])
    report = tmp_path / "report.md"
    code, err = run_main(capsys, "eval", "--model", tiny_model_dir, "--task", "piqa,arc_easy", "--device", "cpu",
                         "--data", f"piqa={piqa_file}", "--data", f"arc_easy={arc_file}", "--json", tmp_path / "r.json",
                         "--report", report, "--ppl-data", a, "--ppl-data", b)
    assert code == 0, err
    assert set(json.loads((tmp_path / "r.json").read_text())) == {"piqa", "arc_easy"}
    assert f"| {a}, {b} |" in report.read_text()  # the perplexity row: both --ppl-data sources


def test_finetune_help_examples_typed_as_shown_are_accepted(capsys):
    """`lora_targets=["q","v"]` unquoted in --help: typed as shown, bash strips the quotes and the
    override (lora_targets=[q,v]) is refused."""
    import re
    import shlex

    from gpt1.cli.finetune_cmd import RECIPE_KEYS

    shown = " ".join(gpt1("finetune", "--help").stdout.decode().split())
    examples = [word for match in re.findall(r"'[a-z_]+=[^']*'|\b[a-z_]+=[^\s;,]+", shown)
                for word in shlex.split(match)  # as a shell passes each to gpt1
                if word.partition("=")[0] in RECIPE_KEYS]  # not "overridden as key=value"
    assert {e.partition("=")[0] for e in examples} >= {"max_steps", "lora_r", "lora_targets", "languages", "all_paths"}
    assert main(["finetune", *examples, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert 'lora_targets = ["q", "v"]' in printed and 'languages = ["en", "de"]' in printed


def test_a_path_flag_written_with_an_equals_sign_expands_the_home_folder(tmp_path, corpus_dir, monkeypatch, capsys):
    """The shell expands `--out ~/x` but not `--out=~/x`: a folder named `~` appeared in the current one."""
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "here").mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path / "here")
    assert main(["tokenizer", "train", "--vocab-size", "300", "--out=~/tok", str(corpus_dir / "json")]) == 0
    assert (home / "tok" / "tokenizer.json").is_file() and list((tmp_path / "here").iterdir()) == []
    capsys.readouterr()
    for data, expanded in (("~/chats.jsonl", f"{home}/chats.jsonl"), ("hf:~/chats", f"hf:{home}/chats")):
        assert main(["finetune", f"--data={data}", "--print-config"]) == 0
        assert f'data = "{expanded}"' in capsys.readouterr().out


@pytest.mark.parametrize("argv, hint", [
    (["pretrain", "--device", "cpu"], "--device (a recipe key: write device=cpu)"),
    (["pretrain", "--max-steps=5", "--bogus"], "--max-steps=5 --bogus (a recipe key: write max_steps=5)"),
    (["finetune", "--lora_r", "16", "--device"], "--lora_r --device (recipe keys: write lora_r=16 device=VALUE)"),
])
def test_a_recipe_key_written_as_a_flag_is_told_how_to_write_it(capsys, argv, hint):
    """`gpt1 pretrain --device cpu` said only `unrecognized arguments: --device`."""
    line = assert_one_clear_line(*run_main(capsys, *argv))
    assert line == f"gpt1 {argv[0]}: error: unrecognized arguments: {hint} (see gpt1 {argv[0]} --help)"


def test_the_recipe_keys_the_parsers_know_are_the_configs_fields():
    """Copied from the configs (which load torch) so that a mistyped flag answers at once."""
    import dataclasses

    from gpt1.cli import finetune_cmd, pretrain_cmd
    from gpt1.train.config import TrainConfig
    from gpt1.train.finetune import FinetuneConfig

    assert pretrain_cmd.RECIPE_KEYS == tuple(f.name for f in dataclasses.fields(TrainConfig))
    assert set(finetune_cmd.RECIPE_KEYS) == {f.name for f in dataclasses.fields(FinetuneConfig)} - \
        set(finetune_cmd.PRETRAINING_KEYS)
