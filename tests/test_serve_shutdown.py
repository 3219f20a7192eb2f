"""Stopping `gpt1 serve --engine process` with requests open: they end at once, without waiting
for the engine process, and the server and its child are both gone afterwards. And what an
in-process server leaves behind once it stops: neither its app and engine nor its prompt threads."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import httpx
import pytest

from gpt1.serve import background_server, create_app
from tests.test_engine_process import process_state
from tests.test_serve_api import endless_model_dir, free_port, served_health, wait_for


@pytest.mark.slow  # a `gpt1 serve` and its engine process start: ~20 s on the loaded 2-core dev CPU
def test_sigterm_ends_open_streams_before_the_engine_process_exits(tiny_config, tokenizer, tmp_path):
    """The server ended its requests only once the child had exited (2.1-2.5 s after the signal
    on the dev CPU, the child's interpreter teardown). Here the child is frozen (SIGSTOP) before
    the SIGTERM: every stream, generating or queued, must get its error while it is still frozen."""
    model = endless_model_dir(tiny_config, tokenizer, tmp_path / "endless")  # replies of max_tokens
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gpt1", "serve", "--model", str(model), "--port", str(port),
                             "--engine", "process", "--max-batch", "2", "--max-queue", "8", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    last_events: list[str] = []

    def stream() -> None:
        body = {"model": "m", "prompt": "x", "max_tokens": 8000, "temperature": 1.0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            last_events.append([line for line in r.iter_lines() if line.strip()][-1])

    def health() -> dict:
        return served_health(proc, url)

    child = None
    try:
        wait_for(lambda: health().get("status") == "ok", timeout=120, what="gpt1 serve to start")
        child = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        clients = [threading.Thread(target=stream) for _ in range(6)]
        for c in clients:
            c.start()
        wait_for(lambda: (h := health()).get("active") == 2 and h.get("queued") == 4, timeout=30,
                 what="2 requests generating and 4 queued")
        os.kill(child, signal.SIGSTOP)  # it can neither step, nor read the stop command, nor exit
        wait_for(lambda: process_state(child) == "T", what="the engine process to stop")
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5  # the old code waited 10 s for the child, then killed it
        for c in clients:
            c.join(max(0.0, deadline - time.monotonic()))
        ended_while_frozen = sum(not c.is_alive() for c in clients) if process_state(child) == "T" else 0
        os.kill(child, signal.SIGCONT)
        assert proc.wait(30) == 128 + signal.SIGTERM
    finally:
        if child is not None and process_state(child) not in ("", "Z"):
            os.kill(child, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read().decode()
    assert ended_while_frozen == 6, f"{ended_while_frozen} of 6 streams ended while the engine process was frozen"
    assert len(last_events) == 6
    assert "Traceback" not in stderr and stderr.rstrip().endswith("gpt1 serve: terminated"), stderr
    for last in last_events:
        error = json.loads(last.removeprefix("data: "))["error"]
        assert (error["code"], error["message"]) == ("engine_unavailable", "the server is shutting down")
    # Reaped by the server before it exited: not an orphan still running, nor a zombie left behind.
    assert process_state(child) == ""


# ---- what a stopped in-process server leaves behind: its model, its threads -----------------------
def completion(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"prompt": "def f(x):", "max_tokens": 8, "temperature": 0, **body},
                      timeout=30)


def test_apps_that_generated_are_freed_once_their_servers_stop(llm):
    """bridge's mailbox, the value of a weak dict keyed by the event loop, held that loop, and the
    loop its server, app and engine: each app that had generated kept its KV cache for the life of
    the process (4 apps, 4 caches)."""
    apps, engines = [], []
    for _ in range(3):
        app = create_app(llm, max_batch=2)
        with background_server(app) as url:
            assert completion(url).status_code == 200
        apps.append(weakref.ref(app))
        engines.append(weakref.ref(app.state.engine))
        del app
    gc.collect()
    assert [ref() for ref in apps] == [None] * 3
    assert [ref() for ref in engines] == [None] * 3


def test_a_stopped_server_leaves_no_prompt_threads(llm):
    """The 4 threads that build prompts were started in the app's lifespan and never ended: each app
    served left them running after its server stopped (1, 5, 9, ... threads)."""
    earlier = set(threading.enumerate())  # an app of another test, run without a lifespan, may hold its own

    def _prompt_threads() -> list[str]:
        return sorted(t.name for t in set(threading.enumerate()) - earlier if t.name.startswith("gpt1-prompt"))

    apps = []  # kept: the threads must end with the server, not when their app is collected
    for _ in range(3):
        app = create_app(llm, max_batch=2)
        apps.append(app)
        with background_server(app) as url:
            assert len(_prompt_threads()) == 4
            assert completion(url).status_code == 200
        assert _prompt_threads() == []
    # An app served again takes threads again.
    with background_server(apps[0]) as url:
        assert completion(url).status_code == 200
        assert len(_prompt_threads()) == 4
    assert _prompt_threads() == []
