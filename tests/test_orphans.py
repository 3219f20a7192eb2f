"""Child processes end with their parent: an engine process whose start is interrupted or whose
parent is killed outright (SIGKILL), the busy neighbour of `gpt1 bench threads` and the
`gpt1 serve` of `gpt1 bench serve` when the benchmark is killed, and the model dir such a killed
benchmark leaves behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import gpt1
from gpt1.benchmarks import serve as bench_serve
from gpt1.inference.engine_process import EngineProcess

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _gone(pid: int, timeout: float) -> bool:
    """Whether `pid` (not our child) exits within `timeout` s; a zombie awaiting init counts as gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def _start_parent(script: str, *args: str) -> tuple[subprocess.Popen, int]:
    """Run `script` in a parent process; it prints its child's pid on the first line."""
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = parent.stdout.readline()
    if not line.strip().isdigit():
        parent.kill()
        pytest.fail(f"the parent did not start its child: {line}{parent.communicate()[1]}")
    return parent, int(line)


def _kill_parent_then_child(parent: subprocess.Popen, child: int, timeout: float) -> tuple[bool, str]:
    """SIGKILL the parent: whether its child is gone within `timeout` s, and the stderr they wrote."""
    parent.kill()
    parent.wait()
    gone = _gone(child, timeout)
    if not gone:
        os.kill(child, signal.SIGKILL)
    return gone, parent.stderr.read()  # the child writes to the same pipe: read once it is gone


def test_an_interrupted_engine_start_kills_the_engine_process(tiny_model_dir, capfd):
    llm = gpt1.load(tiny_model_dir, device="cpu")
    engine = EngineProcess(llm.path, llm.tokenizer, llm.config, device="cpu")
    main = threading.main_thread().ident

    def interrupt() -> None:  # Ctrl-C while start() waits for the child (still importing torch)
        while getattr(engine, "_outputs", None) is None:
            time.sleep(0.01)
        time.sleep(0.2)
        signal.pthread_kill(main, signal.SIGINT)

    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            engine.start()
        try:
            engine._process.wait(5)
        except subprocess.TimeoutExpired:
            engine._process.kill()
            pytest.fail("the engine process ran on after its start was interrupted")
    finally:
        signal.signal(signal.SIGINT, handler)
    assert "Traceback" not in capfd.readouterr().err


@linux_only
def test_an_engine_process_exits_when_its_parent_is_killed_while_it_starts(tiny_model_dir):
    # compile=True: its start-up compile (~30 s on 2 cores) is where the parent was killed in the
    # report; the child should be gone long before it would have finished.
    parent, child = _start_parent("""
        import sys, threading, time
        import gpt1
        from gpt1.inference.engine_process import EngineProcess
        llm = gpt1.load(sys.argv[1], device="cpu")
        engine = EngineProcess(llm.path, llm.tokenizer, llm.config, device="cpu", compile=True)
        def report():
            while engine.pid is None:
                time.sleep(0.01)
            print(engine.pid, flush=True)
        threading.Thread(target=report, daemon=True).start()
        engine.start()
        """, str(tiny_model_dir))
    time.sleep(0.5)
    gone, stderr = _kill_parent_then_child(parent, child, 10)
    assert gone, "the engine process ran on after its parent was killed"
    assert "Traceback" not in stderr


@linux_only
def test_the_busy_neighbour_exits_when_the_benchmark_is_killed():
    parent, child = _start_parent("""
        import os, time
        from gpt1.benchmarks.threads import busy_neighbour
        with busy_neighbour(min(os.sched_getaffinity(0))):
            print(open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split()[0], flush=True)
            time.sleep(60)
        """)
    gone, stderr = _kill_parent_then_child(parent, child, 5)
    assert gone, "the busy neighbour ran on after the benchmark was killed"
    assert "Traceback" not in stderr


@linux_only
def test_the_served_model_stops_when_the_benchmark_is_killed(tiny_model_dir):
    pytest.importorskip("uvicorn")
    parent, child = _start_parent("""
        import sys, time
        from pathlib import Path
        from gpt1.benchmarks.serve import _server
        with _server(Path(sys.argv[1]), "cpu") as (url, proc):
            print(proc.pid, flush=True)
            time.sleep(60)
        """, str(tiny_model_dir))
    gone, _ = _kill_parent_then_child(parent, child, 10)
    assert gone, "gpt1 serve ran on after the benchmark was killed"


def test_bench_serve_removes_the_model_dirs_of_killed_runs(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{bench_serve.TEMP_PREFIX}{dead.pid}-abc"
    running = tmp_path / f"{bench_serve.TEMP_PREFIX}{os.getpid()}-def"
    unnamed = tmp_path / f"{bench_serve.TEMP_PREFIX}12345678"  # not named after a process: left alone
    for folder in (stale, running, unnamed):
        (folder / "model").mkdir(parents=True)
    bench_serve._remove_stale_dirs()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (running, unnamed))


def test_the_engine_process_has_no_traceback_for_a_parent_gone_before_ready(tmp_path):
    # Its `ready` (or start-up error) sent into a pipe nobody reads: it exits quietly.
    from gpt1.inference import engine_process

    r, w = os.pipe()
    os.close(r)
    outputs = engine_process.Connection(w, readable=False)
    commands_r, commands_w = os.pipe()
    try:
        engine_process._child_main(str(tmp_path / "missing"), "cpu", "auto", {},
                                   engine_process.Connection(commands_r, writable=False), outputs)
    finally:
        os.close(commands_w)
