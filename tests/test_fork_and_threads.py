"""The Python API across a fork and beside other threads (`gpt1.core.threads`): a forked child
generates (on one thread) instead of waiting forever, and a thread started while another one is
inside a call does not inherit the thread tuner's momentary count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import gpt1

needs_two_threads = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 if hasattr(os, "sched_getaffinity")
                                       else (os.cpu_count() or 1) < 2, reason="needs 2 CPU threads")

FORK = textwrap.dedent("""
    import faulthandler, json, os, sys, threading
    import torch
    import gpt1
    from gpt1.core.sampling_params import SamplingParams
    from gpt1.inference.engine import Engine

    os.environ["OMP_NUM_THREADS"] = "2"  # the parent's generate on 2 threads, its OpenMP threads started
    llm = gpt1.load(sys.argv[1], device="cpu")
    expected = llm.generate("def", temperature=0, max_new_tokens=8)
    del os.environ["OMP_NUM_THREADS"]  # the tuner on: an engine made before the fork (gunicorn --preload)
    engine = Engine(llm.model, llm.tokenizer, max_batch=1)
    pid = os.fork()
    if pid == 0:
        faulthandler.dump_traceback_later(30, exit=True)  # a hung child exits (its stack on stderr)
        got = llm.generate("def", temperature=0, max_new_tokens=8)
        done, pieces = threading.Event(), []
        def sink(chunk):
            pieces.append(chunk.text)
            if chunk.finish_reason:
                done.set()
        with engine:
            engine.submit([llm.tokenizer.encode("def")], SamplingParams(temperature=0, max_new_tokens=8),
                          lambda i: sink)
            done.wait()
        started = []
        thread = threading.Thread(target=lambda: started.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        print(json.dumps({"generate": got == expected, "engine": "".join(pieces) == expected,
                          "engine_threads": engine.stats.threads, "threads": torch.get_num_threads(),
                          "new_thread": started[0]}), flush=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"child_status": status}))
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@needs_two_threads
def test_a_forked_child_generates_on_one_thread(tiny_model_dir):
    """GNU OpenMP is not fork-safe: after a generate in the parent, the child's first generate
    waited forever (multiprocessing's default fork, gunicorn --preload). The child runs on one
    thread, an engine made before the fork and the threads it starts included."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    try:
        run = subprocess.run([sys.executable, "-c", FORK, str(tiny_model_dir)], capture_output=True, text=True,
                             timeout=60, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("the forked child hung")
    assert run.returncode == 0, run.stderr[-3000:]
    *child, parent = (json.loads(line) for line in run.stdout.splitlines())
    assert parent == {"child_status": 0}, run.stderr[-3000:]  # 256: it hung and faulthandler ended it
    child, = child
    assert child == {"generate": True, "engine": True, "engine_threads": 1, "threads": 1, "new_thread": 1}


@needs_two_threads
def test_a_thread_started_during_a_call_keeps_the_processs_count(tiny_model_dir, learnt_one_thread):
    """torch.set_num_threads on the stepping thread (the tuner's 1) also set the count of every
    thread started later: a worker thread started during a stream stayed on 1 for life, and its
    own calls never tuned (a web server's worker threads, a thread pool's)."""
    llm = gpt1.load(tiny_model_dir, device="cpu")
    seen: dict[str, int] = {}
    ready, go = threading.Event(), threading.Event()

    def worker():
        seen["started"] = torch.get_num_threads()
        ready.set()
        go.wait()
        llm.generate("import", temperature=0, max_new_tokens=4)
        seen["after its own call"] = torch.get_num_threads()

    thread = None
    for _ in llm.stream("def", temperature=0, max_new_tokens=4):
        if thread is None:  # between pieces: the reader has its own count back (the steps run on the tuner's 1)
            assert torch.get_num_threads() == 2
            thread = threading.Thread(target=worker)
            thread.start()
            ready.wait()
    go.set()
    thread.join()
    assert seen == {"started": 2, "after its own call": 2}
    assert torch.get_num_threads() == 2  # the caller's own count comes back
