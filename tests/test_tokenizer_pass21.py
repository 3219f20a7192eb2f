"""The BPE trainer's input cut into small pieces (pass 21): the same tokenizer as the whole text
gives, in memory that does not grow with a document's length."""
import json
import random
import subprocess
import sys

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from gpt1.core.tokenizer import MAX_TOKEN_BYTES, SPECIAL_TOKENS, TRAINER_PIECE_CHARS, UNK, train_tokenizer


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
