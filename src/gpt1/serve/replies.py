"""The JSON replies of the generation endpoints, in OpenAI's shapes: `collect` gathers each
request's text, finish_reason and usage (or says the client left, `client_gone` then answering),
and `chat_completion` / `completion` make the completion object of them; `envelope` and `usage`
are the pieces that a stream's chunks share (gpt1.serve.streaming), and `CompletionScoring` a
completion's echo and legacy logprobs, whole or chunk by chunk."""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse

from fastapi import Request
from fastapi.responses import Response

from gpt1.inference.decoding import Chunk
from gpt1.inference.engine import Request as EngineRequest
from gpt1.serve.bridge import chunk_batches
from gpt1.serve.logprobs import TextOffsets, chat_logprobs, completion_logprobs
from gpt1.serve.schemas import CompletionRequest


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(rid: str, kind: str, created: int, model_id: str) -> dict:
    """The keys every completion object and chunk starts with, as OpenAI's."""
    return {"id": rid, "object": kind, "created": created, "model": model_id, "system_fingerprint": None}


async def collect(request: Request, requests: list[EngineRequest], queue: asyncio.Queue) -> list[dict] | None:
    """Each request's text, finish_reason and usage; None (and the requests stopped) if the client left.
    A failure is the ApiError of the app's FailureLog (`Served.failures`)."""
    results = [{"text": [], "finish_reason": None, "prompt_tokens": 0, "completion_tokens": 0, "logprobs": [],
                "prompt_logprobs": None} for _ in requests]

    async def consume() -> None:
        async for batch in chunk_batches(requests, queue):
            for index, chunk in batch:
                r = results[index]
                r["text"].append(chunk.text)
                r["logprobs"] += chunk.logprobs or ()
                r.update(finish_reason=chunk.finish_reason, prompt_tokens=chunk.prompt_tokens,
                         completion_tokens=chunk.completion_tokens)
                if chunk.prompt_logprobs is not None:
                    r["prompt_logprobs"] = chunk.prompt_logprobs

    async def disconnected() -> None:
        # The body has been read, so the next message the server sends is http.disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(consume()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            for r in requests:
                r.cancel()
    if not work.done() or work.cancelled():  # a cancel takes effect only when the task next runs
        return None
    try:
        work.result()  # raises what generation raised
    except Exception as e:
        # An ApiError, answered as such: raised on, the fault went to Starlette's last handler,
        # whose uvicorn logged a traceback for every request that it failed.
        raise request.app.state.served.failures.answer(e) from None
    for r in results:
        r["text"] = "".join(r["text"])
    return results


_access_log = logging.getLogger("uvicorn.access")


def client_gone(request: Request, started: float) -> Response:
    """The answer to a request whose client went away while it generated (a proxy's read timeout, a
    user gone), its generation cancelled, and its line in uvicorn's access log: uvicorn writes none
    for a reply it cannot send, so the request left no trace. Status 499, nginx's "client closed
    request", as uvicorn's line has it, then how long it was held (gpt1.serve.server's format says
    it; uvicorn's own leaves it out)."""
    scope = request.scope
    client = scope.get("client")
    path = urllib.parse.quote(scope["path"]) + (f"?{scope['query_string'].decode('ascii', 'replace')}"
                                                if scope.get("query_string") else "")
    _access_log.info('%s - "%s %s HTTP/%s" %d', f"{client[0]}:{client[1]}" if client else "-", scope["method"], path,
                     scope.get("http_version", "1.1"), 499,
                     extra={"note": f"after {time.monotonic() - started:.1f} s: the client went away; cancelled"})
    return Response(status_code=499)  # nobody reads it


