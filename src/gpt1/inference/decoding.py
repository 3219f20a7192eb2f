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
  prompt instead. An empty prompt starts from `[EOS]`, the boundary between documents. A
  max_new_tokens that the caller did not choose (gpt1's default) is first capped at the room a
  prompt that fits leaves (`fit_new_tokens`: the CLI, the Python API and the server), so that
  such a prompt is kept whole.
- Only the end of a text longer than the context can reach the model: with truncation on, a
  prompt, or a chat message but the system message, is tokenized from its end (`prompt_tail`),
  which gives the ids the whole text ends with, more of them than any fitted prompt keeps; what
  was cut is then told in characters. Tokenizing the whole took 130-150 bytes a character (50 MB:
  7-7.5 GB) to keep a context's worth.
- Text is streamed as complete UTF-8 characters (byte-level BPE may split one across tokens),
  and any text that may be the start of a stop string is held back until it is not. A reply
  that finishes a character the prompt's token ids left unfinished starts with that character.
- The repeat penalty looks at the last `repeat_last_n` tokens of the context (prompt included).
"""

from __future__ import annotations

import codecs
import dataclasses
import operator
from typing import Any, Mapping, NamedTuple, Sequence

from gpt1.core.chat_template import encode_message, validate_messages
from gpt1.core.errors import Gpt1Error
from gpt1.core.progress import warn
from gpt1.core.sampling_params import SamplingParams
from gpt1.core.text_pieces import SPACE_BOUNDARY
from gpt1.core.tokenizer import ASSISTANT, Tokenizer


class TokenLogprob(NamedTuple):
    """A token's log-probability under the model (natural log), and the most likely tokens at its
    place with theirs, most likely first (as many as the request's logprobs asked for)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass
class Chunk:
    """One streamed piece of text: complete UTF-8 characters only."""

    text: str
    finish_reason: str | None = None  # on the last chunk: "stop", "length" or "cancelled"
    prompt_tokens: int = 0  # prompt tokens the model saw (after any truncation)
    completion_tokens: int = 0  # tokens generated so far, the stop token included
    # With SamplingParams.logprobs: the tokens generated since the last chunk (a token whose text is
    # held back, a stop string's start or half a character, comes with the chunk that sends it; the
    # special token that stops generation, counted in completion_tokens but no part of the text,
    # comes last). None: not asked for.
    logprobs: list[TokenLogprob] | None = None
    # With SamplingParams.prompt_logprobs, on the request's first chunk: one per prompt token the
    # model saw, None for the first (nothing precedes it) and for any that a cancel during the
    # prompt's prefill left unscored.
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]  # generated tokens, without the special token that stopped them
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None  # see Chunk: one per completion token
    prompt_logprobs: list[TokenLogprob | None] | None = None


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
        room = block_size - len(prompt_ids)
        if params.max_new_tokens >= block_size:  # no prompt is short enough: shortening it alone is no advice
            advice = (f"lower max_new_tokens (to at most {room} for this prompt)" if room >= 1
                      else "shorten the prompt and lower max_new_tokens")
            raise Gpt1Error(
                f"the prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({params.max_new_tokens}) exceed the "
                f"context of {block_size} tokens, and max_new_tokens alone leaves the prompt no room; {advice} or "
                "allow truncation")
        raise Gpt1Error(
            f"the prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({params.max_new_tokens}) exceed the "
            f"context of {block_size} tokens; shorten the prompt, lower max_new_tokens, or allow truncation"
        )
    return list(prompt_ids[len(prompt_ids) - budget:])


def fit_new_tokens(params: SamplingParams, prompt_ids: Sequence[int], block_size: int, chosen: bool) -> SamplingParams:
    """`params` for this prompt, checked (a Gpt1Error when the prompt does not fit and may not be
    cut). A max_new_tokens the caller did not choose (`chosen` False) is gpt1's default, not a wish:
    it is capped at the room a prompt that fits leaves, as the server caps an omitted max_tokens, so
    that such a prompt is kept whole, truncation or not (the default 256 would otherwise cut any
    prompt longer than half of a 512-token context, and refuse every prompt of a 256-token model
    without truncation). Only a prompt that fills the context is cut (or refused)."""
    if not chosen:
        prompt_tokens = len(prompt_ids) or 1  # an empty prompt starts from [EOS]
        room = block_size - prompt_tokens
        if room >= 1:
            params = dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, room))
        elif not params.truncate_prompt:
            raise Gpt1Error(f"the prompt ({prompt_tokens} tokens) leaves no room for a new token in the context of "
                            f"{block_size} tokens; shorten the prompt or allow truncation")
    fit_prompt(prompt_ids, block_size, params)
    return params


