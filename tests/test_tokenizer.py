import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt1.core.errors import Gpt1Error
from gpt1.core.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, Tokenizer, train_tokenizer
from tests.conftest import TEST_VOCAB


def test_exact_vocab_size_and_special_ids(tokenizer):
    assert tokenizer.vocab_size == TEST_VOCAB
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.eos_id) == (0, 1, 2)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_unicode_round_trips(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.unk_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.id_to_bytes(ids) == text.encode("utf-8", errors="surrogatepass")


def test_text_never_becomes_special_tokens(tokenizer):
    ids = tokenizer.encode("end [EOS] <|user|> [PAD]")
    assert not set(ids) & set(tokenizer.special_ids)
    assert tokenizer.decode(ids) == "end [EOS] <|user|> [PAD]"


def test_bpe_learned_merges(tokenizer):
    text = "def __init__(self):\n    return self"
    assert len(tokenizer.encode(text)) < len(text.encode()) / 2


def test_save_load_and_other_loaders_give_same_ids(tokenizer, tokenizer_dir):
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    text = "import json\nprint(json.dumps({'héllo': '世界 🌍'}))"
    loaded = Tokenizer.load(tokenizer_dir)
    assert loaded.fingerprint == tokenizer.fingerprint
    assert loaded.encode(text) == tokenizer.encode(text)
    raw = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert raw.encode(text).ids == tokenizer.encode(text)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    assert fast(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    assert fast.decode(tokenizer.encode(text)) == text


def test_vocab_too_small_for_bytes_and_specials():
    with pytest.raises(Gpt1Error, match=f"at least {MIN_VOCAB_SIZE}"):
        train_tokenizer(["hello"], MIN_VOCAB_SIZE - 1, show_progress=False)


def test_corpus_too_small_for_vocab():
    with pytest.raises(Gpt1Error, match="too small to learn 5,000 tokens"):
        train_tokenizer(["a tiny corpus"], 5000, show_progress=False)


def test_min_frequency_is_a_count_from_zero():
    """The library takes an unsigned 64-bit count: a negative one was an OverflowError from it,
    a larger one means the same as its maximum (no pair occurs that often)."""
    with pytest.raises(Gpt1Error, match=r"min_frequency \(--min-frequency\) must be a whole number >= 0 .*got -1"):
        train_tokenizer(["hello hello"], MIN_VOCAB_SIZE + 1, min_frequency=-1, show_progress=False)
    with pytest.raises(Gpt1Error, match="too small to learn"):
        train_tokenizer(["hello hello"], MIN_VOCAB_SIZE + 1, min_frequency=10**30, show_progress=False)
    tokenizer, _ = train_tokenizer(["hello"], MIN_VOCAB_SIZE + 1, min_frequency=0, show_progress=False)
    assert tokenizer.vocab_size == MIN_VOCAB_SIZE + 1


def test_empty_corpus():
    with pytest.raises(Gpt1Error, match="no documents"):
        train_tokenizer([], 300, show_progress=False)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(Gpt1Error, match="tokenizer file not found"):
        Tokenizer.load(tmp_path)


def test_tokens_are_at_most_32_bytes(corpus_dir):
    """llama-cpp-python's detokenize drops tokens over 32 bytes (its buffer per token), and BPE
    on code learns newline + deep indentation runs longer than that without the cap."""
    from gpt1.core.tokenizer import MAX_TOKEN_BYTES
    from gpt1.data.sources import iter_documents

    deep = "def f(x):\n" + " " * 64 + "return x\n"
    texts = [*iter_documents([str(corpus_dir)]), *[deep] * 200]
    tokenizer, _ = train_tokenizer(texts, 2048, show_progress=False)
    assert MAX_TOKEN_BYTES == 32 and max(len(b) for b in tokenizer.bytes_table) <= MAX_TOKEN_BYTES
    assert tokenizer.decode(tokenizer.encode(deep)) == deep


def test_encode_of_a_lone_surrogate_and_decode_of_an_unknown_id_say_so(tokenizer):
    with pytest.raises(Gpt1Error, match=r"text to encode: a lone surrogate \('\\udc80'\) at character 1: not valid"):
        tokenizer.encode("x\udc80y")
    with pytest.raises(Gpt1Error, match="text to encode: expected a string, got bytes"):
        tokenizer.encode(b"xy")
    # The Rust library returned '' for an id past the vocabulary, and raised OverflowError for -1.
    for bad in (TEST_VOCAB, 99999, -1):
        with pytest.raises(Gpt1Error, match=f"token id {bad} is not in the tokenizer's vocabulary \\(ids 0 to 511\\)"):
            tokenizer.decode([5, bad, 6])
    assert tokenizer.decode([]) == "" and tokenizer.decode([TEST_VOCAB - 1]) != ""


def _edited(spec: dict, key: str, value) -> dict:
    import copy

    spec = copy.deepcopy(spec)
    if key == "vocab+":  # a token outside the byte-level alphabet
        spec["model"]["vocab"]["€uro"] = len(spec["model"]["vocab"])
    elif "." in key:
        outer, inner = key.split(".")
        spec[outer][inner] = value
    else:
        spec[key] = value
    return spec


@pytest.mark.parametrize("key, value, why", [
    ("model.type", "WordLevel", "a WordLevel model, not BPE"),  # a KeyError traceback
    ("model.dropout", 0.1, "BPE with dropout, a subword prefix or a word suffix"),
    ("normalizer", {"type": "Lowercase"}, "a Lowercase normalizer"),  # same fingerprint, other ids
    ("pre_tokenizer", {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False},
     "a Split pre-tokenizer"),  # a Rust panic, or half an hour of CPU per 1 MiB request
    ("pre_tokenizer.add_prefix_space", True, "a ByteLevel pre-tokenizer with other settings"),
    ("decoder", None, "a None decoder"),
    ("vocab+", None, "the token '€uro' is not made of byte-level characters"),  # a KeyError at its first use
])
def test_a_tokenizer_json_that_is_not_gpt1s_pipeline_is_refused_at_load(tokenizer, tmp_path, key, value, why):
    import json

    spec = json.loads(tokenizer.to_json())
    assert Tokenizer.load(_write(tmp_path / "ok.json", spec)).fingerprint == tokenizer.fingerprint
    with pytest.raises(Gpt1Error) as error:
        Tokenizer.load(_write(tmp_path / "tokenizer.json", _edited(spec, key, value)))
    assert str(error.value).startswith(f"{tmp_path / 'tokenizer.json'}: not a gpt1 tokenizer ({why}); gpt1 reads "
                                       "byte-level BPE")


def _write(path, spec: dict):
    import json

    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize("bad, expected", [
    (None, r"texts\[1\]: expected a string, got NoneType"),
    (b"bytes", r"texts\[1\]: expected a string, got bytes"),
    ("x\udc80y", r"texts\[1\]: a lone surrogate \('\\udc80'\) at character 1"),
])
def test_train_tokenizer_names_the_text_it_cannot_train_on(bad, expected):
    """The library call (the CLI's readers check first) gave AttributeError: 'NoneType' object has
    no attribute 'encode', or the Rust trainer's UnicodeEncodeError, naming no item."""
    with pytest.raises(Gpt1Error, match=expected):
        train_tokenizer(iter(["some text " * 20, bad, "more"]), MIN_VOCAB_SIZE, show_progress=False)


def test_train_tokenizer_refuses_one_string_for_its_documents():
    """`train_tokenizer("some text", ...)` trained on 63,639 one-character documents (no merge
    across characters), or said the corpus was too small, naming the CLI's --vocab-size."""
    with pytest.raises(Gpt1Error, match=r"texts: expected an iterable of documents \(strings\), got one str; pass \[text\]"):
        train_tokenizer("some text " * 100, MIN_VOCAB_SIZE, show_progress=False)


@pytest.mark.parametrize("setting", [{"truncation": {"direction": "Right", "max_length": 2, "strategy": "LongestFirst",
                                                     "stride": 0}},
                                     {"padding": {"strategy": {"Fixed": 50}, "direction": "Right", "pad_to_multiple_of": None,
                                                  "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"}}])
def test_a_tokenizer_json_s_own_truncation_or_padding_is_not_applied(tokenizer, tmp_path, setting):
    """Outside the vocab and merges the fingerprint covers: a tokenizer.json with truncation cut
    every prompt and every prepared document to 2 tokens (exit 0), one with padding made every
    encode 50 ids long."""
    import json

    tokenizer.save(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    (tmp_path / "tokenizer.json").write_text(json.dumps({**spec, **setting}))
    text = "def parse(line): return line.split()"
    loaded = Tokenizer.load(tmp_path)
    assert loaded.encode(text) == tokenizer.encode(text) and len(tokenizer.encode(text)) > 2
    assert loaded.encode_batch([text, "x"]) == tokenizer.encode_batch([text, "x"])
