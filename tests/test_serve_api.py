"""The OpenAI-compatible API, tested through a real uvicorn server on loopback with the official
`openai` client (and raw httpx for what a client library would refuse to send)."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

import gpt1
from gpt1.core.chat_template import encode_chat
from gpt1.core.model import GPT
from gpt1.core.sampling_params import SamplingParams
from gpt1.formats.modeldir import save_model
from gpt1.inference.generate import generate
from gpt1.serve import background_server, create_app
from tests.test_battery import run_main

KEY = "test-key-0123"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def wait_for(condition, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `condition` (cheap) until true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def served_health(proc: subprocess.Popen, url: str) -> dict:
    """/health of a `gpt1 serve` subprocess ({} while it does not answer yet); a failure naming its
    stderr if it has exited."""
    assert proc.poll() is None, proc.stderr.read().decode()
    with contextlib.suppress(httpx.TransportError):
        return httpx.get(f"{url}/health").json()
    return {}


def endless_model_dir(tiny_config, tokenizer, out, block_size: int = 8192):
    """A tiny model with an 8,192-token context (by default) that never produces a special token,
    so that every reply runs to max_tokens (or the context): seconds long, long enough to interrupt."""
    import dataclasses

    torch.manual_seed(0)
    model = GPT(dataclasses.replace(tiny_config, block_size=block_size))
    with torch.no_grad():
        # Feature 0 of the final LayerNorm's output is the constant 1; special tokens read it
        # with weight -100, so their logits are ~-100 and they are never sampled.
        model.transformer.ln_f.weight[0], model.transformer.ln_f.bias[0] = 0.0, 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tokenizer.special_ids, 0] = -100.0
    return save_model(out, model, tokenizer)


@pytest.fixture(scope="module")
def long_llm(tiny_config, tokenizer, tmp_path_factory):
    return gpt1.load(endless_model_dir(tiny_config, tokenizer, tmp_path_factory.mktemp("endless")), device="cpu")


@pytest.fixture(scope="module")
def server(llm):
    app = create_app(llm)
    with background_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


# ---- the openai client ---------------------------------------------------------------------------
def test_models_and_health(server, client, tiny_model_dir):
    url, _ = server
    models = client.models.list()
    assert [m.id for m in models.data] == [tiny_model_dir.name]
    assert client.models.retrieve(tiny_model_dir.name).id == tiny_model_dir.name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["active"] == 0
    assert health["device"] == "cpu" and health["threads"] == torch.get_num_threads()  # the engine's step's
    assert "/v1/chat/completions" in httpx.get(f"{url}/openapi.json").json()["paths"]
    assert httpx.get(f"{url}/docs").status_code == 200


def test_chat_greedy_stream_equals_non_stream_equals_library(client, llm):
    kwargs = dict(model="m", messages=CHAT, max_tokens=20, temperature=0)
    full = client.chat.completions.create(**kwargs)
    parts, finish, usage, roles = [], None, None, []
    for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            roles += [choice.delta.role] if choice.delta.role else []
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    streamed = "".join(parts)

    prompt = encode_chat(llm.tokenizer, CHAT, add_generation_prompt=True)
    ref = generate(llm.model, llm.tokenizer, prompt, SamplingParams(temperature=0, max_new_tokens=20))
    message = full.choices[0].message
    assert message.role == "assistant" and roles == ["assistant"]
    assert message.content == streamed == ref.text
    assert len(parts) > 3  # streamed piece by piece, not in one block
    assert full.choices[0].finish_reason == finish == ref.finish_reason
    assert full.usage.prompt_tokens == usage.prompt_tokens == len(prompt)
    assert full.usage.completion_tokens == usage.completion_tokens == ref.completion_tokens
    assert full.usage.total_tokens == len(prompt) + ref.completion_tokens
    assert full.model == "m"


def test_completions_greedy_stream_equals_non_stream(client, llm):
    kwargs = dict(model="m", prompt="import json\n", max_tokens=16, temperature=0)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    ref = generate(llm.model, llm.tokenizer, llm.tokenizer.encode("import json\n"),
                   SamplingParams(temperature=0, max_new_tokens=16))
    assert full.choices[0].text == streamed == ref.text
    assert full.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == ref.finish_reason
    assert full.usage.completion_tokens == ref.completion_tokens
    # Token ids are a prompt too; several prompts give one choice each.
    ids = llm.tokenizer.encode("import json\n")
    assert client.completions.create(**{**kwargs, "prompt": ids}).choices[0].text == ref.text
    both = client.completions.create(**{**kwargs, "prompt": ["import json\n", "def f("]})
    assert [c.index for c in both.choices] == [0, 1] and both.choices[0].text == ref.text


def test_length_stop_and_seed(client):
    base = dict(model="m", messages=CHAT, temperature=0)
    one = client.chat.completions.create(**base, max_tokens=1)
    assert one.choices[0].finish_reason == "length" and one.usage.completion_tokens == 1
    text = client.chat.completions.create(**base, max_tokens=24).choices[0].message.content
    stop = next(text[i:i + 2] for i in range(4, len(text) - 2) if text[i:i + 2].strip())
    cut = client.chat.completions.create(**base, max_tokens=24, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[:text.index(stop)]
    # Sampling with a seed is reproducible; the extra knobs pass through the client's extra_body.
    sampled = dict(model="m", messages=CHAT, max_tokens=16, temperature=1.0, top_p=0.9, seed=1234,
                   extra_body={"top_k": 50, "min_p": 0.01, "repeat_penalty": 1.2, "repeat_last_n": 16})
    a = client.chat.completions.create(**sampled).choices[0].message.content
    b = client.chat.completions.create(**sampled).choices[0].message.content
    assert a == b


# ---- the error battery -----------------------------------------------------------------------------
MSG = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    # (name, path, body: bytes | dict, expected status, expected param or None)
    ("invalid JSON", "chat", b'{"messages": [', 400, None),
    ("JSON not an object", "chat", b"[1, 2]", 400, None),
    ("not JSON at all", "chat", b"hello", 400, None),
    ("missing messages", "chat", {"model": "m"}, 400, "messages"),
    ("messages not a list", "chat", {"messages": "hi"}, 400, "messages"),
    ("empty messages", "chat", {"messages": []}, 400, "messages"),
    ("message not an object", "chat", {"messages": ["hi"]}, 400, "messages[0]"),
    ("message without content", "chat", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("content not a string", "chat", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("unknown role", "chat", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("tool role", "chat", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ("temperature a string", "chat", {"messages": MSG, "temperature": "hot"}, 400, "temperature"),
    ("max_tokens a float", "chat", {"messages": MSG, "max_tokens": 5.5}, 400, "max_tokens"),
    ("max_tokens a bool", "chat", {"messages": MSG, "max_tokens": True}, 400, "max_tokens"),
    ("max_tokens a numeric string", "chat", {"messages": MSG, "max_tokens": "5"}, 400, "max_tokens"),
    ("stream not a bool", "chat", {"messages": MSG, "stream": "yes"}, 400, "stream"),
    ("temperature NaN", "chat", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, "temperature"),
    ("temperature out of range", "chat", {"messages": MSG, "temperature": -1}, 400, "temperature"),
    ("top_p out of range", "chat", {"messages": MSG, "top_p": 1.5}, 400, "top_p"),
    ("top_k negative", "chat", {"messages": MSG, "top_k": -1}, 400, "top_k"),
    ("max_tokens zero", "chat", {"messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens beyond the context", "chat", {"messages": MSG, "max_tokens": 100_000}, 400, "max_tokens"),
    ("prompt beyond the context", "chat", {"messages": [{"role": "user", "content": "word " * 500}]}, 400, "messages"),
    ("seed below int64", "chat", {"messages": MSG, "seed": -2**63 - 1}, 400, "seed"),
    ("too many stops", "chat", {"messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("n below 1", "chat", {"messages": MSG, "n": 0}, 400, "n"),
    ("unsupported penalty", "chat", {"messages": MSG, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("unknown field", "chat", {"messages": MSG, "temprature": 0.5}, 400, "temprature"),
    ("invalid UTF-8", "chat", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None),
    ("lone surrogate", "chat", b'{"messages": [{"role": "user", "content": "a\\ud800"}]}', 400, "messages[0].content"),
    ("missing prompt", "completions", {"max_tokens": 4}, 400, "prompt"),
    ("empty prompt list", "completions", {"prompt": []}, 400, "prompt"),
    ("token id outside the vocabulary", "completions", {"prompt": [1, 99_999]}, 400, "prompt"),
    ("logprobs past 20", "completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("top_logprobs without logprobs", "chat", {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs"),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(server, name, path, body, status, param):
    url, _ = server
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{url}/v1/{'chat/completions' if path == 'chat' else 'completions'}", **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and len(error["message"]) > 10
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param



def test_an_openai_penalty_is_told_where_repeat_penalty_is_off(server):
    """OpenAI's penalties are subtracted (0 = off); repeat_penalty is CTRL's factor (1 = off). A
    user told only "use repeat_penalty" sent OpenAI's usual 0.6 there, which makes repeats likelier."""
    url, _ = server
    for field in ("frequency_penalty", "presence_penalty"):
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": MSG, field: 0.6})
        assert r.status_code == 400 and r.json()["error"]["param"] == field
        assert "use repeat_penalty, CTRL's penalty, a factor: 1 = off, above 1 discourages repeats" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": MSG, "top_p": 0, "temperature": 0, "max_tokens": 2})
    assert r.status_code == 200, r.text  # top_p 0 asks for the most likely token, as OpenAI's clients send it

