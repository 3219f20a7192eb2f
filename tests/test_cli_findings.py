"""The command line as a whole (the exploratory pass of /tmp/explore/cli): outputs that are devices,
FIFOs or descriptors, an empty --api-key, Ctrl-C while torch loads, a parser that loads no torch,
error lines that name the command, --print-config's round trip, `plot --out -`, `gpt1` alone, and
how a boolean or a number is written."""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gpt1.cli import main
from gpt1.core.io import file_target, write_json
from tests.test_battery import assert_one_clear_line, run_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def gpt1(*args, cwd=None, stdout=subprocess.PIPE, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt1", *map(str, args)], stdout=stdout, stderr=subprocess.PIPE,
                          cwd=cwd, timeout=timeout, env={**os.environ, "GPT1_QUIET": "1"})


def _metrics(folder: Path) -> Path:
    """A run's metrics.jsonl, enough to plot (no training)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 - s, "val_loss": 5.5 - s}) + "\n"
                                                  for s in range(1, 4)))
    return folder


# ---- 1. an output that is a device, a FIFO or a descriptor is written into, not replaced ------------

def _private_null(folder: Path) -> Path:
    """A character device like /dev/null (1, 3), of our own: never the system's."""
    node = folder / "mynull"
    try:
        os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs CAP_MKNOD (root)")
    return node


def _read_fifo(fifo: Path) -> tuple[threading.Thread, list[bytes]]:
    got: list[bytes] = []

    def read() -> None:
        with open(fifo, "rb") as f:
            got.append(f.read())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader, got


