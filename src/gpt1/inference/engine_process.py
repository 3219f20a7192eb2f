"""The engine in a process of its own: what `gpt1 serve` runs on a GPU (`--engine process`).

In one process, the engine's worker thread and the server's event loop share one GIL. On a
fast GPU a decode step is about a millisecond, and the event loop (HTTP, JSON, a socket write
per stream) has work queued all the time: the engine, back from the GPU, waits for the GIL,
and the step slows to the event loop's pace. On an H200 (`gpt1 bench serve`, 2026-12-04) the
server process was one core busy at every load and 32 streams got 0.34-0.47x the engine's
in-process tokens/s. vLLM and SGLang run their engine loop in a separate process for this
reason; so does `EngineProcess`.

The child process loads the model dir, builds an `Engine` and drives its `step()` in its own
main thread: sampling, detokenisation, stop strings and the decode step's host work all happen
there. The parent keeps the tokenizer and the config, validates each submission at once
(exactly what `Engine.submit` checks, so a bad request never crosses over, and a full queue is
a 503 without a round trip), and gets each step's text back in one message. The child's `ready`
names the tokenizer and config it loaded: a folder replaced between the parent's read and the
child's is an error, not a new model served with the old tokenizer. Messages are JSON
over two pipes, never pickles: commands `{"submit"}`, `{"cancel"}`, `{"stop"}` one way, `{"ready"}`,
`{"error"}` and `{"out", "stats"}` the other. The parent's reader thread hands each chunk to the
request's sink, as the engine's own thread does, so the server cannot tell the two apart: a
request's error crosses as its type's name, message and errno, and is rebuilt here as the same
type (`_rebuild`), which the server answers by (400, 503 for a shortage of memory, 500).
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable, Sequence

import torch

from gpt1.core.errors import Gpt1Error
from gpt1.core.lifeline import exit_with_parent
from gpt1.core.malloc import fit_arenas_to_address_limit
from gpt1.core.progress import warn
from gpt1.core.sampling_params import SamplingParams
from gpt1.core.tokenizer import Tokenizer
from gpt1.inference.admission import QueueFull, TooLarge, check_room, check_sizes, fit_prompts
from gpt1.inference.decoding import Chunk, TokenLogprob
from gpt1.inference.engine import RATE_WINDOW_S, Engine, EngineStats, EngineUnavailable, GenerationFault, Sink
from gpt1.inference.llm import LLM

START_TIMEOUT_S = 600.0  # loading, the KV cache and the CUDA-graph capture of every bucket


@dataclass(eq=False)
class RemoteRequest:
    """A request generating in the engine process; `cancel()` stops it at the child's next step."""

    id: int
    sink: Sink
    owner: "EngineProcess"
    cancelled: bool = field(default=False)
    ended: bool = field(default=False)  # its last chunk or error has arrived

    def cancel(self) -> None:
        if not (self.cancelled or self.ended):  # the server cancels every request it is done with
            self.cancelled = True
            self.owner._send({"cancel": self.id})


