"""The endpoints: /v1/models, /v1/chat/completions, /v1/completions (OpenAI's shapes, `stream:
true` as server-sent events ending in `data: [DONE]`), /health and the page; and the bridge
between the engine's worker thread and the event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import math
import os
import secrets
import threading
import time
import urllib.parse
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import FastAPI, Path, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from gpt1.core.errors import Gpt1Error
from gpt1.core.progress import logger
from gpt1.core.sampling_params import SamplingParams
from gpt1.inference.admission import QueueFull, TooLarge
from gpt1.inference.decoding import ChatPrompt, Chunk
from gpt1.inference.engine import Engine, EngineUnavailable
from gpt1.inference.engine import Request as EngineRequest
from gpt1.inference.engine_process import EngineProcess
from gpt1.serve import mapping
from gpt1.serve.errors import ApiError, error_responses, generation_error, resource_shortage
from gpt1.serve.logprobs import TextOffsets, chat_logprobs, completion_logprobs
from gpt1.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gpt1.serve.metrics import metrics_text
from gpt1.serve.middleware import is_fault
from gpt1.serve.page import page_html
from gpt1.serve.schemas import ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, Health, Model, ModelList


# ---- engine <-> event loop ---------------------------------------------------------------------
class _Mailbox:
    """Hands items from the engine's worker thread to the event loop, waking the loop once for
    everything posted before it gets to run, not once per token: each wake-up is a write to the
    loop's self-pipe plus a turn of the loop, which at 32 streams on a GPU would be tens of
    thousands of system calls a second."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        # Weakly: the mailbox is the value of `_mailboxes`, keyed by this loop, and a value that
        # held its key kept every stopped server's loop alive, and through it (the loop's
        # exception handler, the server) its app, engine, model and KV cache.
        self._loop = weakref.ref(loop)
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, Any]] = []

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        with self._lock:
            self._items.append((queue, item))
            if len(self._items) > 1:  # a delivery is already scheduled and will take this too
                return
        loop = self._loop()
        if loop is None:  # the event loop is gone: nobody is listening any more
            return
        try:
            loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


_mailboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    """The loop's one mailbox (one per loop, so that one wake-up serves every stream)."""
    box = _mailboxes.get(loop)
    if box is None:
        box = _mailboxes[loop] = _Mailbox(loop)
    return box


def submit(engine: Engine | EngineProcess, prompts: list[list[int]],
           params: SamplingParams | list[SamplingParams]) -> tuple[list[EngineRequest], asyncio.Queue]:
    """Queue the requests (`params`: one for all, or one per prompt); their chunks arrive on the
    returned asyncio queue as (index, item)."""
    mailbox = _mailbox(asyncio.get_running_loop())
    queue: asyncio.Queue = asyncio.Queue()

    def sink_for(index: int):
        return lambda item: mailbox.post(queue, (index, item))

    try:
        return engine.submit(prompts, params, sink_for), queue
    except QueueFull as e:
        raise ApiError(503, str(e), type="server_error", code="server_overloaded", headers={"Retry-After": "1"}) from None
    except TooLarge as e:
        raise ApiError(400, str(e), param="prompt", code="too_many_prompts") from None
    except EngineUnavailable as e:
        raise generation_error(e) from None
    except Gpt1Error as e:
        raise ApiError(400, str(e)) from None
    except Exception as e:
        if resource_shortage(e):  # short of memory building the requests: a 503 to retry, no traceback
            raise generation_error(e) from None
        raise


# A stream that has sent nothing for this long (its request queued behind others, or slow tokens)
# sends an SSE comment, which clients skip: a proxy closes a reply idle for longer than its read
# timeout (nginx's proxy_read_timeout, 60 s by default; many load balancers' idle timeout, 60 s).
KEEPALIVE_S = 15.0
KEEPALIVE_EVENT = ": keep-alive\n\n"
_IDLE = object()  # put on a stream's queue by its keep-alive timer


