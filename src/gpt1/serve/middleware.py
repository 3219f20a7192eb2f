"""The guard in front of the app: pure ASGI middleware (it does not buffer streamed responses)
that answers before FastAPI reads or parses anything.

- Host check: a server without an API key on a loopback address answers only requests
  addressed to a loopback name: localhost or *.localhost (RFC 6761: resolved on this machine), or
  a loopback address (127.0.0.0/8, ::1), or one of its `allowed_hosts` (the name a proxy on the
  same machine passes on: `gpt1 serve --allowed-host`). Otherwise a web page the user
  visits could reach it by DNS rebinding (its own name, re-pointed at 127.0.0.1). The address is
  the one the server listens on (`state.listen_host`, set by `gpt1.serve.server`), so that a
  server on 0.0.0.0 reached through 127.0.0.1 (a proxy on the same machine) is not taken for a
  loopback one; where nobody set it (the app run by uvicorn itself), the address the connection
  arrived on.
- API key: `Authorization: Bearer KEY` on every /v1 request (`needs_key`), when the server has a
  key; not on a CORS preflight (OPTIONS), which browsers send without it. The OpenAPI document
  says so (`declare_key`).
- Body: at most `max_body_bytes` (413), received within `body_timeout_s` seconds in all (408,
  and the connection is closed, READ_GRACE_S after the timeout: see there), so that slow senders
  cannot hold connections open; not compressed (415 for a `Content-Encoding` other than
  identity: nothing here decodes one).
- Head: a request line and headers of more than MAX_HEAD_BYTES get 431 (`gpt1.serve.server`
  bounds a head still arriving, and the time it takes).
- HEAD: answered as GET wherever GET is (uptime checkers use `curl -I`); the server sends only
  the headers.
- Faults that are not Exceptions: a Rust panic in the tokenizer (pyo3's PanicException, a
  BaseException; e.g. a tokenizer.json whose pre-tokenizer regex hits its backtracking limit)
  slipped past the app's 500 handler, which takes Exceptions: the client got a plain-text 500.
  It is raised on as `generation_error`'s ApiError, which that handler answers with OpenAI's
  body. An exit, a Ctrl-C or a cancellation (a client that went away) goes on as it is.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
from typing import Sequence

from gpt1.serve.errors import ApiError, generation_error, short_repr

MAX_HEAD_BYTES = 64 * 1024  # a request's line and headers (a browser's are a few KiB)
# A timeout is acted on only after this much more time, in which the event loop reads what has
# already reached the socket. After the process was stopped (Ctrl-Z, SIGSTOP, a debugger) or its
# loop blocked past a timeout, the expired timers run before the reads: uvloop runs timers first,
# and asyncio's select, interrupted by the stop, returns no events once its timeout has passed.
# Requests whose bytes arrived in time were then answered 408 or reset. nginx, likewise, handles
# ready reads before it expires its timers. A slow sender gains this much once, at most.
READ_GRACE_S = 0.25
BODY_METHODS = ("POST", "PUT", "PATCH")
# The BaseExceptions that are not faults of a request: they end the request (or the server) as they
# are. A group (anyio's task groups) may hold a cancellation: it too.
_EXITS = (KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError, BaseExceptionGroup)


KEY_SCHEME = "bearerAuth"  # the key's security scheme in the OpenAPI document


def needs_key(path: str) -> bool:
    """Whether a server with a key asks for it on `path` (within the app: see _route_path)."""
    return path.startswith("/v1")


def declare_key(document: dict) -> None:
    """A keyed server's key in its OpenAPI document, in place: an HTTP bearer scheme, required by
    the operations whose paths need it, so that /docs offers to Authorize and a client generated
    from the document sends it."""
    document.setdefault("components", {})["securitySchemes"] = {KEY_SCHEME: {
        "type": "http", "scheme": "bearer",
        "description": "the server's API key (gpt1 serve --api-key or $GPT1_API_KEY), sent as Authorization: Bearer KEY"}}
    for path, operations in document["paths"].items():
        if needs_key(path):
            for operation in operations.values():
                operation["security"] = [{KEY_SCHEME: []}]


def is_fault(e: BaseException) -> bool:
    """Whether `e` is a fault of the request it ended (any Exception; a BaseException such as
    pyo3's PanicException, a Rust panic), not an exit or cancellation to pass on as it is."""
    return isinstance(e, Exception) or not isinstance(e, _EXITS)


def is_loopback(host: str) -> bool:
    """Whether a host name or address means this machine only."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _route_path(scope) -> str:
    """The request's path within this app. Starlette 1.x's Mount and uvicorn's root_path leave the
    prefix in scope["path"] (/llm/v1/models) and name it in scope["root_path"]; older Starlette
    stripped it. Either way: /v1/models."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("/", ""):
        return path[len(root):]
    return path


def _host_name(header: bytes) -> str:
    """'example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    host = header.decode("latin-1").strip()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    def __init__(self, app, api_key: str | None, max_body_bytes: int, body_timeout_s: float, state=None,
                 allowed_hosts: Sequence[str] = ()):
        self.app = app
        self.state = state  # the app's: its listen_host, once a server has bound its socket
        self.allowed_hosts = frozenset(allowed_hosts)  # as gpt1.serve.app.allowed_host writes them
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}  # uvicorn leaves the body out: it knows the request's method
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if error := self._refuse(scope, headers):
            return await error.response()(scope, receive, send)
        body = b""
        if scope["method"] in BODY_METHODS:
            try:
                body = await self._read_body_in_time(receive)
            except TimeoutError:
                error = ApiError(408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                                 code="request_timeout", headers={"Connection": "close"})
                return await error.response()(scope, receive, send)
            except _TooLarge:
                return await self._too_large().response()(scope, receive, send)
            if body is None:
                return  # the client went away
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed and scope["method"] in BODY_METHODS:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, send)
        except BaseException as e:
            if isinstance(e, Exception) or not is_fault(e):  # an Exception: the app's 500 handler answers it
                raise
            raise generation_error(e) from e  # an Exception, answered as one

    def _refuse(self, scope, headers: dict[str, bytes]) -> ApiError | None:
        # The head as it arrived whole (one still arriving is bounded in gpt1.serve.server).
        head = len(scope.get("raw_path") or b"") + len(scope["query_string"])
        if head + sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEAD_BYTES:
            return head_too_large()
        address = self._listen_host(scope)
        if self.api_key is None and address and is_loopback(address) and "host" in headers:
            name = _host_name(headers["host"])
            if not is_loopback(name) and name.lower().rstrip(".") not in self.allowed_hosts:
                names = ["localhost", "*.localhost", "a loopback address", *sorted(self.allowed_hosts)]
                return ApiError(403, f"the Host header names {name[:100]!r}: this server has no API key and listens on "
                                     f"the loopback address {address}, so it answers only requests addressed to "
                                     f"{', '.join(names[:-1])[:300]} or {names[-1][:100]} (a guard against DNS "
                                     "rebinding); set an API key, or allow the name that a proxy passes on "
                                     "(gpt1 serve --allowed-host NAME), to serve other names",
                                code="invalid_host")
        # The path within this app: mounted (`outer.mount("/llm", app)`) or under uvicorn's root_path,
        # scope["path"] is the whole /llm/v1/..., and a check of it let every request through unkeyed.
        # Not on OPTIONS: a browser's CORS preflight never carries the key, and a 401 fails the
        # request it asks for (the preflight itself reaches nothing).
        if self.api_key is not None and scope["method"] != "OPTIONS" and needs_key(_route_path(scope)):
            scheme, _, token = headers.get("authorization", b"").partition(b" ")
            # compare_digest takes as long for a wrong key as for a right one: no timing oracle.
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                message = ("missing API key: send the header 'Authorization: Bearer KEY'"
                           if not token else "incorrect API key")
                return ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        encoding = headers.get("content-encoding", b"").strip().lower()
        if scope["method"] in BODY_METHODS and encoding not in (b"", b"identity"):
            # Else the compressed bytes would reach the JSON parser and fail as "not valid UTF-8".
            name = short_repr(encoding.decode("latin-1"))
            return ApiError(415, f"the request body is compressed (Content-Encoding {name}), which this server does "
                                 "not decode; send it uncompressed",
                            code="unsupported_content_encoding", headers={"Accept-Encoding": "identity"})
        declared = headers.get("content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return self._too_large()
        return None

    def _listen_host(self, scope) -> str | None:
        """The address the server listens on, else the one the connection arrived on (as
        conservative: on 0.0.0.0 reached through 127.0.0.1, it is 127.0.0.1)."""
        if listening := getattr(self.state, "listen_host", None):
            return listening
        server = scope.get("server")
        return str(server[0]) if server else None

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than {self.max_body_bytes:,} bytes", code="request_too_large")

    async def _read_body_in_time(self, receive) -> bytes | None:
        """The body (see _read_body), or TimeoutError once `body_timeout_s` and then READ_GRACE_S
        have passed: the reading goes on through the grace, so that bytes already in the socket
        when the timeout fired (the process was stopped) are read before the 408."""
        reading = asyncio.ensure_future(self._read_body(receive))
        try:
            done, _ = await asyncio.wait([reading], timeout=self.body_timeout_s)
            if not done:
                done, _ = await asyncio.wait([reading], timeout=READ_GRACE_S)
        finally:
            if not reading.done():  # timed out, or this request was cancelled (the client went away)
                reading.cancel()
        if not done:
            raise TimeoutError
        return reading.result()

    async def _read_body(self, receive) -> bytes | None:
        """The whole body (a chunked one declares no length: the limit holds while reading). A
        bytearray grows in place: `bytes +=` copied the whole body at every message (quadratic for
        a body sent in tens of thousands of tiny pieces)."""
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                raise _TooLarge
        return bytes(body)


def head_too_large() -> ApiError:
    return ApiError(431, f"the request line and headers are larger than {MAX_HEAD_BYTES:,} bytes",
                    code="request_header_fields_too_large", headers={"Connection": "close"})


class _TooLarge(Exception):
    pass
