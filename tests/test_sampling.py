"""The logits processors equal transformers' own, and knobs are validated."""

import pytest
import torch

from gpt1.core.errors import Gpt1Error
from gpt1.core.sampling_params import PRESETS, SamplingParams
from gpt1.inference.sampling import (
    PerRow,
    apply_min_p,
    apply_repeat_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    process_logits,
    sample,
)

hf = pytest.importorskip("transformers.generation.logits_process")
VOCAB = 100


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, VOCAB, generator=g) * 3
    scores[0, :10] = 5.0  # ties at the top-k and top-p boundaries
    return scores


@pytest.fixture
def history():
    return torch.randint(0, VOCAB, (4, 30), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("penalty", [0.7, 1.05, 1.3, 2.0])
def test_repeat_penalty_equals_transformers(logits, history, penalty):
    expected = hf.RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
    torch.testing.assert_close(apply_repeat_penalty(logits, history, penalty), expected, rtol=0, atol=0)


def test_repeat_penalty_ignores_padding_marker(logits, history):
    padded = torch.cat([torch.full((4, 5), VOCAB), history], dim=1)  # ids >= vocab mark "no token"
    torch.testing.assert_close(apply_repeat_penalty(logits, padded, 1.3), apply_repeat_penalty(logits, history, 1.3))


@pytest.mark.parametrize("temperature", [0.2, 0.7, 1.0, 1.5])
def test_temperature_equals_transformers(logits, history, temperature):
    expected = hf.TemperatureLogitsWarper(temperature)(history, logits.clone())
    torch.testing.assert_close(apply_temperature(logits, temperature), expected, rtol=0, atol=0)


@pytest.mark.parametrize("top_k", [1, 5, 10, 50, 200])
def test_top_k_equals_transformers(logits, history, top_k):
    expected = hf.TopKLogitsWarper(top_k)(history, logits.clone())
    torch.testing.assert_close(apply_top_k(logits, top_k), expected, rtol=0, atol=0)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.8, 0.95, 0.999])
def test_top_p_equals_transformers(logits, history, top_p):
    expected = hf.TopPLogitsWarper(top_p)(history, logits.clone())
    torch.testing.assert_close(apply_top_p(logits, top_p), expected, rtol=0, atol=0)


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_equals_transformers(logits, history, min_p):
    expected = hf.MinPLogitsWarper(min_p)(history, logits.clone())
    torch.testing.assert_close(apply_min_p(logits, min_p), expected, rtol=0, atol=0)


def test_the_chain_equals_transformers_in_its_order(logits, history):
    """repeat penalty -> temperature -> top-k -> top-p -> min-p, as a transformers LogitsProcessorList."""
    chain = hf.LogitsProcessorList([
        hf.RepetitionPenaltyLogitsProcessor(1.2), hf.TemperatureLogitsWarper(0.7), hf.TopKLogitsWarper(40),
        hf.TopPLogitsWarper(0.9), hf.MinPLogitsWarper(0.05),
    ])
    ours = process_logits(logits, history, temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.2)
    torch.testing.assert_close(ours, chain(history, logits.clone()), rtol=0, atol=0)


def test_greedy_is_argmax_after_the_repeat_penalty(logits, history):
    processed = process_logits(logits, history, temperature=0, top_k=3, repeat_penalty=1.5)
    expected = apply_repeat_penalty(logits, history, 1.5).argmax(-1)
    assert torch.equal(sample(processed, 0, []), expected)


def test_sampling_draws_only_kept_tokens_and_is_seeded(logits):
    processed = process_logits(logits, None, temperature=1.0, top_k=3)
    allowed = torch.topk(logits, 3).indices
    draws = [sample(processed, 1.0, [torch.Generator().manual_seed(s) for _ in range(4)]) for s in range(20)]
    for d in draws:
        assert all(d[i] in allowed[i] for i in range(4))
    again = sample(processed, 1.0, [torch.Generator().manual_seed(0) for _ in range(4)])
    assert torch.equal(again, draws[0])


def test_presets_are_the_model_cards():
    assert (PRESETS["qa"].temperature, PRESETS["qa"].top_k) == (0.7, 50)
    c = PRESETS["creative"]
    assert (c.temperature, c.top_k, c.repeat_penalty) == (0.5, 40, 1.05)
    c = PRESETS["code"]
    assert (c.temperature, c.top_k, c.top_p, c.repeat_penalty) == (0.2, 30, 0.8, 1.05)


