"""Generation in-process: `stream`, `generate`, `generate_batch`, `stream_batch` and chat prompts.

Each call runs its prompts through a `gpt1.inference.engine.Engine` of its own, stepped by the
caller (no thread), so that these functions, `gpt1 chat`, the Python API and the server share
one decode path and one set of rules (`gpt1.inference.decoding`).
"""

from __future__ import annotations

import collections
import numbers
import sys
import threading
from collections.abc import Generator
from typing import Any, Iterable, Iterator, Sequence, TypeAlias

import torch

from gpt1.core.errors import Gpt1Error
from gpt1.core.model import GPT
from gpt1.core.sampling_params import SamplingParams
from gpt1.core.threads import own_threads
from gpt1.core.tokenizer import Tokenizer
from gpt1.inference.admission import fit_prompts
from gpt1.inference.decoding import Chunk, Completion, TextState, chat_prompt_ids, fit_prompt, new_token_limit, prompt_budget
from gpt1.inference.engine import Engine

__all__ = ["Chunk", "Completion", "chat_prompt_ids", "fit_prompt", "generate", "generate_batch", "prompt_budget",
           "stream", "stream_batch"]

# A prompt's token ids: a list, a tuple, a 1-D tensor or array, any iterable of ints.
PromptIds: TypeAlias = Iterable[int] | torch.Tensor

MAX_BATCH = 64  # generate_batch decodes at most this many prompts at once; the rest wait their turn


def _is_ids(value: Any) -> bool:
    """Whether `value` can be a prompt's token ids: an iterable that is not one int (an int, a NumPy
    integer, a 0-d tensor); decoding.check_prompt checks the ids themselves."""
    return isinstance(value, Iterable) and not isinstance(value, numbers.Integral) and getattr(value, "ndim", 1) != 0


def _check_params(params: Any, per_prompt: bool = False) -> None:
    """A SamplingParams; with `per_prompt`, a list or tuple of them is one too (one per prompt)."""
    if isinstance(params, SamplingParams) or (per_prompt and isinstance(params, (list, tuple))
                                              and all(isinstance(p, SamplingParams) for p in params)):
        return
    what = "a SamplingParams (e.g. SamplingParams(temperature=0))" + (" or a list of one per prompt" if per_prompt else "")
    raise Gpt1Error(f"params: expected {what}, got {type(params).__name__}")


def _check_prompt_arg(prompt_ids: Any) -> None:
    if not _is_ids(prompt_ids):
        raise Gpt1Error(f"prompt_ids: expected a list of token ids, got {type(prompt_ids).__name__}")


def _run(model: GPT, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
         cancel: threading.Event | None = None, streamed: bool = False) -> Iterator[tuple[int, Chunk, TextState]]:
    """(prompt index, chunk, its text state) as the engine produces them; each prompt ends with a
    finish reason.

    A step runs on the thread tuner's CPU thread count, set on the thread that steps (`Engine`):
    the thread gets its own count back when the run ends and, `streamed` (a caller's stream), at
    every chunk, since the reader's code runs between chunks and the next one may be read on
    another thread (Starlette reads a StreamingResponse's iterator a next() per worker thread:
    each worker was left on the tuner's count for good, and later calls there never tuned)."""
    if not prompts:
        return
    # The reading thread's own count (read first: a pool's new worker takes its count at its first
    # torch op), and whether a step may have changed it since.
    own, stepped = own_threads(), False
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
                stepped = True
                engine.step()
            while events:
                index, item = events.popleft()
                if isinstance(item, BaseException):
                    raise item
                if streamed and stepped:
                    _set_threads(own)
                    stepped = False
                yield index, item, requests[index].state
                if streamed:
                    own = own_threads()  # of the thread that reads on, maybe another one
    finally:
        # A stream still held when the interpreter exits is closed during its teardown, when module
        # globals (torch, sys) may be None already: nothing is left to restore then. A stream closed
        # between chunks gave its count back at the last one (the closing thread stepped nothing).
        if stepped and not is_finalizing():
            _set_threads(own)


