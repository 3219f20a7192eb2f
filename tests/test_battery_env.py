"""The bad-input battery, for what surrounds a command rather than its input: a full disk or a
file-size limit, standard streams that are closed, full or gone, an encoding that cannot hold the
output, torchrun variables left in the environment. Each ends in one line on stderr (or quietly,
where nothing went wrong but the reader left), never a traceback. Real processes: these are
about the process itself."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gpt1.cli import main
from tests.test_battery import assert_one_clear_line, run_main

TRAIN = ["model=tiny", "block_size=32", "batch_size=2", "device=cpu", "eval_batches=1"]


def gpt1(*args, env: dict | None = None, file_size: int | None = None, close: int | None = None,
         stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    """`python -m gpt1 ARGS`; with `file_size`, under that limit (`ulimit -f`: a write past it fails
    with EFBIG, as SIGXFSZ is ignored); with `close`, that descriptor closed (`1>&-`, `2>&-`)."""
    def limit():
        if file_size is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
        if close is not None:
            os.close(close)

    return subprocess.run([sys.executable, "-m", "gpt1", *map(str, args)], stdout=stdout, stderr=subprocess.PIPE,
                          env={**os.environ, "GPT1_QUIET": "1", **(env or {})}, preexec_fn=limit, timeout=300)


# ---- a full disk, a file-size limit ---------------------------------------------------------

@pytest.mark.slow
def test_a_file_size_limit_is_one_line_naming_the_file(tokenizer_dir, tiny_model_dir, corpus_dir, tmp_path):
    """Tracebacks: safetensors' SafetensorError (export), numpy's OSError without errno (gguf,
    prepare), EFBIG not counted as a failed write (tokenizer train, which left an empty --out)."""
    cases = [  # (argv, the limit in bytes, the line)
        (["export", "--model", tiny_model_dir, "--out", tmp_path / "hf"], 8192,
         r"hf/model.safetensors: cannot write \(File too large\); raise the file-size limit"),
        (["export", "--model", tiny_model_dir, "--out", tmp_path / "m.gguf", "--format", "gguf"], 100_000,  # in the tensors
         r"m.gguf: cannot write \(the disk is full or a file-size limit was reached\)"),
        (["prepare", "--tokenizer", tokenizer_dir, "--out", tmp_path / "data", corpus_dir / "json"], 8192,
         r"data/train.bin.partial: cannot write \(the disk is full or a file-size limit was reached\)"),
        (["tokenizer", "train", "--vocab-size", "300", "--out", tmp_path / "new" / "tok", corpus_dir / "json"], 8192,
         r"new/tok/tokenizer.json: cannot write \(File too large\)"),
    ]
    for argv, limit, pattern in cases:
        result = gpt1(*argv, file_size=limit)
        assert_one_clear_line(result.returncode, result.stderr.decode(), pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # a resumable prepare; no temps, no empty new/


@pytest.mark.slow
def test_a_checkpoint_past_the_file_size_limit_is_one_line_and_the_last_one_stays(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["pretrain", "--data", data_dir, "--out", run, *TRAIN, "max_steps=4", "save_every=2"]
    assert gpt1(*args, env={"GPT1_CRASH_AT": "before-outputs:1"}).returncode == 137  # stopped after step 2's save
    result = gpt1(*args, file_size=64 * 1024)
    assert_one_clear_line(result.returncode, result.stderr.decode(),
                          r"run/checkpoints/.step-00000004.tmp/trainable.safetensors: cannot write \(File too large\)")
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".lock", "step-00000002"]  # the failed save's temp is gone
    assert run_main(capsys, *args)[0] == 0  # the rerun (no limit: in-process) resumes from step 2


# ---- standard streams ------------------------------------------------------------------------

@pytest.mark.slow
def test_stdout_whose_reader_is_gone_ends_quietly(tiny_model_dir):
    """`gpt1 info DIR | head -1` and `gpt1 generate ... | head -c 20`: a BrokenPipeError traceback
    and exit code 1 (the OSError handler re-raised EPIPE before the BrokenPipeError one)."""
    generate = ["generate", "--model", tiny_model_dir, "--prompt", "def", "--max-new-tokens", "20", "--seed", "1"]
    for argv in (["info", tiny_model_dir], generate):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the first write: no race with it
        try:
            result = gpt1(*argv, stdout=write)
        finally:
            os.close(write)
        # No traceback, and no complaint from the flush at exit either ("Exception ignored ...").
        assert result.returncode == 128 + signal.SIGPIPE and result.stderr.decode().strip() == "", result.stderr


@pytest.mark.slow
def test_closed_stdout_or_stderr_and_a_full_stdout(tiny_model_dir, capsys):
    """`1>&-` was an AttributeError on None; `2>&-` sent the log lines into stdout, between the
    generated text (tqdm writes to stdout when stderr is None); `> /dev/full` said "a file:
    cannot write ...; choose a writable --out"."""
    generate = ["generate", "--model", tiny_model_dir, "--prompt", "def", "--max-new-tokens", "5", "--seed", "1"]
    closed_stdout = gpt1(*generate, close=1, stdout=None)  # its product is stdout: refused up front (test_env_findings.py)
    assert_one_clear_line(closed_stdout.returncode, closed_stdout.stderr.decode(),
                          r"standard output is closed \(started with >&-\), and this command writes the generated text there")
    assert main([str(a) for a in generate]) == 0  # the text with both streams open: in-process, the same numbers
    text = capsys.readouterr().out.encode()
    closed_stderr = gpt1(*generate, close=2)
    assert closed_stderr.returncode == 0 and closed_stderr.stdout == text and b"prompt tokens" not in text
    if Path("/dev/full").exists():
        with open("/dev/full", "wb") as full:
            result = gpt1(*generate, stdout=full)
        line = assert_one_clear_line(result.returncode, result.stderr.decode(),
                                     r"^gpt1 generate: error: standard output: cannot write \(No space left on device\)$")
        assert "--out" not in line


