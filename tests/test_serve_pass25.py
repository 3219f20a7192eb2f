"""Pass 25: `gpt1 serve` where the event loop's first worker thread cannot start (a pids limit
reached just then). The failure is injected at `threading.Thread.start` for the loop's executor
threads only (asyncio's `asyncio_N`, uvloop's `uvloop_N`), in a child process: the engine, the prompt threads and uvicorn run
as they do at a real limit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.test_battery import assert_one_clear_line

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
