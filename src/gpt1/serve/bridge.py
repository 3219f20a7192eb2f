"""The bridge between the engine's worker thread and the event loop: `submit` queues a request's
prompts on the engine, whose chunks come back on an asyncio queue through the loop's one mailbox
(one wake-up of the loop for many tokens), and `chunk_batches` reads them off that queue in lists
of what is waiting, with keep-alive ticks for a stream."""

from __future__ import annotations

import asyncio
import math
import threading
import weakref
from typing import Any, AsyncIterator

from gpt1.core.errors import Gpt1Error
from gpt1.core.sampling_params import SamplingParams
from gpt1.inference.admission import QueueFull, TooLarge
from gpt1.inference.decoding import Chunk
from gpt1.inference.engine import Engine, EngineUnavailable
from gpt1.inference.engine import Request as EngineRequest
from gpt1.inference.engine_process import EngineProcess
from gpt1.serve.errors import ApiError, generation_error, resource_shortage


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
