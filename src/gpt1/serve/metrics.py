"""`GET /metrics`: the engine's load and counts in Prometheus' text format (0.0.4), what a
scraper (Prometheus, Grafana Agent, Datadog's OpenMetrics check) reads, as vLLM and TGI offer it.

The numbers are those of `/health` (load, recent rate) and of the engine's `EngineStats`
(cumulative counts since the server started), each family with its HELP and TYPE lines and a
`model` label, so that several servers scraped into one Prometheus stay apart. Written by hand:
the format is a dozen lines, not worth a dependency (the tests parse it with prometheus_client's
own parser).
"""

from __future__ import annotations

from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (name, type, help, value of the engine); a counter's name ends in _total, as the format asks.
_GAUGES = (
    ("gpt1_engine_up", "1 while the engine runs, 0 before it starts and once it has stopped (e.g. its process exited).",
     lambda engine: int(engine.alive)),
    ("gpt1_requests_running", "Requests in the batch (prefilling or decoding).", lambda engine: engine.active),
    ("gpt1_requests_waiting", "Requests queued for a slot.", lambda engine: engine.queued),
    ("gpt1_free_slots", "KV-cache slots free for a request (max_batch - running).", lambda engine: engine.free_slots),
    ("gpt1_max_batch", "KV-cache slots: the most requests decoded together.", lambda engine: engine.max_batch),
    ("gpt1_generation_tokens_per_second", "Tokens generated per second over the last 10 s.",
     lambda engine: round(engine.tokens_per_s, 3)),
)
_COUNTERS = (
    ("gpt1_generation_tokens_total", "Completion tokens given to requests, those of cancelled requests included (none of a failed row).", "tokens"),
    ("gpt1_engine_steps_total", "Batched forward passes of the engine.", "steps"),
    ("gpt1_requests_submitted_total", "Requests accepted into the queue.", "submitted"),
)
# gpt1_requests_finished_total{outcome=...}: how the accepted requests ended, and those refused.
_OUTCOMES = ("completed", "cancelled", "failed", "rejected")


def metrics_text(engine: Any, model: str) -> str:
    """The exposition of `engine` (an Engine or EngineProcess) serving `model`."""
    label = f'model="{_escape(model)}"'
    stats = engine.stats
    lines: list[str] = []
    for name, help_text, value in _GAUGES:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name}{{{label}}} {value(engine)}"]
    for name, help_text, field in _COUNTERS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name}{{{label}}} {getattr(stats, field)}"]
    name = "gpt1_requests_finished_total"
    lines += [f"# HELP {name} Requests by how they ended: completed (stop or length), cancelled (e.g. the "
              "client went away), failed (an error), rejected (queue full, too large, or short of memory).",
              f"# TYPE {name} counter"]
    lines += [f'{name}{{{label},outcome="{outcome}"}} {getattr(stats, outcome)}' for outcome in _OUTCOMES]
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    # A label value escapes backslash, double quote and line feed (the format's only escapes).
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
