"""The OpenAI-compatible HTTP API and the chat page, as a FastAPI app: `create_app(llm)`.

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (OpenAI's
request and response shapes, `stream: true` as server-sent events ending in `data: [DONE]`),
`GET /health`, the chat page at `GET /` and the OpenAPI docs at `/docs`.

Every bad request is answered with status 400 (401 for auth, 404, 413 for an over-large body,
503 when the queue is full) and OpenAI's error body `{"error": {"message", "type", "param",
"code"}}` — FastAPI's 422 validation errors included, because OpenAI answers 400 and its
clients expect that shape.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import re
import secrets
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt1 import __version__
from gpt1.core.errors import Gpt1Error
from gpt1.core.sampling_params import PRESETS, SamplingParams
from gpt1.inference.generate import Chunk, chat_prompt_ids
from gpt1.serve.engine import Engine, Job, QueueFull

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than a 512-token context can use
PARAM_TO_API = {"max_new_tokens": "max_tokens"}  # SamplingParams fields that OpenAI names differently


# ---- errors ------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error answered as OpenAI's `{"error": {...}}` body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _loc(parts: tuple) -> str:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; pydantic's union-member tags
    (such as 'str' or 'list[TextPart]') are left out."""
    out = ""
    for part in parts:
        if (part == "body" and not out) or (isinstance(part, str) and _UNION_TAG.match(part)):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_UNION_TAG = re.compile(r"^(str|int|float|bool|list|dict|none|function-.*|.*\[.*\])$")


def _validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    error = errors[0]
    if error.get("type") == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON ({detail} at character {error['loc'][-1]})",
                        code="invalid_json")
    param = _loc(tuple(error.get("loc", ())))
    if not param:
        return ApiError(400, "the request body must be a JSON object")
    message = error.get("msg", "invalid value")
    if error.get("type") == "extra_forbidden":
        message = "unrecognized request argument"
    elif error.get("type") == "missing":
        message = "missing required field"
    else:
        # A value that fits none of a union's forms fails once per form: name them all.
        same = [e for e in errors if _loc(tuple(e.get("loc", ()))) == param]
        message = "; or ".join(dict.fromkeys(e.get("msg", "") for e in same))
        if "input" in error:
            message += f" (got {_short_repr(error['input'])})"
    return ApiError(400, f"{param}: {message}", param=param)


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- request bodies ------------------------------------------------------------------------------
class _Strict(BaseModel):
    # Strict: "5" is not a number and true is not 1; unknown fields are an error rather than
    # silently ignored; NaN and Infinity (which Python's JSON parser accepts) are refused.
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationRequest(_Strict):
    """Fields shared by both endpoints. An omitted knob takes gpt1's default (SamplingParams)."""

    model: str | None = Field(None, description="accepted and echoed; this server serves one model")
    max_tokens: int | None = Field(None, description="at most this many new tokens; default: gpt1's default, "
                                                      "capped by the context left after the prompt")
    temperature: float | None = Field(None, description="0 = greedy")
    top_p: float | None = None
    top_k: int | None = Field(None, description="extra: keep the k most likely tokens (0 = off)")
    min_p: float | None = Field(None, description="extra: drop tokens below min_p * p(most likely)")
    repeat_penalty: float | None = Field(None, description="extra: llama.cpp-style penalty (1 = off)")
    repeat_last_n: int | None = Field(None, description="extra: how many recent tokens repeat_penalty looks at")
    seed: int | None = Field(None, description="makes sampling reproducible")
    truncate_prompt: bool = Field(False, description="extra: fit an over-long prompt into the context by dropping "
                                                     "the oldest turns (chat) or tokens (completions) instead of "
                                                     "answering 400")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the reply (not included)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, description="only 1 is supported")
    user: str | None = None
    # Accepted only at their neutral values so that clients that always send them still work.
    frequency_penalty: float = Field(0.0, description="unsupported: only 0 (use repeat_penalty)")
    presence_penalty: float = Field(0.0, description="unsupported: only 0 (use repeat_penalty)")
    logit_bias: dict[str, float] | None = Field(None, description="unsupported: only null or {}")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="'developer' means 'system'")
    content: str | list[TextPart]
    name: str | None = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, description="OpenAI's newer name for max_tokens")
    logprobs: bool | None = Field(None, description="unsupported: only false")


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, token ids, or a list of either (one choice each)")
    echo: bool = Field(False, description="unsupported: only false")
    logprobs: int | None = Field(None, description="unsupported: only null")
    best_of: int | None = Field(None, description="unsupported: only null or 1")
    suffix: str | None = Field(None, description="unsupported: only null")


