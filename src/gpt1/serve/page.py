"""The chat page (static/index.html) with its settings filled in: the model, its context, whether
a key is needed, gpt1's defaults and presets, and the bounds the server holds each knob to. One
source of defaults, presets and bounds for the page and the library."""

from __future__ import annotations

import functools
import json
from importlib import resources

from gpt1.core.sampling_params import PRESETS, SamplingParams
from gpt1.serve.mapping import param_dict
from gpt1.serve.schemas import ChatCompletionRequest

_KNOBS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "max_tokens")
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


@functools.cache
def _schema_bounds() -> dict[str, dict]:
    """Each knob's bounds as the request schema states them (JSON Schema's minimum, maximum,
    exclusiveMinimum, exclusiveMaximum, and whether it is an integer), which
    tests/test_serve_conformance.py holds to SamplingParams.validate."""
    properties = ChatCompletionRequest.model_json_schema()["properties"]
    bounds = {}
    for name in _KNOBS:
        spec = properties[name]
        bounds[name] = {key: spec[key] for key in _BOUNDS if key in spec}
        bounds[name]["integer"] = any(t.get("type") == "integer" for t in spec.get("anyOf", [spec]))
    return bounds


def knob_bounds(context: int) -> dict[str, dict]:
    """The page's boxes take what the server takes: a value out of these bounds is marked in its
    box instead of sent for a 400, and one in them is sent, however far it is past a slider's end."""
    bounds = {name: dict(b) for name, b in _schema_bounds().items()}
    bounds["max_tokens"]["maximum"] = context  # the schema cannot say it: the model's context
    return bounds


def page_html(model_name: str, context: int, auth: bool) -> str:
    html = resources.files("gpt1.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    config = {"model": model_name, "context": context, "auth": auth,
              "defaults": param_dict(SamplingParams()),
              "presets": {name: param_dict(p) for name, p in PRESETS.items()},
              "bounds": knob_bounds(context)}
    # No "<", ">" or "&" in the script element: "</script>" would close it and "<!--" would put the
    # HTML parser in a state where the rest of the page is script (a model named "x<!--<script>"
    # blanked the page). As JSON escapes they are the same strings.
    safe = json.dumps(config).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return html.replace("__GPT1_CONFIG__", safe)