def prompt_tail(tokenizer: Tokenizer, text: str, block_size: int) -> str:
    """The end of `text` whose ids are the last ids of the whole text, at least block_size + 1 of
    them: more than a prompt fitted to a `block_size` context keeps, so that fitting the tail
    (truncation on) gives the ids, the room and the cut that fitting the whole would. `text`
    itself when it is not longer than that (or has no boundary to cut at). Tokenizing a long
    prompt whole took ~130 bytes a character: 7 GB and 83 s for 50 MB on stdin, to keep 61 tokens."""
    # A character is at least a byte and a token at most the vocabulary's longest: this many
    # characters hold at least block_size + 1 tokens.
    chars = (block_size + 1) * max(map(len, tokenizer.bytes_table))
    last = len(text) - chars  # where the tail may start, at the latest
    if last <= 0:
        return text
    span = 4096
    while True:  # the last boundary at or before `last`, looked for backwards
        start = max(0, last - span)
        # endpos last + 2: the look-ahead of a boundary at `last` sees its next character
        cuts = [m.start() for m in SPACE_BOUNDARY.finditer(text, start, last + 2)]
        if cuts:
            return text[cuts[-1]:]
        if start == 0:
            return text
        span *= 2


def chat_message_tails(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]],
                       block_size: int) -> tuple[list[dict[str, str]], int]:
    """The validated `messages`, each text but a leading system message's cut to its `prompt_tail`,
    and the characters cut from the last one: with truncation on, chat_prompt_ids keeps of them
    what it keeps of the whole messages. It cuts the last message from its start; a message
    before it that a tail was taken of is still longer than any prompt, so it is dropped, as the
    whole was. The system message is never cut: the error that refuses one too long cites its
    length."""
    messages = validate_messages(messages)
    n_system = 1 if messages[0]["role"] == "system" else 0
    tails = messages[:n_system] + [{**m, "content": prompt_tail(tokenizer, m["content"], block_size)}
                                   for m in messages[n_system:]]
    return tails, len(messages[-1]["content"]) - len(tails[-1]["content"])


class ChatPrompt(NamedTuple):
    ids: list[int]
    dropped: int  # the oldest messages left out to fit
    cut: int  # tokens cut from the start of the last message's text, when it alone did not fit


