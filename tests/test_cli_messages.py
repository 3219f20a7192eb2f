"""What gpt1's spellings and messages tell users: a list key's hint (comma-separated items), another
tool's flag told gpt1's, a tokenizer with none of gpt1's special tokens."""

import pytest

from gpt1.core.errors import Gpt1Error
from gpt1.core.tokenizer import SPECIAL_TOKENS, Tokenizer
from gpt1.train.config import load_config
from gpt1.train.finetune import FinetuneConfig
from tests.model_factories import save_gpt2_like_tokenizer
from tests.test_battery import run_main


def test_a_list_key_takes_comma_separated_items_as_its_hint_writes_them():
    """`--languages en,de` is told to write languages=en,de, which became the one code "en,de":
    the run then left out, after reading all its data, the very languages asked for."""
    assert load_config(FinetuneConfig, None, ["languages=en,de"]).languages == ["en", "de"]
    assert load_config(FinetuneConfig, None, ["languages=en"]).languages == ["en"]
    assert load_config(FinetuneConfig, None, ['languages=["en", "de"]']).languages == ["en", "de"]


def test_another_tools_flag_is_told_gpt1s(capsys):
    for flag, ours in [("--top_p", "--top-p"), ("--repetition-penalty", "--repeat-penalty"),
                       ("--max-tokens", "--max-new-tokens"), ("--presence-penalty", "--repeat-penalty: CTRL's")]:
        rc, err = run_main(capsys, "generate", "--model", "x", "--prompt", "hi", flag, "1")
        assert rc == 2 and f"(gpt1's flag is {ours}" in err, err


def test_a_tokenizer_with_none_of_gpt1s_special_tokens_says_so(tmp_path):
    """OpenAI GPT-2's kind (its only special token <|endoftext|>): the message listed an empty set
    ("... special tokens of its vocab, : text would encode into it")."""
    save_gpt2_like_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(Gpt1Error) as refused:
        Tokenizer.load(tmp_path / "tokenizer.json")
    assert f"the added token '<|endoftext|>' is not one of gpt1's special tokens, and its vocab has none of them " \
           f"({', '.join(SPECIAL_TOKENS)})" in str(refused.value)