class EngineProcess:
    """An `Engine` in a child process, with the part of its interface the server uses: `submit`,
    `active`, `queued`, `free_slots`, `max_batch`, `tokens_per_s`, `config`, `kv_bytes`, `device`, `dtype_name`,
    `start`, `stop`. `model_dir` is loaded there on `device` (as `gpt1.load` does); `tokenizer` and
    `config` are the same dir's, for validating submissions here. `dtype`: as `gpt1.load`'s
    (a name of `gpt1.inference.llm.DTYPES`)."""

    def __init__(self, model_dir: str | Path, tokenizer: Tokenizer, config, *, device: str, dtype: str = "auto",
                 max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = 256, cuda_graphs: bool = True,
                 compile: bool = False):
        check_sizes(max_batch, max_queue, prefill_chunk)
        if os.name != "posix":  # the pipes are inherited file descriptors (pass_fds): POSIX only
            raise Gpt1Error("the engine in its own process needs a POSIX system (Linux, macOS); "
                            "use the thread engine (--engine thread, engine='thread')")
        self.model_dir, self.tokenizer, self.config = str(model_dir), tokenizer, config
        self.max_batch, self.max_queue = max_batch, max_queue
        self._engine_args = dict(max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                                 cuda_graphs=cuda_graphs, compile=compile)
        self._device, self._dtype = device, dtype
        self.device, self.dtype_name, self.kv_bytes = device, dtype, 0  # the child's, once started
        self._ids = itertools.count()
        self._live: dict[int, RemoteRequest] = {}
        self._lock = threading.Lock()  # _live, the stats, sending
        # Held while chunks or errors go to sinks: stop() ends requests from its own thread while
        # the reader may be delivering, and a sink must get nothing after its last item.
        self._delivering = threading.Lock()
        self._stats = (0, 0)  # active, queued: the child's latest report
        self._child_stats = EngineStats()  # the child's engine's counts, as of its latest report
        self._rejected = 0  # submissions refused here (the child never sees them)
        self._generated: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens so far)
        self._process: subprocess.Popen | None = None
        self._commands: Connection | None = None  # the pipes to and from the child, once started
        self._outputs: Connection | None = None
        self._reader: threading.Thread | None = None
        self._closed = "the engine process has not started"
        self.died = ""  # why the child exited unasked (killed, out of memory), once it has

    # ---- state, for /health ---------------------------------------------------------------------
    @property
    def active(self) -> int:
        return self._stats[0]

    @property
    def queued(self) -> int:
        return self._stats[1]

    @property
    def free_slots(self) -> int:
        return self.max_batch - self.active

    @property
    def tokens_per_s(self) -> float:
        """Tokens generated per second over the last RATE_WINDOW_S seconds (as `Engine.tokens_per_s`)."""
        with self._lock:
            self._forget_old_counts(time.monotonic())
            if not self._generated:
                return 0.0
            return (self._generated[-1][1] - self._generated[0][1]) / RATE_WINDOW_S

    def _forget_old_counts(self, now: float) -> None:
        """Keep the last count at or before the window's start, and the counts after it."""
        while len(self._generated) > 1 and self._generated[1][0] <= now - RATE_WINDOW_S:
            self._generated.popleft()

    @property
    def alive(self) -> bool:
        """Whether the child is running and takes submissions."""
        return not self._closed

    @property
    def stats(self) -> EngineStats:
        """The child engine's counts (as of its latest step), with the submissions refused here."""
        return dataclasses.replace(self._child_stats, rejected=self._child_stats.rejected + self._rejected)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> "EngineProcess":
        """Start the child and wait until its engine is ready (its decode buckets built); a
        Gpt1Error with the child's reason if it cannot start (e.g. the KV cache does not fit)."""
        if self._process is not None:
            if not self._closed:
                return self
            # Stopped, or its start failed: a new child, as the thread engine starts a new worker
            # (a second serve of the same app answered every request 503, saying nothing at start).
            self._reset()
        # A fresh interpreter (not a fork: CUDA cannot be used in a forked child; not
        # multiprocessing's spawn, which re-imports the caller's main module) with two pipes.
        commands_in, commands_out = os.pipe()
        outputs_in, outputs_out = os.pipe()
        spec = json.dumps({"model_dir": self.model_dir, "device": self._device, "dtype": self._dtype,
                           "engine": self._engine_args, "parent": os.getpid()})
        try:
            self._process = subprocess.Popen([sys.executable, "-m", __name__, spec, str(commands_in), str(outputs_out)],
                                             pass_fds=(commands_in, outputs_out), stdin=subprocess.DEVNULL)
        except BaseException:  # no child (a limit on processes: EAGAIN), or Ctrl-C: the pipes' four ends go too
            for fd in (commands_in, commands_out, outputs_in, outputs_out):
                os.close(fd)
            raise
        os.close(commands_in)
        os.close(outputs_out)
        self._commands = Connection(commands_out, readable=False)
        self._outputs = Connection(outputs_in, writable=False)
        try:
            if not self._outputs.poll(START_TIMEOUT_S):
                raise Gpt1Error(f"the engine process did not start within {START_TIMEOUT_S:.0f} s")
            message = json.loads(self._outputs.recv_bytes())
        except EOFError:
            self._kill()
            self._close_pipes()
            raise Gpt1Error(f"the engine process exited while starting (exit code {self._process.wait()})") from None
        except BaseException:  # also Ctrl-C or SIGTERM while it loads: it would run on, holding the GPU
            self._kill()
            self._close_pipes()
            raise
        if "error" in message:
            self._kill()
            self._close_pipes()
            raise Gpt1Error(message["error"])
        ready = message["ready"]
        if why := self._other_model(ready):
            self._kill()
            self._close_pipes()
            raise Gpt1Error(why)
        self.device, self.dtype_name, self.kv_bytes = ready["device"], ready["dtype"], ready["kv_bytes"]
        self._generated.append((time.monotonic(), 0))
        self._closed = ""
        self._reader = threading.Thread(target=self._read, name="gpt1-engine-reader", daemon=True)
        self._reader.start()
        return self

    def _other_model(self, ready: dict) -> str | None:
        """Why the model the child loaded is not the one whose tokenizer and config this process
        validates with, or None. The child loads `model_dir` again, later: a folder replaced whole
        in between (`export --force`, `finetune --merge` run again, a run saving its best/) served
        the new model with the old tokenizer, without a word."""
        differs = [what for what, ours, theirs in (
            ("tokenizer", self.tokenizer.fingerprint, ready["tokenizer"]),
            ("config", json.loads(json.dumps(self.config.to_dict())), ready["config"])) if ours != theirs]
        if not differs:
            return None
        return (f"{self.model_dir}: replaced while the server started: the engine process loaded another model (its "
                f"{' and '.join(differs)} differ from those read a moment earlier); start the server again")

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the child: every unfinished request's sink gets a 'shutting down' error at once,
        then the child is waited for (up to `timeout` s, then killed) and reaped."""
        if self._process is None:
            return
        with self._lock:  # said to every open request, not the reader's "has stopped" when the child exits
            self._closed = self._closed or "the server is shutting down"
        self._send({"stop": True})
        # The requests end now, not once the child has exited: it first finishes the step it is in
        # (a long prefill's takes seconds), and the server's shutdown holds every stream until then.
        self._close("the server is shutting down")
        try:
            self._process.wait(timeout)  # reaped here: never left a zombie, or an orphan on the GPU
        except subprocess.TimeoutExpired:
            pass
        self._kill()
        if self._reader is not None:
            self._reader.join(timeout)
        if self._reader is None or not self._reader.is_alive():
            self._close_pipes()

    def _close_pipes(self) -> None:
        """Close this end of both pipes: a stopped engine kept its two descriptors until it was
        garbage-collected (an app kept in a notebook and served again and again: 2 each time)."""
        for connection in (self._commands, self._outputs):
            if connection is not None:
                with contextlib.suppress(OSError):
                    connection.close()

    def _reset(self) -> None:
        """The state of an engine not yet started, for a new child after a stop or a failed start."""
        self._close_pipes()
        self._process, self._reader, self._live = None, None, {}
        self._stats, self._child_stats, self._rejected = (0, 0), EngineStats(), 0
        self._generated.clear()
        self._closed, self.died = "the engine process has not started", ""

    def __enter__(self) -> "EngineProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    # ---- submitting -----------------------------------------------------------------------------
    def submit(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
               sink_for: Callable[[int], Sink]) -> list[RemoteRequest]:
        """As `Engine.submit`: all or none, the same errors, raised here before anything is sent.
        The queue is counted here: a request is in it from its submit to its last chunk."""
        params, fitted = fit_prompts(prompts, params, self.config, self.tokenizer)
        with self._lock:
            if self._closed:
                raise EngineUnavailable(self._closed)
            try:
                check_room(len(fitted), self.max_batch, self.max_queue, len(self._live), 0)
            except Gpt1Error:
                self._rejected += len(fitted)
                raise
            requests = [RemoteRequest(next(self._ids), sink_for(i), self) for i in range(len(fitted))]
            self._live.update((r.id, r) for r in requests)
            self._send_locked({"submit": [[r.id, ids] for r, ids in zip(requests, fitted)],
                               "params": [dataclasses.asdict(p) for p in params]})
        return requests

    def _send(self, message: dict) -> None:
        with self._lock:
            self._send_locked(message)

    def _send_locked(self, message: dict) -> None:
        if self._closed and "stop" not in message:
            return
        try:
            self._commands.send_bytes(json.dumps(message).encode())
        except (OSError, ValueError):  # the child is gone: the reader ends what was running
            pass

    # ---- the reader thread ------------------------------------------------------------------------
    def _read(self) -> None:
        """Hand each step's chunks to their sinks, until the child exits."""
        while True:
            try:
                message = json.loads(self._outputs.recv_bytes())
            except (EOFError, OSError):
                break
            active, queued, counts = message["stats"]
            self._stats, self._child_stats, generated = (active, queued), EngineStats(**counts), counts["tokens"]
            if not self._generated or generated != self._generated[-1][1]:
                with self._lock:
                    now = time.monotonic()
                    self._generated.append((now, generated))
                    self._forget_old_counts(now)  # here, not only when /health asks: unpolled, it grew forever
            with self._delivering:
                for rid, text, finish_reason, prompt_tokens, completion_tokens, error, *scores in message["out"]:
                    request = self._live.get(rid)
                    if request is None:  # ended here (stop(), a cancel's last chunk already read)
                        continue
                    if error is not None:
                        item = _rebuild(*error)
                    else:
                        item = Chunk(text, finish_reason, prompt_tokens, completion_tokens, *map(_logprobs, scores))
                    if error is not None or finish_reason is not None:
                        request.ended = True
                        with self._lock:
                            self._live.pop(rid, None)
                    _deliver(request, item)
        try:  # its output pipe closed: the child has exited or is exiting
            code = self._process.wait(5) if self._process is not None else None
        except subprocess.TimeoutExpired:
            code = None
        reason = f"the engine process exited (exit code {code})" if code else "the engine process has stopped"
        died = "" if self._closed else f"{reason}: {_death(code)}"  # not stopped by stop(): killed, out of memory
        if died:  # its requests only hear it: say it in the log
            warn(f"{died}; every request now gets 503 engine_unavailable, and /health 503")
        self._close(reason)
        self.died = died  # after its requests have heard why (the server may stop on seeing this)

    def _close(self, reason: str) -> None:
        """No more submissions; every request still running ends with `reason` as its error."""
        with self._delivering:
            with self._lock:
                reason = self._closed = self._closed or reason
                left, self._live = list(self._live.values()), {}
                self._stats = (0, 0)
            for request in left:
                request.ended = True
                _deliver(request, EngineUnavailable(reason))


