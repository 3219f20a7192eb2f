"""The chat page as a tester drove it with a keyboard, a phone and right-to-left text, in a real
headless Chromium against a real server: code in a Hebrew reply drawn reversed, a Hebrew model
name that scrambled the header, a row of buttons wider than a phone at 200% zoom, a phone that
could not type a new line, Escape that did not stop a reply, a Reset that said nothing to a
screen reader, and the browser's own parts light in the dark scheme."""

from __future__ import annotations

import json
import time

import pytest

import gpt1
from gpt1.serve import background_server, create_app
from tests.test_serve_api import endless_model_dir
from tests.test_serve_page import STEP_S, contrast, open_page, wait_done

MODEL_NAME = "מודל-קטן"
CONTEXT = 8192
# Where each character of an element's text is drawn: [character, left, top] in the text's order.
CHARACTERS = """(el) => {
  const out = [], walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT), range = document.createRange();
  for (let node; (node = walker.nextNode());) {
    for (let i = 0; i < node.length; i++) {
      range.setStart(node, i);
      range.setEnd(node, i + 1);
      const box = range.getBoundingClientRect();
      out.push([node.data[i], box.left, box.top]);
    }
  }
  return out;
}"""


@pytest.fixture(scope="module")
def server(tiny_config, tokenizer, tmp_path_factory):
    """Replies that run to max_tokens, each step slowed (as in test_serve_page) so that one is still
    streaming when a test stops it; the model has a right-to-left name."""
    model_dir = endless_model_dir(tiny_config, tokenizer, tmp_path_factory.mktemp("rtl"), block_size=CONTEXT)
    llm = gpt1.load(model_dir, device="cpu")
    llm.model.register_forward_hook(lambda *_: time.sleep(STEP_S))
    with background_server(create_app(llm, model_name=MODEL_NAME)) as url:
        yield url


@pytest.fixture
def page(browser, server):
    page = open_page(browser, server)
    yield page
    page.context.close()


def drawn(page, locator, text: str) -> list[float]:
    """The left edge of each character of `text` (its first occurrence in the element), in the text's order."""
    characters = page.locator(locator).evaluate(CHARACTERS)
    whole = "".join(c for c, _, _ in characters)
    start = whole.index(text)
    return [left for _, left, _ in characters[start:start + len(text)]]


def left_to_right(lefts: list[float]) -> bool:
    return all(a < b for a, b in zip(lefts, lefts[1:]))


def right_to_left(lefts: list[float]) -> bool:
    return all(a > b for a, b in zip(lefts, lefts[1:]))


def sse(*pieces: str) -> str:
    """A streamed chat reply of these pieces, as the server sends one."""
    chunks = [{"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]} for piece in pieces]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"


def test_each_line_of_a_message_reads_in_its_own_direction(page):
    """The message's first letter set the direction of every line: a Hebrew reply drew its code
    right to left (`:def f(x)`), and an English one its Hebrew line left to right (the "." at the
    sentence's start). The model here writes no Hebrew: the reply is the server's stream, replayed."""
    code = "def f(x):"
    reply = f"כך:\n{code}\n    return x + 1\nהפלט הוא 3."
    # Cut mid-line, as tokens come.
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body=sse(reply[:6], reply[6:9], reply[9:25], reply[25:])))
    page.fill("#input", f"How do I write it?\nאיך כותבים את {code}")
    page.press("#input", "Enter")
    wait_done(page)
    assert page.inner_text(".msg.assistant .body") == reply

    body = ".msg.assistant .body"
    assert left_to_right(drawn(page, body, code)) and left_to_right(drawn(page, body, "return x + 1"))
    assert right_to_left(drawn(page, body, "הפלט הוא 3."))  # the "." at the left, where Hebrew ends
    # An English message's Hebrew line: right to left, its Latin run left to right within it.
    question = ".msg.user .body"
    assert left_to_right(drawn(page, question, "How do I write it?"))
    assert right_to_left(drawn(page, question, "איך כותבים את"))
    assert left_to_right(drawn(page, question, "def"))
    assert page.errors == []


def test_a_message_with_a_very_long_line_is_laid_out_in_linear_time(browser, server):
    """Each line in its own direction (unicode-bidi: plaintext) costs Chromium time quadratic in a
    line's length: a pasted line of 1 MiB froze a phone's page for 13-16 s (0.3 s otherwise)."""
    page = open_page(browser, server, viewport={"width": 320, "height": 568})
    page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))  # the layout alone
    milliseconds = page.evaluate("""(text) => {
        document.getElementById('input').value = text;
        const start = performance.now();
        document.getElementById('composer').requestSubmit();  // the message is on the screen before the request
        void document.body.offsetHeight;
        return performance.now() - start; }""", "c" * (1 << 20))
    assert milliseconds < 4000
    page.context.close()


