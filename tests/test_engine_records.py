"""What the engines report about failed generations (the observability tester's pass 16): a model
whose logits overflow is the server's fault (500), not the client's (400), with either engine; a
row that failed gives no token to the token counts and tokens/s; and an engine reports itself up
only while it runs."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

import gpt1
from gpt1.core.errors import Gpt1Error
from gpt1.core.sampling_params import SamplingParams
from gpt1.formats.modeldir import save_model
from gpt1.inference.engine import Engine
from gpt1.inference.engine_process import EngineProcess
from gpt1.serve import create_app
from gpt1.serve.errors import generation_error
from tests.model_factories import model_without_stops
from tests.test_engine_process import Outputs

PROMPTS = [[5, 6, 7], [8, 9], [10]]
OVERFLOW = ("the model's next-token logits are NaN or infinite (running in float32); its weights or adapter make "
            "the forward pass overflow")


@pytest.fixture(scope="module")
def overflowing_dir(tiny_config, tokenizer, tmp_path_factory):
    """A model whose weights are finite (it loads) but whose every forward overflows float32, as a
    float16 model that overflows does: the final LayerNorm's bias of 3e38 makes the logits inf and NaN."""
    model = model_without_stops(tiny_config, tokenizer, seed=1)
    with torch.no_grad():
        model.transformer.ln_f.bias.fill_(3e38)
    return save_model(tmp_path_factory.mktemp("overflowing"), model, tokenizer)


@pytest.fixture(scope="module")
def overflowing(overflowing_dir):
    return gpt1.load(overflowing_dir, device="cpu")


@pytest.fixture(scope="module")
def process_engine(overflowing):
    """The overflowing model in an engine process (started once: a child loads torch in seconds)."""
    with EngineProcess(overflowing.path, overflowing.tokenizer, overflowing.config, device="cpu",
                       max_batch=4) as engine:
        yield engine


def generate_all(engine, params: SamplingParams | list[SamplingParams]) -> Outputs:
    """Submit PROMPTS and wait until each has ended: stepped here (an `Engine`), or by the child."""
    outputs = Outputs(len(PROMPTS))
    engine.submit(PROMPTS, params, outputs.sink_for())
    if isinstance(engine, Engine):
        while engine.busy:
            engine.step()
    outputs.wait(timeout=30)
    return outputs


@pytest.fixture(params=["thread", "process"])
def overflowing_engine(request, overflowing):
    if request.param == "process":
        return request.getfixturevalue("process_engine")
    return Engine(overflowing.model, overflowing.tokenizer, max_batch=4, cuda_graphs=False)


# ---- a model's fault is no bad request ----------------------------------------------------------
def test_logits_that_overflow_are_the_servers_fault_with_either_engine(overflowing_engine):
    """Every request failed with 400 invalid_request_error, the client blamed for the model's
    overflow (the process engine's rebuilt error was a plain Gpt1Error too)."""
    outputs = generate_all(overflowing_engine, SamplingParams(temperature=0.8, seed=1, max_new_tokens=5))
    for i in range(len(PROMPTS)):
        [error] = outputs.items[i]
        assert isinstance(error, Gpt1Error) and str(error) == OVERFLOW  # the CLI and the Python API: one line
        api = generation_error(error)
        assert (api.status, api.body()["error"]) == (500, {"message": f"generation failed: {OVERFLOW}",
                                                          "type": "server_error", "param": None, "code": None})



# ---- only tokens given to a request are counted ---------------------------------------------------
def test_requests_that_fail_generate_no_tokens_with_either_engine(overflowing_engine):
    """6 requests that failed without a token showed gpt1_generation_tokens_total 6 and 0.6 tokens/s:
    each failed row's step counted a token."""
    failed = overflowing_engine.stats.failed
    generate_all(overflowing_engine, SamplingParams(temperature=0, max_new_tokens=5))
    assert overflowing_engine.stats.failed == failed + len(PROMPTS)
    assert overflowing_engine.stats.tokens == 0 and overflowing_engine.tokens_per_s == 0.0


