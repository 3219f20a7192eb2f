"""A request -> what the engine runs: prompt token ids and a validated `SamplingParams`.
Everything here raises ApiError (400) for what the request got wrong, before anything is queued."""

from __future__ import annotations

import dataclasses

from gpt1.core.chat_template import validate_messages
from gpt1.core.errors import Gpt1Error
from gpt1.core.sampling_params import API_NAMES, MAX_LOGPROBS, REPEAT_PENALTY_SCALE, SamplingParams
from gpt1.inference.decoding import ChatPrompt, chat_prompt_ids
from gpt1.serve.errors import ApiError, json_repr
from gpt1.serve.schemas import MAX_STOP, ChatCompletionRequest, CompletionRequest, GenerationRequest

PARAM_TO_API = API_NAMES  # SamplingParams fields that OpenAI names differently
# How OpenAI's and vLLM's context errors begin, the sentence client libraries match on (LiteLLM's
# ContextWindowExceededError, which its Router falls back on). No double quote anywhere in such a
# message: LiteLLM reads the error as Python's repr of the body, where a `"` makes the apostrophe
# of "model's" an escaped \' and the sentence no longer matches.
_CONTEXT_IS = "This model's maximum context length is {} tokens."


def check_unsupported(req: GenerationRequest) -> None:
    """400 `unsupported_parameter` for the first OpenAI field set to what this server does not do
    (the request's, and its messages', NEUTRAL values are the ones it accepts). The schema is
    strict, so a value of the wrong type (0 for false) never gets here to compare equal to a
    neutral one."""
    _check_neutral(req)
    for i, message in enumerate(getattr(req, "messages", ())):
        _check_neutral(message, f"messages[{i}].")


_HINTS = {"frequency_penalty": f"use repeat_penalty, {REPEAT_PENALTY_SCALE}",
          "presence_penalty": f"use repeat_penalty, {REPEAT_PENALTY_SCALE}",
          "tool_calls": "this server has no tools", "function_call": "this server has no tools"}


def _check_neutral(model, prefix: str = "") -> None:
    for name, accepted in model.NEUTRAL.items():
        value = getattr(model, name)
        if value not in accepted:
            hint = _HINTS.get(name, "it is not implemented")
            raise ApiError(400, f"{prefix}{name}={json_repr(value)} is not supported by this server ({hint})",
                           param=prefix + name, code="unsupported_parameter")


def sample_count(req: GenerationRequest, prompts: int, capacity: int) -> int:
    """`n`, the choices per prompt (null: 1): 400 below 1, or when the `prompts` x n choices, each
    a request to the engine, are more than it ever holds at once (`capacity`: max_batch + max_queue)."""
    n = 1 if req.n is None else req.n
    if n < 1:
        raise ApiError(400, f"n must be an integer >= 1 (the choices per prompt), got {n}", param="n")
    if prompts <= capacity < prompts * n:  # too many prompts alone is submit's too_many_prompts
        asked = f"{n} choices" if prompts == 1 else f"{prompts} prompts x {n} choices = {prompts * n}"
        raise ApiError(400, f"n={n}: {asked}, each generated on its own, but this server holds at most {capacity} "
                            f"at once (max_batch + max_queue); ask for at most {capacity // prompts} per request",
                       param="n")
    return n


def chat_max_tokens(req: ChatCompletionRequest) -> tuple[int | None, str]:
    """(the requested maximum, the field that gave it): max_completion_tokens or max_tokens."""
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise ApiError(400, "max_tokens and max_completion_tokens disagree; send one", param="max_tokens")
    chosen = (req.max_completion_tokens, "max_completion_tokens") if req.max_completion_tokens is not None \
        else (req.max_tokens, "max_tokens")
    if chosen[0] is not None and chosen[0] < 1:  # a chat scores no prompt: 0 is /v1/completions' (with echo)
        raise ApiError(400, f"Invalid '{chosen[1]}': integer below minimum value. Expected a value >= 1, but got "
                            f"{chosen[0]} instead. (0 scores a prompt alone: /v1/completions with echo and logprobs)",
                       param=chosen[1])
    return chosen


def sampling_params(req: GenerationRequest, max_tokens: int | None, max_tokens_param: str,
                    context: int) -> SamplingParams:
    """SamplingParams from the request's knobs (an omitted knob keeps gpt1's default)."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise ApiError(400, f"stop: at most {MAX_STOP} sequences, got {len(stop)}", param="stop")
    if max_tokens is not None and max_tokens > context:
        raise ApiError(400, f"{_CONTEXT_IS.format(context)} However, you requested {max_tokens} tokens in the "
                            f"completion ({max_tokens_param}), more than the whole context. Please reduce "
                            f"{max_tokens_param}.", param=max_tokens_param, code="context_length_exceeded")
    knobs = {name: getattr(req, name) for name in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty",
                                                   "repeat_last_n", "seed") if getattr(req, name) is not None}
    if max_tokens is not None:
        knobs["max_new_tokens"] = max_tokens
    knobs["stop"] = tuple(stop)
    knobs["truncate_prompt"] = bool(req.truncate_prompt)  # null: the default, false
    knobs["logprobs"], knobs["prompt_logprobs"] = logprob_counts(req)
    try:
        return SamplingParams(**knobs).validate()
    except Gpt1Error as e:
        field = next((f for f in knobs if str(e).startswith(f + " ")), None)
        param = max_tokens_param if field == "max_new_tokens" else field
        message = str(e).replace("max_new_tokens", max_tokens_param)
        raise ApiError(400, message, param=param) from None


def logprob_counts(req: GenerationRequest) -> tuple[int | None, int | None]:
    """SamplingParams' (logprobs, prompt_logprobs) from the request: a chat's logprobs: true with
    top_logprobs alternatives; a completion's logprobs count, for the prompt too with echo."""
    if isinstance(req, ChatCompletionRequest):
        top = req.top_logprobs
        if top is not None and not 0 <= top <= MAX_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {top}",
                           param="top_logprobs")
        if not req.logprobs:
            if top:  # as OpenAI: alternatives of no logprobs are a mistake, not something to ignore
                raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            return None, None
        return top or 0, None
    count = getattr(req, "logprobs", None)
    if count is None:
        return None, None
    if not 0 <= count <= MAX_LOGPROBS:
        raise ApiError(400, f"logprobs must be an integer in [0, {MAX_LOGPROBS}] (the alternatives per token), "
                            f"got {count}", param="logprobs")
    return count, count if getattr(req, "echo", False) else None


