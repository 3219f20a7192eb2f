"""The command line for the core library: real subprocesses, checking exit codes and stderr."""

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
    assert "parameters: 257,525,760" in result.stdout


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


def test_gpt1_debug_prints_the_traceback_and_the_same_line(tmp_path):
    import os

    plain = gpt1("info", "gpt-5")
    debug = gpt1("info", "gpt-5", env={**os.environ, "GPT1_DEBUG": "1"})
    assert plain.returncode == debug.returncode == 2
    assert "Traceback" not in plain.stderr and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.splitlines()[-1] == plain.stderr.splitlines()[-1]
