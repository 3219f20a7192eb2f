"""The process's surroundings: a locale that is not UTF-8, standard streams that are
closed, full or opened the wrong way, a current folder that was deleted, a hub that cannot be
reached. Real processes where the finding is about the process itself; each ends in one line on
stderr, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpt1.cli import main
from gpt1.core.tokenizer import Tokenizer
from tests.test_battery import assert_one_clear_line, run_main

# Python's own UTF-8 mode turned off under the C locale: argv and file names are ASCII to it, and
# the bytes of "é" are two lone surrogates (the tester's environment).
C_LOCALE = {"LANG": "C", "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}


def gpt1(*args, env: dict | None = None, close: tuple[int, ...] = (), then=None, **kwargs) -> subprocess.CompletedProcess:
    """`python -m gpt1 ARGS`, its stdout and stderr captured (unless given), the descriptors in
    `close` shut, and `then()` called in the child before it starts."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)

    def shut():
        for fd in close:
            os.close(fd)
        if then is not None:
            then()

    return subprocess.run([sys.executable, "-m", "gpt1", *map(os.fsdecode, args)], preexec_fn=shut, timeout=300,
                          env={**os.environ, "GPT1_QUIET": "1", **(env or {})}, **kwargs)


# ---- 1. a folder name that is not text to Python ---------------------------------------------

def test_a_tokenizer_in_a_folder_whose_name_python_holds_as_surrogates_loads(tokenizer_dir, tmp_path):
    """Tokenizer.load gave str(file) to the Rust from_file, which needs UTF-8 text: "surrogates not
    allowed" for "é" under LANG=C (Python holds its two bytes as lone surrogates) and for a name
    of other bytes in any locale."""
    for name in (b"bas\xc3\xa9", b"bad\xff"):
        folder = tmp_path / os.fsdecode(name)
        shutil.copytree(tokenizer_dir, folder)
        held = tmp_path / name.decode("ascii", errors="surrogateescape")  # as Python holds it under LANG=C: "é" too
        assert "\udcc3" in str(held) or "\udcff" in str(held)
        assert Tokenizer.load(held).encode("déjà vu") == Tokenizer.load(tokenizer_dir).encode("déjà vu")


@pytest.mark.slow
def test_a_model_in_a_non_ascii_folder_generates_under_a_locale_that_is_not_utf8(tiny_model_dir, tmp_path, capsys):
    probe = subprocess.run([sys.executable, "-c", "import sys; print(sys.flags.utf8_mode, sys.getfilesystemencoding())"],
                           capture_output=True, text=True, env={**os.environ, **C_LOCALE}, check=True)
    if probe.stdout.split() != ["0", "ascii"]:
        pytest.skip(f"this Python runs LC_ALL=C in UTF-8 mode ({probe.stdout.strip()})")
    shutil.copytree(tiny_model_dir, tmp_path / "basé")
    argv = ["generate", "--model", tmp_path / "basé", "--prompt", "def", "--max-new-tokens", "4", "--seed", "1"]
    result = gpt1(*argv, env=C_LOCALE)
    assert result.returncode == 0, result.stderr  # was "basé/tokenizer.json: not a valid tokenizer.json"
    # The same text as under a UTF-8 locale (this process's), what ASCII cannot hold escaped (cli._unencodable_output).
    assert main(list(map(str, argv))) == 0
    assert result.stdout == capsys.readouterr().out.encode("ascii", "backslashreplace") != b""


# ---- 2. help and --version on a stdout that cannot be written --------------------------------

@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_help_and_version_on_a_full_stdout_are_one_line():
    """argparse dropped the failed write: exit 0 with nothing written, where --print-config said so."""
    for argv, command in ((["--help"], "gpt1"), (["--version"], "gpt1"), (["pretrain", "--help"], "gpt1 pretrain"),
                          (["tokenizer", "train", "--help"], "gpt1 tokenizer train")):
        with open("/dev/full", "wb") as full:
            result = gpt1(*argv, stdout=full)
        assert result.returncode == 2 and result.stderr.decode() == \
            f"{command}: error: standard output: cannot write (No space left on device)\n", (argv, result.stderr)
    read, write = os.pipe()
    os.close(read)  # `gpt1 --help | head -c1`: a reader gone is no error
    try:
        result = gpt1("--help", stdout=write)
    finally:
        os.close(write)
    assert result.returncode == 0 and result.stderr == b"", result.stderr


# ---- 3. a stdin that cannot be read ----------------------------------------------------------

@pytest.mark.slow
def test_a_stdin_opened_write_only_is_one_line(tiny_model_dir):
    """`0>/dev/null`: reading it fails with EBADF, which was a traceback in generate and chat."""
    for command in ("generate", "chat"):
        with open(os.devnull, "w") as write_only:
            result = gpt1(command, "--model", tiny_model_dir, "--max-new-tokens", "2", stdin=write_only)
        assert_one_clear_line(result.returncode, result.stderr.decode(),
                              rf"^gpt1 {command}: error: standard input: cannot read \(Bad file descriptor\)$")


# ---- 4. a current folder that was deleted ----------------------------------------------------

