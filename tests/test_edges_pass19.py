"""Model shapes at the edges (pass 19): a context too small to generate in is refused at once,
in the library and the server, rather than hanging; a chat turn that cannot fit says so."""

from __future__ import annotations

import re

import httpx
import pytest
import torch

import gpt1
from gpt1.core.config import ModelConfig
from gpt1.core.errors import Gpt1Error
from gpt1.core.model import GPT
from gpt1.formats.modeldir import save_model
from gpt1.serve import background_server, create_app


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
