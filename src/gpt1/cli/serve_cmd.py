"""`gpt1 serve`: the OpenAI-compatible HTTP server and the browser chat page."""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import os

import gpt1
from gpt1.cli.args import add_dtype_flag, path_arg
from gpt1.core.constants import (
    SERVE_BODY_TIMEOUT_S,
    SERVE_MAX_BATCH,
    SERVE_MAX_QUEUE,
    SERVE_PREFILL_CHUNK,
    SERVE_STREAM_INTERVAL_MS,
)
from gpt1.core.errors import Gpt1Error
from gpt1.core.imports import failed_import, is_missing
from gpt1.core.progress import info, warn

# torch and the engine are imported by the command: `gpt1 --help` imports this module.

API_KEY_ENV = "GPT1_API_KEY"
# What gpt1.serve imports from the `serve` extra (uvloop is optional: used when it imports).
SERVE_PACKAGES = ("fastapi", "uvicorn", "httptools", "pydantic")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API with a chat page",
        description="Serve a model dir: POST /v1/chat/completions and /v1/completions (OpenAI's API, streaming "
                    "included), GET /v1/models, /health, the API docs at /docs and a chat page at /. "
                    "Point any OpenAI client at http://HOST:PORT/v1.",
    )
    parser.add_argument("--model", required=True, type=path_arg, metavar="DIR", help="the model dir to serve")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind; 127.0.0.1 is this machine only, 0.0.0.0 is every interface "
                             "(then set an API key). Without an API key, a server on a loopback address answers "
                             "only requests addressed to localhost, *.localhost, a loopback address or an "
                             "--allowed-host name (403 otherwise), so that a web page cannot reach it by DNS "
                             "rebinding; default: %(default)s")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="a Host name that a keyless server on a loopback address answers beside the loopback "
                             "ones: the name a proxy on this machine passes on (nginx's `proxy_set_header Host "
                             "$host`, Caddy, Traefik; an `upstream NAME` block sends Host: NAME); repeat for more. "
                             "Only names the proxy serves: the check keeps a web page from reaching the server by "
                             "DNS rebinding (its own name re-pointed at 127.0.0.1). Default: none")
    parser.add_argument("--api-key", default=None, type=api_key_arg,
                        help=f"require 'Authorization: Bearer KEY' on every /v1 request (default: ${API_KEY_ENV} "
                             "if set and not empty, else no key)")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="let web pages of this origin (scheme://host[:port], e.g. https://app.example or "
                             "http://localhost:3000; * for any) call the API from a browser; repeat for more. "
                             "Default: none (a browser lets only the server's own pages, such as the chat page, "
                             "read its replies)")
    parser.add_argument("--ssl-certfile", default=None, type=path_arg, metavar="PEM",
                        help="serve HTTPS with this certificate (PEM; its key may follow it in the file). Default: "
                             "plain HTTP (behind a proxy that terminates TLS, the usual way)")
    parser.add_argument("--ssl-keyfile", default=None, type=path_arg, metavar="PEM",
                        help="the certificate's private key (PEM, unencrypted), if not in --ssl-certfile")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps... (default: the best available)")
    add_dtype_flag(parser)
    parser.add_argument("--max-batch", type=int, default=SERVE_MAX_BATCH,
                        help="requests generating at once, decoded together in one batch; the KV cache for "
                             "that many full contexts is allocated at start (its size is printed) "
                             "(default: %(default)s)")
    parser.add_argument("--max-queue", type=int, default=SERVE_MAX_QUEUE,
                        help="requests waiting for a free slot beyond those; more get 503, and a single request "
                             "with more prompts than max-batch + max-queue gets 400 (default: %(default)s)")
    parser.add_argument("--prefill-chunk", type=int, default=SERVE_PREFILL_CHUNK,
                        help="most prompt positions prefilled per engine step (rows x the longest chunk), so "
                             "that a long prompt does not stall the other streams (default: %(default)s)")
    parser.add_argument("--stream-interval", type=float, default=SERVE_STREAM_INTERVAL_MS, metavar="MS",
                        help="a streaming reply writes at most every MS milliseconds; the tokens made in between "
                             "go out together, as the same events in one write. Raises throughput on a fast GPU "
                             "whose event loop cannot keep up with a write per token. 0 writes each token as soon "
                             "as it is made (tokens that pile up still go out together) (default: %(default)s)")
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help="on CUDA, do not capture the decode step as CUDA graphs")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step with torch.compile before capturing it (fewer, fused "
                             "kernels; each batch-size bucket compiles at start, tens of seconds each)")
    parser.add_argument("--body-timeout", type=float, default=SERVE_BODY_TIMEOUT_S, metavar="SECONDS",
                        help="a request body must arrive within this time, else 408 and the connection is closed "
                             "(default: %(default)s)")
    parser.add_argument("--engine", default="auto", choices=["auto", "thread", "process"],
                        help="where the engine runs: process is a child process of its own (the server's event "
                             "loop and the engine then do not share a GIL: what a fast GPU needs), thread a "
                             "thread of the server's process (one process, less memory); auto is process on a "
                             "CUDA GPU, thread elsewhere (default: %(default)s)")
    parser.add_argument("--loop", default="auto", choices=["auto", "uvloop", "asyncio"],
                        help="the event loop: auto is uvloop when installed, else asyncio's. uvloop answers "
                             "sooner; asyncio's releases the GIL while it writes to a socket, which may serve a "
                             "fast GPU better where system calls are slow (default: %(default)s)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's log level; info includes the access log (default: %(default)s)")
    parser.set_defaults(func=serve_command)


