"""The request bodies of the OpenAI API, as strict pydantic models, and the reply bodies, as
models that only document them (both are the OpenAPI schema at /docs too). An omitted knob
takes gpt1's default (`SamplingParams`).

The schema says what the server accepts: a knob's bounds are in it as JSON Schema keywords
(`minimum`, `maximum`, ...) and an unimplemented field's accepted values as its `enum`, and each
server's own limits (`server_limits`: n, max_tokens, token ids, prompts per request) are written
into its document, so that a client or a fuzzer that follows /openapi.json sends no single field
the server refuses. What JSON Schema cannot say is in the fields' descriptions instead: a prompt
that with max_tokens does not fit the context (unless truncate_prompt), max_tokens and
max_completion_tokens that disagree, prompts x n over the server's capacity, a body over its
size limit. The checks themselves stay in one place each (`SamplingParams.validate`,
`mapping`), with their messages; tests/test_serve_conformance.py checks that the schema agrees
with them."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator

from gpt1.core.sampling_params import KNOB_RANGES, MAX_LOGPROBS
from gpt1.serve.errors import json_repr

MAX_STOP = 4  # stop strings per request, as OpenAI


def _lone_surrogate(value: Any) -> str | None:
    """Where the first lone surrogate is in a string (or in the strings of a list: which item,
    then the character), else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"character {e.start}"
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (at := _lone_surrogate(item)) is not None:
                return f"{at} of item {i}"
    return None


def _schema_extra(schema: dict[str, Any], model: type) -> None:
    """What the OpenAPI schema says beyond the fields' types: the values an unimplemented field
    accepts (a model's NEUTRAL ones) as its `enum`, and a model's checks across fields
    (SCHEMA_RULES) as JSON Schema's if/then/else."""
    for name, accepted in getattr(model, "NEUTRAL", {}).items():
        schema["properties"][name]["enum"] = list(accepted)
    schema.update(getattr(model, "SCHEMA_RULES", {}))


class _Strict(BaseModel):
    # Strict: "5" is not a number and true is not 1; unknown fields are an error rather than
    # silently ignored; NaN and Infinity (which Python's JSON parser accepts) are refused.
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, json_schema_extra=_schema_extra)

    @field_validator("*")
    @classmethod
    def _unicode_text(cls, value: Any) -> Any:
        # A JSON escape such as "\ud800" is valid JSON but no Unicode text: refused in any field
        # here, before it can reach the tokenizer or be echoed in a response it cannot encode.
        if (at := _lone_surrogate(value)) is not None:
            raise ValueError(f"invalid Unicode (a lone surrogate at {at})")
        return value


class StreamOptions(_Strict):
    include_usage: bool | None = Field(False, description="a last chunk with the usage (and \"usage\": null in "
                                                           "the others)")
    # OpenAI pads its stream's events (against traffic analysis) unless this is false; this
    # server pads nothing, either way.
    include_obfuscation: bool | None = Field(None, description="accepted; this server adds no obfuscation field")


# SamplingParams.validate's bounds as JSON Schema (tests/test_serve_conformance.py sends each
# bound and its neighbour outside to check that they agree). FastAPI's document model passes a
# bound through a float (`integer_bounds` writes it back as an integer): the integer ones are
# powers of two, which a float holds exactly (2**63 - 1 would become 2**63).
_KNOB_BOUNDS: dict[str, dict[str, Any]] = {
    "temperature": {"minimum": 0}, "top_p": {"minimum": 0, "maximum": 1},
    "top_k": {"minimum": 0, "exclusiveMaximum": 2**63}, "min_p": {"minimum": 0, "maximum": 1},
    "repeat_penalty": {"exclusiveMinimum": 0}, "repeat_last_n": {"minimum": -1, "exclusiveMaximum": 2**63},
    "seed": {"minimum": -2**63, "exclusiveMaximum": 2**64},
}
_MAX_TOKENS = {"minimum": 1}  # and at most the model's context: each server's (server_limits)
_FITS = ("; with the prompt's tokens at most the context, unless truncate_prompt (which then keeps the prompt's "
         "most recent tokens)")


