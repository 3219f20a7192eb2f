"""Logits processors: how the next token is chosen from the model's logits.

Applied in this order, the order of Hugging Face `generate`:

    repeat penalty -> temperature -> top-k -> top-p -> min-p -> sample

llama.cpp (and llama-cpp-python) applies the temperature last, after top-k, top-p and min-p: with
a temperature other than 1, top-p and min-p keep another set of tokens there than here (the same
knobs on a GGUF export sample differently; top-k alone keeps the same tokens either way).

Each function takes logits of shape (batch, vocab) and returns new ones. A knob is one value
for every row, a tensor with one value per row, or `PerRow`: one value per row both on the
logits' device and on the host (what the engine passes: the batch's knobs differ, and what a step
skips is decided from the host's values, without waiting for the device); a row at the knob's
neutral value (penalty 1, top-k 0, top-p 1, min-p 0) is returned unchanged. The semantics are
those of `transformers`' RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper and MinPLogitsWarper (the tests check they are identical).
Temperature 0 means greedy: the most likely token after the repeat penalty. A filtered-out token
gets the logit -inf.

Every accepted knob value gives finite probabilities, in one place per knob: an extreme repeat
penalty saturates at float32's largest logit, and a row that a tiny temperature makes overflow
takes the limit of its distribution (its most likely tokens). `sample` never picks a
filtered-out token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class PerRow:
    """A knob with one value per row: `column` (batch,) on the logits' device, `values` the same
    numbers on the host, from which a step decides what it runs (whether a row uses the knob, the
    largest top-k, whether a row is greedy) with no sync."""

    values: Sequence[float]
    column: torch.Tensor


Knob = float | int | torch.Tensor | PerRow


def _per_row(value: Knob, logits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A knob as a (batch, 1) column."""
    if isinstance(value, PerRow):
        value = value.column
    elif not isinstance(value, torch.Tensor):
        value = torch.tensor(value, dtype=dtype)
    return value.to(device=logits.device, dtype=dtype).reshape(-1, 1).expand(logits.size(0), 1)


def _host_values(knob: Knob) -> Sequence[float] | None:
    """The knob's values on the host (one for all rows, or one per row); None for a tensor."""
    if isinstance(knob, PerRow):
        return knob.values
    return None if isinstance(knob, torch.Tensor) else (knob,)


def apply_repeat_penalty(logits: torch.Tensor, window: torch.Tensor, penalty: Knob) -> torch.Tensor:
    """Penalise every token id present in `window` (batch, n), as in the CTRL paper: a positive
    logit is divided by `penalty`, a negative one multiplied by it. Ids >= vocab size in the
    window are ignored (the engine marks padding and positions outside a row's window that way)."""
    vocab = logits.size(-1)
    penalty = _per_row(penalty, logits)
    present = torch.zeros(logits.size(0), vocab + 1, dtype=torch.bool, device=logits.device)
    present.scatter_(1, window.clamp(max=vocab), True)
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    # An extreme penalty overflows (or divides 0 by a penalty that float32 rounds to 0): keep it
    # finite. A logit that was -inf already (a token masked out) stays -inf, as in transformers.
    limit = torch.finfo(logits.dtype).max
    penalised = torch.where(logits.isfinite(), penalised.nan_to_num(nan=0.0, posinf=limit, neginf=-limit), logits)
    return torch.where(present[:, :vocab], penalised, logits)


def apply_temperature(logits: torch.Tensor, temperature: Knob) -> torch.Tensor:
    """Divide by the temperature (> 0): below 1 sharpens the distribution, above 1 flattens it.
    A row that overflows (a tiny temperature) becomes its limit: its most likely tokens only."""
    per_row = _per_row(temperature, logits)
    scaled = logits / per_row
    # A row overflows when its largest logit, finite, does (a -inf, a token masked out, stays as it
    # is; a very negative one made -inf is as good as masked). Chosen on the device, row by row:
    # asking the host whether any row overflowed would wait for it; and from the rows' maxima, so
    # that a step with none costs what a branch on the host did (two passes over the logits fewer
    # than comparing every logit).
    row_max = logits.amax(dim=-1, keepdim=True)
    overflow = row_max.isfinite() & ~(row_max / per_row).isfinite()
    return torch.where(overflow & (logits != row_max), float("-inf"), torch.where(overflow, 0.0, scaled))


def apply_top_k(logits: torch.Tensor, top_k: Knob) -> torch.Tensor:
    """Keep the `top_k` largest logits (and any tied with the k-th); 0 keeps all."""
    vocab = logits.size(-1)
    k = _per_row(top_k, logits, torch.long).clamp(max=vocab)
    host = _host_values(top_k)
    largest = min(max(host), vocab) if host is not None else int(k.max())
    if largest == 0:
        return logits
    values = torch.topk(logits, largest, dim=-1).values
    kth = values.gather(1, (k - 1).clamp(min=0))
    return torch.where((logits < kth) & (k > 0), float("-inf"), logits)


