"""The decode loop: prefill the prompt once, then one token at a time with the KV cache.

`stream` yields text as soon as it is complete UTF-8, `generate` returns the whole completion,
`generate_batch` decodes several prompts of different lengths together (left padding plus an
attention mask; its greedy output equals one-at-a-time generation). All three take a
`SamplingParams`; the logits processors live in `gpt1.inference.sampling`.

Rules, in one place:
- Generation stops at `[EOS]` or any other special token (a role marker means the model began
  a new turn) or when the text contains a stop string: finish reason "stop". The stop token
  and the stop string are not part of the text. It also stops after `max_new_tokens` or at the
  context limit (`block_size` positions): finish reason "length". A `cancel` event set from
  another thread ends a stream at the next token: finish reason "cancelled".
- A prompt that does not leave room for `max_new_tokens` keeps its most recent tokens: at most
  `block_size - max_new_tokens`, but never fewer than half the context (a request for more
  tokens than that then ends at the context limit). `truncate_prompt=False` refuses such a
  prompt instead. An empty prompt starts from `[EOS]`, the boundary between documents.
- The repeat penalty looks at the last `repeat_last_n` tokens of the context (prompt included).
"""

from __future__ import annotations

import codecs
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from gpt1.core.chat_template import encode_chat, validate_messages
from gpt1.core.errors import Gpt1Error
from gpt1.core.model import GPT, KVCache
from gpt1.core.sampling_params import SamplingParams
from gpt1.core.tokenizer import Tokenizer
from gpt1.inference.sampling import process_logits, sample


@dataclass
class Chunk:
    """One streamed piece of text: complete UTF-8 characters only."""

    text: str
    finish_reason: str | None = None  # on the last chunk: "stop", "length" or "cancelled"
    prompt_tokens: int = 0  # prompt tokens the model saw (after any truncation)
    completion_tokens: int = 0  # tokens generated so far, the stop token included


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # generated tokens, without the special token that stopped them
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


