"""The chat page's settings and session as a tester used them for an evening, in a real headless
Chromium against a real server: number boxes that sent what they did not show (a decimal comma
dropped, values the server refuses), a reply that never said the model saw only part of the chat,
a reload that lost everything, and the small things (focus at load, the Max tokens placeholder,
Stop before the first token)."""

from __future__ import annotations

import httpx
import openai
import pytest

import gpt1
from gpt1.core.sampling_params import SamplingParams
from gpt1.inference.decoding import chat_prompt_ids
from gpt1.serve import background_server, create_app
from tests.test_serve_api import endless_model_dir
from tests.test_serve_page import focused, open_page, send, wait_done

CONTEXT = 128


@pytest.fixture(scope="module")
def server(tiny_config, tokenizer, tmp_path_factory):
    """A 128-token context whose replies run to max_tokens (it never ends one itself)."""
    model_dir = endless_model_dir(tiny_config, tokenizer, tmp_path_factory.mktemp("settings"), block_size=CONTEXT)
    with background_server(create_app(gpt1.load(model_dir, device="cpu"))) as url:
        yield url


@pytest.fixture
def page(browser, server):
    page = open_page(browser, server)
    yield page
    page.context.close()


def type_into(page, box: str, text: str) -> None:
    """Keys, as a person types them (fill() sets a number box's value past the browser's own handling)."""
    page.fill(box, "")
    page.focus(box)
    page.keyboard.type(text)


def fitted(tokenizer, body: dict):
    """What the server's truncation does to a request the page sent (decoding's rule, called directly)."""
    params = SamplingParams(max_new_tokens=body.get("max_tokens", SamplingParams().max_new_tokens), truncate_prompt=True)
    return chat_prompt_ids(tokenizer, body["messages"], CONTEXT, params, max_new_tokens_chosen="max_tokens" in body)


def test_the_boxes_send_what_the_server_takes_and_mark_the_rest(page):
    """Chromium drops a "," from a number box: "0,5" went out as temperature 5 and "1,1" as repeat
    penalty 11. Values the server refuses went out too (for its 400), and top-k 2.5 went out rounded;
    now each is marked in its box with the server's bounds, and nothing is sent. Values the server
    takes go out as typed, past the sliders' ends too."""
    type_into(page, "#k-temperature-value", "0,5")
    type_into(page, "#k-repeat_penalty-value", "1,1")
    assert page.input_value("#k-temperature-value") == "0.5" and page.input_value("#k-repeat_penalty-value") == "1.1"
    page.fill("#k-top_k-value", "9223372036854775807")  # 2^63 - 1: read as a Number, it was 2^63 and refused
    page.fill("#k-max_tokens-value", "2")
    send(page, "Hi")
    wait_done(page)
    body = page.sent[-1]
    assert (body["temperature"], body["repeat_penalty"], body["top_k"]) == (0.5, 1.1, 2**63 - 1)
    # In a box of integers a separator is no thousands separator: "1.000" is 1 in English, 1000 in
    # German (it went out as top-k 1), and "1,5" lost its comma (max tokens 15). Marked, not sent.
    for name, typed in [("top_k", "1,000"), ("top_k", "1.000"), ("max_tokens", "1,5")]:
        type_into(page, f"#k-{name}-value", typed)
        sent = len(page.sent)
        send(page, "Not sent")
        assert page.get_attribute(f"#k-{name}-value", "aria-invalid") == "true", (name, typed)
        assert " must be an integer in " in page.eval_on_selector(f"#k-{name}-value", "box => box.validationMessage")
        assert len(page.sent) == sent
        page.fill(f"#k-{name}-value", "")
    page.fill("#k-top_k-value", "")
    page.fill("#input", "")

    # The server's bounds, not the sliders': all of these are sent.
    for name, value in [("temperature", "5"), ("top_k", "500"), ("top_p", "0.005"), ("repeat_penalty", "0.5"),
                        ("repeat_last_n", "100000"), ("max_tokens", str(CONTEXT))]:
        page.fill(f"#k-{name}-value", value)
    send(page, "Again")
    wait_done(page)
    body = page.sent[-1]
    assert [body[k] for k in ("temperature", "top_k", "top_p", "repeat_penalty", "repeat_last_n", "max_tokens")] == \
        [5, 500, 0.005, 0.5, 100000, CONTEXT]
    assert page.locator(".msg.error").count() == 0
    for name in ("temperature", "top_k", "top_p", "repeat_penalty", "repeat_last_n", "max_tokens"):
        page.fill(f"#k-{name}-value", "")

    retype = "type one, or clear the box for the default"
    for name, value, message in [
            ("temperature", "-1", f"Temperature must be a number >= 0: {retype} (0.8)"),
            ("top_p", "-0.5", f"Top-p must be a number in [0, 1]: {retype} (1)"),
            ("top_p", "1.5", f"Top-p must be a number in [0, 1]: {retype} (1)"),
            ("min_p", "2", f"Min-p must be a number in [0, 1]: {retype} (0)"),
            ("repeat_penalty", "0", f"Repeat penalty must be a number > 0: {retype} (1)"),
            ("top_k", "2.5", f"Top-k must be an integer in [0, 2^63): {retype} (0)"),
            ("repeat_last_n", "-2", f"Repeat window must be an integer in [-1, 2^63): {retype} (64)"),
            ("max_tokens", "0", f"Max tokens must be an integer in [1, {CONTEXT}]: {retype} (auto)"),
            ("max_tokens", str(CONTEXT + 1), f"Max tokens must be an integer in [1, {CONTEXT}]: {retype} (auto)"),
            ("max_tokens", "12.7", f"Max tokens must be an integer in [1, {CONTEXT}]: {retype} (auto)")]:
        box = f"#k-{name}-value"
        page.fill(box, value)
        sent = len(page.sent)
        send(page, "Not sent")
        assert page.get_attribute(box, "aria-invalid") == "true" and focused(page) == box[1:], (name, value)
        assert page.eval_on_selector(box, "box => box.validationMessage") == message
        assert len(page.sent) == sent and page.input_value("#input") == "Not sent"
        page.fill(box, "")
        assert page.get_attribute(box, "aria-invalid") is None
    assert page.errors == []


