
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from gpt1.core.errors import Gpt1Error
from gpt1.core.tokenizer import (
    MAX_TOKEN_BYTES,
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    TRAINER_PIECE_CHARS,
    UNK,
    Tokenizer,
    train_tokenizer,
)
from tests.conftest import TEST_VOCAB
from tests.test_battery import assert_one_clear_line, run_main
from tests.test_chat_cli import in_terminal


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


# The BPE trainer's input cut into small pieces: the same tokenizer as the whole text gives, in
# memory that does not grow with a document's length.

def _words(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(3000)]
    text = " ".join(rng.choices(vocab, k=n))
    return text.replace(" the", ", the").replace(" a ", " a\n  ")  # punctuation and indentation too


def _hex(n: int) -> str:  # bytecode, hashes: letters and digits with no space or punctuation
    rng = random.Random(1)
    return "0x" + "".join(rng.choices("0123456789abcdef", k=n))


def _run(alphabet: str, n: int) -> str:  # Thai prose has no spaces; a run of letters alone has no boundary
    return "".join(random.Random(2).choices(alphabet, k=n))


@pytest.mark.parametrize("text", [_words(60_000), _hex(120_000), _run("กขคงจฉชซญดตถทนบปผพฟมยรลวสหอะาิีึื", 100_000),
                                  _run("abcdefghijklmnopqrstuvwxyz", 120_000)],
                         ids=["words", "hex", "thai", "letters"])
def test_a_long_document_trains_the_tokenizer_the_tokenizers_library_trains_on_it_whole(text):
    """Cut into TRAINER_PIECE_CHARS pieces at pre-token boundaries, BPE counts the same words:
    also hex (a cut between a letter and a digit), and text with no boundary for thousands of
    characters (a longer piece, not a word cut in two: such cuts changed the counts)."""
    assert len(text) > 10 * TRAINER_PIECE_CHARS
    ours, _ = train_tokenizer([text], 1_000, show_progress=False)
    reference = Backend(models.BPE(unk_token=UNK))
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    reference.decoder = decoders.ByteLevel()
    reference.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=1_000, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), max_token_length=MAX_TOKEN_BYTES))
    model = json.loads(ours.backend.to_str())["model"]
    expected = json.loads(reference.to_str())["model"]
    assert model["vocab"] == expected["vocab"] and model["merges"] == expected["merges"]


