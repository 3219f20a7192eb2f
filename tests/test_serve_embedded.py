"""`create_app` used inside someone else's code: mounted in their FastAPI app, or driven by
Starlette's TestClient without `with`. Starlette runs no lifespan there, and the engine, started
only in the lifespan, never stepped: every generation request waited forever while /health said "ok"."""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import gpt1
from gpt1.core.errors import Gpt1Error
from gpt1.inference.llm import LLM
from gpt1.serve import create_app

BODY = {"model": "m", "prompt": "import json\n", "max_tokens": 5, "temperature": 0}


def answered(call, timeout: float = 30.0):
    """call()'s result, or a test failure (not a hung test run) if it does not return in time."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=call()), daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"no answer within {timeout:.0f} s")
    return result["value"]


def expected_text(llm) -> str:
    return llm.generate(BODY["prompt"], temperature=0, max_new_tokens=BODY["max_tokens"])


def test_a_mounted_app_starts_its_engine_at_the_first_request(llm):
    app = create_app(llm)
    outer = FastAPI()
    outer.mount("/llm", app)
    with TestClient(outer) as client:  # runs the outer app's lifespan, not the mounted one's
        try:
            r = answered(lambda: client.post("/llm/v1/completions", json=BODY))
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected_text(llm)
            assert answered(lambda: client.get("/llm/health")).json()["queued"] == 0
        finally:
            # Who stops it when no lifespan runs (docs/serving.md); and a request left waiting
            # ends, so that the client can close.
            app.state.engine.stop()


@pytest.mark.parametrize("engine", ["thread", "process"])
def test_a_testclient_without_with_answers_and_health_is_truthful(llm, engine):
    app = create_app(llm, engine=engine)
    client = TestClient(app)  # no `with`: no lifespan
    try:
        health = answered(lambda: client.get("/health"))  # starts the engine: "ok" means it runs
        assert health.status_code == 200 and health.json()["status"] == "ok"
        running = app.state.engine.pid if engine == "process" else app.state.engine._thread
        assert running is not None
        r = answered(lambda: client.post("/v1/completions", json=BODY))
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected_text(llm)
    finally:
        app.state.engine.stop()


def test_the_mounted_apps_lifespan_can_run_in_the_outer_ones(llm):
    """The other way to mount it, from docs/serving.md: the outer app runs the inner one's
    lifespan, which starts the engine and stops it at shutdown."""
    app = create_app(llm)

    @asynccontextmanager
    async def lifespan(outer: FastAPI):
        async with app.router.lifespan_context(app):
            yield

    outer = FastAPI(lifespan=lifespan)
    outer.mount("/llm", app)
    with TestClient(outer) as client:
        assert app.state.engine._thread is not None  # started before any request
        r = answered(lambda: client.post("/llm/v1/completions", json=BODY))
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected_text(llm)
    assert not app.state.engine.alive
    # Stopped at shutdown, it is not started again by a late request: that is a 503.
    r = answered(lambda: TestClient(outer).post("/llm/v1/completions", json=BODY))
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"


def test_a_model_without_weights_on_the_thread_engine_is_refused_at_creation(tiny_model_dir):
    """It was accepted, and every request then got a 500 about meta tensors."""
    with pytest.raises(Gpt1Error, match=r"this model has no weights \(LLM.without_weights\): serve it with "
                                        r"engine='process', or load it with gpt1.load"):
        create_app(LLM.without_weights(tiny_model_dir))


def test_a_model_loaded_as_dot_is_served_under_its_folder_name(tiny_model_dir, monkeypatch):
    """`gpt1 serve --model .` advertised the model id "" (and `..` gave ".."): clients that pick
    /v1/models' data[0].id sent an empty name."""
    monkeypatch.chdir(tiny_model_dir)
    app = create_app(gpt1.load("."))
    with TestClient(app) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [tiny_model_dir.name]
        assert client.get("/health").json()["model"] == tiny_model_dir.name


def test_the_api_key_is_asked_for_wherever_the_app_is_mounted(llm):
    # Starlette 1.x's Mount and uvicorn's root_path keep the prefix in scope["path"] (/llm/v1/...):
    # the key check, which looked for a path starting with /v1, let every request through unkeyed.
    app = create_app(llm, api_key="sekrit")
    outer = FastAPI()
    outer.mount("/llm", app)
    try:
        for client, prefix in ((TestClient(outer), "/llm"), (TestClient(app, root_path="/gpt1"), "/gpt1")):
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = answered(lambda: client.get(f"{prefix}/v1/models", headers=headers))
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (prefix, r.text)
            ok = answered(lambda: client.get(f"{prefix}/v1/models", headers={"Authorization": "Bearer sekrit"}))
            assert ok.status_code == 200
            assert answered(lambda: client.get(f"{prefix}/health")).status_code == 200  # public, as unmounted
    finally:
        app.state.engine.stop()
