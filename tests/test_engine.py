"""The batching engine: batched output equals single-request output whatever the arrival times,
prompt lengths and chunked prefill; seeds hold across batch compositions; slots are freed and
reused; one failing request leaves the others running; validation happens before the batch."""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import gpt1.inference.engine as engine_module
from gpt1.core.errors import Gpt1Error
from gpt1.core.sampling_params import SamplingParams
from gpt1.core.threads import ThreadTuner
from gpt1.inference.decoding import Chunk
from gpt1.inference.engine import Engine, QueueFull, TooLarge, _BucketedDecode, _unless_not_finite, kv_cache_bytes
from gpt1.inference.generate import generate
from gpt1.inference.llm import LLM
from tests.model_factories import model_without_stops

TEXT = "def parse(self, data):\n    return json.loads(data)\n" * 3


@pytest.fixture(scope="module")
def model(tiny_config, tokenizer):
    return model_without_stops(tiny_config, tokenizer, seed=11)


class Collector:
    """Sinks that keep each request's chunks (or the error that ended it)."""

    def __init__(self):
        self.chunks: dict[int, list[Chunk]] = {}
        self.errors: dict[int, BaseException] = {}

    def sink_for(self, key: int):
        def sink(item):
            if isinstance(item, BaseException):
                self.errors[key] = item
            else:
                self.chunks.setdefault(key, []).append(item)
        return sink

    def text(self, key: int) -> str:
        return "".join(c.text for c in self.chunks[key])

    def finish(self, key: int) -> str | None:
        return self.chunks[key][-1].finish_reason if key in self.chunks else None


def run_until_idle(engine: Engine, limit: int = 10_000) -> None:
    for _ in range(limit):
        if not engine.busy:
            return
        engine.step()
    pytest.fail("the engine did not finish")


def submit(engine: Engine, collector: Collector, key: int, prompt: list[int], params: SamplingParams):
    return engine.submit([prompt], params, lambda _: collector.sink_for(key))[0]


def check_staggered_arrivals(model, tokenizer, bucketed: bool = False, **engine_options) -> None:
    """Greedy, fp32: requests of different lengths arriving at different steps, long prompts
    prefilled in chunks of 8 while others decode, each equal to its run alone."""
    ids = tokenizer.encode(TEXT)
    prompts = [ids[:3], ids[4:30], ids[:1], ids[10:50], ids[7:12], ids[2:21]]
    arrivals = [0, 0, 2, 3, 3, 7]  # the step at which each request arrives
    lengths = [12, 9, 20, 6, 14, 10]
    engine = Engine(model, tokenizer, max_batch=4, max_queue=8, prefill_chunk=8, **engine_options)
    if bucketed:
        engine._graphs = _BucketedDecode(engine, capture=False)
    if engine_options.get("compile"):
        assert engine._graphs is not None and engine._graphs.compile
    collector = Collector()
    step = 0
    while step <= max(arrivals) or engine.busy:
        for key, arrival in enumerate(arrivals):
            if arrival == step:
                submit(engine, collector, key, prompts[key], SamplingParams(temperature=0, max_new_tokens=lengths[key]))
        engine.step()
        step += 1
    for key, prompt in enumerate(prompts):
        alone = generate(model, tokenizer, prompt, SamplingParams(temperature=0, max_new_tokens=lengths[key]))
        assert collector.text(key) == alone.text and collector.finish(key) == "length"
        assert collector.chunks[key][-1].completion_tokens == lengths[key]
    assert engine.free_slots == 4 and engine.stats.completed == len(prompts)


@pytest.mark.slow
def test_staggered_arrivals_and_chunked_prefill_equal_single_requests(model, tokenizer):
    check_staggered_arrivals(model, tokenizer)


def test_bucketed_decode_equals_single_requests(model, tokenizer):
    """The fixed-shape decode step that CUDA graphs capture, run eagerly on the CPU: buckets of
    1, 2 and 4 rows, their padding rows beside prompts being prefilled."""
    check_staggered_arrivals(model, tokenizer, bucketed=True)