@pytest.mark.slow
def test_output_the_encoding_cannot_hold_is_escaped_and_utf8_arguments_are_taken(tiny_model_dir, tmp_path):
    """PYTHONIOENCODING=ascii: the export finished, then printing its path raised
    UnicodeEncodeError (exit 1). LANG=C without UTF-8 mode: valid UTF-8 arguments were "not valid
    UTF-8"; they reach the OS as the same bytes, and the path printed is those bytes."""
    out = tmp_path / "exp ☃"
    result = gpt1("export", "--model", tiny_model_dir, "--out", out, env={"PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0 and result.stdout.decode("ascii").strip().endswith("exp \\u2603"), result.stderr
    c_locale = {"LANG": "C", "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}
    again = gpt1("export", "--model", tiny_model_dir, "--out", tmp_path / "né ☃", env=c_locale)
    assert again.returncode == 0 and again.stdout.decode("utf-8").strip() == str(tmp_path / "né ☃"), again.stderr
    assert (tmp_path / "né ☃" / "model.safetensors").is_file() and (out / "model.safetensors").is_file()
    bad = gpt1("info", os.fsdecode(b"caf\xe9"), env=c_locale)
    assert_one_clear_line(bad.returncode, bad.stderr.decode(), r"argument model: not valid UTF-8 \(byte b'\\xe9' at byte 3\)")


# ---- torchrun's variables outside torchrun -----------------------------------------------------

@pytest.mark.parametrize("env, pattern", [
    ({"WORLD_SIZE": "2"}, r"sets WORLD_SIZE=2 but not RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, which torchrun sets"),
    ({"RANK": "1"}, r"sets RANK=1 but not LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.*unset RANK to run as one"),
    ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"},
     r"RANK=2, .*: expected 0 <= RANK < WORLD_SIZE"),
    ({"RANK": "one", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"},
     r"RANK=one, .*: RANK, LOCAL_RANK and WORLD_SIZE must be whole numbers"),
])
def test_stale_torchrun_variables_are_one_line(data_dir, tmp_path, monkeypatch, capsys, env, pattern):
    """WORLD_SIZE=2 alone was torch's traceback ("environment variable RANK expected"); RANK=1
    alone dropped the `model:` line silently, as if this were rank 1 of a torchrun launch."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    rc, err = run_main(capsys, "pretrain", "--data", data_dir, "--out", tmp_path / "run", *TRAIN, "max_steps=1")
    assert_one_clear_line(rc, err, pattern)
    assert not (tmp_path / "run").exists()
