"""The chat page, in a real headless Chromium (Debian's `chromium`, driven by Playwright)
against a real server: streaming, sliders, presets, stop, reset, the API key field, failed sends,
the settings boxes, how a reply ended, long chats, narrow screens and accessibility (contrast,
focus, structure for screen readers, right-to-left text, reduced motion, forced colours)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import httpx
import pytest

import gpt1
from gpt1.core.sampling_params import PRESETS, SamplingParams
from gpt1.serve import background_server, create_app
from tests.test_serve_api import endless_model_dir

KEY = "page-key-42"
STEP_S = 0.003
CHROMIUM = os.environ.get("GPT1_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server(tiny_config, tokenizer, tmp_path_factory):
    llm = gpt1.load(endless_model_dir(tiny_config, tokenizer, tmp_path_factory.mktemp("page-model")), device="cpu")
    # Each model call takes at least STEP_S, so that an 8,000-token reply that a test stops is
    # still streaming when Stop is clicked (>= 24 s). Unslowed, a fast machine ended one in ~4 s,
    # while the loaded browser was still drawing its first words (CI, once).
    llm.model.register_forward_hook(lambda *_: time.sleep(STEP_S))
    app = create_app(llm, api_key=KEY)
    paths = []  # of each request: the browser's own (its icon) are no page events

    async def recording(scope, receive, send):
        paths.append(scope.get("path"))
        drop_after = int(dict(scope.get("headers") or []).get(b"x-test-drop-after", 0))
        if not drop_after:
            return await app(scope, receive, send)
        # A server that dies mid-reply (killed, out of memory): its connection closes after
        # `drop_after` writes, without the stream's end (the chunked body's last chunk).
        writes = 0

        async def dying(message):
            nonlocal writes
            if message["type"] == "http.response.body":
                writes += 1
                if writes > drop_after:
                    raise RuntimeError("the server died")
            await send(message)

        await app(scope, receive, dying)

    with background_server(recording) as url:
        yield url, app, paths


@pytest.fixture
def page(browser, server):
    url, _, _ = server
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


def open_page(browser, url, **context_options):
    """The page at `url` in a new context (1200 x 800 unless `context_options` say otherwise), with
    the body of each chat request it makes (`page.sent`) and its uncaught errors (`page.errors`)."""
    context = browser.new_context(**{"viewport": {"width": 1200, "height": 800}, **context_options})
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.sent = []  # the body of each chat request the page makes
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(error))
    page.on("request", lambda r: page.sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    page.goto(url)
    return page


def knob(page, name: str) -> float:
    return float(page.input_value(f"#k-{name}-value"))


def send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_done(page) -> None:
    page.wait_for_function("() => !document.querySelector('.msg.streaming') && document.getElementById('stop').disabled")


def focused(page) -> str:
    return page.evaluate("document.activeElement.id")


def contrast(foreground: str, background: str) -> float:
    """WCAG's contrast ratio of two computed CSS colours ("rgb(91, 140, 255)")."""
    def luminance(css: str) -> float:
        channels = [int(v) / 255 for v in re.findall(r"\d+", css)[:3]]
        r, g, b = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * r + 0.7152 * g + 0.0722 * b
    light, dark = sorted([luminance(foreground), luminance(background)], reverse=True)
    return (light + 0.05) / (dark + 0.05)


def style(page, selector: str, prop: str, pseudo: str | None = None) -> str:
    return page.eval_on_selector(selector, "(el, [prop, pseudo]) => getComputedStyle(el, pseudo)[prop]", [prop, pseudo])


def focus_comes_to(page, element_id: str) -> str:
    """The focused element's id once it is `element_id` (or after 5 s): focus moves in the click's
    handler, which on loaded cores the browser may not have run when the click returns (failed
    once in CI with the whole suite running)."""
    page.wait_for_function(f"document.activeElement.id === {element_id!r}", timeout=5000, polling=50)
    return focused(page)


