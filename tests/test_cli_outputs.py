"""Where the command line writes: an output that is a device, a FIFO or a descriptor is written
into, not replaced; `plot --out -`, `eval --samples -` and `--report -` write to stdout, and an
output folder of `-` is refused; `gpt1 serve` on a terminal writes plain lines when asked
(NO_COLOR, TERM=dumb)."""

from __future__ import annotations

import json
import os
import pty
import stat
import subprocess
import sys
import threading
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


# ---- an output that is a device, a FIFO or a descriptor is written into, not replaced ------------

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


# ---- plot --out - ------------------------------------------------------------------------------

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


# ---- `-` for stdout: eval's samples and report; no output folder ------------------------------
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


# ---- serve's log lines on a terminal ----------------------------------------------------------
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
