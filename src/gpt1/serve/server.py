"""Running the app with uvicorn: in the foreground (`gpt1 serve`) or in a background thread
(tests, benchmarks, notebooks). The listening socket is bound here, before uvicorn starts, so
that a taken port is a one-line Gpt1Error and `port=0` can pick a free port race-free."""

from __future__ import annotations

import contextlib
import errno
import gc
import socket
import threading
import time
from typing import Iterator

from gpt1.core.errors import Gpt1Error

GRACEFUL_SHUTDOWN_S = 5  # then open streams are cut, so that Ctrl-C never hangs on a long reply


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 takes a free one (see `getsockname()`)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise Gpt1Error(f"cannot resolve host {host!r}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
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


def serve(app, sock: socket.socket, log_level: str = "info", loop: str = "auto") -> None:
    """Serve `app` on the bound socket `sock` until interrupted (Ctrl-C / SIGTERM).

    `loop`: uvicorn's event loop, one of EVENT_LOOPS. "auto" is uvloop when it is installed (the
    `serve` extra installs it), else asyncio's. uvloop answers sooner on a CPU; it holds the GIL
    in its socket writes, which asyncio's releases (see docs/serving.md#streaming-writes).
    """
    import uvicorn

    if loop not in EVENT_LOOPS:
        raise Gpt1Error(f"event loop must be one of {', '.join(EVENT_LOOPS)}, got {loop!r}")
    if loop == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            raise Gpt1Error("--loop uvloop needs uvloop: pip install uvloop (the `serve` extra has it)") from None
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, loop=loop,
                                           timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
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
                      startup_timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` from a background thread; yields its base URL (e.g. http://127.0.0.1:41234)."""
    import uvicorn

    sock = bind(host, port)
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="gpt1-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise Gpt1Error("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
