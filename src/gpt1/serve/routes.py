"""The endpoints: /v1/models, /v1/chat/completions, /v1/completions (OpenAI's shapes, `stream:
true` as server-sent events ending in `data: [DONE]`), /health, /metrics and the page, and what
/openapi.json says of them. What they use lives beside: `bridge` (the engine's chunks to the event
loop), `streaming` (the stream replies), `replies` (the JSON replies), `failure_log` (failed
generations in the server's log) and `prompt_threads` (prompts built off the event loop)."""

from __future__ import annotations

import dataclasses
import secrets
import time
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Path, Request
from fastapi.responses import HTMLResponse, Response

from gpt1.inference.decoding import ChatPrompt
from gpt1.inference.engine import Engine, EngineUnavailable
from gpt1.inference.engine_process import EngineProcess
from gpt1.serve import mapping
from gpt1.serve.bridge import submit
from gpt1.serve.errors import ApiError, error_responses, generation_error
from gpt1.serve.failure_log import FailureLog
from gpt1.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gpt1.serve.metrics import metrics_text
from gpt1.serve.page import page_html
from gpt1.serve.prompt_threads import PromptThreads
from gpt1.serve.replies import CompletionScoring, chat_completion, client_gone, collect, completion, envelope
from gpt1.serve.schemas import ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, Health, Model, ModelList
from gpt1.serve.streaming import chat_events, completion_events, stream_response


def capacity(engine: Engine | EngineProcess) -> int:
    """The most requests the engine ever holds at once: generating, and waiting for a slot."""
    return engine.max_batch + engine.max_queue


PAGE_HEADERS = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff"}
_SEEN_BY_ALL = (403, 408, 431)  # the Guard's and the HTTP protocol's answers, before any route runs


def _reply(model: type, description: str = "Successful Response", **more) -> dict:
    """A route's 200 in the OpenAPI schema: `model` documents the JSON reply, which the route
    builds as a dict and FastAPI sends as it is (a response_model would re-serialise it)."""
    return {200: {"model": model, "description": description, **more}}


def _generation_responses(model: type, headers: dict | None = None) -> dict:
    """Both generation endpoints' responses: a JSON reply (`model`), or with stream: true
    server-sent events."""
    description = ("the reply: a JSON object, or with stream: true server-sent events (`data: {chunk}` events, then "
                   "`data: [DONE]`; a failure after the start is a `data: {\"error\": ...}` event)")
    # Each event, as FastAPI documents its own event streams.
    stream = {"text/event-stream": {"itemSchema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string", "description": "a chunk as JSON, or [DONE]"}}}}}
    return {**_reply(model, description, content=stream, **({"headers": headers} if headers else {})),
            **error_responses(400, 401, *_SEEN_BY_ALL, 413, 415, 503)}


# What truncate_prompt left out of a conversation (`_fitting_headers`), on a chat reply or stream.
_FITTING_HEADERS = {
    "X-Gpt1-Dropped-Messages": {"description": "with truncate_prompt: the oldest messages dropped (absent: none)",
                                "schema": {"type": "integer", "minimum": 1}},
    "X-Gpt1-Cut-Tokens": {"description": "with truncate_prompt: the tokens cut from the start of the last message "
                                         "(absent: none)", "schema": {"type": "integer", "minimum": 1}}}


def _fitting_headers(prompt: ChatPrompt) -> dict[str, str]:
    """What truncate_prompt left out of a conversation, for a client to tell its user (the chat
    page does): `X-Gpt1-Dropped-Messages`, the oldest messages dropped, and `X-Gpt1-Cut-Tokens`,
    the tokens cut from the start of the last one; each only when not 0. Headers, not fields of
    the body, so that OpenAI's usage object stays OpenAI's and a stream says it before its first event."""
    headers = {}
    if prompt.dropped:
        headers["X-Gpt1-Dropped-Messages"] = str(prompt.dropped)
    if prompt.cut:
        headers["X-Gpt1-Cut-Tokens"] = str(prompt.cut)
    return headers


