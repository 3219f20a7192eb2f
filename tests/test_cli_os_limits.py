"""gpt1's commands at the operating system's limits, and the exit status a supervisor reads:
tensorboard's event files on a full disk, the tokenizers library's thread pool that cannot start,
eval's stdout passing through a full TMPDIR, no writable temporary folder at all, and a BPE
training stopped by a signal while it reads its corpus. The limits are real where this process
can set them without root or cgroups (an address-space limit that a thread's stack cannot fit
in, in a child process); a full disk is injected where no real one can be made here, through
the real code path, as each test says. (Processes and threads that cannot start under a server
are in test_serve_startup.py.)"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

import gpt1.train.loop
from tests.test_battery import assert_one_clear_line, run_main

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the limits here are Linux's")
TINY = ["model=tiny", "block_size=32", "batch_size=2", "eval_batches=1", "device=cpu"]
NO_SPACE = os.strerror(errno.ENOSPC)


# ---- tensorboard=true on a full disk --------------------------------------------------------

def _full_disk_for_tensorboard(monkeypatch, free: int) -> None:
    """tensorboard's event files on a disk that fills once one holds `free` bytes: its writes from
    then on go to /dev/full, where they fail as on a full disk (ENOSPC, with no file name, from the
    write itself). This process can mount no small file system: only the file tensorboard opens is
    swapped, its writer thread, the error it keeps for the main thread and gpt1's code around them
    run as they do on a full disk."""
    from tensorboard.compat.tensorflow_stub.io import gfile

    real_open = gfile.io.open

    def open_(filename, mode="r", encoding=None):
        held = os.path.getsize(filename) if "a" in mode else 0  # "wb" starts the file
        full = ("w" in mode or "a" in mode) and held >= free and "tfevents" in os.fsdecode(filename)
        return real_open("/dev/full" if full else filename, mode, encoding=encoding)

    monkeypatch.setattr(gfile, "io", types.SimpleNamespace(open=open_))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
@pytest.mark.parametrize("free", [0, 300], ids=["full-at-start", "fills-mid-run"])
def test_tensorboard_on_a_full_disk_is_one_line_naming_its_folder(data_dir, tmp_path, monkeypatch, capsys, free):
    """The writer thread's failure was "standard output: cannot write (No space left on device)",
    under the thread's own traceback ("Exception in thread Thread-1", 40 lines when the disk was
    full as SummaryWriter() wrote its first event): neither the writer's creation, its add_scalar
    nor its close named the folder, and the CLI took any nameless write error for stdout's."""
    pytest.importorskip("tensorboard")
    printed = []  # what threading's hook would print: the errors of threads nobody handles
    monkeypatch.setattr(threading, "excepthook", printed.append)
    _full_disk_for_tensorboard(monkeypatch, free)
    run = tmp_path / "run"
    rc, err = run_main(capsys, "pretrain", "--data", data_dir, "--out", run, *TINY, "max_steps=4", "save_every=4",
                       "eval_every=4", "tensorboard=true")
    assert_one_clear_line(rc, err, rf"^gpt1 pretrain: error: {run / 'tensorboard'}: cannot write \({NO_SPACE}\); "
                                   r"free some space or choose another --out$")
    assert printed == [], [p.exc_value for p in printed]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_a_nameless_write_error_of_another_packages_file_is_not_called_stdouts(data_dir, tmp_path, monkeypatch,
                                                                             capsys):
    """The CLI read any write error without a file name as stdout's: tensorboard's event file on a
    full disk was "standard output: cannot write". gpt1 names each file it writes, so to reach the
    fallback this run's tensorboard writes go unnamed (loop's `writing` taken out): the line names
    the package whose code failed, and leaves stdout, which is fine, alone."""
    pytest.importorskip("tensorboard")
    monkeypatch.setattr(gpt1.train.loop, "writing", lambda path: contextlib.nullcontext())
    _full_disk_for_tensorboard(monkeypatch, 0)
    rc, err = run_main(capsys, "pretrain", "--data", data_dir, "--out", tmp_path / "run", *TINY, "max_steps=2",
                       "tensorboard=true")
    assert_one_clear_line(rc, err, rf"^gpt1 pretrain: error: tensorboard: cannot write its file \({NO_SPACE}\); "
                                   r"free some space or choose another output path$")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_a_package_writing_stdout_that_fails_is_still_stdouts(tmp_path, monkeypatch, capsys):
    """The other side of the fallback: `plot --out - > /dev/full` fails inside Pillow's code, which
    was handed stdout (matplotlib's savefig): that is standard output's failure."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": step, "loss": 5.0 - step, "val_loss": 5.5 - step}) + "\n"
                               for step in (1, 2, 3)))
    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stdout", full)
        rc, err = run_main(capsys, "plot", "--out", "-", metrics)
    assert_one_clear_line(rc, err, rf"^gpt1 plot: error: standard output: cannot write \({NO_SPACE}\)$")


# ---- the tokenizers library's thread pool cannot start ---------------------------------------

# rayon's threads take RUST_MIN_STACK of address space each: 8 GiB under a 4 GiB `ulimit -v` (which
# binds root too, unlike `ulimit -u`) fails each one with EAGAIN, as a pids limit does.
NO_RAYON_THREADS = {"RUST_MIN_STACK": str(8 << 30), "RUST_BACKTRACE": "0"}


def _address_space_4g() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, resource.RLIM_INFINITY))


def _gpt1(*args, env: dict | None = None, preexec_fn=None, timeout: float = 60) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    return subprocess.run([sys.executable, "-m", "gpt1", *map(os.fsdecode, args)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec_fn, env={**environment, "GPT1_QUIET": "1", **(env or {})})


@linux_only
def test_a_tokenizer_trains_on_one_thread_where_the_librarys_pool_cannot_start(corpus_dir, tmp_path):
    """pyo3's PanicException ("The global thread pool has not been initialized ... WouldBlock"), a
    BaseException, ended `gpt1 tokenizer train` (and prepare, and every encode) with exit 1 under a
    pids limit. The library's TOKENIZERS_PARALLELISM=false runs it on one thread: the same merges."""
    reference = _gpt1("tokenizer", "train", "--vocab-size", "300", "--out", tmp_path / "ref", corpus_dir / "json")
    assert reference.returncode == 0, reference.stderr
    run = _gpt1("tokenizer", "train", "--vocab-size", "300", "--out", tmp_path / "tok", corpus_dir / "json",
                env=NO_RAYON_THREADS, preexec_fn=_address_space_4g)
    assert run.returncode == 0, run.stderr
    assert "ThreadPoolBuildError" in run.stderr  # the library's pool did fail (Rust says so itself)
    warnings = [line for line in run.stderr.splitlines() if "could not start its threads" in line]
    assert len(warnings) == 1 and "one thread" in warnings[0] and "ulimit -u" in warnings[0], run.stderr
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == (tmp_path / "ref" / "tokenizer.json").read_bytes()


