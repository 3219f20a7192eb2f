"""OpenAI-style errors: every failure is answered as `{"error": {"message", "type", "param",
"code"}}` with a 4xx status (5xx only for the server's own faults), FastAPI's 422 validation
errors included, because OpenAI answers 400 and its clients expect that shape."""

from __future__ import annotations

import errno
import json
import math
import re
import sys
import threading
import time
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from gpt1.core.errors import Gpt1Error, first_line, memory_shortage, open_files_hint, threads_hint
from gpt1.core.progress import warn
from gpt1.core.sampling_params import API_NAMES, alias_hint
from gpt1.inference.engine import EngineUnavailable, GenerationFault


class ApiError(Exception):
    """An error answered as OpenAI's `{"error": {...}}` body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---- the error body in the OpenAPI schema ---------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str = Field(description="what is wrong, in one line")
    type: str = Field(description='"invalid_request_error" (4xx) or "server_error" (5xx)')
    param: str | None = Field(description="the request field at fault, e.g. messages[0].content")
    code: str | None = Field(description="e.g. context_length_exceeded, unsupported_parameter, server_overloaded")


class ErrorResponse(BaseModel):
    """OpenAI's error body: every answer that is not a success has it (FastAPI's 422 is a 400 here)."""

    error: ErrorDetail


_WHEN = {
    400: "a bad request: invalid JSON or UTF-8, a field of the wrong type or out of range, an unknown field, an "
         "unsupported field at a non-neutral value (unsupported_parameter), a prompt that does not fit "
         "(context_length_exceeded), more prompts than the server holds (too_many_prompts), malformed HTTP",
    401: "a missing or wrong API key, on a server that has one (invalid_api_key)",
    403: "a Host that is neither a loopback name nor an allowed one, on a keyless loopback server (invalid_host)",
    404: "no such model (model_not_found)",
    408: "the request line and headers, or the body, did not arrive in time (request_timeout)",
    413: "a body over the server's limit, 1 MiB by default (request_too_large)",
    415: "a compressed body: a Content-Encoding other than identity (unsupported_content_encoding)",
    431: "a request line and headers over 64 KiB (request_header_fields_too_large)",
    503: "every slot and queue place is taken, or the machine is short of threads, open files or memory for the "
         "moment (server_overloaded, with Retry-After), or the engine has stopped (engine_unavailable)",
}


# The headers an error comes with that a client acts on.
_HEADERS = {
    401: {"WWW-Authenticate": {"description": "Bearer: the scheme the key is sent in", "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "with server_overloaded: the seconds to wait before retrying",
                          "schema": {"type": "integer", "minimum": 0}}},
}


def error_responses(*statuses: int) -> dict:
    """The `responses` of a route in the OpenAPI schema: these errors, and any other in the same
    body ("default", which also keeps FastAPI from documenting a 422 this server never sends).
    FastAPI files each under the route's media type: a route whose response_class is not JSON
    must be given `Response` (no media type, so these go under application/json, as sent) and
    declare its own 200."""
    responses: dict = {status: {"model": ErrorResponse, "description": _WHEN[status]} for status in sorted(statuses)}
    for status in statuses:
        if status in _HEADERS:
            responses[status]["headers"] = _HEADERS[status]
    responses["default"] = {"model": ErrorResponse, "description": "any other error (405 for a method the path "
                                                                   "lacks; 500 for a fault of the server's own)"}
    return responses


# ---- request errors ----------------------------------------------------------------------------
_UNION_TAG = re.compile(r"^(str|int|float|bool|list|dict|none|function-.*|.*\[.*\])$")


def _loc(parts: tuple) -> str:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; pydantic's union-member tags
    (such as 'str' or 'list[TextPart]') are left out."""
    out = ""
    for part in parts:
        if (part == "body" and not out) or (isinstance(part, str) and _UNION_TAG.match(part)):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def short_repr(value: Any, limit: int = 60) -> str:
    # ascii(): a lone surrogate in the value must not make the error itself unencodable.
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def json_repr(value: Any, limit: int = 60) -> str:
    """A value of the request body as the client sent it: JSON, not Python's repr."""
    try:
        # ensure_ascii: a lone surrogate in the value must not make the error itself unencodable.
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):  # not from JSON after all
        return short_repr(value, limit)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validation_error(exc: RequestValidationError, content_type: str | None = None) -> ApiError:
    errors = exc.errors()
    error = errors[0]
    if error.get("type") == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON ({detail} at character {error['loc'][-1]})",
                        code="invalid_json")
    param = _loc(tuple(error.get("loc", ())))
    if not param:
        # FastAPI reads a body as JSON only when its Content-Type says JSON: say so rather than
        # blame a body that may well be a JSON object.
        media_type = (content_type or "").split(";")[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            return ApiError(400, "the request body must be a JSON object sent with Content-Type: application/json "
                                 f"(got {short_repr(content_type) if content_type else 'no Content-Type'})")
        return ApiError(400, "the request body must be a JSON object")
    message = error.get("msg", "invalid value")
    code = None
    if error.get("type") == "extra_forbidden":
        message = "unrecognized request argument" + alias_hint(param, API_NAMES)  # another API's name: gpt1's
    elif error.get("type") == "missing":
        message = "missing required field"
    elif error.get("type") == "value_error":  # the schema's own checks, whose message says it all
        message = message.removeprefix("Value error, ")
        code = "invalid_unicode" if "lone surrogate" in message else None
    else:
        # A value that fits none of a union's forms fails once per form: name them all.
        same = [e for e in errors if _loc(tuple(e.get("loc", ()))) == param]
        message = "; or ".join(dict.fromkeys(e.get("msg", "") for e in same))
        if "input" in error:
            message += f" (got {json_repr(error['input'])})"
    return ApiError(400, f"{param}: {message}", param=param, code=code)


# What this server serves, for a 404 that says what to call instead.
ENDPOINTS = ("POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "GET /health", "GET /metrics",
             "GET / (the chat page)", "GET /docs (this API)")


def not_found(path: str) -> ApiError:
    """A 404 for a path no route serves, saying what to call: the commonest slips with an
    OpenAI-compatible server are a base_url without /v1 and a client on OpenAI's Responses API
    (the Agents SDK's default; LangChain names any 404 "model not found")."""
    bare = path.rstrip("/")
    if bare in ("/chat/completions", "/completions", "/models") or bare.startswith("/models/"):
        message = (f"no endpoint {path}: this server's API is under /v1 (/v1{bare}); an OpenAI client's base_url "
                   "ends in /v1 (http://HOST:PORT/v1, or behind a proxy the proxy's URL of this server and /v1)")
    elif bare.endswith("/responses") or "/responses/" in bare:
        message = ("OpenAI's Responses API is not served here: use /v1/chat/completions (the OpenAI Agents SDK: "
                   "set_default_openai_api(\"chat_completions\"); LangChain's ChatOpenAI: use_responses_api=False)")
    elif bare.endswith("/embeddings"):
        message = "embeddings are not served here: this server generates text (/v1/chat/completions, /v1/completions)"
    else:
        message = f"no endpoint {path}; this server serves {', '.join(ENDPOINTS)}"
    return ApiError(404, message, code="not_found")


def unreadable_body(cause: BaseException | None) -> ApiError:
    """The 400 for a JSON body that Python's parser gave up on with something other than a syntax
    error (FastAPI's "There was an error parsing the body", raised from `cause`): its reason."""
    if isinstance(cause, UnicodeDecodeError):
        message = (f"the request body is not valid UTF-8 (byte 0x{cause.object[cause.start]:02x} at position "
                   f"{cause.start})")
    elif isinstance(cause, RecursionError):
        message = "the request body is nested too deeply for the JSON parser (keep it nested less than 1,000 deep)"
    elif isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        message = (f"the request body has an integer of more than {sys.get_int_max_str_digits():,} digits, "
                   "more than the JSON parser reads")
    else:
        detail = f" ({type(cause).__name__}: {str(cause)[:100]})" if cause is not None else ""
        message = f"the request body could not be read as JSON{detail}"
    return ApiError(400, message, code="invalid_json")


class Throttled:
    """A warning said at most once per `interval` seconds, the next line counting those left
    unsaid: a failure that repeats for every request or connection is a line every few seconds,
    not one each (a full listen backlog of failed accepts wrote 84 MB of log in 20 s)."""

    def __init__(self, interval: float = 5.0):
        self.interval = interval
        self._last, self._unsaid = -math.inf, 0
        self._lock = threading.Lock()  # log handlers and engine threads warn too, not only the event loop

    def warn(self, message: str) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.interval:
                self._unsaid += 1
                return
            unsaid, self._last, self._unsaid = self._unsaid, now, 0
        warn(message + (f" ({unsaid:,} more times since the last such line)" if unsaid else ""))


# errno of an OSError that is a passing shortage of the machine's resources: what ran out.
_SHORTAGES = {errno.EMFILE: "open files", errno.ENFILE: "open files", errno.ENOMEM: "memory",
              errno.EAGAIN: "threads"}  # EAGAIN: fork or clone refused (pthread_create, a C library's pool)
_short_of_resources = Throttled()


def resource_shortage(e: BaseException) -> str | None:
    """What the machine ran out of, when `e` says it did for the moment (a thread that could not
    start under `ulimit -u` or a container's pids limit, a file or socket under `ulimit -n`,
    memory): a 503 to retry, not a fault of the server. None for any other error."""
    if memory := memory_shortage(e):
        return memory
    if isinstance(e, RuntimeError) and "can't start new thread" in str(e):
        return "threads"
    if isinstance(e, OSError):
        return _SHORTAGES.get(e.errno)
    return None


def generation_error(e: BaseException) -> ApiError:
    """What a failure during generation is answered with."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, EngineUnavailable):
        return ApiError(503, str(e), type="server_error", code="engine_unavailable")
    if isinstance(e, GenerationFault):  # a Gpt1Error, but the model's fault (logits that overflow), not the request's
        return ApiError(500, f"generation failed: {e}", type="server_error")
    if isinstance(e, Gpt1Error):
        return ApiError(400, str(e))
    if shortage := resource_shortage(e):
        # One line for the operator, with the limit to raise; the client's says only what to do,
        # and never the error's own text (an OSError names a file: a path of this machine).
        hint = threads_hint() if shortage == "threads" else open_files_hint(e) if isinstance(e, OSError) else None
        # An OSError's strerror leaves its file name out; a MemoryError has no message: its type alone.
        detail = f"{type(e).__name__}: {e.strerror}" if getattr(e, "strerror", None) else first_line(e)
        _short_of_resources.warn(f"a request got 503: the server is short of {shortage} ({detail})"
                                 + (f"; {hint}" if hint else ""))
        return ApiError(503, f"the server is short of {shortage} for the moment; retry later", type="server_error",
                        code="server_overloaded", headers={"Retry-After": "1"})
    return ApiError(500, f"generation failed: {first_line(e)}", type="server_error")