@pytest.mark.parametrize("knob, value, message", [
    ("temperature", -0.1, r"temperature must be a number >= 0"),
    ("temperature", float("nan"), r"temperature must be"),
    ("top_k", -1, r"top_k must be an integer >= 0"),
    ("top_k", 2.5, r"top_k must be an integer"),
    ("top_p", -0.1, r"top_p must be a number in \[0, 1\]"),
    ("top_p", 1.5, r"top_p must be"),
    ("min_p", -0.5, r"min_p must be a number in \[0, 1\]"),
    ("repeat_penalty", 0.0, r"repeat_penalty must be a number > 0"),
    ("repeat_last_n", -2, r"repeat_last_n must be an integer >= -1"),
    ("max_new_tokens", -1, r"max_new_tokens must be an integer >= 0 \(0 = none"),
    ("max_new_tokens", True, r"max_new_tokens must be"),
    ("stop", ("ok", ""), r"stop must be a list of non-empty strings"),
    ("seed", -2**63 - 1, r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
    ("truncate_prompt", "yes", r"truncate_prompt must be true or false"),
])
def test_bad_knobs_are_clear_errors(knob, value, message):
    with pytest.raises(Gpt1Error, match=message):
        SamplingParams().override(**{knob: value})


def test_validate_normalises_and_unknown_knob_is_an_error():
    p = SamplingParams(temperature=1, stop="\n").validate()
    assert p.temperature == 1.0 and isinstance(p.temperature, float) and p.stop == ("\n",)
    assert SamplingParams(stop=None).validate().stop == () and SamplingParams(stop=["a", "b"]).validate().stop == ("a", "b")
    with pytest.raises(Gpt1Error, match="unknown sampling knob.*temprature.*known: temperature"):
        SamplingParams().override(temprature=0.5)
    # NumPy scalars are numbers (they were "must be an integer"), stored as Python's.
    import numpy as np

    q = SamplingParams().override(seed=np.int64(3), top_k=np.int64(5), temperature=np.float32(0.5))
    assert (q.seed, q.top_k, q.temperature) == (3, 5, 0.5)
    assert type(q.seed) is int and type(q.top_k) is int and type(q.temperature) is float
    with pytest.raises(Gpt1Error, match="top_k must be an integer"):
        SamplingParams().override(top_k=np.float64(2.0))


# ---- logits that hold -inf (a token masked out before the processors) -------------------------
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_a_masked_token_leaves_the_others_as_transformers_scales_them(logits, history, temperature):
    """-inf in a row read as a temperature overflow: the row collapsed to its top token."""
    masked = logits.clone()
    masked[:, 3] = float("-inf")
    expected = hf.TemperatureLogitsWarper(temperature)(history, masked.clone())
    torch.testing.assert_close(apply_temperature(masked, temperature), expected, rtol=0, atol=0)
    expected = hf.RepetitionPenaltyLogitsProcessor(1.3)(history, masked.clone())
    penalised = apply_repeat_penalty(masked, torch.cat([history, torch.full((4, 1), 3)], 1), 1.3)
    torch.testing.assert_close(penalised, expected, rtol=0, atol=0)
    assert penalised[:, 3].eq(float("-inf")).all()  # the masked token, also in the window, stays -inf


def test_a_row_with_a_masked_token_is_the_same_beside_a_penalised_row():
    """A neutral penalty beside another row's 1.3 turned the first row's -inf into -3.4e38."""
    rows = torch.tensor([[1.0, 0.0, float("-inf")], [1.0, 0.0, 0.0]])
    window = torch.tensor([[2], [2]])
    together = process_logits(rows, window, temperature=0.0, repeat_penalty=torch.tensor([1.0, 1.3]))
    alone = process_logits(rows[:1], window[:1], temperature=0.0, repeat_penalty=1.0)
    torch.testing.assert_close(together[:1], alone, rtol=0, atol=0)
    assert together[0, 2] == float("-inf")


def test_a_tiny_temperature_still_takes_the_limit_with_a_masked_token():
    row = torch.tensor([[1.0, 0.5, float("-inf")]])
    assert apply_temperature(row, 1e-39).tolist() == [[0.0, float("-inf"), float("-inf")]]


def test_per_row_knobs_process_as_tensors_do_without_asking_the_device(logits, history, monkeypatch):
    """PerRow (what the engine passes) carries each knob's values on the host too: the same logits
    as tensor knobs, with none of the host syncs that deciding from a tensor takes."""
    knobs = {"temperature": [0.7, 0.0, 1e-30, 1.3], "top_k": [40, 3, 0, 5], "top_p": [0.9, 1.0, 0.5, 0.8],
             "min_p": [0.05, 0.0, 0.1, 0.2], "repeat_penalty": [1.2, 1.0, 1.3, 0.8]}
    tensors = {name: torch.tensor(v, dtype=torch.long if name == "top_k" else torch.float32) for name, v in knobs.items()}
    expected = process_logits(logits, history, **tensors)
    per_row = {name: PerRow(v, torch.tensor(v, dtype=torch.float32)) for name, v in knobs.items()}
    syncs = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, real=real, name=name: syncs.append(name) or real(self, *a))
    got = process_logits(logits, history, **per_row)
    ids = sample(got, per_row["temperature"], uniform=torch.tensor([0.3, 0.0, 0.5, 0.9]))
    monkeypatch.undo()
    assert syncs == []
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert ids[1] == expected[1].argmax() and ids[2] == expected[2].argmax()  # greedy, and the overflow's limit