def chat_prompt_ids(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], block_size: int,
                    params: SamplingParams, *, max_new_tokens_chosen: bool = True,
                    reply_room: bool = False) -> ChatPrompt:
    """Token ids of a chat prompt, fitted to the context: the system message stays, the oldest
    turns go first (the conversation then starts with a user turn, unless only its last message
    is left), and a last message still too long loses the start of its text, never its role
    marker; a system message that leaves no room is an error. With `truncate_prompt=False`
    nothing is dropped (the engine refuses a prompt that does not fit).

    `max_new_tokens_chosen=False`: `params.max_new_tokens` is gpt1's default, not the caller's
    (the server's omitted max_tokens, a knob the Python API was not given), a bound the caller then
    caps at the room the prompt leaves (`fit_new_tokens`). A conversation that fits the context
    with room for one new token is then kept whole, as a completion prompt that fits is (the
    default 256 would otherwise keep at most half of a 512-token context); one that does not fit
    loses its oldest turns by the rule above, and what is left is kept whole if it fits: its last
    message (and the system message) is cut, or refused, only when it alone does not fit, as it
    would be sent alone. `reply_room=True` (a session that holds the history and sends it all at
    every turn: `gpt1 chat`) drops the oldest turns by the rule even from a conversation that fits,
    so that a reply keeps its room as the conversation grows rather than ending at the context
    limit; its last message is still kept whole if it fits."""
    messages = validate_messages(messages)
    # Each message is encoded once, and dropping a turn subtracts its length (re-encoding the rest
    # after each drop made a long conversation quadratic, seconds of CPU in the server); only a
    # prompt that must be cut inside its last message encodes that message's text once more.
    pieces = [encode_message(tokenizer, m) for m in messages]
    generation_prompt = [tokenizer.special_id(ASSISTANT)]
    length = sum(map(len, pieces)) + len(generation_prompt)
    if not params.truncate_prompt or (not max_new_tokens_chosen and length < block_size and not reply_room):
        return ChatPrompt([i for piece in pieces for i in piece] + generation_prompt, 0, 0)
    budget = prompt_budget(block_size, params)
    n_system = 1 if messages[0]["role"] == "system" else 0
    first = n_system  # the first turn kept
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
    # A default max_new_tokens keeps room for the reply by dropping turns, never by cutting (or
    # refusing) what is left when that fits the context: the caller caps the reply at the room left.
    if cut <= 0 or (not max_new_tokens_chosen and len(ids) < block_size):
        return ChatPrompt(ids, dropped, 0)
    # One message is left besides the system message: its text follows its role marker. The
    # system message itself is never cut.
    start = len(ids) - len(generation_prompt) - len(kept[-1]) + 1
    text_tokens = len(tokenizer.encode(messages[-1]["content"]))
    if len(messages) == n_system or cut >= text_tokens:
        # What the prompt needs: all of it but the last message's text, of which one token.
        needed = len(ids) if len(messages) == n_system else len(ids) - text_tokens + 1
        if max_new_tokens_chosen:
            why = (f"{block_size} of context less max_new_tokens {params.max_new_tokens}" if budget > block_size // 2
                   else f"half the {block_size}-token context, as max_new_tokens {params.max_new_tokens} leaves less")
        else:  # no max_new_tokens to cite: the caller did not choose the default that decided
            why = (f"{block_size} of context less {params.max_new_tokens} kept for the reply" if budget > block_size // 2
                   else f"half the {block_size}-token context, the rest kept for the reply")
        # A max_new_tokens of at most block_size - needed lets the prompt take more than half.
        verb = "lower" if max_new_tokens_chosen else "set"
        advice = f" or {verb} max_new_tokens to at most {block_size - needed}" if needed < block_size else ""
        if not n_system:  # nothing to shorten: the context is smaller than a turn's markers and one token
            raise Gpt1Error(f"a {block_size}-token context is too small for a chat turn: its role markers and one "
                            f"token of text need {needed} tokens, and the prompt may take {budget} here ({why})")
        raise Gpt1Error(f"the system message leaves no room for the conversation: the prompt needs {needed} tokens "
                        f"with it and may take {budget} here ({why}); shorten the system message{advice}")
    return ChatPrompt(ids[:start] + ids[start + cut:], dropped, cut)