async def chunk_batches(requests: list[EngineRequest], queue: asyncio.Queue, interval: float = 0.0,
                        keepalive: float | None = None) -> AsyncIterator[list[tuple[int, Chunk]]]:
    """The chunks of all requests as they come, in lists of those that are waiting: one chunk
    when the consumer keeps up, more when it falls behind, so that a stream sends what it has
    in one write. With `interval` (seconds), lists come at most that often, the first at once.
    With `keepalive` (seconds), an empty list comes whenever that long has passed without one.

    Cancels what is left when the consumer stops early (e.g. Starlette cancels a streaming
    response whose client disconnected): the engine frees their slots at its next step.
    """
    loop = asyncio.get_running_loop()
    pending, last = len(requests), -math.inf
    given = loop.time()  # when the consumer last got a list
    timer: asyncio.TimerHandle | None = None

    def idle() -> None:  # one timer a period, not one per token (each stream's wait for its next token)
        nonlocal timer
        now = loop.time()
        if now >= given + keepalive:
            queue.put_nowait((None, _IDLE))
        timer = loop.call_at(max(given, now) + keepalive, idle)

    if keepalive is not None:
        timer = loop.call_at(given + keepalive, idle)
    try:
        while pending:
            item = await queue.get()
            if item[1] is _IDLE:
                if loop.time() >= given + keepalive:  # else a list went out since the timer posted it
                    given = loop.time()
                    yield []
                continue
            ends = isinstance(item[1], BaseException) or item[1].finish_reason is not None
            if interval and not ends and (wait := last + interval - loop.time()) > 0:
                # Streams wait out their own intervals, not a shared clock's ticks: their
                # writes then spread over the interval instead of coming in one burst.
                await asyncio.sleep(wait)  # an end that arrives while the reply is idle goes out at once
            batch, error = [], None
            while True:
                if isinstance(item[1], BaseException):
                    error = item[1]
                    break
                if item[1] is not _IDLE:
                    batch.append(item)
                    pending -= item[1].finish_reason is not None
                if not pending or queue.empty():
                    break
                item = queue.get_nowait()
            last = given = loop.time()
            if batch:
                yield batch
            if error is not None:
                raise error
    finally:
        if timer is not None:
            timer.cancel()
        for r in requests:
            r.cancel()


# ---- failures of generation ---------------------------------------------------------------------
FAILURE_LOG_INTERVAL_S = 5.0  # the most often a failed request is a line in the log
_TRACEBACK_PLACES = 64  # the places whose traceback is logged; a failure raised elsewhere gets its line only


class FailureLog:
    """Answers an error that ended an accepted request, and says it in the server's log, for a
    stream as for a JSON reply (a stream's error event reached its client alone, under an access
    line of 200 OK): a line per failed request, one every FAILURE_LOG_INTERVAL_S at most (the
    next counting those left unsaid), with the traceback of the first failure raised at each
    place. One fault fails every row of the batch: uvicorn logged a ~90-line traceback for each
    (16 at --max-batch 16), and nothing at all for streams."""

    def __init__(self):
        self._lock = threading.Lock()  # requests of every stream fail together
        self._last, self._unsaid = -math.inf, 0
        self._places: set[tuple[str, str, int]] = set()

    def answer(self, e: Exception) -> ApiError:
        """The reply to `e`, which ended a request after `submit` accepted it."""
        error = generation_error(e)  # a GenerationFault (logits that overflow) is the model's: a 500
        if error.status == 500:  # a 503 is no fault (a stopped engine) or is said where it is decided (a shortage)
            self._say(e, error)
        return error

    def _say(self, e: Exception, error: ApiError) -> None:
        place = _raised_at(e)
        with self._lock:
            now = time.monotonic()
            traceback = place is not None and place not in self._places and len(self._places) < _TRACEBACK_PLACES
            if not traceback and now - self._last < FAILURE_LOG_INTERVAL_S:
                self._unsaid += 1
                return
            if traceback:
                self._places.add(place)
            unsaid, self._last, self._unsaid = self._unsaid, now, 0
        logger.error(f"a request got {error.status}: {error.message}"
                     + (f" ({unsaid:,} more times since the last such line)" if unsaid else ""),
                     exc_info=(type(e), e, e.__traceback__) if traceback else None)


