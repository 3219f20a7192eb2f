"""The Python API and the engine used from threads: a stream read a next() per worker thread gives
each reader its own CPU thread count back; `Engine.stop()` waits for the step under way, so that
each request's error is its last item, and a stop during the warm-up stays stopped; a worker
thread that could not start is started by the next start; and an interpreter that exits with
requests in flight on a started engine (or a forked child of it) exits cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import gpt1
from gpt1.core.sampling_params import SamplingParams
from gpt1.inference.engine import Engine, EngineUnavailable
from tests.model_factories import model_without_stops

needs_two_threads = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 if hasattr(os, "sched_getaffinity")
                                       else (os.cpu_count() or 1) < 2, reason="needs 2 CPU threads")


@needs_two_threads
def test_a_stream_read_on_several_threads_gives_each_reader_its_own_count_back(tiny_model_dir, learnt_one_thread):
    """Starlette reads a StreamingResponse's iterator a next() per worker thread: each step put the
    reading thread on the tuner's count (1), and only the thread that read the end got its own back;
    the others stayed on 1 for good, and their later calls never tuned."""
    llm = gpt1.load(tiny_model_dir, device="cpu")
    pieces = llm.stream("def", temperature=0, max_new_tokens=12)
    counts: list[int] = []
    done = threading.Event()

    def read_one() -> None:  # on a new thread each time, as a pool's new workers
        if next(pieces, None) is None:
            done.set()
        counts.append(torch.get_num_threads())

    while not done.is_set():
        reader = threading.Thread(target=read_one)
        reader.start()
        reader.join()
    assert len(counts) > 2 and set(counts) == {2}
    assert torch.get_num_threads() == 2


@needs_two_threads
def test_a_stream_finished_on_another_thread_gives_each_thread_its_own_count(tiny_model_dir, learnt_one_thread):
    """A stream begun on one thread and finished on another that chose its own count (3): the first
    kept the tuner's 1 after its piece, and the other got the process's 2, not its own 3."""
    llm = gpt1.load(tiny_model_dir, device="cpu")
    pieces = llm.stream("def", temperature=0, max_new_tokens=12)
    next(pieces)
    assert torch.get_num_threads() == 2  # the reader's own count, between pieces
    seen = {}

    def finish() -> None:
        torch.set_num_threads(3)
        seen["pieces"] = len(list(pieces))
        seen["after"] = torch.get_num_threads()

    reader = threading.Thread(target=finish)
    reader.start()
    reader.join()
    assert seen["pieces"] > 0 and seen["after"] == 3


@pytest.fixture(scope="module")
def model(tiny_config, tokenizer):
    return model_without_stops(tiny_config, tokenizer, seed=11)


def ends_once_and_last(items: list) -> bool:
    """Whether a request's items hold one end (an error, or a chunk with a finish reason), last."""
    ends = [i for i, item in enumerate(items) if isinstance(item, BaseException) or item.finish_reason]
    return ends == [len(items) - 1]


def submit_four(engine: Engine, tokenizer, on_item) -> list[list]:
    items: list[list] = [[] for _ in range(4)]

    def sink_for(i):
        def sink(item):
            items[i].append(item)
            on_item(i, item)
        return sink

    engine.submit([tokenizer.encode(f"def f{i}():") for i in range(4)],
                  SamplingParams(temperature=1.0, seed=1, max_new_tokens=40), sink_for)
    return items


def test_stop_called_from_a_sink_ends_the_requests_once_the_step_is_done(model, tokenizer):
    """stop() from one request's sink ended every row at once, in the middle of the step, which
    then gave the rows after it one more chunk: an error, then text."""
    engine = Engine(model, tokenizer, max_batch=4)
    items = submit_four(engine, tokenizer, lambda i, item: engine.stop() if i == 0 and len(items[0]) == 3 else None)
    for _ in range(100):
        if not engine.busy:
            break
        engine.step()
    assert not engine.busy
    assert all(ends_once_and_last(request) for request in items), items
    assert all(isinstance(request[-1], EngineUnavailable) for request in items)


def test_stop_from_another_thread_waits_for_the_step_under_way(model, tokenizer):
    """stop() from another thread while a caller steps: it ended the rows while the step still fed
    them, and each request had its error and then one more chunk (t5_stop_race: 204 in 30 runs)."""
    engine = Engine(model, tokenizer, max_batch=4)
    stopper = threading.Thread(target=engine.stop)
    stopped = threading.Event()

    def on_item(i, item):
        if isinstance(item, BaseException):
            stopped.set()
        elif i == 0 and stopper.ident is None:  # within a step, before the other rows' chunks
            stopper.start()
            stopped.wait(0.5)  # time enough for a stop() that does not wait for the step to end them all

    items = submit_four(engine, tokenizer, on_item)
    for _ in range(100):
        if not engine.busy:
            break
        engine.step()
    stopper.join()
    assert not engine.busy
    assert all(ends_once_and_last(request) for request in items), items
    assert all(isinstance(request[-1], EngineUnavailable) for request in items)


