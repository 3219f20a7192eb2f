"""/openapi.json says exactly what `gpt1 serve` accepts and returns: each error's media type as
sent (on /metrics too, whose 200 is text), the key as a bearer scheme only where the server has
one, integer bounds as JSON integers, the server's own limits (n, max_tokens, token ids, prompts
per request), and a schema for each JSON reply that the real reply validates against. A real
uvicorn server on loopback (raw sockets for the answers a client library would not provoke)."""

from __future__ import annotations

import json
import socket

import httpx
import jsonschema
import pytest
from starlette.testclient import TestClient

from gpt1.core.sampling_params import SamplingParams
from gpt1.inference.decoding import chat_prompt_ids
from gpt1.serve import background_server, create_app

CAPACITY = {"max_batch": 2, "max_queue": 3}  # n and the prompts of a request: at most 5
MSG = [{"role": "user", "content": "Name a colour."}]
EMPTY = {"role": "user", "content": ""}


@pytest.fixture(scope="module")
def app(llm):
    return create_app(llm, body_timeout_s=0.5, **CAPACITY)


@pytest.fixture(scope="module")
def server(app):
    with background_server(app, head_timeout_s=0.5) as url:
        yield url


@pytest.fixture(scope="module")
def spec(server) -> dict:
    return httpx.get(f"{server}/openapi.json").json()


def media_type(response: httpx.Response) -> str:
    return response.headers["content-type"].split(";")[0].strip()


def declared(spec: dict, path: str, method: str, status: int) -> set[str]:
    responses = spec["paths"][path][method]["responses"]
    return set(responses.get(str(status), responses["default"])["content"])


def raw_status(url: str, request: bytes) -> tuple[int, str]:
    """(status, media type) of the answer to these bytes, on a fresh connection read to its close."""
    host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
    return int(head[0].split()[1]), headers["content-type"].split(";")[0].strip()


# ---- media types ------------------------------------------------------------------------------------
def test_metrics_errors_are_declared_as_the_json_they_are_sent_in(server, spec):
    """/metrics answers text, its errors JSON: the document said text/plain for the errors too."""
    assert media_type(ok := httpx.get(f"{server}/metrics")) == "text/plain" and ok.status_code == 200
    assert declared(spec, "/metrics", "get", 200) == {"text/plain"}
    answers = {
        403: httpx.get(f"{server}/metrics", headers={"Host": "rebound.example"}),
        431: httpx.get(f"{server}/metrics", headers={"X-Big": "x" * 70_000}),
        405: httpx.post(f"{server}/metrics", content=b"{}"),  # "default"
    }
    answers = {status: (r.status_code, media_type(r)) for status, r in answers.items()}
    # A head that stops arriving: the server's 408.
    answers[408] = raw_status(server, b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    for status, (got, sent) in answers.items():
        assert got == status and sent == "application/json", (status, got, sent)
        assert declared(spec, "/metrics", "get", status) == {sent}, status


def test_every_declared_error_is_application_json(spec):
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status != "200":
                    assert set(response["content"]) == {"application/json"}, (path, method, status)
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorResponse"}, (path, method, status)


# ---- the key --------------------------------------------------------------------------------------
def test_the_key_is_a_bearer_scheme_on_the_routes_that_ask_for_it_and_only_with_a_key(llm, spec):
    assert "securitySchemes" not in spec["components"] and "security" not in json.dumps(spec)
    keyed = create_app(llm, api_key="s3cret")
    client = TestClient(keyed)
    document = client.get("/openapi.json").json()
    ((name, scheme),) = document["components"]["securitySchemes"].items()
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for path, operations in document["paths"].items():
        for operation in operations.values():
            assert operation.get("security") == ([{name: []}] if path.startswith("/v1") else None), path
    # The scheme is the one the server checks: the key as a bearer token, and nothing else.
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Basic s3cret"}).status_code == 401
    keyed.state.engine.stop()


# ---- bounds -----------------------------------------------------------------------------------------
def integer_schemas(node):
    """Every schema (a dict) of integers only, or of integers and null, in the document."""
    if isinstance(node, dict):
        forms = node.get("anyOf") or node.get("oneOf") or [node]
        types = {f.get("type") for f in forms if isinstance(f, dict) and isinstance(f.get("type"), str)}
        if "integer" in types and types <= {"integer", "null"}:
            yield node
        for value in node.values():
            yield from integer_schemas(value)
    elif isinstance(node, list):
        for value in node:
            yield from integer_schemas(value)


def test_integer_bounds_are_json_integers(server):
    """A fuzzer read 2**64 written as 1.8446744073709552e+19 and sent seeds past it."""
    text = httpx.get(f"{server}/openapi.json").text
    assert "e+" not in text
    spec = json.loads(text)
    bounds = [(schema.get("title"), key, schema[key]) for schema in integer_schemas(spec)
              for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") if key in schema]
    assert len(bounds) > 10
    assert [b for b in bounds if type(b[2]) is not int] == []
    seed = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]["seed"]
    assert (seed["minimum"], seed["exclusiveMaximum"]) == (-2**63, 2**64)


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json={"max_tokens": 1, **body}, timeout=60)


