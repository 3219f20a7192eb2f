"""The chat page, in a real headless Chromium (Debian's `chromium`, driven by Playwright)
against a real server: streaming, sliders, presets, stop, reset and the API key field."""

from __future__ import annotations

import os
import shutil
import time

import httpx
import pytest

import gpt1
from gpt1.core.sampling_params import PRESETS, SamplingParams
from gpt1.serve import background_server, create_app
from tests.test_serve_api import endless_model_dir

KEY = "page-key-42"
CHROMIUM = os.environ.get("GPT1_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server(tiny_config, tokenizer, tmp_path_factory):
    llm = gpt1.load(endless_model_dir(tiny_config, tokenizer, tmp_path_factory.mktemp("page-model")), device="cpu")
    app = create_app(llm, api_key=KEY)
    with background_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: install it (apt-get install chromium) or set GPT1_CHROMIUM")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    url, _ = server
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    page.sent = []  # (headers, body) of each chat request the page makes
    page.errors = []  # uncaught JavaScript exceptions
    page.on("pageerror", lambda error: page.errors.append(error))
    page.on("request", lambda r: page.sent.append((r.headers, r.post_data_json))
            if r.url.endswith("/v1/chat/completions") else None)
    page.goto(url)
    yield page
    context.close()


def knob(page, name: str) -> float:
    return float(page.input_value(f"#k-{name}-value"))


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def test_chat_streams_a_reply_with_the_knobs_sent(page, server):
    url, _ = server
    assert page.title() == "gpt1 chat"
    defaults = SamplingParams()
    assert knob(page, "temperature") == defaults.temperature and knob(page, "top_k") == defaults.top_k
    assert knob(page, "top_p") == defaults.top_p and knob(page, "repeat_penalty") == defaults.repeat_penalty

    # Without the key the server says 401 and the page shows its message.
    send(page, "Hello")
    page.wait_for_selector(".msg.error")
    assert "API key" in page.inner_text(".msg.error .body")
    page.click("#reset")
    page.fill("#api-key", KEY)

    # Move sliders with the keyboard, as a user would; type a value into a number box.
    page.focus("#k-temperature")
    page.keyboard.press("Home")
    page.focus("#k-top_k")
    for _ in range(5):
        page.keyboard.press("ArrowRight")
    page.fill("#k-max_tokens-value", "12")
    page.fill("#system", "Be brief.")
    assert knob(page, "temperature") == 0 and knob(page, "top_k") == 5
    # Count the updates of the reply's text: a streamed reply grows in several steps.
    page.evaluate("""() => {
        window.updates = 0;
        new MutationObserver((records) => {
            for (const r of records) {
                const el = r.target.nodeType === Node.TEXT_NODE ? r.target.parentElement : r.target;
                if (el && el.closest('.msg.assistant .body')) window.updates++;
            }
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    }""")
    send(page, "Hello")
    page.wait_for_function("() => document.querySelector('.msg.assistant .meta').textContent.length > 0")

    headers, body = page.sent[-1]
    assert headers["authorization"] == f"Bearer {KEY}"
    assert body["temperature"] == 0 and body["top_k"] == 5 and body["max_tokens"] == 12 and body["stream"] is True
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    reply = page.inner_text(".msg.assistant .body")
    assert page.evaluate("window.updates") > 3
    assert "12 tokens" in page.inner_text(".msg.assistant .meta")
    # Greedy: the streamed reply is the API's non-streamed answer to the same request.
    unstreamed = {k: v for k, v in body.items() if k != "stream_options"}  # only allowed with stream: true
    same = httpx.post(f"{url}/v1/chat/completions", json={**unstreamed, "stream": False},
                      headers={"Authorization": f"Bearer {KEY}"}).json()
    assert reply == same["choices"][0]["message"]["content"] and reply.strip()

    # The next turn sends the whole conversation.
    send(page, "More?")
    page.wait_for_function("() => document.querySelectorAll('.msg.assistant .meta')[1]?.textContent.length > 0")
    roles = [m["role"] for m in page.sent[-1][1]["messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    assert page.sent[-1][1]["messages"][2]["content"] == reply
    assert page.errors == []


def test_presets_stop_and_reset(page, server):
    _, app = server
    engine = app.state.engine
    page.fill("#api-key", KEY)
    page.click("text=Code")
    code = PRESETS["code"]
    for name in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n"):
        assert knob(page, name) == pytest.approx(getattr(code, name)), name
    assert knob(page, "max_tokens") == code.max_new_tokens
    page.click("text=Creative writing")
    assert knob(page, "temperature") == pytest.approx(PRESETS["creative"].temperature)
    page.click("text=Q&A")
    assert knob(page, "top_k") == PRESETS["qa"].top_k

    # Stop: a long reply is cut off, and the server stops generating it.
    page.fill("#k-max_tokens-value", "8000")
    cancelled = engine.stats.cancelled
    send(page, "Tell me a long story.")
    page.wait_for_function("() => document.querySelector('.msg.assistant .body').textContent.length > 20", polling=50)
    page.click("#stop")
    page.wait_for_function("() => document.querySelector('.msg.assistant .meta').textContent.includes('stopped')", polling=50)
    deadline = time.monotonic() + 10
    while engine.stats.cancelled == cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats.cancelled == cancelled + 1 and engine.active == 0
    sent = page.sent[-1][1]
    assert sent["temperature"] == PRESETS["qa"].temperature and sent["top_k"] == PRESETS["qa"].top_k
    assert sent["max_tokens"] == 8000

    # Reset: the conversation is gone, on screen and in what the next request sends.
    page.click("#reset")
    assert page.locator(".msg").count() == 0
    page.fill("#k-max_tokens-value", "3")
    send(page, "Hi again")
    page.wait_for_function("() => document.querySelector('.msg.assistant .meta')?.textContent.length > 0")
    assert [m["role"] for m in page.sent[-1][1]["messages"]] == ["user"]
    assert page.errors == []
    if os.environ.get("GPT1_SCREENSHOT"):
        page.screenshot(path=os.environ["GPT1_SCREENSHOT"], full_page=True)


@pytest.mark.parametrize("name", ["x<!--<script>", "</script><b>&amp;", "a&lt;b>"])
def test_a_model_name_with_markup_is_shown_as_text(browser, tiny_model_dir, name):
    """A model named `x<!--<script>` blanked the page: the config's JSON went into a <script>
    element with only "</" escaped, and "<!--<script>" made the rest of the page script."""
    llm = gpt1.load(tiny_model_dir, device="cpu")
    with background_server(create_app(llm, model_name=name)) as url:
        page = browser.new_page()
        page.set_default_timeout(10_000)
        errors = []
        page.on("pageerror", lambda error: errors.append(error))
        page.goto(url)
        assert page.inner_text("#model-name") == f"{name} · {llm.config.block_size}-token context"
        assert page.locator("#k-temperature").count() == 1 and page.locator("b").count() == 0
        assert errors == []
        page.close()