def fit_context(params: SamplingParams, prompt_tokens: int, context: int, max_tokens: int | None,
                max_tokens_param: str, prompt: str | None = None) -> SamplingParams:
    """Cap an omitted max_tokens by the room a prompt that fits leaves (so that it is kept whole,
    truncation or not, as `gpt1 generate` does). Without truncation, refuse what does not fit (as
    OpenAI does); with it, gpt1.inference.decoding's rule cuts a prompt that fills the context.
    `prompt`: where a completion's prompt is in the request ("prompt", "prompt[1]"), for the errors."""
    if params.truncate_prompt:
        if max_tokens is None and prompt_tokens < context:
            return dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, context - prompt_tokens))
        return params
    where = "the messages" if prompt is None else "the prompt" if prompt == "prompt" else prompt
    oldest = "turns" if prompt is None else "tokens"
    if prompt_tokens > context or (prompt_tokens == context and max_tokens != 0):  # 0: scored alone, it fits
        if max_tokens == 0:  # a prompt to score, no completion asked for
            why = f"more than max_tokens 0 scores (the whole context, {context} tokens)"
        else:  # a completion's prompt of exactly the context can still be scored alone
            why = "which leaves no room for the completion" + (
                " (max_tokens 0 scores a prompt of the whole context)" if prompt and prompt_tokens == context else "")
        raise ApiError(400, f"{_CONTEXT_IS.format(context)} However, {where} resulted in {prompt_tokens} tokens, "
                            f"{why}. Please reduce the length of {where}, or send truncate_prompt: true to drop the "
                            f"oldest {oldest}.",
                       param="prompt" if prompt else "messages", code="context_length_exceeded")
    room = context - prompt_tokens
    if max_tokens is None:
        return dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, room))
    if max_tokens > room:
        raise ApiError(400, f"{_CONTEXT_IS.format(context)} However, you requested {prompt_tokens + max_tokens} "
                            f"tokens ({prompt_tokens} in {where}, {max_tokens} in the completion). Please reduce the "
                            f"length of {where} or completion ({max_tokens_param} at most {room} here), or send "
                            "truncate_prompt: true.",
                       param=max_tokens_param, code="context_length_exceeded")
    return params


def chat_prompt(req: ChatCompletionRequest, tokenizer, params: SamplingParams, context: int) -> ChatPrompt:
    """The conversation's token ids, and what fitting them left out (`ChatPrompt`: ids, the oldest
    messages dropped, the tokens cut from the start of the last one), for the response to say.
    With truncate_prompt the oldest turns go first (the system message stays); as for a completion
    prompt, an omitted max_tokens drops nothing from a conversation that fits, and `fit_context`
    then caps it at the room left (when the default of 256 decided the fit, turning truncation on
    cut or refused conversations served whole without it)."""
    # As JSON: gpt1.core.chat_template.validate_messages reads OpenAI's forms ('developer', text parts).
    messages = [m.model_dump() for m in req.messages]
    max_tokens, which = chat_max_tokens(req)
    try:
        fitted = chat_prompt_ids(tokenizer, messages, context, params, max_new_tokens_chosen=max_tokens is not None)
    except Gpt1Error as e:  # in the API's words: its field for max_new_tokens
        message = str(e).replace("max_new_tokens", which)
        try:
            validate_messages(messages)  # on this path only: valid messages are ones that do not fit
        except Gpt1Error:
            raise ApiError(400, message, param="messages") from None
        # A system message that leaves no room: a context overflow, with the sentence clients match on.
        raise ApiError(400, f"{message}. {_CONTEXT_IS.format(context)}", param="messages",
                       code="context_length_exceeded") from None
    return fitted


def completion_prompts(req: CompletionRequest, tokenizer, vocab_size: int) -> list[list[int]]:
    prompt = req.prompt
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt: an empty list; give a string, token ids, or a list of either", param="prompt")
    prompts = []
    for i, item in enumerate(prompt):
        if isinstance(item, str):
            ids = tokenizer.encode(item)
        else:
            bad = [t for t in item if not 0 <= t < vocab_size]
            if bad:
                raise ApiError(400, f"prompt[{i}]: token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
                               param="prompt")
            ids = list(item)
        prompts.append(ids)  # an empty prompt starts from [EOS], the boundary between documents
    return prompts


def param_dict(params) -> dict:
    """A SamplingParams (or a dict of its fields) under the API's field names."""
    data = dataclasses.asdict(params) if dataclasses.is_dataclass(params) else dict(params)
    return {PARAM_TO_API.get(k, k): v for k, v in data.items()}
