"""The generation engine behind the server: one worker thread, a bounded queue, cancellation.

Generation is compute-bound PyTorch code, so it runs in a worker thread and never on the
event loop (which keeps answering /health, the page and new requests meanwhile). The worker
keeps up to `max_active` requests in flight and advances them round-robin, one token each per
turn: a request that arrives while others are generating gets its first token after its
prefill instead of after every earlier request has finished. Requests beyond that wait in a
FIFO of at most `max_queue`; when that is full too, `submit` raises `QueueFull` (the HTTP
layer answers 503) instead of letting latency grow without bound.

Each request is a `Job`; its chunks are handed to a callback (the server's bridge into the
event loop). `Job.cancel()` — called when the client disconnects — stops its generation at
the next token.
"""

from __future__ import annotations

import collections
import itertools
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from gpt1.core.errors import Gpt1Error
from gpt1.core.sampling_params import SamplingParams
from gpt1.inference.generate import Chunk, stream

Sink = Callable[["Chunk | BaseException"], None]


class QueueFull(Gpt1Error):
    """The engine holds `max_active + max_queue` requests already."""


@dataclass(eq=False)
class Job:
    """One generation request. `sink` receives each Chunk, or the exception that ended it."""

    prompt_ids: list[int]
    params: SamplingParams
    sink: Sink
    cancel_event: threading.Event = field(default_factory=threading.Event)
    completion_tokens: int = 0
    finish_reason: str | None = None
    _stream: Iterator[Chunk] | None = None

    def cancel(self) -> None:
        """Stop this job's generation (a no-op once it has finished)."""
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()


@dataclass
class EngineStats:
    submitted: int = 0
    completed: int = 0  # ended with a finish_reason
    cancelled: int = 0  # stopped early by Job.cancel (e.g. a client disconnect)
    failed: int = 0  # ended by an exception
    rejected: int = 0  # refused by a full queue
    tokens: int = 0  # completion tokens generated, cancelled jobs included


class Engine:
    """Runs generation jobs for one model in a background thread. Use as a context manager
    or call `start()` / `stop()`."""

    def __init__(self, model, tokenizer, *, max_active: int = 8, max_queue: int = 64):
        if max_active < 1 or max_queue < 0:
            raise Gpt1Error(f"engine: max_active must be >= 1 and max_queue >= 0, got {max_active} and {max_queue}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_active = max_active
        self.max_queue = max_queue
        self.stats = EngineStats()
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- state, for /health, tests and benchmarks -----------------------------------------
    @property
    def active(self) -> int:
        """Jobs generating right now."""
        with self._lock:
            return len(self._active)

    @property
    def queued(self) -> int:
        """Jobs waiting for a free slot."""
        with self._lock:
            return len(self._waiting)

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> "Engine":
        with self._lock:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="gpt1-engine", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Cancel every job and wait for the worker to exit."""
        with self._lock:
            self._stopping = True
            for job in itertools.chain(self._waiting, self._active):
                job.cancel()
            self._lock.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- submitting ----------------------------------------------------------------------
    def submit(self, prompts: list[list[int]], params: SamplingParams, sink_for: Callable[[int], Sink]) -> list[Job]:
        """Queue a job per prompt (`sink_for(i)` receives prompt i's chunks), all or none:
        QueueFull when they do not fit in `max_active + max_queue`."""
        jobs = [Job(list(ids), params, sink_for(i)) for i, ids in enumerate(prompts)]
        with self._lock:
            if self._stopping or self._thread is None:
                raise Gpt1Error("engine: not running")
            free = self.max_active + self.max_queue - len(self._active) - len(self._waiting)
            if len(jobs) > free:
                self.stats.rejected += len(jobs)
                raise QueueFull(f"the server is busy ({len(self._active)} requests generating, "
                                f"{len(self._waiting)} waiting); retry later")
            self._waiting.extend(jobs)
            self.stats.submitted += len(jobs)
            self._lock.notify_all()
        return jobs

    # ---- the worker ----------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not self._stopping and not self._active and not self._waiting:
                        self._lock.wait()
                    if self._stopping and not self._active and not self._waiting:
                        return
                    while self._waiting and len(self._active) < self.max_active:
                        self._active.append(self._waiting.popleft())
                    turn = list(self._active)
                for job in turn:
                    self._step(job)

    def _step(self, job: Job) -> None:
        """Advance `job` by one chunk (or end it)."""
        if job.cancelled:
            self._end(job, "cancelled")
            if self._stopping:
                job.sink(Gpt1Error("the server is shutting down"))
            return
        try:
            if job._stream is None:
                job._stream = stream(self.model, self.tokenizer, job.prompt_ids, job.params, cancel=job.cancel_event)
            chunk = next(job._stream)
        except StopIteration:  # stream() always ends with a finish_reason; this is a safety net
            self._end(job, "completed")
            return
        except Exception as e:  # noqa: BLE001 - a failing request must not kill the worker
            self._end(job, "failed")
            job.sink(e)
            return
        job.completion_tokens = chunk.completion_tokens
        job.finish_reason = chunk.finish_reason
        if chunk.finish_reason == "cancelled":  # the event was set while stream() was running
            self._end(job, "cancelled")
            if self._stopping:
                job.sink(Gpt1Error("the server is shutting down"))
            return
        job.sink(chunk)
        if chunk.finish_reason is not None:
            self._end(job, "completed")

    def _end(self, job: Job, outcome: str) -> None:
        if job._stream is not None:
            job._stream.close()  # frees its KV cache now rather than at garbage collection
            job._stream = None
        with self._lock:  # one step: whoever sees the outcome counted also sees the job gone
            self._active.remove(job)
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
            self.stats.tokens += job.completion_tokens