# ---- request -> (prompt ids, SamplingParams) -----------------------------------------------------
def _check_text(text: str, param: str) -> str:
    """Refuse lone surrogates (valid JSON escapes such as "\\ud800", but not Unicode text)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{param}: invalid Unicode (a lone surrogate at character {e.start})",
                       param=param, code="invalid_unicode") from None
    return text


def _check_unsupported(req: _GenerationRequest) -> None:
    neutral = {"n": 1, "frequency_penalty": 0.0, "presence_penalty": 0.0, "logit_bias": {}, "logprobs": False,
               "echo": False, "best_of": 1, "suffix": None}
    for name, neutral_value in neutral.items():
        value = getattr(req, name, None)
        if value is not None and value != neutral_value:
            hint = {"n": "send several requests instead", "frequency_penalty": "use repeat_penalty",
                    "presence_penalty": "use repeat_penalty"}.get(name, "it is not implemented")
            raise ApiError(400, f"{name}={_short_repr(value)} is not supported by this server ({hint})",
                           param=name, code="unsupported_parameter")


def _sampling_params(req: _GenerationRequest, max_tokens: int | None, max_tokens_param: str,
                     context: int) -> SamplingParams:
    """SamplingParams from the request's knobs (an omitted knob keeps gpt1's default)."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4:
        raise ApiError(400, f"stop: at most 4 sequences, got {len(stop)}", param="stop")
    for i, s in enumerate(stop):
        _check_text(s, f"stop[{i}]")
    if max_tokens is not None and max_tokens > context:
        raise ApiError(400, f"{max_tokens_param}={max_tokens} is more than this model's context of {context} tokens",
                       param=max_tokens_param, code="context_length_exceeded")
    knobs = {name: getattr(req, name) for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty",
                                                   "repeat_last_n", "seed") if getattr(req, name) is not None}
    if max_tokens is not None:
        knobs["max_new_tokens"] = max_tokens
    knobs["stop"] = tuple(stop)
    knobs["truncate_prompt"] = req.truncate_prompt
    try:
        return SamplingParams(**knobs).validate()
    except Gpt1Error as e:
        field = next((f for f in knobs if str(e).startswith(f + " ")), None)
        param = max_tokens_param if field == "max_new_tokens" else field
        message = str(e).replace("max_new_tokens", max_tokens_param)
        raise ApiError(400, message, param=param) from None


def _fit_context(params: SamplingParams, prompt_tokens: int, context: int, max_tokens: int | None,
                 max_tokens_param: str) -> SamplingParams:
    """Without truncation, refuse what does not fit (as OpenAI does) and cap an omitted
    max_tokens by the room the prompt leaves. With it, gpt1.inference.generate's rule applies."""
    if params.truncate_prompt:
        return params
    if prompt_tokens >= context:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens; this model's context is {context} tokens, "
                            "which must hold the prompt and at least one new token. Shorten the prompt, or send "
                            "\"truncate_prompt\": true to drop the oldest turns (chat) or tokens (completions).",
                       code="context_length_exceeded")
    room = context - prompt_tokens
    if max_tokens is None:
        return dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, room))
    if max_tokens > room:
        raise ApiError(400, f"this model's maximum context length is {context} tokens, but {prompt_tokens + max_tokens} "
                            f"were requested ({prompt_tokens} in the prompt, {max_tokens} in the completion); reduce the "
                            f"prompt or {max_tokens_param} (at most {room} here), or send \"truncate_prompt\": true",
                       param=max_tokens_param, code="context_length_exceeded")
    return params


def _chat_prompt(req: ChatCompletionRequest, tokenizer, params: SamplingParams, context: int) -> list[int]:
    messages = []
    for i, message in enumerate(req.messages):
        if isinstance(message.content, str):
            content = message.content
        else:
            content = "".join(part.text for part in message.content)
        _check_text(content, f"messages[{i}].content")
        messages.append({"role": "system" if message.role == "developer" else message.role, "content": content})
    try:
        # With truncate_prompt the oldest turns go first (the system message stays).
        ids, _ = chat_prompt_ids(tokenizer, messages, context, params)
    except Gpt1Error as e:
        raise ApiError(400, str(e), param="messages") from None
    return ids


def _completion_prompts(req: CompletionRequest, tokenizer, vocab_size: int) -> list[list[int]]:
    prompt = req.prompt
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt: an empty list; give a string, token ids, or a list of either", param="prompt")
    prompts = []
    for i, item in enumerate(prompt):
        if isinstance(item, str):
            ids = tokenizer.encode(_check_text(item, f"prompt[{i}]"))
        else:
            bad = [t for t in item if not 0 <= t < vocab_size]
            if bad:
                raise ApiError(400, f"prompt[{i}]: token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
                               param="prompt")
            ids = list(item)
        prompts.append(ids)  # an empty prompt starts from [EOS], the boundary between documents
    return prompts


