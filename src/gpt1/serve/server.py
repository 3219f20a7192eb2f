"""Running the app with uvicorn: in the foreground (`gpt1 serve`) or in a background thread
(tests, benchmarks, notebooks). The socket is bound here, before uvicorn starts, so that a taken
port is a one-line Gpt1Error and `port=0` can pick a free port race-free; it listens only once the
app's lifespan has started its engine (see `_Server.startup`)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import gc
import json
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
from typing import Callable, Iterator

import httptools
import uvicorn
import uvicorn.logging
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from gpt1.core.errors import Gpt1Error, first_line
from gpt1.core.progress import warn
from gpt1.inference.engine_process import EngineProcess
from gpt1.serve.errors import ApiError, Throttled
from gpt1.serve.middleware import MAX_HEAD_BYTES, READ_GRACE_S, head_too_large

try:
    import resource
except ImportError:  # Windows
    resource = None

GRACEFUL_SHUTDOWN_S = 5  # then open streams are cut, so that Ctrl-C never hangs on a long reply
HEAD_TIMEOUT_S = 10.0  # from a connection's start, or a request's first byte, to its headers' end
STARTUP_POLL_MAX_S = 0.1  # background_server looks every 10 ms: a longer gap is a pause, not startup time
# Descriptors that must be free for the server to start: its event loop takes up to ~10 (uvloop's:
# its epoll, signal and wake-up pipes), and each connection one. With fewer, uvloop failed halfway
# through starting: three chained tracebacks, after the CLI had said "serving on http://...".
START_DESCRIPTORS = 16


def open_file_limit() -> int | None:
    """The soft limit on open files (`ulimit -n`); None when unlimited or unknown (Windows)."""
    if resource is None:
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def open_descriptors() -> int | None:
    """How many file descriptors this process has open (Linux, macOS); None where unknown."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return len(os.listdir(folder)) - 1  # less the one the listing itself opened
    return None


def raise_open_file_limit(wanted: int = 1 << 16) -> None:
    """Raise the soft limit on open files toward the hard one, to `wanted` at most, as Go's runtime
    and nginx's worker_rlimit_nofile do: each connection takes a descriptor, and the soft limit a
    supervisor or container sets (often 1,024) may be far below the hard one. Never lowers it; a
    system that refuses (macOS above kern.maxfilesperproc) keeps the one it has. For a program that
    serves (`gpt1 serve`): the limit is the whole process's, and its children's."""
    if resource is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _check_descriptors(needed: int = START_DESCRIPTORS) -> None:
    """Gpt1Error when fewer than `needed` more files can be opened: found by opening them, the
    one count that holds on every system (and for whatever limit applies)."""
    held: list[int] = []
    try:
        for _ in range(needed):
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError as e:
        if e.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        limit = open_file_limit()
        raise Gpt1Error(f"too many open files to start serving: {len(held)} more can be opened, the server needs at "
                        f"least {needed} (its event loop, then one per connection); raise the open-file limit "
                        f"(ulimit -n{f', now {limit}' if limit is not None else ''})") from None
    finally:
        for fd in held:
            os.close(fd)


class _Descriptors:
    """Says, in a line every few seconds, when connections are lost for want of file descriptors.
    asyncio's loop reports each failed accept (with a traceback, once per place in the listen
    backlog: 84 MB of log in 20 s); uvloop's (libuv) accepts and closes them without a word, so
    there the line comes when the open connections fill the room that the limit left at start."""

    def __init__(self):
        self.limit: int | None = None
        self.room: int | None = None  # connections that fit in the descriptors left at start
        self._said = Throttled()

    def measure(self) -> None:
        self.limit, in_use = open_file_limit(), open_descriptors()
        self.room = self.limit - in_use if self.limit is not None and in_use is not None else None

    def connected(self, connections: int) -> None:
        if self.room is not None and connections >= self.room:
            self.dropping(f"{connections} connections are open, all the limit leaves room for")

    def dropping(self, why: str) -> None:
        self._said.warn(f"out of file descriptors ({why}): new connections wait, or are dropped, until some close; "
                        f"raise the open-file limit (ulimit -n{f', now {self.limit}' if self.limit is not None else ''})")


