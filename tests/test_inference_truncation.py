"""Truncation to fit the context, one model across gpt1's surfaces: the server's chat route keeps
a conversation that fits whole when max_tokens is omitted (truncate_prompt cut or refused what it
serves without), the Python API says what it cut to fit the context (as the CLI does), and the
chat page's presets set the sampling knobs only (Max tokens and the seed stay, so that what fits
is still sent whole)."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

import gpt1
from gpt1.cli import main
from gpt1.core.errors import Gpt1Error
from gpt1.core.sampling_params import PRESETS, SamplingParams
from gpt1.inference.decoding import chat_prompt_ids
from gpt1.inference.generate import generate
from gpt1.serve import background_server, create_app


@pytest.fixture(scope="module")
def llm(chat_dir):
    return gpt1.load(chat_dir, device="cpu")


@pytest.fixture(scope="module")
def url(llm):
    with background_server(create_app(llm)) as url:  # the thread engine
        yield url


def words(llm, n: int) -> str:
    """A text of about n tokens."""
    ids = llm.tokenizer.encode(" ".join(f"w{i}" for i in range(4 * n)))
    return llm.tokenizer.decode(ids[:n])


def whole(llm, messages) -> int:
    """The conversation's length, nothing dropped (as truncate_prompt false sends it)."""
    return len(chat_prompt_ids(llm.tokenizer, messages, llm.config.block_size, SamplingParams(truncate_prompt=False)).ids)


def chat(url: str, messages, **fields) -> httpx.Response:
    body = {"messages": messages, "temperature": 0, "truncate_prompt": True, **fields}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