# ---- engine <-> event loop -----------------------------------------------------------------------
def _submit(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[list[Job], asyncio.Queue]:
    """Queue the jobs; their chunks arrive on the returned asyncio queue as (index, item)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def sink_for(index: int):
        def sink(item: Chunk | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (index, item))
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                pass
        return sink

    try:
        return engine.submit(prompts, params, sink_for), queue
    except QueueFull as e:
        raise ApiError(503, str(e), type="server_error", code="server_overloaded", headers={"Retry-After": "1"}) from None


async def _chunks(jobs: list[Job], queue: asyncio.Queue) -> AsyncIterator[tuple[int, Chunk]]:
    """Chunks of all jobs as they come; cancels what is left when the consumer stops early
    (e.g. Starlette cancels a streaming response whose client disconnected)."""
    pending = len(jobs)
    try:
        while pending:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield index, item
            if item.finish_reason is not None:
                pending -= 1
    finally:
        for job in jobs:
            job.cancel()


async def _collect(request: Request, jobs: list[Job], queue: asyncio.Queue) -> list[dict] | None:
    """Each job's text, finish_reason and usage; None (and the jobs stopped) if the client left."""
    results = [{"text": [], "finish_reason": None, "prompt_tokens": 0, "completion_tokens": 0} for _ in jobs]

    async def consume() -> None:
        async for index, chunk in _chunks(jobs, queue):
            r = results[index]
            r["text"].append(chunk.text)
            r.update(finish_reason=chunk.finish_reason, prompt_tokens=chunk.prompt_tokens,
                     completion_tokens=chunk.completion_tokens)

    async def disconnected() -> None:
        # The body has been read, so the next message the server sends is http.disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(consume()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            for job in jobs:
                job.cancel()
    if not work.done() or work.cancelled():  # a cancel takes effect only when the task next runs
        return None
    work.result()  # raises what generation raised
    for r in results:
        r["text"] = "".join(r["text"])
    return results


def _generation_error(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, Gpt1Error):
        return ApiError(400, str(e))
    return ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# ---- middleware ----------------------------------------------------------------------------------
class _Guard:
    """Pure ASGI middleware (it does not buffer streamed responses): the API key check on /v1 and
    the body size limit, both answered before FastAPI reads or parses anything."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope["path"].startswith("/v1"):
            scheme, _, token = headers.get("authorization", b"").partition(b" ")
            # compare_digest takes as long for a wrong key as for a right one: no timing oracle.
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                message = ("missing API key: send the header 'Authorization: Bearer KEY'"
                           if not token else "incorrect API key")
                error = ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await error.response()(scope, receive, send)
        too_large = ApiError(413, f"the request body is larger than {self.max_body_bytes:,} bytes",
                             code="request_too_large")
        declared = headers.get("content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await too_large.response()(scope, receive, send)
        # A chunked body declares no length: read it here, up to the limit, and replay it.
        body, more = b"", True
        if scope["method"] in ("POST", "PUT", "PATCH"):
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body_bytes:
                    return await too_large.response()(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed and scope["method"] in ("POST", "PUT", "PATCH"):
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ---- the app -------------------------------------------------------------------------------------
def _param_dict(params: Any) -> dict:
    """A SamplingParams (or a dict of its fields) under the API's field names."""
    data = dataclasses.asdict(params) if dataclasses.is_dataclass(params) else dict(params)
    return {PARAM_TO_API.get(k, k): v for k, v in data.items()}


def _page(model_name: str, context: int, auth: bool) -> str:
    """The chat page with its settings (defaults, presets, context) filled in, so that the
    page and the library share one source of defaults and presets."""
    html = resources.files("gpt1.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    config = {"model": model_name, "context": context, "auth": auth,
              "defaults": _param_dict(SamplingParams()),
              "presets": {name: _param_dict(p) for name, p in PRESETS.items()}}
    # "</" cannot close the script element from inside a JSON string once escaped.
    return html.replace("__GPT1_CONFIG__", json.dumps(config).replace("</", "<\\/"))


def create_app(llm, api_key: str | None = None, *, max_queue: int = 64, max_active: int = 8,
               max_body_bytes: int = MAX_BODY_BYTES, model_name: str | None = None) -> FastAPI:
    """The server for a loaded model (`gpt1.load(dir)`).

    api_key: when set, every /v1 request needs `Authorization: Bearer <api_key>` (else 401).
    max_active: requests generating at once (advanced round-robin, a token each per turn).
    max_queue: requests waiting beyond those; more get 503 with `Retry-After`.
    max_body_bytes: larger request bodies get 413.
    """
    model, tokenizer = llm.model, llm.tokenizer
    context = model.config.block_size
    name = model_name or (llm.path.name if getattr(llm, "path", None) else "gpt1")
    engine = Engine(model, tokenizer, max_active=max_active, max_queue=max_queue)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="gpt1", version=_version(), lifespan=lifespan,
                  description="An OpenAI-compatible API for a gpt1 model, and a chat page at `/`.")
    app.state.engine = engine
    app.state.model_name = name

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found" if exc.status_code == 404 else None
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "the request body could not be read as JSON (is it valid UTF-8?)"
            kind = "invalid_json"
        return ApiError(exc.status_code, message, code=kind, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        return _generation_error(exc).response()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_page(name, context, api_key is not None))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name, "active": engine.active, "queued": engine.queued}

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "gpt1", "context_length": context}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> dict:
        if model_id != name:
            raise ApiError(404, f"model {model_id!r} not found; this server serves {name!r}",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        _check_unsupported(req)
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens disagree; send one", param="max_tokens")
        max_tokens, which = ((req.max_completion_tokens, "max_completion_tokens")
                             if req.max_completion_tokens is not None else (req.max_tokens, "max_tokens"))
        params = _sampling_params(req, max_tokens, which, context)
        prompt = _chat_prompt(req, tokenizer, params, context)
        params = _fit_context(params, len(prompt), context, max_tokens, which)
        jobs, queue = _submit(engine, [prompt], params)
        rid, now, model_id = f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), req.model or name
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _stream_response(_chat_events(jobs, queue, rid, now, model_id, include_usage))
        results = await _collect(request, jobs, queue)
        if results is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        r = results[0]
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_id,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": r["text"]},
                             "logprobs": None, "finish_reason": r["finish_reason"]}],
                "usage": _usage(r["prompt_tokens"], r["completion_tokens"])}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        _check_unsupported(req)
        prompts = _completion_prompts(req, tokenizer, model.config.vocab_size)
        # One SamplingParams for all prompts: the longest one decides what fits in the context.
        params = _sampling_params(req, req.max_tokens, "max_tokens", context)
        params = _fit_context(params, max(len(p) or 1 for p in prompts), context, req.max_tokens, "max_tokens")
        jobs, queue = _submit(engine, prompts, params)
        rid, now, model_id = f"cmpl-{secrets.token_hex(12)}", int(time.time()), req.model or name
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _stream_response(_completion_events(jobs, queue, rid, now, model_id, include_usage))
        results = await _collect(request, jobs, queue)
        if results is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        return {"id": rid, "object": "text_completion", "created": now, "model": model_id,
                "system_fingerprint": None,
                "choices": [{"index": i, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}
                            for i, r in enumerate(results)],
                "usage": _usage(sum(r["prompt_tokens"] for r in results),
                                sum(r["completion_tokens"] for r in results))}

    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    return app


