"""Pass 24, operating-system limits (/tmp/explore/f24/limits): tensorboard's event files on a
full disk, the tokenizers library's thread pool that cannot start, a process or thread that
cannot start under a server, and eval's stdout passing through a full TMPDIR. The limits are
real where this process can set them without root or cgroups (an address-space limit that a
thread's stack cannot fit in, in a child process); a full disk is injected where no real one can
be made here, through the real code path, as each test says."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import subprocess
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import pytest

import gpt1.train.loop
from tests.test_battery import assert_one_clear_line, run_main
from tests.test_runtime_pass15 import open_paths

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the limits here are Linux's")

TINY = ["model=tiny", "block_size=32", "batch_size=2", "eval_batches=1", "device=cpu"]
NO_SPACE = os.strerror(errno.ENOSPC)


# ---- 1. tensorboard=true on a full disk --------------------------------------------------------

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


# ---- 2. the tokenizers library's thread pool cannot start ---------------------------------------

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


# ---- 3. serve --engine process whose child cannot be forked ------------------------------------

def _pipes() -> list[str]:
    """The pipes this process holds open."""
    return [p for p in open_paths() if p.startswith("pipe:")]


@linux_only
def test_serve_whose_engine_process_cannot_be_forked_is_one_line(tiny_model_dir, monkeypatch, capsys):
    """fork refused (EAGAIN: `ulimit -u`, a container's pids limit) was a BlockingIOError traceback,
    and the engine's two pipes stayed open. Neither limit can be set here for every user this suite
    runs as (`ulimit -u` binds no root; pids.max needs root and cgroups), so the fork itself is
    refused: Popen's call that forks raises what the kernel's refusal raises."""
    def refused(*args, **kwargs):
        raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    monkeypatch.setattr(subprocess, "_fork_exec", refused)
    before = _pipes()
    rc, err = run_main(capsys, "serve", "--model", tiny_model_dir, "--engine", "process", "--device", "cpu",
                       "--port", "0")
    assert_one_clear_line(rc, err, r"^gpt1 serve: error: cannot start a process or thread \(Resource temporarily "
                                   r"unavailable\); raise the limit on processes and threads \(ulimit -u.*\) or the "
                                   r"container's pids limit")
    assert _pipes() == before


# ---- 4. serve whose prompt threads cannot all start --------------------------------------------

# Each thread's stack is 512 MiB of address space, and the address space has room for one more:
# the first thread starts, the second cannot (`ulimit -v` binds root too, unlike `ulimit -u`).
ONE_MORE_THREAD = """
import resource, threading
def address_space():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
def room_for_one_thread():
    threading.stack_size(512 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (address_space() + (768 << 20), resource.RLIM_INFINITY))
"""


@linux_only
def test_prompt_threads_that_cannot_all_start_raise_at_once_and_end(tmp_path):
    """The threads started waited 10 s on a barrier the others could never reach, and the server's
    exit waited for them (`gpt1 serve` hung after uvicorn's "Application startup failed")."""
    code = ONE_MORE_THREAD + textwrap.dedent("""
        import time
        from gpt1.serve.routes import PromptThreads
        room_for_one_thread()
        started = time.monotonic()
        try:
            PromptThreads(4).start()
        except RuntimeError as e:
            print(f"{e}; {threading.active_count()} thread(s) after {time.monotonic() - started:.1f} s", flush=True)
    """)
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("can't start new thread; 1 thread(s) after 0."), run.stdout
    assert time.monotonic() - start < 8, "the process's exit waited for the threads started"


@linux_only
def test_serve_whose_threads_cannot_start_is_one_line_before_the_server_runs(tiny_model_dir):
    """uvicorn logged the RuntimeError from the app's lifespan, "Application startup failed" and
    exited 3. gpt1 serve starts the engine and the prompt threads before the server runs (the
    lifespan finds them running): a thread that cannot start is the CLI's one line."""
    code = ONE_MORE_THREAD + textwrap.dedent("""
        import sys, torch, gpt1.cli
        room_for_one_thread()
        sys.exit(gpt1.cli.main(sys.argv[1:]))
    """)
    run = subprocess.run([sys.executable, "-c", code, "serve", "--model", str(tiny_model_dir), "--device", "cpu",
                          "--port", "0"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "GPT1_QUIET": "1"})
    assert_one_clear_line(run.returncode, run.stderr, r"^gpt1 serve: error: cannot start a thread \(can't start new "
                                                      r"thread\); raise the limit on processes and threads")
    assert "Application startup failed" not in run.stderr


# ---- 5. eval --samples - / --report - through a TMPDIR that cannot take the file -----------------

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
