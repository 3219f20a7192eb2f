"""Faults injected into a real engine on a real model (the chaos tester's pass 16): a fault in
one request ends that request alone, with its error, and the others give the tokens they would
have alone; a fault that ends the engine's worker ends every request with a 503, never a wait
forever; and both engines answer a request's failure with the same status and message."""

from __future__ import annotations

import errno
import json
import re
import textwrap
import traceback

import httpx
import pytest
import torch

import gpt1
import gpt1.inference.engine as engine_module
from gpt1.core.sampling_params import SamplingParams
from gpt1.inference.decoding import TextState
from gpt1.inference.engine import Engine, EngineUnavailable
from gpt1.inference.engine_process import _described, _rebuild
from gpt1.inference.generate import generate
from gpt1.serve import background_server, create_app
from tests.test_engine_process import Outputs
from tests.test_serve_api import endless_model_dir, wait_for

PROMPTS = ["def f(", "import json", "class A:"]
SEEDED = [SamplingParams(temperature=0.9, seed=seed, max_new_tokens=10) for seed in (1, 2, 3)]


@pytest.fixture(scope="module")
def llm(tiny_config, tokenizer, tmp_path_factory):
    """Replies that run to max_tokens (no special token is ever sampled)."""
    return gpt1.load(endless_model_dir(tiny_config, tokenizer, tmp_path_factory.mktemp("endless"), block_size=256),
                     device="cpu")


def prompt_ids(llm) -> list[list[int]]:
    return [llm.tokenizer.encode(p) for p in PROMPTS]


def alone(llm, ids: list[int], params: SamplingParams) -> str:
    return generate(llm.model, llm.tokenizer, ids, params).text


def run(engine: Engine, on_step=None) -> None:
    """Step the engine until it is idle; `on_step(n)` before step n."""
    n = 0
    while engine.busy:
        if on_step is not None:
            on_step(n)
        engine.step()
        n += 1


def assert_alone(llm, outputs: Outputs, rows, ids, params) -> None:
    """Each of `rows` ended "length" with the text it gives alone."""
    for i in rows:
        assert outputs.items[i][-1].finish_reason == "length", outputs.items[i][-1]
        assert outputs.text(i) == alone(llm, ids[i], params[i]), i


def client(url: str) -> httpx.Client:
    """A connection per request: uvicorn drops the connection of a request whose error the app
    raised on after answering it (a 500, and for now a 503 from `submit`), and a kept-alive
    client's next request on it was reset."""
    return httpx.Client(base_url=url, timeout=60, headers={"Connection": "close"})


class Panic(BaseException):
    """What pyo3's PanicException is (a Rust panic in the tokenizer): a BaseException, no Exception."""


# ---- the worker thread never dies without a word -----------------------------------------------
def test_a_panic_in_one_rows_text_fails_that_row_and_the_worker_goes_on(llm, monkeypatch):
    """Before: the BaseException ended the worker thread; every request waited forever while the
    engine said it was alive (and /health 200)."""
    real_add = TextState.add

    def add(self, token_id):
        if getattr(self, "victim", False) and self.completion_tokens == 2:
            raise Panic("injected: the tokenizer panicked")
        return real_add(self, token_id)

    monkeypatch.setattr(TextState, "add", add)
    engine, ids, outputs = Engine(llm.model, llm.tokenizer, max_batch=4, cuda_graphs=False), prompt_ids(llm), Outputs(3)
    requests = engine.submit(ids, SEEDED, outputs.sink_for())
    requests[1].state.victim = True
    with engine:  # its worker thread
        outputs.wait(timeout=20)
        assert isinstance(outputs.items[1][-1], Panic)
        assert_alone(llm, outputs, (0, 2), ids, SEEDED)
        assert engine.alive and not engine.died
        again = Outputs(1)
        engine.submit([ids[1]], SEEDED[1], again.sink_for())
        again.wait(timeout=20)
        assert again.text(0) == alone(llm, ids[1], SEEDED[1])


# The worker thread ends with the exit, which pytest reports (threading itself says nothing of a SystemExit).
ENDS_THE_WORKER = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