def test_errors_about_the_body_say_what_is_wrong_with_it(server):
    """A JSON object sent as text/plain, or with no Content-Type, is not parsed (FastAPI reads
    JSON bodies only): the error names the Content-Type, not the body; a body nested beyond the
    parser's depth says so."""
    url, _ = server
    body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "Content-Type: application/json (got 'text/plain')" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", content=body)
    assert r.status_code == 400 and "(got no Content-Type)" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200
    deep = b"[" * 100_000 + b"]" * 100_000
    r = httpx.post(f"{url}/v1/chat/completions", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nested less than 1,000 deep" in r.json()["error"]["message"]


def test_more_errors(server, client):
    url, _ = server
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * 500}]})
    assert r.json()["error"]["code"] == "context_length_exceeded" and "context" in r.json()["error"]["message"]
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * 2_000_000 + b'"}]}'
    assert httpx.post(f"{url}/v1/chat/completions", content=big).status_code == 413
    # A chunked body declares no length: the limit holds while reading it.
    chunked = httpx.post(f"{url}/v1/chat/completions", content=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]))
    assert chunked.status_code == 413 and "error" in chunked.json()
    assert httpx.get(f"{url}/v1/nope").json()["error"]["code"] == "not_found"
    assert "this server serves POST /v1/chat/completions" in httpx.get(f"{url}/v1/nope").json()["error"]["message"]
    assert httpx.get(f"{url}/v1/chat/completions").status_code == 405


