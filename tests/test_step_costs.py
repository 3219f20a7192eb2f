"""What the engine's steps cost: a prefill bounded with the padding included, prompts prefilled first
come first served, the choices of one prompt sharing one prefill, a bounded number of keys read by
each prefill forward, bookkeeping per step in proportion to the batch, and no hooks piling up on a
model whose weights are swapped in again."""

from __future__ import annotations


def _forward_shapes(model) -> tuple[list[tuple[int, int]], object]:
    """The (rows, columns) of every forward the model runs (a hook: the real model runs)."""
    shapes: list[tuple[int, int]] = []
    handle = model.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    return shapes, handle


def test_a_prefill_forward_costs_at_most_the_chunk_padding_included(tiny_config, tokenizer):
    """Three 2-token prompts, then a 40-token one, with prefill_chunk 16: the budget counted prompt
    tokens (6 + 10), but shorter chunks are padded to the longest, so the forward was 4 x 10 = 40
    positions (8 x 200 with the server's 256: a stall longer than prefilling the long prompt whole)."""
    from gpt1.core.sampling_params import SamplingParams
    from gpt1.inference.engine import Engine
    from gpt1.inference.generate import generate
    from tests.model_factories import model_without_stops
    from tests.test_engine import TEXT, Collector, run_until_idle, submit

    model = model_without_stops(tiny_config, tokenizer, seed=11)
    ids = tokenizer.encode(TEXT)
    prompts = [ids[i:i + 2] for i in range(3)] + [ids[:40]]
    engine = Engine(model, tokenizer, max_batch=8, max_queue=8, prefill_chunk=16, cuda_graphs=False,
                    tune_threads=False)
    greedy = SamplingParams(temperature=0, max_new_tokens=4)
    collector = Collector()
    shapes, handle = _forward_shapes(model)
    try:
        for key, prompt in enumerate(prompts):
            submit(engine, collector, key, prompt, greedy)
        run_until_idle(engine)
    finally:
        handle.remove()
    prefills = [(rows, cols) for rows, cols in shapes if cols > 1]
    assert prefills and all(rows * cols <= 16 for rows, cols in prefills), prefills
    assert sum(rows for rows, _ in prefills) >= 4  # every prompt was prefilled
    for key, prompt in enumerate(prompts):  # and each reply is its own alone
        assert collector.text(key) == generate(model, tokenizer, prompt, greedy).text


def test_prompts_are_prefilled_in_the_order_they_came(tiny_config, tokenizer):
    """A, then B, two long prompts behind a short request: when the short one ended, the newest
    row (B) moved into its slot, and slot order gave B every step's budget while A waited."""
    from gpt1.core.sampling_params import SamplingParams
    from gpt1.inference.engine import Engine
    from tests.model_factories import model_without_stops
    from tests.test_engine import TEXT, Collector

    model = model_without_stops(tiny_config, tokenizer, seed=11)
    ids = tokenizer.encode(TEXT)
    engine = Engine(model, tokenizer, max_batch=4, max_queue=4, prefill_chunk=8, cuda_graphs=False,
                    tune_threads=False)
    collector, first_at = Collector(), {}
    greedy = SamplingParams(temperature=0, max_new_tokens=3)
    for key, prompt in enumerate([ids[:3], ids[:40], ids[5:45]]):  # short, A, B
        engine.submit([prompt], SamplingParams(temperature=0, max_new_tokens=1) if key == 0 else greedy,
                      lambda _, key=key: collector.sink_for(key))
    for step in range(100):
        if not engine.busy:
            break
        engine.step()
        for key in collector.chunks:
            first_at.setdefault(key, step)
    assert first_at[0] < first_at[1] < first_at[2], first_at


def test_the_choices_of_one_prompt_share_its_prefill(tiny_config, tokenizer):
    """n = 4 choices of one 40-token prompt were prefilled four times (4 x 5 chunks of 8). Now once,
    copied into the other slots; each seeded choice still gives what it gives alone, and a leader
    cancelled mid-prefill leaves its twins to prefill themselves."""
    from gpt1.core.sampling_params import SamplingParams
    from gpt1.inference.engine import Engine
    from gpt1.inference.generate import generate
    from tests.model_factories import model_without_stops
    from tests.test_engine import TEXT, Collector, run_until_idle

    model = model_without_stops(tiny_config, tokenizer, seed=11)
    prompt = tokenizer.encode(TEXT)[:40]
    knobs = [SamplingParams(temperature=0.9, seed=seed, max_new_tokens=5) for seed in (1, 2, 3, 4)]
    alone = [generate(model, tokenizer, prompt, k).text for k in knobs]
    for cancel_first in (False, True):
        engine = Engine(model, tokenizer, max_batch=4, max_queue=4, prefill_chunk=8, cuda_graphs=False,
                        tune_threads=False)
        collector = Collector()
        shapes, handle = _forward_shapes(model)
        try:
            requests = engine.submit([prompt] * 4, knobs, collector.sink_for)
            if cancel_first:
                engine.step()  # the first chunk of the leader's prefill
                requests[0].cancel()
            run_until_idle(engine)
        finally:
            handle.remove()
        prefilled = sum(rows * cols for rows, cols in shapes if cols > 1)
        if cancel_first:
            assert collector.finish(0) == "cancelled"
            assert [collector.text(k) for k in (1, 2, 3)] == alone[1:]
            assert prefilled <= 8 + 40  # the leader's one chunk, then one twin's prefill for the other two
        else:
            assert [collector.text(k) for k in range(4)] == alone
            assert prefilled == 40, shapes
        assert engine.free_slots == 4


