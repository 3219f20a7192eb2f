"""Stopping `gpt1 serve --engine process` with requests open: they end at once, without waiting
for the engine process, and the server and its child are both gone afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

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
