"""`gpt1 serve` at the limits of its process: threads (`ulimit -u`, a container's pids limit), file
descriptors (`ulimit -n`) and a log that cannot be written (`ulimit -f`, a full disk). Real servers
on loopback; the limits are set in the server's own process (RLIMIT_NOFILE and RLIMIT_FSIZE bind
root too; RLIMIT_NPROC does not, so the thread findings are tested at their mechanisms)."""

from __future__ import annotations

import asyncio
import collections
import errno
import json
import logging
import os
import re
import resource
import subprocess
import sys
import textwrap

import httpx
import pytest
import torch

from gpt1.inference.engine import Engine
from gpt1.serve import background_server, create_app
from gpt1.serve.errors import Throttled, generation_error
from tests.test_serve_api import free_port, wait_for
from tests.test_serve_deploy import _Lines

linux_only = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")


def _threads() -> int:
    """The OS threads of this process (Python's, and native ones: OpenMP's, the tokenizer's)."""
    return len(os.listdir("/proc/self/task"))


# ---- threads --------------------------------------------------------------------------------------
@linux_only
def test_the_engine_thread_has_its_cpu_threads_before_it_serves(llm):
    """The engine thread's OpenMP team was made by its first parallel op, at the first request; by
    then a burst of clients could have taken every thread a pids limit allows, and libgomp ends
    the process when it cannot make one (`libgomp: Thread creation failed`, exit 1)."""
    callers = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = Engine(llm.model, llm.tokenizer, max_batch=1, tune_threads=False)
        before = _threads()
        engine.start()
        try:
            assert _threads() - before == 2  # the engine thread and its OpenMP worker
        finally:
            engine.stop()
    finally:
        torch.set_num_threads(callers)


async def _burst(port: int, bodies: list[dict]) -> list[int]:
    """POST every body to /v1/chat/completions at once over raw sockets (no client threads); their statuses."""
    async def one(body: dict) -> int:
        data = json.dumps(body).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(data), data))
        reply = await reader.read()
        writer.close()
        return int(reply.split(b" ", 2)[1])

    return await asyncio.gather(*(one(body) for body in bodies))


@linux_only
def test_a_burst_of_requests_starts_no_thread(llm):
    """Each request built its prompt in Starlette's run_in_threadpool, whose pool grew to 40 threads
    in a burst (and the tokenizer made its own pool at the first request): under a pids limit they
    left none for the engine. Now a served app has all its threads from the start."""
    with background_server(create_app(llm, max_batch=2, max_queue=64)) as url:
        port = int(url.rsplit(":", 1)[1])
        before = _threads()
        # Long messages (context_length_exceeded once tokenized, ~50 ms each) keep the prompt threads busy.
        long = {"model": "m", "messages": [{"role": "user", "content": "a b c " * 10_000}]}
        short = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        statuses = asyncio.run(_burst(port, [long] * 20 + [short] * 10))
        after = _threads()
    assert sorted(set(statuses)) == [200, 400]
    assert after <= before, f"{after - before} threads started for a burst of 30 requests"


@pytest.mark.slow
def test_a_thread_that_cannot_start_is_a_503_to_retry():
    """A request whose prompt thread could not start (`ulimit -u`, a pids limit) was a 500 with a
    traceback in the log. Here the process makes every new thread's stack larger than the address
    space it has left (RLIMIT_AS): Python's own "can't start new thread", from the OS."""
    script = textwrap.dedent("""
        import asyncio, resource, threading
        from gpt1.serve.errors import ApiError
        from gpt1.serve.prompt_threads import PromptThreads

        threads = PromptThreads(2)  # its threads start when first needed, as in an app without a lifespan
        size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
        threading.stack_size(512 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (size + (128 << 20), resource.RLIM_INFINITY))
        try:
            asyncio.run(threads.run(sum, [1, 2]))
        except ApiError as e:
            print(e.status, e.code, e.headers, e.message)
        """)
    if not os.path.exists("/proc/self/status"):
        pytest.skip("reads its address space from /proc (Linux)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("503 server_overloaded {'Retry-After': '1'} the server is short of threads for the "
                                   "moment; retry later")
    assert "a request got 503: the server is short of threads (RuntimeError: can't start new thread)" in done.stderr


def test_a_passing_shortage_is_a_503_that_names_no_file():
    """An OSError for want of descriptors (the lazy import of a package, under `ulimit -n`) was a 500
    whose message named a file of the server's (a site-packages path)."""
    for error in (OSError(errno.EMFILE, "Too many open files", "/srv/venv/lib/site-packages/anyio/x.py"),
                  OSError(errno.ENOMEM, "Cannot allocate memory"), RuntimeError("can't start new thread")):
        answer = generation_error(error)
        assert (answer.status, answer.code, answer.headers) == (503, "server_overloaded", {"Retry-After": "1"})
        assert "/srv" not in answer.message and answer.message.endswith("for the moment; retry later")
    assert generation_error(OSError(errno.EACCES, "Permission denied")).status == 500  # a fault, as before


def test_a_repeated_warning_is_a_line_every_few_seconds():
    handler, logger = _Lines(), logging.getLogger("gpt1")
    logger.addHandler(handler)
    try:
        throttled = Throttled(0.5)
        for _ in range(3):
            throttled.warn("out of x")
        assert handler.lines == ["out of x"]
        wait_for(lambda: (throttled.warn("out of x"), len(handler.lines) > 1)[1], what="the next line")
    finally:
        logger.removeHandler(handler)
    assert re.fullmatch(r"out of x \((\d+) more times since the last such line\)", handler.lines[1])


