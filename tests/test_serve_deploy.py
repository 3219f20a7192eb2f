"""`gpt1 serve` as deployed: keys read from files, a server on every interface behind a local
proxy, browsers on other origins, hang-ups, an engine process that dies. Real servers on loopback."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import threading

import httpx
import openai
import pytest

import gpt1
from gpt1.cli.serve_cmd import api_key_arg
from gpt1.core.errors import Gpt1Error
from gpt1.inference.engine_process import EngineProcess
from gpt1.serve import background_server, create_app
from gpt1.serve.server import bind, serve
from tests.test_engine_process import process_state
from tests.test_serve_api import MSG, endless_model_dir, free_port, served_health, wait_for


# ---- the API key ---------------------------------------------------------------------------------
def test_a_key_read_with_its_newline_is_the_key(llm):
    """A key with a newline (a key file, a Kubernetes Secret) got 'API key required' at start and
    401 for every client: HTTP strips the header's whitespace, the server did not strip its own."""
    assert api_key_arg(" sekrit\n") == "sekrit"
    with pytest.raises(argparse.ArgumentTypeError, match="is empty"):
        api_key_arg(" \n")
    with pytest.raises(Gpt1Error, match="api_key is empty"):
        create_app(llm, api_key="\n")
    with background_server(create_app(llm, api_key="sekrit\n")) as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key="sekrit", max_retries=0) as client:
            assert client.chat.completions.create(model="m", messages=MSG, max_tokens=2).choices
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401


# ---- the host check ------------------------------------------------------------------------------
def test_a_keyless_server_on_every_interface_answers_any_host_through_loopback(llm):
    """Through 127.0.0.1 (a proxy on the same machine) a 0.0.0.0 server said 403 'listens on
    loopback', and 200 to the same request through its LAN address."""
    app = create_app(llm)
    with background_server(app, host="0.0.0.0") as url:
        port = url.rsplit(":", 1)[1]
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Host": "gpt1.example.com"})
        assert r.status_code == 200, r.text
    # A loopback server keeps its guard against DNS rebinding, and says where it listens.
    with background_server(create_app(llm)) as url:
        r = httpx.get(f"{url}/v1/models", headers={"Host": "gpt1.example.com"})
        assert r.status_code == 403 and "listens on the loopback address 127.0.0.1" in r.json()["error"]["message"]


# ---- CORS ----------------------------------------------------------------------------------------
PREFLIGHT = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type"}


