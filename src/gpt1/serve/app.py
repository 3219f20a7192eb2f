"""The OpenAI-compatible HTTP API and the chat page, as a FastAPI app: `create_app(llm)`.

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (OpenAI's
request and response shapes, `stream: true` as server-sent events ending in `data: [DONE]`),
`GET /health`, `GET /metrics` (Prometheus), the chat page at `GET /` and the OpenAPI docs at `/docs`. The parts, by job:
`schemas` (request bodies), `errors` (OpenAI-style errors), `mapping` (request -> prompt and
SamplingParams), `middleware` (host, key, body limits), `routes` (endpoints), `bridge` (to
the engine), `streaming` / `replies` (the replies), `metrics` (the Prometheus exposition), `page` (the chat page). Generation runs in `gpt1.inference.engine.Engine`.

Every bad request is answered with status 400 (401 for auth, 403 for a Host that is neither a
loopback name nor an allowed one on a keyless loopback server, 404, 408 for a body or headers that
do not arrive in time, 413 for an over-large body, 415 for a compressed one, 431 for over-large
headers, 503 when the queue is full) and OpenAI's error body; /openapi.json documents them, and
what each server accepts (`_openapi`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import re
import threading
from pathlib import Path
from typing import Sequence

import anyio.lowlevel
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Match

from gpt1 import __version__
from gpt1.core.constants import (
    SERVE_BODY_TIMEOUT_S,
    SERVE_MAX_BATCH,
    SERVE_MAX_QUEUE,
    SERVE_PREFILL_CHUNK,
    SERVE_STREAM_INTERVAL_MS,
)
from gpt1.core.errors import Gpt1Error
from gpt1.core.sampling_params import SamplingParams
from gpt1.inference.decoding import chat_prompt_ids
from gpt1.inference.engine import Engine, EngineUnavailable
from gpt1.inference.engine_process import EngineProcess
from gpt1.serve.errors import ApiError, generation_error, not_found, unreadable_body, validation_error
from gpt1.serve.middleware import Guard, declare_key
from gpt1.serve.prompt_threads import PromptThreads
from gpt1.serve.routes import Served, add_routes, capacity
from gpt1.serve.schemas import integer_bounds, server_limits

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than a 512-token context can use
BODY_TIMEOUT_S = SERVE_BODY_TIMEOUT_S  # to receive a whole request body

# An origin as a browser's Origin header has it: scheme://host[:port], the host in ASCII (an IDN
# as punycode), an IPv6 address in brackets; a "/" after it is what an address bar adds.
_ORIGIN = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<host>\[[0-9a-f:.]+\]|[a-z0-9._-]+)"
                     r"(?::(?P<port>[0-9]{1,5}))?/?", re.IGNORECASE)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def cors_origin(value: str, name: str = "cors_origins") -> str:
    """`value` as browsers send it in the Origin header, which CORS compares as a string: scheme
    and host in lower case, no trailing "/", no default port (`HTTP://LocalHost:3000/` ->
    `http://localhost:3000`, `https://app.example:443` -> `https://app.example`); "*" as it is.
    A Gpt1Error naming `name` (the argument, or the CLI's flag) for a value that is no origin
    (`localhost:3000`, a path): as given, it would never match, and every preflight failed."""
    if value == "*":
        return value
    match = _ORIGIN.fullmatch(value.strip())
    port = int(match["port"]) if match and match["port"] else None
    if match is None or (port is not None and not 0 < port <= 65535):
        raise Gpt1Error(f"{name} {value!r}: expected an origin, scheme://host[:port] (e.g. https://app.example or "
                        "http://localhost:3000, no path; the host in ASCII), or *")
    scheme, host = match["scheme"].lower(), match["host"].lower()
    keep_port = port is not None and port != _DEFAULT_PORTS.get(scheme)
    return f"{scheme}://{host}" + (f":{port}" if keep_port else "")


_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9._-]*[a-z0-9_])?", re.IGNORECASE)


def allowed_host(value: str, name: str = "allowed_hosts") -> str:
    """`value` as the host check compares it: a name of the Host header, in lower case, without a
    port, an IPv6 address without its brackets. A Gpt1Error naming `name` for a value that is no
    host name (a scheme, a port, a path, `*`): as given, it would never match."""
    host = value.strip().lower().rstrip(".")
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host.removeprefix("[").removesuffix("]")))
    if not _HOST_NAME.fullmatch(host):
        raise Gpt1Error(f"{name} {value!r}: expected a host name as a Host header gives it, without a scheme or "
                        "port (e.g. gpt1, chat.example.com); to answer any name, set an API key")
    return host


class _Starter:
    """Starts the app's engine: in the app's lifespan, or, where Starlette runs none (an app
    mounted in another app, a TestClient used without `with`), at the first request that needs it;
    without that, requests would wait forever for an engine that never steps."""

    def __init__(self, engine: Engine | EngineProcess):
        self.engine, self.started = engine, False
        self._lock = threading.Lock()  # two first requests start it once

    def start(self, first_only: bool = False) -> None:
        with self._lock:
            if first_only and self.started:
                return  # started, and perhaps stopped since: a stopped engine is not started again
            self.engine.start()
            self.started = True

    async def ensure_started(self) -> None:
        if self.started:
            return
        try:
            await asyncio.to_thread(self.start, first_only=True)  # off the loop: a child process may load a model
        except Gpt1Error as e:  # e.g. the process engine's child could not load the model: a 503, not a 400
            raise EngineUnavailable(f"the engine could not start: {e}") from None


def create_app(llm, api_key: str | None = None, *, max_batch: int = SERVE_MAX_BATCH, max_queue: int = SERVE_MAX_QUEUE,
               prefill_chunk: int = SERVE_PREFILL_CHUNK, cuda_graphs: bool = True, compile: bool = False,
               max_body_bytes: int = MAX_BODY_BYTES,
               body_timeout_s: float = BODY_TIMEOUT_S, model_name: str | None = None,
               stream_interval_ms: float = SERVE_STREAM_INTERVAL_MS, engine: str = "thread", device: str | None = None,
               dtype: str | None = None, cors_origins: Sequence[str] = (),
               allowed_hosts: Sequence[str] = ()) -> FastAPI:
    """The server for a loaded model (`gpt1.load(dir)`).

    api_key: when set, every /v1 request needs `Authorization: Bearer <api_key>` (else 401); leading and
        trailing whitespace is not part of it (HTTP strips a header value's);
        without one, a server on a loopback address answers only loopback Host names and `allowed_hosts`.
    max_batch: requests generating at once, decoded together (the KV-cache slots).
    max_queue: requests waiting beyond those; more get 503 with `Retry-After`.
    prefill_chunk: most prompt positions prefilled per engine step (rows x the longest chunk).
    cuda_graphs / compile: the engine's decode step captured as CUDA graphs / compiled by
        torch.compile first (see `gpt1.inference.engine`).
    max_body_bytes / body_timeout_s: larger bodies get 413, slower ones 408.
    model_name: the model id in /v1/models and in replies (default: the model dir's name).
    stream_interval_ms: a stream writes at most this often; the tokens made in between go out
        together (the same events, in one write). 0: every token as soon as it is made.
    engine: "thread" runs the engine in a thread of this process on `llm.model`, as loaded; "process"
        in a child process of its own (`gpt1.inference.engine_process`), which loads `llm.path` from
        disk (changes made to `llm.model` in memory are not seen) on `device` in `dtype` (as
        `gpt1.load`'s; default: `llm`'s device and dtype, or "auto" for `LLM.without_weights`).
    cors_origins: the origins (`https://app.example`, or "*") whose web pages may call the API from a
        browser (CORS); none by default: a browser lets only the page's own origin read the replies.
        Each is written as browsers send it (`cors_origin`: a trailing "/" and upper case go); a
        value that is no scheme://host[:port] is a Gpt1Error.
    allowed_hosts: Host names (no port) that a keyless server on a loopback address answers beside the
        loopback ones, e.g. the name a proxy on this machine passes on (`allowed_host`); the check
        is a guard against DNS rebinding, so only names that the proxy serves.
    The engine starts in the app's lifespan, or, where none runs (the app mounted in another, a
    TestClient without `with`), at the first request that needs it; then `app.state.engine.stop()`
    stops it (docs/serving.md).
    """
    origins, hosts, api_key = _cors_origins(cors_origins), _allowed_hosts(allowed_hosts), _api_key(api_key)
    knobs = dict(max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk, cuda_graphs=cuda_graphs,
                 compile=compile)
    engine = _engine(llm, engine, device, dtype, knobs)
    # Resolved: `--model .` (or ..) would be served as "" (or "..") to clients that pick data[0].id.
    name = model_name or (Path(llm.path).resolve().name if getattr(llm, "path", None) else "") or "gpt1"

    # The tokenizer's thread pool (Rust's rayon, behind every encode) is built by its first use: now,
    # not at the first request, when a burst of clients may have taken the threads a container's pids
    # limit (or `ulimit -u`) allows. A pool that fails to build is never built again: every
    # request after it was a 500 (a Rust panic), until the server restarted.
    llm.tokenizer.encode("warm-up")
    starter, prompt_threads = _Starter(engine), PromptThreads()
    app = _new_app(_lifespan(engine, starter, prompt_threads))
    app.state.engine = engine
    # Started by the lifespan, or first, with the engine, by the caller, before the server runs (gpt1
    # serve), so that a thread that cannot start is the caller's error, not a lifespan traceback and
    # uvicorn's exit status 3.
    app.state.prompt_threads = prompt_threads
    app.state.model_name = name
    # The address the server listens on, for the Guard's host check: set by gpt1.serve.server's serve()
    # and background_server(); None (uvicorn run directly) lets the connection's local address decide.
    app.state.listen_host = None
    _add_error_handlers(app)
    _add_docs_pages(app)
    add_routes(app, Served(engine, llm.tokenizer, starter.ensure_started, prompt_threads), name,
               auth=api_key is not None, stream_interval=stream_interval_ms / 1000)
    app.openapi = functools.partial(_openapi, app, keyed=api_key is not None, shortest_chat=_shortest_chat(llm))
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s,
                       state=app.state, allowed_hosts=hosts)
    if cors_origins:  # outside the Guard: it answers preflights, and its headers reach the Guard's errors too
        _add_cors(app, origins)
    return app


# ---- create_app's steps ----------------------------------------------------------------------------
def _cors_origins(cors_origins: Sequence[str]) -> list[str]:
    """Each origin as browsers send it (`cors_origin`)."""
    if isinstance(cors_origins, str):  # its characters would be read as origins
        raise Gpt1Error(f"cors_origins: expected a list of origins, got the string {cors_origins!r}")
    return [cors_origin(value) for value in cors_origins]


def _allowed_hosts(allowed_hosts: Sequence[str]) -> list[str]:
    """Each host name as the host check compares it (`allowed_host`)."""
    if isinstance(allowed_hosts, str):
        raise Gpt1Error(f"allowed_hosts: expected a list of host names, got the string {allowed_hosts!r}")
    return [allowed_host(value) for value in allowed_hosts]


def _api_key(api_key: str | None) -> str | None:
    """The key as the Guard compares it, or None for a server without one."""
    if api_key is not None:
        # Stripped as the client's token is (HTTP strips a header value's whitespace): a key read
        # with its file's newline would otherwise never match.
        api_key = api_key.strip()
        if not api_key:  # the Guard would check nothing, while the chat page asked for a key
            raise Gpt1Error("api_key is empty; pass None to serve without a key")
    return api_key


def _engine(llm, engine: str, device: str | None, dtype: str | None, knobs: dict) -> Engine | EngineProcess:
    """The app's engine, not started: `create_app`'s `engine`, `device` and `dtype`, and the engine's
    `knobs` (its sizes, CUDA graphs, compile)."""
    if engine == "process":
        weightless = llm.device.type == "meta"  # LLM.without_weights: no loaded device or dtype to follow
        device = device or ("auto" if weightless else str(llm.device))
        dtype = dtype or ("auto" if weightless else str(llm.dtype).removeprefix("torch."))
        return EngineProcess(llm.path, llm.tokenizer, llm.config, device=device, dtype=dtype, **knobs)
    if engine == "thread":
        if device is not None or dtype is not None:  # they were ignored: the model is already loaded
            raise Gpt1Error("device and dtype apply to engine='process'; the thread engine runs llm as loaded "
                             "(gpt1.load(path, device=..., dtype=...))")
        return Engine(llm.model, llm.tokenizer, **knobs)
    raise Gpt1Error(f"engine must be 'thread' or 'process', got {engine!r}")


def _lifespan(engine: Engine | EngineProcess, starter: _Starter, prompt_threads: PromptThreads):
    """The app's lifespan: the prompt threads and the engine started with the server, and stopped
    with it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # anyio, under Starlette's responses, imports its event-loop backend the first time it is
        # used: at start, not at the first request, where under a low `ulimit -n` a burst of clients
        # had taken every descriptor and the import failed (a 500 naming a site-packages file).
        await anyio.lowlevel.checkpoint()
        prompt_threads.start()  # none new where they run already (see app.state.prompt_threads)
        try:
            # A child process loads the model meanwhile; a running engine (see app.state.prompt_threads)
            # returns at once, and the loop's thread for this call is the one its shutdown uses.
            await asyncio.to_thread(starter.start)
            try:
                yield
            finally:
                await asyncio.to_thread(engine.stop)
        finally:
            # Ended with the server, as the engine is: each app served left its 4 threads behind.
            await asyncio.to_thread(prompt_threads.stop)

    return lifespan


def _new_app(lifespan) -> FastAPI:
    """The FastAPI app, with no route yet."""
    # The docs pages are served below with relative links, and a path with a slash too many or too
    # few is redirected relatively (see `_slash_redirect`): FastAPI's and Starlette's name absolute
    # ones, which behind a proxy that serves the server under a prefix (/gpt1/) lead outside it.
    return FastAPI(title="gpt1", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                   redirect_slashes=False,
                   # The API where the schema is (an OpenAPI server URL is relative to it): without one,
                   # the docs' "Try it out" called the host's root, outside a proxy's /gpt1/.
                   servers=[{"url": "."}],
                   description="An OpenAI-compatible API for a gpt1 model, and a chat page at `/`.")


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answered in OpenAI's error body (`gpt1.serve.errors`)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def request_validation_error(request: Request, exc: RequestValidationError):
        return validation_error(exc, request.headers.get("content-type")).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and "parsing the body" in str(exc.detail):  # FastAPI's, raised from the cause
            return unreadable_body(exc.__cause__).response()
        if exc.status_code == 404 and exc.detail == "Not Found":  # no route (a route's own 404 says more)
            return _slash_redirect(request) or not_found(request.url.path).response()
        kind = "not_found" if exc.status_code == 404 else None
        return ApiError(exc.status_code, str(exc.detail), code=kind, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        return generation_error(exc).response()


def _add_docs_pages(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc."""
    # openapi.json relative to the page, so that it is found under whatever prefix the page is. No
    # closure over the app: FastAPI keeps endpoint functions in process-wide caches (see routes.Served).
    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="openapi.json", title="gpt1 - Swagger UI")

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="openapi.json", title="gpt1 - ReDoc")


def _shortest_chat(llm) -> int:
    """The fewest tokens a prompt takes, which the most new tokens leave room for: a completion's
    one ('' is [EOS]), a chat's one empty user message in the template."""
    try:
        return len(chat_prompt_ids(llm.tokenizer, [{"role": "user", "content": ""}], llm.config.block_size,
                                   SamplingParams(max_new_tokens=1)).ids)
    except Gpt1Error:  # a context too small for any chat turn: no chat request fits, max_tokens 0 at most
        return llm.config.block_size


def _add_cors(app: FastAPI, origins: list[str]) -> None:
    """Let web pages of `origins` call the API from a browser."""
    # Any request header, as vLLM allows: OpenAI's JS client sends its own on every call
    # (x-stainless-lang, -os, -retry-count..., openai-organization, -project, -beta), and a
    # preflight that refuses one fails the call. Safe without credentials: no cookie is sent,
    # and the key is a header the page itself must know. Retry-After (of a 503) is exposed to
    # the page, whose client waits as long before it retries.
    app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                       allow_headers=["*"], expose_headers=["Retry-After", "X-Gpt1-Dropped-Messages", "X-Gpt1-Cut-Tokens"], max_age=600)


def _openapi(app: FastAPI, keyed: bool, shortest_chat: int) -> dict:
    """The app's OpenAPI document (/openapi.json, /docs): FastAPI's, made exact for this server,
    once: integer bounds as integers, this server's limits (the models are every server's), and,
    with a key, the bearer scheme that /docs' Authorize and generated clients use."""
    if app.openapi_schema is None:
        document = FastAPI.openapi(app)
        app.openapi_schema = None  # kept only once complete
        integer_bounds(document)
        engine = app.state.engine
        server_limits(document["components"]["schemas"], capacity=capacity(engine), context=engine.config.block_size,
                      vocab_size=engine.config.vocab_size, shortest_chat=shortest_chat)
        if keyed:
            declare_key(document)
        app.openapi_schema = document
    return app.openapi_schema


def _slash_redirect(request: Request) -> RedirectResponse | None:
    """For a path that a route serves with one trailing "/" less (or more), a 307 to it, as
    Starlette's redirect_slashes, but relative (`../models`, `./models/`): Starlette's named the
    absolute URL of the Host header, which behind a proxy that passes its own Host and serves the
    server under a prefix (`location /gpt1/`) dropped the prefix and the port. (Not for several
    slashes: clients resolve `..` after `//` differently, Python's urljoin among them.)"""
    path = request.scope["path"]
    raw = (request.scope.get("raw_path") or path.encode()).decode("latin-1")  # as sent: percent-escapes kept
    if raw.endswith("/") != path.endswith("/") or not raw.strip("/"):  # an escaped "/" (%2F) at the end, or "/"
        return None
    other = path[:-1] if path.endswith("/") else path + "/"
    if not any(route.matches({**request.scope, "path": other})[0] != Match.NONE for route in request.app.router.routes):
        return None
    last = raw.rstrip("/").rsplit("/", 1)[-1]
    relative = f"../{last}" if raw.endswith("/") else f"./{last}/"
    query = request.scope.get("query_string", b"").decode("latin-1")
    return RedirectResponse(relative + (f"?{query}" if query else ""), status_code=307)
