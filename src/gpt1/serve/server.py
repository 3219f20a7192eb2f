"""Running the app with uvicorn: in the foreground (`gpt1 serve`) or in a background thread
(tests, benchmarks, notebooks). The listening socket is bound here, before uvicorn starts, so
that a taken port is a one-line Gpt1Error and `port=0` can pick a free port race-free."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import json
import signal
import socket
import sys
import threading
import time
from typing import Iterator

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from gpt1.core.errors import Gpt1Error
from gpt1.inference.engine_process import EngineProcess
from gpt1.serve.errors import ApiError
from gpt1.serve.middleware import MAX_HEAD_BYTES, head_too_large

GRACEFUL_SHUTDOWN_S = 5  # then open streams are cut, so that Ctrl-C never hangs on a long reply
HEAD_TIMEOUT_S = 10.0  # from a connection's start, or a request's first byte, to its headers' end


class _Protocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol (httptools), which would buffer a request's head (its request
    line and headers) without limit and wait for it forever, before the API key is even looked
    at. Here a head still arriving is refused once it is over MAX_HEAD_BYTES (431: one that
    arrives whole is measured by the Guard) or when it has taken `head_timeout_s` (408; a
    connection that sent nothing is closed, as an idle kept-alive one is), and a request that
    is not valid HTTP gets its 400 in OpenAI's error body too, not uvicorn's plain text."""

    head_timeout_s = HEAD_TIMEOUT_S

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head: int | None = 0  # bytes of the head being received; None between heads
        self._head_began = False  # a head began in the data being parsed
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timeout)

    def connection_lost(self, exc) -> None:
        self._head_timer.cancel()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head is None:  # the next request on a kept-alive connection
            self._head, self._head_began = 0, True
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timeout)

    def on_headers_complete(self) -> None:
        self._head = None
        self._head_timer.cancel()
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        self._head_began = False
        super().data_received(data)
        # Counted once parsed, when all of `data` is known to be head: data in which a head
        # begins may also end the previous request's body, and goes uncounted (one read at most).
        if self._head is not None and not self._head_began:
            self._head += len(data)
            if self._head > MAX_HEAD_BYTES:
                self._refuse(head_too_large())

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this from its `except httptools.HttpParserError` in data_received: the
        # parser's reason (e.g. "Transfer-Encoding can't be present with Content-Length") is
        # the exception being handled.
        reason = sys.exc_info()[1]
        detail = f": {reason}" if isinstance(reason, httptools.HttpParserError) and str(reason) else ""
        self._refuse(ApiError(400, f"the request is not valid HTTP/1.1{detail}", code="invalid_http_request"))

    def _head_timeout(self) -> None:
        if self._head or self._head_began:
            self._refuse(ApiError(408, f"the request line and headers did not arrive within {self.head_timeout_s:g} s",
                                  code="request_timeout"))
        else:
            self.transport.close()

    def _refuse(self, error: ApiError) -> None:
        """Answer with the error and close the connection (only close it while a pipelined
        request's response is being written)."""
        self._head = None
        self._head_timer.cancel()
        if self.cycle is None or self.cycle.response_complete:
            body = json.dumps(error.body()).encode()
            self.transport.write(STATUS_LINE[error.status] + b"content-type: application/json\r\nconnection: close\r\n"
                                 + b"content-length: %d\r\n\r\n" % len(body) + body)
        self.transport.close()


