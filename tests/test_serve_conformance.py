"""The API as OpenAI's clients and /openapi.json describe it: what the official `openai` client
sends back (a reply's message, nullable fields at null), what the schema promises (the error
responses, the event stream, each knob's bounds, the values of unimplemented fields), and the
error bodies of requests that never reach a route (malformed HTTP, compressed or unreadable
bodies). A real uvicorn server on loopback, the real `openai` client, raw sockets where a client
library would not send the request."""

from __future__ import annotations

import gzip
import json
import socket

import httpx
import jsonschema
import openai
import pytest

from gpt1.serve import background_server, create_app

MSG = [{"role": "user", "content": "Name a colour."}]
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@pytest.fixture(scope="module")
def server(llm):
    with background_server(create_app(llm)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def spec(server) -> dict:
    return httpx.get(f"{server}/openapi.json").json()


def post(url: str, path: str, body: dict) -> httpx.Response:
    """A one-token request with these fields."""
    base = {"messages": MSG} if path == "chat" else {"prompt": "x"}
    if "max_completion_tokens" not in body:
        base["max_tokens"] = 1
    return httpx.post(url + PATHS[path], json={**base, **body}, timeout=30)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


# ---- what the openai client sends back ------------------------------------------------------------
def test_a_reply_appended_as_openai_dumps_it_is_accepted(server, client):
    """openai's `message.model_dump()` holds refusal, audio, function_call, tool_calls and
    annotations at null: the usual way to continue a conversation. Null content is an assistant's only."""
    reply = client.chat.completions.create(model="m", messages=MSG, max_tokens=3)
    dumped = reply.choices[0].message.model_dump()
    assert {"refusal", "tool_calls", "function_call", "audio", "annotations"} <= set(dumped)
    more = client.chat.completions.create(model="m", messages=MSG + [dumped, {"role": "user", "content": "More."}],
                                          max_tokens=3)
    assert more.choices[0].finish_reason in ("stop", "length")
    # The tokens of the dumped message are those of role + content alone.
    plain = client.chat.completions.create(model="m", max_tokens=3, messages=MSG + [
        {"role": "assistant", "content": dumped["content"]}, {"role": "user", "content": "More."}])
    assert more.usage.prompt_tokens == plain.usage.prompt_tokens

    empty_lists = {"role": "assistant", "content": None, "tool_calls": [], "annotations": []}
    r = post(server, "chat", {"messages": MSG + [empty_lists, {"role": "user", "content": "x"}]})
    assert r.status_code == 200, r.text
    # Null content reads as "": the same prompt as an empty string.
    assert r.json()["usage"] == post(server, "chat", {"messages": MSG + [
        {"role": "assistant", "content": ""}, {"role": "user", "content": "x"}]}).json()["usage"]

    error = error_of(post(server, "chat", {"messages": [{"role": "user", "content": None}]}), 400)
    assert error["param"] == "messages[0].content" and "null only in an assistant message" in error["message"]
    for field, value in [("tool_calls", [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]),
                         ("refusal", "I cannot."), ("function_call", {"name": "f", "arguments": "{}"})]:
        message = {"role": "assistant", "content": None, field: value}
        error = error_of(post(server, "chat", {"messages": MSG + [message, {"role": "user", "content": "x"}]}), 400)
        assert error["param"] == f"messages[1].{field}" and error["code"] == "unsupported_parameter"
        assert error["message"].startswith(f"messages[1].{field}=") and "not supported by this server" in error["message"]


NULLABLE = [("chat", field) for field in ("n", "frequency_penalty", "presence_penalty", "stream", "truncate_prompt")] \
    + [("completions", field) for field in ("n", "echo", "stream", "truncate_prompt")]


@pytest.mark.parametrize("path,field", NULLABLE, ids=[f"{p}-{f}" for p, f in NULLABLE])
def test_openai_nullable_fields_take_null_as_their_default(server, path, field):
    r = post(server, path, {field: None})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"  # stream: null is no stream


def test_an_empty_suffix_asks_for_nothing(server):
    assert post(server, "completions", {"suffix": ""}).status_code == 200
    assert error_of(post(server, "completions", {"suffix": "end"}), 400)["code"] == "unsupported_parameter"


# ---- streams ----------------------------------------------------------------------------------------
def events(url: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", url + PATHS[path], timeout=30, json={
            **({"messages": MSG} if path == "chat" else {"prompt": ["x", "y"]}), "max_tokens": 3, **body}) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