def chat_completion(head: dict, results: list[dict], tokenizer, logprobs: bool) -> dict:
    """A chat completion object of `collect`'s results after `head` (its `envelope`), a choice each;
    with `logprobs`, each choice's tokens' log-probabilities (`tokenizer` names the tokens)."""
    return {**head,
            "choices": [{"index": i, "message": {"role": "assistant", "content": r["text"]},
                         "logprobs": chat_logprobs(tokenizer, r["logprobs"]) if logprobs else None,
                         "finish_reason": r["finish_reason"]} for i, r in enumerate(results)],
            # The choices share one prompt, counted once (as OpenAI and vLLM count it).
            "usage": usage(results[0]["prompt_tokens"], sum(r["completion_tokens"] for r in results))}


def completion(head: dict, results: list[dict], n: int, scoring: CompletionScoring | None) -> dict:
    """A completion object of `collect`'s results after `head` (its `envelope`), `n` consecutive
    choices per prompt; with `scoring`, each choice's echoed prompt and log-probabilities."""
    choices = []
    for i, r in enumerate(results):
        text, logprobs = r["text"], None
        if scoring is not None:  # the whole reply as one chunk
            text, logprobs = scoring.piece(i // n, i, Chunk(text, r["finish_reason"], r["prompt_tokens"],
                                                            r["completion_tokens"], r["logprobs"],
                                                            r["prompt_logprobs"]))
        choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": r["finish_reason"]})
    return {**head, "choices": choices,
            "usage": usage(sum(r["prompt_tokens"] for r in results[::n]),  # each prompt once
                           sum(r["completion_tokens"] for r in results))}


class CompletionScoring:
    """A completion request's echo and legacy logprobs, choice by choice as its chunks come:
    the prompt's text (and its tokens' log-probabilities) before the choice's first text, and
    text offsets counted on from there (OpenAI's: from the start of the prompt; echoed, the text
    returned, which after truncate_prompt is the prompt's kept tail, as `usage` counts it)."""

    def __init__(self, tokenizer, req: CompletionRequest, prompts: list[list[int]]):
        self.tokenizer, self.echo, self.scored = tokenizer, bool(req.echo), req.logprobs is not None
        self.prompts = prompts
        # A prompt given as a string is echoed as given (when the model saw all of it).
        given = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) \
            else [req.prompt]
        self.given = [g if isinstance(g, str) else None for g in given]
        self.offsets: dict[int, TextOffsets] = {}  # choice -> where its next token starts

    def _prompt(self, prompt: int, seen: int) -> tuple[str, list[int]]:
        """The prompt's text and the token ids the model saw of it (its last `seen`; none for an
        empty prompt, whose [EOS] the model saw is no part of it)."""
        ids = self.prompts[prompt]
        seen_ids = ids[len(ids) - seen:] if ids else []
        given = self.given[prompt]
        text = given if given is not None and len(seen_ids) == len(ids) else self.tokenizer.decode(seen_ids)
        return text, seen_ids

    def piece(self, prompt: int, choice: int, c: Chunk) -> tuple[str, dict | None]:
        """The chunk's text and logprobs object for choice `choice` of prompt `prompt`."""
        text, ids, entries = c.text, [], []
        if choice not in self.offsets:  # the choice's first chunk
            offsets = self.offsets[choice] = TextOffsets(self.tokenizer)
            if self.echo:
                prompt_text, prompt_ids = self._prompt(prompt, c.prompt_tokens)
                text = prompt_text + text
                if self.scored and prompt_ids:
                    ids, entries = prompt_ids, list(c.prompt_logprobs or [None] * len(prompt_ids))[-len(prompt_ids):]
            else:  # the reply's offsets count on from the end of the whole prompt, as sent (OpenAI's: from its
                # start), not of the tail that truncate_prompt kept; a character the prompt began, the reply ends
                offsets.skip(self.prompts[prompt], self.given[prompt])
        if not self.scored:
            return text, None
        ids += [e.token_id for e in c.logprobs or ()]
        entries += c.logprobs or ()
        return text, completion_logprobs(self.tokenizer, ids, entries, self.offsets[choice])