class _Http10Cycle(RequestResponseCycle):
    """uvicorn's request-response cycle (httptools) for an HTTP/1.0 request, whose reply of unknown
    length (a stream) goes out as it is, ended by closing the connection (RFC 9112 6.3): uvicorn
    sent it chunked, which RFC 9112 6.1 forbids to a 1.0 client (one reads the chunk sizes as
    part of the body), where its h11 protocol does not. uvicorn closes a 1.0 request's connection
    after the reply in any case."""

    _unframed = False  # a reply without Content-Length: its body is written as it comes

    async def send(self, message) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            names = {name.lower() for name, _ in message.get("headers", [])}
            if not names & {b"content-length", b"transfer-encoding"}:
                self._unframed, self.chunked_encoding = True, False  # False: uvicorn adds no Transfer-Encoding
        elif message["type"] == "http.response.body" and self._unframed:
            # uvicorn counts an unchunked body against a Content-Length: here, each part is all there is.
            self.expected_content_length = len(message.get("body", b""))
        await super().send(message)


class _Protocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol (httptools), which would buffer a request's head (its request
    line and headers) without limit and wait for it forever, before the API key is even looked
    at. Here a head still arriving is refused once it is over MAX_HEAD_BYTES (431: one that
    arrives whole is measured by the Guard) or when it has taken `head_timeout_s` (408; a
    connection that sent nothing is closed, as an idle kept-alive one is), and a request that
    is not valid HTTP gets its 400 in OpenAI's error body too, not uvicorn's plain text. Its
    timeouts, the head's and uvicorn's keep-alive, act READ_GRACE_S late (see there): a stopped
    server (SIGSTOP) reset or answered 408 requests whose bytes had arrived in time."""

    head_timeout_s = HEAD_TIMEOUT_S

    descriptors: _Descriptors | None = None  # the server's

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if self.descriptors is not None:
            self.descriptors.connected(len(self.server_state.connections))
        self._head: int | None = 0  # bytes of the head being received; None between heads
        self._head_began = False  # a head began in the data being parsed
        self._keep_alive_late = False  # the keep-alive timer has fired once: its grace is running
        self._start_head_timer()

    def connection_lost(self, exc) -> None:
        self._head_timer.cancel()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head is None:  # the next request on a kept-alive connection
            self._head, self._head_began = 0, True
            self._start_head_timer()

    def on_headers_complete(self) -> None:
        self._head = None
        self._head_timer.cancel()
        super().on_headers_complete()
        if self.scope["http_version"] == "1.0" and self.cycle is not None and self.cycle.scope is self.scope:
            self.cycle.__class__ = _Http10Cycle  # its ASGI task, created but not yet run, calls its send

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

    def _start_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timeout, False)

    def _head_timeout(self, late: bool) -> None:
        if not late:  # the bytes waiting in the socket are read first
            self._head_timer = self.loop.call_later(READ_GRACE_S, self._head_timeout, True)
        elif self._head or self._head_began:
            self._refuse(ApiError(408, f"the request line and headers did not arrive within {self.head_timeout_s:g} s",
                                  code="request_timeout"))
        else:
            self.transport.close()

    def on_response_complete(self) -> None:
        self._keep_alive_late = False  # uvicorn arms its keep-alive timer afresh
        super().on_response_complete()

    def timeout_keep_alive_handler(self) -> None:
        if self._keep_alive_late or self.transport.is_closing():
            super().timeout_keep_alive_handler()
        else:  # the next request may wait in the socket: read it first (closing would reset it)
            self._keep_alive_late = True
            self.timeout_keep_alive_task = self.loop.call_later(READ_GRACE_S, self.timeout_keep_alive_handler)

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


class _StoppedWhileStarting(Exception):
    """A signal to stop arrived while the app's lifespan started its engine: the sockets never listen."""


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

    engine_died = ""  # why the server stopped on its own: its engine process died
    not_listening = ""  # why it did not start: its socket could not listen (another server took the port)
    on_started: Callable[[], None] | None = None  # called once the server takes connections

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's, but the sockets (bound by `bind`, not listening) listen only once the app's
        lifespan has started its engine: until then a connection is refused, so that a TCP probe
        (a load balancer's, Kubernetes' tcpSocket, a script's wait for the port) does not take for
        ready a server still loading its model or compiling (29 s with --compile), whose requests
        hung meanwhile. A listen that fails (a second server that bound the port while this one
        started) stops the server with the reason in `not_listening`."""
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_exception(loop.get_exception_handler()))
        # The loop's first worker thread, started here rather than by the lifespan's first
        # `asyncio.to_thread`: one that cannot start (a pids limit) is then the caller's RuntimeError
        # (the CLI's one line), not uvicorn's lifespan traceback and "Application startup failed".
        await asyncio.to_thread(int)
        if sockets:
            lifespan_startup = self.lifespan.startup

            async def start_then_listen() -> None:
                await lifespan_startup()
                if self.should_exit and not self.lifespan.should_exit:  # Ctrl-C or SIGTERM while the engine started
                    raise _StoppedWhileStarting
                if not self.lifespan.should_exit:
                    for sock in sockets:
                        _listen(sock, self.config.backlog)

            self.lifespan.startup = start_then_listen  # uvicorn serves the sockets right after it
        try:
            await super().startup(sockets)
        except Gpt1Error as e:  # _listen's: the lifespan has started, so it is ended, as at shutdown
            self.not_listening, self.should_exit = str(e), True
            await self.lifespan.shutdown()
            return
        except _StoppedWhileStarting:  # never listened nor said "serving" (it did, then exited: a probe saw it up)
            await self.lifespan.shutdown()
            return
        if self.started:
            self.config.http_protocol_class.descriptors.measure()
            if self.on_started is not None:
                self.on_started()

    def _loop_exception(self, previous):
        """The loop's exception handler: a failed accept (asyncio's "socket.accept() out of system
        resource") is the throttled line of `_Descriptors`, every other context goes on as before.
        CPython's accept loop (3.11's, at least) does not stop at its first failure: it reports it
        and schedules a retry once per place in the listen backlog (2,048), and the retries still
        due when the server stops fail on its closed socket, a traceback each: left unsaid."""
        descriptors = self.config.http_protocol_class.descriptors

        def handle(loop: asyncio.AbstractEventLoop, context: dict) -> None:
            error, message = context.get("exception"), context.get("message", "")
            if message.startswith("socket.accept() out of system resource") and isinstance(error, OSError):
                descriptors.dropping(f"accepting a connection failed: {error.strerror}")
            elif "._start_serving(" in message and isinstance(error, ValueError) and self.should_exit:
                pass
            elif previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        return handle

    async def on_tick(self, counter: int) -> bool:
        """Stop, as vLLM's server does, once the engine process has died (the OOM killer, a crash):
        a server left up answers every request 503, and a supervisor that restarts processes on exit
        (systemd's Restart=on-failure, a container's restart policy) would never restart it."""
        engine = getattr(getattr(self.config.app, "state", None), "engine", None)
        if not self.should_exit and getattr(engine, "died", ""):
            self.engine_died, self.should_exit = engine.died, True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        engine = getattr(getattr(self.config.app, "state", None), "engine", None)
        if engine is not None:
            await asyncio.to_thread(engine.stop)  # waits for the step running now
        await super().shutdown(sockets)


class _AccessFormatter(uvicorn.logging.AccessFormatter):
    """uvicorn's access-log line, with a record's `note` after its status, where it has one (a
    request whose client went away: gpt1.serve.replies.client_gone)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        note = getattr(record, "note", None)
        return f"{line.rstrip()} {note}" if note else line


