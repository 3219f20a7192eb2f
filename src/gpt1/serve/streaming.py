"""The stream replies (`stream: true`): OpenAI's chunks as server-sent events, written as they
come, a keep-alive comment while there are none, an error event for a failure after the status
line went out, and `data: [DONE]` at the end."""

from __future__ import annotations

import functools
import json
import os
from typing import Any, AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from gpt1.inference.engine import Request as EngineRequest
from gpt1.serve.bridge import chunk_batches
from gpt1.serve.failure_log import FailureLog
from gpt1.serve.logprobs import chat_logprobs
from gpt1.serve.middleware import is_fault
from gpt1.serve.replies import CompletionScoring, envelope, usage

# A stream that has sent nothing for this long (its request queued behind others, or slow tokens)
# sends an SSE comment, which clients skip: a proxy closes a reply idle for longer than its read
# timeout (nginx's proxy_read_timeout, 60 s by default; many load balancers' idle timeout, 60 s).
KEEPALIVE_S = 15.0
KEEPALIVE_EVENT = ": keep-alive\n\n"


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _event_template(event: Callable[[str], dict]) -> Callable[[str], str]:
    """`_sse(event(text))` for any text: the event is serialised once, and per token only the
    text is (the event loop's work per streamed token, which shares the GIL with the engine, is
    what limits a server on a fast GPU). The text's place is where the events of the texts "0"
    and "1" differ, so nothing else in the event can be taken for it: a marker text searched for
    instead was also found in the request's own strings (a `model` of "\\u0000text\\u0000").
    """
    zero, one = _sse(event("0")), _sse(event("1"))
    at = len(os.path.commonprefix((zero, one)))  # the text's one character, after its opening quote
    before, after = zero[:at - 1], zero[at + 2:]
    return lambda text: before + json.dumps(text, ensure_ascii=False) + after


def stream_response(events: AsyncIterator[str]) -> StreamingResponse:
    # no-cache and no proxy buffering: each token must reach the client as it is made.
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _cancel(requests: list[EngineRequest]) -> None:
    """Stop what is left of a stream's requests, however its events ended: chunk_batches does so
    only once it has started, and an error or a client gone before then left the rows generating
    for nobody (a no-op for those that have finished)."""
    for r in requests:
        r.cancel()


def _no_usage(include_usage: bool) -> dict:
    # As OpenAI: with include_usage, every chunk but the last has "usage": null (clients index it).
    return {"usage": None} if include_usage else {}


async def chat_events(requests, queue, rid, now, model_id, include_usage, interval,
                      failures: FailureLog | None = None, tokenizer=None) -> AsyncIterator[str]:
    """The chat stream's events, a choice per request (OpenAI's `n`: each chunk names its choice's
    index); a failure is an error event, said in `failures` (None: a log of its own). With
    logprobs, each content chunk carries its tokens' (`tokenizer` names them)."""
    def chunk(index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
        return {**envelope(rid, "chat.completion.chunk", now, model_id),
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
                **_no_usage(include_usage)}

    prompt_tokens, completion_tokens, finished = 0, 0, 0
    try:
        content_events = [_event_template(lambda text, i=i: chunk(i, {"content": text})) for i in range(len(requests))]
        # As OpenAI's: each choice's first chunk gives its role.
        yield "".join(_sse(chunk(i, {"role": "assistant", "content": ""})) for i in range(len(requests)))
        async for batch in chunk_batches(requests, queue, interval, KEEPALIVE_S):
            if not batch:  # nothing for KEEPALIVE_S: a comment, so that no proxy takes the stream for dead
                yield KEEPALIVE_EVENT
                continue
            events = []  # what a stream has waiting goes out in one write
            for index, c in batch:
                if c.logprobs:  # not the template's: the event has more than its text to fill in
                    events.append(_sse(chunk(index, {"content": c.text}, logprobs=chat_logprobs(tokenizer, c.logprobs))))
                elif c.text:
                    events.append(content_events[index](c.text))
                if c.finish_reason is not None:
                    events.append(_sse(chunk(index, {}, c.finish_reason)))
                    # The choices share one prompt, counted once (as OpenAI and vLLM count it).
                    prompt_tokens, finished = c.prompt_tokens, finished + 1
                    completion_tokens += c.completion_tokens
            if events:
                yield "".join(events)
    except BaseException as e:  # noqa: BLE001 - the status line is sent: report in the stream
        if not is_fault(e):  # a cancellation (the client left), an exit: not the stream's to answer
            raise
        yield _sse((failures or FailureLog()).answer(e).body())
        return
    finally:
        _cancel(requests)
    if include_usage and finished:
        yield _sse({**envelope(rid, "chat.completion.chunk", now, model_id), "choices": [],
                    "usage": usage(prompt_tokens, completion_tokens)})
    yield "data: [DONE]\n\n"


async def completion_events(requests, queue, rid, now, model_id, include_usage, interval,
                            failures: FailureLog | None = None, n: int = 1,
                            scoring: CompletionScoring | None = None) -> AsyncIterator[str]:
    """The completion stream's events, a choice per request: `n` consecutive ones per prompt (the
    prompt's tokens counted once in the usage); a failure is an error event, said in `failures`
    (as `chat_events`). With `scoring` (echo or logprobs), each choice's first chunk starts with
    its echoed prompt, and every chunk carries its tokens' log-probabilities."""
    def chunk(index: int, text: str, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
        return {**envelope(rid, "text_completion", now, model_id),
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
                **_no_usage(include_usage)}

    prompt_tokens = completion_tokens = 0
    try:
        text_events = [_event_template(functools.partial(chunk, i)) for i in range(len(requests))]
        async for batch in chunk_batches(requests, queue, interval, KEEPALIVE_S):
            if not batch:  # as in chat_events (this stream has no first event of its own to send at once)
                yield KEEPALIVE_EVENT
                continue
            events = []  # what the stream has waiting goes out in one write
            for index, c in batch:
                if scoring is not None:
                    text, logprobs = scoring.piece(index // n, index, c)
                    if text or logprobs is not None or c.finish_reason is not None:
                        events.append(_sse(chunk(index, text, c.finish_reason, logprobs)))
                elif c.finish_reason is not None:
                    events.append(_sse(chunk(index, c.text, c.finish_reason)))
                elif c.text:
                    events.append(text_events[index](c.text))
                if c.finish_reason is not None:
                    prompt_tokens += c.prompt_tokens if index % n == 0 else 0
                    completion_tokens += c.completion_tokens
            if events:
                yield "".join(events)
    except BaseException as e:  # noqa: BLE001 - the status line is sent: report in the stream
        if not is_fault(e):  # a cancellation (the client left), an exit: not the stream's to answer
            raise
        yield _sse((failures or FailureLog()).answer(e).body())
        return
    finally:
        _cancel(requests)
    if include_usage:
        yield _sse({**envelope(rid, "text_completion", now, model_id), "choices": [],
                    "usage": usage(prompt_tokens, completion_tokens)})
    yield "data: [DONE]\n\n"
