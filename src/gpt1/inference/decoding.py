"""What a request's tokens become, and how its prompt is fitted: the rules of generation, in
one place (the engine applies them to every row).

- Generation stops at `[EOS]` or any other special token (a role marker means the model began
  a new turn) or when the text contains a stop string: finish reason "stop". The stop token
  and the stop string are not part of the text. It also stops after `max_new_tokens` or at the
  context limit (`block_size` positions): finish reason "length". A cancelled request ends at
  the next engine step: finish reason "cancelled".
- A prompt that does not leave room for `max_new_tokens` keeps its most recent tokens: at most
  `block_size - max_new_tokens`, but never fewer than half the context (a request for more
  tokens than that then ends at the context limit). `truncate_prompt=False` refuses such a
  prompt instead. An empty prompt starts from `[EOS]`, the boundary between documents.
- Text is streamed as complete UTF-8 characters (byte-level BPE may split one across tokens),
  and any text that may be the start of a stop string is held back until it is not.
- The repeat penalty looks at the last `repeat_last_n` tokens of the context (prompt included).
"""

from __future__ import annotations

import codecs
import operator
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

from gpt1.core.chat_template import encode_message, validate_messages
from gpt1.core.errors import Gpt1Error
from gpt1.core.sampling_params import SamplingParams
from gpt1.core.tokenizer import ASSISTANT, Tokenizer


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


def new_token_limit(prompt_tokens: int, block_size: int, params: SamplingParams) -> int:
    """How many tokens a fitted prompt can get: max_new_tokens, capped by the context left."""
    return min(params.max_new_tokens, block_size - prompt_tokens)


def prompt_budget(block_size: int, params: SamplingParams) -> int:
    """How many prompt tokens generation keeps (see the module docstring for the rule)."""
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


class ChatPrompt(NamedTuple):
    ids: list[int]
    dropped: int  # the oldest messages left out to fit
    cut: int  # tokens cut from the start of the last message's text, when it alone did not fit


def chat_prompt_ids(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], block_size: int,
                    params: SamplingParams) -> ChatPrompt:
    """Token ids of a chat prompt, fitted to the context: the system message stays, the oldest
    turns go first (the conversation then starts with a user turn, unless only its last message
    is left), and a last message still too long loses the start of its text, never its role
    marker; a system message that leaves no room is an error. With `truncate_prompt=False`
    nothing is dropped (the engine refuses a prompt that does not fit)."""
    messages = validate_messages(messages)
    # Each message is encoded once: dropping a turn subtracts its length (re-encoding the rest
    # after each drop made a long conversation quadratic, seconds of CPU in the server).
    pieces = [encode_message(tokenizer, m) for m in messages]
    generation_prompt = [tokenizer.special_id(ASSISTANT)]
    if not params.truncate_prompt:
        return ChatPrompt([i for piece in pieces for i in piece] + generation_prompt, 0, 0)
    budget = prompt_budget(block_size, params)
    n_system = 1 if messages[0]["role"] == "system" else 0
    first = n_system  # the first turn kept
    length = sum(map(len, pieces)) + len(generation_prompt)
    while length > budget and len(messages) - first > 1:
        length -= len(pieces[first])
        first += 1
        while len(messages) - first > 1 and messages[first]["role"] != "user":
            length -= len(pieces[first])
            first += 1
    kept = pieces[:n_system] + pieces[first:]
    ids = [i for piece in kept for i in piece] + generation_prompt
    dropped = first - n_system
    cut = len(ids) - budget
    if cut <= 0:
        return ChatPrompt(ids, dropped, 0)
    # One message is left besides the system message: its text follows its role marker. The
    # system message itself is never cut.
    start = len(ids) - len(generation_prompt) - len(kept[-1]) + 1
    text_tokens = len(tokenizer.encode(messages[-1]["content"]))
    if len(messages) == n_system or cut >= text_tokens:
        # What the prompt needs: all of it but the last message's text, of which one token.
        needed = len(ids) if len(messages) == n_system else len(ids) - text_tokens + 1
        why = (f"{block_size} of context less max_new_tokens {params.max_new_tokens}" if budget > block_size // 2
               else f"half the {block_size}-token context, as max_new_tokens {params.max_new_tokens} leaves less")
        # A max_new_tokens of at most block_size - needed lets the prompt take more than half.
        advice = f" or lower max_new_tokens to at most {block_size - needed}" if needed < block_size else ""
        raise Gpt1Error(f"the system message leaves no room for the conversation: the prompt needs {needed} tokens "
                        f"with it and may take {budget} here ({why}); shorten the system message{advice}")
    return ChatPrompt(ids[:start] + ids[start + cut:], dropped, cut)


class TextState:
    """One sequence's tokens turned into text pieces: an incremental UTF-8 decoder (byte-level
    BPE may split a character across tokens) plus stop strings, holding back any text that may
    be the start of one so that a stop string never reaches the caller."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...], prompt_tokens: int, limit: int):
        self._bytes_of = tokenizer.bytes_table  # per token: a list lookup (this runs once per streamed token)
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
        self._pending += self._decoder.decode(self._bytes_of[token_id])
        if not self._stop:
            text, self._pending = self._pending, ""
            if len(self.token_ids) >= self.limit:
                text += self.finish("length")
            return text
        if (end := self._stop_at()) is not None:
            text, self._pending = self._pending[:end], ""
            self.finish_reason = "stop"
            return text
        hold = max((k for s in self._stop for k in range(1, len(s)) if self._pending.endswith(s[:k])), default=0)
        cut = len(self._pending) - hold
        text, self._pending = self._pending[:cut], self._pending[cut:]
        if len(self.token_ids) >= self.limit:
            text += self.finish("length")
        return text

    def finish(self, reason: str) -> str:
        """The text held back, and the reason; "stop" (and the text before it) when a stop string
        ends that text only now: an unfinished character is flushed as U+FFFD, which a stop
        string may end with."""
        self._pending += self._decoder.decode(b"", final=True)
        if (end := self._stop_at()) is not None:
            self._pending, reason = self._pending[:end], "stop"
        text, self._pending = self._pending, ""
        self.finish_reason = reason
        return text

    def _stop_at(self) -> int | None:
        """Where the first stop string in the held-back text starts, or None."""
        return min((i for s in self._stop if (i := self._pending.find(s)) >= 0), default=None)


def check_prompt(prompt_ids: Sequence[int], vocab_size: int, eos_id: int, where: str) -> list[int]:
    """The prompt's token ids as ints ([EOS] for an empty prompt). NumPy and torch integers are
    ids too (operator.index); text, floats and bools are not."""
    if isinstance(prompt_ids, (str, bytes)):
        raise Gpt1Error(f"{where}: expected token ids (a list of ints), got text; encode it with the tokenizer first")
    ids = []
    for t in prompt_ids:
        try:
            if isinstance(t, bool):
                raise TypeError
            t = operator.index(t)
        except TypeError:
            raise Gpt1Error(f"{where}: token ids must be integers, got {t!r}") from None
        if not 0 <= t < vocab_size:
            raise Gpt1Error(f"{where}: token id {t} is outside the vocabulary [0, {vocab_size})")
        ids.append(t)
    return ids or [eos_id]