def test_chat_streams_a_reply_with_the_knobs_sent(page, server):
    url, _, paths = server
    assert page.title() == "gpt1 chat"
    defaults = SamplingParams()
    assert knob(page, "temperature") == defaults.temperature and knob(page, "top_k") == defaults.top_k
    assert knob(page, "top_p") == defaults.top_p and knob(page, "repeat_penalty") == defaults.repeat_penalty

    # Each field has a name of its own (not its placeholder).
    for name, field in [("Message", "input"), ("System prompt", "system"), ("API key", "api-key")]:
        assert page.get_by_label(name, exact=True).get_attribute("id") == field

    # Without the key the server says 401 and the page says where the key goes. The message
    # failed: it leaves the screen and the conversation and goes back into the box.
    send(page, "Hello")
    page.wait_for_selector(".msg.error")
    assert page.inner_text(".msg.error .body") == "this server needs an API key: enter it in the API key field"
    assert page.locator(".msg.user").count() == 0 and page.input_value("#input") == "Hello"
    assert page.inner_text("#status") == "error"
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
    page.fill("#input", "Hello")
    page.click("#send")
    assert focus_comes_to(page, "input") == "input"  # not the page: the Send button it was on is disabled
    page.wait_for_function("() => document.querySelector('.msg.assistant .meta').textContent.length > 0")

    headers, body = page.sent[-1]
    assert headers["authorization"] == f"Bearer {KEY}"
    assert body["temperature"] == 0 and body["top_k"] == 5 and body["max_tokens"] == 12 and body["stream"] is True
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    reply = page.inner_text(".msg.assistant .body")
    assert page.evaluate("window.updates") > 3
    assert page.inner_text(".msg.assistant .meta").startswith("12 tokens · stopped at max tokens")
    # Screen readers hear the reply once, when it ends, not each token of a live log.
    assert page.get_attribute("#log", "aria-live") is None
    assert page.inner_text("#announce").startswith(reply)
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
    assert "/favicon.ico" not in paths  # the page has its (empty) icon: no 404 in the console
    assert page.errors == []


def test_presets_stop_and_reset(page, server):
    _, app, _ = server
    engine = app.state.engine
    page.fill("#api-key", KEY)
    page.click("text=Code")
    assert [b.get_attribute("aria-pressed") for b in page.locator("#presets button").all()] == ["false", "false", "true"]
    # In forced colours (Windows High Contrast) the selected preset looked like the others.
    page.emulate_media(forced_colors="active")
    assert style(page, "text=Code", "backgroundColor") != style(page, "text=Q&A", "backgroundColor")
    page.emulate_media(forced_colors="none")
    code = PRESETS["code"]
    for name in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n"):
        assert knob(page, name) == pytest.approx(getattr(code, name)), name
    assert page.input_value("#k-max_tokens-value") == ""  # a preset keeps the length (the server's default)
    page.click("text=Creative writing")
    assert knob(page, "temperature") == pytest.approx(PRESETS["creative"].temperature)
    page.click("text=Q&A")
    assert knob(page, "top_k") == PRESETS["qa"].top_k

    # Stop: a long reply is cut off, and the server stops generating it.
    page.fill("#k-max_tokens-value", "8000")
    assert page.get_attribute("text=Q&A", "aria-pressed") == "false"
    cancelled = engine.stats.cancelled
    send(page, "Tell me a long story.")
    page.wait_for_function("() => document.querySelector('.msg.assistant .body').textContent.length > 20", polling=50)
    page.click("#stop")
    assert focus_comes_to(page, "input") == "input"
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
    # A reply that ends while Stop has focus (tabbed to, about to be pressed): focus fell to the
    # page when Stop was disabled. Sent and focused in one task, so the reply cannot end between.
    page.fill("#input", "Hi again")
    page.evaluate("() => { document.getElementById('composer').requestSubmit(); document.getElementById('stop').focus(); }")
    assert focused(page) == "stop"
    page.wait_for_function("() => document.querySelector('.msg.assistant .meta')?.textContent.length > 0")
    assert focus_comes_to(page, "input") == "input"
    assert [m["role"] for m in page.sent[-1][1]["messages"]] == ["user"]
    assert page.errors == []
    if os.environ.get("GPT1_SCREENSHOT"):
        page.screenshot(path=os.environ["GPT1_SCREENSHOT"], full_page=True)


@pytest.mark.parametrize("name", ["x<!--<script>", "</script><b>&amp;", "a&lt;b>",
                                  "tinystories_chat_sft_lora_r16_alpha32_merged_20261206"])
def test_a_model_name_with_markup_is_shown_as_text(browser, tiny_model_dir, name):
    """A model named `x<!--<script>` blanked the page: the config's JSON went into a <script>
    element with only "</" escaped, and "<!--<script>" made the rest of the page script. A name
    without break points (a folder's, underscores) made the page 410 px wide on a 320 px phone."""
    llm = gpt1.load(tiny_model_dir, device="cpu")
    with background_server(create_app(llm, model_name=name)) as url:
        page = browser.new_page(viewport={"width": 320, "height": 568})
        page.set_default_timeout(10_000)
        errors = []
        page.on("pageerror", lambda error: errors.append(error))
        page.goto(url)
        assert page.inner_text("#model-name") == f"{name} · {llm.config.block_size}-token context"
        assert page.locator("#k-temperature").count() == 1 and page.locator("b").count() == 0
        assert page.evaluate("document.documentElement.scrollWidth") == 320
        assert errors == []
        page.close()


