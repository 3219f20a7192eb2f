"""`gpt1 serve` starting up: the port listens only once the engine runs and says so, a port
another server holds is one clear error, a signal during the engine's start stops it before it
listens, and the event loop's first worker thread that cannot start (a pids limit reached just
then) is one line. That failure is injected at `threading.Thread.start` for the loop's executor
threads only (asyncio's `asyncio_N`, uvloop's `uvloop_N`), in a child process: the engine, the
prompt threads and uvicorn run as they do at a real limit."""

from __future__ import annotations

import errno
import gc
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import pytest

from gpt1.core.errors import Gpt1Error
from gpt1.serve import create_app
from gpt1.serve.server import bind, serve
from tests.test_battery import assert_one_clear_line, run_main
from tests.test_fs_train import open_paths
from tests.test_serve_api import free_port

LOOP_THREADS_CANNOT_START = textwrap.dedent("""
    import sys, threading, gpt1.cli
    real_start = threading.Thread.start
    def start(self):
        if self.name.startswith(("asyncio_", "uvloop_")):
            raise RuntimeError("can't start new thread")
        return real_start(self)
    threading.Thread.start = start
    sys.exit(gpt1.cli.main(sys.argv[1:]))
""")


def test_serve_whose_loops_first_worker_thread_cannot_start_is_one_line(tiny_model_dir):
    """uvicorn logged the RuntimeError from the app's lifespan (its first `asyncio.to_thread`),
    then "Application startup failed", before gpt1's line: the server starts that thread itself,
    before the lifespan, so that it is the CLI's one line."""
    run = subprocess.run([sys.executable, "-c", LOOP_THREADS_CANNOT_START, "serve", "--model", str(tiny_model_dir),
                          "--device", "cpu", "--port", "0"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "GPT1_QUIET": "1"})
    assert_one_clear_line(run.returncode, run.stderr, r"^gpt1 serve: error: cannot start a thread \(can't start new "
                                                      r"thread\); raise the limit on processes and threads")
    assert "Application startup failed" not in run.stderr and "Traceback" not in run.stderr


def test_health_answers_as_soon_as_serving_is_said(tiny_model_dir):
    """A script that waits for the "serving ... on URL" line, then polls /health at once, is answered
    (the line is the promise that the server takes connections)."""
    import re

    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "gpt1", "serve", "--model", str(tiny_model_dir), "--device", "cpu",
                             "--port", "0"], stderr=subprocess.PIPE, text=True)
    try:
        said = next(line for line in proc.stderr if re.search(r"serving .* on http://", line))
        url = re.search(r"on (http://\S+)", said)[1]
        assert httpx.get(url + "/health", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)


# ---- the port listens once the engine runs -------------------------------------------------------
@pytest.mark.slow
def test_gpt1_serve_takes_connections_once_its_engine_process_has_loaded(tiny_model_dir, tmp_path):
    """With --engine process (auto's choice on CUDA) the port accepted connections while the child
    still loaded the model (29 s with --compile): a TCP probe said ready and requests hung. Now a
    connection is refused until the engine runs (its KV cache line is said then); --allowed-host
    lets a proxy's Host name through the keyless loopback server's host check."""
    port, log = free_port(), tmp_path / "serve.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "gpt1", "serve", "--model", str(tiny_model_dir), "--port",
                                 str(port), "--engine", "process", "--max-batch", "2", "--allowed-host", "GPT1",
                                 "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.01)
        assert "KV cache:" in log.read_text(), "the port took a connection before the engine had started"
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/health", headers={"Host": "gpt1:8080"}, timeout=30).json()["status"] == "ok"
        refused = httpx.get(f"{url}/health", headers={"Host": "chat.example.com"}, timeout=30)
        assert refused.status_code == 403 and "--allowed-host" in refused.json()["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_port_another_server_took_meanwhile_is_one_clear_error(llm, loop):
    """Two servers that bound one port with SO_REUSEADDR (Linux lets them while neither listens):
    the second to listen got asyncio's traceback, or, with uvloop, said nothing and served nothing."""
    pytest.importorskip(loop)
    ours = socket.socket()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ours.bind(("127.0.0.1", 0))
    port = ours.getsockname()[1]
    with socket.socket() as theirs:
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        theirs.bind(("127.0.0.1", port))
        theirs.listen()
        ended: list[BaseException | None] = []

        def run() -> None:
            try:
                serve(create_app(llm), ours, log_level="warning", loop=loop)
                ended.append(None)
            except BaseException as e:  # noqa: BLE001 - what serve() raised is the result
                ended.append(e)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(60)
        gc.unfreeze()  # serve() froze this test process's objects
    assert isinstance(ended[0], Gpt1Error), ended
    assert re.fullmatch(rf"cannot listen on 127\.0\.0\.1:{port}: .*another server on that port\? try --port\)",
                        str(ended[0])), ended


def test_a_port_bound_by_a_server_still_starting_is_refused_at_once():
    """bind() no longer listens: a second server must still be refused the port at its own bind,
    not after loading its model."""
    first = bind("127.0.0.1", 0)
    try:
        with pytest.raises(Gpt1Error, match="another server on that port"):
            bind("127.0.0.1", first.getsockname()[1])
        with pytest.raises(ConnectionRefusedError):  # it takes no connection before it serves
            socket.create_connection(first.getsockname(), timeout=5)
    finally:
        first.close()


@pytest.mark.slow
def test_a_signal_while_the_engine_starts_stops_the_server_before_it_listens(tiny_model_dir, tmp_path):
    """Ctrl-C or SIGTERM during the engine's start (a big model, --compile) still listened and said
    "serving ... on http://...", then exited: a script waiting for that line, or a probe, saw it up."""
    import signal

    wrapper = tmp_path / "slow_serve.py"
    wrapper.write_text(
        "import sys, time\n"
        "from gpt1.inference import engine\n"
        "start = engine.Engine.start\n"
        "def slow(self, *a, **k):\n"
        "    print('SLOW START', file=sys.stderr, flush=True); time.sleep(4); return start(self, *a, **k)\n"
        "engine.Engine.start = slow\n"
        "from gpt1.cli import run\n"
        "sys.argv[0] = 'gpt1'\n"
        "run()\n")
    port = free_port()
    process = subprocess.Popen([sys.executable, str(wrapper), "serve", "--model", str(tiny_model_dir), "--port",
                                str(port), "--engine", "thread"], stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or "SLOW START" not in lines[-1]:
            lines.append(process.stderr.readline())
            assert lines[-1], lines
        process.send_signal(signal.SIGTERM)
        accepted = False
        while process.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                accepted = True
            except OSError:
                time.sleep(0.05)
        err = "".join(lines) + process.stderr.read()
    finally:
        process.kill()
    assert process.wait() == 143 and not accepted, err
    assert "serving" not in err and err.rstrip().endswith("gpt1 serve: terminated"), err


# ---- a process or thread that cannot start under the server (a pids limit) ---------------------
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the limits here are Linux's")


# ---- serve --engine process whose child cannot be forked ------------------------------------

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


# ---- serve whose prompt threads cannot all start --------------------------------------------

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
        from gpt1.serve.prompt_threads import PromptThreads
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