def test_a_batch_counts_the_tokens_of_its_rows_that_went_on(tiny_config, tokenizer, monkeypatch):
    """Beside two rows that generate, one whose logits are NaN and one whose sampling fails: only
    the healthy rows' tokens count, those equal to their replies' completion tokens."""
    model = model_without_stops(tiny_config, tokenizer, seed=1)  # every reply runs to max_new_tokens
    with torch.no_grad():
        model.transformer.wte.weight[PROMPTS[0][0]] = float("nan")  # prompt 0's logits are NaN
    engine = Engine(model, tokenizer, max_batch=4, cuda_graphs=False)
    prompts = [*PROMPTS, [11, 12]]
    outputs = Outputs(len(prompts))
    requests = engine.submit(prompts, [SamplingParams(temperature=0.8, seed=i, max_new_tokens=6) for i in range(4)],
                             outputs.sink_for())
    real_rand = torch.rand

    def rand(*args, generator=None, **kwargs):  # prompt 1's draws fail, alone (the batch is retried row by row)
        if generator is requests[1].generator:
            raise RuntimeError("injected: this row's sampling failed")
        return real_rand(*args, generator=generator, **kwargs)

    monkeypatch.setattr(torch, "rand", rand)
    while engine.busy:
        engine.step()
    assert str(outputs.items[0][-1]).startswith("the model's next-token logits are NaN or infinite")
    assert str(outputs.items[1][-1]) == "injected: this row's sampling failed"
    assert [outputs.items[i][-1].completion_tokens for i in (2, 3)] == [6, 6]
    assert engine.stats.tokens == 12 and engine.stats.failed == 2
    assert engine.tokens_per_s == pytest.approx(12 / 10)  # the tokens of the last 10 s


# ---- up only while it runs ----------------------------------------------------------------------------
def _engine_up(client: TestClient) -> float:
    [line] = [line for line in client.get("/metrics").text.splitlines() if line.startswith("gpt1_engine_up")]
    return float(line.rsplit(" ", 1)[1])


def test_a_thread_engine_is_up_only_while_its_worker_runs(tiny_model_dir):
    """A mounted app whose lifespan never ran reported gpt1_engine_up 1 for an engine that had not
    started (the process engine: 0): `alive` was True from the engine's creation."""
    llm = gpt1.load(tiny_model_dir, device="cpu")
    app = create_app(llm, max_batch=2)
    client = TestClient(app)  # without `with`: no lifespan, nothing started
    try:
        assert app.state.engine._thread is None
        assert _engine_up(client) == 0  # /metrics starts nothing
        assert client.get("/health").json()["status"] == "ok"  # which starts the engine
        assert _engine_up(client) == 1
    finally:
        app.state.engine.stop()
    assert _engine_up(client) == 0


def test_an_engine_stepped_by_its_caller_is_not_alive_yet_generates(tiny_model_dir):
    """The Python API's way (`generate`): no worker thread, so not alive, and submissions are taken
    all the same; with a worker it is alive until stop()."""
    llm = gpt1.load(tiny_model_dir, device="cpu")
    engine = Engine(llm.model, llm.tokenizer, max_batch=2, cuda_graphs=False)
    assert not engine.alive
    outputs = generate_all(engine, SamplingParams(temperature=0, max_new_tokens=3))
    assert all(outputs.items[i][-1].finish_reason is not None for i in range(len(PROMPTS)))
    with engine:
        assert engine.alive
    assert not engine.alive
    with pytest.raises(Gpt1Error, match="shutting down"):
        engine.submit([[5]], SamplingParams(), outputs.sink_for())



def test_requests_the_engine_ends_at_stop_are_failed_not_cancelled(tiny_model_dir):
    """Nobody cancelled them: stop() ends them with an error, which EngineStats and /metrics count as
    failed, as a dying worker's already were (stop counted them as cancelled, "a client disconnect")."""
    llm = gpt1.load(tiny_model_dir, device="cpu")
    engine = Engine(llm.model, llm.tokenizer, max_batch=2, cuda_graphs=False)
    outputs = Outputs(len(PROMPTS))
    engine.submit(PROMPTS, SamplingParams(max_new_tokens=4), outputs.sink_for())  # never stepped
    engine.stop()
    assert [type(outputs.items[i][-1]).__name__ for i in range(len(PROMPTS))] == ["EngineUnavailable"] * 3
    assert (engine.stats.failed, engine.stats.cancelled, engine.stats.completed) == (3, 0, 0)