def _knob(name: str, what: str = "") -> Any:
    """A SamplingParams knob (null or omitted: gpt1's default), with its range in words (KNOB_RANGES,
    SamplingParams.validate's) and as JSON Schema."""
    return Field(None, description=f"{what}{'; ' if what else ''}{KNOB_RANGES[name]}",
                 json_schema_extra=_KNOB_BOUNDS[name])


class GenerationRequest(_Strict):
    """Fields shared by both endpoints."""

    model: str | None = Field(None, description="accepted and echoed; this server serves one model")
    max_tokens: int | None = Field(None, description="at most this many new tokens, at most the model's context "
                                                      f"(context_length in /v1/models){_FITS}; default: gpt1's "
                                                      "default, capped by the context left after the prompt",
                                   json_schema_extra=_MAX_TOKENS)
    temperature: float | None = _knob("temperature")
    top_p: float | None = _knob("top_p")
    top_k: int | None = _knob("top_k", "extra: keep the k most likely tokens")
    min_p: float | None = _knob("min_p", "extra: drop tokens below min_p * p(most likely)")
    repeat_penalty: float | None = _knob("repeat_penalty", "extra: llama.cpp-style penalty")
    repeat_last_n: int | None = _knob("repeat_last_n", "extra: how many recent tokens repeat_penalty looks at")
    seed: int | None = _knob("seed", "makes sampling reproducible")
    # As in OpenAI's API, an optional field takes null (clients that serialise each unset
    # optional send it): the default (false here, 1 for n), or a NEUTRAL value (echo, the penalties).
    truncate_prompt: bool | None = Field(False, description="extra: fit an over-long prompt into the context by "
                                                            "dropping the oldest turns (chat) or tokens (completions) "
                                                            "instead of answering 400")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} non-empty strings that end the reply "
                                                           "(not included)",
                                         json_schema_extra={"minLength": 1, "maxItems": MAX_STOP,
                                                            "items": {"minLength": 1}})
    stream: bool | None = Field(False, description="true: the reply as server-sent events (text/event-stream)")
    stream_options: StreamOptions | None = Field(None, description="only with stream: true")
    n: int | None = Field(1, description="choices per prompt, each a sample of its own (with a seed, choice i is "
                                         "seeded seed + i); all choices (prompts x n) at most the server's "
                                         "max_batch + max_queue",
                          json_schema_extra={"minimum": 1})
    user: str | None = None
    # Accepted only at their neutral values so that clients that always send them still work.
    frequency_penalty: float | None = Field(0.0, description="unsupported: only 0 (use repeat_penalty: 1 = off, above 1 discourages repeats)")
    presence_penalty: float | None = Field(0.0, description="unsupported: only 0 (use repeat_penalty: 1 = off, above 1 discourages repeats)")
    logit_bias: dict[str, float] | None = Field(None, description="unsupported: only null or {}")

    # OpenAI fields this server does not implement -> the values it accepts for them (null, or
    # the value that asks for nothing), so that clients that always send them still work; any
    # other value is a 400 `unsupported_parameter` (gpt1.serve.mapping.check_unsupported).
    # Per endpoint: the same name can mean different things (see CompletionRequest.logprobs).
    NEUTRAL: ClassVar[dict[str, tuple]] = {"frequency_penalty": (None, 0.0), "presence_penalty": (None, 0.0),
                                           "logit_bias": (None, {})}
    # _only_when_streaming, for the schema.
    SCHEMA_RULES: ClassVar[dict] = {"if": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
                                    "else": {"properties": {"stream_options": {"type": "null"}}}}

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        # Checked here, not left to SamplingParams, so that the error shows the JSON sent.
        if value == "" or (isinstance(value, list) and "" in value):
            raise ValueError("an empty string cannot end a reply; give a non-empty string or a list of them "
                             f"(got {json_repr(value)})")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        # As OpenAI: options for a stream that is not asked for are a mistake, not something to ignore.
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return value


class TextPart(_Strict):
    type: Literal["text"]
    text: str
    # openai 3.x's end of a cacheable prefix (with the request's prompt_cache_options): a hint.
    prompt_cache_breakpoint: dict[str, Any] | None = Field(None, description="accepted; there is no prompt cache")

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        # Say what is wrong with the part ("Input should be 'text'" would not).
        if not isinstance(value, dict):
            raise ValueError("a content part must be an object such as {\"type\": \"text\", \"text\": \"...\"}")
        if "type" in value and value["type"] != "text":
            raise ValueError(f"content part type {json_repr(value['type'])} is not supported; only text parts")
        return value


