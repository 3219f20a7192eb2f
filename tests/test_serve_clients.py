"""`gpt1 serve` as third-party OpenAI clients use it: openai-node's CORS preflights,
origins as people write them, the context errors client libraries recognise, request strings
that look like the server's own, and HTTP/1.0 streams. Real uvicorn servers on loopback, the
real `openai` client, raw sockets where a client library would not send the request."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import openai
import pytest

from gpt1.core.errors import Gpt1Error
from gpt1.core.sampling_params import SamplingParams
from gpt1.inference.engine import Engine
from gpt1.serve import background_server, create_app
from gpt1.serve.app import cors_origin
from gpt1.serve.bridge import submit
from gpt1.serve.streaming import chat_events
from tests.test_serve_api import wait_for
from tests.test_serve_hostile import address, read_until_closed

KEY = "k"
MSG = [{"role": "user", "content": "Name a colour."}]
# What openai-node (and LangChain.js over it) asks a preflight to allow, in a browser too.
OPENAI_NODE_HEADERS = ("authorization,content-type,openai-beta,openai-organization,openai-project,x-stainless-arch,"
                       "x-stainless-lang,x-stainless-os,x-stainless-package-version,x-stainless-retry-count,"
                       "x-stainless-runtime,x-stainless-runtime-version,x-stainless-timeout")


@pytest.fixture(scope="module")
def server(llm):
    # Origins as copied from an address bar, or typed in capitals: written as browsers send them.
    app = create_app(llm, api_key=KEY, cors_origins=["HTTPS://App.Example/", "http://localhost:3000/"])
    with background_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=30) as c:
        yield c


def preflight(url: str, origin: str, headers: str = "authorization,content-type") -> httpx.Response:
    return httpx.options(f"{url}/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": headers})


# ---- CORS: openai-node's headers, origins as written ---------------------------------------------
def test_openai_node_preflights_are_allowed_and_retry_after_is_readable(server):
    """openai-node sends x-stainless-* (and openai-*) headers on every call: their preflight got
    400 'Disallowed CORS headers', so no browser page could use the client."""
    r = preflight(server, "https://app.example", OPENAI_NODE_HEADERS)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    allowed = {h.strip() for h in r.headers["access-control-allow-headers"].lower().split(",")}
    assert set(OPENAI_NODE_HEADERS.split(",")) <= allowed
    assert "access-control-allow-credentials" not in r.headers  # no cookies: the key is the page's own header
    # Another origin is still refused, whatever headers it asks for.
    r = preflight(server, "https://evil.example", OPENAI_NODE_HEADERS)
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    # The page's client can read a 503's Retry-After to wait before it retries.
    r = httpx.get(f"{server}/v1/models", headers={"Origin": "https://app.example", "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and "retry-after" in r.headers["access-control-expose-headers"].lower()


def test_cors_origins_are_written_as_browsers_send_them(server, llm, tiny_model_dir, capsys):
    """`http://localhost:3000/` (an address bar's), `HTTP://LOCALHOST:3000` and `localhost:3000`
    were taken as they were and never matched a page's Origin, without a word at start."""
    for origin in ("https://app.example", "http://localhost:3000"):  # given as HTTPS://App.Example/, .../
        assert preflight(server, origin).status_code == 200, origin
    assert cors_origin("HTTP://LOCALHOST:3000") == "http://localhost:3000"
    assert cors_origin("https://app.example:443/") == "https://app.example"  # browsers leave out a default port
    assert cors_origin("http://[::1]:8080") == "http://[::1]:8080" and cors_origin("*") == "*"
    for bad in ("localhost:3000", "app.example", "https://app.example/chat", "null", "http://h:99999"):
        with pytest.raises(Gpt1Error, match=rf"^cors_origins '{bad}': expected an origin, scheme://host\[:port\]"):
            create_app(llm, cors_origins=[bad])
    with pytest.raises(Gpt1Error, match="cors_origins: expected a list of origins, got the string"):
        create_app(llm, cors_origins="https://app.example")
    from gpt1.cli import main

    assert main(["serve", "--model", str(tiny_model_dir), "--port", "0", "--cors-origin", "localhost:3000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gpt1 serve: error: --cors-origin 'localhost:3000': expected an origin, "
                              "scheme://host[:port]")


# ---- request strings that look like the server's ------------------------------------------------
@pytest.mark.parametrize("path", ["chat", "completions"])
@pytest.mark.parametrize("model", ["\x00text\x00", '"0" "1" \\'])
def test_a_stream_echoes_any_model_string_intact(server, client, path, model):
    """A `model` of "\\u0000text\\u0000" held the marker the event template was cut at: a chat
    stream broke after its first event (a traceback), a completions stream got a server_error event,
    and both left their rows generating for nobody (/health "active" stayed up)."""
    knobs = dict(model=model, max_tokens=6, temperature=0)
    if path == "chat":
        whole = client.chat.completions.create(messages=MSG, **knobs)
        chunks = list(client.chat.completions.create(messages=MSG, stream=True, **knobs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        expected = whole.choices[0].message.content
    else:
        whole = client.completions.create(prompt="Name a colour.", **knobs)
        chunks = list(client.completions.create(prompt="Name a colour.", stream=True, **knobs))
        text = "".join(c.choices[0].text for c in chunks)
        expected = whole.choices[0].text
    assert whole.model == model and {c.model for c in chunks} == {model}
    assert text == expected and chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    health = httpx.get(f"{server}/health").json()
    assert (health["active"], health["queued"]) == (0, 0)


def test_a_chat_stream_that_ends_before_generating_cancels_its_request(llm):
    """The chat stream's first event went out before the part that cancels its requests: a stream
    closed or failed there (an error, a client gone) left its row generating up to max_tokens."""
    engine = Engine(llm.model, llm.tokenizer, max_batch=1).start()

    async def main():
        params = SamplingParams(max_new_tokens=60, temperature=1.0).validate()
        requests, queue = submit(engine, [llm.tokenizer.encode("Name a colour.")], params)
        events = chat_events(requests, queue, "chatcmpl-1", 0, "m", False, 0.0)
        assert '"role": "assistant"' in await anext(events)
        await events.aclose()  # how the event loop ends a stream dropped there (its client gone)
        assert requests[0].cancelled

    try:
        asyncio.run(main())
        wait_for(lambda: engine.active == 0, what="the row to be freed")
    finally:
        engine.stop()


# ---- the context errors client libraries recognise ----------------------------------------------
def context_error(call) -> dict:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    error = caught.value
    assert error.code == "context_length_exceeded", error
    # LiteLLM (ContextWindowExceededError, its Router's context_window_fallbacks) looks for this in
    # str(error), which with openai 2.x holds Python's repr of the body: a '"' in the message
    # escapes the apostrophe there, and the sentence is not found.
    assert "this model's maximum context length is 64 tokens" in repr({"error": error.body}).lower(), error.body
    return error.body


def test_context_errors_are_worded_and_coded_as_openai_and_vllm_do(client, llm):
    """gpt1 said "the prompt is 303 tokens; this model's context is ..." and "... or send
    \\"truncate_prompt\\": true", which LiteLLM read as a plain BadRequestError; a system message
    that left no room had no code at all."""
    assert llm.config.block_size == 64
    long = "word " * 80
    lead = "This model's maximum context length is 64 tokens. However, "
    e = context_error(lambda: client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": long}]))
    assert e["message"].startswith(lead + "the messages resulted in ")
    e = context_error(lambda: client.chat.completions.create(model="m", messages=MSG, max_tokens=60))
    assert e["message"].startswith(lead + "you requested ") and "in the messages, 60 in the completion)" in e["message"]
    assert e["param"] == "max_tokens"
    e = context_error(lambda: client.chat.completions.create(model="m", messages=MSG, max_completion_tokens=500))
    assert e["message"].startswith(lead + "you requested 500 tokens in the completion (max_completion_tokens)")
    e = context_error(lambda: client.completions.create(model="m", prompt=["hi", long], max_tokens=1))
    assert e["message"].startswith(lead + "prompt[1] resulted in ") and e["param"] == "prompt"
    # With truncate_prompt, a system message that leaves no room: the same code and sentence.
    e = context_error(lambda: client.chat.completions.create(
        model="m", max_tokens=4, extra_body={"truncate_prompt": True},
        messages=[{"role": "system", "content": long}, {"role": "user", "content": "hi"}]))
    assert e["message"].startswith("the system message leaves no room for the conversation") and e["param"] == "messages"


# ---- HTTP/1.0 -------------------------------------------------------------------------------------
def raw_post(url: str, body: dict, version: str) -> tuple[str, str]:
    """(head, body) of the reply to a POST /v1/chat/completions over `version`, read until closed."""
    data = json.dumps(body).encode()
    with socket.create_connection(address(url), timeout=30) as sock:
        sock.sendall(f"POST /v1/chat/completions {version}\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
                     .encode() + data)
        head, _, rest = read_until_closed(sock).decode().partition("\r\n\r\n")
    return head.lower(), rest


def test_an_http10_stream_is_sent_as_it_is_and_ended_by_closing(server):
    """An HTTP/1.0 client got its stream chunked (RFC 9112 6.1: never to a 1.0 request), and read
    the chunk sizes as part of the body."""
    body = {"messages": MSG, "max_tokens": 4, "temperature": 0, "stream": True}
    head, events = raw_post(server, body, "HTTP/1.0")
    assert head.startswith("http/1.1 200") and "transfer-encoding" not in head and "connection: close" in head
    assert events.startswith("data: {") and events.endswith("data: [DONE]\n\n")
    assert all(e.startswith("data: ") for e in events.split("\n\n") if e)
    chunks = [json.loads(e.removeprefix("data: ")) for e in events.split("\n\n")[:-2]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    # Over HTTP/1.1 the stream stays chunked; a reply of known length keeps its Content-Length.
    assert "transfer-encoding: chunked" in raw_post(server, body, "HTTP/1.1")[0]
    head, reply = raw_post(server, {**body, "stream": False}, "HTTP/1.0")
    assert f"content-length: {len(reply.encode())}" in head
    assert json.loads(reply)["choices"][0]["message"]["content"] == text