def test_preflights_need_no_key_and_cors_origins_are_allowed(llm):
    """A browser's preflight (sent without Authorization) got 401 on a keyed server."""
    with background_server(create_app(llm, api_key="k")) as url:
        r = httpx.options(f"{url}/v1/chat/completions", headers=PREFLIGHT)
        assert r.status_code != 401 and "access-control-allow-origin" not in r.headers  # off by default
    with background_server(create_app(llm, api_key="k", cors_origins=["https://app.example"])) as url:
        r = httpx.options(f"{url}/v1/chat/completions", headers=PREFLIGHT)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        origin = {"Origin": "https://app.example"}
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": MSG, "max_tokens": 2},
                       headers={**origin, "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = httpx.get(f"{url}/v1/models", headers=origin)  # the page can read why it failed
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = httpx.options(f"{url}/v1/chat/completions", headers={**PREFLIGHT, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


# ---- SIGHUP --------------------------------------------------------------------------------------
@pytest.mark.slow  # a `gpt1 serve` starts: ~5-10 s on the loaded 2-core dev CPU
def test_sighup_ends_open_streams_as_sigterm_does(tiny_config, tokenizer, tmp_path):
    """SIGHUP killed the server at once (exit 129): its streams were cut without an error event,
    and nothing was logged. Its key comes from $GPT1_API_KEY with a newline, as a Secret gives it."""
    model = endless_model_dir(tiny_config, tokenizer, tmp_path / "endless")
    port = free_port()
    env = {**os.environ, "GPT1_API_KEY": "sekrit\n"}
    # SIGHUP at its default in the server, as in a terminal: a test run under nohup (or a CI agent
    # that ignores it) passes SIG_IGN on, and the server rightly keeps ignoring it then.
    proc = subprocess.Popen([sys.executable, "-m", "gpt1", "serve", "--model", str(model), "--port", str(port),
                             "--engine", "thread", "--max-batch", "1", "--log-level", "warning"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    url, key = f"http://127.0.0.1:{port}", {"Authorization": "Bearer sekrit"}
    last_events: list[str] = []

    def stream() -> None:
        body = {"model": "m", "prompt": "x", "max_tokens": 8000, "temperature": 1.0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=key, timeout=60) as r:
            last_events.append([line for line in r.iter_lines() if line.strip()][-1])

    def health() -> dict:
        return served_health(proc, url)

    try:
        wait_for(lambda: health().get("status") == "ok", timeout=60, what="gpt1 serve to start")
        clients = [threading.Thread(target=stream) for _ in range(3)]
        for c in clients:
            c.start()
        wait_for(lambda: (h := health()).get("active") == 1 and h.get("queued") == 2, timeout=30,
                 what="1 request generating and 2 queued")
        proc.send_signal(signal.SIGHUP)
        for c in clients:
            c.join(20)
        assert proc.wait(20) == 128 + signal.SIGHUP
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read().decode()
    assert "Traceback" not in stderr and stderr.rstrip().endswith("gpt1 serve: terminated (hang-up: SIGHUP)"), stderr
    assert len(last_events) == 3
    for last in last_events:
        error = json.loads(last.removeprefix("data: "))["error"]
        assert (error["code"], error["message"]) == ("engine_unavailable", "the server is shutting down")


# ---- the engine process --------------------------------------------------------------------------
class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_an_engine_process_that_dies_says_so_in_the_log(llm):
    """Killed (the OOM killer), the child left no line in the server's log: only 503s in the access
    log said anything. A hang-up, which the server takes as SIGTERM, does not kill it."""
    handler, logger = _Lines(), logging.getLogger("gpt1")
    logger.addHandler(handler)
    engine = EngineProcess(llm.path, llm.tokenizer, llm.config, device="cpu", max_batch=1).start()
    try:
        os.kill(engine.pid, signal.SIGHUP)  # a closed terminal reaches the whole process group
        with pytest.raises(subprocess.TimeoutExpired):
            engine._process.wait(0.5)
        assert engine.alive
        os.kill(engine.pid, signal.SIGKILL)
        wait_for(lambda: not engine.alive, what="the engine to notice its child's death")
        wait_for(lambda: handler.lines, what="the log line")
    finally:
        logger.removeHandler(handler)
        engine.stop()
    assert handler.lines == [
        "the engine process exited (exit code -9): killed by SIGKILL (out of memory? the OOM killer sends it); "
        "every request now gets 503 engine_unavailable, and /health 503"]
    assert process_state(engine.pid) == ""


def test_an_engine_process_stopped_logs_nothing(llm):
    handler, logger = _Lines(), logging.getLogger("gpt1")
    logger.addHandler(handler)
    try:
        with EngineProcess(llm.path, llm.tokenizer, llm.config, device="cpu", max_batch=1):
            pass
    finally:
        logger.removeHandler(handler)
    assert handler.lines == []


def _answers(url: str) -> bool:
    try:
        return httpx.get(url).status_code == 200
    except httpx.TransportError:
        return False


def test_a_server_whose_engine_process_dies_stops_with_the_reason(tiny_config, tokenizer, tmp_path):
    """It stayed up answering every request 503: a supervisor that restarts a process when it exits
    (systemd's Restart=on-failure, a container's restart policy) never restarted it. Now the open
    stream hears why, then `serve` ends with a Gpt1Error (the CLI's one line, exit status 2)."""
    endless = gpt1.load(endless_model_dir(tiny_config, tokenizer, tmp_path / "endless"), device="cpu")
    app = create_app(endless, engine="process", max_batch=1)
    engine = app.state.engine.start()
    sock = bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    ended: list[BaseException | None] = []

    def run() -> None:
        try:
            serve(app, sock, log_level="warning")
            ended.append(None)
        except BaseException as e:  # noqa: BLE001 - what serve() raised is the result
            ended.append(e)
        finally:
            gc.unfreeze()  # serve() froze this test process's objects

    server = threading.Thread(target=run, daemon=True)
    server.start()
    try:
        wait_for(lambda: _answers(f"{url}/health"), timeout=30, what="the server to start")
        body = {"model": "m", "prompt": "x", "max_tokens": 8000, "temperature": 1.0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.strip()).startswith("data: ")
            os.kill(engine.pid, signal.SIGKILL)
            last = [line for line in lines if line.strip()][-1]
        server.join(30)
    finally:
        engine.stop()
    assert json.loads(last.removeprefix("data: "))["error"]["code"] == "engine_unavailable"
    assert not server.is_alive() and isinstance(ended[0], Gpt1Error), ended
    assert str(ended[0]) == ("the engine process exited (exit code -9): killed by SIGKILL (out of memory? the OOM "
                             "killer sends it); the server stopped (restart it; a supervisor does)")


# ---- apps made and dropped -----------------------------------------------------------------------
def test_an_app_dropped_frees_its_engine(llm):
    """FastAPI keeps every endpoint function it has seen in process-wide caches, and the endpoints
    were closures over the engine: 20 create_app calls held 20 KV caches for the process's life."""
    import weakref

    engines = []
    for _ in range(3):
        app = create_app(llm)
        with background_server(app) as url:
            assert httpx.get(f"{url}/health").status_code == 200
        engines.append(weakref.ref(app.state.engine))
        del app
    gc.collect()
    assert [ref() for ref in engines] == [None, None, None]


def test_an_app_served_once_follows_the_server_that_runs_it_next(llm):
    """background_server left its listening address on the app: a TestClient (Host: testserver)
    on the same app afterwards got 403 "listens on the loopback address 127.0.0.1"."""
    from starlette.testclient import TestClient

    app = create_app(llm)
    with background_server(app) as url:
        assert httpx.get(f"{url}/v1/models").status_code == 200
    with TestClient(app) as client:
        assert client.get("/v1/models").status_code == 200