def _death(code: int | None) -> str:
    """What an engine process's exit status says: a signal (negative), a status, or none yet."""
    if code is None:
        return "its pipe closed, and it had not exited 5 s later"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" + (" (out of memory? the OOM killer sends it)" if -code == signal.SIGKILL else "")
    return f"exit status {code}" + (" (an error of its own, printed above)" if code else "")


# The errors rebuilt as their own type, by name, besides Python's built-in ones.
_ERRORS = {cls.__name__: cls for cls in (Gpt1Error, EngineUnavailable, GenerationFault, QueueFull, TooLarge,
                                         torch.OutOfMemoryError)}


# The most of a child's traceback that is sent with its error (the last lines: where it raised).
_TRACEBACK_CHARS = 8_000


def _described(error: BaseException) -> list:
    """A request's error as the child sends it: [type name, message, errno or None, traceback or
    None]. An OSError's message is its strerror (what `OSError(errno, strerror)` takes back); a
    Gpt1Error of a type not in _ERRORS goes as a Gpt1Error. The traceback is the child's, so that
    the server's log says where a fault was raised, as it does for the thread engine's."""
    kind = type(error).__name__
    if isinstance(error, Gpt1Error) and _ERRORS.get(kind) is not type(error):
        kind = "Gpt1Error"
    trace = "".join(traceback.format_exception(error))[-_TRACEBACK_CHARS:] if error.__traceback__ else None
    if isinstance(error, OSError) and error.errno is not None:
        return [kind, error.strerror or str(error), error.errno, trace]
    return [kind, str(error), None, trace]