EXIT = textwrap.dedent("""
    import sys, threading
    import gpt1
    from gpt1.core.sampling_params import SamplingParams
    from gpt1.inference.engine import Engine

    llm = gpt1.load(sys.argv[1], device="cpu")
    engine = Engine(llm.model, llm.tokenizer, max_batch=4, max_queue=1000).start()
    generating = threading.Event()
    engine.submit([llm.tokenizer.encode("def")] * 400, SamplingParams(temperature=1.0, max_new_tokens=40),
                  lambda i: lambda item: generating.set())
    generating.wait()
    print("exiting", flush=True)
""")


def test_an_interpreter_that_exits_with_requests_in_flight_on_a_started_engine_exits_cleanly(tiny_model_dir):
    """The worker is a daemon thread: at the interpreter's teardown it was still in a step, and the
    process ended with SIGABRT ("terminate called without an active exception", exit 134)."""
    run = subprocess.run([sys.executable, "-c", EXIT, str(tiny_model_dir)], capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout) == (0, "exiting\n"), run.stderr[-2000:]


def test_a_stop_during_the_warm_up_is_not_undone_by_the_start(model, tokenizer, monkeypatch):
    """stop() while start()'s warm-up builds its buckets (a compile takes seconds): the start then
    reset the stop and served the queued request anyway, or, with warm_up() alone, left it queued
    for good while `while engine.busy: engine.step()` spun on steps that do nothing."""
    from gpt1.inference.engine import _BucketedDecode

    building, release = threading.Event(), threading.Event()
    build = _BucketedDecode._build

    def slow_build(self, size):  # a compile's seconds, held until the test has called stop()
        building.set()
        assert release.wait(10)
        return build(self, size)

    monkeypatch.setattr(_BucketedDecode, "_build", slow_build)
    engine = Engine(model, tokenizer, max_batch=2)
    engine._graphs = _BucketedDecode(engine, capture=False)
    outcome: list = []

    def start() -> None:
        try:
            engine.start()
            outcome.append("started")
        except EngineUnavailable as e:
            outcome.append(e)

    starter = threading.Thread(target=start)
    starter.start()
    assert building.wait(10)
    items: list = []
    engine.submit([tokenizer.encode("def")], SamplingParams(temperature=0, max_new_tokens=4), lambda i: items.append)
    engine.stop(timeout=0.1)  # gives up on the step lock: the warm-up ends the request when it is done
    release.set()
    starter.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], EngineUnavailable), outcome
    assert len(items) == 1 and isinstance(items[0], EngineUnavailable) and not engine.busy
    assert not any(t.name == "gpt1-engine" for t in threading.enumerate())


def test_a_forked_child_does_not_stop_its_parents_engines_at_exit(tiny_model_dir):
    """A child's copies of the started engines have no worker, and their step lock may be held: its
    exit waited the whole EXIT_STOP_S for each, and could end the parent's requests."""
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    script = textwrap.dedent("""
        import os, sys
        import gpt1
        from gpt1.inference import engine as engine_module
        llm = gpt1.load(sys.argv[1], device="cpu")
        engine = engine_module.Engine(llm.model, llm.tokenizer, max_batch=2).start()
        pid = os.fork()
        if pid == 0:
            print(len(engine_module._STARTED), flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        print(len(engine_module._STARTED), flush=True)
        engine.stop()
    """)
    run = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir)], capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout.split()) == (0, ["0", "1"]), run.stderr[-2000:]


def test_a_worker_that_could_not_start_is_started_by_the_next_start(model, tokenizer, monkeypatch):
    """A pids limit: the worker thread's start() raised, yet the engine kept it as its worker, and a
    later start() said it ran, with no thread to step it (injected: `ulimit -u` does not bind root)."""
    start = threading.Thread.start

    def no_thread(self):
        if self.name == "gpt1-engine":
            raise RuntimeError("can't start new thread")
        start(self)

    engine = Engine(model, tokenizer, max_batch=2)
    monkeypatch.setattr(threading.Thread, "start", no_thread)
    with pytest.raises(RuntimeError):
        engine.start()
    monkeypatch.setattr(threading.Thread, "start", start)
    items: list = []
    with engine:
        done = threading.Event()
        engine.submit([tokenizer.encode("def")], SamplingParams(temperature=0, max_new_tokens=3),
                      lambda i: lambda item: (items.append(item), item.finish_reason and done.set()))
        assert done.wait(30)
    assert items[-1].finish_reason == "length"