def _content_form(value: Any) -> str | None:
    return "str" if isinstance(value, str) else "list" if isinstance(value, list) else None


# Validated by the form the value has, so that a list's error is about its parts rather than
# "Input should be a valid string" from the string form it was never meant as (the tags are
# left out of the error's location by gpt1.serve.errors).
Content = Annotated[Annotated[str, Tag("str")] | Annotated[list[TextPart], Tag("list")],
                    Discriminator(_content_form, custom_error_type="content_type",
                                  custom_error_message="content must be a string or a list of text parts")]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"] = Field(description="'developer' means 'system'")
    content: Content | None = Field(description="a string, or a list of text parts (joined); null only in an "
                                                "assistant message (read as \"\")")
    name: str | None = None
    # The rest of an assistant message as OpenAI's clients give it back (openai's
    # `reply.choices[0].message.model_dump()`), so that a reply can be appended to `messages` as
    # it came. Accepted only when they say nothing (mapping.check_unsupported).
    refusal: str | None = None
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    annotations: list[dict[str, Any]] | None = None

    NEUTRAL: ClassVar[dict[str, tuple]] = {"refusal": (None,), "audio": (None,), "function_call": (None,),
                                           "tool_calls": (None, []), "annotations": (None, [])}
    # _null_only_from_the_assistant, for the schema.
    SCHEMA_RULES: ClassVar[dict] = {"if": {"properties": {"role": {"const": "assistant"}}},
                                    "else": {"properties": {"content": {"not": {"type": "null"}}}}}

    @field_validator("content")
    @classmethod
    def _null_only_from_the_assistant(cls, value: Any, info: ValidationInfo) -> Any:
        # OpenAI allows null content in an assistant message only (one that made tool calls).
        if value is None:
            if info.data.get("role") != "assistant":
                raise ValueError("content must be a string or a list of text parts (null only in an assistant "
                                 "message)")
            return ""
        return value


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation; its tokens and the reply's "
                                                                  "max_tokens fit the context, unless "
                                                                  "truncate_prompt (which drops the oldest turns)")
    max_completion_tokens: int | None = Field(None, description="OpenAI's newer name for max_tokens (send one, or "
                                                                f"both equal){_FITS}",
                                              json_schema_extra=_MAX_TOKENS)
    logprobs: bool | None = Field(None, description="true: each reply token's log-probability under the model, "
                                                    "before the sampling knobs (choices[].logprobs.content)")
    top_logprobs: int | None = Field(None, description=f"0 to {MAX_LOGPROBS}: the most likely tokens at each place, "
                                                       "with theirs (needs logprobs: true)",
                                     json_schema_extra={"minimum": 0, "maximum": MAX_LOGPROBS})
    response_format: dict[str, Any] | None = Field(None, description='unsupported: only {"type": "text"}')
    tools: list[dict[str, Any]] | None = Field(None, description="unsupported: only []")
    # Without tools, "auto" calls none either; parallel_tool_calls has nothing to apply to.
    tool_choice: str | dict[str, Any] | None = Field(None, description='unsupported: only "none" or "auto"')
    parallel_tool_calls: bool | None = Field(None, description="accepted; without tools it does nothing")
    store: bool | None = Field(None, description="unsupported: only false")
    metadata: dict[str, str] | None = Field(None, description="unsupported: only {}")
    modalities: list[str] | None = Field(None, description='unsupported: only ["text"]')
    audio: dict[str, Any] | None = Field(None, description="unsupported: only null")
    prediction: dict[str, Any] | None = Field(None, description="unsupported: only null")
    reasoning_effort: str | None = Field(None, description="unsupported: only null (not a reasoning model)")
    verbosity: str | None = Field(None, description='unsupported: only "medium" (the default)')
    web_search_options: dict[str, Any] | None = Field(None, description="unsupported: only null")
    # The standard tier is the only one; "auto" and "default" both mean it.
    service_tier: str | None = Field(None, description='unsupported: only "auto" or "default"')
    # The deprecated forms of tools and tool_choice.
    functions: list[dict[str, Any]] | None = Field(None, description="unsupported: only []")
    function_call: str | dict[str, Any] | None = Field(None, description='unsupported: only "none" or "auto"')
    # Hints about who asks and what to cache, like `user`: they change no reply.
    prompt_cache_key: str | None = Field(None, description="accepted; there is no prompt cache to key")
    prompt_cache_retention: str | None = Field(None, description="accepted; there is no prompt cache to keep")
    prompt_cache_options: dict[str, Any] | None = Field(None, description="accepted; there is no prompt cache")
    safety_identifier: str | None = None
    moderation: dict[str, Any] | None = Field(None, description="unsupported: only null")

    NEUTRAL: ClassVar[dict[str, tuple]] = {
        **GenerationRequest.NEUTRAL,
        "response_format": (None, {"type": "text"}), "tools": (None, []), "tool_choice": (None, "none", "auto"),
        "store": (None, False), "metadata": (None, {}), "modalities": (None, ["text"]),
        "audio": (None,), "prediction": (None,), "reasoning_effort": (None,), "verbosity": (None, "medium"),
        "web_search_options": (None,), "service_tier": (None, "auto", "default"), "functions": (None, []),
        "function_call": (None, "none", "auto"), "moderation": (None,)}
    # The stream rule, and mapping.logprob_counts': alternatives only with logprobs: true.
    SCHEMA_RULES: ClassVar[dict] = {"allOf": [
        GenerationRequest.SCHEMA_RULES,
        {"if": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
         "else": {"properties": {"top_logprobs": {"enum": [None, 0]}}}}]}