def test_warm_up_builds_every_bucket_before_the_first_request(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=6, max_queue=2)
    engine._graphs = _BucketedDecode(engine, capture=False)
    engine.warm_up()
    assert sorted(engine._graphs.buckets) == [1, 2, 4, 6]
    check = Collector()
    submit(engine, check, 0, tokenizer.encode(TEXT)[:5], SamplingParams(temperature=0, max_new_tokens=4))
    run_until_idle(engine)
    alone = generate(model, tokenizer, tokenizer.encode(TEXT)[:5], SamplingParams(temperature=0, max_new_tokens=4))
    assert check.text(0) == alone.text  # the warm-up's writes at the slots' last position are harmless


def test_bucketed_decode_leaves_a_prompt_being_prefilled_intact(model, tokenizer):
    """A decode bucket wider than its live rows pads them: the padding must not write inside a
    slot whose prompt is being prefilled in chunks (its keys must equal the eager engine's)."""
    ids = tokenizer.encode(TEXT)
    engines = [Engine(model, tokenizer, max_batch=4, max_queue=4, prefill_chunk=4) for _ in range(2)]
    engines[1]._graphs = _BucketedDecode(engines[1], capture=False)
    params = SamplingParams(temperature=0, max_new_tokens=30)
    for engine in engines:
        engine.submit([ids[:1], ids[1:2], ids[2:3]], params, lambda i: lambda item: None)
        engine.step()
        engine.step()  # three rows decoding: a bucket of 4 with one padding row
        engine.submit([ids[5:29]], params, lambda i: lambda item: None)  # slot 3, prefilled 4 tokens a step
    for _ in range(5):
        for engine in engines:
            engine.step()
        prefilled = engines[0]._rows[3].length
        assert engines[1]._rows[3].length == prefilled and 0 < prefilled < 24
        assert torch.equal(engines[0].cache.k[:, 3, :, :prefilled], engines[1].cache.k[:, 3, :, :prefilled])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_equals_single_requests(model, tokenizer):
    """The captured decode step (buckets of 1, 2 and 4 rows, padding rows beside prompts being
    prefilled) against eager one-request generation on the same GPU."""
    gpu_model = copy.deepcopy(model).cuda()
    check_staggered_arrivals(gpu_model, tokenizer, cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_cuda_graph_decode_equals_single_requests(model, tokenizer):
    gpu_model = copy.deepcopy(model).cuda()
    check_staggered_arrivals(gpu_model, tokenizer, cuda_graphs=True, compile=True)


@pytest.mark.slow
def test_compiled_decode_equals_single_requests(model, tokenizer):
    """`compile=True` on the CPU: each bucket's decode step compiled by torch.compile (buckets of
    1, 2 and 4 rows, padding rows beside prompts being prefilled), greedy as single requests."""
    torch._dynamo.reset()
    check_staggered_arrivals(model, tokenizer, compile=True)


@pytest.mark.slow
def test_a_failing_compile_decodes_eagerly_with_one_warning(tiny_model_dir, tmp_path):
    """Inductor's C++ build fails for real (no compiler: Windows without MSVC, a Mac without
    Xcode's tools): the engine warns once and decodes eagerly, greedy as single requests. `gpt1
    serve --compile` printed a 100-line traceback after "serving ... on http://" and exited."""
    script = ("import sys, gpt1\nfrom tests.test_engine import check_staggered_arrivals\n"
              "from tests.model_factories import model_without_stops\nllm = gpt1.load(sys.argv[1])\n"
              "model = model_without_stops(llm.config, llm.tokenizer, seed=11)\n"
              "check_staggered_arrivals(model, llm.tokenizer, compile=True)\n")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("torch.compile failed") == 1, proc.stderr[-3000:]
    assert "the engine decodes without it" in proc.stderr and "Traceback" not in proc.stderr


def test_seeded_request_is_the_same_whatever_shares_the_batch(model, tokenizer):
    ids = tokenizer.encode(TEXT)
    seeded = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, max_new_tokens=16, seed=1234)
    alone = generate(model, tokenizer, ids[:6], seeded).text
    companions = [
        [],
        [(ids[3:20], SamplingParams(temperature=0, max_new_tokens=5))],
        [(ids[:2], SamplingParams(temperature=1.5, min_p=0.05, max_new_tokens=30, seed=1)),
         (ids[9:40], SamplingParams(temperature=0.7, repeat_penalty=1.3, repeat_last_n=-1, max_new_tokens=8)),
         (ids[1:5], SamplingParams(temperature=1.0, max_new_tokens=20))],
    ]
    for others in companions:
        engine = Engine(model, tokenizer, max_batch=4, max_queue=4, prefill_chunk=16)
        collector = Collector()
        for key, (prompt, params) in enumerate(others, start=1):
            submit(engine, collector, key, prompt, params)
        engine.step()  # the seeded request joins a batch already running
        submit(engine, collector, 0, ids[:6], seeded)
        run_until_idle(engine)
        assert collector.text(0) == alone


