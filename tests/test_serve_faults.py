"""What the log and the client get when generation fails inside `gpt1 serve`: a failed stream
said in the log, one traceback for one fault however many requests it fails, logits that
overflow, a panic mid-stream. Real uvicorn servers on loopback, faults injected by patching the
decoder, a model whose logits overflow."""

from __future__ import annotations

import contextlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import httpx
import pytest
import torch

import gpt1
from gpt1.inference.decoding import TextState
from gpt1.serve import background_server, create_app


@pytest.fixture
def failing_decoder(monkeypatch):
    """Every token a request makes fails in its decoder: a fault inside generation."""
    def add(self, token):
        raise RuntimeError("boom inside decoding")

    monkeypatch.setattr(TextState, "add", add)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def logged(*names: str) -> Iterator[list[logging.LogRecord]]:
    """The records of these loggers meanwhile. uvicorn's are configured (their handlers replaced)
    when a server is made: open this inside `background_server`."""
    handler = _Records()
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def completion(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"prompt": "def f(x):", "max_tokens": 8, "temperature": 0, **body},
                      timeout=30)


# ---- failures of generation in the log ----------------------------------------------------------
def test_a_failed_stream_is_said_in_the_log(llm, failing_decoder):
    """A fault in a stream reached its client as an error event and nothing else: no line in the
    log, whose access line said 200 OK. An operator whose clients stream never saw it."""
    app = create_app(llm, max_batch=2)
    with background_server(app) as url, logged("gpt1", "uvicorn.error") as records:
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30, json={
                "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True}) as r:
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200
    assert json.loads(events[-1])["error"] == {"message": "generation failed: RuntimeError: boom inside decoding",
                                               "type": "server_error", "param": None, "code": None}
    [record] = records
    assert (record.name, record.levelname) == ("gpt1", "ERROR")
    assert record.getMessage() == "a request got 500: generation failed: RuntimeError: boom inside decoding"
    assert record.exc_info[1].args == ("boom inside decoding",)  # the traceback, to find the fault


def test_one_fault_in_many_requests_is_one_traceback(llm, failing_decoder):
    """Each non-streamed request that generation failed was logged by uvicorn as a ~90-line
    traceback ("Exception in ASGI application"): 4 copies for one fault in a batch of 4."""
    app = create_app(llm, max_batch=4)
    with background_server(app) as url, logged("gpt1", "uvicorn.error") as records:
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: completion(url), range(4)))
        second = completion(url)
    for r in [*replies, second]:
        assert r.status_code == 500
        assert r.json()["error"] == {"message": "generation failed: RuntimeError: boom inside decoding",
                                     "type": "server_error", "param": None, "code": None}
    # One line, with the traceback; the others, within 5 s of it, are counted in the next line.
    assert [(r.name, r.getMessage()) for r in records] == [
        ("gpt1", "a request got 500: generation failed: RuntimeError: boom inside decoding")]
    assert records[0].exc_info is not None


def test_logits_that_overflow_are_a_server_error(tiny_model_dir):
    """A model whose logits are NaN or infinite failed every request with 400
    invalid_request_error, the client blamed for the model's fault, and nothing in the log."""
    llm = gpt1.load(tiny_model_dir, device="cpu")
    with torch.no_grad():
        llm.model.transformer.ln_f.bias.fill_(float("inf"))  # as a float16 model that overflows
    app = create_app(llm, max_batch=2)
    message = ("generation failed: the model's next-token logits are NaN or infinite (running in float32); its "
               "weights or adapter make the forward pass overflow")
    with background_server(app) as url, logged("gpt1") as records:
        r = completion(url)
        with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                          json={"prompt": "def f(x):", "max_tokens": 8, "stream": True}) as stream:
            last = [line for line in stream.iter_lines() if line.startswith("data: ")][-1]
    assert r.status_code == 500
    assert r.json()["error"] == {"message": message, "type": "server_error", "param": None, "code": None}
    assert json.loads(last.removeprefix("data: "))["error"]["type"] == "server_error"
    # Said once (the stream's, within 5 s, counted in the next line), and with no traceback: the
    # message names the fault.
    assert [(r.getMessage(), r.exc_info) for r in records] == [(f"a request got 500: {message}", None)]


class _Panic(BaseException):
    """As pyo3's PanicException (a Rust panic in the tokenizer): a BaseException, not an Exception."""


def test_a_panic_in_a_stream_is_an_error_event_and_the_server_goes_on(llm, monkeypatch):
    """The engine ends only the row a panic hit, but the stream's handler caught only Exception:
    the stream was cut off (the client read an incomplete chunked body) and its fault went unsaid."""
    def add(self, token):
        raise _Panic("rust panicked")

    app = create_app(llm, max_batch=2)
    with background_server(app) as url:
        monkeypatch.setattr(TextState, "add", add)
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30, json={
                "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True}) as r:
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-1])["error"]["message"] == "generation failed: _Panic: rust panicked"
        monkeypatch.undo()
        assert completion(url).status_code == 200