def api_key_arg(value: str) -> str:
    """--api-key KEY, stripped (see `clean_api_key`), not empty: `--api-key "$KEY"` with KEY unset
    served without a key check, to a chat page that asks for a key."""
    if not (value := clean_api_key(value)):
        raise argparse.ArgumentTypeError("is empty (an unset shell variable?); leave the flag out to serve without a key")
    return value


def clean_api_key(value: str) -> str:
    """The key without leading and trailing whitespace, as a client's is received: HTTP strips a
    header value's (RFC 9110 5.5), so a key read with the newline of its file (`echo KEY > file`, a
    Kubernetes Secret) could never be sent, and every request got 401."""
    return value.strip()


def _import_serve():
    """gpt1.serve's entry points, or one line naming the package of the `serve` extra that is not
    installed, fails to import (its own error), or is older than the extra asks."""
    for package in SERVE_PACKAGES:  # one by one, so that the line names the package
        try:
            importlib.import_module(package)
        except ImportError as e:
            if is_missing(e, package):
                raise Gpt1Error(f"gpt1 serve needs the `serve` extra (FastAPI, uvicorn, httptools): {package} is missing; "
                                "install it with: pip install 'gpt1[serve]'") from None
            raise Gpt1Error(failed_import("gpt1 serve", package, e)) from None
    try:
        from gpt1.serve import bind, create_app, serve
    except ImportError as e:  # e.g. pydantic 2.4: "cannot import name 'Discriminator' from 'pydantic'"
        raise Gpt1Error(f"gpt1 serve: {' '.join(str(e).split())}; the `serve` extra needs newer versions: "
                        "pip install 'gpt1[serve]'") from None
    return bind, create_app, serve