# ---- eval --samples - / --report - through a TMPDIR that cannot take the file -----------------

@linux_only
def test_eval_to_stdout_needs_no_temporary_file(tiny_model_dir, tmp_path):
    """`--samples -` passed its text through a temporary file: a full TMPDIR failed an output that
    needs no disk (pass 24 named TMPDIR in the error; pass 25 writes stdout directly). A real limit
    here: `ulimit -f` (64 bytes) refuses any file, as a full disk does; stdout, a pipe, takes any
    size. The text is the one `--samples FILE` writes."""
    from tests.task_files import piqa, write_jsonl

    task = write_jsonl(tmp_path / "piqa.jsonl", [piqa(i) for i in range(3)])
    scoring = ["eval", "--model", tiny_model_dir, "--task", "piqa", "--data", task, "--device", "cpu"]

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.RLIM_INFINITY))

    run = _gpt1(*scoring, "--samples", "-", preexec_fn=limit_file_size)  # --report - takes the same way
    assert run.returncode == 0, run.stderr
    assert _gpt1(*scoring, "--samples", tmp_path / "s.jsonl").returncode == 0
    assert run.stdout == (tmp_path / "s.jsonl").read_text(encoding="utf-8")
    assert len(run.stdout.splitlines()) == 3 and len(run.stdout) > 64


# ---- signals and the temporary folder ------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sig, status, said", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_a_bpe_training_stopped_while_it_reads_its_corpus_exits_with_the_signals_status(tmp_path, sig, status, said):
    """The Rust trainer, left running in its thread, called back into Python while the interpreter
    shut down, and glibc's thread exit through its frames aborted the process: "FATAL: exception
    not rethrown", killed by SIGABRT (exit 134, a core file) instead of 143 / 130."""
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k in range(20):  # 40 MB: seconds of reading, most of a BPE training's time
        (corpus / f"part{k}.txt").write_text("\n".join(" ".join(rng.choices(words, k=100)) for _ in range(3000)))
    process = subprocess.Popen([sys.executable, "-m", "gpt1", "tokenizer", "train", "--vocab-size", "4096",
                                "--out", str(tmp_path / "tok"), str(corpus)], cwd=tmp_path, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "GPT1_QUIET": "1"},
                               # Ctrl-C in a terminal: a test run as a background job (`pytest ... &`, as
                               # a CI script may run it) would hand the child SIGINT ignored.
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert process.stderr.readline().startswith("training a 4,096-token BPE tokenizer")
    try:
        time.sleep(0.5)  # the corpus is being read
        process.send_signal(sig)
        err = process.stderr.read()
        assert process.wait(60) == status, err
    finally:
        process.kill()
    assert err.strip() == f"gpt1 tokenizer train: {said}"
    assert not (tmp_path / "tok").exists() and not (tmp_path / "core").exists()


def test_no_writable_temporary_folder_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    """torch imports dill (a `datasets` dependency), which asks for a temporary folder at import:
    in a container with a read-only root and no /tmp volume every command was a 60-line traceback."""
    import tempfile

    from tests.test_battery import run_main

    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir's cache
    monkeypatch.setattr(tempfile, "_candidate_tempdir_list", lambda: [str(tmp_path / "missing")])
    rc, err = run_main(capsys, "info", "tiny")
    assert rc == 2 and err.strip().splitlines() == [
        "gpt1 info: error: no writable temporary folder (TMPDIR, /tmp, /var/tmp, /usr/tmp or the current folder); set "
        "TMPDIR to one (a container with a read-only root filesystem needs a writable /tmp volume)"]