MIXED_KNOBS = [  # every knob on, a different value in each row, one row greedy
    SamplingParams(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.1, repeat_last_n=64, seed=1),
    SamplingParams(temperature=1.3, top_k=5, top_p=0.5, min_p=0.2, repeat_penalty=1.3, repeat_last_n=-1, seed=2),
    SamplingParams(temperature=0.0, top_k=3, top_p=0.8, min_p=0.1, repeat_penalty=1.2, repeat_last_n=8),
    SamplingParams(temperature=1e-30, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=4),  # overflows
]


@pytest.mark.parametrize("knobs", ["greedy", "every knob, mixed rows"])
def test_a_decode_step_waits_for_the_device_once(model, tokenizer, monkeypatch, knobs):
    """The step's one host sync is the `.tolist()` of its ids (on a GPU each other one stalls the
    step until the device is idle). A sampled step made 10: whether a row overflowed, the largest
    top-k, whether a row was greedy, and whether any row used each knob, read on the device."""
    ids = tokenizer.encode(TEXT)
    params = ([SamplingParams(temperature=0)] * 4 if knobs == "greedy" else MIXED_KNOBS)
    engine = Engine(model, tokenizer, max_batch=4, cuda_graphs=False, tune_threads=False)
    engine.submit([ids[i:i + 9] for i in range(4)], [dataclasses.replace(p, max_new_tokens=50) for p in params],
                  lambda _: lambda item: None)
    while not all(r.next_token is not None for r in engine._rows):  # every prompt prefilled
        engine.step()
    engine.step()  # and decoding
    syncs = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, real=real, name=name: syncs.append(name) or real(self, *a))
    engine.step()
    monkeypatch.undo()
    assert engine.active == 4 and engine.stats.failed == 0
    assert syncs == ["tolist"]


class KindsSeen(ThreadTuner):
    """A real tuner (on a count it never sets) that keeps the kind of every step it is told of."""

    def __init__(self):
        super().__init__(2, set_threads=lambda threads: None)
        self.kinds = []

    def step_done(self, seconds, kind=None, size=1.0):
        self.kinds.append(kind)
        return super().step_done(seconds, kind, size)