def _rebuild(kind: str, message: str, errno: int | None, trace: str | None = None) -> Exception:
    """The child's error (see `_described`), with its traceback as a note (the logged traceback
    shows it; the message stays the same)."""
    error = _rebuilt(kind, message, errno)
    if trace:
        error.add_note(f"raised in the engine process:\n{trace.rstrip()}")
    return error


def _rebuilt(kind: str, message: str, errno: int | None) -> Exception:
    """The child's error (see `_described`) as an exception of the same type here, so that the
    server answers it as it answers the thread engine's, with the same message: an OSError with its
    errno (ENOMEM: a 503 to retry), a MemoryError, torch's OutOfMemoryError, a Gpt1Error (400), a
    GenerationFault (500: the model's logits overflowed) or EngineUnavailable. A type that cannot be
    rebuilt from its message (one of another package, UnicodeDecodeError) becomes a RuntimeError
    subclass of the same name."""
    if errno is not None:
        return OSError(errno, message)  # the errno's own subclass (FileNotFoundError, ...); the file name is lost
    cls = _ERRORS.get(kind) or getattr(builtins, kind, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except TypeError:  # wants more arguments (UnicodeDecodeError's five)
            pass
    return _named_error(kind)(message)


@functools.cache
def _named_error(kind: str) -> type[RuntimeError]:
    return type(kind, (RuntimeError,), {"__module__": __name__})


def _logprobs(entries: list | None) -> list[TokenLogprob | None] | None:
    """A Chunk's log-probabilities back from their JSON arrays ([id, logprob, [[id, logprob], ...]])."""
    if entries is None:
        return None
    return [None if e is None else TokenLogprob(e[0], e[1], tuple(map(tuple, e[2]))) for e in entries]


def _deliver(request: RemoteRequest, item: Chunk | BaseException) -> None:
    try:
        request.sink(item)
    except Exception:  # noqa: BLE001, S110 - a failing sink ends its own request only, as in the engine
        pass


# ---- the child process ---------------------------------------------------------------------------
def _child_main(model_dir: str, device: str, dtype: str, engine_args: dict, commands: Connection,
                outputs: Connection) -> None:
    """Load the model, build the engine, then: take commands, step, send the step's output."""
    try:
        llm = LLM.load(model_dir, device=device, dtype=dtype)
        engine = Engine(llm.model, llm.tokenizer, **engine_args)
        engine.warm_up()
    except Exception as e:  # noqa: BLE001 - the parent raises it as the start-up error
        message = {"error": str(e) if isinstance(e, Gpt1Error) else
                   f"the engine process could not start: {type(e).__name__}: {e}"}
    else:
        # With what it loaded, which the parent compares with what it read from the folder (`_other_model`).
        message = {"ready": {"device": str(engine.device), "dtype": engine.dtype_name, "kv_bytes": engine.kv_bytes,
                             "tokenizer": llm.tokenizer.fingerprint, "config": llm.config.to_dict()}}
    try:
        outputs.send_bytes(json.dumps(message).encode())
    except (OSError, ValueError):  # the parent gave up on the start (or died): nobody to tell
        return
    if "error" in message:
        return
    requests: dict[int, object] = {}
    outbox: list[list] = []

    def sink_for(rid: int) -> Sink:
        def sink(item: Chunk | BaseException) -> None:
            if isinstance(item, BaseException):
                outbox.append([rid, "", None, 0, 0, _described(item)])
            else:
                outbox.append([rid, item.text, item.finish_reason, item.prompt_tokens, item.completion_tokens, None,
                               item.logprobs, item.prompt_logprobs])  # TokenLogprobs go as JSON arrays
            if isinstance(item, BaseException) or item.finish_reason is not None:
                requests.pop(rid, None)
        return sink

    while True:
        # Block for the next command while idle; otherwise take what has arrived and step.
        wait = None if not engine.busy and not outbox else 0
        while commands.poll(wait):
            wait = 0
            try:
                message = json.loads(commands.recv_bytes())
            except EOFError:  # the parent is gone
                message = {"stop": True}
            if "stop" in message:
                engine.stop()  # ends what is left; the parent ends its own requests
                return
            if "cancel" in message:
                if (request := requests.get(message["cancel"])) is not None:
                    request.cancel()
                continue
            params = [SamplingParams(**{**p, "stop": tuple(p["stop"])}) for p in message["params"]]
            ids = [rid for rid, _ in message["submit"]]
            try:
                submitted = engine.submit([prompt for _, prompt in message["submit"]], params,
                                          lambda i: sink_for(ids[i]))
            except Exception as e:  # noqa: BLE001 - the parent checked it; should it still fail, fail those
                for rid in ids:
                    sink_for(rid)(e)
                continue
            requests.update(zip(ids, submitted))
        engine.step()  # never raises: an error fails the requests it concerns, and this process goes on
        if outbox or not engine.busy:
            # EngineStats holds ints only: its __dict__ is what dataclasses.asdict gave, without
            # asdict's deep copy (46 Python calls a step).
            stats = [engine.active, engine.queued, vars(engine.stats)]
            try:
                outputs.send_bytes(json.dumps({"out": outbox, "stats": stats}).encode())
            except (OSError, ValueError):  # the parent is gone
                return
            outbox = []


if __name__ == "__main__":  # the child: python -m gpt1.inference.engine_process SPEC COMMANDS_FD OUTPUTS_FD
    # Ctrl-C in a terminal reaches the whole process group: the server shuts down and stops this
    # process through its pipe (or by closing it), without a KeyboardInterrupt traceback from here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A hang-up (closed terminal or SSH session) too: the server takes it as SIGTERM and stops this
    # process itself, after ending its streams (killed first, it cut them with "exited (exit code -1)").
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Not started by gpt1.cli.main, which does this for every command: under `ulimit -v`, glibc's
    # per-thread arenas would take the address space the KV cache needs.
    fit_arenas_to_address_limit()
    _spec = json.loads(sys.argv[1])
    # A parent killed outright (SIGKILL, the OOM killer) neither stops nor kills this process, and
    # one still loading reads no pipe: end it when the parent is gone, not minutes later.
    exit_with_parent(_spec["parent"])
    _child_main(_spec["model_dir"], _spec["device"], _spec["dtype"], _spec["engine"],
                Connection(int(sys.argv[2]), writable=False), Connection(int(sys.argv[3]), readable=False))
    # Exit without the interpreter's teardown, as multiprocessing's children do: freeing torch's
    # modules and the model one object at a time took 0.7-1.4 s on the 2-core dev CPU, and the
    # server's exit waits for this process. Nothing here needs it: no file is open for writing, and
    # the kernel (and the CUDA driver) free the memory. An exception above still exits as usual.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