@pytest.mark.parametrize("path", ["chat", "completions"])
def test_include_usage_puts_usage_null_in_every_other_chunk(server, path):
    """OpenAI: "All other chunks will also include a usage field, but with a null value"."""
    for obfuscation in (False, True, None):  # OpenAI's stream option; there is no obfuscation here
        chunks = events(server, path, {"stream": True, "stream_options": {"include_usage": True,
                                                                            "include_obfuscation": obfuscation}})
        assert [c["usage"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
        assert not any("obfuscation" in c for c in chunks)
    assert not any("usage" in c for c in events(server, path, {"stream": True}))


# ---- /openapi.json tells the truth --------------------------------------------------------------
def test_openapi_documents_the_error_body_and_the_event_stream(server, spec):
    text = json.dumps(spec)
    assert '"422"' not in text and "HTTPValidationError" not in text  # FastAPI's; this server answers 400
    for path, statuses in [(PATHS["chat"], {"400", "401", "403", "408", "413", "415", "431", "503"}),
                           (PATHS["completions"], {"400", "401", "403", "408", "413", "415", "431", "503"}),
                           ("/v1/models/{model_id}", {"401", "403", "404", "408", "431"}), ("/health", {"503"})]:
        (operation,) = spec["paths"][path].values()
        assert statuses | {"default"} <= set(operation["responses"]), path
        for status in statuses | {"default"}:
            schema = operation["responses"][status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (path, status)
    for path in PATHS.values():
        assert "text/event-stream" in spec["paths"][path]["post"]["responses"]["200"]["content"]

    # The bodies the server answers with are the documented ErrorResponse.
    error_schema = {"$ref": "#/components/schemas/ErrorResponse", "components": spec["components"]}
    for r in [post(server, "chat", {"n": 0}), post(server, "completions", {"prompt": 5}),
              httpx.get(f"{server}/v1/models/nope"), httpx.post(f"{server}/v1/completions", content=b"{")]:
        assert r.status_code in (400, 404)
        jsonschema.validate(r.json(), error_schema)


def properties(spec: dict, path: str) -> dict:
    ref = spec["paths"][PATHS[path]]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return spec["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]


def bound_cases(spec: dict) -> list[tuple[str, str, object, bool]]:
    """(path, field, value, accepted): each numeric bound of the schema, the value at it (or
    next to it, inside) and the one past it."""
    cases = []
    for path in PATHS:
        for field, schema in properties(spec, path).items():
            integer = any(option.get("type") == "integer" for option in schema.get("anyOf", [schema]))
            number, step = (int, 1) if integer else (float, 1e-6)  # JSON's 1.0 is no integer to the server
            for keyword, inside, outside in [("minimum", 0, -step), ("maximum", 0, step),
                                             ("exclusiveMinimum", step, 0), ("exclusiveMaximum", -step, 0)]:
                if keyword in schema:
                    bound = number(schema[keyword])
                    cases += [(path, field, bound + inside, True), (path, field, bound + outside, False)]
    return cases


def test_openapi_bounds_are_the_ones_the_server_enforces(server, spec):
    """Every minimum/maximum in the schema is accepted and the value past it refused, naming the
    field; so that a client or a fuzzer that follows the schema gets no 400 for a value in it."""
    cases = bound_cases(spec)
    fields = {field for _, field, _, _ in cases}
    assert {"temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n", "seed", "max_tokens",
            "max_completion_tokens"} <= fields
    for path, field, value, accepted in cases:
        # top_logprobs needs logprobs: true (the schema's rule says so)
        extra = {"logprobs": True} if field == "top_logprobs" else {}
        if field in ("max_tokens", "max_completion_tokens"):  # the most leave room for the shortest prompt
            extra = {"messages": [{"role": "user", "content": ""}]} if path == "chat" else {"prompt": ""}
        r = post(server, path, {field: value, **extra})
        if accepted:
            assert r.status_code == 200, (path, field, value, r.text)
        else:
            assert error_of(r, 400)["param"] == field, (path, field, value)
    stop = properties(spec, "chat")["stop"]
    assert (stop["maxItems"], stop["minLength"], stop["items"]) == (4, 1, {"minLength": 1})
    assert post(server, "chat", {"stop": ["a", "b", "c", "d"]}).status_code == 200
    for bad in (["a", "b", "c", "d", "e"], "", ["a", ""]):
        assert error_of(post(server, "chat", {"stop": bad}), 400)["param"] == "stop"


def test_openapi_enums_of_unimplemented_fields_are_the_values_accepted(server, spec):
    """An unimplemented field's `enum` lists what the server accepts, each value of it answered 200."""
    for path in PATHS:
        enums = {field: schema["enum"] for field, schema in properties(spec, path).items() if "enum" in schema}
        assert {"frequency_penalty", "logit_bias"} <= set(enums)
        for field, values in enums.items():
            for value in values:
                r = post(server, path, {field: value})
                assert r.status_code == 200, (path, field, value, r.text)
    assert properties(spec, "chat")["modalities"]["enum"] == [None, ["text"]]  # [] is refused
    schemas = spec["components"]["schemas"]
    message = schemas["ChatMessage"]["properties"]
    assert message["tool_calls"]["enum"] == [None, []] and message["refusal"]["enum"] == [None]
    # The checks across fields, as if/else: null content is an assistant's; stream_options needs stream.
    assert schemas["ChatMessage"]["if"] == {"properties": {"role": {"const": "assistant"}}}
    assert schemas["ChatMessage"]["else"] == {"properties": {"content": {"not": {"type": "null"}}}}
    assert schemas["CompletionRequest"]["else"] == {"properties": {"stream_options": {"type": "null"}}}


# ---- requests that never reach a route -----------------------------------------------------------
def raw(url: str, request: bytes) -> tuple[bytes, dict[str, str], bytes]:
    """Send bytes on a fresh connection; (status line, headers, body) of the answer, read to the close."""
    host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    return status, {k.decode().lower(): v.decode().strip() for k, _, v in (line.partition(b":") for line in lines)}, body


MALFORMED = {
    "Content-Length with Transfer-Encoding": b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "two Content-Lengths": b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
}


@pytest.mark.parametrize("headers", MALFORMED.values(), ids=list(MALFORMED))
def test_malformed_http_gets_the_openai_error_body(server, headers):
    status, head, body = raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
                                     b"Content-Type: application/json\r\n" + headers)
    assert status == b"HTTP/1.1 400 Bad Request"
    assert head["content-type"] == "application/json" and head["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["code"] == "invalid_http_request" and error["message"].startswith("the request is not valid HTTP/1.1: ")
    assert "Content-Length" in error["message"]  # the parser's reason


def test_unreadable_bodies_name_the_cause(server):
    body = json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    r = httpx.post(server + PATHS["completions"], content=gzip.compress(body),
                   headers={"content-type": "application/json", "content-encoding": "gzip"})
    error = error_of(r, 415)
    assert error["code"] == "unsupported_content_encoding" and "Content-Encoding 'gzip'" in error["message"]
    assert r.headers["accept-encoding"] == "identity"
    identity = httpx.post(server + PATHS["completions"], content=body,
                          headers={"content-type": "application/json", "content-encoding": "identity"})
    assert identity.status_code == 200

    def message(content: bytes) -> str:
        return error_of(httpx.post(server + PATHS["completions"], content=content,
                                   headers={"content-type": "application/json"}), 400)["message"]

    assert "an integer of more than 4,300 digits" in message(b'{"prompt": "x", "max_tokens": ' + b"1" * 5000 + b"}")
    assert message(b'{"prompt": "\xff"}') == "the request body is not valid UTF-8 (byte 0xff at position 12)"
    assert "nested less than 1,000 deep" in message(b"[" * 100_000 + b"]" * 100_000)


# ---- which prompt does not fit ----------------------------------------------------------------------
def test_a_prompt_that_does_not_fit_is_named_by_its_index(server, llm):
    context = llm.config.block_size
    long = "word " * context
    tokens = len(llm.tokenizer.encode(long))
    error = error_of(post(server, "completions", {"prompt": ["short", long, "short"], "max_tokens": 2}), 400)
    assert error["message"].startswith(f"This model's maximum context length is {context} tokens. However, "
                                       f"prompt[1] resulted in {tokens} tokens")
    assert (error["param"], error["code"]) == ("prompt", "context_length_exceeded")
    error = error_of(post(server, "completions", {"prompt": long, "max_tokens": 2}), 400)
    assert error["message"].startswith(f"This model's maximum context length is {context} tokens. However, "
                                       f"the prompt resulted in {tokens} tokens") and error["param"] == "prompt"
    # The longest prompt decides what fits: it is the one named, with the room it leaves.
    ids = list(range(10, 10 + context // 2))
    error = error_of(post(server, "completions", {"prompt": [[1], ids], "max_tokens": context}), 400)
    assert f"({len(ids)} in prompt[1], {context} in the completion)" in error["message"]
    assert error["param"] == "max_tokens"


def test_each_prompt_of_a_completions_request_gets_its_own_room(server, llm):
    # An omitted max_tokens is capped by the room each prompt leaves: a short prompt sent beside
    # one that fills the context gets the reply it gets alone (it got the long one's room: 1 token).
    context = llm.config.block_size

    def complete(prompts: list[list[int]]) -> list[dict]:
        body = {"prompt": prompts, "temperature": 0}
        return httpx.post(server + PATHS["completions"], json=body, timeout=30).json()["choices"]

    short = [10, 11, 12]
    alone = complete([short])[0]
    both = complete([short, list(range(10, 9 + context))])
    assert (both[0]["text"], both[0]["finish_reason"]) == (alone["text"], alone["finish_reason"])
    assert len(llm.tokenizer.encode(alone["text"])) > 1  # more than the long prompt's room


def test_truncation_cuts_only_a_prompt_that_fills_the_context(server, llm):
    # With truncate_prompt and max_tokens omitted, a prompt that fits was cut to half the context
    # (the default max_new_tokens, 256, decided it); without truncate_prompt it was kept whole.
    context = llm.config.block_size
    for n, kept in ((context - 5, context - 5), (context + 20, context // 2)):
        body = {"prompt": list(range(10, 10 + n)), "temperature": 0, "truncate_prompt": True}
        usage = httpx.post(server + PATHS["completions"], json=body, timeout=30).json()["usage"]
        assert usage["prompt_tokens"] == kept


def test_a_system_message_that_leaves_no_room_is_told_in_the_api_words(server, llm):
    context = llm.config.block_size
    system = {"role": "system", "content": "word " * context}
    for messages in ([system, {"role": "user", "content": "hi"}], [system]):  # alone it was cut, silently
        body = {"messages": messages, "truncate_prompt": True, "max_completion_tokens": 4}
        error = error_of(httpx.post(server + PATHS["chat"], json=body, timeout=30), 400)
        assert error["message"].startswith("the system message leaves no room for the conversation")
        assert "max_completion_tokens 4" in error["message"] and "max_new_tokens" not in error["message"]
        assert error["param"] == "messages"