def _prompt_form(value: Any) -> str | None:
    if isinstance(value, str):
        return "str"
    if not isinstance(value, list):
        return None
    if value and all(isinstance(item, str) for item in value):
        return "list[str]"
    if value and all(isinstance(item, list) for item in value):
        return "list[list[int]]"
    if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        return "list[int]"  # [] too: gpt1.serve.mapping names what is wrong with an empty prompt
    return None


# By form, as Content: a mixed list (["a", 1]) is "must be ..." rather than the string form's
# "Input should be a valid string", and a list of token-id lists names the bad item.
Prompt = Annotated[Annotated[str, Tag("str")] | Annotated[list[str], Tag("list[str]")]
                   | Annotated[list[int], Tag("list[int]")] | Annotated[list[list[int]], Tag("list[list[int]]")],
                   Discriminator(_prompt_form, custom_error_type="prompt_type",
                                 custom_error_message="must be a string, a list of strings, a list of token ids "
                                                      "(integers) or a list of token-id lists (one kind per list)")]


class CompletionRequest(GenerationRequest):
    max_tokens: int | None = Field(None, description="at most this many new tokens, at most the model's context "
                                                      f"(context_length in /v1/models){_FITS}; 0: none, the prompt "
                                                      "scored alone (with echo and logprobs); default: gpt1's "
                                                      "default, capped by the context left after the prompt",
                                   json_schema_extra={"minimum": 0})
    prompt: Prompt = Field(description="a string, token ids in [0, the vocabulary size), or a non-empty list of "
                                       "either (one choice each, at most the server's max_batch + max_queue); "
                                       "\"\" starts from [EOS]")
    echo: bool | None = Field(False, description="true: the text starts with the prompt (with logprobs, their "
                                                 "list too: the prompt's tokens first, the first null)")
    logprobs: int | None = Field(None, description=f"0 to {MAX_LOGPROBS}: each token's log-probability under the "
                                                   "model, before the sampling knobs, and this many most likely "
                                                   "alternatives (OpenAI's legacy shape)",
                                 json_schema_extra={"minimum": 0, "maximum": MAX_LOGPROBS})
    best_of: int | None = Field(None, description="unsupported: only null or 1")
    suffix: str | None = Field(None, description="unsupported: only null or \"\"")

    NEUTRAL: ClassVar[dict[str, tuple]] = {**GenerationRequest.NEUTRAL,
                                           "best_of": (None, 1), "suffix": (None, "")}


# ---- the reply bodies ------------------------------------------------------------------------------
# What the routes send, for /openapi.json only: the routes build their replies as dicts, sent as
# they are (a response_model would re-serialise them), so these models change nothing sent; the
# tests validate real replies against them.
FinishReason = Literal["stop", "length"]  # an end token or stop string; max_tokens or the context


