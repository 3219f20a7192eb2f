"""One request cannot take others down: knobs the engine cannot batch are refused where they
enter (library, CLI, HTTP 400); a row that still fails in the batched sampling call fails alone;
a step never raises, so neither `generate`'s loop, the server's worker thread nor the engine
process dies of one bad row. And OpenAI's seed range: a negative int64 seed is a seed."""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest

import gpt1
from gpt1.core.errors import Gpt1Error
from gpt1.core.sampling_params import SamplingParams
from gpt1.inference.engine import Engine
from gpt1.inference.generate import generate
from gpt1.serve import background_server, create_app
from tests.test_battery import assert_one_clear_line, run_main
from tests.test_serve_api import endless_model_dir


@pytest.fixture(scope="module")
def long_llm(tiny_config, tokenizer, tmp_path_factory):
    return gpt1.load(endless_model_dir(tiny_config, tokenizer, tmp_path_factory.mktemp("endless")), device="cpu")


# ---- knobs the engine cannot hold are refused where they enter --------------------------------
@pytest.mark.parametrize("knobs,message", [
    ({"top_k": 2**63}, "top_k must be less than 2**63 (any value >= the vocabulary size keeps every token), "
                       "got 9223372036854775808"),
    ({"repeat_last_n": 2**63, "repeat_penalty": 1.1}, "repeat_last_n must be less than 2**63 (-1 is the whole "
                                                      "context), got 9223372036854775808"),
])
def test_int64_overflowing_knobs_are_one_clear_error(llm, knobs, message):
    with pytest.raises(Gpt1Error) as e:
        llm.generate("a", max_new_tokens=3, **knobs)
    assert str(e.value) == message


def test_the_largest_int64_knobs_mean_all(llm):
    """2**63 - 1 is accepted, and means what any value from the vocabulary / the context up means."""
    most = SamplingParams(temperature=0.9, seed=5, max_new_tokens=6, top_k=2**63 - 1, repeat_last_n=2**63 - 1,
                          repeat_penalty=1.3)
    every = dataclasses.replace(most, top_k=llm.config.vocab_size, repeat_last_n=-1)
    ids = llm.tokenizer.encode("import json")
    assert generate(llm.model, llm.tokenizer, ids, most).text == generate(llm.model, llm.tokenizer, ids, every).text


def test_cli_top_k_over_int64_is_one_clear_line(tiny_model_dir, capsys):
    assert_one_clear_line(*run_main(capsys, "generate", "--model", tiny_model_dir, "--prompt", "a",
                                    "--top-k", str(2**63)), r"top_k must be less than 2\*\*63")


# ---- a failing row fails alone ---------------------------------------------------------------
def _collect(n: int):
    outputs = {i: [] for i in range(n)}
    return outputs, lambda i: outputs[i].append


def _text(items: list) -> str:
    return "".join(c.text for c in items)


def test_a_row_whose_knobs_fail_in_the_batched_sampling_call_fails_alone(llm):
    """The engine's contract: an exception while handling one row ends that request, the others
    go on. A knob `validate()` now refuses stands in for any knob that fails in the batched call."""
    params = SamplingParams(temperature=0.9, seed=3, max_new_tokens=8)
    prompts = [llm.tokenizer.encode("def f("), llm.tokenizer.encode("import"), llm.tokenizer.encode("class A:")]
    alone = [generate(llm.model, llm.tokenizer, p, params).text for p in prompts]
    engine = Engine(llm.model, llm.tokenizer, max_batch=4, cuda_graphs=False)
    outputs, sink_for = _collect(3)
    requests = engine.submit(prompts, params, sink_for)
    requests[1].params = dataclasses.replace(params, top_k=None)  # past validation, as a bug would let it
    while engine.busy:
        engine.step()
    assert isinstance(outputs[1][-1], TypeError)
    for i in (0, 2):  # the same text as alone: their seeded draws were not disturbed by the retry
        assert outputs[i][-1].finish_reason in ("stop", "length")
        assert _text(outputs[i]) == alone[i]
    assert engine.stats.failed == 1 and engine.stats.completed == 2


def test_a_step_never_raises_an_error_outside_any_row(llm):
    """An error that no row's own handling catches (here: a prompt longer than its slot, which
    `submit` refuses, planted afterwards) fails the rows of that step; `step()` returns, and the
    engine serves the next request. The engine process's loop calls `step()` with no guard of its own."""
    params = SamplingParams(temperature=0, max_new_tokens=4)
    engine = Engine(llm.model, llm.tokenizer, max_batch=1, cuda_graphs=False)
    outputs, sink_for = _collect(2)
    requests = engine.submit([[5, 6], [7, 8]], params, sink_for)
    requests[0].prompt_ids = list(range(llm.config.block_size + 1))
    while engine.busy:
        engine.step()
    assert isinstance(outputs[0][-1], RuntimeError)
    assert outputs[1][-1].finish_reason in ("stop", "length")
    assert _text(outputs[1]) == generate(llm.model, llm.tokenizer, [7, 8], params).text


# ---- through a real server, both engines ---------------------------------------------------------
@pytest.mark.parametrize("engine_kind", ["thread", "process"])
def test_a_bad_request_beside_a_stream_is_a_400_and_the_stream_goes_on(long_llm, engine_kind):
    """Before: the thread engine failed the innocent stream with the bad request's 500, and the
    process engine's child died (every later request a 503)."""
    app = create_app(long_llm, engine=engine_kind)
    innocent = {"prompt": "def f():", "max_tokens": 300, "temperature": 0.8, "seed": 1, "stream": True}
    bad = [{"top_k": 2**63}, {"repeat_last_n": 2**63, "repeat_penalty": 1.1}]
    with background_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=innocent) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")  # generating
            for knobs in bad:
                r = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 5, **knobs})
                assert r.status_code == 400, r.text
                assert r.json()["error"]["param"] == next(iter(knobs))
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert "error" not in events[-1] and events[-1]["choices"][0]["finish_reason"] == "length"
        assert http.get("/health").status_code == 200
        assert http.post("/v1/completions", json={"prompt": "a", "max_tokens": 3}).status_code == 200


# ---- OpenAI's seed is an int64 -------------------------------------------------------------------
def test_negative_seeds_are_seeds_modulo_2_64(llm):
    assert SamplingParams(seed=-1).validate().seed == 2**64 - 1
    assert SamplingParams(seed=-2**63).validate().seed == 2**63
    for seed in (-2**63 - 1, 2**64):
        with pytest.raises(Gpt1Error, match=r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"):
            SamplingParams(seed=seed).validate()
    knobs = dict(temperature=1.0, max_new_tokens=8)
    assert llm.generate("a", seed=-5, **knobs) == llm.generate("a", seed=2**64 - 5, **knobs)
    with background_server(create_app(llm)) as url:
        texts = [httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 8, "temperature": 1.0,
                                                           "seed": seed}, timeout=30).json() for seed in (-1, 2**64 - 1)]
    assert all("choices" in t for t in texts), texts
    assert texts[0]["choices"][0]["text"] == texts[1]["choices"][0]["text"]