def test_the_settings_boxes_send_what_they_show(page, server):
    """An empty box means gpt1's default (it was sent as 0: an empty temperature was greedy), a
    box that is not a number is shown as an error and nothing is sent, and a seed is sent digit
    for digit (Number() turned 2**64 - 1 into a seed the server refused)."""
    url, _, _ = server
    page.fill("#api-key", KEY)
    page.fill("#k-max_tokens-value", "4")
    page.fill("#k-temperature-value", "")
    assert page.get_attribute("#k-temperature-value", "placeholder") == str(SamplingParams().temperature)
    page.fill("#seed", str(2**64 - 1))
    send(page, "Hello")
    wait_done(page)
    headers, body = page.sent[-1]
    assert "temperature" not in body and body["max_tokens"] == 4
    assert body["seed"] == 2**64 - 1
    same = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False, "stream_options": None},
                      headers={"Authorization": f"Bearer {KEY}"}).json()
    assert page.inner_text(".msg.assistant .body") == same["choices"][0]["message"]["content"]

    # What the browser cannot read as a number: the box says so, and the message stays unsent.
    page.fill("#k-top_p-value", "")
    page.focus("#k-top_p-value")
    page.keyboard.type("-")
    for box, value in [("#k-top_p-value", None), ("#seed", "1.5"), ("#seed", str(2**64))]:
        if value is not None:
            page.fill("#seed", value)
        sent = len(page.sent)
        send(page, "Again")
        assert page.get_attribute(box, "aria-invalid") == "true" and focused(page) == box[1:]
        assert page.input_value("#input") == "Again" and len(page.sent) == sent
        message = page.eval_on_selector(box, "box => box.validationMessage")
        assert message.startswith("Top-p is not a number" if box != "#seed" else "Seed must be an integer"), message
        # Its border is red as its outline (a rule that lost on specificity left it grey), and
        # focused it shows more than that 1px outline (which took the focus ring's place).
        assert style(page, box, "borderTopColor") == style(page, box, "outlineColor")
        focused_outline = style(page, box, "outlineWidth"), style(page, box, "outlineOffset")
        page.eval_on_selector(box, "box => box.blur()")
        assert focused_outline != (style(page, box, "outlineWidth"), style(page, box, "outlineOffset"))
        page.fill("#k-top_p-value", "0.9")
    assert page.get_attribute("#k-top_p-value", "aria-invalid") is None
    assert page.errors == []


@pytest.fixture(scope="module")
def short_server(tiny_config, tokenizer, tmp_path_factory):
    """A 64-token context whose replies never end by themselves: they end at the context."""
    llm = gpt1.load(endless_model_dir(tiny_config, tokenizer, tmp_path_factory.mktemp("short"), block_size=64),
                    device="cpu")
    with background_server(create_app(llm)) as url:
        yield url


def test_a_reply_says_how_it_ended(browser, server, short_server):
    """"length" is the context limit when fewer tokens than max_tokens came (it read "stopped at
    max tokens"), and a stream that ends without [DONE] or a finish reason is cut off (it read
    as a finished reply)."""
    page = browser.new_page()
    page.goto(short_server)
    page.fill("#k-max_tokens-value", "64")
    send(page, "Hi")
    wait_done(page)
    assert page.inner_text(".msg.assistant .meta").split(" · ")[1] == "stopped at the context limit"
    page.fill("#k-max_tokens-value", "5")
    send(page, "Hi")
    wait_done(page)
    assert page.inner_text(".msg.assistant >> nth=1 >> .meta").startswith("5 tokens · stopped at max tokens")
    page.close()

    # A proxy that closes the connection cleanly halfway through the real server's stream.
    url, _, _ = server
    page = browser.new_page()
    page.goto(url)
    page.fill("#api-key", KEY)
    page.fill("#k-max_tokens-value", "8")

    def cut(route):  # the first three events: text, no finish reason, no [DONE]
        events = route.fetch().text().split("\n\n")
        route.fulfill(status=200, content_type="text/event-stream", body="\n\n".join(events[:3]) + "\n\n")

    page.route("**/v1/chat/completions", cut)
    send(page, "Hi")
    wait_done(page)
    assert page.inner_text(".msg.assistant .body").strip()
    assert "error: the reply was cut off" in page.inner_text(".msg.assistant .meta")
    assert page.inner_text("#status") == "error"

    # The server dies mid-reply (killed, out of memory; or a proxy resets the connection): the
    # page said the browser's "network error". The text that came is the reply, with the error in
    # its note; or none came (the browser drops what the page had not read yet): the error box.
    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions",
               lambda route: route.continue_(headers={**route.request.headers, "x-test-drop-after": "4"}))
    send(page, "Hi")
    wait_done(page)
    said = page.locator(".msg").last.inner_text()
    assert said.endswith("the reply was cut off: the connection to the server was lost"), said
    assert page.inner_text("#status") == "error"

    # No server at all: said in words (the browser's are "Failed to fetch").
    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
    send(page, "Anyone?")
    wait_done(page)  # not the first .msg.error: the dropped stream's may be one
    assert page.locator(".msg.error .body").last.inner_text() == "cannot reach the server: is it running?"
    assert page.input_value("#input") == "Anyone?"
    page.close()


