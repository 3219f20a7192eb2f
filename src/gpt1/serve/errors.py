"""OpenAI-style errors: every failure is answered as `{"error": {"message", "type", "param",
"code"}}` with a 4xx status (5xx only for the server's own faults), FastAPI's 422 validation
errors included, because OpenAI answers 400 and its clients expect that shape."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from gpt1.core.errors import Gpt1Error
from gpt1.inference.engine import EngineUnavailable


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
        message = "unrecognized request argument"
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


def generation_error(e: BaseException) -> ApiError:
    """What a failure during generation is answered with."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, EngineUnavailable):
        return ApiError(503, str(e), type="server_error", code="engine_unavailable")
    if isinstance(e, Gpt1Error):
        return ApiError(400, str(e))
    return ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")
