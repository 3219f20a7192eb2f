"""A second wave on pass 21's changes: what its new spellings and messages told users."""
import json

from gpt1.core.tokenizer import SPECIAL_TOKENS, Tokenizer
from gpt1.train.config import load_config
from gpt1.train.finetune import FinetuneConfig
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
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["some text to learn a few merges from"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.save(str(tmp_path / "tokenizer.json"))
    try:
        Tokenizer.load(tmp_path / "tokenizer.json")
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        message = str(e)
    assert f"the added token '<|endoftext|>' is not one of gpt1's special tokens, and its vocab has none of them " \
           f"({', '.join(SPECIAL_TOKENS)})" in message, message
    assert json.loads((tmp_path / "tokenizer.json").read_text())["added_tokens"]