def _set_threads(threads: int) -> None:
    """The calling thread's CPU thread count, set only when it differs (a set also sets the count
    of the threads started later: see gpt1.core.threads)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def stream(model: GPT, tokenizer: Tokenizer, prompt_ids: PromptIds, params: SamplingParams,
           cancel: threading.Event | None = None) -> Generator[Chunk, None, None]:
    """Generate from `prompt_ids`, yielding text pieces as soon as they are complete UTF-8.

    The last chunk carries the finish reason and the token counts. `cancel.set()` from another
    thread (e.g. when an HTTP client goes away) ends the stream at the next token. The arguments
    are checked at the call, as `generate` checks them.
    """
    _check_prompt_arg(prompt_ids)
    _check_params(params)
    # Not a generator function, whose checks would wait for the first next(): _run's generator
    # starts nothing until it is read.
    return (chunk for _, chunk, _ in _run(model, tokenizer, [prompt_ids], params, cancel, streamed=True))


def generate(model: GPT, tokenizer: Tokenizer, prompt_ids: PromptIds, params: SamplingParams) -> Completion:
    """The whole completion of one prompt."""
    _check_prompt_arg(prompt_ids)
    return generate_batch(model, tokenizer, [prompt_ids], params)[0]


def stream_batch(model: GPT, tokenizer: Tokenizer, prompts: Iterable[PromptIds],
                 params: SamplingParams | Sequence[SamplingParams]) -> Generator[tuple[int, Chunk], None, None]:
    """Several prompts decoded together (`params`: one for all, or one per prompt), yielding
    (prompt index, chunk) as they are produced; each prompt's last chunk carries its finish reason
    and token counts. The arguments are checked at the call, as `stream` checks them."""
    prompts = _checked_prompts(prompts, params)
    return ((i, chunk) for i, chunk, _ in _run(model, tokenizer, prompts, params, streamed=True))


def generate_batch(model: GPT, tokenizer: Tokenizer, prompts: Iterable[PromptIds],
                   params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
    """Completions of several prompts decoded together; `params`: one for all, or one per prompt.
    Greedy output equals one-at-a-time generation; with a seed, each prompt draws from its own
    generator seeded with it, so a seeded prompt gives the same text alone or in a batch (and one
    prompt repeated under one seed gives one text: `params.samples(n)` for n samples of it)."""
    prompts = _checked_prompts(prompts, params)
    texts: list[list[str]] = [[] for _ in prompts]
    states: dict[int, TextState] = {}
    logprobs: list[list | None] = [None] * len(prompts)
    prompt_logprobs: list[list | None] = [None] * len(prompts)
    for i, chunk, state in _run(model, tokenizer, prompts, params):
        texts[i].append(chunk.text)
        states[i] = state
        if chunk.logprobs is not None:
            logprobs[i] = logprobs[i] or []
            logprobs[i] += chunk.logprobs
        if chunk.prompt_logprobs is not None:
            prompt_logprobs[i] = chunk.prompt_logprobs
    return [Completion("".join(texts[i]), states[i].token_ids, states[i].finish_reason, states[i].prompt_tokens,
                       states[i].completion_tokens, logprobs[i], prompt_logprobs[i]) for i in range(len(prompts))]


def _checked_prompts(prompts: Any, params: Any) -> list[PromptIds]:
    """`prompts` as a list (a generator is read once: counted here, then decoded), each checked to
    be token ids; and `params` one SamplingParams or one per prompt."""
    _check_params(params, per_prompt=True)
    if not _is_ids(prompts) or isinstance(prompts, str):
        raise Gpt1Error(f"prompts: expected a list of prompts (each a list of token ids), got {type(prompts).__name__}")
    prompts = list(prompts)
    for i, prompt in enumerate(prompts):  # a check per prompt, not per token
        if not _is_ids(prompt):
            got = ("a list of ints (one prompt is [ids])" if isinstance(prompt, numbers.Integral) or
                   getattr(prompt, "ndim", 1) == 0 else f"{type(prompt).__name__} at index {i}")
            raise Gpt1Error(f"prompts: expected a list of prompts (each a list of token ids), got {got}")
    return prompts
