"""Time that does not flow as the server and the serve benchmark assume: a server process stopped
(SIGSTOP, Ctrl-Z, a debugger) past its timeouts, a startup stopped past its deadline, the wall
clock stepped (NTP, `date -s`) during a load. Real processes, real signals, real sockets."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

import gpt1
from gpt1.benchmarks.serve import REQUESTS, _load, _wait_until_up
from gpt1.serve import background_server, create_app

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="SIGSTOP/SIGCONT are POSIX")

# A server whose three timeouts (the head's, the body's, uvicorn's keep-alive) are 1 s: it prints
# its port once it takes connections.
SERVER = textwrap.dedent("""
    import sys
    import gpt1
    from gpt1.serve import create_app
    from gpt1.serve.server import _server, bind
    app = create_app(gpt1.load(sys.argv[1]), body_timeout_s=1.0)
    sock = bind("127.0.0.1", 0)
    server = _server(app, head_timeout_s=1.0, timeout_keep_alive=1, loop=sys.argv[2], log_level="warning")
    server.on_started = lambda: print(sock.getsockname()[1], flush=True)
    server.run(sockets=[sock])
""")


def request(method: str, path: str, body: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def response(sock: socket.socket) -> bytes:
    """One whole response (by its Content-Length), what came before the server closed, or RESET."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
            head, _, body = received.partition(b"\r\n\r\n")
            length = [line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
            if length and len(body) >= int(length[0].split(b":")[1]):
                break
    except ConnectionResetError:
        return received + b"RESET"
    return received


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_requests_that_arrived_during_a_pause_are_served(tiny_model_dir, loop):
    """A server stopped past its timeouts (SIGSTOP, then SIGCONT): the requests whose bytes reached
    its socket in time were reset (a kept-alive connection's next request: uvicorn's keep-alive
    timer closed it unread) or answered 408 (a head, a body), since the expired timers ran before
    the reads on both event loops."""
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(tiny_model_dir), loop],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline() or 0) or pytest.fail(f"the server did not start: {server.stderr.read()}")
        completion = json.dumps({"prompt": "hi", "max_tokens": 1}).encode()
        with contextlib.ExitStack() as stack:
            kept, head, body = (stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=20))
                                for _ in range(3))
            kept.sendall(request("GET", "/health"))
            assert response(kept).startswith(b"HTTP/1.1 200")  # its keep-alive timer runs from now
            head_bytes, body_bytes = request("GET", "/health"), request("POST", "/v1/completions", completion)
            head.sendall(head_bytes[:20])
            body.sendall(body_bytes[:-5])
            time.sleep(0.2)  # the server reads them; each timeout (1 s) runs
            server.send_signal(signal.SIGSTOP)
            try:
                time.sleep(0.3)
                # In time: 0.5 s after the timers began. They expire while the server is stopped.
                kept.sendall(request("GET", "/health"))
                head.sendall(head_bytes[20:])
                body.sendall(body_bytes[-5:])
                time.sleep(1.7)
            finally:
                server.send_signal(signal.SIGCONT)
            replies = {name: response(sock) for name, sock in (("kept", kept), ("head", head), ("body", body))}
        assert {name: reply[:12] for name, reply in replies.items()} == dict.fromkeys(replies, b"HTTP/1.1 200"), replies
        # The timeouts still hold once the server runs: a head that never ends gets its 408.
        with socket.create_connection(("127.0.0.1", port), timeout=20) as slow:
            slow.sendall(b"GET /health HTTP/1.1\r\n")
            assert response(slow).startswith(b"HTTP/1.1 408")
    finally:
        server.terminate()
        server.wait(30)


def test_a_pause_during_startup_is_not_charged_to_it():
    """background_server gave up at its deadline however long the process had been stopped in
    between: a server starting when the process was stopped failed as soon as it resumed."""
    child = textwrap.dedent("""
        import asyncio
        from gpt1.serve import background_server

        async def app(scope, receive, send):  # an app whose startup takes 1 s
            await receive()
            print("starting", flush=True)
            await asyncio.sleep(1.0)
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})

        with background_server(app, startup_timeout=1.5):
            print("up", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "starting\n"
        proc.send_signal(signal.SIGSTOP)
        time.sleep(2.0)  # past the 1.5 s the startup may take
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and out == "up\n", err


def test_the_serve_benchmark_asks_once_more_after_its_deadline(tiny_model_dir):
    """_wait_until_up gave up at its deadline without a look after it (a pause past the deadline
    failed a server that was up by then); here the deadline has passed before the first look."""
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stderr=subprocess.PIPE)
    try:
        with background_server(create_app(gpt1.load(tiny_model_dir))) as url:
            _wait_until_up(url, alive, timeout=0)
    finally:
        alive.kill()
        alive.wait()


def test_the_serve_benchmark_is_not_fooled_by_a_wall_clock_step(tiny_model_dir, monkeypatch):
    """gpt1 bench serve timed its loads with time.time: an NTP step or `date -s` during a load
    (here: the wall clock jumps 60 s at every look) read as a load of minutes, tokens/s near 0."""
    with background_server(create_app(gpt1.load(tiny_model_dir), max_batch=8)) as url:
        real, looks = time.time, []

        def stepping() -> float:
            looks.append(1)
            return real() + 60 * len(looks)

        monkeypatch.setattr(time, "time", stepping)
        results, wall, _ = _load(url, 8, 2)
        monkeypatch.undo()
        assert httpx.get(f"{url}/health").status_code == 200
    assert len(results) == REQUESTS and all(r["ok"] for r in results)
    assert 0 < wall < 30, wall