class TextState:
    """One sequence's tokens turned into text pieces: an incremental UTF-8 decoder (byte-level
    BPE may split a character across tokens) plus stop strings, holding back any text that may
    be the start of one so that a stop string never reaches the caller."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...], prompt_ids: Sequence[int], limit: int):
        self._bytes_of = tokenizer.bytes_table  # per token: a list lookup (this runs once per streamed token)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # A prompt of token ids may end inside a character (BPE splits them): its first bytes, which
        # the reply's first bytes may finish. The reply then starts with that whole character, not
        # with U+FFFD for bytes that are valid UTF-8 together.
        tail = codecs.getincrementaldecoder("utf-8")(errors="replace")
        tail.decode(b"".join(self._bytes_of[i] for i in prompt_ids[-8:]))
        self._carry: bytes = tail.getstate()[0]  # the prompt's unfinished character, if any
        self._undecided = b""  # the reply's first bytes, until they finish that character or do not
        self._stop = stop
        self._pending = ""
        self.prompt_tokens = len(prompt_ids)
        self.limit = limit
        self.token_ids: list[int] = []
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    def add(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        self.completion_tokens += 1
        piece = self._bytes_of[token_id]
        self._pending += self._decoder.decode(self._finishing_the_prompt(piece) if self._carry else piece)
        if not self._stop:
            text, self._pending = self._pending, ""
            if len(self.token_ids) >= self.limit:
                text += self.finish("length")
            return text
        if (end := self._stop_at()) is not None:
            text, self._pending = self._pending[:end], ""
            self.finish_reason = "stop"
            return text
        cut = len(self._pending) - self._held_back()
        text, self._pending = self._pending[:cut], self._pending[cut:]
        if len(self.token_ids) >= self.limit:
            text += self.finish("length")
        return text

    def finish(self, reason: str) -> str:
        """The text held back, and the reason; "stop" (and the text before it) when a stop string
        ends that text only now: an unfinished character is flushed as U+FFFD, which a stop
        string may end with."""
        self._pending += self._decoder.decode(self._undecided, final=True)  # the reply's own bytes only
        self._carry = self._undecided = b""
        if (end := self._stop_at()) is not None:
            self._pending, reason = self._pending[:end], "stop"
        text, self._pending = self._pending, ""
        self.finish_reason = reason
        return text

    def _finishing_the_prompt(self, piece: bytes) -> bytes:
        """The reply's bytes to decode while the prompt's unfinished character is undecided: none
        until there are enough to finish it; then the character and the reply's bytes if they
        finish it as valid UTF-8, else the reply's bytes alone (the prompt's broken bytes are the
        prompt's, not a U+FFFD at the start of the reply)."""
        self._undecided += piece
        lead = self._carry[0]
        needed = (2 if lead < 0xE0 else 3 if lead < 0xF0 else 4) - len(self._carry)
        head = self._undecided[:needed]
        if len(head) < needed and all(0x80 <= b < 0xC0 for b in head):
            return b""  # continuation bytes so far: not decided yet
        data, carry = self._undecided, self._carry
        self._carry = self._undecided = b""
        try:
            (carry + head).decode("utf-8")
        except UnicodeDecodeError:
            return data
        return carry + data

    def _held_back(self) -> int:
        """The length of the longest tail of the text that is the start of a stop string. Each
        candidate tail begins with a stop string's first character, and one comparison checks it:
        a request's stop strings may be long (building each of their prefixes for every token, a
        200,000-character one stalled every row of the batch for a minute)."""
        text, longest = self._pending, 0
        for stop in self._stop:
            i = text.find(stop[0], max(len(text) - len(stop) + 1, 0)) if stop else -1  # shorter than the stop
            while 0 <= i and len(text) - i > longest:
                if stop.startswith(text[i:]):
                    longest = len(text) - i
                    break
                i = text.find(stop[0], i + 1)
        return longest

    def _stop_at(self) -> int | None:
        """Where the first stop string in the held-back text starts, or None."""
        return min((i for s in self._stop if (i := self._pending.find(s)) >= 0), default=None)


# What the CLI and the Python API say when a prompt did not fit (the server answers in usage).
# `chars`: the length of a prompt of which only the tail was tokenized (prompt_tail), whose token
# count is not known; `chars_cut`: the characters prompt_tail cut from a message.
def warn_if_cut(prompt_tokens: int, kept_tokens: int, chars: int | None = None) -> None:
    if kept_tokens < prompt_tokens:
        size = f"{chars:,} characters" if chars is not None else f"{prompt_tokens} tokens"
        warn(f"the prompt ({size}) was cut to its last {kept_tokens} tokens to fit the context")


def warn_if_message_cut(cut: int, chars_cut: int = 0) -> None:
    if cut or chars_cut:
        what = f"first {chars_cut:,} characters and then {cut} tokens" if chars_cut else f"first {cut} tokens"
        warn(f"the message's {what} were cut to fit the context (the system message and the role markers stay)")


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