class _Server(uvicorn.Server):
    """uvicorn's server, which stops the app's engine as soon as it begins to shut down (Ctrl-C,
    SIGTERM): every request still queued or generating then ends at once with the documented
    error, a 503 `engine_unavailable` or a stream's error event ("the server is shutting down").
    Left to the app's lifespan, the engine would stop only after uvicorn's graceful period had
    cancelled those requests: plain-text 500s, streams cut without an error, a traceback each."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's (take the signals while serving, shut down gracefully, then raise them again for
        the handlers they had: the CLI's one-line ending), with SIGHUP as well as SIGINT and SIGTERM:
        left to its default, a hang-up (a closed terminal or SSH session, `kill -HUP`) killed the
        server at once, its open streams cut without their error event. One ignored (nohup) stays so."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        hangup = getattr(signal, "SIGHUP", None)
        taken = [*uvicorn.server.HANDLED_SIGNALS,
                 *([hangup] if hangup is not None and signal.getsignal(hangup) is not signal.SIG_IGN else [])]
        original = {sig: signal.signal(sig, self.handle_exit) for sig in taken}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
        for sig in reversed(self._captured_signals):  # several: last first, as uvicorn does
            signal.raise_signal(sig)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        engine = getattr(getattr(self.config.app, "state", None), "engine", None)
        if engine is not None:
            await asyncio.to_thread(engine.stop)  # waits for the step running now
        await super().shutdown(sockets)


def _server(app, head_timeout_s: float = HEAD_TIMEOUT_S, **config) -> uvicorn.Server:
    protocol = type("_Protocol", (_Protocol,), {"head_timeout_s": head_timeout_s})
    return _Server(uvicorn.Config(app, http=protocol, **config))


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 takes a free one (see `getsockname()`)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise Gpt1Error(f"cannot resolve host {host!r}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    if sys.platform == "win32":
        # Windows' SO_REUSEADDR would let this bind a port another server listens on (the two would
        # split its connections, and "another server on that port?" would never be said).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
    else:
        # A restarted server binds its port at once, while the old one's connections wait out TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        hint = {errno.EADDRINUSE: " (another server on that port? try --port)",
                errno.EADDRNOTAVAIL: " (not an address of this machine; try --host 127.0.0.1)"}.get(e.errno, "")
        raise Gpt1Error(f"cannot listen on {host}:{port}: {e.strerror}{hint}") from None
    return sock


EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def _tell_listen_host(app, sock: socket.socket) -> None:
    """Tell create_app's app the address it listens on: its host check (gpt1.serve.middleware) is
    for a server on loopback, not for one on 0.0.0.0 that a local proxy reaches through 127.0.0.1."""
    state = getattr(app, "state", None)
    if state is not None and hasattr(state, "listen_host"):
        state.listen_host = sock.getsockname()[0]


def serve(app, sock: socket.socket, log_level: str = "info", loop: str = "auto") -> None:
    """Serve `app` on the bound socket `sock` until interrupted (Ctrl-C / SIGTERM / SIGHUP).

    `loop`: uvicorn's event loop, one of EVENT_LOOPS. "auto" is uvloop when it is installed (the
    `serve` extra installs it), else asyncio's. uvloop answers sooner on a CPU; it holds the GIL
    in its socket writes, which asyncio's releases (see docs/serving.md#streaming-writes).
    """
    if loop not in EVENT_LOOPS:
        raise Gpt1Error(f"event loop must be one of {', '.join(EVENT_LOOPS)}, got {loop!r}")
    if loop == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            raise Gpt1Error("--loop uvloop needs uvloop: pip install uvloop (the `serve` extra has it)") from None
    _tell_listen_host(app, sock)
    server = _server(app, log_level=log_level, loop=loop, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    # The ~200k objects of the imports and the model will live as long as the server: out of
    # the garbage collector's sight, a full collection takes ~0 ms instead of 130-150 ms (a
    # pause of every stream, measured on the development machine).
    gc.collect()
    gc.freeze()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


@contextlib.contextmanager
def background_server(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                      startup_timeout: float = 30.0, head_timeout_s: float = HEAD_TIMEOUT_S) -> Iterator[str]:
    """Serve `app` from a background thread; yields its base URL (e.g. http://127.0.0.1:41234).
    head_timeout_s: the time a request's line and headers may take to arrive."""
    sock = bind(host, port)
    _tell_listen_host(app, sock)
    host, port = sock.getsockname()[:2]
    # A process engine is started here, as `gpt1 serve` does: a child that cannot start (its KV
    # cache does not fit) is then its own Gpt1Error, not a lifespan traceback from uvicorn and
    # "the server did not start". The app's lifespan finds it running.
    engine = getattr(getattr(app, "state", None), "engine", None)
    if isinstance(engine, EngineProcess):
        try:
            engine.start()
        except BaseException:
            sock.close()
            raise
    server = _server(app, head_timeout_s, log_level=log_level, timeout_graceful_shutdown=1)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="gpt1-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            if isinstance(engine, EngineProcess):  # its child would outlive the failed start
                engine.stop()
            raise Gpt1Error("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