def test_the_thread_tuner_times_decode_steps_by_width_and_longest_context(model, tokenizer, monkeypatch):
    """A step in which a prompt is prefilled is not timed; a decode step is, as (its rows, its
    longest context before the step // TUNER_CONTEXT_BUCKET), whatever rows arrive and end."""
    monkeypatch.setattr(engine_module, "TUNER_CONTEXT_BUCKET", 16)  # contexts of 0-63 here
    ids = tokenizer.encode(TEXT)
    engine = Engine(model, tokenizer, max_batch=4, prefill_chunk=8, cuda_graphs=False, tune_threads=False)
    engine._threads = tuner = KindsSeen()
    arrivals = {0: [(ids[:20], 40), (ids[5:8], 30)], 3: [(ids[:30], 30)], 40: [(ids[9:12], 5)]}
    expected = []
    for n in range(200):
        for prompt, new in arrivals.get(n, []):
            engine.submit([prompt], SamplingParams(temperature=0.8, seed=n, max_new_tokens=new), lambda _: lambda item: None)
        if not engine.busy:
            break
        engine._admit()  # the rows the step will hold (as it admits them first)
        rows = engine._rows
        if rows and not any(r.prefilling for r in rows):
            expected.append((len(rows), max(r.length for r in rows) // engine_module.TUNER_CONTEXT_BUCKET))
        engine.step()
    assert not engine.busy
    assert tuner.kinds == expected
    assert {kind[1] for kind in expected} == {0, 1, 2, 3} and {kind[0] for kind in expected} == {1, 2, 3}


def test_every_bit_of_a_64_bit_seed_counts(model, tokenizer):
    # torch's CPU generator seeded itself from the low 32 bits: seed 5 drew as 2**32 + 5, and -1
    # (2**64 - 1) as 2**32 - 1, through every door. Seeds below 2**32 draw as before.
    ids = tokenizer.encode(TEXT)[:6]

    def text(seed: int) -> str:
        knobs = SamplingParams(temperature=1.5, max_new_tokens=24, seed=seed)
        return generate(model, tokenizer, ids, knobs).text

    assert text(2**32 + 5) != text(5) and text(-1) != text(2**32 - 1) and text(2**63) != text(0)
    assert text(2**32 + 5) == text(2**32 + 5) and text(-1) == text(2**64 - 1)
    g = torch.Generator()
    g.manual_seed(5)
    assert torch.equal(engine_module._generator(5).get_state(), g.get_state())
    # The state is MT19937's own for the seed's 32-bit halves: torch draws what NumPy's MT19937 does.
    import numpy as np

    mt = np.random.MT19937()
    mt._legacy_seeding([5, 1])  # 2**32 + 5
    expected = [(int(word) & 0xFF_FFFF) / 2**24 for word in mt.random_raw(3)]  # torch's float32 from a 32-bit draw
    assert torch.rand(3, generator=engine_module._generator(2**32 + 5)).tolist() == expected


def test_cancel_frees_the_slot_for_the_next_request(model, tokenizer):
    ids = tokenizer.encode(TEXT)
    engine = Engine(model, tokenizer, max_batch=2, max_queue=2)
    collector = Collector()
    long = SamplingParams(temperature=0, max_new_tokens=40)
    first = submit(engine, collector, 0, ids[:5], long)
    submit(engine, collector, 1, ids[5:9], long)
    submit(engine, collector, 2, ids[20:31], SamplingParams(temperature=0, max_new_tokens=10))
    for _ in range(3):
        engine.step()
    assert (engine.active, engine.queued, engine.free_slots) == (2, 1, 0)
    first.cancel()
    engine.step()  # the cancelled row leaves and the waiting request takes its slot in the same step
    assert (engine.active, engine.queued) == (2, 0)
    assert collector.finish(0) == "cancelled"
    run_until_idle(engine)
    assert engine.free_slots == 2 and engine.stats.cancelled == 1 and engine.stats.completed == 2
    # The reused slot held another sequence: its output is still that of a fresh run.
    assert collector.text(2) == generate(model, tokenizer, ids[20:31], SamplingParams(temperature=0, max_new_tokens=10)).text
    assert collector.text(1) == generate(model, tokenizer, ids[5:9], long).text


def test_the_tokens_per_s_history_stays_bounded_when_nobody_asks(model, tokenizer, monkeypatch):
    """The history behind /health's tokens/s was trimmed only when /health was read: a server
    nobody polled kept one entry per step forever (~4.5 GB a day at 590 steps/s)."""
    monkeypatch.setattr(engine_module, "RATE_WINDOW_S", 1e-6)
    engine = Engine(model, tokenizer, max_batch=2, max_queue=2)
    collector = Collector()
    submit(engine, collector, 0, tokenizer.encode(TEXT)[:4], SamplingParams(temperature=0, max_new_tokens=30))
    run_until_idle(engine)
    assert engine.stats.steps >= 30 and len(engine._rate) <= 2


def test_a_failing_request_ends_alone(model, tokenizer):
    ids = tokenizer.encode(TEXT)
    engine = Engine(model, tokenizer, max_batch=3, max_queue=0)
    collector = Collector()
    params = SamplingParams(temperature=0, max_new_tokens=12)

    def broken_sink(item):
        if isinstance(item, Chunk) and item.completion_tokens >= 3:
            raise RuntimeError("the consumer of this request broke")
        collector.sink_for(1)(item)

    submit(engine, collector, 0, ids[:4], params)
    engine.submit([ids[4:8]], params, lambda _: broken_sink)
    submit(engine, collector, 2, ids[8:12], params)
    run_until_idle(engine)
    assert isinstance(collector.errors[1], RuntimeError)
    assert engine.stats.failed == 1 and engine.stats.completed == 2 and engine.free_slots == 3
    for key, prompt in ((0, ids[:4]), (2, ids[8:12])):
        assert collector.text(key) == generate(model, tokenizer, prompt, params).text


def test_a_model_wider_than_its_tokenizer_never_samples_an_id_the_tokenizer_lacks(tiny_config, tokenizer):
    """Embeddings padded past the tokenizer (`resize_token_embeddings(pad_to_multiple_of=64)`):
    an unused id sampled at a high temperature crashed decoding (IndexError; a 500 in the server)."""
    wide = dataclasses.replace(tiny_config, vocab_size=tokenizer.vocab_size + 64)
    model = model_without_stops(wide, tokenizer, seed=3)
    with torch.no_grad():  # the padding rows would win every draw
        model.lm_head.weight[tokenizer.vocab_size:] = 0.0
        model.lm_head.weight[tokenizer.vocab_size:, 0] = 100.0
    completion = generate(model, tokenizer, tokenizer.encode("def"), SamplingParams(temperature=2.0, max_new_tokens=20, seed=1))
    assert completion.completion_tokens == 20 and max(completion.token_ids) < tokenizer.vocab_size
    with pytest.raises(Gpt1Error, match=rf"token id {tokenizer.vocab_size} is outside the vocabulary"):
        generate(model, tokenizer, [5, tokenizer.vocab_size], SamplingParams())


def test_a_row_whose_logits_are_not_finite_fails_alone_with_a_clear_error(model, tokenizer):
    """It "sampled" [PAD] (greedy: an empty reply, finish "stop") or the last id forever."""
    ids = tokenizer.encode(TEXT)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.transformer.wte.weight[ids[0]] = float("nan")  # any prompt holding ids[0] goes NaN
    engine = Engine(broken, tokenizer, max_batch=3, max_queue=0)
    collector = Collector()
    for key, temperature in ((0, 0.0), (1, 0.8)):
        submit(engine, collector, key, ids[:4], SamplingParams(temperature=temperature, max_new_tokens=5, seed=1))
    submit(engine, collector, 2, ids[8:12], SamplingParams(temperature=0, max_new_tokens=5))
    run_until_idle(engine)
    for key in (0, 1):
        assert isinstance(collector.errors[key], Gpt1Error) and key not in collector.chunks
        assert str(collector.errors[key]).startswith("the model's next-token logits are NaN or infinite (running in float32)")
    assert collector.text(2) == generate(model, tokenizer, ids[8:12], SamplingParams(temperature=0, max_new_tokens=5)).text
    assert engine.stats.failed == 2 and engine.free_slots == 3


def test_validation_happens_before_the_batch_and_capacity_is_told_apart(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2, max_queue=1)
    collector = Collector()
    for prompts, params, error in (
        ([[5, 99_999]], SamplingParams(), "outside the vocabulary"),
        ([[5]], SamplingParams(top_p=1.5), "top_p must be"),
        ([[5] * 60], SamplingParams(max_new_tokens=10, truncate_prompt=False), "exceed the context"),
    ):
        with pytest.raises(Gpt1Error, match=error):
            engine.submit(prompts, params, collector.sink_for)
    assert not engine.busy and engine.stats.submitted == 0
    with pytest.raises(TooLarge, match="4 prompts in one request, but this server holds at most 3"):
        engine.submit([[5]] * 4, SamplingParams(), collector.sink_for)
    engine.submit([[5]] * 3, SamplingParams(max_new_tokens=2), collector.sink_for)
    with pytest.raises(QueueFull):
        engine.submit([[5]], SamplingParams(), collector.sink_for)
    run_until_idle(engine)
    assert engine.stats.completed == 3


def test_a_pool_that_cannot_fit_is_a_clear_error(model, tokenizer):
    per_slot = kv_cache_bytes(model, 1)
    slots = (1 << 50) // per_slot  # a petabyte of KV cache
    with pytest.raises(Gpt1Error, match=rf"max_batch {slots}: the KV cache needs .* GiB .* lower max_batch"):
        Engine(model, tokenizer, max_batch=slots)


@pytest.mark.parametrize("knobs", [dict(temperature=1e-300), dict(temperature=1e-45), dict(temperature=1e-39),
                                   dict(temperature=0.8, repeat_penalty=1e-40),
                                   dict(temperature=1e-45, repeat_penalty=1e-40, top_p=0.5, min_p=0.5),
                                   dict(temperature=1e300, repeat_penalty=1e300)])
def test_extreme_knobs_sample_finite(model, tokenizer, knobs):
    """Issue 17 item 6: these crashed with "probability tensor contains inf/nan"."""
    ids = tokenizer.encode(TEXT)[:8]
    params = SamplingParams(max_new_tokens=6, seed=3, **knobs)
    completion = generate(model, tokenizer, ids, params)
    # A huge temperature samples uniformly: a special token may end the reply early.
    assert completion.completion_tokens == 6 or (knobs["temperature"] > 1 and completion.finish_reason == "stop")
    if knobs.get("temperature", 1) < 1e-30 and "repeat_penalty" not in knobs:
        assert completion.text == generate(model, tokenizer, ids, params.override(temperature=0)).text


def test_a_request_cancelled_while_waiting_leaves_the_queue_at_the_next_step(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1, max_queue=2)
    collector = Collector()
    params = SamplingParams(temperature=0, max_new_tokens=30)
    submit(engine, collector, 0, [5, 6], params)
    waiting = submit(engine, collector, 1, [7, 8], params)
    engine.step()
    waiting.cancel()
    engine.step()
    assert (engine.active, engine.queued) == (1, 0) and collector.finish(1) == "cancelled"
    assert collector.chunks[1][-1].completion_tokens == 0


def test_cpu_weights_column_major_same_logits_training_and_saving(tiny_config, tokenizer, tmp_path):
    """The CPU engine's weight layout changes strides, nothing else: same logits, same training
    steps, and a model dir saved afterwards loads back with the same weights."""
    import dataclasses

    from gpt1.core.model import GPT
    from gpt1.formats.modeldir import load_model, save_model
    from gpt1.inference.engine import store_weights_column_major

    torch.manual_seed(3)
    plain = GPT(tiny_config).eval()
    relaid = copy.deepcopy(plain)
    store_weights_column_major(relaid)
    linears = [m for m in relaid.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.weight.stride() == (1, m.weight.size(0)) for m in linears)  # column-major
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), relaid.parameters()))
    x = torch.randint(3, tiny_config.vocab_size, (2, 33))
    with torch.no_grad():
        torch.testing.assert_close(relaid(x), plain(x), rtol=1e-5, atol=1e-5)
    for model in (plain, relaid):  # a few fused-AdamW steps: the same weights after
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        for _ in range(2):
            model(x[:, :-1], x[:, 1:])[1].backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(plain.parameters(), relaid.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    save_model(tmp_path / "saved", relaid, tokenizer)
    loaded = load_model(tmp_path / "saved")
    assert all(torch.equal(a, b) for a, b in zip(relaid.state_dict().values(), loaded.state_dict().values()))
    # A caller's own saver after generating (the engine re-lays the caller's model in place):
    # safetensors refused the non-contiguous weights; state_dict() gives contiguous copies.
    from safetensors.torch import load_file, save_file

    assert all(t.is_contiguous() for t in relaid.state_dict().values())
    save_file(relaid.state_dict(), tmp_path / "own.safetensors")
    assert all(torch.equal(load_file(tmp_path / "own.safetensors")[k], v) for k, v in relaid.state_dict().items())
    assert all(not v.is_contiguous() for k, v in relaid.state_dict(keep_vars=True).items() if k.endswith("c_fc.weight"))

    tied = GPT(dataclasses.replace(tiny_config, tie_embeddings=True))
    store_weights_column_major(tied)  # the head shares the embedding's rows: left row-major
    assert tied.lm_head.weight is tied.transformer.wte.weight and tied.lm_head.weight.is_contiguous()
    assert not tied.transformer.h[0].mlp.c_fc.weight.is_contiguous()


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("timed out")
        time.sleep(0.01)


def test_threads_that_step_one_engine_at_once_take_turns(model, tokenizer):
    """The docs' patterns at once, with real threads: a caller stepping beside `start()`'s
    worker, and four threads each running submit, then `while engine.busy: engine.step()`.
    Unguarded, their steps interleaved and every request failed with a tensor-shape RuntimeError."""
    prompts = [tokenizer.encode(t) for t in ("def f(x):", "import os\n", "class A:", "# comment")]
    params = SamplingParams(temperature=0, max_new_tokens=24)
    expected = [generate(model, tokenizer, p, params).text for p in prompts]

    engine = Engine(model, tokenizer, max_batch=4).start()
    collector = Collector()
    engine.submit(prompts, params, collector.sink_for)
    try:
        run_until_idle(engine)
        wait_until(lambda: len(collector.chunks) + len(collector.errors) == 4 and
                   all(collector.finish(i) for i in collector.chunks))
    finally:
        engine.stop()
    assert collector.errors == {} and [collector.text(i) for i in range(4)] == expected

    engine, collector = Engine(model, tokenizer, max_batch=4), Collector()
    failures = []

    def caller(i: int) -> None:
        try:
            submit(engine, collector, i, prompts[i], params)
            while engine.busy:
                engine.step()
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(e)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == [] and collector.errors == {}
    assert [collector.text(i) for i in range(4)] == expected


def test_a_model_without_weights_is_refused_at_once(tiny_model_dir):
    """LLM.without_weights puts the model on the meta device: an Engine on it failed every
    request later ("Tensor.item() cannot be called on meta tensors")."""
    weightless = LLM.without_weights(tiny_model_dir)
    message = r"this model has no weights \(LLM.without_weights\): serve it with engine='process', or load it"
    with pytest.raises(Gpt1Error, match=message):
        Engine(weightless.model, weightless.tokenizer)
    with pytest.raises(Gpt1Error, match=message):  # LLM.generate goes through an Engine too
        weightless.generate("hi", max_new_tokens=3)


@pytest.mark.parametrize("prompts, params, message", [
    ("flat", SamplingParams(), r"^prompts: expected a list of prompts \(each a list of token ids\), got a list of ints"),
    (None, SamplingParams(), r"^prompts: expected a list of prompts \(each a list of token ids\), got NoneType$"),
    ("some text", SamplingParams(), r"^prompts: expected a list of prompts .*, got text; encode each prompt"),
    ([[5], None], SamplingParams(), r"^prompt 1: expected token ids \(a list of ints\), got NoneType$"),
    ([[5]], {"temperature": 0}, r"^params: expected SamplingParams \(or one per prompt\), got dict$"),
    ([[5]], None, r"^params: expected SamplingParams \(or one per prompt\), got NoneType$"),
    ([[5], [6]], [SamplingParams()], r"^params: 1 SamplingParams for 2 prompts; pass one, or one per prompt$"),
])
def test_submit_says_what_it_expected_for_prompts_and_params(model, tokenizer, prompts, params, message):
    engine = Engine(model, tokenizer, max_batch=2)
    if prompts == "flat":  # `tok.encode(text)` where `[tok.encode(text)]` was meant
        prompts = tokenizer.encode("def f(x):")
    with pytest.raises(Gpt1Error, match=message):
        engine.submit(prompts, params, Collector().sink_for)
    assert not engine.busy and engine.stats.submitted == 0


def test_each_prompt_may_bring_its_own_params(model, tokenizer):
    # The server gives each prompt of a completions request its own knobs (an omitted max_tokens
    # capped by that prompt's room): one submit, one SamplingParams per prompt, each row as alone.
    prompts = [[5, 6], [7, 8, 9]]
    knobs = [SamplingParams(temperature=0, max_new_tokens=2), SamplingParams(temperature=0.8, seed=3, max_new_tokens=6)]

    def run(prompts, params) -> list[Chunk]:
        engine, collector = Engine(model, tokenizer, max_batch=2), Collector()
        engine.submit(prompts, params, collector.sink_for)
        run_until_idle(engine)
        return [collector.chunks[i][-1] for i in range(len(prompts))]

    together = run(prompts, knobs)
    assert together == [run([p], k)[0] for p, k in zip(prompts, knobs)]
    assert [c.completion_tokens for c in together] == [2, 6]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_row_fails_exactly_when_one_of_its_logits_is_nan_or_infinite(dtype):
    """The decode step's test for logits that are not finite marks the rows `isfinite().all()` marks,
    whatever the dtype, in fewer kernels."""
    largest = torch.finfo(dtype).max
    logits = torch.randn(7, 300).to(dtype)
    logits[1, 5] = float("nan")
    logits[2, 7] = float("inf")
    logits[3, 9] = float("-inf")  # a single -inf: no maximum or argmax would see it
    logits[4] = float("-inf")
    logits[5, :2] = largest  # finite values whose sum overflows: still finite
    logits[6, :2] = -largest
    ids = torch.arange(7)
    expected = torch.where(torch.isfinite(logits).all(dim=-1), ids, -1)
    assert _unless_not_finite(ids, logits).tolist() == expected.tolist() == [0, -1, -1, -1, -1, 5, 6]