@pytest.mark.slow
def test_the_library_trains_on_one_long_document_in_bounded_memory(tmp_path):
    """`train_tokenizer([text])` handed the whole string to the Rust trainer: ~80 bytes per
    character (1.6 GB for 20 MB, 4 GB for 50 MB); the CLI's reader had cut it, the library not."""
    script = """
import random, resource
from gpt1.core.tokenizer import train_tokenizer
rng = random.Random(0)
vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]
text = " ".join(rng.choices(vocab, k=1_600_000))  # ~10 MB, one line
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
train_tokenizer([text], 600, show_progress=False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    grew_mb = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                 cwd=tmp_path).stdout)
    assert grew_mb < 150, f"the training took {grew_mb} MB more than the text itself"  # 570 before, 13 after


# `tokenizer train` over another tokenizer.

def test_tokenizer_train_refuses_another_tokenizer_json_without_overwrite(tmp_path, capsys):
    """It silently replaced a different tokenizer.json (prepare and pretrain refuse a different setup)."""
    for name, words in (("a", "alpha beta gamma delta"), ("b", "zebra quux xylophone wombat")):
        (tmp_path / name).mkdir()
        for i in range(3):
            (tmp_path / name / f"{i}.txt").write_text(f"{words} {i} " * 20)
    train = ["tokenizer", "train", "--vocab-size", "280", "--min-frequency", "1", "--out", tmp_path / "tok"]
    file = tmp_path / "tok" / "tokenizer.json"
    assert run_main(capsys, *train, tmp_path / "a")[0] == 0
    first = file.read_bytes()
    assert_one_clear_line(*run_main(capsys, *train, tmp_path / "b"),
                          r"tok/tokenizer\.json: holds another tokenizer; pass --overwrite to replace it, or choose another --out$")
    assert file.read_bytes() == first
    rc, err = run_main(capsys, *train, tmp_path / "a")  # the same tokenizer again: no change
    assert rc == 0 and "already holds this tokenizer" in err and file.read_bytes() == first
    assert run_main(capsys, *train, tmp_path / "b", "--overwrite")[0] == 0
    assert file.read_bytes() != first


# BPE training under Ctrl-C and GPT1_QUIET.

@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C as an interactive Python has it: a job a shell starts in the background (`cmd &`)
    inherits SIGINT ignored, and Python then installs no KeyboardInterrupt for it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_bpe_training_answers_ctrl_c_while_the_merges_run(ctrl_c_raises):
    """Ctrl-C during the BPE merges (Rust, on the main thread) waited for the whole training,
    which then finished and wrote its tokenizer; now it interrupts while they still run."""
    rng = random.Random(0)  # 100,000 distinct words, each twice: ~0.2 s of reading, ~2.5 s of merges
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(6, 12))) for _ in range(100_000)]
    docs = [" ".join(words[i:i + 100]) for i in range(0, len(words), 100)] * 2

    def texts():
        yield from docs
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()  # once the merges begin

    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(texts(), 20_000, show_progress=False)
    assert any(t.name == "bpe-training" and t.is_alive() for t in threading.enumerate())


def test_an_interrupted_bpe_training_stops_reading_its_input(ctrl_c_raises):
    """In a notebook the abandoned training went on reading the caller's iterator to its end
    (and each retry added another such thread): it now gets no more text, so it ends soon."""
    consumed = [0]

    def texts():
        rng = random.Random(0)
        for i in range(10**6):
            consumed[0] = i
            if i == 2_000:
                os.kill(os.getpid(), signal.SIGINT)
            yield " ".join("".join(rng.choices("abcdefgh", k=6)) for _ in range(20))

    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(texts(), 1_000, show_progress=False)
    for thread in threading.enumerate():
        if thread.name == "bpe-training":
            thread.join(60)  # the merges on what was read: seconds
            assert not thread.is_alive()
    assert consumed[0] < 10_000


def test_gpt1_quiet_silences_the_bpe_progress_bar_on_a_terminal(corpus_dir, tmp_path, monkeypatch):
    """The Rust trainer's bar (drawn on a terminal) ignored GPT1_QUIET=1, which docs/reliability.md
    says turns the bars off."""
    def shown(quiet: str) -> bytes:
        monkeypatch.setenv("GPT1_QUIET", quiet)
        return in_terminal([sys.executable, "-m", "gpt1", "tokenizer", "train", str(corpus_dir), "--vocab-size", "300",
                            "--out", str(tmp_path / quiet)], typed=[])

    assert b"Pre-processing" not in shown("0")  # the Rust bar is off: gpt1's own bar, on stderr, replaces it
    for quiet in ("0", "1"):  # ... which GPT1_QUIET silences as it does every bar
        done = subprocess.run([sys.executable, "-m", "gpt1", "tokenizer", "train", str(corpus_dir), "--vocab-size",
                               "300", "--out", str(tmp_path / f"piped{quiet}")], capture_output=True,
                              env={**os.environ, "GPT1_QUIET": quiet}, timeout=120)
        assert (b"tokenizer: " in done.stderr) == (quiet == "0") and done.stdout == b"", done.stderr


# A tokenizer of the bytes alone says it cannot be exported to GGUF.

def test_a_tokenizer_of_the_bytes_alone_says_it_cannot_be_exported_to_gguf(caplog):
    import logging

    from gpt1.core.tokenizer import MIN_VOCAB_SIZE, train_tokenizer

    with caplog.at_level(logging.WARNING, logger="gpt1"):
        train_tokenizer(["some text " * 50], MIN_VOCAB_SIZE, show_progress=False)
        assert "cannot be exported to GGUF" in caplog.text
        caplog.clear()
        train_tokenizer(["some text " * 50], MIN_VOCAB_SIZE + 1, show_progress=False)
        assert "GGUF" not in caplog.text