def test_a_prefill_forward_reads_a_bounded_number_of_keys(tiny_config, tokenizer, monkeypatch):
    """Short prompts beside a long prompt's last chunk: each row read (and the gather copied) the
    keys up to the long one's context; 16 x 8 positions over 1,800 keys took 3.5x a full chunk.
    rows x the longest context stays under PREFILL_KEYS chunks unless one row alone reads more."""
    import torch

    from gpt1.core.model import SlotCache
    from gpt1.core.sampling_params import SamplingParams
    from gpt1.inference.engine import PREFILL_KEYS, Engine
    from gpt1.inference.generate import generate
    from tests.model_factories import model_without_stops
    from tests.test_engine import TEXT, Collector, run_until_idle, submit

    model = model_without_stops(tiny_config, tokenizer, seed=11)
    ids = tokenizer.encode(TEXT)
    chunk = 16
    engine = Engine(model, tokenizer, max_batch=12, max_queue=12, prefill_chunk=chunk, cuda_graphs=False,
                    tune_threads=False)
    reads: list[tuple[int, int, int]] = []  # (rows, columns, key_len) of each prefill forward
    prepare = SlotCache.prepare

    def spy(self, rows, positions, key_len):
        if isinstance(rows, torch.Tensor):  # a prefill's rows (a decode step reads a slice of the pool)
            reads.append((len(rows), positions.shape[1], key_len))
        return prepare(self, rows, positions, key_len)

    monkeypatch.setattr(SlotCache, "prepare", spy)
    greedy = SamplingParams(temperature=0, max_new_tokens=2)
    collector = Collector()
    prompts = [ids[:49]] + [ids[i:i + 1] for i in range(10)]  # a long prompt, then ten of one token
    submit(engine, collector, 0, prompts[0], greedy)
    for _ in range(3):  # the long prompt up to its last chunk (of one token), in chunks of 16
        engine.step()
    for key, prompt in enumerate(prompts[1:], start=1):
        submit(engine, collector, key, prompt, greedy)
    run_until_idle(engine)
    prefills = [(rows, key_len) for rows, _, key_len in reads if rows > 1]
    assert prefills and all(rows * key_len <= PREFILL_KEYS * chunk for rows, key_len in prefills), prefills
    for key, prompt in enumerate(prompts):
        assert collector.text(key) == generate(model, tokenizer, prompt, greedy).text


# Weights swapped in again add no state_dict hooks.

def test_weights_swapped_in_again_add_no_state_dict_hooks(tiny_config, tokenizer):
    """A notebook loading checkpoints into one model (load_state_dict(assign=True)) and generating
    after each: every generate added one state_dict hook per Linear (2,709 after 300 swaps)."""
    from gpt1.inference.engine import store_weights_column_major
    from tests.model_factories import model_without_stops

    model = model_without_stops(tiny_config, tokenizer, seed=11)
    fresh = {k: v.clone().contiguous() for k, v in model.state_dict().items()}

    def hooks() -> int:
        return sum(len(m._state_dict_hooks) for m in model.modules())

    store_weights_column_major(model)
    once = hooks()
    for _ in range(3):
        model.load_state_dict({k: v.clone() for k, v in fresh.items()}, assign=True)
        store_weights_column_major(model)
    assert hooks() == once
    assert all(v.is_contiguous() for v in model.state_dict().values())


# The engine's bookkeeping per step stays in proportion to its batch.

def test_the_engines_bookkeeping_per_step_stays_in_proportion_to_its_batch(tokenizer, monkeypatch):
    """Every step looked at every waiting request (`cancelled`, then a deque.remove each): 8,000
    prompts through generate_batch spent a third of the run there, twice the share of 4,000. Now a
    step reads a bounded number of them per row of the batch, however long the queue."""
    from gpt1.core.config import ModelConfig
    from gpt1.core.sampling_params import SamplingParams
    from gpt1.inference import generate
    from gpt1.inference.engine import Engine, Request
    from tests.model_factories import model_without_stops

    reads, steps = [0], [0]
    real_cancelled, real_step = Request.cancelled.fget, Engine.step
    monkeypatch.setattr(Request, "cancelled", property(lambda self: reads.__setitem__(0, reads[0] + 1) or real_cancelled(self)))
    monkeypatch.setattr(Engine, "step", lambda self: steps.__setitem__(0, steps[0] + 1) or real_step(self))
    monkeypatch.setattr(generate, "MAX_BATCH", 4)  # a queue of ~75 batches
    config = ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)
    replies = generate.generate_batch(model_without_stops(config, tokenizer, 0), tokenizer,
                                      [tokenizer.encode(f"prompt {i}") for i in range(300)],
                                      SamplingParams(max_new_tokens=4, temperature=0.0))
    assert [r.completion_tokens for r in replies] == [4] * 300
    assert reads[0] <= 8 * 4 * steps[0], (reads[0], steps[0])  # was ~40 per row of the batch per step
