"""Generation in-process: `stream`, `generate`, `generate_batch` and chat prompts.

Each call runs its prompts through a `gpt1.inference.engine.Engine` of its own, stepped by the
caller (no thread), so that these functions, `gpt1 chat`, the Python API and the server share
one decode path and one set of rules (`gpt1.inference.decoding`).
"""

from __future__ import annotations

import collections
import numbers
import sys
import threading
from typing import Any, Iterable, Iterator, Sequence, TypeAlias

import torch

from gpt1.core.errors import Gpt1Error
from gpt1.core.model import GPT
from gpt1.core.sampling_params import SamplingParams
from gpt1.core.tokenizer import Tokenizer
from gpt1.inference.decoding import Chunk, Completion, TextState, chat_prompt_ids, fit_prompt, new_token_limit, prompt_budget
from gpt1.inference.engine import Engine, fit_prompts

__all__ = ["Chunk", "Completion", "chat_prompt_ids", "fit_prompt", "generate", "generate_batch", "prompt_budget",
           "stream"]

# A prompt's token ids: a list, a tuple, a 1-D tensor or array, any iterable of ints.
PromptIds: TypeAlias = Iterable[int] | torch.Tensor

MAX_BATCH = 64  # generate_batch decodes at most this many prompts at once; the rest wait their turn


def _is_ids(value: Any) -> bool:
    """Whether `value` can be a prompt's token ids: an iterable that is not one int (an int, a NumPy
    integer, a 0-d tensor); decoding.check_prompt checks the ids themselves."""
    return isinstance(value, Iterable) and not isinstance(value, numbers.Integral) and getattr(value, "ndim", 1) != 0


def _check_params(params: Any) -> None:
    if not isinstance(params, SamplingParams):
        raise Gpt1Error(f"params: expected a SamplingParams (e.g. SamplingParams(temperature=0)), "
                        f"got {type(params).__name__}")


def _check_prompt_arg(prompt_ids: Any) -> None:
    if not _is_ids(prompt_ids):
        raise Gpt1Error(f"prompt_ids: expected a list of token ids, got {type(prompt_ids).__name__}")


def _run(model: GPT, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], params: SamplingParams,
         cancel: threading.Event | None = None) -> Iterator[tuple[int, Chunk, TextState]]:
    """(prompt index, chunk, its text state) as the engine produces them; each prompt ends with a
    finish reason."""
    if not prompts:
        return
    # The cache holds what these prompts need, not block_size positions per slot: a config.json's
    # block_size of 16M made a 1-token generate zero an 8 GiB cache.
    knobs, fitted = fit_prompts(prompts, params, model.config, tokenizer)
    max_len = max(len(ids) + new_token_limit(len(ids), model.config.block_size, p) for ids, p in zip(fitted, knobs))
    engine = Engine(model, tokenizer, max_batch=min(len(prompts), MAX_BATCH), max_queue=len(prompts),
                    cuda_graphs=False, max_len=max_len)
    is_finalizing = sys.is_finalizing  # held by this frame (see finally)
    events: collections.deque[tuple[int, Chunk | BaseException]] = collections.deque()
    requests = engine.submit(fitted, knobs, lambda i: lambda item: events.append((i, item)), cancel=cancel)
    try:
        while engine.busy or events:
            if not events:
                engine.step()
            while events:
                index, item = events.popleft()
                if isinstance(item, BaseException):
                    raise item
                yield index, item, requests[index].state
    finally:
        # A stream still held when the interpreter exits is closed during its teardown, when module
        # globals (torch, sys) may be None already: nothing is left to restore then.
        if not is_finalizing():
            engine.restore_threads()


def stream(model: GPT, tokenizer: Tokenizer, prompt_ids: PromptIds, params: SamplingParams,
           cancel: threading.Event | None = None) -> Iterator[Chunk]:
    """Generate from `prompt_ids`, yielding text pieces as soon as they are complete UTF-8.

    The last chunk carries the finish reason and the token counts. `cancel.set()` from another
    thread (e.g. when an HTTP client goes away) ends the stream at the next token. The arguments
    are checked at the call, as `generate` checks them.
    """
    _check_prompt_arg(prompt_ids)
    _check_params(params)
    # Not a generator function, whose checks would wait for the first next(): _run's generator
    # starts nothing until it is read.
    return (chunk for _, chunk, _ in _run(model, tokenizer, [prompt_ids], params, cancel))


def generate(model: GPT, tokenizer: Tokenizer, prompt_ids: PromptIds, params: SamplingParams) -> Completion:
    """The whole completion of one prompt."""
    _check_prompt_arg(prompt_ids)
    return generate_batch(model, tokenizer, [prompt_ids], params)[0]


def generate_batch(model: GPT, tokenizer: Tokenizer, prompts: Iterable[PromptIds],
                   params: SamplingParams) -> list[Completion]:
    """Completions of several prompts decoded together. Greedy output equals one-at-a-time
    generation; with a seed, each prompt draws from its own generator seeded with it, so a
    seeded prompt gives the same text alone or in a batch."""
    _check_params(params)
    if not _is_ids(prompts) or isinstance(prompts, str):
        raise Gpt1Error(f"prompts: expected a list of prompts (each a list of token ids), got {type(prompts).__name__}")
    prompts = list(prompts)  # a generator is read once (counted here, then decoded)
    for i, prompt in enumerate(prompts):  # a check per prompt, not per token
        if not _is_ids(prompt):
            got = ("a list of ints (one prompt is [ids])" if isinstance(prompt, numbers.Integral) or
                   getattr(prompt, "ndim", 1) == 0 else f"{type(prompt).__name__} at index {i}")
            raise Gpt1Error(f"prompts: expected a list of prompts (each a list of token ids), got {got}")
    texts: list[list[str]] = [[] for _ in prompts]
    states: dict[int, TextState] = {}
    for i, chunk, state in _run(model, tokenizer, prompts, params):
        texts[i].append(chunk.text)
        states[i] = state
    return [Completion("".join(texts[i]), states[i].token_ids, states[i].finish_reason, states[i].prompt_tokens,
                       states[i].completion_tokens) for i in range(len(prompts))]