def test_a_deleted_current_folder_is_one_line(tmp_path):
    """`gpt1 plot` was a FileNotFoundError traceback from Path.resolve, and every command that
    imports torch died in MKL ("Cannot load libtorch_cpu.so"), absolute paths or not."""
    gone = tmp_path / "gone"
    for argv in (["info", "tiny"], ["plot", tmp_path / "run", "--out", tmp_path / "p.png"]):
        gone.mkdir()
        result = gpt1(*argv, cwd=gone, then=lambda: os.rmdir(gone))  # run in it, then deleted
        assert_one_clear_line(result.returncode, result.stderr.decode(),
                              r"the current folder no longer exists \(No such file or directory\); cd to an existing folder")
    gone.mkdir()
    assert gpt1("--help", cwd=gone, then=lambda: os.rmdir(gone)).returncode == 0  # no folder needed


# ---- 5. closed standard streams take their own descriptors -----------------------------------

@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_closed_standard_streams_are_dev_null_on_their_own_descriptors(tmp_path):
    """`<&- >&- 2>&-`: the stand-ins were opened at the lowest free descriptors, so fd 2 became
    the next file opened (a run's checkpoints/.lock, the server's socket: what C code writes to
    stderr went into it), and a child (serve --engine process) started with fds 1 and 2 closed."""
    report, child_report = tmp_path / "parent.json", tmp_path / "child.json"
    links = "[os.readlink(f'/proc/self/fd/{fd}') for fd in (0, 1, 2)]"
    script = textwrap.dedent(f"""
        import json, os, subprocess, sys
        from gpt1.cli import main
        try:
            main(["--version"])
        except SystemExit:
            pass
        child = "import json, os, sys; json.dump({links}, open(sys.argv[1], 'w'))"
        subprocess.run([sys.executable, "-c", child, {str(child_report)!r}])  # fds 0, 1, 2 inherited
        with open({str(report)!r}, "w") as f:
            json.dump({{"next_fd": f.fileno(), "links": {links}}}, f)
    """)
    subprocess.run([sys.executable, "-c", script], preexec_fn=lambda: [os.close(fd) for fd in (0, 1, 2)], timeout=120)
    assert json.loads(report.read_text()) == {"next_fd": 3, "links": ["/dev/null"] * 3}
    assert json.loads(child_report.read_text()) == ["/dev/null"] * 3


# ---- 6. a product written to a closed stdout -------------------------------------------------

@pytest.mark.slow
def test_a_command_whose_product_is_stdout_refuses_a_closed_one(tiny_model_dir, tmp_path):
    """`generate >&-` and `plot --out - >&-` did the work, dropped it and exited 0 ("wrote the PNG
    to standard output"). Commands that only report on stdout run on."""
    line = r"standard output is closed \(started with >&-\), and this command writes {} there; redirect it to a file"
    result = gpt1("generate", "--model", tiny_model_dir, "--prompt", "def", close=(1,), stdout=None)
    assert_one_clear_line(result.returncode, result.stderr.decode(), line.format("the generated text"))
    result = gpt1("plot", tmp_path / "run", "--out", "-", close=(1,), stdout=None)
    assert_one_clear_line(result.returncode, result.stderr.decode(), line.format(r"the image \(--out -\)"))
    chat = gpt1("chat", "--model", tiny_model_dir, "--max-new-tokens", "2", stdin=subprocess.DEVNULL, close=(1,), stdout=None)
    assert chat.returncode == 0, chat.stderr


# ---- 7. a hub that cannot be reached ---------------------------------------------------------

@pytest.mark.slow
def test_a_dataset_the_hub_cannot_give_names_the_way_round(tiny_model_dir, tokenizer_dir, tmp_path):
    """`Couldn't reach 'allenai/ai2_arc' on the Hub` named neither the local task files nor the
    cache. HF_HUB_OFFLINE=1 and an empty cache: the same error, without the network's retries."""
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = gpt1("eval", "--model", tiny_model_dir, "--task", "arc_easy", "--limit", "2", env=offline)
    assert_one_clear_line(result.returncode, result.stderr.decode(),
                          r"Couldn't reach 'allenai/ai2_arc' .*HF_HUB_OFFLINE is set and the Hugging Face cache holds "
                          r"no copy of it: pass the task's documents as a local file: --data arc_easy=FILE.jsonl "
                          r"\(docs/evaluation.md")
    result = gpt1("prepare", "--tokenizer", tokenizer_dir, "--out", tmp_path / "d", "hf:gpt1-tests/not-cached", env=offline)
    assert_one_clear_line(result.returncode, result.stderr.decode(),
                          r"HF_HUB_OFFLINE is set .*: pass the data as local files")


# ---- 8. an argument that is not UTF-8 --------------------------------------------------------

def test_an_argument_that_is_not_utf8_is_named_by_its_flag(tiny_model_dir, tokenizer_dir, tmp_path, capsys):
    """It was "argument 3 is not valid UTF-8": a position to count, not the flag."""
    bad = os.fsdecode(b"caf\xe9")  # as Python holds the byte
    cases = [(["generate", "--model", tiny_model_dir, "--prompt", bad], r"argument --prompt: not valid UTF-8 \(byte b'\\xe9' at byte 3\)"),
             (["generate", "--model", f"{tiny_model_dir}{bad}"], r"argument --model: not valid UTF-8"),
             (["prepare", "--tokenizer", tokenizer_dir, "--out", tmp_path / "d", bad], r"argument SOURCE: not valid UTF-8"),
             (["pretrain", "--data", tmp_path, "--out", tmp_path / "r", f"init_from={bad}"],
              r"argument KEY=VALUE: not valid UTF-8 \(byte b'\\xe9' at byte 13\)")]
    for argv, pattern in cases:
        assert_one_clear_line(*run_main(capsys, *argv), pattern)
    assert not (tmp_path / "d").exists() and not (tmp_path / "r").exists()
