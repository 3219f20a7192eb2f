"""`GET /metrics`: Prometheus' text format, read back with prometheus_client's own parser, on a
real server per engine kind; the counters follow the requests that were made."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpt1.serve import background_server, create_app
from tests.test_serve_api import wait_for

KEY = "k"


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape, parsed as Prometheus parses it."""
    response = httpx.get(f"{url}/metrics")  # no key: a scraper reads it as it reads /health
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = list(text_string_to_metric_families(response.text))
    assert all(f.documentation for f in families), "every family has its HELP line"
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


@pytest.mark.parametrize("engine_kind", ["thread", "process"])
def test_metrics_count_what_the_server_did(llm, engine_kind):
    name = 'a "quoted" \\ name\nwith a line feed'  # every character the format escapes in a label
    model = (("model", name),)
    app = create_app(llm, api_key=KEY, max_batch=3, engine=engine_kind, model_name=name)
    with background_server(app) as url:
        wait_for(lambda: httpx.get(f"{url}/health").json()["status"] == "ok")
        before = scrape(url)
        assert before[("gpt1_engine_up", model)] == 1
        assert before[("gpt1_max_batch", model)] == before[("gpt1_free_slots", model)] == 3
        generated = 0
        for max_tokens in (5, 7):
            reply = httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                               json={"prompt": "hello", "max_tokens": max_tokens, "temperature": 0}).json()
            generated += reply["usage"]["completion_tokens"]
        refused = httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                             json={"prompt": ["x"] * 200, "max_tokens": 1})  # more prompts than slots + queue
        assert refused.status_code in (400, 503), refused.text
        # The process engine's counts reach the server with its next report: wait for them.
        wait_for(lambda: scrape(url)[("gpt1_generation_tokens_total", model)] - before[("gpt1_generation_tokens_total", model)] == generated)
        after = scrape(url)

    def grew(sample: str, *labels: tuple[str, str]) -> float:
        key = (sample, tuple(sorted(model + labels)))
        return after[key] - before[key]

    assert generated > 0
    assert grew("gpt1_requests_submitted_total") == 2
    assert grew("gpt1_requests_finished_total", ("outcome", "completed")) == 2
    assert grew("gpt1_requests_finished_total", ("outcome", "rejected")) == 200  # one per prompt refused
    assert grew("gpt1_requests_finished_total", ("outcome", "failed")) == 0
    assert grew("gpt1_engine_steps_total") >= max(5, 7)  # one step per token at least for the longer reply
    assert after[("gpt1_requests_running", model)] == after[("gpt1_requests_waiting", model)] == 0
    assert after[("gpt1_generation_tokens_per_second", model)] > 0  # tokens within the last 10 s


def test_access_log_lines_say_when(capsys):
    """uvicorn's access line said who, what and the status, but not when: a server's log file
    could not tell when a request came. The line now starts with an ISO 8601 time and offset."""
    import logging.config
    import re

    from gpt1.serve.server import _log_config

    logging.config.dictConfig(_log_config())
    try:
        logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/health", "1.1", 200)
    finally:
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} INFO: +127\.0\.0\.1:5000 - "GET /health HTTP/1\.1" 200 OK',
                        line), line