def apply_top_p(logits: torch.Tensor, top_p: Knob) -> torch.Tensor:
    """Nucleus sampling: keep the most likely tokens whose probabilities sum to at least `top_p`
    (always at least one); 1 keeps all."""
    top_p = _per_row(top_p, logits)
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= 1 - top_p
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted) & (top_p < 1)
    return logits.masked_fill(remove, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: Knob) -> torch.Tensor:
    """Keep tokens whose probability is at least `min_p` times that of the most likely token."""
    probs = logits.softmax(dim=-1)
    remove = probs < _per_row(min_p, logits) * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, float("-inf"))


def _any(knob: Knob, neutral: float) -> bool:
    """Whether some row's knob differs from its neutral value (else the step is skipped)."""
    values = _host_values(knob)
    if values is None:
        return bool((knob != neutral).any())  # a tensor: the host waits for the device
    return values.count(neutral) < len(values)


def process_logits(logits: torch.Tensor, window: torch.Tensor | None, *, temperature: Knob, top_k: Knob = 0,
                   top_p: Knob = 1.0, min_p: Knob = 0.0, repeat_penalty: Knob = 1.0) -> torch.Tensor:
    """All processors in the documented order. A greedy row (temperature 0) gets only the repeat
    penalty: `sample` takes its argmax. A step that no row uses is skipped (all-greedy logits
    without a penalty come back as they are, in the model's dtype: the argmax is the same)."""
    penalised = window is not None and window.numel() and _any(repeat_penalty, 1.0)
    if not penalised and not _any(temperature, 0.0):
        return logits
    logits = logits.float()
    if penalised:
        logits = apply_repeat_penalty(logits, window, repeat_penalty)
    if not _any(temperature, 0.0):
        return logits
    values = _host_values(temperature)
    some_greedy = 0 in values if values is not None else bool((temperature == 0).any())
    scale = _per_row(temperature, logits)
    if some_greedy:
        greedy = scale == 0
        scale = torch.where(greedy, 1.0, scale)
    processed = apply_temperature(logits, scale)
    if _any(top_k, 0):
        processed = apply_top_k(processed, top_k)
    if _any(top_p, 1.0):
        processed = apply_top_p(processed, top_p)
    if _any(min_p, 0.0):
        processed = apply_min_p(processed, min_p)
    return torch.where(greedy, logits, processed) if some_greedy else processed


def sample(logits: torch.Tensor, temperature: Knob, generators: Sequence[torch.Generator | None] = (), *,
           uniform: torch.Tensor | None = None) -> torch.Tensor:
    """One token id per row of processed logits (batch,): argmax where the temperature is 0, else
    a draw from the softmax with one uniform number from that row's own generator, so that a
    seeded row gives the same tokens whatever else is in the batch and concurrent requests share
    no RNG state. All rows are sampled in one batched call (inverse CDF). `uniform`, when given:
    the rows' numbers drawn already (batch,), each `torch.rand((), generator=g)` of its row's
    generator (any value for a greedy row), in place of drawing them here."""
    greedy_ids = logits.argmax(dim=-1)
    if not _any(temperature, 0.0):
        return greedy_ids
    probs = logits.softmax(dim=-1)
    if uniform is None:
        uniform = torch.stack([torch.rand((), generator=g) if g is not None else torch.zeros(()) for g in generators])
    uniform = uniform.to(probs.device)
    cdf = probs.cumsum(dim=-1)
    ids = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).clamp(max=probs.size(-1) - 1)
    # Rounding can land on a token of probability 0 at the very end: take the last possible one.
    last_possible = probs.size(-1) - 1 - (probs > 0).flip(-1).int().argmax(dim=-1, keepdim=True)
    ids = torch.where(probs.gather(1, ids) > 0, ids, last_possible)[:, 0]
    return torch.where(_per_row(temperature, logits)[:, 0] == 0, greedy_ids, ids)


def log_probs(logits: torch.Tensor, ids: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Of raw logits (n, vocab), the model's own distribution: each row's log-probability of its
    token `ids` (n,), and its `top` most likely tokens' (n, top) log-probabilities and ids, most
    likely first. In float32 whatever the logits' dtype (a bfloat16 log-softmax is off by ~1e-2)."""
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(1, ids.to(logits.device)[:, None])[:, 0]
    values, indices = logp.topk(min(top, logp.size(-1)), dim=-1)
    return chosen, values, indices