@ENDS_THE_WORKER
def test_an_exit_that_ends_the_worker_ends_every_request_with_a_503(llm, monkeypatch):
    """An exit (here SystemExit, from a library calling sys.exit) ends the worker thread as it
    asks; the requests it held, generating or waiting, end with engine_unavailable rather than
    wait forever, the engine is no longer alive (/health 503) and refuses what comes next."""
    real_add = TextState.add

    def add(self, token_id):
        if getattr(self, "victim", False):
            raise SystemExit(3)
        return real_add(self, token_id)

    monkeypatch.setattr(TextState, "add", add)
    engine, ids, outputs = Engine(llm.model, llm.tokenizer, max_batch=2, cuda_graphs=False), prompt_ids(llm), Outputs(3)
    requests = engine.submit(ids, SEEDED, outputs.sink_for())  # the third waits for a slot
    requests[0].state.victim = True
    engine.start()
    try:
        outputs.wait(timeout=20)
        for i in range(3):
            assert isinstance(outputs.items[i][-1], EngineUnavailable)
            assert str(outputs.items[i][-1]) == "the engine stopped: SystemExit: 3"
        wait_for(lambda: engine.died, what="died")
        assert not engine.alive and engine.stats.failed == 3
        with pytest.raises(EngineUnavailable, match="the engine stopped: SystemExit: 3"):
            engine.submit([ids[0]], SEEDED[0], outputs.sink_for())
        with pytest.raises(EngineUnavailable, match="the engine stopped"):
            engine.start()  # not brought back by a restart of its worker: stop it, make another
    finally:
        engine.stop()


@ENDS_THE_WORKER
def test_a_server_whose_engine_worker_ended_answers_503(llm, monkeypatch):
    real_add = TextState.add

    def add(self, token_id):
        if self.prompt_tokens == 7:
            raise SystemExit(3)
        return real_add(self, token_id)

    monkeypatch.setattr(TextState, "add", add)
    app = create_app(llm, max_batch=2)
    with background_server(app) as url, client(url) as http:
        r = http.post("/v1/completions", json={"prompt": list(range(10, 17)), "max_tokens": 5})
        assert r.status_code == 503, r.text
        assert r.json()["error"] == {"message": "the engine stopped: SystemExit: 3", "type": "server_error",
                                     "param": None, "code": "engine_unavailable"}
        assert not app.state.engine.alive  # what /health answers 503 on


# ---- a seeded row draws what it would have --------------------------------------------------------
@pytest.mark.parametrize("fault", ["the batched call fails once", "one row's draw fails"])
def test_seeded_rows_draw_what_they_would_alone_when_a_sampling_call_fails(llm, monkeypatch, fault):
    """Before: the failed batched call had drawn from the seeded rows' generators, and their
    row-by-row retry drew the next numbers: other text, without an error."""
    engine, ids, outputs = Engine(llm.model, llm.tokenizer, max_batch=4, cuda_graphs=False), prompt_ids(llm), Outputs(3)
    requests = engine.submit(ids, SEEDED, outputs.sink_for())
    armed = {"on": False}
    if fault == "the batched call fails once":  # after every row drew: a transient error
        real_searchsorted = torch.searchsorted

        def searchsorted(*args, **kwargs):
            if armed["on"]:
                armed["on"] = False
                raise RuntimeError("injected: a transient failure")
            return real_searchsorted(*args, **kwargs)

        monkeypatch.setattr(torch, "searchsorted", searchsorted)
    else:  # row 1's draw, after row 0 drew
        real_rand = torch.rand

        def rand(*args, generator=None, **kwargs):
            if armed["on"] and generator is requests[1].generator:
                raise RuntimeError("injected: row 1's generator failed")
            return real_rand(*args, generator=generator, **kwargs)

        monkeypatch.setattr(torch, "rand", rand)

    def on_step(n):
        armed["on"] = n == 4

    run(engine, on_step)
    if fault == "one row's draw fails":
        assert str(outputs.items[1][-1]) == "injected: row 1's generator failed"
        assert_alone(llm, outputs, (0, 2), ids, SEEDED)
    else:
        assert_alone(llm, outputs, (0, 1, 2), ids, SEEDED)