def test_the_reply_says_what_the_model_did_not_see(page, server, tokenizer):
    """The server drops the oldest turns of a chat longer than the context (and the start of a
    message longer than it), and the page never said so: the response's X-Gpt1-Dropped-Messages
    and X-Gpt1-Cut-Tokens headers (streamed or not, only when not 0) carry it to the reply's note."""
    url = server
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: " + "words and more words " * 2}
             for i in range(9)]
    body = {"messages": [{"role": "system", "content": "Be brief."}, *turns], "max_tokens": 2, "truncate_prompt": True}
    expected = fitted(tokenizer, body)
    assert expected.dropped > 0 and expected.cut == 0
    for stream in (False, True):
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": stream}) as r:
            assert r.status_code == 200 and r.headers["x-gpt1-dropped-messages"] == str(expected.dropped), stream
            assert "x-gpt1-cut-tokens" not in r.headers
            r.read()
    long = {**body, "messages": [{"role": "user", "content": "a long one " * 200}]}
    expected = fitted(tokenizer, long)
    assert expected.dropped == 0 and expected.cut > 0
    r = httpx.post(f"{url}/v1/chat/completions", json=long)
    assert r.headers["x-gpt1-cut-tokens"] == str(expected.cut) and "x-gpt1-dropped-messages" not in r.headers
    r = httpx.post(f"{url}/v1/chat/completions", json={**body, "messages": turns[:1]})
    assert not {"x-gpt1-dropped-messages", "x-gpt1-cut-tokens"} & set(r.headers)
    # As docs/serving.md says the openai client reads them.
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30) as client:
        raw = client.chat.completions.with_raw_response.create(model="gpt1", messages=long["messages"], max_tokens=2,
                                                               extra_body={"truncate_prompt": True})
    assert raw.headers["X-Gpt1-Cut-Tokens"] == str(expected.cut) and raw.parse().usage.completion_tokens == 2

    # The page: a chat that outgrows the context, then one message longer than it.
    page.fill("#k-max_tokens-value", "2")
    notes = []
    for turn in turns[::2]:
        send(page, turn["content"])
        wait_done(page)
        notes.append(page.locator(".msg.assistant .meta").last.inner_text())
    assert " · the model saw" not in notes[0]
    sent = page.sent[-1]
    seen = len(sent["messages"]) - fitted(tokenizer, sent).dropped
    assert 1 < seen < len(sent["messages"])
    assert notes[-1].endswith(f" · the model saw the last {seen} messages of this conversation: the earlier ones "
                              f"did not fit the {CONTEXT}-token context"), notes[-1]
    send(page, long["messages"][0]["content"])
    wait_done(page)
    cut = fitted(tokenizer, page.sent[-1]).cut
    assert page.locator(".msg.assistant .meta").last.inner_text().endswith(
        f" · the model saw only the end of your message: its first {cut} tokens and the earlier messages did not "
        f"fit the {CONTEXT}-token context")
    assert page.errors == []