def test_the_document_has_this_servers_limits_and_the_server_keeps_them(server, spec, llm):
    capacity, context, vocab = 5, llm.config.block_size, llm.config.vocab_size
    schemas = spec["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        fields = schemas[name]["properties"]
        assert fields["n"]["maximum"] == capacity
    # The most new tokens leave room for the shortest prompt: a completion's one token ('' is [EOS]),
    # a chat's one empty message (second wave: at the whole context, refused without truncate_prompt).
    shortest_chat = len(chat_prompt_ids(llm.tokenizer, [EMPTY], context, SamplingParams(max_new_tokens=1)).ids)
    assert schemas["CompletionRequest"]["properties"]["max_tokens"]["maximum"] == context - 1
    for field in ("max_tokens", "max_completion_tokens"):
        assert schemas["ChatCompletionRequest"]["properties"][field]["maximum"] == context - shortest_chat
    forms = schemas["CompletionRequest"]["properties"]["prompt"]["oneOf"]
    ids, lists = forms[2], forms[3]
    assert ids["items"] == {"type": "integer", "minimum": 0, "maximum": vocab - 1} == lists["items"]["items"]
    assert (ids["minItems"], lists["minItems"], lists["maxItems"], forms[1]["maxItems"]) == (1, 1, capacity, capacity)

    chat, text = {"messages": MSG}, {"prompt": "x"}
    for body, path in ((chat, "/v1/chat/completions"), (text, "/v1/completions")):
        assert post(server, path, {**body, "n": capacity}).status_code == 200
        assert post(server, path, {**body, "n": capacity + 1}).json()["error"]["param"] == "n"
        # At the context, the prompt has to give way (truncate_prompt); past it, nothing fits.
        assert post(server, path, {**body, "max_tokens": context, "truncate_prompt": True}).status_code == 200
        assert post(server, path, {**body, "max_tokens": context + 1, "truncate_prompt": True}).status_code == 400
    for body, path, most in (({"messages": [EMPTY]}, "/v1/chat/completions", context - shortest_chat),
                             ({"prompt": ""}, "/v1/completions", context - 1)):  # the document's maximum, as is
        assert post(server, path, {**body, "max_tokens": most}).status_code == 200
        assert post(server, path, {**body, "max_tokens": most + 1}).json()["error"]["param"] == "max_tokens"
    assert post(server, "/v1/completions", {"prompt": [0, vocab - 1]}).status_code == 200
    for bad in ([vocab], [[1], [-1]], [], ["x"] * (capacity + 1)):
        assert post(server, "/v1/completions", {"prompt": bad}).status_code == 400, bad
    assert post(server, "/v1/completions", {"prompt": ["x"] * capacity}).status_code == 200


# ---- replies ----------------------------------------------------------------------------------------
def reply_schema(spec: dict, path: str, method: str = "get") -> dict:
    schema = spec["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]
    assert set(schema) == {"$ref"}, (path, schema)  # a model, not {} or "any object"
    return {**schema, "components": spec["components"]}


def test_each_declared_reply_schema_validates_the_real_reply(server, spec, app):
    name = app.state.model_name
    replies = [
        ("/v1/models", "get", httpx.get(f"{server}/v1/models")),
        ("/v1/models/{model_id}", "get", httpx.get(f"{server}/v1/models/{name}")),
        ("/health", "get", httpx.get(f"{server}/health")),
        ("/v1/chat/completions", "post", post(server, "/v1/chat/completions", {"messages": MSG, "n": 2})),
        ("/v1/chat/completions", "post", post(server, "/v1/chat/completions",
                                              {"messages": MSG, "logprobs": True, "top_logprobs": 2})),
        ("/v1/completions", "post", post(server, "/v1/completions", {"prompt": ["x", "y"], "max_tokens": 2})),
        ("/v1/completions", "post", post(server, "/v1/completions",
                                         {"prompt": "x y", "echo": True, "logprobs": 2, "max_tokens": 2})),
    ]
    for path, method, r in replies:
        assert r.status_code == 200, (path, r.text)
        jsonschema.validate(r.json(), reply_schema(spec, path, method))
    assert httpx.get(f"{server}/health").json()["device"] == "cpu"  # where "threads" is sent too
    # The example of the model id is the served one, which the server answers.
    (parameter,) = spec["paths"]["/v1/models/{model_id}"]["get"]["parameters"]
    assert parameter["schema"]["examples"] == [name]
    # A reply that is no such object fails its schema: the schemas say something.
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"object": "list", "data": [{"id": name}]}, reply_schema(spec, "/v1/models"))


def test_the_headers_a_client_acts_on_are_declared(server, spec):
    for path in ("/v1/chat/completions", "/v1/completions", "/health"):
        (operation,) = spec["paths"][path].values()
        assert "Retry-After" in operation["responses"]["503"]["headers"], path
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["headers"]
    long = [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "word " * 40},
            {"role": "user", "content": "Name a colour."}]
    r = post(server, "/v1/chat/completions", {"messages": long, "truncate_prompt": True, "max_tokens": 8})
    assert r.status_code == 200, r.text
    sent = {h for h in r.headers if h.lower().startswith("x-gpt1-")}
    assert sent and sent <= {h.lower() for h in chat}
    schemas = {h.lower(): declared["schema"] for h, declared in chat.items()}
    for header in sent:
        jsonschema.validate(int(r.headers[header]), schemas[header])
