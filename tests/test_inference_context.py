"""Long conversations and the context limit. gpt1's default max_new_tokens (256) is a bound, not
the user's wish, on every surface: with truncation on, `gpt1 chat`, `gpt1 generate --chat` and
`llm.chat` cut or refused a conversation that fits a 64-token context (the default counted as
chosen, leaving the prompt half the context), and the Python API without truncation refused
every prompt. `gpt1 chat` says why a reply stopped at a length limit, as the chat page does; the
server's non-echoed `text_offset` counts from the start of the whole prompt it was sent, and a
chat that does not fit names `messages`. At the edges, a context too small to generate in is
refused at once, in the library and the server, rather than hanging; a chat turn that cannot fit
says so."""

from __future__ import annotations

import io
import re
import sys

import httpx
import pytest
import torch

import gpt1
from gpt1.cli import main
from gpt1.cli.chat_cmd import ChatSession
from gpt1.core.chat_template import JINJA_TEMPLATE, TEMPLATE_FILE
from gpt1.core.config import ModelConfig
from gpt1.core.errors import Gpt1Error
from gpt1.core.model import GPT
from gpt1.core.sampling_params import SamplingParams
from gpt1.formats.modeldir import save_model
from gpt1.inference.decoding import chat_prompt_ids
from gpt1.serve import background_server, create_app
from tests.model_factories import model_without_stops

CONTEXT = 64  # conftest's tiny_config


@pytest.fixture(scope="module")
def model_dir(tiny_config, tokenizer, tmp_path_factory):
    """A chat model (gpt1's template) whose replies run to a length limit: never a special token."""
    assert tiny_config.block_size == CONTEXT
    path = tmp_path_factory.mktemp("endless-chat")
    save_model(path, model_without_stops(tiny_config, tokenizer, seed=3), tokenizer)
    (path / TEMPLATE_FILE).write_text(JINJA_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def llm(model_dir):
    return gpt1.load(model_dir, device="cpu")


def words(llm, n: int) -> str:
    """A text of exactly n tokens."""
    ids = llm.tokenizer.encode(" ".join(f"w{i}" for i in range(4 * n)))
    text = llm.tokenizer.decode(ids[:n])
    assert len(llm.tokenizer.encode(text)) == n
    return text


def whole(llm, messages) -> int:
    """The conversation's length with nothing dropped (as truncation off sends it)."""
    return len(chat_prompt_ids(llm.tokenizer, messages, CONTEXT, SamplingParams(truncate_prompt=False)).ids)


def run_main(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# ---- 1. a conversation that fits is answered whole, truncation or not -----------------------------
def test_a_system_message_and_a_question_that_fit_are_answered_whole(llm, model_dir, capsys, monkeypatch, gpt1_warnings):
    """repro1: a 37-token system message and "Hi" (41 tokens in a 64-token context) were refused by
    `generate --chat`, `gpt1 chat` and llm.chat ("lower max_new_tokens to at most 24", a knob never
    set), and answered with --no-truncate."""
    system = words(llm, 36)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]
    n = whole(llm, messages)
    assert CONTEXT // 2 < n < CONTEXT
    model = ["--model", model_dir, "--device", "cpu", "--temperature", "0"]
    for flags in ([], ["--no-truncate"]):
        code, out, err = run_main(capsys, "generate", *model, "--chat", "--system", system, "--prompt", "Hi", *flags)
        assert code == 0, err
        assert f"[{n} prompt tokens, {CONTEXT - n} generated" in err and "cut" not in err, err
    reply = out
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    code, out, err = run_main(capsys, "chat", *model, "--system", system)
    assert code == 0 and "error" not in err, err
    assert out == reply + "\n"
    gpt1_warnings.clear()
    for truncate in (True, False):
        completion = llm.chat_complete(messages, temperature=0, truncate_prompt=truncate)
        assert (completion.prompt_tokens, completion.completion_tokens) == (n, CONTEXT - n)
        assert completion.text == reply
        assert llm.chat(messages, temperature=0, truncate_prompt=truncate, n=2) == [reply] * 2
    assert gpt1_warnings == []  # nothing cut


def test_a_long_question_alone_is_not_cut_to_half_the_context(llm, model_dir, capsys, gpt1_warnings):
    question = words(llm, 45)
    n = whole(llm, [{"role": "user", "content": question}])
    assert CONTEXT // 2 < n < CONTEXT
    code, _, err = run_main(capsys, "generate", "--model", model_dir, "--device", "cpu", "--temperature", "0",
                            "--chat", "--prompt", question)
    assert code == 0 and f"[{n} prompt tokens" in err and "cut" not in err, err
    gpt1_warnings.clear()
    assert llm.chat_complete([{"role": "user", "content": question}], temperature=0).prompt_tokens == n
    assert gpt1_warnings == []


def test_a_chosen_max_new_tokens_keeps_its_room_and_a_default_is_never_told_to_be_lowered(llm, model_dir, capsys):
    system = words(llm, 36)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]
    # Chosen: the reply's 40 tokens keep their room, and the system message leaves the question none.
    with pytest.raises(Gpt1Error, match="shorten the system message or lower max_new_tokens to at most"):
        llm.chat(messages, temperature=0, max_new_tokens=40)
    code, _, err = run_main(capsys, "generate", "--model", model_dir, "--device", "cpu", "--chat", "--system", system,
                            "--prompt", "Hi", "--max-new-tokens", "40")
    assert code == 2 and "lower max_new_tokens to at most" in err
    # Not chosen, and too long for the whole context: refused, naming what would make room, not a
    # max_new_tokens to lower.
    messages = [{"role": "system", "content": words(llm, 40)}, {"role": "user", "content": words(llm, 30)}]
    assert whole(llm, messages) >= CONTEXT
    with pytest.raises(Gpt1Error) as refused:
        llm.chat(messages, temperature=0)
    assert "lower" not in str(refused.value) and "set max_new_tokens to at most" in str(refused.value)
    code, _, err = run_main(capsys, "generate", "--model", model_dir, "--device", "cpu", "--chat",
                            "--system", messages[0]["content"], "--prompt", messages[1]["content"])
    assert code == 2 and "lower" not in err and "set max_new_tokens to at most" in err, err