@dataclasses.dataclass
class Served:
    """What the endpoints use, kept in `app.state.served` and read from each request's app: the
    endpoints do not hold it themselves, since FastAPI keeps every endpoint function it has seen in
    process-wide caches (fastapi.dependencies.models), and closures over the engine kept each
    app's KV cache and model alive after the app was dropped."""
    engine: Engine | EngineProcess
    tokenizer: Any
    ensure_started: Callable[[], Awaitable[None]]
    prompt_threads: PromptThreads
    failures: FailureLog = dataclasses.field(default_factory=FailureLog)  # the app's own: its log lines, throttled


def add_routes(app: FastAPI, served: Served, name: str, auth: bool, *, stream_interval: float = 0.0) -> None:
    """The endpoints; each awaits `ensure_started()` before it uses the engine (see `create_app`),
    and builds its prompts on `prompt_threads`. They read `served` from the request's app, and close
    over plain values only (see `Served`)."""
    app.state.served = served
    context = served.engine.config.block_size
    _add_page(app, name, context, auth)
    _add_status_routes(app, name)
    _add_model_routes(app, name, context)
    _add_chat_route(app, name, context, stream_interval)
    _add_completion_route(app, name, context, stream_interval)


def _add_page(app: FastAPI, name: str, context: int, auth: bool) -> None:
    """The chat page, at /."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        # Not to be framed by another site's page (clickjacking: the operator's chat page, their
        # key typed into it, under a page of someone else's). Only framing is restricted.
        return HTMLResponse(page_html(name, context, auth), headers=PAGE_HEADERS)


def _add_status_routes(app: FastAPI, name: str) -> None:
    """/health and /metrics: the engine's liveness and load."""

    @app.get("/health", response_model=None, responses={**_reply(Health), **error_responses(*_SEEN_BY_ALL, 503)})
    async def health(request: Request) -> dict:
        """Liveness and load: rows in the batch, requests queued, free slots, recent tokens/s, the
        device and dtype (and on a CPU the threads of the latest step, null before the process
        engine's first step); 503 once the engine has
        stopped (e.g. its process exited). An engine not yet started is started first: "ok" means
        it runs."""
        engine = request.app.state.served.engine
        await request.app.state.served.ensure_started()
        if not engine.alive:
            raise generation_error(EngineUnavailable("the engine has stopped; restart the server"))
        health = {"status": "ok", "model": name, "active": engine.active, "queued": engine.queued,
                  "free_slots": engine.free_slots, "max_batch": engine.max_batch,
                  "tokens_per_s": round(engine.tokens_per_s, 1), "device": str(engine.device),
                  "dtype": engine.dtype_name}
        if str(engine.device) == "cpu":
            # null until known: the process engine's child reports its count with its first outputs.
            health["threads"] = engine.stats.threads or None
        return health

    # response_class Response, of no media type: FastAPI files the errors' schemas under the route's
    # media type, and PlainTextResponse's declared the JSON errors as text/plain.
    @app.get("/metrics", response_class=Response, responses={
        200: {"description": "Prometheus' text exposition format (version 0.0.4)",
              "content": {"text/plain": {"schema": {"type": "string"}}}},
        **error_responses(*_SEEN_BY_ALL)})
    async def metrics(request: Request) -> Response:
        """The engine's load and counts in Prometheus' text format (gpt1.serve.metrics), for a
        scraper; unlike /health it starts nothing: an engine not yet started reports up 0."""
        text = metrics_text(request.app.state.served.engine, name)
        # backslashreplace: a model dir's name undecodable in the filesystem's encoding is no 500.
        return Response(text.encode("utf-8", "backslashreplace"), media_type=METRICS_CONTENT_TYPE)


def _add_model_routes(app: FastAPI, name: str, context: int) -> None:
    """/v1/models and /v1/models/{model_id}: the one model served."""
    created = int(time.time())

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "gpt1", "context_length": context}

    @app.get("/v1/models", response_model=None, responses={**_reply(ModelList), **error_responses(401, *_SEEN_BY_ALL)})
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}", response_model=None,
             responses={**_reply(Model), **error_responses(401, *_SEEN_BY_ALL, 404)})
    async def get_model(model_id: str = Path(description="the served model's id", examples=[name])) -> dict:
        if model_id != name:
            raise ApiError(404, f"model {model_id[:100]!r} not found; this server serves {name!r}",
                           param="model", code="model_not_found")
        return model_card()


