"""Log-probabilities in OpenAI's two shapes, from the engine's `TokenLogprob`s.

- Chat completions (`logprobs: true`, `top_logprobs: k`): `{"content": [{"token", "logprob",
  "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}, ...], "refusal": null}`.
- Completions, the legacy shape (`logprobs: k`, and with `echo: true` the prompt's tokens first,
  the first of them null): `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}],
  "text_offset"}`. This is what lm-eval-harness's `local-completions` model reads (it sends
  `echo: true, logprobs: 1, max_tokens: 1` and sums the continuation's token_logprobs).

The numbers are the model's own distribution (see `SamplingParams.logprobs`). A token is named
by its text; one that is not whole UTF-8 (byte-level BPE splits characters) by its bytes, as
OpenAI does: `bytes:\\xe2\\x80`.
"""

from __future__ import annotations

import codecs
from typing import Sequence

from gpt1.core.tokenizer import Tokenizer
from gpt1.inference.decoding import TokenLogprob


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    raw = tokenizer.bytes_table[token_id]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _token(tokenizer: Tokenizer, token_id: int, logprob: float) -> dict:
    return {"token": token_text(tokenizer, token_id), "logprob": logprob,
            "bytes": list(tokenizer.bytes_table[token_id])}


def chat_logprobs(tokenizer: Tokenizer, entries: Sequence[TokenLogprob]) -> dict:
    """A chat choice's (or a streamed chunk's) `logprobs` object."""
    return {"content": [{**_token(tokenizer, e.token_id, e.logprob),
                         "top_logprobs": [_token(tokenizer, t, lp) for t, lp in e.top]} for e in entries],
            "refusal": None}


class TextOffsets:
    """Where each token of a choice starts in its text, in characters, as its bytes are decoded in
    order (from the prompt's start, as OpenAI counts): a token that is not whole UTF-8 adds its
    character with the token that completes it, so offsets never go back, and they are the same
    however a stream cuts the tokens into chunks. A token after a stop string's start (its text
    cut from the reply) keeps its place past the text's end, as vLLM's does."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.chars = tokenizer, 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def take(self, token_id: int) -> int:
        """The offset of the next token, `token_id`; the count moves past it."""
        start = self.chars
        self.chars += len(self._decoder.decode(self.tokenizer.bytes_table[token_id]))
        return start

    def skip(self, token_ids: Sequence[int], text: str | None = None) -> None:
        """Move the count past a prompt that is not listed (not echoed): `text`, the prompt as sent
        when it was a string (its tokens are its UTF-8: whole characters), else its tokens' bytes,
        decoded at once (a whole prompt, up to a MiB of text, in one call, not one per token)."""
        if text is not None:
            self.chars += len(text)
            return
        table = self.tokenizer.bytes_table
        self.chars += len(self._decoder.decode(b"".join(table[t] for t in token_ids)))


def completion_logprobs(tokenizer: Tokenizer, token_ids: Sequence[int], entries: Sequence[TokenLogprob | None],
                        offsets: TextOffsets) -> dict:
    """A completion choice's (or chunk's) `logprobs` object: `token_ids` are the tokens the entries
    are for (an entry None: the prompt's first token, which nothing precedes), `offsets` the
    choice's running count of characters, up to the first of them."""
    tokens = [token_text(tokenizer, t) for t in token_ids]
    return {"tokens": tokens,
            "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": [None if e is None else {token_text(tokenizer, t): lp for t, lp in e.top}
                             for e in entries],
            "text_offset": [offsets.take(t) for t in token_ids]}