def test_a_404_says_what_to_call_instead(server):
    """The first errors users of other tools hit were a bare 404 "Not Found" (LangChain reports any
    404 as "model not found"): a base_url without /v1, and the Responses API (the Agents SDK's default)."""
    url, _ = server
    no_v1 = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError, match=r"under /v1 \(/v1/chat/completions\); an OpenAI client's base_url "
                                                   r"ends in /v1"):
        no_v1.chat.completions.create(model="m", messages=MSG, max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="under /v1"):
        no_v1.models.list()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError, match=r"Responses API is not served here: use /v1/chat/completions"):
        client.responses.create(model="m", input="hi")
    with pytest.raises(openai.NotFoundError, match="embeddings are not served here"):
        client.embeddings.create(model="m", input="hi")
    # A route's own 404 keeps its message: a model this server does not serve.
    assert httpx.get(f"{url}/v1/models/other").json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="m", messages=[{"role": "robot", "content": "x"}])
    assert httpx.get(f"{url}/health").json()["status"] == "ok"  # still serving


def test_truncate_prompt_and_empty_prompt(client, llm):
    context = llm.config.block_size
    long = [{"role": "system", "content": "Be brief."}] + [
        {"role": role, "content": f"turn {i}: " + "words " * 8} for i, role in enumerate(["user", "assistant"] * 6)
    ] + [{"role": "user", "content": "And now?"}]
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="m", messages=long, max_tokens=8)
    reply = client.chat.completions.create(model="m", messages=long, max_tokens=8, extra_body={"truncate_prompt": True})
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens <= context
    # An empty completion prompt starts from [EOS], the boundary between documents.
    empty = client.completions.create(model="m", prompt="", max_tokens=4, temperature=0)
    assert empty.usage.prompt_tokens == 1 and empty.choices[0].finish_reason in ("stop", "length")


