"""The request bodies of the OpenAI API, as strict pydantic models (they are the OpenAPI schema
at /docs too). An omitted knob takes gpt1's default (`SamplingParams`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def _lone_surrogate(value: Any) -> int | None:
    """Index of the first lone surrogate in a string (or in the strings of a list), else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return e.start
    elif isinstance(value, list):
        for item in value:
            if (at := _lone_surrogate(item)) is not None:
                return at
    return None


class _Strict(BaseModel):
    # Strict: "5" is not a number and true is not 1; unknown fields are an error rather than
    # silently ignored; NaN and Infinity (which Python's JSON parser accepts) are refused.
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _unicode_text(cls, value: Any) -> Any:
        # A JSON escape such as "\ud800" is valid JSON but no Unicode text: refused in any field
        # here, before it can reach the tokenizer or be echoed in a response it cannot encode.
        if (at := _lone_surrogate(value)) is not None:
            raise ValueError(f"invalid Unicode (a lone surrogate at character {at})")
        return value


class StreamOptions(_Strict):
    include_usage: bool = False


class GenerationRequest(_Strict):
    """Fields shared by both endpoints."""

    model: str | None = Field(None, description="accepted and echoed; this server serves one model")
    max_tokens: int | None = Field(None, description="at most this many new tokens; default: gpt1's default, "
                                                      "capped by the context left after the prompt")
    temperature: float | None = Field(None, description="0 = greedy")
    top_p: float | None = None
    top_k: int | None = Field(None, description="extra: keep the k most likely tokens (0 = off)")
    min_p: float | None = Field(None, description="extra: drop tokens below min_p * p(most likely)")
    repeat_penalty: float | None = Field(None, description="extra: llama.cpp-style penalty (1 = off)")
    repeat_last_n: int | None = Field(None, description="extra: how many recent tokens repeat_penalty looks at")
    seed: int | None = Field(None, description="makes sampling reproducible")
    truncate_prompt: bool = Field(False, description="extra: fit an over-long prompt into the context by dropping "
                                                     "the oldest turns (chat) or tokens (completions) instead of "
                                                     "answering 400")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the reply (not included)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, description="only 1 is supported")
    user: str | None = None
    # Accepted only at their neutral values so that clients that always send them still work.
    frequency_penalty: float = Field(0.0, description="unsupported: only 0 (use repeat_penalty)")
    presence_penalty: float = Field(0.0, description="unsupported: only 0 (use repeat_penalty)")
    logit_bias: dict[str, float] | None = Field(None, description="unsupported: only null or {}")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="'developer' means 'system'")
    content: str | list[TextPart]
    name: str | None = None


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, description="OpenAI's newer name for max_tokens")
    logprobs: bool | None = Field(None, description="unsupported: only false")


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, token ids, or a list of either (one choice each)")
    echo: bool = Field(False, description="unsupported: only false")
    logprobs: int | None = Field(None, description="unsupported: only null")
    best_of: int | None = Field(None, description="unsupported: only null or 1")
    suffix: str | None = Field(None, description="unsupported: only null")