class Usage(BaseModel):
    prompt_tokens: int = Field(description="each prompt once, whatever n")
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str = Field(description="the token's text; one that is not whole UTF-8 as bytes:\\xe2\\x80")
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="the top_logprobs most likely tokens at this place")


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]
    refusal: None


class ReplyMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ReplyMessage
    logprobs: ChatLogprobs | None = Field(description="with logprobs: true, else null")
    finish_reason: FinishReason


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape; with echo the prompt's tokens come first, the first of them null."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int] = Field(description="where each token starts, in characters from the prompt's start")


class CompletionChoice(BaseModel):
    index: int = Field(description="prompt i's choices are i * n ... i * n + n - 1")
    text: str
    logprobs: CompletionLogprobs | None = Field(description="with logprobs, else null")
    finish_reason: FinishReason


class _Reply(BaseModel):
    id: str
    created: int
    model: str = Field(description="the request's model, else the served one")
    system_fingerprint: None


class ChatCompletion(_Reply):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage


class Completion(_Reply):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_length: int = Field(description="the model's context in tokens: prompt and reply together")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model] = Field(description="the one model served")


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    active: int = Field(description="requests generating")
    queued: int = Field(description="requests waiting for a slot")
    free_slots: int
    max_batch: int
    tokens_per_s: float = Field(description="recent new tokens per second, all requests together")
    device: str
    dtype: str
    threads: int | None = Field(None, description="on a CPU only: the threads of the latest step (null before the "
                                                  "process engine's first)")


# ---- each server's document ----------------------------------------------------------------------
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _integer_only(schema: dict) -> bool:
    """Whether `schema` is an integer's (or null's): its type, or its anyOf/oneOf forms' types."""
    forms = schema.get("anyOf") or schema.get("oneOf") or [schema]
    # Not a `properties` object, whose field named "type" maps to a schema, not a type name.
    types = {form.get("type") for form in forms if isinstance(form, dict) and isinstance(form.get("type"), str)}
    return "integer" in types and types <= {"integer", "null"}


def integer_bounds(node: Any) -> None:
    """The bounds of every integer schema in an OpenAPI document (or any part of one) as JSON
    integers, in place: FastAPI's document model types them as floats, and a fuzzer that read
    the seed's exclusiveMaximum as 1.8446744073709552e+19 sent seeds past 2**64."""
    if isinstance(node, dict):
        if _integer_only(node):
            for key in _BOUNDS:
                if isinstance(node.get(key), float) and node[key].is_integer():
                    node[key] = int(node[key])
        for value in node.values():
            integer_bounds(value)
    elif isinstance(node, list):
        for value in node:
            integer_bounds(value)


def server_limits(schemas: dict, *, capacity: int, context: int, vocab_size: int, shortest_chat: int = 1) -> None:
    """Write one server's limits into its document's request schemas (`schemas`: the document's
    components), in place: the models are every app's, the limits this one's. `capacity`: the
    requests its engine holds at once (max_batch + max_queue), which bounds n and the prompts of
    a request (`mapping.sample_count`, the engine's too_many_prompts); `context`: the model's,
    which the most new tokens share with the shortest prompt (a completion's one token, '' being
    [EOS]; `shortest_chat`, a chat's one empty message: at the whole context, a max_tokens was
    refused without truncate_prompt); `vocab_size`: a token id's bound (`mapping.completion_prompts`)."""
    for name, shortest in (("ChatCompletionRequest", shortest_chat), ("CompletionRequest", 1)):
        fields = schemas[name]["properties"]
        fields["n"]["maximum"] = capacity
        for field in ("max_tokens", "max_completion_tokens"):
            if field in fields:
                fields[field]["maximum"] = max(context - shortest, 0)
    token_id = {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}
    for form in schemas["CompletionRequest"]["properties"]["prompt"]["oneOf"]:
        if form.get("type") != "array":
            continue
        form["minItems"] = 1  # [] is no prompt; [""] and [[]] are (they start from [EOS])
        items = form["items"]
        if items.get("type") == "integer":  # one prompt's token ids
            form["items"] = token_id
            continue
        form["maxItems"] = capacity  # a list of prompts, each a request of its own
        if items.get("type") == "array":
            items["items"] = token_id