def _raised_at(e: Exception) -> tuple[str, str, int] | None:
    """Where `e` was raised (its type, file and line), for a traceback worth logging: None for a
    Gpt1Error, whose message says it all, and for an error first raised by `chunk_batches`, made
    without a traceback (the process engine's, rebuilt from its child's type and message)."""
    if isinstance(e, Gpt1Error) or e.__traceback__ is None:
        return None
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    if tb.tb_frame.f_code is chunk_batches.__code__:
        return None
    return type(e).__qualname__, tb.tb_frame.f_code.co_filename, tb.tb_lineno


async def collect(request: Request, requests: list[EngineRequest], queue: asyncio.Queue) -> list[dict] | None:
    """Each request's text, finish_reason and usage; None (and the requests stopped) if the client left.
    A failure is the ApiError of the app's FailureLog (`Served.failures`)."""
    results = [{"text": [], "finish_reason": None, "prompt_tokens": 0, "completion_tokens": 0, "logprobs": [],
                "prompt_logprobs": None} for _ in requests]

    async def consume() -> None:
        async for batch in chunk_batches(requests, queue):
            for index, chunk in batch:
                r = results[index]
                r["text"].append(chunk.text)
                r["logprobs"] += chunk.logprobs or ()
                r.update(finish_reason=chunk.finish_reason, prompt_tokens=chunk.prompt_tokens,
                         completion_tokens=chunk.completion_tokens)
                if chunk.prompt_logprobs is not None:
                    r["prompt_logprobs"] = chunk.prompt_logprobs

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
            for r in requests:
                r.cancel()
    if not work.done() or work.cancelled():  # a cancel takes effect only when the task next runs
        return None
    try:
        work.result()  # raises what generation raised
    except Exception as e:
        # An ApiError, answered as such: raised on, the fault went to Starlette's last handler,
        # whose uvicorn logged a traceback for every request that it failed.
        raise request.app.state.served.failures.answer(e) from None
    for r in results:
        r["text"] = "".join(r["text"])
    return results


# ---- responses ---------------------------------------------------------------------------------
def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _event_template(event: Callable[[str], dict]) -> Callable[[str], str]:
    """`_sse(event(text))` for any text: the event is serialised once, and per token only the
    text is (the event loop's work per streamed token, which shares the GIL with the engine, is
    what limits a server on a fast GPU). The text's place is where the events of the texts "0"
    and "1" differ, so nothing else in the event can be taken for it: a marker text searched for
    instead was also found in the request's own strings (a `model` of "\\u0000text\\u0000").
    """
    zero, one = _sse(event("0")), _sse(event("1"))
    at = len(os.path.commonprefix((zero, one)))  # the text's one character, after its opening quote
    before, after = zero[:at - 1], zero[at + 2:]
    return lambda text: before + json.dumps(text, ensure_ascii=False) + after


def _stream_response(events: AsyncIterator[str]) -> StreamingResponse:
    # no-cache and no proxy buffering: each token must reach the client as it is made.
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


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


def _cancel(requests: list[EngineRequest]) -> None:
    """Stop what is left of a stream's requests, however its events ended: chunk_batches does so
    only once it has started, and an error or a client gone before then left the rows generating
    for nobody (a no-op for those that have finished)."""
    for r in requests:
        r.cancel()


def _envelope(rid: str, kind: str, created: int, model_id: str) -> dict:
    """The keys every completion object and chunk starts with, as OpenAI's."""
    return {"id": rid, "object": kind, "created": created, "model": model_id, "system_fingerprint": None}


def _no_usage(include_usage: bool) -> dict:
    # As OpenAI: with include_usage, every chunk but the last has "usage": null (clients index it).
    return {"usage": None} if include_usage else {}