# ---- 1. the server's chat route: an omitted max_tokens drops nothing from what fits ------------------
def test_a_conversation_that_fits_is_kept_whole_with_truncation_on(llm, url):
    context = llm.config.block_size
    message = [{"role": "user", "content": words(llm, 45)}]
    n = whole(llm, message)
    assert context // 2 < n < context  # fits, but over the half the default 256 left it (it lost its start)
    on, off = chat(url, message), chat(url, message, truncate_prompt=False)
    assert on.status_code == off.status_code == 200, on.text
    assert on.json()["usage"]["prompt_tokens"] == n
    assert on.json()["choices"] == off.json()["choices"] and on.json()["usage"] == off.json()["usage"]

    # A long system message and a short question that fit: answered (it was a 400 that cited a
    # "max_tokens 256" the client never sent).
    messages = [{"role": "system", "content": words(llm, 40)}, {"role": "user", "content": "Hi"}]
    n = whole(llm, messages)
    assert context // 2 < n < context
    r = chat(url, messages)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == n and r.json()["usage"]["completion_tokens"] <= context - n

    # A max_tokens the client sets keeps its room, as before: the conversation is fitted to it.
    r = chat(url, message, max_tokens=40)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] <= max(context - 40, context // 2)


def test_a_conversation_that_does_not_fit_is_fitted_or_refused_as_before(llm, url):
    context = llm.config.block_size
    # Turns that together pass the context: the oldest go, and the reply keeps room.
    turns = [{"role": "user", "content": words(llm, 25)}, {"role": "assistant", "content": words(llm, 20)},
             {"role": "user", "content": words(llm, 20)}]
    assert whole(llm, turns) >= context
    r = chat(url, turns)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == whole(llm, turns[2:]) <= context // 2

    # A system message that leaves the rest no room: refused, naming no max_tokens the client did
    # not send, and saying which one would make room.
    messages = [{"role": "system", "content": words(llm, 40)}, {"role": "user", "content": words(llm, 30)}]
    assert whole(llm, messages) >= context
    r = chat(url, messages)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert error["message"].startswith("the system message leaves no room for the conversation")
    assert "the rest kept for the reply" in error["message"]
    assert "max_tokens 256" not in error["message"] and "max_new_tokens" not in error["message"]
    room = int(error["message"].split("set max_tokens to at most ")[1].split(".")[0])
    fitted = chat(url, messages, max_tokens=room)  # the advice works: the message loses its start
    assert fitted.status_code == 200, fitted.text
    assert fitted.json()["usage"]["prompt_tokens"] == context - room


# ---- 2. the Python API says what it cut, as the CLI does ------------------------------------------

def test_the_python_api_warns_once_when_it_cuts(llm, gpt1_warnings):
    context, tok = llm.config.block_size, llm.tokenizer
    long_message = [{"role": "user", "content": words(llm, 80)}]
    cut = chat_prompt_ids(tok, long_message, context, SamplingParams(max_new_tokens=4)).cut
    assert cut > 0
    llm.chat(long_message, temperature=0, max_new_tokens=4)
    assert [r.getMessage() for r in gpt1_warnings] == [
        f"the message's first {cut} tokens were cut to fit the context (the system message and the role markers stay)"]

    gpt1_warnings.clear()
    prompt = words(llm, 100)
    n = len(tok.encode(prompt))
    kept = generate(llm.model, tok, tok.encode(prompt), SamplingParams(temperature=0, max_new_tokens=4)).prompt_tokens
    assert kept < n
    llm.generate(prompt, temperature=0, max_new_tokens=4)
    list(llm.stream(prompt, temperature=0, max_new_tokens=4))
    said = f"the prompt ({n} tokens) was cut to its last {kept} tokens to fit the context"
    assert [r.getMessage() for r in gpt1_warnings] == [said, said]

    gpt1_warnings.clear()  # what fits: nothing to say
    llm.chat([{"role": "user", "content": "Hi"}], temperature=0, max_new_tokens=4)
    llm.generate("Hi", temperature=0, max_new_tokens=4)
    with pytest.raises(Gpt1Error, match="exceed the context"):  # refused, not cut: no warning either
        llm.generate(prompt, max_new_tokens=4, truncate_prompt=False)
    assert gpt1_warnings == []


def test_a_program_sees_the_warning_on_stderr(chat_dir):
    """A program that sets up no logging: the warning is its stderr's one line."""
    code = ("import gpt1; llm = gpt1.load(__import__('sys').argv[1], device='cpu'); "
            "llm.chat([{'role': 'user', 'content': ' '.join(f'w{i}' for i in range(200))}], temperature=0, max_new_tokens=2)")
    p = subprocess.run([sys.executable, "-c", code, str(chat_dir)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("the message's first ") and "tokens were cut to fit" in lines[0], lines


def test_the_cli_says_it_once(chat_dir, llm, capsys):
    code = main(["generate", "--model", str(chat_dir), "--chat", "--prompt", words(llm, 80), "--temperature", "0",
                 "--max-new-tokens", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0 and err.count("tokens were cut to fit the context") == 1, err


# ---- 3. the chat page: presets set the sampling knobs only -------------------------------------------
def wait_done(page) -> None:
    """Until the reply has its note, or the message got an error instead."""
    page.wait_for_function("() => document.querySelector('.msg.error') || "
                           "document.querySelector('.msg.assistant .meta')?.textContent.length > 0")


def test_a_preset_keeps_max_tokens_and_the_seed(browser, url, llm):  # noqa: F811 - the imported fixture
    page = browser.new_page()
    page.set_default_timeout(30_000)
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    page.goto(url)
    # Max tokens starts empty (the server's default: the room the conversation leaves), so that a
    # long system prompt and a short question that fit are answered.
    assert page.input_value("#k-max_tokens-value") == ""
    page.fill("#system", words(llm, 40))
    page.fill("#input", "Hi")
    page.press("#input", "Enter")
    wait_done(page)
    assert page.locator(".msg.error").count() == 0 and "max_tokens" not in sent[-1]

    page.fill("#k-max_tokens-value", "20")
    page.fill("#seed", "3")
    page.click("button[data-preset=qa]")
    qa = PRESETS["qa"]
    assert page.input_value("#k-max_tokens-value") == "20" and page.input_value("#seed") == "3"
    assert float(page.input_value("#k-temperature-value")) == qa.temperature
    assert float(page.input_value("#k-top_k-value")) == qa.top_k
    assert page.get_attribute("button[data-preset=qa]", "aria-pressed") == "true"
    page.click("#reset")
    page.fill("#system", "")
    page.fill("#input", "Hello")
    page.press("#input", "Enter")
    wait_done(page)
    body = sent[-1]
    assert body["max_tokens"] == 20 and body["seed"] == 3
    assert body["temperature"] == qa.temperature and body["top_k"] == qa.top_k
    page.close()