def test_a_right_to_left_model_name_keeps_the_header_in_order(page):
    """The name's run took the context's size into it: "8192 · מודל-קטן-token context"."""
    assert page.inner_text("#model-name") == f"{MODEL_NAME} · {CONTEXT}-token context"
    name, rest = drawn(page, "#model-name", MODEL_NAME), drawn(page, "#model-name", f" · {CONTEXT}-token context")
    assert right_to_left(name) and left_to_right(rest) and max(name) < min(rest)


def test_nothing_is_wider_than_a_phone_at_200_percent_zoom(browser, server):
    """A 360 px phone at 200% zoom is 180 CSS px wide: the Send, Stop and Reset row could not wrap
    (240 px wide: the page scrolled sideways), and the settings' Temperature row, its label beside
    an 80 px box, stuck out of them by 8 px."""
    page = open_page(browser, server, viewport={"width": 180, "height": 370})
    sticking_out = """() => [document.documentElement.scrollWidth, ...[...document.querySelectorAll('body *')]
        .filter((e) => e.offsetParent !== null && e.getBoundingClientRect().right > innerWidth + 0.5)
        .map((e) => e.id || e.className)]"""
    assert page.evaluate(sticking_out) == [180]
    page.click("#settings-toggle")
    assert page.evaluate(sticking_out) == [180]
    assert page.errors == []
    page.context.close()


def test_on_a_touch_screen_return_starts_a_new_line(browser, server):
    """A phone's keyboard has no Shift+Enter, and Return sent the message: no message could have two
    lines. On a coarse pointer Return starts a line and the Send button sends; the keyboard's key
    says so (enterkeyhint), and so does the placeholder. A keyboard and mouse keep Enter to send."""
    page = open_page(browser, server, viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True)
    assert page.evaluate("matchMedia('(pointer: coarse)').matches")
    box = page.locator("#input")
    assert box.get_attribute("enterkeyhint") == "enter" and "Enter" not in box.get_attribute("placeholder")
    box.tap()
    page.keyboard.type("first line")
    page.keyboard.press("Enter")
    page.keyboard.type("second line")
    assert box.input_value() == "first line\nsecond line" and page.sent == [] and page.locator(".msg").count() == 0
    page.tap("#send")
    page.wait_for_selector(".msg.assistant")
    assert page.sent[-1]["messages"] == [{"role": "user", "content": "first line\nsecond line"}]
    wait_done(page)
    # A tablet's own keyboard sends with Ctrl+Enter.
    page.keyboard.type("third")
    page.keyboard.press("Control+Enter")
    page.wait_for_function("() => document.querySelectorAll('.msg.user').length === 2")
    assert page.sent[-1]["messages"][-1] == {"role": "user", "content": "third"}
    assert page.errors == []
    page.context.close()

    page = open_page(browser, server)
    box = page.locator("#input")
    assert box.get_attribute("enterkeyhint") == "send"
    assert box.get_attribute("placeholder") == "Message (Enter to send, Shift+Enter for a new line)"
    page.context.close()


def test_escape_stops_a_reply_and_reset_is_announced(page):
    """Escape did nothing while a reply streamed (Stop had to be reached by Tab); and Reset emptied
    the conversation without a word to a screen reader."""
    page.fill("#k-max_tokens-value", "8000")
    page.fill("#input", "A long story, please.")
    page.press("#input", "Enter")
    page.wait_for_function("() => document.querySelector('.msg.assistant .body').textContent.length > 20", polling=50)
    page.focus("#log")  # reading the reply, away from the message box
    page.keyboard.press("Escape")
    # 8,000 tokens take more than 24 s: a reply not stopped is still streaming.
    page.wait_for_function("() => document.querySelector('.msg.assistant .meta').textContent.split(' · ').includes('stopped')",
                           polling=50, timeout=10_000)
    assert page.get_attribute("#stop", "aria-keyshortcuts") == "Escape"

    page.click("#reset")
    assert page.locator(".msg").count() == 0 and page.inner_text("#announce") == "conversation cleared"
    assert page.errors == []


def test_the_browsers_own_parts_follow_the_dark_scheme(page):
    """Without color-scheme the system colours that the browser's own parts use (scrollbars, a
    number box's arrows) stayed light on the dark page."""
    page.emulate_media(color_scheme="dark")
    colours = page.evaluate("""() => { const probe = document.body.appendChild(document.createElement('div'));
        probe.style.cssText = 'color: CanvasText; background: Canvas';
        const style = getComputedStyle(probe); return [style.color, style.backgroundColor]; }""")
    text, background = colours
    assert contrast(background, "rgb(0, 0, 0)") < contrast(background, "rgb(255, 255, 255)"), colours  # dark
    assert contrast(text, "rgb(255, 255, 255)") < contrast(text, "rgb(0, 0, 0)"), colours  # light