class _LogHandler(logging.StreamHandler):
    """uvicorn's log handler (its log on stderr, the access log on stdout), which says once that it
    cannot write (a full disk, `ulimit -f`) and then keeps quiet: Python's own wrote a "--- Logging
    error ---" traceback of ~4.7 KB on stderr for each line it could not write, a request's each
    for the access log. It goes on writing: lines are kept again once there is room."""

    failing = False

    def handleError(self, record: logging.LogRecord) -> None:
        if self.failing:
            return
        self.failing = True
        error = sys.exc_info()[1]
        log = "access log" if self.name == "access" else "log"  # the handler's name in uvicorn's logging config
        warn(f"the server's {log} cannot be written to {getattr(self.stream, 'name', 'its stream')} "
             f"({first_line(error) if error is not None else 'an error'}); lines that fail from now on are lost "
             "without a word")


def _log_config() -> dict:
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    for handler in config["handlers"].values():
        handler["class"] = f"{_LogHandler.__module__}.{_LogHandler.__qualname__}"
    # An access line says when (uvicorn's says only who, what and the status): a log written to a
    # file (`gpt1 serve > serve.log`, nohup) had no way to tell when a request came. ISO 8601 with
    # the UTC offset, so that lines from machines in other zones sort and compare.
    access = config["formatters"]["access"]
    access["fmt"], access["datefmt"] = "%(asctime)s " + access["fmt"], "%Y-%m-%dT%H:%M:%S%z"
    access["()"] = f"{_AccessFormatter.__module__}.{_AccessFormatter.__qualname__}"
    # uvicorn colours its lines whenever stdout is a terminal; NO_COLOR (no-color.org: set and not
    # empty) and TERM=dumb, a terminal that shows escapes as text, ask for plain lines.
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        for formatter in config["formatters"].values():
            formatter["use_colors"] = False
    return config