# ---- a fault of one request ends it alone ------------------------------------------------------------
@pytest.mark.parametrize("where", ["generating", "waiting"])
def test_a_cancelled_requests_failing_flush_ends_it_alone(llm, monkeypatch, where):
    """Before: the error of a cancelled row's final flush failed every row in the batch; one
    cancelled while it waited also left its own sink without a word."""
    real_finish = TextState.finish

    def finish(self, reason):
        if reason == "cancelled" and getattr(self, "victim", False):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return real_finish(self, reason)

    monkeypatch.setattr(TextState, "finish", finish)
    max_batch = 2 if where == "waiting" else 4  # the third request waits for a slot
    engine, ids, outputs = Engine(llm.model, llm.tokenizer, max_batch=max_batch, cuda_graphs=False), prompt_ids(llm), \
        Outputs(3)
    requests = engine.submit(ids, SEEDED, outputs.sink_for())
    requests[2].state.victim = True

    def on_step(n):
        if n == 3:
            requests[2].cancel()

    run(engine, on_step)
    assert isinstance(outputs.items[2][-1], UnicodeDecodeError)
    assert_alone(llm, outputs, (0, 1), ids, SEEDED)
    assert engine.stats.failed == 1 and engine.stats.completed == 2


def test_a_memory_error_admitting_one_request_fails_it_alone(llm, monkeypatch):
    """Before: the MemoryError of one request's admission failed every row already generating."""
    engine, ids, outputs = Engine(llm.model, llm.tokenizer, max_batch=4, cuda_graphs=False), prompt_ids(llm), Outputs(3)
    engine.submit(ids[:2], SEEDED[:2], outputs.sink_for())
    victim = {}
    real_tensor = torch.tensor

    def tensor(data, *args, **kwargs):
        if data is victim.get("ids"):
            raise MemoryError
        return real_tensor(data, *args, **kwargs)

    monkeypatch.setattr(torch, "tensor", tensor)

    def on_step(n):
        if n == 3:  # arrives while the others generate
            request, = engine.submit([ids[2]], SEEDED[2], outputs.sink_for(2))
            victim["ids"] = request.prompt_ids

    run(engine, on_step)
    assert isinstance(outputs.items[2][-1], MemoryError)
    assert_alone(llm, outputs, (0, 1), ids, SEEDED)


# ---- both engines answer a request's failure alike -------------------------------------------------
# Fails one request by its prompt's length, at its second token, in this process (the thread
# engine) or, through sitecustomize, in the engine process's child.
ROW_FAULTS = textwrap.dedent("""
    import errno

    import torch

    from gpt1.inference.decoding import TextState


    def faulty(add):
        def faulty_add(self, token_id):
            if self.completion_tokens == 1:
                fault = {3: lambda: ValueError("injected"),
                         4: lambda: OSError(errno.ENOMEM, "Cannot allocate memory"),
                         5: lambda: MemoryError(),
                         6: lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")}
                if self.prompt_tokens in fault:
                    raise fault[self.prompt_tokens]()
            return add(self, token_id)
        return faulty_add
""")
SHORT_OF_MEMORY = {"message": "the server is short of memory for the moment; retry later", "type": "server_error",
                   "param": None, "code": "server_overloaded"}
ANSWERS = {
    3: (500, {"message": "generation failed: ValueError: injected", "type": "server_error", "param": None,
              "code": None}),
    4: (503, SHORT_OF_MEMORY),  # OSError(ENOMEM)
    5: (503, SHORT_OF_MEMORY),  # MemoryError: it was a 500, "generation failed: MemoryError: "
    6: (503, {**SHORT_OF_MEMORY, "message": "the server is short of GPU memory for the moment; retry later"}),
}


@pytest.fixture(scope="module")
def row_faults_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("row-faults")
    (folder / "gpt1_row_faults.py").write_text(ROW_FAULTS)
    (folder / "sitecustomize.py").write_text("import gpt1_row_faults\nfrom gpt1.inference.decoding import TextState\n"
                                             "TextState.add = gpt1_row_faults.faulty(TextState.add)\n")
    return folder