def test_the_page_for_eyes_keyboards_and_screen_readers(page):
    """What axe-core would check, computed in the browser: contrast in both colour schemes, the
    conversation reachable by keyboard, named messages and described fields for screen readers,
    right-to-left text laid out as such, and no blinking cursor for prefers-reduced-motion."""
    expect = pytest.importorskip("playwright.sync_api").expect
    # Contrast: Send's text (white on the dark scheme's light accent was 3.2:1), the placeholders
    # (the browser's grey was 3.9:1 on the dark fields; the message box's holds its instructions),
    # and a text field's edge against its panel (1.3:1, WCAG's non-text contrast asks 3:1).
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        assert contrast(style(page, "#send", "color"), style(page, "#send", "backgroundColor")) >= 4.5, scheme
        for field in ("#input", "#system", "#seed", "#k-top_k-value"):
            ratio = contrast(style(page, field, "color", "::placeholder"), style(page, field, "backgroundColor"))
            assert ratio >= 4.5, (scheme, field, ratio)
        for field, panel in [("#input", "#composer"), ("#system", "#settings"), ("#seed", "#settings")]:
            ratio = contrast(style(page, field, "borderTopColor"), style(page, panel, "backgroundColor"))
            assert ratio >= 3, (scheme, field, ratio)
    page.emulate_media(color_scheme="light")

    # The conversation is a named region that Tab reaches (to scroll it by keyboard in any
    # browser), not a live one: a reply is announced once, when it ends, from #announce.
    log = page.get_by_role("region", name="Conversation")
    assert log.get_attribute("id") == "log" and log.get_attribute("aria-live") is None
    page.focus("#api-key")
    page.keyboard.press("Tab")
    assert focused(page) == "log"
    # The hints are the fields' descriptions.
    expect(page.locator("#k-temperature")).to_have_accessible_description("0 = always the most likely token")
    expect(page.locator("#k-temperature-value")).to_have_accessible_description("0 = always the most likely token")
    expect(page.locator("#seed")).to_have_accessible_description(re.compile(r"^an integer in \[-2\^63, 2\^64\)"))

    # Streaming under prefers-reduced-motion: the cursor stays, without blinking.
    page.fill("#api-key", KEY)
    page.fill("#k-max_tokens-value", "8000")
    page.emulate_media(reduced_motion="reduce")
    send(page, "מה השעה?")
    page.wait_for_function("() => document.querySelector('.msg.streaming .body')?.textContent.length > 5", polling=50)
    assert style(page, ".msg.streaming .body", "animationName", "::after") == "none"
    page.emulate_media(reduced_motion="no-preference")
    assert style(page, ".msg.streaming .body", "animationName", "::after") == "blink"
    page.click("#stop")
    wait_done(page)

    # One article per message, named by who wrote it; a Hebrew message reads right to left (its
    # "?" was drawn at the sentence's start), and so do the text boxes given Hebrew.
    assert page.get_by_role("article", name="You").inner_text().endswith("מה השעה?")
    assert page.get_by_role("article", name="Assistant").count() == 1
    assert style(page, ".msg.user .body", "direction") == "rtl"
    for box in ("#input", "#system"):
        page.fill(box, "שלום")
        assert style(page, box, "direction") == "rtl", box
    assert page.errors == []