def _stream_response(events: AsyncIterator[str]) -> StreamingResponse:
    # no-cache and no proxy buffering: each token must reach the client as it is made.
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _chat_events(jobs, queue, rid, now, model_id, include_usage) -> AsyncIterator[str]:
    def chunk(delta: dict, finish_reason: str | None = None) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    yield _sse(chunk({"role": "assistant", "content": ""}))
    usage = None
    try:
        async for _, c in _chunks(jobs, queue):
            if c.text:
                yield _sse(chunk({"content": c.text}))
            if c.finish_reason is not None:
                yield _sse(chunk({}, c.finish_reason))
                usage = _usage(c.prompt_tokens, c.completion_tokens)
    except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
        yield _sse(_generation_error(e).body())
        return
    if include_usage and usage is not None:
        yield _sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                    "system_fingerprint": None, "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


async def _completion_events(jobs, queue, rid, now, model_id, include_usage) -> AsyncIterator[str]:
    def chunk(index: int, text: str, finish_reason: str | None = None) -> dict:
        return {"id": rid, "object": "text_completion", "created": now, "model": model_id,
                "system_fingerprint": None,
                "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}

    prompt_tokens = completion_tokens = 0
    try:
        async for index, c in _chunks(jobs, queue):
            if c.text or c.finish_reason is not None:
                yield _sse(chunk(index, c.text, c.finish_reason))
            if c.finish_reason is not None:
                prompt_tokens += c.prompt_tokens
                completion_tokens += c.completion_tokens
    except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
        yield _sse(_generation_error(e).body())
        return
    if include_usage:
        yield _sse({"id": rid, "object": "text_completion", "created": now, "model": model_id,
                    "system_fingerprint": None, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
    yield "data: [DONE]\n\n"


def _version() -> str:
    return __version__