def test_dropping_old_turns_keeps_the_last_message_whole_when_it_fits(llm):
    """A conversation too long for the context loses its oldest turns; what is left, a message that
    fits the context, was then cut to the half that the default 256 leaves (a message sent alone
    is not)."""
    last = words(llm, 45)
    turns = [{"role": "user", "content": words(llm, 20)}, {"role": "assistant", "content": words(llm, 20)},
             {"role": "user", "content": last}]
    assert whole(llm, turns) >= CONTEXT and CONTEXT // 2 < whole(llm, turns[2:]) < CONTEXT
    fitted = chat_prompt_ids(llm.tokenizer, turns, CONTEXT, SamplingParams(), max_new_tokens_chosen=False)
    assert (fitted.dropped, fitted.cut) == (2, 0) and len(fitted.ids) == whole(llm, turns[2:])
    completion = llm.chat_complete(turns, temperature=0)
    assert completion.prompt_tokens == whole(llm, turns[2:])
    assert completion.text == llm.chat(turns[2:], temperature=0)


def test_gpt1_chat_drops_old_turns_to_keep_room_for_the_reply(llm, capsys):
    """A session holds its history: it drops the oldest turns by the rule (so that each reply keeps
    room as the conversation grows), where a stateless caller's conversation that fits is kept whole."""
    params = SamplingParams(temperature=0)
    session = ChatSession(llm, params)
    session.history = [{"role": "user", "content": words(llm, 10)}, {"role": "assistant", "content": words(llm, 10)}]
    question = words(llm, 10)
    conversation = session.history + [{"role": "user", "content": question}]
    assert CONTEXT // 2 < whole(llm, conversation) < CONTEXT
    out = io.StringIO()
    reply = session.reply(question, out=out)
    assert session.history == [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    assert reply == llm.chat([{"role": "user", "content": question}], temperature=0)
    # The stateless API keeps it whole, as the server does for an omitted max_tokens.
    assert llm.chat_complete(conversation, temperature=0).prompt_tokens == whole(llm, conversation)


# ---- 2. gpt1 chat says which limit ended a reply ------------------------------------------------
def test_gpt1_chat_says_whether_a_reply_stopped_at_the_context_or_at_max_new_tokens(model_dir, capsys, monkeypatch):
    model = ["--model", model_dir, "--device", "cpu", "--temperature", "0"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    code, out, err = run_main(capsys, "chat", *model)
    assert code == 0 and "(stopped at the context limit: 64 tokens)" in err.splitlines(), err
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n/set max_new_tokens 5\nHi\n"))
    code, out, err = run_main(capsys, "chat", *model, "--max-new-tokens", "3")
    lines = err.splitlines()
    assert code == 0 and "(stopped at max_new_tokens 3: /set max_new_tokens N for longer replies)" in lines, err
    assert "(stopped at max_new_tokens 5: /set max_new_tokens N for longer replies)" in lines, err
    assert "context limit" not in err


# ---- 3. the Python API without truncation --------------------------------------------------------
def test_the_python_api_caps_its_default_max_new_tokens_at_the_room_left(llm, gpt1_warnings):
    """A 64-token model refused every prompt with truncate_prompt=False ("shorten the prompt"), and
    cut a 40-token prompt to 32 with truncation on."""
    prompt = words(llm, 40)
    gpt1_warnings.clear()
    for truncate in (True, False):
        completion = llm.complete(prompt, temperature=0, truncate_prompt=truncate)
        assert (completion.prompt_tokens, completion.completion_tokens) == (40, CONTEXT - 40)
        assert llm.generate(prompt, temperature=0, truncate_prompt=truncate) == completion.text
        assert "".join(llm.stream(prompt, temperature=0, truncate_prompt=truncate)) == completion.text
        assert llm.generate(prompt, temperature=0, truncate_prompt=truncate, n=2) == [completion.text] * 2
    assert gpt1_warnings == []
    # A prompt that fills the context still leaves no room: cut with truncation, refused without.
    long = words(llm, CONTEXT)
    assert llm.complete(long, temperature=0).prompt_tokens == CONTEXT // 2
    with pytest.raises(Gpt1Error, match="leaves no room for a new token"):
        llm.generate(long, truncate_prompt=False)


def test_a_max_new_tokens_of_the_whole_context_is_named_as_what_does_not_fit(llm, model_dir, capsys):
    prompt = words(llm, 10)
    for max_new_tokens in (CONTEXT, 300):
        with pytest.raises(Gpt1Error) as refused:
            llm.generate(prompt, max_new_tokens=max_new_tokens, truncate_prompt=False)
        message = str(refused.value)
        assert message.startswith(f"the prompt (10 tokens) plus max_new_tokens ({max_new_tokens}) exceed the context "
                                  "of 64 tokens, and max_new_tokens alone leaves the prompt no room")
        assert "lower max_new_tokens (to at most 54 for this prompt)" in message and "shorten" not in message
    with pytest.raises(Gpt1Error, match="shorten the prompt"):  # a prompt that, with it, does not fit
        llm.generate(prompt, max_new_tokens=60, truncate_prompt=False)
    code, _, err = run_main(capsys, "generate", "--model", model_dir, "--device", "cpu", "--prompt", prompt,
                            "--max-new-tokens", "64", "--no-truncate")
    assert code == 2 and "max_new_tokens alone leaves the prompt no room" in err


# ---- 4, 5. the server ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def url(llm):
    with background_server(create_app(llm)) as url:
        yield url


def test_text_offset_counts_from_the_start_of_the_whole_prompt_after_truncation(llm, url):
    """Without echo, the reply's offsets counted from the start of the tail that truncate_prompt
    kept; OpenAI's count from the prompt's start."""
    prompt = "naïve café über straße " * 20  # multi-byte characters, far more than 64 tokens
    ids = llm.tokenizer.encode(prompt)
    assert len(ids) > CONTEXT
    for sent, length in ((prompt, len(prompt)), (ids, len(llm.tokenizer.decode(ids)))):
        body = {"prompt": sent, "max_tokens": 4, "temperature": 0, "logprobs": 0, "truncate_prompt": True}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert r.json()["usage"]["prompt_tokens"] < len(ids)  # cut
        assert choice["logprobs"]["text_offset"][0] == length
        streamed = []
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as events:
            for line in events.iter_lines():
                if line.startswith("data: {"):
                    logprobs = httpx.Response(200, content=line[6:]).json()["choices"][0]["logprobs"]
                    streamed += logprobs["text_offset"] if logprobs else []
        assert streamed == choice["logprobs"]["text_offset"]


def test_a_chat_that_does_not_fit_without_truncation_names_messages(llm, url):
    messages = [{"role": "user", "content": words(llm, 80)}]
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "truncate_prompt": False}, timeout=60)
    error = r.json()["error"]
    assert r.status_code == 400 and (error["code"], error["param"]) == ("context_length_exceeded", "messages")