@pytest.mark.parametrize("engine_kind", ["thread", "process"])
def test_a_requests_failure_is_answered_alike_by_both_engines(llm, monkeypatch, row_faults_dir, engine_kind):
    """Before: the process engine rebuilt every error as a RuntimeError (ENOMEM: a 500, not the
    503 to retry; "RuntimeError: ValueError: ..."), and a MemoryError was a 500 with either."""
    monkeypatch.syspath_prepend(str(row_faults_dir))
    import gpt1_row_faults

    if engine_kind == "process":
        monkeypatch.setenv("PYTHONPATH", str(row_faults_dir))  # the child's sitecustomize
    else:
        monkeypatch.setattr(TextState, "add", gpt1_row_faults.faulty(TextState.add))
    app = create_app(llm, max_batch=4, engine=engine_kind)
    with background_server(app) as url, client(url) as http:
        for length, (status, error) in ANSWERS.items():
            r = http.post("/v1/completions", json={"prompt": list(range(10, 10 + length)), "max_tokens": 5})
            assert (r.status_code, r.json()["error"]) == (status, error), length
            assert r.headers.get("retry-after") == ("1" if status == 503 else None)
        r = http.post("/v1/completions", json={"prompt": list(range(10, 18)), "max_tokens": 5})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_a_submission_short_of_memory_is_a_503_counted_as_rejected(llm, monkeypatch):
    """Before: a 500 with an empty message ("generation failed: MemoryError: "), counted nowhere."""
    real_generator, failures = engine_module._generator, [MemoryError()]

    def generator(seed):
        if failures:
            raise failures.pop()
        return real_generator(seed)

    monkeypatch.setattr(engine_module, "_generator", generator)
    app = create_app(llm, max_batch=2)
    with background_server(app) as url, client(url) as http:
        r = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 3, "temperature": 0.8, "seed": 1})
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"] == SHORT_OF_MEMORY
        metrics = http.get("/metrics").text
        assert re.search(r'gpt1_requests_finished_total\{[^}]*outcome="rejected"\} 1\n', metrics), metrics
        assert re.search(r"gpt1_requests_submitted_total\{[^}]*\} 0\n", metrics), metrics
        assert http.post("/v1/completions", json={"prompt": "a", "max_tokens": 3}).status_code == 200


def test_the_engine_process_sends_where_a_fault_was_raised():
    """The server logs a fault's traceback once per place; from the process engine that traceback
    held only the parent's reader thread, nothing of the child's code that raised."""
    def decode_step():
        raise RuntimeError("index out of range in self")

    try:
        decode_step()
    except RuntimeError as e:
        error = e
    rebuilt = _rebuild(*json.loads(json.dumps(_described(error))))
    assert type(rebuilt).__name__ == "RuntimeError" and str(rebuilt) == "index out of range in self"
    logged = "".join(traceback.format_exception(rebuilt))
    assert "raised in the engine process:" in logged and ", in decode_step\n" in logged, logged
    never_raised = _rebuild(*_described(EngineUnavailable("stopping")))  # handed to its sink: no traceback
    assert not getattr(never_raised, "__notes__", None)


def test_the_engine_process_rebuilds_a_requests_error_as_its_own_type():
    """What crosses the pipe (JSON) and what the parent makes of it."""
    def crossed(error):
        return _rebuild(*json.loads(json.dumps(_described(error))))

    enomem = crossed(OSError(errno.ENOMEM, "Cannot allocate memory"))
    assert type(enomem) is OSError and enomem.errno == errno.ENOMEM and str(enomem) == "[Errno 12] Cannot allocate memory"
    assert type(crossed(FileNotFoundError(errno.ENOENT, "No such file or directory"))) is FileNotFoundError
    assert type(crossed(EngineUnavailable("the server is shutting down"))) is EngineUnavailable
    unicode = crossed(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"))  # takes five arguments
    assert type(unicode).__name__ == "UnicodeDecodeError" and isinstance(unicode, RuntimeError)
    assert str(unicode) == "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"
    panic = crossed(Panic("a Rust panic"))  # no Exception in the child: one here, which the server answers
    assert type(panic).__name__ == "Panic" and isinstance(panic, Exception)