# ---- `gpt1 serve` under limits --------------------------------------------------------------------
def _serve(model_dir, tmp_path, *flags: str, limits: dict[int, tuple[int, int]]):
    """`gpt1 serve` on a free port under `limits` (resource: (soft, hard)), its stdout and stderr
    in files (the limit on file size applies to them, not to pipes)."""
    port = free_port()

    def set_limits() -> None:
        for which, values in limits.items():
            resource.setrlimit(which, values)

    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "gpt1", "serve", "--model", str(model_dir), "--port", str(port),
                                 *flags], stdout=stdout, stderr=stderr, preexec_fn=set_limits,
                                env={**os.environ, "GPT1_QUIET": "1"})
    return proc, port, out, err


def _wait_serving(proc: subprocess.Popen, port: int, err) -> None:
    def up() -> bool:
        assert proc.poll() is None, err.read_text()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, timeout=60, what="gpt1 serve to start")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
    proc.wait(30)


@pytest.mark.slow
def test_serve_without_descriptors_to_start_is_one_line(tiny_model_dir, tmp_path):
    """At `ulimit -n 12` the server said "serving on http://..." and then died in three chained
    tracebacks (uvloop failing halfway through starting), exit 1."""
    proc, _, out, err = _serve(tiny_model_dir, tmp_path, limits={resource.RLIMIT_NOFILE: (12, 12)})
    assert proc.wait(60) == 2
    stderr = err.read_text()
    assert "Traceback" not in stderr and "on http://" not in stderr + out.read_text(), stderr
    assert stderr.splitlines()[-1].startswith("gpt1 serve: error: too many open files to start serving: "), stderr
    assert stderr.rstrip().endswith("raise the open-file limit (ulimit -n, now 12)"), stderr


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/limits"), reason="reads the server's limits from /proc (Linux)")
def test_serve_raises_its_open_file_limit_and_says_serving_once_it_does(tiny_model_dir, tmp_path):
    """A soft limit below the hard one (a supervisor's, a container's) is raised, as servers do;
    "serving on" comes when the server takes connections, after uvicorn's startup."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"the hard limit on open files is {hard}")
    proc, port, _, err = _serve(tiny_model_dir, tmp_path, limits={resource.RLIMIT_NOFILE: (40, hard)})
    try:
        _wait_serving(proc, port, err)
        limits = open(f"/proc/{proc.pid}/limits").read()
        soft = int(re.search(r"Max open files\s+(\d+)", limits)[1])
        assert soft == min(1 << 16, hard if hard != resource.RLIM_INFINITY else 1 << 16)
    finally:
        _stop(proc)
    stderr = err.read_text()
    assert "open-file limit" not in stderr, stderr
    assert stderr.index("Application startup complete") < stderr.index(f"serving {tiny_model_dir} on"), stderr


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_burst_beyond_the_open_file_limit_is_said_in_a_few_lines(tiny_model_dir, tmp_path, loop):
    """`ulimit -n 32` and 100 clients (40 here): the first ones got 500s naming a site-packages file (anyio's
    backend, imported at the first request, could not be opened); uvloop dropped the rest without a
    word, and asyncio's loop logged a traceback per place in its listen backlog (84 MB in 20 s)."""
    pytest.importorskip(loop)
    proc, port, out, err = _serve(tiny_model_dir, tmp_path, "--loop", loop, "--log-level", "warning",
                                  limits={resource.RLIMIT_NOFILE: (32, 32)})
    try:
        _wait_serving(proc, port, err)

        async def burst() -> list[str]:
            async def one(i: int) -> str:
                # Seeded: an unseeded request's generator seeds itself from /dev/urandom, one more file to open.
                body = json.dumps({"model": "m", "messages": [{"role": "user", "content": f"hi {i}"}],
                                   "max_tokens": 2, "seed": i, "stream": i % 2 == 1}).encode()
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                    reply = await asyncio.wait_for(reader.read(), 60)
                    writer.close()
                except OSError:  # dropped: reset
                    return "dropped"
                return reply.decode(errors="replace") or "dropped"

            return await asyncio.gather(*(one(i) for i in range(40)))

        replies = asyncio.run(burst())
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok"  # and it recovers
    finally:
        _stop(proc)
    statuses = [r.split(" ", 2)[1] if r.startswith("HTTP/") else r for r in replies]
    assert set(statuses) <= {"200", "503", "dropped"}, [r for r in replies if " 500 " in r][:1]
    assert statuses.count("200") >= 10, collections.Counter(statuses)
    stderr = err.read_text()
    assert "Traceback" not in stderr and len(stderr) < 5000, stderr[-3000:]
    assert "out of file descriptors" in stderr, stderr
    assert stderr.count("out of file descriptors") <= 6, stderr  # a line every 5 s at most


@pytest.mark.slow
def test_a_log_that_cannot_be_written_says_so_once(tiny_model_dir, tmp_path):
    """At `ulimit -f` (or a full disk) each access-log line that could not be written put a ~4.7 KB
    "--- Logging error ---" traceback on stderr."""
    proc, port, out, err = _serve(tiny_model_dir, tmp_path, limits={resource.RLIMIT_FSIZE: (2048, 2048)})
    try:
        _wait_serving(proc, port, err)
        for _ in range(60):  # an access-log line each, ~60 bytes
            assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    finally:
        _stop(proc)
    assert proc.returncode == 143, err.read_text()
    stderr = err.read_text()
    assert "Logging error" not in stderr, stderr[-3000:]
    assert stderr.count("cannot be written") == 1, stderr
    assert ("the server's access log cannot be written to <stdout> (OSError: [Errno 27] File too large); "
            "lines that fail from now on are lost without a word") in stderr
    assert out.stat().st_size <= 2048