def serve_command(args: argparse.Namespace) -> int:
    from gpt1.core.device import resolve_device
    from gpt1.inference.engine import Engine
    from gpt1.inference.llm import LLM

    bind, create_app, serve = _import_serve()
    from gpt1.serve.app import allowed_host, cors_origin
    from gpt1.serve.server import check_tls, raise_open_file_limit
    if not 0 <= args.port <= 65535:
        raise Gpt1Error(f"--port must be in [0, 65535], got {args.port}")
    # Checked before the model loads; written as browsers send the Origin header (a trailing "/",
    # upper case: as given, they never matched a page, and the server started without a word).
    cors_origins = [cors_origin(value, "--cors-origin") for value in args.cors_origin]
    allowed_hosts = [allowed_host(value, "--allowed-host") for value in args.allowed_host]
    if args.ssl_keyfile is not None and args.ssl_certfile is None:
        raise Gpt1Error("--ssl-keyfile needs --ssl-certfile (the certificate it is the key of)")
    check_tls(args.ssl_certfile, args.ssl_keyfile)
    api_key = args.api_key if args.api_key is not None else clean_api_key(os.environ.get(API_KEY_ENV, "")) or None
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                             ("--prefill-chunk", args.prefill_chunk, 1)):
        if value < low:
            raise Gpt1Error(f"{flag} must be >= {low}, got {value}")
    if not args.body_timeout > 0:
        raise Gpt1Error(f"--body-timeout must be > 0 seconds, got {args.body_timeout}")
    if not 0 <= args.stream_interval <= 10_000:  # also refuses nan
        raise Gpt1Error(f"--stream-interval must be in [0, 10000] milliseconds, got {args.stream_interval}")
    raise_open_file_limit()  # before the engine's process starts, which inherits it
    device = resolve_device(args.device)
    # The process engine passes pipes as inherited file descriptors: POSIX only.
    engine = (args.engine if args.engine != "auto" else
              "process" if device.type == "cuda" and os.name == "posix" else "thread")
    # With the engine in a child process, this one needs only the tokenizer and the config (the
    # dir is checked here all the same, before the child starts).
    llm = (LLM.without_weights(args.model) if engine == "process"
           else gpt1.load(args.model, device=device, dtype=args.dtype))
    # The thread engine runs llm as loaded above; the process engine's child loads it itself.
    load_as = dict(device=str(device), dtype=args.dtype) if engine == "process" else {}
    app = create_app(llm, api_key=api_key, max_batch=args.max_batch, max_queue=args.max_queue,
                     prefill_chunk=args.prefill_chunk, cuda_graphs=not args.no_cuda_graphs, compile=args.compile,
                     body_timeout_s=args.body_timeout, stream_interval_ms=args.stream_interval,
                     engine=engine, cors_origins=cors_origins, allowed_hosts=allowed_hosts, **load_as)
    engine = app.state.engine
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and api_key is None:
        warn(f"serving on {args.host} without an API key: anyone who can reach this port can use the model "
             f"(set --api-key or ${API_KEY_ENV})")
    if not llm.is_chat_model:  # /v1/chat/completions still formats the messages: say what the replies will be
        warn(f"{args.model} has no chat template: it is a base model, so /v1/chat/completions and the chat page "
             "get continuations of the conversation text rather than answers (/v1/completions is what it is for)")
    sock = bind(args.host, args.port)  # bound, so that a taken port is said now; it listens once the engine runs
    try:  # closed when the start fails or a signal stops it first (dev mode's ResourceWarning); serve() closes it too
        # Now, with the app's prompt threads, which its lifespan then finds running: a child that cannot
        # start (e.g. its KV cache does not fit), or a thread (`ulimit -u`, a container's pids limit),
        # is one clear error, not a lifespan traceback and uvicorn's exit status 3.
        engine.start()
        app.state.prompt_threads.start()
        info(f"KV cache: {engine.max_batch} slots x {llm.config.block_size} positions = "
             f"{engine.kv_bytes / 2**20:,.1f} MiB of {engine.dtype_name} on {engine.device} (--max-batch {engine.max_batch})"
             + (", in the engine's own process (--engine process)" if not isinstance(engine, Engine) else ""))
        _check_open_file_limit(args.max_batch, args.max_queue)
        host, port = sock.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        # Said once the server takes connections: a server that fails to start has served nothing.
        scheme = "https" if args.ssl_certfile is not None else "http"
        serving = (f"serving {llm.path} on {scheme}://{host}:{port} (chat page at /, API at /v1, docs at /docs)"
                   + (", API key required" if api_key else ""))
        serve(app, sock, log_level=args.log_level, loop=args.loop, on_started=lambda: info(serving),
              ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
    finally:
        sock.close()
    return 0


def _check_open_file_limit(max_batch: int, max_queue: int) -> None:
    """Warn when the open-file limit (raised as far as it goes at start) leaves fewer descriptors
    than the server may use: a connection each, for every slot and queue place. Beyond it, new
    connections are dropped without an answer."""
    from gpt1.serve.server import START_DESCRIPTORS, open_descriptors, open_file_limit

    limit, in_use = open_file_limit(), open_descriptors()
    if limit is None or in_use is None:
        return
    needed = in_use + START_DESCRIPTORS + max_batch + max_queue
    if in_use + START_DESCRIPTORS <= limit < needed:  # below that, serve() refuses to start: its own line
        warn(f"the open-file limit (ulimit -n) is {limit}, below the {needed} descriptors this server may use ({in_use} "
             f"open, {START_DESCRIPTORS} for its event loop, one per connection for --max-batch {max_batch} + "
             f"--max-queue {max_queue}): connections beyond it are dropped; raise the limit (ulimit -n, "
             "LimitNOFILE= in a systemd unit, docker run --ulimit nofile=)")