def test_a_reload_keeps_the_chat_and_the_settings_but_not_the_key(page):
    """A reload (F5) lost the conversation, the system prompt, the settings and a half-typed
    message. They are kept in the tab's sessionStorage; the API key is not (a secret stays out of
    storage). Reset empties the conversation there too."""
    page.fill("#system", "You are a pirate.")
    page.fill("#k-temperature-value", "0.3")
    page.focus("#k-top_k")
    page.keyboard.press("ArrowRight")
    page.fill("#k-max_tokens-value", "3")
    page.fill("#seed", "42")
    page.fill("#api-key", "secret-key-7")
    send(page, "Hello")
    wait_done(page)
    reply = page.inner_text(".msg.assistant .body")
    page.fill("#input", "half-typed draft")
    page.reload()

    assert page.input_value("#system") == "You are a pirate." and page.input_value("#input") == "half-typed draft"
    assert [page.input_value(f"#k-{name}-value") for name in ("temperature", "top_k", "max_tokens")] == ["0.3", "1", "3"]
    assert page.eval_on_selector("#k-top_k", "r => r.value") == "1" and page.input_value("#seed") == "42"
    assert page.input_value("#api-key") == ""
    assert "secret-key-7" not in page.evaluate("JSON.stringify(Object.entries(sessionStorage))")
    assert page.locator(".msg.user .body").all_inner_texts() == ["Hello"]
    assert page.locator(".msg.assistant .body").all_inner_texts() == [reply]
    send(page, "More")
    wait_done(page)
    body = page.sent[-1]
    assert body["messages"] == [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello"},
                                {"role": "assistant", "content": reply}, {"role": "user", "content": "More"}]
    assert (body["temperature"], body["top_k"], body["max_tokens"], body["seed"]) == (0.3, 1, 3, 42)

    # The active preset is kept; Reset empties the conversation, on screen and in storage.
    page.click("text=Code")
    page.click("#reset")
    page.reload()
    assert page.get_attribute("text=Code", "aria-pressed") == "true"
    assert page.locator(".msg").count() == 0 and page.is_visible("#empty")
    assert page.input_value("#system") == "You are a pirate."
    assert page.errors == []


def test_a_hand_edited_store_loses_at_most_its_settings(page):
    """A stored knob named like an object's own member ("constructor") threw in the settings'
    restore, before the conversation's: the chat was not shown, and the next reply overwrote it."""
    page.fill("#k-max_tokens-value", "2")
    send(page, "Keep me")
    wait_done(page)
    key = page.evaluate("Object.keys(sessionStorage).find((k) => k.endsWith(':fields'))")
    page.evaluate(f"""(() => {{ const f = JSON.parse(sessionStorage.getItem({key!r}));
                      f.knobs.constructor = '1'; sessionStorage.setItem({key!r}, JSON.stringify(f)); }})()""")
    page.reload()
    assert page.locator(".msg.user .body").all_inner_texts() == ["Keep me"]
    assert page.errors == []


def test_focus_the_max_tokens_placeholder_and_stop_before_the_first_token(page):
    """The message box has focus at load; Max tokens' placeholder said the context's size (128) as
    if it were the default; and Stop before the first token left an empty reply in the history, sent
    with every later turn: the message goes back into the box, as when no reply comes."""
    assert focused(page) == "input"
    assert page.get_attribute("#k-max_tokens-value", "placeholder") == "auto"
    page.fill("#k-max_tokens-value", "3")
    page.fill("#input", "stop me early")
    # Sent and stopped in one task: no token can have come between.
    page.evaluate("() => { document.getElementById('composer').requestSubmit(); document.getElementById('stop').click(); }")
    wait_done(page)
    assert page.locator(".msg").count() == 0 and page.input_value("#input") == "stop me early"
    assert page.inner_text("#status") == "ready"
    send(page, "Next")
    wait_done(page)
    assert page.sent[-1]["messages"] == [{"role": "user", "content": "Next"}]
    assert page.errors == []
