"""The batching engine: every generation in gpt1 (the server, `gpt1 chat`, `generate`,
`generate_batch`, `stream` and the Python API) runs through it.

Continuous batching over a fixed pool of KV-cache slots (`max_batch` rows of `max_len`
positions, allocated once: the model's block_size, or fewer for a caller that knows what its
prompts need, as `generate` does). Each `step()`:

1. drops cancelled requests (their slot is free at once) and admits waiting ones into free slots;
2. prefills prompts in one forward, first come first served, at most `prefill_chunk` positions
   per step in all (rows x the longest chunk, padding included), so that a long prompt is cut
   into chunks and never stalls the other streams for its whole prefill; the n choices of one
   prompt (one `submit` with the same prompt n times) share one prefill, copied into their slots;
3. runs ONE batched forward for every row that has a token to feed, each at its own position,
   with a per-row causal mask over its slot (`SlotCache`);
4. chooses the next token of every row in one batched call (each row its own knobs and its
   own seeded generator, so a seeded request gives the same tokens whatever shares the
   batch, but for a draw within float rounding of a token boundary: docs/generation.md), brings the ids to the host once (the step's one sync), and turns them into text
   by the rules of `gpt1.inference.decoding` (stop tokens, stop strings, max tokens, UTF-8);
5. for the requests that ask (`SamplingParams.logprobs`, `prompt_logprobs`), scores their sampled
   tokens, and their prompt's as it is prefilled, on the raw logits: only their rows pay for a
   log-softmax, and a prefill computes every position's logits only when one of its rows asks.

A finished, cancelled or failed row frees its slot at once; live rows are kept contiguous
(the last row moves into a freed slot) so that the batched forward reads a slice of the pool.
A request is validated in `submit`, before it can enter the batch; an exception while
handling one row (admitting it, its text, its final flush when cancelled) ends that request with
the error and the others go on (each sampled row draws its step's random number first, from its
own generator, and a batched sampling call that fails is retried row by row with the same numbers,
so that only the rows that fail alone end, and the others draw what they would have). A fault
that is no Exception but no exit either (a Rust panic in the tokenizer: pyo3's PanicException
derives from BaseException) is handled as one, and a row whose logits are not finite ends with
`GenerationFault` (the model's fault). `step()` never raises an
error: one outside any row fails the rows in the batch, and the engine goes on. Only an exit
(KeyboardInterrupt, SystemExit, GeneratorExit) goes on to the caller; should one end the worker
thread, the engine ends every request it holds with `EngineUnavailable`, takes no more (`alive`
is false, `died` says why) and logs one line, as a dead `EngineProcess` does.

On CUDA the decode step runs in batch-size buckets (powers of two) over the whole pool, shapes
that never change, and with `cuda_graphs=True` each bucket's step is captured once as a CUDA
graph and replayed. `compile=True` compiles each bucket's step with `torch.compile` first (on
any device; off by default: it gained 5% at batch 1 on an H200, before a fix to its cache writes
that is measured on a CPU only, where it is no faster than eager). Each request's output goes to its `sink`: a
`Chunk` per piece of text (the last one carries the finish reason), or the exception that
ended it. The engine can be driven by the caller (`step()` until `busy` is false: what
`generate` does) or by its own worker thread (`start()`: what the server does). On a CPU whose
PyTorch uses MKL the engine stores the model's weights column-major (`store_weights_column_major`),
which makes its few-row matmuls faster. On a CPU it also keeps its decode step on the fastest
thread count as the machine's load changes (`gpt1.core.threads`; one busy process beside it on
2 cores made decoding 20-30x slower on 2 threads than on 1), unless OMP_NUM_THREADS fixes the count
or `tune_threads=False`. The engines of a process share what they learn (`gpt1 chat` makes
one per reply); the count is set on the stepping thread, and `restore_threads()` gives the
caller back its own.

Its parts, each a module of its own in `gpt1.inference`: `admission` (what a submission passes,
shared with `EngineProcess`), `memory_room` (the KV cache's size and the room for it), `seeding`
(each request's generator), `bucketed_decode` (the decode step's buckets, graphs and compilation)
and `weight_layout` (the CPU's column-major weights).
"""

from __future__ import annotations

import atexit
import collections
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from gpt1.core.errors import Gpt1Error, first_line, memory_shortage
from gpt1.core.model import GPT, SlotCache
from gpt1.core.progress import logger, warn
from gpt1.core.sampling_params import SamplingParams
from gpt1.core.threads import cpu_thread_tuner, own_threads
from gpt1.core.tokenizer import Tokenizer
from gpt1.inference.admission import QueueFull, TooLarge, check_room, check_sizes, fit_prompts, usable_vocab  # noqa: F401 - re-exported (see below)
from gpt1.inference.bucketed_decode import BucketedDecode, no_autocast
from gpt1.inference.decoding import Chunk, TextState, TokenLogprob, new_token_limit
from gpt1.inference.memory_room import CHECKED_KV_BYTES, free_memory, gib, kv_cache_bytes
from gpt1.inference.sampling import PerRow, log_probs, process_logits, sample
from gpt1.inference.seeding import request_generator
from gpt1.inference.weight_layout import store_weights_column_major

# QueueFull and TooLarge (admission's) are still imported from here by the engine's clients and
# tests. The engine draws its requests' generators through `_generator`: the name tests patch
# (tests/test_engine_chaos.py); `_BucketedDecode` is the step's name in the tests.
_generator = request_generator
_BucketedDecode = BucketedDecode