def _add_chat_route(app: FastAPI, name: str, context: int, stream_interval: float) -> None:
    """/v1/chat/completions."""

    @app.post("/v1/chat/completions", responses=_generation_responses(ChatCompletion, _FITTING_HEADERS))
    async def chat_completions(req: ChatCompletionRequest, request: Request, response: Response):
        served, started = request.app.state.served, time.monotonic()
        mapping.check_unsupported(req)
        n = mapping.sample_count(req, 1, capacity(served.engine))
        max_tokens, which = mapping.chat_max_tokens(req)
        params = mapping.sampling_params(req, max_tokens, which, context)
        # Tokenizing a large request is up to seconds of CPU: off the event loop, which
        # meanwhile answers /health and writes every other stream.
        fitted = await served.prompt_threads.run(mapping.chat_prompt, req, served.tokenizer, params, context)
        prompt, fitting = fitted.ids, _fitting_headers(fitted)
        params = mapping.fit_context(params, len(prompt), context, max_tokens, which)
        await served.ensure_started()
        # Each choice is a request of its own (seeds seed, seed + 1, ...), decoded in one batch.
        requests, queue = submit(served.engine, [prompt] * n, params.samples(n))
        rid, now, model_id = f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), req.model or name
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = stream_response(chat_events(requests, queue, rid, now, model_id, include_usage,
                                                 stream_interval, served.failures, served.tokenizer))
            stream.headers.update(fitting)  # a Response returned as such does not take `response`'s
            return stream
        results = await collect(request, requests, queue)
        if results is None:
            return client_gone(request, started)
        response.headers.update(fitting)  # FastAPI adds them to the JSON response it makes of the dict
        return chat_completion(envelope(rid, "chat.completion", now, model_id), results, served.tokenizer,
                               params.logprobs is not None)


def _add_completion_route(app: FastAPI, name: str, context: int, stream_interval: float) -> None:
    """/v1/completions (the legacy API: several prompts, echo, logprobs as text offsets)."""

    @app.post("/v1/completions", responses=_generation_responses(Completion))
    async def completions(req: CompletionRequest, request: Request):
        served, started = request.app.state.served, time.monotonic()
        mapping.check_unsupported(req)
        # Off the event loop, as in chat_completions: a 1 MiB prompt takes about a second to tokenize.
        prompts = await served.prompt_threads.run(mapping.completion_prompts, req, served.tokenizer,
                                                  served.engine.config.vocab_size)
        params = mapping.sampling_params(req, req.max_tokens, "max_tokens", context)
        # The longest prompt is the one named when the request does not fit; then each prompt's
        # omitted max_tokens is capped by its own room (not the longest one's). An empty prompt
        # starts from [EOS]: one token.
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
        where = f"prompt[{longest}]" if len(prompts) > 1 else "prompt"
        mapping.fit_context(params, len(prompts[longest]) or 1, context, req.max_tokens, "max_tokens", where)
        per_prompt = [mapping.fit_context(params, len(p) or 1, context, req.max_tokens, "max_tokens") for p in prompts]
        n = mapping.sample_count(req, len(prompts), capacity(served.engine))
        await served.ensure_started()
        # Prompt i's choices are i * n ... i * n + n - 1 (as OpenAI orders them), each a request of its own.
        requests, queue = submit(served.engine, [p for p in prompts for _ in range(n)],
                                 [knobs for p in per_prompt for knobs in p.samples(n)])
        rid, now, model_id = f"cmpl-{secrets.token_hex(12)}", int(time.time()), req.model or name
        scoring = CompletionScoring(served.tokenizer, req, prompts) if req.echo or req.logprobs is not None else None
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return stream_response(completion_events(requests, queue, rid, now, model_id, include_usage,
                                                     stream_interval, served.failures, n, scoring))
        results = await collect(request, requests, queue)
        if results is None:
            return client_gone(request, started)
        return completion(envelope(rid, "text_completion", now, model_id), results, n, scoring)