def prompt_budget(block_size: int, params: SamplingParams) -> int:
    """How many prompt tokens `generate` keeps (see the module docstring for the rule)."""
    if not params.truncate_prompt:
        return block_size - params.max_new_tokens
    return max(block_size - params.max_new_tokens, block_size // 2)


def fit_prompt(prompt_ids: Sequence[int], block_size: int, params: SamplingParams) -> list[int]:
    """The prompt as the model will see it: its most recent tokens, or a Gpt1Error when it does
    not fit and `params.truncate_prompt` is False."""
    budget = prompt_budget(block_size, params)
    if len(prompt_ids) <= budget:
        return list(prompt_ids)
    if not params.truncate_prompt:
        raise Gpt1Error(
            f"the prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({params.max_new_tokens}) exceed the "
            f"context of {block_size} tokens; shorten the prompt, lower max_new_tokens, or allow truncation"
        )
    return list(prompt_ids[len(prompt_ids) - budget:])


def chat_prompt_ids(tokenizer: Tokenizer, messages: Sequence[dict[str, str]], block_size: int,
                    params: SamplingParams) -> tuple[list[int], int]:
    """Token ids of a chat prompt and how many of the oldest messages were dropped to fit the
    context: the system message stays, the oldest turns go first, and the conversation then
    starts with a user turn. With `truncate_prompt=False` nothing is dropped."""
    messages = validate_messages(messages)
    ids = encode_chat(tokenizer, messages)
    if not params.truncate_prompt:
        return ids, 0
    budget = prompt_budget(block_size, params)
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    dropped = 0
    while len(ids) > budget and len(turns) > 1:
        turns.pop(0)
        dropped += 1
        while len(turns) > 1 and turns[0]["role"] != "user":
            turns.pop(0)
            dropped += 1
        ids = encode_chat(tokenizer, system + turns)
    return ids, dropped


class _TextState:
    """One sequence's tokens turned into text pieces: an incremental UTF-8 decoder (byte-level
    BPE may split a character across tokens) plus stop strings, holding back any text that may
    be the start of one so that a stop string never reaches the caller."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...], prompt_tokens: int, limit: int):
        self._to_bytes = tokenizer.id_to_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = stop
        self._pending = ""
        self.prompt_tokens = prompt_tokens
        self.limit = limit
        self.token_ids: list[int] = []
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    def add(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        self.completion_tokens += 1
        self._pending += self._decoder.decode(self._to_bytes([token_id]))
        hits = [i for s in self._stop if (i := self._pending.find(s)) >= 0]
        if hits:
            text, self._pending = self._pending[:min(hits)], ""
            self.finish_reason = "stop"
            return text
        hold = max((k for s in self._stop for k in range(1, len(s)) if self._pending.endswith(s[:k])), default=0)
        cut = len(self._pending) - hold
        text, self._pending = self._pending[:cut], self._pending[cut:]
        if len(self.token_ids) >= self.limit:
            text += self.finish("length")
        return text

    def finish(self, reason: str) -> str:
        text, self._pending = self._pending + self._decoder.decode(b"", final=True), ""
        self.finish_reason = reason
        return text


def _check_prompt(prompt_ids: Sequence[int], vocab_size: int, eos_id: int, where: str) -> list[int]:
    ids = list(prompt_ids)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise Gpt1Error(f"{where}: token id {t!r} is outside the vocabulary [0, {vocab_size})")
    return ids or [eos_id]


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def _decode(model: GPT, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], params: SamplingParams,
            cancel: threading.Event | None = None) -> Iterator[tuple[int, str, _TextState]]:
    """The decode loop for a batch: yields (row, new text, that row's state) whenever a row has
    new text or finishes; each row finishes exactly once (its state's finish_reason is set)."""
    params = params.validate()
    config = model.config
    block, vocab = config.block_size, config.vocab_size
    if not prompts:
        return
    names = [f"prompt {i}" for i in range(len(prompts))] if len(prompts) > 1 else ["prompt"]
    prompts = [fit_prompt(_check_prompt(p, vocab, tokenizer.eos_id, name), block, params) for p, name in zip(prompts, names)]
    first = next(model.parameters())
    device = first.device
    lengths = [len(p) for p in prompts]
    B, L = len(prompts), max(lengths)
    limits = [min(params.max_new_tokens, block - n) for n in lengths]
    steps = max(limits)
    padded = min(lengths) != L
    stop_ids = set(tokenizer.special_ids)
    states = [_TextState(tokenizer, params.stop, n, limit) for n, limit in zip(lengths, limits)]
    rows = list(range(B))  # the original index of each row still decoding
    generators = [_generator(params.seed, device) for _ in range(B)] if params.temperature > 0 else []

    with torch.inference_mode():
        # Column c of `tokens` is cache position c; `vocab` marks "no token" (left padding and
        # the future), which the repeat penalty ignores.
        tokens = torch.full((B, L + steps), vocab, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            tokens[i, L - len(p):L] = torch.tensor(p, dtype=torch.long)
        key_mask = tokens != vocab
        key_mask[:, L:] = True
        next_pos = torch.tensor(lengths, device=device)  # each row's position of its next token
        cache = KVCache(config, B, max_len=L + steps, device=device, dtype=first.dtype)
        if padded:
            positions = (key_mask[:, :L].long().cumsum(1) - 1).clamp(min=0)
            ids = tokens[:, :L].masked_fill(~key_mask[:, :L], tokenizer.pad_id)
            logits = model(ids, cache=cache, positions=positions, attention_mask=key_mask, last_only=True)[:, -1]
        else:
            logits = model(tokens[:, :L], cache=cache, last_only=True)[:, -1]

    for t in range(steps):
        if cancel is not None and cancel.is_set():
            for i in rows:
                yield i, states[i].finish("cancelled"), states[i]
            return
        column = L + t
        with torch.inference_mode():
            start = 0 if params.repeat_last_n == -1 else max(0, column - params.repeat_last_n)
            window = tokens[:, start:column] if params.repeat_last_n else None
            processed = process_logits(logits, window, temperature=params.temperature, top_k=params.top_k,
                                       top_p=params.top_p, min_p=params.min_p, repeat_penalty=params.repeat_penalty)
            next_ids = sample(processed, params.temperature, generators)
            tokens[:, column] = next_ids
        keep = []
        for j, (i, token) in enumerate(zip(rows, next_ids.tolist())):
            state = states[i]
            if token in stop_ids:
                state.completion_tokens += 1
                text = state.finish("stop")
            else:
                text = state.add(token)
            if text or state.finish_reason:
                yield i, text, state
            if state.finish_reason is None:
                keep.append(j)
        if not keep:
            return
        with torch.inference_mode():
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=device)
                cache.reorder(index)
                tokens, key_mask, next_pos = tokens[index], key_mask[index], next_pos[index]
                rows = [rows[j] for j in keep]
                generators = [generators[j] for j in keep] if generators else []
            x = tokens[:, column:column + 1]
            if padded:
                logits = model(x, cache=cache, positions=next_pos[:, None] + t, attention_mask=key_mask, last_only=True)[:, -1]
            else:
                logits = model(x, cache=cache, last_only=True)[:, -1]


def stream(model: GPT, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
           cancel: threading.Event | None = None) -> Iterator[Chunk]:
    """Generate from `prompt_ids`, yielding text pieces as soon as they are complete UTF-8.

    The last chunk carries the finish reason and the token counts. `cancel.set()` from another
    thread (e.g. when an HTTP client goes away) ends the stream at the next token.
    """
    for _, text, state in _decode(model, tokenizer, [prompt_ids], params, cancel):
        yield Chunk(text, state.finish_reason, state.prompt_tokens, state.completion_tokens)


def generate(model: GPT, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams) -> Completion:
    """The whole completion of one prompt."""
    return generate_batch(model, tokenizer, [prompt_ids], params)[0]


def generate_batch(model: GPT, tokenizer: Tokenizer, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
    """Completions of several prompts decoded together (left-padded to the longest). Greedy
    output equals one-at-a-time generation; with a seed, each prompt draws from its own
    generator seeded with it, so a seeded prompt gives the same text alone or in a batch."""
    texts = [[] for _ in prompts]
    states: dict[int, _TextState] = {}
    for i, text, state in _decode(model, tokenizer, prompts, params):
        texts[i].append(text)
        states[i] = state
    return [Completion("".join(texts[i]), states[i].token_ids, states[i].finish_reason, states[i].prompt_tokens,
                       states[i].completion_tokens) for i in range(len(prompts))]