Sink = Callable[["Chunk | BaseException"], None]
RATE_WINDOW_S = 10.0  # tokens/s in /health is measured over this many seconds
# The BaseExceptions that end what they interrupt, the engine's worker thread included. Any other
# that is no Exception (pyo3's PanicException: a Rust panic in the tokenizer) is a fault of the row
# being handled, which fails it as an Exception would.
_EXITS = (KeyboardInterrupt, SystemExit, GeneratorExit)
# A prefill forward's rows x the keys they read (the longest context among them) stays under this
# many prefill chunks, unless one row alone reads more (see Engine._prefill).
PREFILL_KEYS = 8
TUNER_CONTEXT_BUCKET = 64  # positions: decode steps whose longest context is in one bucket are timed together
EXIT_STOP_S = 5.0  # at interpreter exit, the started engines' workers are given this long in all to end their steps (`_stop_at_exit`)


class EngineUnavailable(Gpt1Error):
    """The engine is shutting down or has stopped (the server answers 503)."""


class GenerationFault(Gpt1Error):
    """A request accepted by `submit` that generation itself failed, whatever its input: the
    model's next-token logits are NaN or infinite. The model's fault, not the client's: the server
    answers 500 server_error (a plain Gpt1Error is a 400). A Gpt1Error still, so that the CLI and
    the Python API show its message as one line."""


@dataclass(eq=False)
class Request:
    """One sequence to generate. `sink` receives its Chunks, or the exception that ended it."""

    prompt_ids: list[int]  # as the model sees it (fitted to the context)
    params: SamplingParams
    sink: Sink
    state: TextState
    generator: torch.Generator | None  # None: greedy
    cancel_event: threading.Event = field(default_factory=threading.Event)
    row: int = -1  # its slot while in the batch
    arrival: int = 0  # its place in the order of submission: prompts are prefilled first come, first served
    # The request of the same submit with the same prompt (n choices of one prompt) whose prefill this
    # one copies instead of computing its own; None: it prefills itself.
    twin_of: Request | None = field(default=None, repr=False)
    twins: list[Request] = field(default_factory=list, repr=False)  # the requests whose twin_of this one is
    length: int = 0  # positions of its slot that hold its keys and values
    next_token: int | None = None  # sampled, to be fed at the next decode step
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of tokens not yet sent in a Chunk
    # Of the prompt's tokens so far (params.prompt_logprobs), until its first Chunk takes them.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    ended: bool = False  # its sink has had its last item (`Engine._end`)

    def cancel(self) -> None:
        """Stop this request at the next step (a no-op once it has finished)."""
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    @property
    def prefilling(self) -> bool:
        return self.length < len(self.prompt_ids)


@dataclass
class EngineStats:
    submitted: int = 0
    completed: int = 0  # ended with a finish reason "stop" or "length"
    cancelled: int = 0  # stopped early by Request.cancel (e.g. a client disconnect)
    failed: int = 0  # ended by an exception
    rejected: int = 0  # refused: queue full or larger than the engine
    tokens: int = 0  # completion tokens given to requests, cancelled ones included (a row that failed made none)
    steps: int = 0
    threads: int = 0  # the CPU threads of the latest step (see gpt1.core.threads)