def _server(app, head_timeout_s: float = HEAD_TIMEOUT_S, **config) -> uvicorn.Server:
    protocol = type("_Protocol", (_Protocol,), {"head_timeout_s": head_timeout_s, "descriptors": _Descriptors()})
    return _Server(uvicorn.Config(app, http=protocol, log_config=_log_config(), **config))


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening: `serve` and `background_server` make it
    listen once the app's engine has started. Port 0 takes a free one (see `getsockname()`). A port
    that another server holds, listening or still starting (bound here), is a Gpt1Error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise Gpt1Error(f"cannot resolve host {host!r}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if sys.platform == "win32":
            # Windows' SO_REUSEADDR would let this bind a port another server listens on (the two would
            # split its connections, and "another server on that port?" would never be said).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
            sock.bind(address)
        else:
            _bind_reserving(sock, address)
    except OSError as e:
        sock.close()
        raise _cannot_listen(host, port, e) from None
    return sock


def _bind_reserving(sock: socket.socket, address) -> None:
    """Bind without SO_REUSEADDR first: the port is then this socket's alone while it does not listen
    yet (Linux lets sockets that all set SO_REUSEADDR bind one port while none of them listens: a
    second `gpt1 serve` would load its model, then fail). That bind fails while the connections of
    a server that just stopped wait out TIME_WAIT: then again with SO_REUSEADDR, so that a restarted
    server binds its port at once; that still refuses a port that a socket listens on, or has bound
    without it. `_listen` sets it before listening, so that this server's own connections, which
    take the listening socket's, do not keep the next one off the port."""
    try:
        sock.bind(address)
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            raise
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)


def _cannot_listen(host: str, port: int, e: OSError) -> Gpt1Error:
    hint = {errno.EADDRINUSE: " (another server on that port? try --port)",
            errno.EADDRNOTAVAIL: " (not an address of this machine; try --host 127.0.0.1)"}.get(e.errno, "")
    return Gpt1Error(f"cannot listen on {host}:{port}: {e.strerror}{hint}")


def _listen(sock: socket.socket, backlog: int) -> None:
    """Make the bound socket listen. Done here, not left to uvicorn: where it fails (two servers that
    both bound the port with SO_REUSEADDR, see `_bind_reserving`), asyncio's loop raised the error
    with a traceback, and uvloop's logged it and served nothing, after "serving on ..."."""
    try:
        if sys.platform != "win32":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.listen(backlog)
    except OSError as e:
        host, port = sock.getsockname()[:2]
        raise _cannot_listen(host, port, e) from None


def check_tls(certfile: str | None, keyfile: str | None = None) -> None:
    """Gpt1Error, in one line, when the TLS certificate (PEM) and its key (in `keyfile`, or in
    `certfile` after the certificate) cannot be loaded: else uvicorn's traceback at start, and an
    encrypted key asked for its passphrase on the terminal, where a service has none. Neither
    given: plain HTTP, nothing to check."""
    if certfile is None:
        if keyfile is not None:
            raise Gpt1Error("a TLS key needs its certificate (ssl_certfile)")
        return
    for path in filter(None, (certfile, keyfile)):
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise Gpt1Error(f"cannot read the TLS {'key' if path == keyfile else 'certificate'} {path}: "
                            f"{e.strerror}") from None

    def no_passphrase() -> str:
        raise Gpt1Error(f"the TLS key {keyfile or certfile} is encrypted; serve an unencrypted copy "
                        "(openssl pkey -in KEY -out PLAIN_KEY), readable by this user only")

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile, password=no_passphrase)
    except ssl.SSLError as e:
        why = ("the key is not the certificate's" if e.reason == "KEY_VALUES_MISMATCH" else
               "expected PEM files: the certificate, and its key (in the key file, or after the certificate)")
        raise Gpt1Error(f"cannot use the TLS certificate {certfile}{f' and key {keyfile}' if keyfile else ''}: "
                        f"{why}") from None


EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def _tell_listen_host(app, sock: socket.socket | None) -> None:
    """Tell create_app's app the address it listens on: its host check (gpt1.serve.middleware) is
    for a server on loopback, not for one on 0.0.0.0 that a local proxy reaches through 127.0.0.1."""
    state = getattr(app, "state", None)
    if state is not None and hasattr(state, "listen_host"):
        state.listen_host = sock.getsockname()[0] if sock is not None else None


def serve(app, sock: socket.socket, log_level: str = "info", loop: str = "auto",
          on_started: Callable[[], None] | None = None, ssl_certfile: str | None = None,
          ssl_keyfile: str | None = None) -> None:
    """Serve `app` on the bound socket `sock` until interrupted (Ctrl-C / SIGTERM / SIGHUP), or
    until its engine process dies: then a Gpt1Error saying why, once the open requests have heard it.
    The socket listens once the app's lifespan has started its engine (see `_Server.startup`).

    `loop`: uvicorn's event loop, one of EVENT_LOOPS. "auto" is uvloop when it is installed (the
    `serve` extra installs it), else asyncio's. uvloop answers sooner on a CPU; it holds the GIL
    in its socket writes, which asyncio's releases (see docs/serving.md#streaming-writes).
    `on_started`: called once the server takes connections (the CLI says "serving ... on" then).
    `ssl_certfile` / `ssl_keyfile`: serve HTTPS with this certificate and key (PEM files; the key
    may follow the certificate in `ssl_certfile`); checked first (`check_tls`).
    Gpt1Error, before anything starts, when fewer than START_DESCRIPTORS files can be opened.
    """
    check_tls(ssl_certfile, ssl_keyfile)
    if loop not in EVENT_LOOPS:
        raise Gpt1Error(f"event loop must be one of {', '.join(EVENT_LOOPS)}, got {loop!r}")
    if loop == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            raise Gpt1Error("--loop uvloop needs uvloop: pip install uvloop (the `serve` extra has it)") from None
    _tell_listen_host(app, sock)
    server = _server(app, log_level=log_level, loop=loop, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                     ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    server.on_started = on_started
    # The ~200k objects of the imports and the model will live as long as the server: out of
    # the garbage collector's sight, a full collection takes ~0 ms instead of 130-150 ms (a
    # pause of every stream, measured on the development machine).
    gc.collect()
    gc.freeze()
    try:
        _check_descriptors()
        server.run(sockets=[sock])
    finally:
        sock.close()
    if server.not_listening:
        raise Gpt1Error(server.not_listening)
    if server.engine_died:
        raise Gpt1Error(f"{server.engine_died}; the server stopped (restart it; a supervisor does)")


@contextlib.contextmanager
def background_server(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                      startup_timeout: float = 30.0, head_timeout_s: float = HEAD_TIMEOUT_S,
                      ssl_certfile: str | None = None, ssl_keyfile: str | None = None) -> Iterator[str]:
    """Serve `app` from a background thread; yields its base URL (e.g. http://127.0.0.1:41234).
    head_timeout_s: the time a request's line and headers may take to arrive.
    ssl_certfile / ssl_keyfile: HTTPS, as `serve`'s (the URL is then https://...)."""
    check_tls(ssl_certfile, ssl_keyfile)
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
    server = _server(app, head_timeout_s, log_level=log_level, timeout_graceful_shutdown=1,
                     ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="gpt1-uvicorn", daemon=True)
    thread.start()
    # Startup time is counted while this process runs: a gap between two looks much longer than
    # the poll is a pause (SIGSTOP, a debugger, a suspended VM), which stopped the server's thread
    # too; charging it failed a server that was up a moment after the process resumed. And the
    # server is looked at once more after the time is up.
    waited, last = 0.0, time.monotonic()
    while not server.started:
        if not thread.is_alive() or waited > startup_timeout:
            server.should_exit = True
            sock.close()
            if isinstance(engine, EngineProcess):  # its child would outlive the failed start
                engine.stop()
            raise Gpt1Error(server.not_listening or "the server did not start")
        time.sleep(0.01)
        now = time.monotonic()
        waited, last = waited + min(now - last, STARTUP_POLL_MAX_S), now
    try:
        scheme = "https" if ssl_certfile is not None else "http"
        yield f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        _tell_listen_host(app, None)  # the app's next server (a TestClient, uvicorn on 0.0.0.0) is another
