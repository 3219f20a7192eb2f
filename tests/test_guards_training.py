"""Regression guards for training inputs: the learning-rate curve between its endpoints, the
shortest warmup, chat batches at an epoch's exact end, and a conversation that exactly fills
the context.

Each test here failed on a mutant of the line it guards (mutation testing, pass 13)."""

import math

import numpy as np
import pytest

from gpt1.core.chat_template import encode_chat_with_labels
from gpt1.data.chat import ChatBatches, EncodedChats, encode_conversations
from gpt1.data.chat_sources import Conversation
from gpt1.train.schedule import BudgetSchedule, lr_at, warmup_steps

LR, MIN_LR = 1e-3, 1e-4


def cosine(step: int, max_steps: int, n_warm: int) -> float:
    """The half cosine from LR after the warmup to MIN_LR at the last step (nanoGPT's get_lr)."""
    progress = (step - n_warm) / (max_steps - 1 - n_warm)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * progress)) * (LR - MIN_LR)


@pytest.mark.parametrize("warmup", [0.0, 0.1])
def test_the_decay_follows_the_closed_form_cosine_between_its_endpoints(warmup):
    n_warm = warmup_steps(1000, warmup)
    for step in (n_warm + 100, 250, 500, 750, 900):
        assert lr_at(step, 1000, LR, MIN_LR, warmup) == pytest.approx(cosine(step, 1000, n_warm), rel=1e-12), step
    # 8.68e-4 a quarter of the way down (a straight line gives 7.75e-4)
    assert lr_at(250, 1000, LR, MIN_LR, 0.0) == pytest.approx(8.6795e-4, rel=1e-4)


def test_a_time_budget_on_a_steady_plan_follows_the_same_cosine():
    schedule = BudgetSchedule(LR, MIN_LR, 0.0, 0.0)
    rates = [schedule.at(step, 1000, False) for step in range(1000)]
    for step in (250, 500, 750):
        assert rates[step] == pytest.approx(cosine(step, 1000, 0), rel=1e-9), step


@pytest.mark.parametrize("max_steps, warmup", [(100, 0.004), (1000, 1e-4)])
def test_a_warmup_that_rounds_to_zero_steps_still_takes_one(max_steps, warmup):
    """warmup * max_steps < 0.5: one warmup step (at the peak), then the cosine starts at the peak."""
    assert warmup_steps(max_steps, warmup) == 1
    assert lr_at(0, max_steps, LR, MIN_LR, warmup) == LR
    assert lr_at(1, max_steps, LR, MIN_LR, warmup) == LR  # the decay's first step, not one step into it
    assert lr_at(max_steps - 1, max_steps, LR, MIN_LR, warmup) == pytest.approx(MIN_LR)


def _four_sequences(n: int = 4) -> EncodedChats:
    """Sequence i is [1, 10 + i, 11 + i]: its second id names it."""
    tokens = np.concatenate([np.array([1, 10 + i, 11 + i], np.int32) for i in range(n)])
    return EncodedChats(tokens, np.ones(3 * n, bool), np.arange(0, 3 * n + 1, 3, dtype=np.int64))


@pytest.mark.parametrize("micro_batch, grad_accum", [(2, 1), (1, 2), (1, 4)])
def test_whole_epochs_serve_every_sequence_once_each_in_its_own_permutation(micro_batch, grad_accum):
    """4 sequences in steps of 2 or 4: every step ends exactly at an epoch's end or inside it."""
    data, seed, epochs = _four_sequences(), 3, 3
    per_step = micro_batch * grad_accum
    source = ChatBatches(data, micro_batch=micro_batch, seed=seed)
    served = []
    for _ in range(epochs * len(data) // per_step):
        served += [int(t) - 10 for x, _ in source.next_step(grad_accum) for t in x[:, 1]]
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(data))
        got = served[epoch * len(data):(epoch + 1) * len(data)]
        # within a step the micro-batches deal its sequences round-robin; the step's set is the order's slice
        for start in range(0, len(data), per_step):
            assert sorted(got[start:start + per_step]) == sorted(order[start:start + per_step].tolist()), epoch
    assert np.bincount(served).tolist() == [epochs] * len(data)
    assert source.state_dict() == {"epoch": epochs, "position": 0, "seed": seed, "sequences": len(data)}


def test_a_conversation_that_exactly_fills_the_context_is_one_sequence(tokenizer):
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello, how are you?"},
                {"role": "user", "content": "Fine."}, {"role": "assistant", "content": "Good to hear."}]
    ids, _ = encode_chat_with_labels(tokenizer, messages)
    exact = encode_conversations(tokenizer, [Conversation(messages, "g")], max_len=len(ids))
    assert len(exact) == 1 and exact.sequence(0)[0].tolist() == ids and not exact.skipped
    shorter = encode_conversations(tokenizer, [Conversation(messages, "g")], max_len=len(ids) - 1)
    assert len(shorter) == 2 and shorter.skipped == {"conversations split at turn boundaries": 1}