async def _chat_events(requests, queue, rid, now, model_id, include_usage, interval,
                       failures: FailureLog | None = None, tokenizer=None) -> AsyncIterator[str]:
    """The chat stream's events, a choice per request (OpenAI's `n`: each chunk names its choice's
    index); a failure is an error event, said in `failures` (None: a log of its own). With
    logprobs, each content chunk carries its tokens' (`tokenizer` names them)."""
    def chunk(index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
        return {**_envelope(rid, "chat.completion.chunk", now, model_id),
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
                **_no_usage(include_usage)}

    prompt_tokens, completion_tokens, finished = 0, 0, 0
    try:
        content_events = [_event_template(lambda text, i=i: chunk(i, {"content": text})) for i in range(len(requests))]
        # As OpenAI's: each choice's first chunk gives its role.
        yield "".join(_sse(chunk(i, {"role": "assistant", "content": ""})) for i in range(len(requests)))
        async for batch in chunk_batches(requests, queue, interval, KEEPALIVE_S):
            if not batch:  # nothing for KEEPALIVE_S: a comment, so that no proxy takes the stream for dead
                yield KEEPALIVE_EVENT
                continue
            events = []  # what a stream has waiting goes out in one write
            for index, c in batch:
                if c.logprobs:  # not the template's: the event has more than its text to fill in
                    events.append(_sse(chunk(index, {"content": c.text}, logprobs=chat_logprobs(tokenizer, c.logprobs))))
                elif c.text:
                    events.append(content_events[index](c.text))
                if c.finish_reason is not None:
                    events.append(_sse(chunk(index, {}, c.finish_reason)))
                    # The choices share one prompt, counted once (as OpenAI and vLLM count it).
                    prompt_tokens, finished = c.prompt_tokens, finished + 1
                    completion_tokens += c.completion_tokens
            if events:
                yield "".join(events)
    except BaseException as e:  # noqa: BLE001 - the status line is sent: report in the stream
        if not is_fault(e):  # a cancellation (the client left), an exit: not the stream's to answer
            raise
        yield _sse((failures or FailureLog()).answer(e).body())
        return
    finally:
        _cancel(requests)
    if include_usage and finished:
        yield _sse({**_envelope(rid, "chat.completion.chunk", now, model_id), "choices": [],
                    "usage": _usage(prompt_tokens, completion_tokens)})
    yield "data: [DONE]\n\n"


async def _completion_events(requests, queue, rid, now, model_id, include_usage, interval,
                             failures: FailureLog | None = None, n: int = 1,
                             scoring: "_CompletionScoring | None" = None) -> AsyncIterator[str]:
    """The completion stream's events, a choice per request: `n` consecutive ones per prompt (the
    prompt's tokens counted once in the usage); a failure is an error event, said in `failures`
    (as `_chat_events`). With `scoring` (echo or logprobs), each choice's first chunk starts with
    its echoed prompt, and every chunk carries its tokens' log-probabilities."""
    def chunk(index: int, text: str, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
        return {**_envelope(rid, "text_completion", now, model_id),
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
                **_no_usage(include_usage)}

    prompt_tokens = completion_tokens = 0
    try:
        text_events = [_event_template(functools.partial(chunk, i)) for i in range(len(requests))]
        async for batch in chunk_batches(requests, queue, interval, KEEPALIVE_S):
            if not batch:  # as in _chat_events (this stream has no first event of its own to send at once)
                yield KEEPALIVE_EVENT
                continue
            events = []  # what the stream has waiting goes out in one write
            for index, c in batch:
                if scoring is not None:
                    text, logprobs = scoring.piece(index // n, index, c)
                    if text or logprobs is not None or c.finish_reason is not None:
                        events.append(_sse(chunk(index, text, c.finish_reason, logprobs)))
                elif c.finish_reason is not None:
                    events.append(_sse(chunk(index, c.text, c.finish_reason)))
                elif c.text:
                    events.append(text_events[index](c.text))
                if c.finish_reason is not None:
                    prompt_tokens += c.prompt_tokens if index % n == 0 else 0
                    completion_tokens += c.completion_tokens
            if events:
                yield "".join(events)
    except BaseException as e:  # noqa: BLE001 - the status line is sent: report in the stream
        if not is_fault(e):  # a cancellation (the client left), an exit: not the stream's to answer
            raise
        yield _sse((failures or FailureLog()).answer(e).body())
        return
    finally:
        _cancel(requests)
    if include_usage:
        yield _sse({**_envelope(rid, "text_completion", now, model_id), "choices": [],
                    "usage": _usage(prompt_tokens, completion_tokens)})
    yield "data: [DONE]\n\n"


class _CompletionScoring:
    """A completion request's echo and legacy logprobs, choice by choice as its chunks come:
    the prompt's text (and its tokens' log-probabilities) before the choice's first text, and
    text offsets counted on from there (OpenAI's: from the start of the prompt; echoed, the text
    returned, which after truncate_prompt is the prompt's kept tail, as `usage` counts it)."""

    def __init__(self, tokenizer, req: CompletionRequest, prompts: list[list[int]]):
        self.tokenizer, self.echo, self.scored = tokenizer, bool(req.echo), req.logprobs is not None
        self.prompts = prompts
        # A prompt given as a string is echoed as given (when the model saw all of it).
        given = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) \
            else [req.prompt]
        self.given = [g if isinstance(g, str) else None for g in given]
        self.offsets: dict[int, TextOffsets] = {}  # choice -> where its next token starts

    def _prompt(self, prompt: int, seen: int) -> tuple[str, list[int]]:
        """The prompt's text and the token ids the model saw of it (its last `seen`; none for an
        empty prompt, whose [EOS] the model saw is no part of it)."""
        ids = self.prompts[prompt]
        seen_ids = ids[len(ids) - seen:] if ids else []
        given = self.given[prompt]
        text = given if given is not None and len(seen_ids) == len(ids) else self.tokenizer.decode(seen_ids)
        return text, seen_ids

    def piece(self, prompt: int, choice: int, c: Chunk) -> tuple[str, dict | None]:
        """The chunk's text and logprobs object for choice `choice` of prompt `prompt`."""
        text, ids, entries = c.text, [], []
        if choice not in self.offsets:  # the choice's first chunk
            offsets = self.offsets[choice] = TextOffsets(self.tokenizer)
            if self.echo:
                prompt_text, prompt_ids = self._prompt(prompt, c.prompt_tokens)
                text = prompt_text + text
                if self.scored and prompt_ids:
                    ids, entries = prompt_ids, list(c.prompt_logprobs or [None] * len(prompt_ids))[-len(prompt_ids):]
            else:  # the reply's offsets count on from the end of the whole prompt, as sent (OpenAI's: from its
                # start), not of the tail that truncate_prompt kept; a character the prompt began, the reply ends
                offsets.skip(self.prompts[prompt], self.given[prompt])
        if not self.scored:
            return text, None
        ids += [e.token_id for e in c.logprobs or ()]
        entries += c.logprobs or ()
        return text, completion_logprobs(self.tokenizer, ids, entries, self.offsets[choice])


# ---- the threads that build prompts --------------------------------------------------------------
PROMPT_THREADS = 4
T = TypeVar("T")


class PromptThreads:
    """The threads that build prompts (the chat template, tokenizing: up to seconds of CPU for a
    large request, off the event loop): PROMPT_THREADS of them, the requests beyond waiting their
    turn. Starlette's run_in_threadpool grew anyio's pool to 40 threads for a burst of 100 clients,
    and under a limit on threads (`ulimit -u`, a container's pids limit) those left none for the
    engine's OpenMP team, whose failure to start one ends the process (libgomp)."""

    def __init__(self, threads: int = PROMPT_THREADS):
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None  # made by the first start() or run(), ended by stop()
        self._lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="gpt1-prompt")
            return self._pool

    def start(self) -> None:
        """Start them all now (the pool starts each when work first waits for it): a server claims
        its threads at start, so that no burst of requests has a thread to start later. Started
        already, nothing new starts. One that cannot start (`ulimit -u`, a container's pids limit)
        raises its RuntimeError at once, the threads started before it ended: they waited for it
        10 s, and the server's exit waited for them."""
        pool = self._executor()
        started = threading.Barrier(self.threads)  # busy together, each task takes a thread of its own
        try:
            for _ in range(self.threads):
                pool.submit(started.wait, 10)
        except BaseException:
            started.abort()
            self.stop()
            raise

    def stop(self) -> None:
        """End the threads, once those building a prompt have done so: the app's lifespan ends with
        its server, and each app served left its 4 threads behind. The app served again starts new ones."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    async def run(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) on one of the threads; a 503 to retry when none could be started for now (see
        `generation_error`), not a 500 with a traceback."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor(), fn, *args)
        except Exception as e:
            if resource_shortage(e):
                raise generation_error(e) from None
            raise


# ---- the routes ----------------------------------------------------------------------------------
_access_log = logging.getLogger("uvicorn.access")


def _client_gone(request: Request, started: float) -> Response:
    """The answer to a request whose client went away while it generated (a proxy's read timeout, a
    user gone), its generation cancelled, and its line in uvicorn's access log: uvicorn writes none
    for a reply it cannot send, so the request left no trace. Status 499, nginx's "client closed
    request", as uvicorn's line has it, then how long it was held (gpt1.serve.server's format says
    it; uvicorn's own leaves it out)."""
    scope = request.scope
    client = scope.get("client")
    path = urllib.parse.quote(scope["path"]) + (f"?{scope['query_string'].decode('ascii', 'replace')}"
                                                if scope.get("query_string") else "")
    _access_log.info('%s - "%s %s HTTP/%s" %d', f"{client[0]}:{client[1]}" if client else "-", scope["method"], path,
                     scope.get("http_version", "1.1"), 499,
                     extra={"note": f"after {time.monotonic() - started:.1f} s: the client went away; cancelled"})
    return Response(status_code=499)  # nobody reads it


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
            stream = _stream_response(_chat_events(requests, queue, rid, now, model_id, include_usage,
                                                   stream_interval, served.failures, served.tokenizer))
            stream.headers.update(fitting)  # a Response returned as such does not take `response`'s
            return stream
        results = await collect(request, requests, queue)
        if results is None:
            return _client_gone(request, started)
        response.headers.update(fitting)  # FastAPI adds them to the JSON response it makes of the dict
        return _chat_completion(_envelope(rid, "chat.completion", now, model_id), results, served.tokenizer,
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
        scoring = _CompletionScoring(served.tokenizer, req, prompts) if req.echo or req.logprobs is not None else None
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _stream_response(_completion_events(requests, queue, rid, now, model_id, include_usage,
                                                       stream_interval, served.failures, n, scoring))
        results = await collect(request, requests, queue)
        if results is None:
            return _client_gone(request, started)
        return _completion(_envelope(rid, "text_completion", now, model_id), results, n, scoring)


def _chat_completion(envelope: dict, results: list[dict], tokenizer, logprobs: bool) -> dict:
    """A chat completion object of `collect`'s results, a choice each; with `logprobs`, each
    choice's tokens' log-probabilities (`tokenizer` names the tokens)."""
    return {**envelope,
            "choices": [{"index": i, "message": {"role": "assistant", "content": r["text"]},
                         "logprobs": chat_logprobs(tokenizer, r["logprobs"]) if logprobs else None,
                         "finish_reason": r["finish_reason"]} for i, r in enumerate(results)],
            # The choices share one prompt, counted once (as OpenAI and vLLM count it).
            "usage": _usage(results[0]["prompt_tokens"], sum(r["completion_tokens"] for r in results))}


def _completion(envelope: dict, results: list[dict], n: int, scoring: _CompletionScoring | None) -> dict:
    """A completion object of `collect`'s results, `n` consecutive choices per prompt; with
    `scoring`, each choice's echoed prompt and log-probabilities."""
    choices = []
    for i, r in enumerate(results):
        text, logprobs = r["text"], None
        if scoring is not None:  # the whole reply as one chunk
            text, logprobs = scoring.piece(i // n, i, Chunk(text, r["finish_reason"], r["prompt_tokens"],
                                                            r["completion_tokens"], r["logprobs"],
                                                            r["prompt_logprobs"]))
        choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": r["finish_reason"]})
    return {**envelope, "choices": choices,
            "usage": _usage(sum(r["prompt_tokens"] for r in results[::n]),  # each prompt once
                            sum(r["completion_tokens"] for r in results))}