def test_plot_and_eval_write_into_a_device_and_a_fifo_without_replacing_them(tmp_path, tiny_model_dir, data_dir,
                                                                               capsys):
    """`gpt1 plot base/ --out /dev/null` as root turned /dev/null into a 67 KB PNG (a temporary
    file renamed onto it); a FIFO became a plain file and its reader got nothing."""
    run = _metrics(tmp_path / "run")
    null = _private_null(tmp_path)
    assert run_main(capsys, "plot", run, "--out", null)[0] == 0
    assert run_main(capsys, "eval", "--model", tiny_model_dir, "--data", data_dir, "--max-batches", "1",
                    "--device", "cpu", "--json", null)[0] == 0
    assert null.is_char_device() and os.major(null.stat().st_rdev) == 1 and os.minor(null.stat().st_rdev) == 3

    fifo = tmp_path / "ff"
    os.mkfifo(fifo)
    reader, got = _read_fifo(fifo)
    assert run_main(capsys, "plot", run, "--out", fifo)[0] == 0
    reader.join(10)
    assert fifo.is_fifo() and got and got[0].startswith(PNG_MAGIC)
    reader, got = _read_fifo(fifo)
    assert run_main(capsys, "eval", "--model", tiny_model_dir, "--data", data_dir, "--max-batches", "1",
                    "--device", "cpu", "--json", fifo)[0] == 0
    reader.join(10)
    assert fifo.is_fifo() and set(json.loads(got[0])) >= {"loss", "perplexity", "bits_per_byte"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ff", "mynull", "run"]  # no temporary left


def test_bench_writes_one_document_into_a_fifo(tmp_path, monkeypatch, capsys):
    """`bench --json FILE` rewrites FILE after each benchmark: into a FIFO that was a first document,
    which ended its reader, then a write that waited for a reader forever. (Two benchmarks that
    answer at once: what is written is the point, not what they measure, ~35 s for real ones.)"""
    from tests.test_bench import _fake_benchmarks

    _fake_benchmarks(monkeypatch)
    fifo = tmp_path / "ff"
    os.mkfifo(fifo)
    reader, got = _read_fifo(fifo)
    rc, err = run_main(capsys, "bench", "--quick", "prepare", "threads", "--json", fifo)
    reader.join(10)
    assert rc == 0, err
    assert fifo.is_fifo() and list(json.loads(got[0])) == ["environment", "load_average", "prepare", "threads"]


def test_a_descriptor_path_is_written_into_the_open_file(tmp_path):
    """`--json >(jq .)` (bash's /dev/fd/63, a link to `pipe:[N]`) was "a link to pipe:[N], which
    does not exist"; `--json /dev/stdout > out.json` renamed a new file onto out.json, leaving the
    shell's descriptor on the old one."""
    read_end, write_end = os.pipe()
    try:
        path = f"/dev/fd/{write_end}"
        assert file_target(path) == Path(path)
        write_json(path, {"a": 1})
    finally:
        os.close(write_end)
    with os.fdopen(read_end) as f:
        assert json.loads(f.read()) == {"a": 1}

    out = tmp_path / "out.json"
    out.write_text("")
    inode = out.stat().st_ino
    fd = os.open(out, os.O_WRONLY)
    try:
        write_json(f"/dev/fd/{fd}", {"b": 2})
    finally:
        os.close(fd)
    assert out.stat().st_ino == inode and json.loads(out.read_text()) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


# ---- 2. an empty --api-key ------------------------------------------------------------------------

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


# ---- 3. Ctrl-C while torch loads ------------------------------------------------------------------

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


# ---- 4. the parser loads no torch -----------------------------------------------------------------

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


# ---- 5. error lines name the command they belong to -----------------------------------------------

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


# ---- 6. --print-config loads back ----------------------------------------------------------------

def test_print_config_of_text_outside_the_bmp_loads_back(tmp_path, capsys):
    """`init_from=runs/😀` was printed as "runs/\\ud83d\\ude00", which TOML refuses."""
    assert main(["pretrain", "--print-config", "init_from=runs/😀\x7f"]) == 0  # DEL: TOML wants it escaped
    printed = capsys.readouterr().out
    assert 'init_from = "runs/😀\\u007f"' in printed
    (tmp_path / "r.toml").write_text(printed, encoding="utf-8")
    assert main(["pretrain", "--config", str(tmp_path / "r.toml"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed


# ---- 7. plot --out - ------------------------------------------------------------------------------

def test_plot_out_dash_writes_the_png_to_stdout(tmp_path):
    """`--out -` wrote a file named `-`, where `eval --json -` and `bench --json -` mean stdout."""
    run = _metrics(tmp_path / "run")
    result = gpt1("plot", run, "--out", "-", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(PNG_MAGIC) and not (tmp_path / "-").exists()
    primary, secondary = pty.openpty()  # a terminal would show the bytes: refused
    try:
        result = gpt1("plot", run, "--out", "-", cwd=tmp_path, stdout=secondary)
    finally:
        os.close(primary)
        os.close(secondary)
    assert_one_clear_line(result.returncode, result.stderr.decode(), r"--out -: standard output is a terminal")
    assert b"(a name without a suffix: PNG); - writes the PNG to standard output" in \
        b" ".join(gpt1("plot", "--help").stdout.split())


# ---- 8. `gpt1` alone ------------------------------------------------------------------------------

def test_gpt1_without_a_command_is_a_usage_error_like_tokenizer_without_an_action():
    """`gpt1` printed the help to stdout and exited 1; `gpt1 tokenizer` was a usage error (2)."""
    for argv, line in ((["gpt1"], "gpt1: error: the following arguments are required: COMMAND (see gpt1 --help)"),
                       (["gpt1", "tokenizer"], "gpt1 tokenizer: error: the following arguments are required: ACTION "
                                               "(see gpt1 tokenizer --help)")):
        result = gpt1(*argv[1:])
        assert (result.returncode, result.stdout, result.stderr.decode().strip()) == (2, b"", line)


# ---- 9. how a boolean or a number is written ------------------------------------------------------

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


# ---- pass 17 (/tmp/explore/f17/cli) ---------------------------------------------------------------

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


def test_eval_samples_and_report_dash_write_to_stdout_and_export_refuses_it(tmp_path, tiny_model_dir, capsys,
                                                                            monkeypatch):
    """`--json -` and `plot --out -` meant stdout, but `eval --samples -`, `--report -` and
    `export --out -` wrote a file named `-` in the current folder."""
    from tests.task_files import piqa, write_jsonl

    monkeypatch.chdir(tmp_path)
    task = write_jsonl(tmp_path / "piqa.jsonl", [piqa(i) for i in range(3)])
    argv = ["eval", "--model", tiny_model_dir, "--task", "piqa", "--data", task, "--device", "cpu"]
    assert main([*map(str, argv), "--samples", "-"]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line)["task"] for line in out.splitlines()] == ["piqa"] * 3
    assert "| piqa " in err  # the table, to stderr: stdout holds the samples only
    assert main([*map(str, argv), "--report", "-", "--json", "scores.json"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"# Evaluation of `{tiny_model_dir}`") and "## Tasks" in out and "report:" not in err
    assert set(json.loads((tmp_path / "scores.json").read_text())) == {"piqa"}
    for outputs in (["--json", "-", "--samples", "-"], ["--json", "--report", "-"], ["--samples", "-", "--report", "-"]):
        assert_one_clear_line(*run_main(capsys, *argv, *outputs), r"both write to standard output \(-\); give all "
                                                                  r"but one of them a PATH")
    assert_one_clear_line(*run_main(capsys, "export", "--model", tiny_model_dir, "--out", "-", "--format", "gguf"),
                          r"^gpt1 export: error: --out -: a GGUF or HF export is written to files, not to standard "
                          r"output; name a path$")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["piqa.jsonl", "scores.json"]  # no file named "-"



@pytest.mark.parametrize("argv", [["tokenizer", "train", "x.txt"], ["prepare", "--tokenizer", "t", "x.txt"],
                                  ["pretrain", "--data", "d"], ["finetune", "--base", "b"], ["quickstart"]])
def test_an_output_folder_of_dash_is_refused(tmp_path, capsys, monkeypatch, argv):
    """`-` is standard output to `eval --json` and `plot --out`; as an output folder it made a folder
    named `-` in the current one (found by the pass-17 CLI tester, left after the export fix)."""
    monkeypatch.chdir(tmp_path)
    rc, err = run_main(capsys, *argv, "--out", "-")
    assert rc == 2 and "argument --out: '-' is standard output elsewhere; this output is a folder: name one" in err, err
    assert list(tmp_path.iterdir()) == []

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


@pytest.mark.slow
@pytest.mark.parametrize("env", [{"NO_COLOR": "1", "TERM": "xterm"}, {"TERM": "dumb"}])
def test_serve_on_a_terminal_writes_plain_lines_when_asked(tiny_model_dir, env):
    """uvicorn coloured its lines on a terminal despite NO_COLOR=1 or TERM=dumb (which shows the
    escapes as text). uvicorn asks whether stdout is a terminal."""
    primary, secondary = pty.openpty()
    environ = {key: value for key, value in os.environ.items() if key not in ("NO_COLOR", "GPT1_QUIET")}
    proc = subprocess.Popen([sys.executable, "-m", "gpt1", "serve", "--model", str(tiny_model_dir), "--port", "0",
                             "--device", "cpu"], stdout=secondary, stderr=subprocess.PIPE, env={**environ, **env})
    os.close(secondary)
    timer = threading.Timer(120, proc.kill)
    timer.start()
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if b"Application startup complete" in line:
                break
    finally:
        timer.cancel()
        proc.terminate()
        proc.wait(30)
        os.close(primary)
    assert any(b"INFO:     Application startup complete" in line for line in lines), lines
    assert not any(b"\x1b[" in line for line in lines), lines