def test_gpt1_chat_goes_back_to_the_default_max_new_tokens(model_dir, capsys, monkeypatch):
    """Once `/set max_new_tokens N` (or --max-new-tokens) was given, a session could not return to
    the default's "only a bound" behaviour: every turn was capped with a warning."""
    model = ["--model", model_dir, "--device", "cpu", "--temperature", "0"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n/set max_new_tokens default\nHi\n"))
    code, _, err = run_main(capsys, "chat", *model, "--max-new-tokens", "100")
    lines = err.splitlines()
    assert code == 0 and sum("max_new_tokens 100 does not fit" in line for line in lines) == 1, err
    assert any("max_new_tokens 256" in line for line in lines if line.startswith("(temperature")), err
    assert lines[-1] == "(stopped at the context limit: 64 tokens)" and "error" not in err, err


# ---- model shapes at the edges: a context too small to generate in, a chat turn that cannot fit ----
def _model_dir(path, tokenizer, block_size: int):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=16)
    return save_model(path, GPT(config), tokenizer)


@pytest.mark.timeout(60)
def test_a_one_token_context_cannot_generate_and_says_so(tokenizer, tmp_path):
    """Its one position holds the prompt's last token: a request was fitted to an empty prompt,
    which the engine kept in its slot forever (generate, chat, serve all hung)."""
    llm = gpt1.load(_model_dir(tmp_path / "bs1", tokenizer, 1), device="cpu")
    message = "a model with a 1-token context (block_size) has no position for a new token: it cannot generate"
    for call in (lambda: llm.generate("def", max_new_tokens=1), lambda: llm.generate("", max_new_tokens=1),
                 lambda: llm.generate("def", n=2, max_new_tokens=1)):
        with pytest.raises(Gpt1Error, match=re.escape(message)):
            call()
    with background_server(create_app(llm)) as url:
        r = httpx.post(f"{url}/v1/completions", timeout=30,
                       json={"prompt": "def", "max_tokens": 1, "truncate_prompt": True})
        assert r.status_code == 400 and message in r.json()["error"]["message"]
        assert httpx.get(f"{url}/health", timeout=30).json()["active"] == 0


def test_a_chat_turn_too_large_for_the_context_blames_no_system_message(tokenizer, tmp_path):
    llm = gpt1.load(_model_dir(tmp_path / "bs3", tokenizer, 3), device="cpu")
    with pytest.raises(Gpt1Error, match=r"^a 3-token context is too small for a chat turn: its role markers and one "
                                        r"token of text need 3 tokens, and the prompt may take 1 here"):
        llm.chat([{"role": "user", "content": "hi there"}], max_new_tokens=4)
    with pytest.raises(Gpt1Error, match="the system message leaves no room"):  # with one, it is the one to shorten
        llm.chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], max_new_tokens=4)
