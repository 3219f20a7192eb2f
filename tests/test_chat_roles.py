"""Chat messages are read one way everywhere: `developer` is `system`, content may be a list of
text parts (joined), any other role or part is refused with an error naming it. gpt1's Python
API, CLI data readers and server share `validate_messages`; the exported Jinja template (run
here by the real transformers and llama-cpp-python) and the Ollama template in docs/gguf.md
(run by Go's text/template) do the same, and give gpt1's ids for what they accept."""

from __future__ import annotations

import json
import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: everything here is local

import jinja2
import pytest

import gpt1
from gpt1.core.chat_template import JINJA_TEMPLATE, encode_chat, validate_messages
from gpt1.core.errors import Gpt1Error
from gpt1.core.sampling_params import SamplingParams
from gpt1.serve.mapping import chat_prompt
from gpt1.serve.schemas import ChatCompletionRequest
from tests.test_battery import assert_one_clear_line, run_main
from tests.test_gguf import render_with_ollama_template


def parts(*texts: str) -> list[dict]:
    return [{"type": "text", "text": t} for t in texts]


# The same conversation as gpt1's plain form (PLAIN) and in the forms OpenAI clients send.
PLAIN = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": " What is a dict?\n"},
    {"role": "assistant", "content": "A mapping."},
    {"role": "user", "content": "And  a list? 🌍"},
]
OPENAI_FORM = [
    {"role": "developer", "content": "You answer in one line."},
    {"role": "user", "content": parts(" What is", " a dict?\n")},
    {"role": "assistant", "content": parts("A mapping.")},
    {"role": "user", "content": "And  a list? 🌍", "name": "ann"},
]
ROLES = "expected one of system, developer, user, assistant"
# Messages refused, and the start of the error each gets (gpt1's and the Jinja template's).
REFUSED = [
    ([{"role": "tool", "content": "42"}], f"messages[0].role: {ROLES}, got 'tool'"),
    ([PLAIN[0], {"role": "User", "content": "hi"}], f"messages[1].role: {ROLES}, got 'User'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content[0]: expected a text part"),
    ([{"role": "user", "content": [*parts("a"), "b"]}], "messages[0].content[1]: expected a text part"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages[0].content[0].text: expected a string"),
    ([{"role": "user", "content": None}], "messages[0].content: expected a string or a list of text parts"),
]


def test_validate_messages_returns_normalised_copies():
    given = json.loads(json.dumps(OPENAI_FORM))
    assert validate_messages(given) == PLAIN
    assert given == OPENAI_FORM  # the caller's list is left as it was
    assert validate_messages([{"role": "user", "content": []}]) == [{"role": "user", "content": ""}]


@pytest.mark.parametrize("messages,error", REFUSED)
def test_refused_messages_name_the_item(messages, error):
    with pytest.raises(Gpt1Error) as e:
        validate_messages(messages)
    assert str(e.value).startswith(error)


def test_an_unhashable_role_is_a_clear_error():
    with pytest.raises(Gpt1Error, match=re.escape(f"messages[0].role: {ROLES}, got ['user']")):
        validate_messages([{"role": ["user"], "content": "hi"}])


def test_python_api_reads_openai_form_as_gpt1_form(tiny_model_dir):
    llm = gpt1.load(tiny_model_dir)
    assert llm.chat(OPENAI_FORM, temperature=0, max_new_tokens=6) == llm.chat(PLAIN, temperature=0, max_new_tokens=6)


def test_server_maps_messages_with_validate_messages(tokenizer):
    request = ChatCompletionRequest.model_validate({"model": "gpt1", "messages": OPENAI_FORM[:2]})
    assert chat_prompt(request, tokenizer, SamplingParams(), 64).ids == encode_chat(tokenizer, PLAIN[:2])


def test_chat_data_reads_openai_form_and_names_a_bad_part(tiny_model_dir, tmp_path, capsys):
    from gpt1.data.chat_sources import read_conversations

    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": OPENAI_FORM[:3]}) + "\n")
    assert [c.messages for c in read_conversations(str(chat))] == [PLAIN[:3]]
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    chat.write_text(json.dumps({"messages": [PLAIN[0], image, PLAIN[2]]}) + "\n")
    assert_one_clear_line(*run_main(capsys, "eval", "--model", tiny_model_dir, "--data", chat, "--chat"),
                          re.escape(f"{chat}, line 1: field 'messages'[1].content[0]: expected a text part"))


# ---- the exported templates ----------------------------------------------------------------

def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def test_transformers_apply_chat_template_reads_messages_as_gpt1(chat_dir, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from gpt1.formats.hf import export_model

    hf_tok = AutoTokenizer.from_pretrained(export_model(chat_dir, tmp_path / "hf"))
    for add in (True, False):
        got = hf_tok.apply_chat_template(OPENAI_FORM, tokenize=True, add_generation_prompt=add)
        assert _ids(got) == encode_chat(tokenizer, PLAIN, add_generation_prompt=add)
    for messages, error in REFUSED:
        with pytest.raises(jinja2.TemplateError) as e:
            hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert str(e.value).startswith(error), messages


def test_llama_cpp_chat_completion_reads_messages_as_gpt1(chat_dir, tokenizer, tiny_config, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from gpt1.benchmarks.llamacpp import open_llama
    from gpt1.formats.gguf import export_gguf

    path = export_gguf(chat_dir, tmp_path / "chat.gguf", "f32")
    llm = open_llama(llama_cpp, path, n_ctx=tiny_config.block_size, n_threads=1, verbose=False, seed=0)
    expected = encode_chat(tokenizer, PLAIN)
    llm.create_chat_completion(messages=OPENAI_FORM, max_tokens=1, temperature=0.0)
    assert llm.input_ids[: len(expected)].tolist() == expected
    for messages, error in REFUSED:
        with pytest.raises(ValueError) as e:  # llama-cpp-python's raise_exception
            llm.create_chat_completion(messages=messages, max_tokens=1)
        assert str(e.value).startswith(error), messages


@pytest.mark.slow
def test_ollama_template_maps_developer_and_refuses_other_roles(tmp_path):
    """The Modelfile TEMPLATE of docs/gguf.md in Go's text/template (Ollama's engine): `developer`
    renders as `system`; another role stops the render with an error that says why."""
    # Ollama hands the template strings: it has already joined list content's text parts.
    developer = [{"role": "developer", "content": "Be brief."}, PLAIN[1]]
    conversations = [developer, developer + PLAIN[2:], [{"role": "tool", "content": "42"}], [PLAIN[1], {"role": "User", "content": "x"}]]
    rendered = render_with_ollama_template(tmp_path, conversations)
    jinja = jinja2.Environment().from_string(JINJA_TEMPLATE)
    assert rendered[:2] == [jinja.render(messages=validate_messages(m), add_generation_prompt=True) for m in conversations[:2]]
    for got in rendered[2:]:
        assert got.startswith("error: ") and "gpt1 chat models know the roles system, developer, user and assistant" in got
