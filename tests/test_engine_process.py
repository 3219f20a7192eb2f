"""The engine in a process of its own (`gpt1.inference.engine_process`, `gpt1 serve --engine
process`): the same outputs as the engine in this process, validation before anything crosses
over, a clear start-up error, and a child that dies ending its requests instead of hanging them."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

import gpt1
from gpt1.core.errors import Gpt1Error
from gpt1.core.sampling_params import SamplingParams
from gpt1.inference.decoding import Chunk
from gpt1.inference.engine import EngineUnavailable, QueueFull, TooLarge
from gpt1.inference.engine_process import EngineProcess
from gpt1.inference.generate import generate
from gpt1.inference.llm import LLM
from gpt1.serve import background_server, create_app
from tests.test_serve_api import endless_model_dir, free_port, serve_refused, wait_for


@pytest.fixture(scope="module")
def engine(llm):
    with EngineProcess(llm.path, llm.tokenizer, llm.config, device="cpu", max_batch=4, max_queue=4) as engine:
        yield engine


class Outputs:
    """Sinks that collect each request's chunks; `wait()` until every one has ended."""

    def __init__(self, n: int):
        self.items: dict[int, list] = {i: [] for i in range(n)}
        self._ended = threading.Semaphore(0)

    def sink_for(self, offset: int = 0):
        def make(i: int):
            def sink(item):
                self.items[offset + i].append(item)
                if isinstance(item, BaseException) or item.finish_reason is not None:
                    self._ended.release()
            return sink
        return make

    def wait(self, timeout: float = 60.0) -> None:
        for _ in self.items:
            assert self._ended.acquire(timeout=timeout), "a request never ended"

    def text(self, i: int) -> str:
        return "".join(c.text for c in self.items[i])


