"""What a submission passes before an engine holds it, for both engines (`Engine`, in this
process, and `EngineProcess`, which checks in the parent what its child would): its prompts and
knobs checked and fitted to the context (`fit_prompts`), the engine's sizes (`check_sizes`), and
room for it now (`check_room`: `TooLarge`, `QueueFull`)."""

from __future__ import annotations

import numbers
from typing import Iterable, Sequence, Sized

from gpt1.core.errors import Gpt1Error
from gpt1.core.sampling_params import SamplingParams
from gpt1.core.tokenizer import Tokenizer
from gpt1.inference.decoding import check_prompt, fit_prompt


class QueueFull(Gpt1Error):
    """Every slot and queue place is taken right now (the server answers 503)."""


class TooLarge(Gpt1Error):
    """A submission with more prompts than the engine can ever hold (the server answers 400)."""


def fit_prompts(prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams], config,
                tokenizer: Tokenizer) -> tuple[list[SamplingParams], list[list[int]]]:
    """Each prompt's checked knobs (`params`: one for all prompts, or one per prompt), and each
    prompt checked (ids in the vocabulary, not empty) and fitted to the context; Gpt1Error naming
    the prompt or the knob otherwise."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts) if isinstance(prompts, Sized) else [params]
    elif not isinstance(params, (list, tuple)) or not all(isinstance(p, SamplingParams) for p in params):
        raise Gpt1Error(f"params: expected SamplingParams (or one per prompt), got {type(params).__name__}")
    expected = "prompts: expected a list of prompts (each a list of token ids)"
    if isinstance(prompts, (str, bytes)):
        raise Gpt1Error(f"{expected}, got text; encode each prompt with the tokenizer first")
    if not isinstance(prompts, Sized) or not isinstance(prompts, Iterable):
        raise Gpt1Error(f"{expected}, got {type(prompts).__name__}")
    # One prompt's ids passed flat (`tok.encode(text)` for `[tok.encode(text)]`): an int where a prompt goes.
    if any(isinstance(p, numbers.Integral) or getattr(p, "ndim", None) == 0 for p in prompts):
        raise Gpt1Error(f"{expected}, got a list of ints; pass one prompt as [ids]")
    if len(params) != len(prompts):
        raise Gpt1Error(f"params: {len(params)} SamplingParams for {len(prompts)} prompts; pass one, or one per prompt")
    if all(p is params[0] for p in params):  # one SamplingParams for all prompts: checked once, not per prompt
        params = [params[0].validate()] * len(params) if params else []
    else:
        params = [p.validate() for p in params]
    names = [f"prompt {i}" for i in range(len(prompts))] if len(prompts) > 1 else ["prompt"]
    for p, name in zip(prompts, names):
        if not isinstance(p, Iterable):
            raise Gpt1Error(f"{name}: expected token ids (a list of ints), got {type(p).__name__}")
    if config.block_size < 2:  # its one position holds the prompt's last token: none is left for a new one
        raise Gpt1Error(f"a model with a {config.block_size}-token context (block_size) has no position for a new "
                        "token: it cannot generate")
    vocab = usable_vocab(config, tokenizer)
    return params, [fit_prompt(check_prompt(p, vocab, tokenizer.eos_id, name), config.block_size, knobs)
                    for p, name, knobs in zip(prompts, names, params)]


def usable_vocab(config, tokenizer: Tokenizer) -> int:
    """The ids a model can generate and its tokenizer decode. A model may have more embeddings
    than its tokenizer has tokens (padded to a multiple of 64, as `transformers`'
    `resize_token_embeddings(pad_to_multiple_of=...)` does): those rows are never sampled."""
    return min(config.vocab_size, tokenizer.vocab_size)


def check_sizes(max_batch: int, max_queue: int, prefill_chunk: int) -> None:
    """Gpt1Error unless max_batch and prefill_chunk are >= 1 and max_queue >= 0."""
    if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
        raise Gpt1Error(f"engine: max_batch and prefill_chunk must be >= 1 and max_queue >= 0, got "
                        f"{max_batch}, {prefill_chunk} and {max_queue}")


def check_room(n: int, max_batch: int, max_queue: int, active: int, queued: int) -> None:
    """TooLarge when `n` prompts exceed what the engine ever holds, QueueFull when they do not fit now.

    Only `active + queued`, the requests the engine holds, counts, and the message splits them
    as the engine runs them (`max_batch` generating, the rest waiting): the split of the moment
    is no answer to give a client, since a request waits for the next step to take a free slot
    (0 generating while one is about to), and `EngineProcess` knows only the sum (its child
    admits them), which it passes as `active`."""
    capacity, held = max_batch + max_queue, active + queued
    if n > capacity:
        raise TooLarge(f"{n} prompts in one request, but this server holds at most {capacity} at once "
                       f"({max_batch} generating + {max_queue} waiting); send at most {capacity}")
    if n > capacity - held:
        generating = min(held, max_batch)
        room = f"; {n} prompts in one request need {n} places" if n > 1 else ""
        raise QueueFull(f"the server is busy ({generating} of {max_batch} slots generating, {held - generating} "
                        f"of {max_queue} queue places waiting{room}); retry later")
