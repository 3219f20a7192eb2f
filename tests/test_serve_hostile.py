"""The server against hostile or heavy clients and at shutdown, through a real uvicorn server on
loopback (and a real `gpt1 serve` process for the signals): large prompts do not freeze the
event loop, slow or huge request heads are cut off, Ctrl-C / SIGTERM end open requests with
the documented error, HEAD works wherever GET does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

import gpt1
from gpt1.inference.llm import LLM
from gpt1.serve import background_server, create_app
from gpt1.serve.middleware import MAX_HEAD_BYTES
from gpt1.serve.server import GRACEFUL_SHUTDOWN_S
from tests.test_serve_api import endless_model_dir, free_port, served_health, wait_for

MSG = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def llm(tiny_model_dir):
    return gpt1.load(tiny_model_dir, device="cpu")


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


# ---- A: prompts are built off the event loop ----------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_slow_prompt_does_not_freeze_the_other_requests(llm, monkeypatch, path):
    """A 1 MB prompt took ~1 s to tokenize on the event loop (a 2,000-message chat several):
    /health and every stream froze meanwhile. Here the tokenizer takes 3 s for one prompt."""
    started, finished, encode = threading.Event(), threading.Event(), llm.tokenizer.encode

    def slow_encode(text: str) -> list[int]:
        if text.startswith("SLOW"):
            started.set()
            time.sleep(3)
            finished.set()
        return encode(text)

    monkeypatch.setattr(llm.tokenizer, "encode", slow_encode)
    body = ({"messages": [{"role": "user", "content": "SLOW prompt"}]} if "chat" in path else {"prompt": "SLOW prompt"})
    with background_server(create_app(llm)) as url:
        slow: list[httpx.Response] = []
        thread = threading.Thread(target=lambda: slow.append(httpx.post(url + path, json={**body, "max_tokens": 2},
                                                                        timeout=60)))
        thread.start()
        assert started.wait(30)
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        assert not finished.is_set()  # answered while the slow prompt was still being tokenized
        thread.join(60)
        assert slow[0].status_code == 200


def test_tokenizing_a_long_text_leaves_the_event_loop_running(tokenizer):
    """The tokenizer's `encode` held the GIL while it ran: tokenizing in a worker thread still
    froze the event loop for the whole second a 1 MB prompt takes."""
    text = "Hello, world. The quick brown fox jumps over the lazy dog. " * 17_000

    async def main() -> tuple[float, float]:
        longest_lag, running = 0.0, True

        async def watch() -> None:
            nonlocal longest_lag
            while running:
                start = time.perf_counter()
                await asyncio.sleep(0.001)
                longest_lag = max(longest_lag, time.perf_counter() - start)

        watcher = asyncio.create_task(watch())
        await asyncio.to_thread(tokenizer.encode, "warm the worker thread up")  # as the server's pool is
        start = time.perf_counter()
        await asyncio.to_thread(tokenizer.encode, text)
        took = time.perf_counter() - start
        running = False
        await watcher
        return took, longest_lag

    took, lag = asyncio.run(main())
    assert lag < max(took / 2, 0.05), f"the event loop stood still for {lag:.2f} s of the {took:.2f} s encode"


# ---- B: shutdown with requests open --------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("engine_kind,sig", [("thread", signal.SIGINT), ("process", signal.SIGTERM)])
def test_shutdown_ends_open_requests_with_the_documented_error(tiny_config, tokenizer, tmp_path, engine_kind, sig):
    """Ctrl-C / SIGTERM with requests open: after uvicorn's graceful period they were cancelled
    (plain-text 500s, streams cut without an error event, a traceback each in the log)."""
    model = endless_model_dir(tiny_config, tokenizer, tmp_path / "endless")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gpt1", "serve", "--model", str(model), "--port", str(port),
                             "--engine", engine_kind, "--max-batch", "2", "--max-queue", "8"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    outcomes: list[tuple[bool, int, str]] = []  # (streamed, status, the body or the stream's last event)

    def one(stream: bool) -> None:
        body = {"messages": MSG, "max_tokens": 8000, "temperature": 1.0, "stream": stream}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
            last = [line for line in r.iter_lines() if line.strip()][-1]
            outcomes.append((stream, r.status_code, last))

    def health() -> dict:
        return served_health(proc, url)

    try:
        wait_for(lambda: health().get("status") == "ok", timeout=120, what="gpt1 serve to start")
        clients = [threading.Thread(target=one, args=(i % 2 == 0,)) for i in range(6)]
        for c in clients:
            c.start()
        wait_for(lambda: (h := health()).get("active") == 2 and h.get("queued") == 4, timeout=30,
                 what="2 requests generating and 4 queued")
        start = time.monotonic()
        proc.send_signal(sig)
        for c in clients:
            c.join(30)
        ended = time.monotonic() - start
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read().decode()
    assert stderr.rstrip().endswith("gpt1 serve: " + ("interrupted" if sig == signal.SIGINT else "terminated"))
    assert "Traceback" not in stderr and "Exception in ASGI application" not in stderr, stderr
    assert ended < GRACEFUL_SHUTDOWN_S  # ended by the engine's stop, not cut off after the graceful period
    assert len(outcomes) == 6
    for streamed, status, last in outcomes:
        error = json.loads(last.removeprefix("data: "))["error"]
        assert status == (200 if streamed else 503) and error["code"] == "engine_unavailable", (streamed, status, last)
        # Not the engine process's "has stopped", which its reader said when it saw the child exit first.
        assert error["message"] == "the server is shutting down"


# ---- C: request heads ---------------------------------------------------------------------------
def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_heads_that_never_end_are_cut_off(llm):
    """Connections that never finished their headers (or sent nothing) were held forever."""
    with background_server(create_app(llm), head_timeout_s=1.0) as url:
        with contextlib.ExitStack() as stack:
            partial, idle, kept = (stack.enter_context(socket.create_connection(address(url), timeout=10))
                                   for _ in range(3))
            partial.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
            # A kept-alive connection: one whole request, then half of the next one.
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert kept.recv(65536).startswith(b"HTTP/1.1 200")
            kept.sendall(b"GET /health HTTP/1.1\r\n")
            start = time.monotonic()
            for _ in range(4):  # a header line now and then, as a slowloris client sends them
                time.sleep(0.3)
                partial.sendall(b"X-A: b\r\n")
            for sock in (partial, kept):
                received = read_until_closed(sock)
                assert received.startswith(b"HTTP/1.1 408") and b'"code": "request_timeout"' in received, received
            assert read_until_closed(idle) == b""
            assert time.monotonic() - start < 8
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_over_long_heads_are_refused_and_bodies_are_not_heads(llm):
    """A 50-100 MB header was accepted and buffered (RSS +170 MB per connection)."""
    with background_server(create_app(llm)) as url:
        big = b"a" * (MAX_HEAD_BYTES + 1000)
        # Whole: a 431 with OpenAI's error body.
        r = httpx.get(f"{url}/health", headers={"X-Big": big.decode()})
        assert r.status_code == 431 and r.json()["error"]["code"] == "request_header_fields_too_large"
        # Still arriving: cut off after the limit rather than buffered.
        with socket.create_connection(address(url), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: ")
            sent, received = 0, b""
            with contextlib.suppress(OSError):
                while sent < 4 * MAX_HEAD_BYTES and not select.select([sock], [], [], 0.01)[0]:
                    sock.sendall(b"a" * 8192)
                    sent += 8192
                received = read_until_closed(sock)
            assert sent < 4 * MAX_HEAD_BYTES
            assert received == b"" or received.startswith(b"HTTP/1.1 431"), received  # or the connection was reset
        # Just under the limit, and a large body: not a head.
        assert httpx.get(f"{url}/health", headers={"X-Big": "a" * (MAX_HEAD_BYTES // 2)}).status_code == 200
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "a" * 900_000, "max_tokens": 1, "no_such_field": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "no_such_field"
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


# ---- D: a process engine for a weightless LLM ----------------------------------------------------
def test_process_engine_for_a_weightless_llm(tiny_model_dir):
    """`create_app(LLM.without_weights(dir), engine="process")` asked the child for device 'meta'."""
    with background_server(create_app(LLM.without_weights(tiny_model_dir), engine="process")) as url:
        assert httpx.get(f"{url}/health").json()["device"] == "cpu"
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": MSG, "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


# ---- F: HEAD --------------------------------------------------------------------------------------
def test_head_works_wherever_get_does(llm):
    """`HEAD /` and `HEAD /health` were 405 (uptime checkers use `curl -I`)."""
    with background_server(create_app(llm, api_key="k")) as url:
        for path, headers in (("/", {}), ("/health", {}), ("/v1/models", {"Authorization": "Bearer k"}),
                              ("/openapi.json", {})):
            get, head = httpx.get(url + path, headers=headers), httpx.head(url + path, headers=headers)
            assert get.status_code == head.status_code == 200, path
            assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"], path
        assert httpx.head(f"{url}/v1/models").status_code == 401  # the key still guards it
        assert httpx.head(f"{url}/v1/chat/completions", headers={"Authorization": "Bearer k"}).status_code == 405