def process_state(pid: int) -> str:
    """The process's state letter from /proc (T: stopped, Z: zombie); "" once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


def test_greedy_and_seeded_outputs_equal_single_requests_with_staggered_arrivals(engine, llm):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15], [16, 17], [18, 19, 20, 21, 22], [23]]
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    seeded = SamplingParams(temperature=0.9, top_k=20, seed=7, max_new_tokens=10)
    outputs = Outputs(len(prompts))
    # Six requests, more than the 4 slots, arriving while earlier ones generate, two knob sets.
    for i, prompt in enumerate(prompts):
        engine.submit([prompt], greedy if i % 2 == 0 else seeded, outputs.sink_for(i))
        time.sleep(0.01 * i)
    outputs.wait()
    for i, prompt in enumerate(prompts):
        expected = generate(llm.model, llm.tokenizer, prompt, greedy if i % 2 == 0 else seeded)
        last = outputs.items[i][-1]
        assert isinstance(last, Chunk) and outputs.text(i) == expected.text
        assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == (
            expected.finish_reason, expected.prompt_tokens, expected.completion_tokens)
    assert engine.stats.completed >= len(prompts) and engine.active == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_process_on_cuda_equals_the_engine_in_this_process(tiny_model_dir):
    """What `gpt1 serve` runs on a GPU by default: the child captures CUDA graphs of its own."""
    cuda = gpt1.load(tiny_model_dir, device="cuda")
    params = SamplingParams(temperature=0, max_new_tokens=16)
    with EngineProcess(tiny_model_dir, cuda.tokenizer, cuda.config, device="cuda", max_batch=4) as engine:
        assert engine.device.startswith("cuda")
        for prompt in ([5, 6, 7], [8]):  # one at a time: bf16 rounding depends on the batch
            outputs = Outputs(1)
            engine.submit([prompt], params, outputs.sink_for())
            outputs.wait()
            assert outputs.text(0) == generate(cuda.model, cuda.tokenizer, prompt, params).text


def test_the_tokens_per_s_history_stays_bounded_when_nobody_asks(engine, monkeypatch):
    """As the engine in this process: the parent's history of token counts grew by one entry
    per step until /health read it."""
    import gpt1.inference.engine_process as engine_process

    monkeypatch.setattr(engine_process, "RATE_WINDOW_S", 1e-6)
    outputs = Outputs(1)
    engine.submit([[5, 6, 7]], SamplingParams(temperature=0, max_new_tokens=30), outputs.sink_for())
    outputs.wait()
    assert outputs.items[0][-1].completion_tokens >= 10 and len(engine._generated) <= 2


def test_stop_ends_the_requests_at_once_and_the_child_exits_without_its_teardown(tiny_config, tokenizer, tmp_path):
    """stop() ended the requests only once the child had exited, and the child's interpreter
    teardown (torch and the model, freed one object at a time) took 1.2-2.1 s on the dev CPU:
    the server's shutdown waited for both. Frozen (SIGSTOP), the child can do nothing: the
    requests must end meanwhile; thawed, it must be gone at once. (A model that never samples
    [EOS]: no request finishes by itself before the stop.)"""
    llm = gpt1.load(endless_model_dir(tiny_config, tokenizer, tmp_path / "endless"), device="cpu")
    engine = EngineProcess(llm.path, llm.tokenizer, llm.config, device="cpu", max_batch=2, max_queue=4).start()
    outputs = Outputs(4)  # 2 generating, 2 queued
    engine.submit([[5 + i] for i in range(4)], SamplingParams(temperature=1.0, max_new_tokens=4_000),
                  outputs.sink_for())
    wait_for(lambda: outputs.items[0], what="the first chunk")
    os.kill(engine.pid, signal.SIGSTOP)
    stopper = threading.Thread(target=engine.stop)
    try:
        wait_for(lambda: process_state(engine.pid) == "T", what="the engine process to stop")
        stopper.start()
        outputs.wait(timeout=5)  # the old stop() waited 10 s for the frozen child, then killed it
        assert process_state(engine.pid) == "T"
    finally:
        os.kill(engine.pid, signal.SIGCONT)
        thawed = time.monotonic()
        stopper.join(30)
    took = time.monotonic() - thawed
    for items in outputs.items.values():
        assert isinstance(items[-1], EngineUnavailable) and str(items[-1]) == "the server is shutting down"
        assert not any(isinstance(item, BaseException) for item in items[:-1])  # one error, the last item
    assert engine._process.returncode == 0 and process_state(engine.pid) == ""  # exited by itself, reaped
    # Its teardown took >= 1.2 s on quiet cores; a busy machine (load 5-7 on 2 cores) stretched this to ~1 s.
    assert took < 1.15, f"the engine process took {took:.2f} s to exit after its stop command"


def test_bad_submissions_are_refused_here_before_anything_is_sent(engine, llm):
    before = engine.stats
    with pytest.raises(Gpt1Error, match="prompt 1"):  # an id outside the vocabulary, named
        engine.submit([[5], [llm.config.vocab_size + 3]], SamplingParams(), Outputs(2).sink_for())
    with pytest.raises(Gpt1Error, match="temperature"):
        engine.submit([[5]], SamplingParams(temperature=-1), Outputs(1).sink_for())
    with pytest.raises(TooLarge, match="at most 8"):
        engine.submit([[5]] * 9, SamplingParams(), Outputs(9).sink_for())
    assert engine.stats.submitted == before.submitted and engine.stats.rejected == before.rejected + 9


def test_off_posix_the_process_engine_is_one_clear_error(llm, monkeypatch):
    # Windows: subprocess asserts "pass_fds not supported", a traceback of plain `gpt1 serve` on a
    # GPU (whose --engine auto now picks the thread engine there).
    monkeypatch.setattr(os, "name", "nt")
    with pytest.raises(Gpt1Error, match=r"needs a POSIX system .*--engine thread"):
        EngineProcess(llm.path, llm.tokenizer, llm.config, device="cpu")


def test_a_full_queue_is_refused_and_cancel_frees_the_slots(tiny_config, tokenizer, tmp_path):
    # A model that never samples [EOS]: no request ends by itself and frees its place before the 9th.
    llm = gpt1.load(endless_model_dir(tiny_config, tokenizer, tmp_path / "endless"), device="cpu")
    with EngineProcess(llm.path, llm.tokenizer, llm.config, device="cpu", max_batch=4, max_queue=4) as engine:
        _fill_refuse_cancel_and_reuse(engine, llm)


def _fill_refuse_cancel_and_reuse(engine: EngineProcess, llm) -> None:
    outputs = Outputs(8)
    # 8 long requests fill the 4 slots and the 4 queue places.
    requests = engine.submit([[5 + i] for i in range(8)], SamplingParams(temperature=1.0, max_new_tokens=4_000),
                             outputs.sink_for())
    with pytest.raises(QueueFull):
        engine.submit([[5]], SamplingParams(), Outputs(1).sink_for())
    for r in requests:
        r.cancel()
    outputs.wait()
    assert all(outputs.items[i][-1].finish_reason in ("cancelled", "length", "stop") for i in range(8))
    deadline = time.monotonic() + 10
    while (engine.active or engine.queued) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.active == 0 and engine.queued == 0 and engine.free_slots == 4
    done, params = Outputs(1), SamplingParams(temperature=0, max_new_tokens=6)
    engine.submit([[9, 10]], params, done.sink_for())  # a reused slot: stale keys never leak in
    done.wait()
    assert done.text(0) == generate(llm.model, llm.tokenizer, [9, 10], params).text


def test_the_server_side_holds_no_weights_but_checks_the_dir(tiny_model_dir, llm, tmp_path):
    """`gpt1 serve --engine process` loads the dir this way in the server process."""
    light = LLM.without_weights(tiny_model_dir)
    assert all(p.device.type == "meta" for p in light.model.parameters())
    assert light.config == llm.config and light.tokenizer.encode("hello there") == llm.tokenizer.encode("hello there")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "n_layer": config["n_layer"] + 1}))
    with pytest.raises(Gpt1Error, match=r"model.safetensors: weights do not match the config"):
        LLM.without_weights(broken)


def test_create_app_loads_as_llm_was_loaded_and_refuses_what_the_thread_engine_ignores(tiny_model_dir):
    """create_app(llm, engine="process") loaded "auto" whatever llm's dtype; create_app(llm,
    dtype=...) with the thread engine served llm as loaded and said nothing."""
    bf16 = gpt1.load(tiny_model_dir, device="cpu", dtype="bfloat16")
    assert create_app(bf16, engine="process").state.engine.dtype_name == "bfloat16"  # not started: nothing runs
    assert create_app(bf16, engine="process", dtype="float32").state.engine.dtype_name == "float32"
    assert create_app(LLM.without_weights(tiny_model_dir), engine="process").state.engine.dtype_name == "auto"
    for where in ({"dtype": "float32"}, {"device": "cpu"}):
        with pytest.raises(Gpt1Error, match=r"device and dtype apply to engine='process'; the thread engine runs"):
            create_app(bf16, **where)


def test_a_pool_that_does_not_fit_is_a_clear_start_up_error(llm):
    engine = EngineProcess(llm.path, llm.tokenizer, llm.config, device="cpu", max_batch=10**12)
    with pytest.raises(Gpt1Error, match=r"max_batch 1000000000000: the KV cache needs .* lower max_batch"):
        engine.start()
    assert engine.pid is not None and not engine.alive


def test_a_dead_engine_process_ends_its_requests_and_the_server_says_so(tiny_config, tokenizer, tmp_path):
    endless = gpt1.load(endless_model_dir(tiny_config, tokenizer, tmp_path), device="cpu")  # replies of max_tokens
    app = create_app(endless, engine="process", max_batch=2)
    engine = app.state.engine
    body = {"model": "m", "prompt": "x", "max_tokens": 8000, "temperature": 1.0, "stream": True}
    with background_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/health").json()["status"] == "ok"
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # generating
            os.kill(engine.pid, signal.SIGKILL)
            rest = list(lines)
    # Error events, not chunks whose random text holds '"error' (a token of the Python corpus).
    errors = [line for line in rest if line.startswith('data: {"error"')]
    assert len(errors) == 1 and "engine_unavailable" in errors[0] and "exit code -9" in errors[0]


def test_requests_to_a_dead_engine_process_are_503_with_the_reason(tiny_config, tokenizer, tmp_path):
    """What a request gets between the engine's death and the server's own stop (uvicorn's next
    tick, test_serve_deploy): the app alone, without uvicorn's ticks, so that the window stays
    open. Asked over a real server, the answer raced the stop (connection refused in CI)."""
    from fastapi.testclient import TestClient

    endless = gpt1.load(endless_model_dir(tiny_config, tokenizer, tmp_path), device="cpu")
    app = create_app(endless, engine="process", max_batch=2)
    with TestClient(app) as http:
        assert http.get("/health").json()["status"] == "ok"
        os.kill(app.state.engine.pid, signal.SIGKILL)
        wait_for(lambda: not app.state.engine.alive, what="the engine to notice its child's death")
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_unavailable"
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and "exit code -9" in r.json()["error"]["message"]


@pytest.mark.slow
def test_cli_serves_with_the_engine_in_its_own_process(tiny_model_dir):
    """`gpt1 serve --engine process --dtype bfloat16`: the child loads the model in bf16 (its
    replies are the in-process bf16 model's), says so at start and in /health."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gpt1", "serve", "--model", str(tiny_model_dir), "--port", str(port),
                             "--engine", "process", "--dtype", "bfloat16", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "gpt1 serve did not start"
            time.sleep(0.1)
        assert httpx.get(f"{url}/health").json()["dtype"] == "bfloat16"
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 5, "temperature": 0}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        bf16 = gpt1.load(tiny_model_dir, device="cpu", dtype="bfloat16")
        assert r.json()["choices"][0]["text"] == bf16.generate("x", temperature=0, max_new_tokens=5)
        child = int(open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()[0])
    finally:
        proc.terminate()
        proc.wait(20)
    stderr = proc.stderr.read().decode()
    assert re.search(r"KV cache: 16 slots x 64 positions = [\d.]+ MiB of bfloat16 on cpu \(--max-batch 16\), in the "
                     r"engine's own process", stderr)
    assert not os.path.exists(f"/proc/{child}") or "zombie" in open(f"/proc/{child}/status").read().lower()


def test_cli_serve_refuses_a_pool_too_big_for_memory_in_the_engines_process_in_one_line(tiny_model_dir, capsys):
    """A pool that cannot fit is one clear line and exit 2, as with the engine in a thread."""
    rc, err = serve_refused(capsys, "--model", tiny_model_dir, "--port", "0", "--engine", "process",
                            "--max-batch", 10**12)
    assert rc == 2 and "Traceback" not in err
    assert re.search(r"error: max_batch 1000000000000: the KV cache needs [\d.]+ GiB .* lower max_batch$",
                     err.strip().splitlines()[-1])