def test_a_long_chat_on_a_phone(browser, server, short_server):
    """At 320 px the message box was 72 px wide. A reply followed by the view pulled a reader
    back down. And a chat of over 1 MiB failed every turn with 413 until Reset: only the recent
    turns (512 KiB) are sent; a message that alone passes the server's limit says so."""
    url, _, _ = server
    context = browser.new_context(viewport={"width": 320, "height": 568})
    page = context.new_page()
    page.goto(url)
    assert page.locator("#input").bounding_box()["width"] > 250
    assert not page.is_visible("#k-temperature") and page.get_attribute("#settings-toggle", "aria-expanded") == "false"
    page.click("#settings-toggle")
    page.fill("#api-key", KEY)
    page.fill("#k-max_tokens-value", "8000")
    page.click("#settings-toggle")
    assert page.locator("#log").bounding_box()["height"] > 300

    # Scrolled up while a reply streams: the view stays; back at the bottom, it follows again.
    send(page, "A long story, please.")
    log = "document.getElementById('log')"
    page.wait_for_function(f"() => {log}.scrollHeight > {log}.clientHeight + 200", polling=50)
    height = page.evaluate(f"{log}.scrollTop = 0, {log}.scrollHeight")
    page.wait_for_function(f"() => {log}.scrollHeight > {height} + 100", polling=50)
    assert page.evaluate(f"{log}.scrollTop") == 0
    height = page.evaluate(f"{log}.scrollTop = {log}.scrollHeight, {log}.scrollHeight")
    page.wait_for_function(f"() => {log}.scrollHeight > {height} + 100", polling=50)
    assert page.evaluate(f"{log}.scrollHeight - {log}.scrollTop - {log}.clientHeight") < 40
    page.click("#reset")  # always enabled (the reply may have ended by now: Stop would not be)

    # Pastes (set as a paste would, at once) into a chat with a 64-token context.
    page.goto(short_server)
    sent = []
    page.on("request", lambda r: sent.append(r.post_data) if r.url.endswith("/v1/chat/completions") else None)

    def paste_and_send(text: str) -> None:
        page.eval_on_selector("#input", "(box, text) => { box.value = text; }", text)
        page.press("#input", "Enter")

    for text in ["a " * 150_000, "b " * 150_000, "ok"]:  # 300 KB each: two pass 512 KiB
        paste_and_send(text)
        wait_done(page)
    turns = [[m["content"][:2] for m in json.loads(body)["messages"]] for body in sent]
    assert turns[1] == ["b "] and turns[2][0] == "b " and turns[2][2] == "ok" and len(turns[2]) == 3

    # One message over the server's 1 MiB: the server's 413, in words for the page, and the text
    # back in the box.
    paste_and_send("c" * (1 << 20))
    page.wait_for_selector(".msg.error")
    assert page.inner_text(".msg.error .body").endswith("this message is too long to send, shorten it")
    assert page.eval_on_selector("#input", "box => box.value.length") == 1 << 20
    context.close()


def test_the_page_works_under_a_prefix(browser, tiny_model_dir):
    """Mounted as docs/serving.md shows (`outer.mount("/llm", ...)`), or behind a proxy at /gpt1/,
    the page posted to /v1/chat/completions at the server's root: 404, and no message went."""
    from fastapi import FastAPI

    llm = gpt1.load(tiny_model_dir, device="cpu")
    llm_app = create_app(llm, api_key=KEY)
    outer = FastAPI()
    outer.mount("/llm", llm_app)
    with background_server(outer) as url:
        page = browser.new_page()
        page.set_default_timeout(10_000)
        errors, posted = [], []
        page.on("pageerror", lambda error: errors.append(error))
        page.on("response", lambda r: posted.append((r.url, r.status)) if r.request.method == "POST" else None)
        page.goto(f"{url}/llm/")
        page.fill("#api-key", KEY)
        page.fill("#k-max_tokens-value", "4")
        send(page, "Hello")
        page.wait_for_selector(".msg.error, .msg.assistant")
        wait_done(page)
        assert posted == [(f"{url}/llm/v1/chat/completions", 200)]
        assert page.locator(".msg.error").count() == 0 and page.locator(".msg.assistant").count() == 1
        assert errors == []
        page.close()
    llm_app.state.engine.stop()  # mounted: no lifespan stops it


# ---- the page may not be framed by another site ---------------------------------------------

def test_the_chat_page_may_not_be_framed_by_another_site(tiny_model_dir):
    """Any page could frame the operator's chat page (its API key typed into it) under its own."""
    import httpx

    from gpt1.serve import background_server, create_app

    with background_server(create_app(gpt1.load(tiny_model_dir, device="cpu"))) as url:
        headers = httpx.get(f"{url}/", timeout=30).headers
    assert headers["x-frame-options"] == "DENY" and headers["content-security-policy"] == "frame-ancestors 'none'"
    assert headers["x-content-type-options"] == "nosniff"
