"""Regression guards for sampling: per-row knobs in a mixed batch, ties and extreme top_p against
transformers' processors, and the engine's repeat-penalty window on a model whose greedy choice
the penalty actually moves (a random model's never does, so the window's edges went untested).

Each test here failed on a mutant of the line it guards (mutation testing, pass 13)."""

import pytest
import torch

from gpt1.core.config import ModelConfig
from gpt1.core.model import GPT
from gpt1.core.sampling_params import SamplingParams
from gpt1.inference.engine import Engine
from gpt1.inference.generate import generate
from gpt1.inference.sampling import apply_min_p, apply_top_p, process_logits, sample

hf = pytest.importorskip("transformers.generation.logits_process")
VOCAB = 100


@pytest.fixture
def logits():
    return torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0)) * 3


@pytest.fixture
def history():
    return torch.randint(0, VOCAB, (4, 30), generator=torch.Generator().manual_seed(1))


# ---- each row of a mixed batch is processed as it would be alone --------------------------------
MIXED = {  # knob: (per-row values with neutral rows among active ones, transformers' processor of one value)
    "top_k": ([0, 5, 0, 50], lambda v: hf.TopKLogitsWarper(v) if v else None),
    "top_p": ([1.0, 0.3, 1.0, 0.9], hf.TopPLogitsWarper),
    "min_p": ([0.0, 0.2, 0.0, 0.05], hf.MinPLogitsWarper),
    "repeat_penalty": ([1.0, 1.3, 1.0, 2.0], hf.RepetitionPenaltyLogitsProcessor),
}


@pytest.mark.parametrize("knob", MIXED)
def test_a_neutral_row_beside_active_rows_is_processed_as_alone(logits, history, knob):
    """A server batches requests with different knobs: a row at the neutral value (top_k 0,
    top_p 1, min_p 0, penalty 1) must come back as transformers leaves it, whatever its neighbours use."""
    values, processor = MIXED[knob]
    dtype = torch.long if knob == "top_k" else torch.float32
    ours = process_logits(logits, history, temperature=1.0, **{knob: torch.tensor(values, dtype=dtype)})
    for row, value in enumerate(values):
        alone = logits[row:row + 1].clone()
        if processor(value) is not None:
            alone = processor(value)(history[row:row + 1], alone)
        torch.testing.assert_close(ours[row:row + 1], alone, rtol=0, atol=0, msg=f"{knob}={value} (row {row})")


# ---- ties and extreme values at the filters' boundaries -----------------------------------------
FOUR_TIED = torch.tensor([[0.0, 0.0, 0.0, 0.0, -1e9]])  # p = 0.25 each, exactly


@pytest.mark.parametrize("top_p", [0.25, 0.5, 0.75])
def test_top_p_keeps_what_transformers_keeps_among_exactly_tied_tokens(top_p):
    expected = hf.TopPLogitsWarper(top_p)(None, FOUR_TIED.clone())
    kept = apply_top_p(FOUR_TIED, top_p)
    torch.testing.assert_close(kept, expected, rtol=0, atol=0)
    assert int(torch.isfinite(kept).sum()) == round(top_p * 4)


def test_min_p_1_keeps_every_token_tied_with_the_most_likely():
    tied = torch.tensor([[1.0, 1.0, 0.0], [2.0, -1.0, 2.0]])
    expected = hf.MinPLogitsWarper(1.0)(None, tied.clone())
    torch.testing.assert_close(apply_min_p(tied, 1.0), expected, rtol=0, atol=0)
    assert torch.isfinite(apply_min_p(tied, 1.0)).sum(-1).tolist() == [2, 2]


@pytest.mark.parametrize("top_p", [1e-8, torch.finfo(torch.float32).tiny, 5e-324])
def test_a_top_p_that_float32_rounds_away_still_keeps_the_most_likely_token(top_p):
    """1 - top_p rounds to 1.0 in float32, so every cumulative probability is <= it: only the
    keep-one rule leaves a token (transformers' min_tokens_to_keep=1), and `sample` must take it."""
    assert SamplingParams(top_p=top_p).top_p == top_p  # a valid knob
    scores = torch.randn(4, 4096, generator=torch.Generator().manual_seed(0)) * 3
    expected = hf.TopPLogitsWarper(top_p)(None, scores.clone())
    torch.testing.assert_close(apply_top_p(scores, top_p), expected, rtol=0, atol=0)
    processed = process_logits(scores, None, temperature=0.8, top_p=top_p)
    assert torch.isfinite(processed).sum(-1).tolist() == [1, 1, 1, 1]
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    assert sample(processed, 0.8, generators).tolist() == scores.argmax(-1).tolist()


# ---- the engine, on a model whose greedy choice the repeat penalty moves -------------------------
PENALTY = 2.0


@pytest.fixture(scope="module")
def favourites(tokenizer) -> list[int]:
    """Eight ids of plain ASCII tokens (whole tokens in streamed text), below 400: the ids from 400
    on are the other tokens."""
    ids = [i for i in range(300, 400) if tokenizer.decode([i]).strip().isalpha()
           and tokenizer.decode([i]).isascii()]
    assert len(ids) >= 8
    return ids[:8]