class Engine:
    """Generates for many requests at once on one model. See the module docstring."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, max_batch: int = 8, max_queue: int = 64,
                 prefill_chunk: int = 256, cuda_graphs: bool = True, compile: bool = False,
                 tune_threads: bool = True, max_len: int | None = None):
        check_sizes(max_batch, max_queue, prefill_chunk)
        self.model, self.tokenizer = model, tokenizer
        self.config = model.config
        # Positions per slot: a server's requests may use the whole context; a caller that knows
        # its prompts (`generate`) asks for what they need. A config.json's block_size of 16M made
        # a 1-token `generate` of a 33 MB model zero an 8 GiB cache.
        if max_len is not None and not (isinstance(max_len, int) and 1 <= max_len <= self.config.block_size):
            raise Gpt1Error(f"engine: max_len must be an int from 1 to the block_size "
                            f"({self.config.block_size:,}), got {max_len!r}")
        self.max_len = max_len or self.config.block_size
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        first = next(model.parameters())
        if first.device.type == "meta":  # every forward would fail, each request with a 500 in a server
            raise Gpt1Error("this model has no weights (LLM.without_weights): serve it with engine='process', "
                            "or load it with gpt1.load")
        self.device = first.device
        self.dtype_name = str(first.dtype).removeprefix("torch.")  # of the weights and the KV cache
        self._allocate_slots(first.dtype)
        if self.device.type == "cpu" and torch.backends.mkl.is_available():  # measured with MKL (x86) only
            store_weights_column_major(model)
        self.stop_ids = frozenset(tokenizer.special_ids)
        self.vocab = usable_vocab(self.config, tokenizer)
        self.stats = EngineStats(threads=torch.get_num_threads())
        self._threads = cpu_thread_tuner(self.device, shared=True) if tune_threads else None
        self._rows: list[Request] = []  # _rows[i] is the request in slot i
        self._waiting: collections.deque[Request] = collections.deque()
        self._unswept = 0  # steps since `_admit` last looked for cancelled requests in the whole queue
        self._lock = threading.Condition()
        self._step_lock = threading.Lock()  # one step at a time, whoever calls step()
        self._step_holder: int | None = None  # the thread in a step (or in stop()'s ending of the requests)
        self._end_after_step = False  # stop() asked the step under way to end the requests when it is done
        self._stops = 0  # stop() calls: a start() whose warm-up one came during does not start
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.died = ""  # why the worker thread ended unasked (see `_run`), once it has
        self._rate: collections.deque[tuple[float, int]] = collections.deque()
        self._no_draw = torch.zeros((), dtype=torch.float32)  # a greedy row's random number, unused (`sample` takes its argmax)
        capture = cuda_graphs and self.device.type == "cuda"
        self._graphs = BucketedDecode(self, capture, compile) if capture or compile else None

    def _allocate_slots(self, dtype: torch.dtype) -> None:
        """Allocate the slot pool (`cache`) and each row's context (`tokens`), or say in one
        Gpt1Error that they do not fit: before, where the device's room is known, else when the
        allocation fails."""
        self.kv_bytes = kv_cache_bytes(self.model, self.max_batch, self.max_len)
        what = (f"{self.max_batch} x {self.max_len:,} positions"
                + (", the model's block_size" if self.max_len == self.config.block_size else ""))
        # A small cache is not checked: reading the cgroup's files at each level took 0.2 ms, paid by
        # every `generate` call (each builds an engine); one that fails anyway is the error below.
        available = free_memory(self.device) if self.kv_bytes >= CHECKED_KV_BYTES else None
        if available is not None and self.kv_bytes > available:
            raise Gpt1Error(f"max_batch {self.max_batch}: the KV cache needs {gib(self.kv_bytes)} ({what}) but only "
                            f"{gib(available)} is free on {self.device}; lower max_batch")
        try:
            self.cache = SlotCache(self.config, self.max_batch, self.max_len, device=self.device, dtype=dtype)
            # Each row's context (prompt + generated), kept for requests with a repeat penalty;
            # vocab_size = "no token".
            self.tokens = torch.full((self.max_batch, self.max_len), self.config.vocab_size,
                                     dtype=torch.long, device=self.device)
        except RuntimeError as e:  # CUDA's OutOfMemoryError; the CPU allocator's is a plain RuntimeError
            if memory_shortage(e) is None:
                raise
            raise Gpt1Error(f"max_batch {self.max_batch}: out of memory allocating the KV cache ({gib(self.kv_bytes)}, "
                            f"{what}) on {self.device}; lower max_batch") from None

    # ---- state, for /health, tests and benchmarks ----------------------------------------
    @property
    def active(self) -> int:
        """Requests in the batch (prefilling or decoding)."""
        return len(self._rows)

    @property
    def queued(self) -> int:
        """Requests waiting for a free slot."""
        return len(self._waiting)

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self._rows)

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs: False before `start()`, once `stop()` is called and once
        the worker died (`died`). A server reports it (`/health`, `gpt1_engine_up`). An engine
        stepped by its caller (`while engine.busy: engine.step()`, as `generate` does) has no
        worker and is not alive, yet takes submissions until `stop()`."""
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stopping

    @property
    def busy(self) -> bool:
        return bool(self._rows or self._waiting)

    @property
    def tokens_per_s(self) -> float:
        """Tokens given to requests per second over the last RATE_WINDOW_S seconds."""
        with self._lock:
            self._forget_old_rate(time.monotonic())
            return sum(n for _, n in self._rate) / RATE_WINDOW_S

    # ---- submitting ---------------------------------------------------------------------------
    def submit(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
               sink_for: Callable[[int], Sink], cancel: threading.Event | None = None) -> list[Request]:
        """Queue a request per prompt (`sink_for(i)` receives prompt i's output), all or none;
        `params`: one for all prompts, or one per prompt.
        Gpt1Error for an invalid prompt or knob (before anything is queued), TooLarge when
        there are more prompts than `max_batch + max_queue`, QueueFull when they do not fit now.
        `cancel`, when given, is the requests' cancel event (set it to stop them)."""
        params, fitted = fit_prompts(prompts, params, self.config, self.tokenizer)
        limits = [new_token_limit(len(ids), self.config.block_size, knobs) for ids, knobs in zip(fitted, params)]
        for i, (ids, limit) in enumerate(zip(fitted, limits)):
            if len(ids) + limit > self.max_len:
                name = f"prompt {i}" if len(fitted) > 1 else "prompt"
                raise Gpt1Error(f"{name}: {len(ids)} tokens plus max_new_tokens ({limit}) need {len(ids) + limit} "
                                f"positions, but this engine's slots hold {self.max_len} (its max_len)")
        with self._lock:
            if self._stopping:
                raise EngineUnavailable(self.died or "the engine is shutting down")
            try:  # check_room before anything is built for the requests
                check_room(len(fitted), self.max_batch, self.max_queue, len(self._rows), len(self._waiting))
                requests = [Request(ids, knobs, sink_for(i), TextState(self.tokenizer, knobs.stop, ids, limit),
                                    _generator(knobs.seed) if knobs.temperature > 0 else None)
                            for i, (ids, knobs, limit) in enumerate(zip(fitted, params, limits))]
            except Exception:  # a full queue, or building them failed (a MemoryError): refused, and counted so
                self.stats.rejected += len(fitted)
                raise
            firsts: dict[tuple[int, ...], Request] = {}
            for i, r in enumerate(requests):
                r.arrival = self.stats.submitted + i
                if cancel is not None:
                    r.cancel_event = cancel
                if r.params.prompt_logprobs is None:  # a scored prompt keeps its own prefill (its scores)
                    first = firsts.setdefault(tuple(r.prompt_ids), r)
                    if first is not r:
                        r.twin_of = first
                        first.twins.append(r)
            self._waiting.extend(requests)
            self.stats.submitted += len(requests)
            self._lock.notify_all()
        return requests

    # ---- one step -----------------------------------------------------------------------------
    def step(self) -> None:
        """Admit, prefill, decode and sample once (see the module docstring). Threads that step
        the engine at once (a caller beside `start()`'s worker, or several callers each running
        `while engine.busy: engine.step()`) take turns: each call is one whole step. A step raises
        only an exit (KeyboardInterrupt, SystemExit, GeneratorExit): an error, or a panic, ends the
        requests it concerns, through their sinks. Once `stop()` is called a step does nothing."""
        if self._stopping:  # stop() ends what is held; a caller's `while engine.busy` loop must not race it for the lock
            return
        with self._step_lock:
            self._step_holder = threading.get_ident()
            try:
                self._step()
            except _EXITS:
                raise  # the caller's to handle (the worker thread's: see _run)
            except BaseException as e:  # noqa: BLE001 - never let a step end the caller's loop (or the
                # engine process): an error no row's own handling caught fails the requests in the batch.
                for request in list(self._rows):
                    self._fail(request, e)
            finally:
                if self._end_after_step:  # stop() from one of this step's sinks, or one that did not wait for it
                    self._end_stopped()
                self._step_holder = None

    def _step(self) -> None:
        for request in [r for r in self._rows if r.cancelled]:
            self._finish(request, "cancelled")
        self._admit()
        if not self._rows:
            return
        threads = self._threads.apply() if self._threads is not None else torch.get_num_threads()
        started = time.perf_counter()
        with torch.inference_mode(), no_autocast(self.device):
            prefilled, prefill_logits, prefilling = self._prefill()
            decoded, decode_logits, longest = self._decode()
            requests = prefilled + decoded
            if not requests:  # a step of prefill chunks alone (or of prompts scored alone) is a forward too
                if prefilling:
                    with self._lock:
                        self.stats.steps += 1
                return
            logits = (torch.cat([prefill_logits, decode_logits]) if prefilled and decoded
                      else prefill_logits if prefilled else decode_logits)
            if logits.size(-1) > self.vocab:
                logits = logits[:, :self.vocab]
            sampled, errors = self._sample_rows(requests, logits)
            next_ids = _unless_not_finite(sampled, logits).tolist()
            entries = self._token_logprobs(requests, logits, next_ids, errors)
        # The thread tuner compares decode steps of one width over contexts of about one length
        # (a step over 500 positions takes longer than over 5); a step that prefills is not timed,
        # nor any step where there is no tuner (GPUs, or OMP_NUM_THREADS set). Without a prefill,
        # every row decoded (each had its next token): the step's width and longest context.
        if self._threads is not None and not prefilling:
            kind = (len(decoded), longest // TUNER_CONTEXT_BUCKET)
            if message := self._threads.step_done(time.perf_counter() - started, kind):
                logger.debug(message)
        given = self._hand_out(requests, next_ids, entries, errors)
        with self._lock:
            self.stats.threads = threads
            self.stats.steps += 1
            self.stats.tokens += given
            now = time.monotonic()
            self._rate.append((now, given))
            self._forget_old_rate(now)  # here, not only when /health asks: unpolled, it grew forever

    def _hand_out(self, requests: list[Request], next_ids: list[int], entries: dict[int, TokenLogprob],
                  errors: dict[int, Exception]) -> int:
        """Give each request its sampled token (with its log-probability, where it asked), or end it
        with its row's error (-1: logits that were not finite); the tokens given (a row that failed
        here made none)."""
        given = 0
        for i, (request, token) in enumerate(zip(requests, next_ids)):
            if i in errors:
                self._fail(request, errors[i])
            elif token < 0:
                self._fail(request, self._not_finite())
            else:
                self._emit(request, token, entries.get(i))
                given += 1
        return given

    def _admit(self) -> None:
        with self._lock:
            # A request cancelled while it waits leaves the queue before a slot frees for it: looked
            # for in one pass over the queue every len(queue) / (4 x max_batch) steps (every step for
            # a short queue), so that a step's bookkeeping stays in proportion to the batch: a pass
            # at every step made generate_batch quadratic in its prompts (8,000: a third of the run).
            self._unswept += 1
            if self._unswept * 4 * self.max_batch >= len(self._waiting):
                self._unswept = 0
                if any(r.cancelled for r in self._waiting):
                    waiting, self._waiting = self._waiting, collections.deque()
                    for request in waiting:
                        if request.cancelled:
                            self._finish(request, "cancelled")
                        else:
                            self._waiting.append(request)
            while self._waiting and len(self._rows) < self.max_batch:
                request = self._waiting.popleft()
                if request.cancelled:  # since the last sweep
                    self._finish(request, "cancelled")
                    continue
                request.row, request.length = len(self._rows), 0
                self._rows.append(request)
                try:
                    if not request.prompt_ids:  # neither prefilling nor decoding: it would hold its slot forever
                        raise Gpt1Error("an empty prompt reached the engine (a prompt starts from [EOS] at least)")
                    row = self.tokens[request.row]
                    row.fill_(self.config.vocab_size)
                    row[:len(request.prompt_ids)] = torch.tensor(request.prompt_ids)
                except Exception as e:  # noqa: BLE001 - e.g. a MemoryError: this request fails, the others go on
                    self._fail(request, e)

    def _prefill(self) -> tuple[list[Request], torch.Tensor | None, bool]:
        """Feed the next prompt chunks, within the step's budget, in one forward; the requests
        whose prompt is now complete, their logits (one row each), and whether any row was
        prefilling. Shorter chunks are padded at the front
        with tokens at the last position (which no prefilling row holds), so that every row's
        last token is the forward's last column.

        The budget bounds what the forward costs, rows x its longest chunk (the padding is
        computed too): seven 8-token prompts beside a long one's 256-token chunk made a 8 x 256
        forward, a stall of the running streams longer than no chunking at all. Every row reads
        the keys up to the longest context among them (gathered, copied), so rows x that length
        stays under PREFILL_KEYS chunks too, unless one row alone reaches further: fifteen new
        8-token prompts beside a 1,800-token prompt's last chunk took 3.5x a full chunk's time,
        together. The rows go in
        the order their requests came (a freed slot takes the newest row, so slot order let a
        later long prompt take every step's budget while an earlier one waited)."""
        chosen = self._prefill_chunks()
        if not chosen:  # the first prefilling row is always chosen: none was prefilling
            return [], None, False
        T = max(len(chunk) for _, chunk in chosen)
        pad = self.cache.max_len - 1
        ids = [[0] * (T - len(chunk)) + chunk for _, chunk in chosen]
        positions = [[pad] * (T - len(chunk)) + list(range(r.length, r.length + len(chunk))) for r, chunk in chosen]
        try:
            rows = torch.tensor([r.row for r, _ in chosen], device=self.device)
            self.cache.prepare(rows, torch.tensor(positions, device=self.device),
                               max(r.length + len(chunk) for r, chunk in chosen))
            # Every position's logits only when a row asks for its prompt's log-probabilities.
            scored = any(r.params.prompt_logprobs is not None for r, _ in chosen)
            every = self.model(torch.tensor(ids, device=self.device), cache=self.cache, last_only=not scored)
            logits = every[:, -1]
        except Exception as e:  # noqa: BLE001 - a failed prefill fails its rows, not the engine
            for request, _ in chosen:
                self._fail(request, e)
            return [], None, True
        done, scored_only = [], []
        for i, (request, chunk) in enumerate(chosen):
            if request.params.prompt_logprobs is not None:
                try:
                    self._score_prompt(request, every[i, T - len(chunk):])
                except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                    self._fail(request, e)
                    continue
            request.length += len(chunk)
            if not request.prefilling:
                (scored_only if request.state.limit == 0 else done).append((request, i))
                for twin in [t for t in request.twins if t.row >= 0 and t.length == 0]:
                    # n choices of one prompt: its keys and values are copied, and its first token
                    # is sampled from the same logits, each row with its own generator.
                    self.cache.copy_prefix(request.row, twin.row, request.length)
                    twin.length = request.length
                    (scored_only if twin.state.limit == 0 else done).append((twin, i))
        for request, _ in scored_only:  # max_new_tokens 0 (a prompt to score): nothing to sample, ended here
            self._end_unsampled(request)
        return [r for r, _ in done], _rows_of(logits, [i for _, i in done]), True

    def _prefill_chunks(self) -> list[tuple[Request, list[int]]]:
        """The prompt chunks this step prefills, within its budget (see `_prefill`): each prefilling
        request's next chunk, in the order the requests came."""
        chosen, T, keys = [], 0, 0
        for request in sorted((r for r in self._rows if r.prefilling and not _waits_for_twin(r)), key=lambda r: r.arrival):
            width = self.prefill_chunk // (len(chosen) + 1)  # the widest chunk that keeps rows x width in budget
            if width < max(T, 1):
                break
            chunk = request.prompt_ids[request.length:request.length + width]
            reach = max(keys, request.length + len(chunk))  # the keys every row of the forward reads
            if chosen and (len(chosen) + 1) * reach > max(PREFILL_KEYS * self.prefill_chunk, keys):
                break
            chosen.append((request, chunk))
            T, keys = max(T, len(chunk)), reach
        return chosen

    def _score_prompt(self, request: Request, logits: torch.Tensor) -> None:
        """Add the log-probabilities of the prompt tokens that the chunk just fed predicts (its
        logits, one row per token fed): the chunk's 2nd token to the next chunk's 1st."""
        if request.length == 0:
            request.prompt_logprobs = [None]  # the first token: nothing precedes it
        targets = request.prompt_ids[request.length + 1:request.length + 1 + len(logits)]
        if targets:
            rows = logits[:len(targets), :self.vocab]
            # As a sampled row's: NaN scores fail the request (a row that samples nothing, max_new_tokens
            # 0, meets no other check), never reach a caller as numbers, nor a stream as invalid JSON.
            if not torch.isfinite(rows).all():
                raise self._not_finite()
            request.prompt_logprobs += _logprob_entries(rows, targets, [request.params.prompt_logprobs] * len(targets))

    def _decode(self) -> tuple[list[Request], torch.Tensor | None, int]:
        """One forward for the rows up to the last one with a token to feed: those requests, their
        logits, and the longest context fed before (positions). Rows still
        prefilling among them ride along (what they write lies beyond their length, masked, and
        is overwritten by their prompt); those after it -- newly admitted rows sit at the end --
        are left out, so a burst of arrivals does not widen every decode step while it prefills."""
        feeding = [r for r in self._rows if r.next_token is not None]
        if not feeding:
            return [], None, 0
        rows = self._rows[:feeding[-1].row + 1]  # feeding is in slot order
        ids = [r.next_token if r.next_token is not None else 0 for r in rows]
        starts = [r.length for r in rows]
        try:
            logits = self.decode_forward(ids, starts)
        except Exception as e:  # noqa: BLE001 - a failed batch fails its rows, not the engine
            for request in feeding:
                self._fail(request, e)
            return [], None, 0
        for request in feeding:
            request.length += 1
            request.next_token = None
        return feeding, _rows_of(logits, [r.row for r in feeding]), max(starts)

    def decode_forward(self, ids: list[int], starts: list[int]) -> torch.Tensor:
        """Logits (len(ids), vocab) of one decode forward over slots 0..len(ids)-1, slot i
        feeding token ids[i] at position starts[i]: a captured CUDA graph when the engine has
        them, else eager. The decode step's model time (`gpt1 bench generate` times it alone)."""
        if self._graphs is not None:
            return self._graphs.decode(ids, starts)
        inputs = torch.tensor([ids, starts], device=self.device)  # one copy to the device
        self.cache.prepare(slice(0, len(ids)), inputs[1, :, None], max(starts) + 1)
        return self.model(inputs[0, :, None], cache=self.cache, last_only=True)[:, -1]

    def _sample_rows(self, requests: list[Request], logits: torch.Tensor) -> tuple[torch.Tensor, dict[int, Exception]]:
        """`_sample` in one batched call; should that fail, row by row, so that the error ends only
        the requests whose own knobs cause it: the next ids (-1 where a row failed) and each
        failed row's error, by index. Each sampled row's uniform number is drawn first, from its
        own generator, and a row sampled again alone takes the same number: it draws what it would
        have, and a row whose draw fails ends alone."""
        draws, errors = [self._no_draw] * len(requests), {}
        for i, request in enumerate(requests):
            if request.generator is not None:
                try:
                    # float32 whatever torch's default dtype: a caller's float64 drew other numbers (other text).
                    draws[i] = torch.rand((), generator=request.generator, dtype=torch.float32)
                except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                    errors[i] = e
        try:
            return self._sample(requests, logits, draws), errors
        except Exception:  # noqa: BLE001 - retried row by row below
            pass
        ids = torch.full((len(requests),), -1, dtype=torch.long, device=logits.device)
        for i, request in enumerate(requests):
            if i not in errors:
                try:
                    ids[i] = self._sample([request], logits[i:i + 1], draws[i:i + 1])[0]
                except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                    errors[i] = e
        return ids, errors

    def _sample(self, requests: list[Request], logits: torch.Tensor, draws: list[torch.Tensor]) -> torch.Tensor:
        """The next token of each request, one batched call: its own knobs and its uniform number
        (`draws`, CPU scalars: each drawn from its row's generator, 0 for a greedy row)."""
        params = [r.params for r in requests]
        # Only a request with a repeat penalty reads its context, so only then is it kept (in
        # `tokens`): a step without one does no bookkeeping on the device.
        penalised = any(p.repeat_penalty != 1.0 and p.repeat_last_n != 0 for p in params)
        temperature = [p.temperature for p in params]
        if not penalised and not any(temperature):  # greedy: the argmax, no knob on the device
            return sample(process_logits(logits, None, temperature=0.0), 0.0)
        # Every knob of every row and the rows' numbers go to the device in one copy; the
        # processors decide what to skip (a knob no row uses, the greedy rows) from the same values
        # here, so that no step waits for the device before its ids. A top_k past the vocabulary
        # keeps every token, as the vocabulary's size does (which float32 holds exactly).
        values = [temperature, [min(p.top_k, self.vocab) for p in params], [p.top_p for p in params],
                  [p.min_p for p in params], [p.repeat_penalty for p in params]]
        columns = torch.cat([torch.tensor(values, dtype=torch.float32), torch.stack(draws)[None]])
        columns = columns.to(logits.device, non_blocking=True)
        knobs = [PerRow(v, column) for v, column in zip(values, columns.unbind())]
        window = rows = context = None
        if penalised:
            window, rows, context = self._window(requests, params)
        processed = process_logits(logits, window, temperature=knobs[0], top_k=knobs[1], top_p=knobs[2],
                                   min_p=knobs[3], repeat_penalty=knobs[4])
        next_ids = sample(processed, knobs[0], uniform=columns[-1])
        if penalised:
            self.tokens[rows, context.clamp(max=self.max_len - 1)] = next_ids
        return next_ids

    def _token_logprobs(self, requests: list[Request], logits: torch.Tensor, next_ids: list[int],
                        errors: dict[int, Exception]) -> dict[int, TokenLogprob]:
        """The sampled tokens' log-probabilities, by index, for the requests that ask for them (the
        only ones that pay for a log-softmax); a row whose scoring fails joins `errors`."""
        wanted = [i for i, r in enumerate(requests)
                  if r.params.logprobs is not None and i not in errors and next_ids[i] >= 0]
        if not wanted:
            return {}
        try:
            rows = logits[torch.tensor(wanted, device=logits.device)]
            scored = _logprob_entries(rows, [next_ids[i] for i in wanted], [requests[i].params.logprobs for i in wanted])
        except Exception as e:  # noqa: BLE001 - these requests fail, the others go on
            errors.update(dict.fromkeys(wanted, e))
            return {}
        return dict(zip(wanted, scored))

    def _window(self, requests: list[Request],
                params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows' repeat-penalty windows (batch, n): the last repeat_last_n tokens of each
        row's context (-1: all), "no token" (vocab_size) elsewhere; n spans the positions that
        some row's window holds, not the whole slot. With each row's slot and context length."""
        context = [len(r.prompt_ids) + r.state.completion_tokens for r in requests]
        last_n = [p.repeat_last_n if p.repeat_last_n >= 0 else self.max_len for p in params]
        first, end = max(min([c - n for c, n in zip(context, last_n)]), 0), max(context)
        rows, context, last_n = torch.tensor([[r.row for r in requests], context, last_n], device=self.device).unbind()
        position = torch.arange(first, end, device=self.device)
        inside = (position < context[:, None]) & (position >= (context - last_n)[:, None])
        return self.tokens[rows, first:end].masked_fill(~inside, self.config.vocab_size), rows, context

    def _not_finite(self) -> GenerationFault:
        hint = ("; float16 overflows where bfloat16 and float32 do not: try --dtype bfloat16"
                if self.dtype_name == "float16" else "; its weights or adapter make the forward pass overflow")
        return GenerationFault(f"the model's next-token logits are NaN or infinite (running in {self.dtype_name}){hint}")

    def _emit(self, request: Request, token: int, logprob: TokenLogprob | None = None) -> None:
        """Turn a sampled token into text for the request's sink; end it when it is done."""
        state = request.state
        try:
            if logprob is not None:  # the stop token's too, as it is counted (and as vLLM and OpenAI give it)
                request.logprobs.append(logprob)
            if token in self.stop_ids:
                state.completion_tokens += 1
                text = state.finish("stop")
            else:
                text = state.add(token)
            if state.finish_reason is not None:
                self._end(request, "completed", self._chunk(request, text))
                return
            if text:
                request.sink(self._chunk(request, text))
            request.next_token = token
        except _EXITS:
            raise
        except BaseException as e:  # noqa: BLE001 - an error or a tokenizer's panic: this request fails, the others go on
            self._fail(request, e)

    # ---- ending a request ---------------------------------------------------------------------
    def _finish(self, request: Request, reason: str) -> None:
        """End a cancelled request with the text it held back; should that flush fail, with the error."""
        state = request.state
        try:
            text = state.finish(reason)
        except _EXITS:
            raise
        except BaseException as e:  # noqa: BLE001 - an error or a tokenizer's panic: this request fails, the others go on
            self._fail(request, e)
            return
        self._end(request, "cancelled", self._chunk(request, text, reason))

    def _chunk(self, request: Request, text: str, reason: str | None = None) -> Chunk:
        """The request's next Chunk: `text`, the finish reason (`reason`, else the text's own once
        it has ended), its counts, and the log-probabilities not yet sent (the prompt's with its
        first chunk)."""
        state = request.state
        chunk = Chunk(text, reason or state.finish_reason, len(request.prompt_ids), state.completion_tokens)
        if request.params.logprobs is not None:
            chunk.logprobs, request.logprobs = request.logprobs, []
        if request.prompt_logprobs is not None:
            # One per prompt token: a request cancelled in its prefill has None for those not scored.
            scored = request.prompt_logprobs
            chunk.prompt_logprobs = scored + [None] * (len(request.prompt_ids) - len(scored))
            request.prompt_logprobs = None
        return chunk

    def _end_unsampled(self, request: Request) -> None:
        """End a request that asked for no new tokens once its prompt is in (finish reason "length",
        as OpenAI's legacy completions give `max_tokens: 0`), with its prompt's log-probabilities."""
        try:
            text = request.state.finish("length")
        except _EXITS:
            raise
        except BaseException as e:  # noqa: BLE001 - as in _emit: this request fails, the others go on
            self._fail(request, e)
            return
        self._end(request, "completed", self._chunk(request, text))

    def _fail(self, request: Request, error: BaseException) -> None:
        self._end(request, "failed", error)

    def _end(self, request: Request, outcome: str, last: Chunk | BaseException) -> None:
        """Free the request's slot now (the last row moves into it), count it, tell its sink; once
        (stop() called from a sink of `_die`'s ending finds the requests it has not reached yet)."""
        with self._lock:
            if request.ended:
                return
            request.ended = True
            if request.row >= 0:
                last_row = len(self._rows) - 1
                moved = self._rows[last_row]
                if moved is not request:
                    self.cache.move(last_row, request.row)
                    self.tokens[request.row] = self.tokens[last_row]
                    self._rows[request.row], moved.row = moved, request.row
                self._rows.pop()
                request.row = -1
            _leave_twins(request)
            setattr(self.stats, outcome, getattr(self.stats, outcome) + 1)
        try:
            request.sink(last)
        except Exception:  # noqa: BLE001, S110 - a sink that fails at the end has nothing left to tell
            pass

    def _forget_old_rate(self, now: float) -> None:
        while self._rate and self._rate[0][0] < now - RATE_WINDOW_S:
            self._rate.popleft()

    def warm_up(self) -> None:
        """Build every decode bucket now (on CUDA: capture its graph), so that no request waits
        for a capture (hundreds of milliseconds) the first time the batch reaches a new size.
        Only while no request is in the batch: it writes at every slot's last position."""
        if self._graphs is None:
            return
        with self._step_lock, torch.inference_mode():
            try:
                if self._rows:
                    return
                size = 1
                while True:
                    self._graphs.bucket_for(size)
                    if size >= self.max_batch:
                        break
                    size = min(2 * size, self.max_batch)
            finally:
                if self._end_after_step:  # a stop() that could not wait for the builds (a compile) left them to us
                    self._end_stopped()

    def restore_threads(self) -> None:
        """Give the stepping thread back the CPU thread count it had (the tuner may have lowered it)."""
        if self._threads is not None and torch.get_num_threads() != self._threads.max_threads:
            torch.set_num_threads(self._threads.max_threads)

    # ---- the worker thread (the server) -------------------------------------------------------
    def start(self) -> "Engine":
        """Run the engine in its own thread (what the server does), its decode buckets built first;
        returns once that thread's CPU threads are started (see `_start_cpu_threads`)."""
        if self.died:
            raise EngineUnavailable(self.died)
        stops = self._stops
        self.warm_up()
        ready = threading.Event()
        with self._lock:
            if self._stops != stops:  # stop() came during the warm-up (a compile): it was not undone by starting
                raise EngineUnavailable("the server is shutting down")
            if self._thread is None:
                self._stopping = self._end_after_step = False
                worker = threading.Thread(target=self._run, args=(ready,), name="gpt1-engine", daemon=True)
                worker.start()  # kept only once started: one that could not start (a pids limit) is no worker
                self._thread = worker
                _STARTED.add(self)
            else:
                ready.set()
        ready.wait()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the worker; every unfinished request's sink gets a 'shutting down' error, its last
        item: a step under way (the worker's, or a caller's) ends first, for up to `timeout`
        seconds in all, and one that takes longer ends them when it is done, as does the step
        whose sink calls stop(). Threads started afterwards get the CPU thread count the worker
        found, whatever its tuner chose."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            self._stopping = True
            self._stops += 1
            # Set before the wait for the step lock: a step that ends meanwhile ends the requests itself.
            self._end_after_step = True
            self._lock.notify_all()
            thread, self._thread = self._thread, None
        _STARTED.discard(self)
        if self._step_holder == threading.get_ident():  # from a sink: this thread's step, once done, ends them
            return
        if thread is not None and thread is not threading.current_thread():
            thread.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        # Rows ended while a step still feeds them got their error and then one more chunk.
        if not self._step_lock.acquire(timeout=-1 if deadline is None else max(deadline - time.monotonic(), 0.0)):
            return  # a step still under way: it ends them when it is done
        self._step_holder = threading.get_ident()
        try:
            self._end_stopped()
        finally:
            self._step_holder = None
            self._step_lock.release()

    def _end_stopped(self) -> None:
        """End every request held with 'shutting down', holding the step lock (stop(), or the step
        it left them to). A stop() from one of their sinks finds nothing more to end."""
        self._end_after_step = False
        self._end_held("the server is shutting down")
        self._end_after_step = False

    def _end_held(self, reason: str) -> None:
        """End every request in the batch or the queue with EngineUnavailable(reason)."""
        with self._lock:
            left = list(self._rows) + list(self._waiting)
            self._waiting.clear()
        for request in left:
            self._end(request, "failed", EngineUnavailable(reason))

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self, ready: threading.Event) -> None:
        # torch.set_num_threads on this thread (the tuner's) also sets the count of every thread
        # the process starts later: the host's count is put back when the worker ends (stop()).
        found = own_threads()
        try:
            try:
                self._start_cpu_threads()
            finally:
                ready.set()
            while True:
                with self._lock:
                    while not self._stopping and not self._rows and not self._waiting:
                        self._lock.wait()
                    if self._stopping:
                        return
                self.step()  # which raises only an exit (see _EXITS)
        except BaseException as e:
            self._die(e)
            raise  # and the thread ends with it (threading prints its traceback, but SystemExit's)
        finally:
            if torch.get_num_threads() != found:
                torch.set_num_threads(found)

    def _die(self, error: BaseException) -> None:
        """The worker thread is ending on `error`: take no more requests, end every one held with
        EngineUnavailable (in a server, a 503 engine_unavailable, not a wait forever; /health is 503)
        and say why in the log, as a dead `EngineProcess` does. `died` is set last, once the requests
        have heard why: a server stops on seeing it."""
        with self._lock:
            self._stopping = True
        reason = f"the engine stopped: {first_line(error)}"
        self._end_held(reason)
        warn(f"{reason}; every request now gets 503 engine_unavailable, and /health 503")
        self.died = reason

    def _start_cpu_threads(self) -> None:
        """Start this thread's OpenMP team (PyTorch's CPU threads) now, at the count its steps run
        on. A team's threads are made by its first parallel op, and libgomp ends the whole process
        (exit 1) when it cannot make one: at the first request, a burst of clients had taken the
        threads a container's pids limit (or `ulimit -u`) allows, and the server died with every
        request in it. At start, a server that cannot have them does not start."""
        threads = self._threads.apply() if self._threads is not None else torch.get_num_threads()
        if self.device.type == "cpu" and threads > 1:
            # ATen splits an op across threads by GRAIN_SIZE (32,768) elements: this one takes them all.
            torch.empty(threads * 32768, dtype=torch.uint8).fill_(0)


_STARTED: weakref.WeakSet[Engine] = weakref.WeakSet()  # engines whose worker thread runs (`start()`)


@atexit.register
def _stop_at_exit() -> None:
    """Stop the started engines' workers (a daemon thread each) before the interpreter's teardown:
    one still in a step then ended the process with SIGABRT ("terminate called without an active
    exception"), a script that exited with requests in flight."""
    deadline = time.monotonic() + EXIT_STOP_S  # for them all: one stuck step each took 5 s in turn
    for engine in list(_STARTED):
        engine.stop(timeout=max(deadline - time.monotonic(), 0.0))


# A forked child's copies of the started engines have no worker (and the parent's may have held
# their step lock at the fork): its exit waited EXIT_STOP_S for them, and could end the parent's requests.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _STARTED.clear())


def _logprob_entries(logits: torch.Tensor, targets: list[int], tops: list[int]) -> list[TokenLogprob]:
    """Each row's target token with its log-probability and its row's `tops[i]` most likely
    alternatives (one host copy for them all)."""
    chosen, values, indices = log_probs(logits, torch.tensor(targets), max(tops))
    chosen, values, indices = chosen.tolist(), values.tolist(), indices.tolist()
    return [TokenLogprob(t, lp, tuple(zip(ids[:k], vals[:k])))
            for t, lp, ids, vals, k in zip(targets, chosen, indices, values, tops)]


def _waits_for_twin(request: Request) -> bool:
    """Whether the request's prompt is being prefilled by its twin (in the batch, not done yet),
    whose keys and values it will copy. A twin that ended (cancelled, failed) or that finished its
    prefill before this one took a slot leaves it to prefill itself."""
    twin = request.twin_of
    return twin is not None and request.length == 0 and twin.row >= 0 and twin.prefilling


def _leave_twins(request: Request) -> None:
    """An ended request leaves its twins: the first of those still to prefill takes its place
    for the others (a leader cancelled mid-prefill: its three twins would each prefill alone)."""
    if request.twin_of is not None:
        request.twin_of.twins.remove(request)
        request.twin_of = None
    pending = [t for t in request.twins if t.length == 0]
    for twin in request.twins:
        twin.twin_of = None
    request.twins = []
    if pending:
        leader, *rest = pending
        leader.twins = rest
        for twin in rest:
            twin.twin_of = leader


def _unless_not_finite(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """`ids`, with -1 for each row whose logits are not all finite. Such a row (weights that
    overflow the dtype, a broken adapter) would "sample" [PAD] or the last id forever: it fails
    instead, and is found in the same host sync as the others' tokens.

    x - x is 0 for a finite x and NaN for an infinite or NaN one, so a row sums to exactly 0 when,
    and only when, every logit in it is finite: two passes over the logits. `isfinite().all()`
    is the same test in more kernels, 4x the time at batch 4 on a CPU (40 us of a 1.4 ms step)."""
    return ids.masked_fill((logits - logits).sum(dim=-1) != 0, -1)


def _rows_of(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """logits[rows]: a view, not a copy, when the rows are the first ones in order (the common case)."""
    if rows == list(range(len(rows))):
        return logits[:len(rows)]
    return logits[torch.tensor(rows, device=logits.device)]
