"""Logits processors: how the next token is chosen from the model's logits.

Applied in this order, the order of Hugging Face `generate` and llama.cpp:

    repeat penalty -> temperature -> top-k -> top-p -> min-p -> sample

Each function takes logits of shape (batch, vocab) and returns new ones; the semantics are
those of `transformers`' RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper and MinPLogitsWarper (the tests check they are identical).
Temperature 0 means greedy: the most likely token after the repeat penalty; top-k, top-p and
min-p then change nothing and are skipped. A filtered-out token gets the logit -inf.
"""

from __future__ import annotations

from typing import Sequence

import torch


def apply_repeat_penalty(logits: torch.Tensor, window: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise every token id present in `window` (batch, n), as in the CTRL paper: a positive
    logit is divided by `penalty`, a negative one multiplied by it. Ids >= vocab size in the
    window are ignored (the decode loop marks padding that way)."""
    vocab = logits.size(-1)
    present = torch.zeros(logits.size(0), vocab + 1, dtype=torch.bool, device=logits.device)
    present.scatter_(1, window.clamp(max=vocab), True)
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(present[:, :vocab], penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by the temperature (> 0): below 1 sharpens the distribution, above 1 flattens it."""
    return logits / temperature


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the `top_k` largest logits (and any tied with the k-th)."""
    kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus sampling: keep the most likely tokens whose probabilities sum to at least `top_p`
    (always at least one)."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= 1 - top_p
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least `min_p` times that of the most likely token."""
    probs = logits.softmax(dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(logits: torch.Tensor, window: torch.Tensor | None, *, temperature: float, top_k: int = 0,
                   top_p: float = 1.0, min_p: float = 0.0, repeat_penalty: float = 1.0) -> torch.Tensor:
    """All processors in the documented order; the neutral value of a knob skips its step
    (repeat_penalty 1, top_k 0, top_p 1, min_p 0; temperature 0 = greedy skips the rest)."""
    logits = logits.float()
    if repeat_penalty != 1.0 and window is not None and window.numel():
        logits = apply_repeat_penalty(logits, window, repeat_penalty)
    if temperature == 0:
        return logits
    logits = apply_temperature(logits, temperature)
    if top_k > 0:
        logits = apply_top_k(logits, top_k)
    if top_p < 1.0:
        logits = apply_top_p(logits, top_p)
    if min_p > 0.0:
        logits = apply_min_p(logits, min_p)
    return logits


def sample(logits: torch.Tensor, temperature: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token id per row of processed logits (batch,): argmax when temperature is 0, else a
    draw from the softmax with that row's own generator, so that a seeded row gives the same
    tokens whether it runs alone or in a batch, and concurrent requests share no RNG state."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])