@pytest.fixture(scope="module")
def model(tokenizer, favourites):
    """A GPT whose logits are the same at every position, whatever the input: the final
    LayerNorm's weight is 0 and its bias e_0, and the head's column 0 holds the logits. The
    favourites get 10, 9.5, ..., 6.5 and every other id -10, so that a penalty of 2 puts any
    favourite in the window below every favourite outside it: greedy text spells out the window."""
    torch.manual_seed(0)
    m = GPT(ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, block_size=48, n_layer=1, n_head=2,
                               n_embd=16)).eval()
    with torch.no_grad():
        m.transformer.ln_f.weight.zero_()
        m.transformer.ln_f.bias.zero_()
        m.transformer.ln_f.bias[0] = 1.0
        m.lm_head.weight[:, 0] = -10.0
        m.lm_head.weight[favourites, 0] = torch.arange(10.0, 6.0, -0.5)
    return m


def reference_greedy(model, ids: list[int], n: int, penalty: float, last_n: int) -> list[int]:
    """Full recomputation with transformers' RepetitionPenaltyLogitsProcessor on the last
    `last_n` tokens of the context (-1: all; 0: none, llama.cpp's "off")."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            scores = model(torch.tensor([ids]))[:, -1]
            if penalty != 1.0 and last_n != 0:
                window = ids if last_n == -1 else ids[-last_n:]
                scores = hf.RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([window]), scores)
            out.append(int(scores.argmax()))
            ids.append(out[-1])
    return out


def run_engine(model, tokenizer, requests: list[tuple[list[int], SamplingParams]], max_batch: int = 4) -> list[str]:
    """Each request's text, all submitted at once (slot i for request i) and stepped to the end."""
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=4, tune_threads=False)
    texts: list[list[str]] = [[] for _ in requests]
    for key, (prompt, params) in enumerate(requests):
        engine.submit([prompt], params, lambda _, key=key: lambda chunk: texts[key].append(chunk.text))
    for _ in range(1000):
        if not engine.busy:
            break
        engine.step()
    assert not engine.busy
    return ["".join(t) for t in texts]


@pytest.mark.parametrize("last_n", [1, 4, -1])
def test_the_penalty_window_holds_exactly_the_last_repeat_last_n_tokens(model, tokenizer, favourites, last_n):
    """The prompt ends in favourites, so the window's oldest token (prompt or generated) decides
    the next one: one token more or less in the window changes the text."""
    prompt = [400, favourites[2], favourites[0], 401, favourites[1]]
    params = SamplingParams(temperature=0, max_new_tokens=20, repeat_penalty=PENALTY, repeat_last_n=last_n)
    got = generate(model, tokenizer, prompt, params).token_ids
    expected = reference_greedy(model, prompt, 20, PENALTY, last_n)
    assert len(set(expected)) > 1  # the penalty moves the choice
    assert got == expected


def test_a_penalised_request_moved_to_a_freed_slot_keeps_its_own_history(model, tokenizer, favourites):
    """The request in slot 0 ends first and the one in slot 1 moves into its slot: its penalty
    window must go on reading its own context, not the finished request's."""
    other = [i + 400 for i in range(4)]
    pen = SamplingParams(temperature=0, max_new_tokens=16, repeat_penalty=PENALTY, repeat_last_n=-1)
    short = SamplingParams(temperature=0, max_new_tokens=2, repeat_penalty=PENALTY)
    alone = generate(model, tokenizer, other, pen)
    assert alone.token_ids == reference_greedy(model, other, 16, PENALTY, -1)
    _, moved = run_engine(model, tokenizer, [(favourites[:4], short), (other, pen)])
    assert moved == alone.text


def test_repeat_last_n_0_stays_off_beside_a_penalised_request(model, tokenizer, favourites):
    off = SamplingParams(temperature=0, max_new_tokens=12, repeat_penalty=PENALTY, repeat_last_n=0)
    prompt = favourites[:3]
    alone = generate(model, tokenizer, prompt, off)
    assert alone.token_ids == [favourites[0]] * 12  # no penalty: the favourite every time
    beside, _ = run_engine(model, tokenizer, [(prompt, off), (prompt, SamplingParams(temperature=0, max_new_tokens=12,
                                                                                     repeat_penalty=1.3))])
    assert beside == alone.text


def test_a_top_k_0_request_samples_the_whole_vocabulary_beside_a_top_k_request(model, tokenizer, favourites):
    free = SamplingParams(temperature=1.0, top_k=0, seed=7, max_new_tokens=20)
    alone = generate(model, tokenizer, favourites[:2], free)
    assert len(set(alone.token_ids)) > 1  # not greedy
    beside, _ = run_engine(model, tokenizer, [(favourites[:2], free),
                                              (favourites[2:4], SamplingParams(temperature=1.0, top_k=5, seed=1,
                                                                               max_new_tokens=20))])
    assert beside == alone.text


def test_top_p_0_keeps_the_most_likely_token_alone_as_transformers_does(model, tokenizer, favourites):
    """OpenAI's and transformers' clients send top_p 0 (with temperature 0 or not) to ask for the
    most likely token; it was refused as outside (0, 1]. Sampled at temperature 1.5 beside a
    greedy row, every seed gives the greedy text."""
    scores = torch.randn(3, 512, generator=torch.Generator().manual_seed(1)) * 3
    torch.testing.assert_close(apply_top_p(scores, 0.0), hf.TopPLogitsWarper(0.0)(None, scores.clone()), rtol=0, atol=0)
    prompt = tokenizer.encode("a")
    greedy = SamplingParams(temperature=0.0, max_new_tokens=6, repeat_penalty=2.0, repeat_last_n=-1)
    texts = run_engine(model, tokenizer, [(prompt, greedy)] + [
        (prompt, SamplingParams(temperature=1.5, top_p=0.0, seed=seed, max_new_tokens=6, repeat_penalty=2.0,
                                repeat_last_n=-1)) for seed in range(3)])
    assert len(set(texts)) == 1 and texts[0]
