"""The exported chat template as the Hugging Face ecosystem and llama.cpp use it: it marks the
assistant's replies for transformers' assistant mask, and it refuses tools it cannot show the
model, in transformers' copy and in the GGUF's."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: everything here is local

import pytest

from gpt1.formats.hf import export_model

CHAT = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is a dict?"},
    {"role": "assistant", "content": "A mapping from keys to values."},
    {"role": "user", "content": "And a list?"},
    {"role": "assistant", "content": "A sequence."},
]


def test_the_exported_chat_template_marks_the_assistant_replies(tmp_path, chat_dir, tokenizer):
    """return_assistant_tokens_mask (TRL's assistant_only_loss) gave all zeros: the template had no
    {% generation %}. The mask is now gpt1's own training labels (reply text and its [EOS]), and
    the ids are unchanged."""
    from transformers import AutoTokenizer

    from gpt1.core.chat_template import encode_chat_with_labels
    from gpt1.core.constants import IGNORE_INDEX

    hf_tok = AutoTokenizer.from_pretrained(export_model(chat_dir, tmp_path / "hf"))
    ids, labels = encode_chat_with_labels(tokenizer, CHAT)
    got = hf_tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert list(got["input_ids"]) == ids
    assert list(got["assistant_masks"]) == [int(label != IGNORE_INDEX) for label in labels]
    assert sum(got["assistant_masks"]) == len(tokenizer.encode("A mapping from keys to values.")) + len(
        tokenizer.encode("A sequence.")) + 2  # the replies and their [EOS], never a role marker


TOOLS = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}]


def test_the_exported_chat_template_refuses_tools(tmp_path, chat_dir, tokenizer):
    """`tools=` was dropped without a word ('<|user|>hi<|assistant|>'): the model never saw them.
    The template refuses them, as `gpt1 serve` does; no tools, or an empty list, render as before."""
    import jinja2
    from transformers import AutoTokenizer

    from gpt1.core.chat_template import encode_chat

    hf_tok = AutoTokenizer.from_pretrained(export_model(chat_dir, tmp_path / "hf"))
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(jinja2.TemplateError, match=r"^tools: gpt1 models cannot call tools"):
        hf_tok.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    for tools in (None, []):
        got = hf_tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
        assert list(got["input_ids"] if hasattr(got, "keys") else got) == encode_chat(tokenizer, messages)


def test_llama_cpp_renders_the_gguf_template_and_refuses_tools(tmp_path, chat_dir, tokenizer, tiny_config):
    """The GGUF copy of the template (no {% generation %}: older llama-cpp-python cannot parse it)
    renders gpt1's ids in llama-cpp-python, with tools=None as it passes them, and refuses tools."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from gpt1.benchmarks.llamacpp import open_llama
    from gpt1.core.chat_template import encode_chat
    from gpt1.formats.gguf import export_gguf

    llm = open_llama(llama_cpp, export_gguf(chat_dir, tmp_path / "chat.gguf", "f32"), n_ctx=tiny_config.block_size,
                     n_threads=1, verbose=False, seed=0)
    assert "{% generation %}" not in llm.metadata["tokenizer.chat_template"]
    with pytest.raises(ValueError, match=r"^tools: gpt1 models cannot call tools"):  # its raise_exception
        llm.create_chat_completion(messages=CHAT[:2], tools=TOOLS, max_tokens=1)
    llm.create_chat_completion(messages=CHAT[:2], max_tokens=1, temperature=0.0)
    expected = encode_chat(tokenizer, CHAT[:2])
    assert llm.input_ids[: len(expected)].tolist() == expected