# ---- auth --------------------------------------------------------------------------------------
def test_api_key(llm):
    with background_server(create_app(llm, api_key=KEY)) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
            r = httpx.post(f"{url}/v1/chat/completions", json={"messages": MSG}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        # Checked before the body is parsed: no information for a caller without the key.
        assert httpx.post(f"{url}/v1/chat/completions", content=b"{").status_code == 401
        with openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        with openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as good:
            reply = good.chat.completions.create(model="m", messages=MSG, max_tokens=3)
            assert reply.usage.completion_tokens >= 1
        assert httpx.get(f"{url}/").status_code == 200  # the page and health need no key
        assert httpx.get(f"{url}/health").status_code == 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_cli_serves_with_key_from_env(tiny_model_dir):
    port = free_port()
    env = {**os.environ, "GPT1_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "gpt1", "serve", "--model", str(tiny_model_dir), "--port", str(port),
                             "--loop", "asyncio", "--stream-interval", "5", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode()
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"{url}/health").status_code == 200
            return False

        wait_for(up, timeout=60, what="gpt1 serve to start")
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        body = {"model": "m", "messages": CHAT, "max_tokens": 8, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as response:
            assert list(response.iter_lines())[-2:] == ["data: [DONE]", ""]  # streams on asyncio's loop
    finally:
        proc.terminate()  # SIGTERM: uvicorn shuts down gracefully
        proc.wait(20)
    # uvicorn drains, then re-raises the signal it handled: one line as every command's, 128 + 15
    assert proc.returncode == 128 + signal.SIGTERM
    stderr = proc.stderr.read().decode()
    assert stderr.rstrip().endswith("gpt1 serve: terminated")
    # A base model: what its chat replies will be is said at start (the server formatted them silently).
    assert "has no chat template: it is a base model, so /v1/chat/completions and the chat page" in stderr
    assert f"serving {tiny_model_dir} on http://127.0.0.1:{port}" in stderr
    assert "KV cache: 16 slots x 64 positions = " in stderr and "MiB of float32 on cpu (--max-batch 16)" in stderr


def serve_refused(capsys, *argv) -> tuple[int, str]:
    """`gpt1 serve ARGV` in this process (no interpreter start), for a refusal at start-up: its exit
    code and stderr. The open-file limit it raises on the way is put back."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        return run_main(capsys, "serve", *argv)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limit)


def test_cli_serve_refuses_a_pool_too_big_for_memory_or_a_taken_port_in_one_line(tiny_model_dir, capsys):
    # A pool that cannot fit in memory is one clear line at start-up.
    rc, err = serve_refused(capsys, "--model", tiny_model_dir, "--port", "0", "--max-batch", 10**12)
    assert rc == 2 and "Traceback" not in err
    assert re.search(r"error: max_batch 1000000000000: the KV cache needs [\d.]+ GiB .* lower max_batch$",
                     err.strip().splitlines()[-1])
    # A taken port is one clear line and exit 2, not a traceback.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        rc, err = serve_refused(capsys, "--model", tiny_model_dir, "--port", taken.getsockname()[1])
    assert rc == 2 and "Traceback" not in err and err.strip().splitlines()[-1].startswith("gpt1 serve: error: cannot listen")


# ---- disconnects and a full queue ----------------------------------------------------------------
@pytest.mark.parametrize("engine_kind", ["thread", "process"])
def test_disconnect_stops_generation(long_llm, engine_kind):
    app = create_app(long_llm, engine=engine_kind)
    engine = app.state.engine
    body = {"model": "m", "messages": MSG, "max_tokens": 8000, "temperature": 1.0}
    with background_server(app) as url:
        # Streaming: read a few tokens, then hang up.
        with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as c:
            stream = c.chat.completions.create(**body, stream=True)
            for i, _ in enumerate(stream):
                if i == 3:
                    break
            assert engine.active == 1
            stream.close()
        wait_for(lambda: engine.stats.cancelled == 1, what="the streamed generation to be cancelled")
        assert engine.active == 0 and engine.stats.completed == 0
        assert engine.stats.tokens < 8000
        # Not streaming: the client gives up (a timeout) and closes the connection.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=httpx.Timeout(5, read=0.3))
        wait_for(lambda: engine.stats.cancelled == 2, what="the non-streamed generation to be cancelled")
        assert engine.active == 0 and engine.stats.completed == 0
        assert engine.stats.tokens < 16000


@pytest.mark.parametrize("engine_kind", ["thread", "process"])
def test_full_queue_answers_503(long_llm, engine_kind):
    app = create_app(long_llm, max_batch=1, max_queue=1, engine=engine_kind)
    engine = app.state.engine
    body = {"model": "m", "messages": MSG, "max_tokens": 8000, "temperature": 1.0, "stream": True}
    with background_server(app) as url, httpx.Client(base_url=url, timeout=30) as http, contextlib.ExitStack() as streams:
        # Before any step the process engine's thread count is not known: null, not 0.
        threads = http.get("/health").json()["threads"]
        assert threads == (torch.get_num_threads() if engine_kind == "thread" else None)
        for _ in range(2):  # one generating, one waiting
            r = streams.enter_context(http.stream("POST", "/v1/chat/completions", json=body))
            assert r.status_code == 200
        wait_for(lambda: engine.active == 1 and engine.queued == 1, what="one active and one queued request")
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "server_overloaded"
        with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as c:
            with pytest.raises(openai.InternalServerError) as info:
                c.completions.create(model="m", prompt="x", max_tokens=2)
            assert info.value.status_code == 503
        health = http.get("/health").json()
        assert {k: health[k] for k in ("status", "model", "active", "queued", "free_slots", "max_batch", "device",
                                       "dtype")} == {
            "status": "ok", "model": long_llm.path.name, "active": 1, "queued": 1, "free_slots": 0, "max_batch": 1,
            "device": "cpu", "dtype": "float32"}
        assert health["tokens_per_s"] > 0
        streams.close()  # both clients hang up
        wait_for(lambda: engine.active == 0 and engine.queued == 0, what="the engine to drain")
        assert engine.stats.rejected == 2 and engine.stats.cancelled == 2


# ---- issue 17: no input reaches a 500 ----------------------------------------------------------
@pytest.mark.parametrize("knobs", [{"temperature": 1e-300}, {"temperature": 1e-45}, {"temperature": 1e-39},
                                   {"repeat_penalty": 1e-40}, {"temperature": 1e-45, "repeat_penalty": 1e-40}])
def test_extreme_knobs_are_answered_and_the_connection_lives(server, knobs):
    """Item 6: these were 500s ("probability tensor contains inf/nan"), and after two of them the
    next request on the same keep-alive connection was reset."""
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as http:
        for stream in (False, True, False):
            r = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 4, "stream": stream, **knobs})
            assert r.status_code == 200, r.text
            if stream:
                assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text
            else:
                assert r.json()["usage"]["completion_tokens"] >= 1
        assert http.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("stream", [False, True])
def test_lone_surrogate_in_any_field_is_a_400(server, stream):
    """Item 6: `"model": "\\ud800"` was a 500 UnicodeEncodeError, and with stream: true the body was cut."""
    url, _ = server
    for field, value in (("model", "\\ud800"), ("user", "x\\udfff"), ("stop", '["ok", "\\ud800"]')):
        raw = value if value.startswith("[") else f'"{value}"'
        body = f'{{"messages": [{{"role": "user", "content": "hi"}}], "stream": {str(stream).lower()}, "{field}": {raw}}}'
        r = httpx.post(f"{url}/v1/chat/completions", content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"].startswith(field) and "lone surrogate" in error["message"]
        assert error["code"] == "invalid_unicode"
        if field == "stop":  # which item: "at character 0" was of an item the message did not name
            assert "a lone surrogate at character 0 of item 1" in error["message"], error


def test_more_prompts_than_the_server_holds_is_a_400_not_a_503(llm):
    """Item 9: 100 prompts with room for 72 at most were answered `503 busy, retry`."""
    app = create_app(llm, max_batch=8, max_queue=64)
    with background_server(app) as url:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": ["x"] * 100, "max_tokens": 2}, timeout=30)
        assert r.status_code == 400 and "retry-after" not in r.headers
        error = r.json()["error"]
        assert error["code"] == "too_many_prompts" and error["param"] == "prompt"
        assert "100 prompts" in error["message"] and "at most 72" in error["message"]
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": ["x"] * 72, "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 72


def test_keyless_loopback_server_answers_only_loopback_host_names(server, llm):
    """Item 10: `Host: attacker.example` got 200 on /v1/* (DNS rebinding)."""
    url, _ = server
    port = url.rsplit(":", 1)[1]
    for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.evil.example", "10.0.0.1"):
        r = httpx.get(f"{url}/v1/models", headers={"Host": host})
        assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_host", host
        assert httpx.post(f"{url}/v1/chat/completions", json={"messages": MSG}, headers={"Host": host}).status_code == 403
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", "app.localhost"):
        assert httpx.get(f"{url}/v1/models", headers={"Host": host}).status_code == 200, host
    # With a key, other names are the operator's choice (a proxy, a LAN name): the key guards.
    with background_server(create_app(llm, api_key=KEY)) as keyed:
        r = httpx.get(f"{keyed}/v1/models", headers={"Host": "gpt1.example", "Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200


def test_slow_request_bodies_are_cut_off(llm):
    """Item 11: connections sending their body slowly were never timed out."""
    app = create_app(llm, body_timeout_s=1.0)
    with background_server(app) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"messages\": ")
            start = time.monotonic()
            received = b""
            while chunk := sock.recv(65536):  # ends when the server closes the connection
                received += chunk
            assert time.monotonic() - start < 8
        assert received.startswith(b"HTTP/1.1 408") and b"request_timeout" in received
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


@pytest.mark.parametrize("engine_kind", ["thread", "process"])
def test_64_streams_with_half_disconnecting_leave_every_slot_free(long_llm, engine_kind):
    """Issue 12: 64 concurrent streams, half of the clients hang up mid-stream; the others get
    their whole replies, and the server ends healthy with every slot free."""
    import asyncio

    app = create_app(long_llm, max_batch=16, max_queue=64, engine=engine_kind)
    engine = app.state.engine

    async def one(client, i: int) -> str:
        body = {"model": "m", "messages": MSG, "max_tokens": 24, "temperature": 1.0, "seed": i, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            events = 0
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events += 1
                    if i % 2 and events == 3:
                        return "left"  # leaving the block closes the connection mid-stream
                    if line == "data: [DONE]":
                        return "done"
        return "cut"

    async def run(url: str) -> list[str]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    with background_server(app) as url:
        outcomes = asyncio.run(run(url))
        assert outcomes.count("done") == 32 and outcomes.count("left") == 32
        wait_for(lambda: engine.active == 0 and engine.queued == 0, what="every slot to be free")
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["free_slots"] == health["max_batch"] == 16
        # A hang-up that reaches the engine after its reply's last token cancels nothing: an
        # engine in its own process, faster than the event loop here, can finish a short reply first.
        stats = engine.stats
        assert stats.completed >= 32 and stats.cancelled + stats.completed == 64 and stats.failed == 0
        assert engine.stats.failed == 0
        with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as c:  # still serving
            assert c.chat.completions.create(model="m", messages=MSG, max_tokens=3).usage.completion_tokens == 3


# ---- the bridge from the engine's thread to the event loop, and stream pacing ------------------------
class _Finished:
    def __init__(self, text: str, finish_reason: str | None = None):
        self.text, self.finish_reason = text, finish_reason


class _Request:
    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def test_mailbox_wakes_the_loop_once_for_everything_posted_before_it_runs():
    import asyncio
    import threading

    from gpt1.serve.bridge import _Mailbox

    async def main():
        loop = asyncio.get_running_loop()
        wakeups = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (wakeups.append(1), real(*a))[1]
        mailbox, queues = _Mailbox(loop), [asyncio.Queue(), asyncio.Queue()]
        # The loop is blocked in join() while the engine's thread posts 100 items: one wake-up.
        poster = threading.Thread(target=lambda: [mailbox.post(queues[i % 2], i) for i in range(100)])
        poster.start()
        poster.join()
        got = [[await q.get() for _ in range(50)] for q in queues]
        assert got == [list(range(0, 100, 2)), list(range(1, 100, 2))]
        assert len(wakeups) == 1
        mailbox.post(queues[0], "next")  # after a delivery, the next post wakes the loop again
        assert await queues[0].get() == "next" and len(wakeups) == 2

    asyncio.run(main())


def test_chunk_batches_groups_what_is_waiting_paces_by_interval_and_ends_at_once():
    import asyncio

    from gpt1.serve.bridge import chunk_batches

    async def main():
        loop = asyncio.get_running_loop()
        requests, queue = [_Request()], asyncio.Queue()
        batches = chunk_batches(requests, queue, interval=0.3)
        queue.put_nowait((0, _Finished("a")))
        queue.put_nowait((0, _Finished("b")))
        t0 = loop.time()
        assert [c.text for _, c in await anext(batches)] == ["a", "b"]  # the first at once, all that waits
        queue.put_nowait((0, _Finished("c")))
        loop.call_later(0.1, queue.put_nowait, (0, _Finished("d")))
        assert [c.text for _, c in await anext(batches)] == ["c", "d"]  # held for the interval
        assert loop.time() - t0 >= 0.29
        t1 = loop.time()
        queue.put_nowait((0, _Finished("", "stop")))
        assert [c.finish_reason for _, c in await anext(batches)] == ["stop"]
        assert loop.time() - t1 < 0.25  # the end is not held back
        with pytest.raises(StopAsyncIteration):
            await anext(batches)
        assert requests[0].cancelled

        # An error after chunks: the chunks first, then the error; the requests are cancelled.
        requests, queue = [_Request(), _Request()], asyncio.Queue()
        for item in ((0, _Finished("x")), (1, _Finished("y")), (0, RuntimeError("boom")), (1, _Finished("z"))):
            queue.put_nowait(item)
        batches = chunk_batches(requests, queue)
        assert [c.text for _, c in await anext(batches)] == ["x", "y"]
        with pytest.raises(RuntimeError, match="boom"):
            await anext(batches)
        assert all(r.cancelled for r in requests)

    asyncio.run(main())


def test_stream_interval_sends_the_same_events_in_fewer_writes(long_llm):
    """Through a real server: with --stream-interval the reply is the same events, and the tokens
    after the first wait for the interval instead of going out one by one."""
    body = {"model": "m", "messages": MSG, "max_tokens": 30, "temperature": 0, "stream": True}

    def stream(interval_ms: float) -> tuple[list[str], list[float]]:
        with background_server(create_app(long_llm, stream_interval_ms=interval_ms)) as url:
            events, arrivals = [], []
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
                        arrivals.append(time.monotonic())
        return events, arrivals

    plain, _ = stream(0)
    paced, arrivals = stream(400)
    content = lambda events: [e for e in events if '"content":' in e and '"content":""' not in e]  # noqa: E731
    strip_ids = lambda events: [re.sub(r'"(id|created)":[^,]+,', "", e) for e in events]  # noqa: E731
    assert strip_ids(paced) == strip_ids(plain) and paced[-1] == "data: [DONE]"
    assert len(content(paced)) > 10  # an event per token that completes a character, as without pacing
    times = [t for e, t in zip(paced, arrivals) if e in content(paced)]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) >= 0.35  # tokens waited out the interval...
    assert sum(gap > 0.05 for gap in gaps) < len(times) / 2  # ...and then went out together


@pytest.mark.parametrize("value", ["-1", "nan", "1e9"])
def test_stream_interval_out_of_range_is_one_clear_line(tiny_model_dir, capsys, value):
    from gpt1.cli import main

    assert main(["serve", "--model", str(tiny_model_dir), "--port", "0", "--stream-interval", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"gpt1 serve: error: --stream-interval must be in [0, 10000] milliseconds, got {float(value)}"


# ---- unsupported OpenAI fields, stream_options, content parts, stop (review findings) ----------
def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/{'chat/completions' if path == 'chat' else 'completions'}", json=body, timeout=30)


UNSUPPORTED = [
    # (path, field, value): OpenAI fields this server does not implement, at a value that asks for them.
    ("chat", "response_format", {"type": "json_object"}),
    ("chat", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("chat", "tool_choice", "required"), ("chat", "store", True), ("chat", "metadata", {"k": "v"}),
    ("chat", "modalities", ["text", "audio"]), ("chat", "audio", {"voice": "alloy", "format": "wav"}),
    ("chat", "prediction", {"type": "content", "content": "x"}), ("chat", "reasoning_effort", "low"),
    ("chat", "verbosity", "low"), ("chat", "web_search_options", {}), ("chat", "service_tier", "flex"),
    ("chat", "functions", [{"name": "f"}]), ("chat", "function_call", {"name": "f"}),
    ("chat", "moderation", {"model": "omni-moderation-latest"}),
]


@pytest.mark.parametrize("path,field,value", UNSUPPORTED, ids=[f"{p}-{f}={v}" for p, f, v in UNSUPPORTED])
def test_unsupported_openai_fields_are_named_not_called_typos(server, path, field, value):
    url, _ = server
    body = {"messages": MSG} if path == "chat" else {"prompt": "x"}
    r = post(url, path, {**body, "max_tokens": 2, field: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["code"] == "unsupported_parameter"
    assert error["message"].startswith(f"{field}=") and "not supported by this server" in error["message"]


NEUTRAL = [
    # (path, fields): what clients send by default, which asks for nothing this server lacks.
    ("completions", {"logprobs": None}),
    ("chat", {"logprobs": False, "top_logprobs": 0}), ("chat", {"logprobs": None, "top_logprobs": None}),
    ("chat", {"tools": [], "tool_choice": "none", "parallel_tool_calls": True}), ("chat", {"tools": None}),
    ("chat", {"response_format": {"type": "text"}, "store": False, "metadata": None, "modalities": ["text"]}),
    ("chat", {"service_tier": "auto", "functions": [], "function_call": "none", "verbosity": "medium",
              "audio": None, "prediction": None, "reasoning_effort": None, "web_search_options": None,
              "prompt_cache_key": "k", "safety_identifier": "u1"}),
    # Fields of openai 3.x's chat.completions.create, once "unrecognized request argument"s here.
    ("chat", {"prompt_cache_retention": "24h", "prompt_cache_options": {"ttl": "5m"}, "moderation": None}),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello",
                                                         "prompt_cache_breakpoint": {"mode": "explicit"}}]}]}),
]


@pytest.mark.parametrize("path,fields", NEUTRAL, ids=[f"{p}-{sorted(f)}" for p, f in NEUTRAL])
def test_unsupported_openai_fields_at_neutral_values_are_accepted(server, path, fields):
    url, _ = server
    body = {"messages": MSG} if path == "chat" else {"prompt": "x"}
    r = post(url, path, {**body, "max_tokens": 2, **fields})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("path", ["chat", "completions"])
def test_stream_options_without_stream_is_a_400(server, path):
    url, _ = server
    body = {"messages": MSG} if path == "chat" else {"prompt": "x"}
    for stream in ({}, {"stream": False}):
        r = post(url, path, {**body, **stream, "max_tokens": 2, "stream_options": {"include_usage": True}})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "stream_options" and "only allowed when stream is true" in error["message"]
    assert post(url, path, {**body, "max_tokens": 2, "stream_options": None}).status_code == 200


CONTENT = [
    # (content, param, message)
    ([{"type": "image_url", "image_url": {"url": "http://x/a.png"}}], "messages[0].content[0]",
     "content part type \"image_url\" is not supported; only text parts"),
    ([{"type": "text", "text": "a"}, {"type": "text"}], "messages[0].content[1].text", "missing required field"),
    ([{"type": "text", "text": "a", "cache": 1}], "messages[0].content[0].cache", "unrecognized request argument"),
    (["hi"], "messages[0].content[0]", "a content part must be an object"),
    (5, "messages[0].content", "content must be a string or a list of text parts (got 5)"),
]


@pytest.mark.parametrize("content,param,message", CONTENT, ids=[c[1] + "-" + c[2][:20] for c in CONTENT])
def test_content_part_errors_say_which_part_and_why(server, content, param, message):
    url, _ = server
    r = post(url, "chat", {"messages": [{"role": "user", "content": content}], "max_tokens": 2})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(f"{param}: {message}"), error
    parts = [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]
    assert post(url, "chat", {"messages": [{"role": "user", "content": parts}], "max_tokens": 2}).status_code == 200


PROMPTS = [
    # (prompt, param, message): a mixed list was "prompt: Input should be a valid string".
    (["a", 1], "prompt", "prompt: must be a string, a list of strings, a list of token ids (integers) or a list of "
                         "token-id lists (one kind per list) (got [\"a\", 1])"),
    ([[1, 2], "a"], "prompt", "prompt: must be a string"), ([1.5], "prompt", "prompt: must be a string"),
    ([True], "prompt", "prompt: must be a string"), (None, "prompt", "prompt: must be a string"),
    ([[1, "x"]], "prompt[0][1]", "prompt[0][1]: Input should be a valid integer"),
]


@pytest.mark.parametrize("prompt,param,message", PROMPTS, ids=[str(p[0]) for p in PROMPTS])
def test_a_prompt_of_no_accepted_form_says_which_forms_there_are(server, prompt, param, message):
    url, _ = server
    r = post(url, "completions", {"prompt": prompt, "max_tokens": 2})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(message), error
    for good in ("a", ["a", "b"], [5, 6], [[5], [6]]):
        assert post(url, "completions", {"prompt": good, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("stop,shown", [("", '""'), (["ok", ""], '["ok", ""]')])
def test_empty_stop_string_error_shows_the_json_sent(server, stop, shown):
    url, _ = server
    r = post(url, "chat", {"messages": MSG, "max_tokens": 2, "stop": stop})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "stop" and error["message"].endswith(f"(got {shown})"), error
    assert "(" + "''" not in error["message"]  # not Python's tuple


@pytest.mark.parametrize("engine_kind", ["thread", "process"])
def test_busy_503_reports_the_requests_the_server_holds(long_llm, engine_kind):
    """The 503 said "(2 requests generating, 0 waiting)" with --max-batch 1 (the process engine
    counted every request it held as generating), and the thread engine "0 generating" while a
    request it had accepted was about to run (a waiting request is admitted at the next step)."""
    app = create_app(long_llm, max_batch=1, max_queue=1, engine=engine_kind)
    engine = app.state.engine
    gate = threading.Event()
    if engine_kind == "thread":  # hold the engine before it admits anything: both requests wait
        step = engine.step
        engine.step = lambda: (gate.wait(30), step())
    body = {"model": "m", "messages": MSG, "max_tokens": 8000, "temperature": 1.0, "stream": True}
    with background_server(app) as url, httpx.Client(base_url=url, timeout=30) as http, contextlib.ExitStack() as streams:
        for _ in range(2):
            assert streams.enter_context(http.stream("POST", "/v1/chat/completions", json=body)).status_code == 200
        if engine_kind == "thread":
            assert (engine.active, engine.queued) == (0, 2)
        else:
            wait_for(lambda: engine.active == 1 and engine.queued == 1, what="one active and one queued request")
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 503, r.text
        assert "(1 of 1 slots generating, 1 of 1 queue places waiting)" in r.json()["error"]["message"]
        gate.set()
        streams.close()
        wait_for(lambda: engine.active == 0 and engine.queued == 0, what="the engine to drain")
