"""The chat page (static/index.html) with its settings filled in: the model, its context, whether
a key is needed, gpt1's defaults and presets. One source of defaults and presets for the page
and the library."""

from __future__ import annotations

import json
from importlib import resources

from gpt1.core.sampling_params import PRESETS, SamplingParams
from gpt1.serve.mapping import param_dict


def page_html(model_name: str, context: int, auth: bool) -> str:
    html = resources.files("gpt1.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    config = {"model": model_name, "context": context, "auth": auth,
              "defaults": param_dict(SamplingParams()),
              "presets": {name: param_dict(p) for name, p in PRESETS.items()}}
    # No "<", ">" or "&" in the script element: "</script>" would close it and "<!--" would put the
    # HTML parser in a state where the rest of the page is script (a model named "x<!--<script>"
    # blanked the page). As JSON escapes they are the same strings.
    safe = json.dumps(config).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return html.replace("__GPT1_CONFIG__", safe)
