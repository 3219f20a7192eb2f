"""The library bounds what the CLI bounds and takes the same defaults.

1. `gpt1.load(dir).generate(text)` (stream, complete, chat, chat_complete) tokenized a long prompt
   whole, ~150 bytes a character, to keep a context's worth; the CLI tokenized its end only.
2. The CLI repeated the library's defaults (tokenizer train's vocabulary and min frequency;
   prepare's and serve's), free to drift apart.

How a model loads without a second copy of its weights is in test_library_loading.py."""

import inspect
import random
import subprocess
import sys

import pytest

from gpt1.cli import build_parser
from gpt1.core.config import ModelConfig
from gpt1.core.sampling_params import SamplingParams
from gpt1.core.tokenizer import train_tokenizer
from gpt1.inference import generate as gen
from gpt1.inference.decoding import chat_prompt_ids, fit_new_tokens, prompt_tail

# A child's peak memory so far, in KiB: VmHWM, its own (ru_maxrss starts at the RSS of the process
# that forked it, pytest's, which a child's peak may never pass).
PEAK_KIB = ("peak_kib = lambda: int(next(line for line in open('/proc/self/status') "
            "if line.startswith('VmHWM:')).split()[1]);")


# ---- 1. a long prompt is tokenized from its end, in the library too ------------------------------

def _threshold(llm) -> int:
    """The length in characters beyond which prompt_tail cuts a text (its own rule)."""
    return (llm.config.block_size + 1) * max(map(len, llm.tokenizer.bytes_table))


def _texts_around_the_cut(llm) -> list[str]:
    """Texts a few characters either side of where prompt_tail starts cutting, of several shapes:
    words, code, CJK without spaces (no boundary: kept whole), random mixes of spaces and symbols."""
    rng = random.Random(25)
    alphabet = [*" \n\t\x1c\x85\xa0\u3000ab1.,'é日😀-_", "  ", "\r\n", "'s", " 's"]
    base = ["word and then some more words, " * 400, "def f(x):\n    return x + 1\n" * 400, "日本語。" * 2000,
            "".join(rng.choice(alphabet) for _ in range(20_000))]
    edge = _threshold(llm)
    return [text[:edge + d] for text in base for d in (-1, 0, 5, 9, 40)]


def test_the_library_fits_a_long_prompt_as_it_fitted_the_whole(llm):
    """Every prompt around the cut: the completion (text, ids, counts, the prompt's log-probabilities
    token by token) is the one the whole prompt's tokens give, with max_new_tokens chosen (and, for
    the longest of each shape, not: the default is then capped by the room left)."""
    tok, block = llm.tokenizer, llm.config.block_size
    cut = 0
    for i, text in enumerate(_texts_around_the_cut(llm)):
        whole = tok.encode(text)
        cut += len(prompt_tail(tok, text, block)) < len(text)
        for knobs in ({"max_new_tokens": 2}, {}) if i % 5 == 4 else ({"max_new_tokens": 2},):  # {}: 32 new tokens
            params = SamplingParams(temperature=0, prompt_logprobs=0, **knobs)
            expected = gen.generate(llm.model, tok, whole, fit_new_tokens(params, whole, block, bool(knobs)))
            assert llm.complete(text, temperature=0, prompt_logprobs=0, **knobs) == expected, (text[:30], len(text))
    assert cut >= 6  # most were cut (not the CJK, which has no boundary, nor those not past the edge)


def test_the_library_fits_a_long_chat_message_as_it_fitted_the_whole(llm):
    """A last message around the cut (with and without a system message), and a long message
    before it, which is dropped as the whole was: the same prompt reaches the model."""
    tok, block = llm.tokenizer, llm.config.block_size
    params = SamplingParams(temperature=0, max_new_tokens=2, prompt_logprobs=0)
    for text in _texts_around_the_cut(llm)[1::2]:
        for messages in ([{"role": "user", "content": text}],
                         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}],
                         [{"role": "user", "content": text}, {"role": "assistant", "content": "Yes."},
                          {"role": "user", "content": "And then?"}]):
            expected = gen.generate(llm.model, tok, chat_prompt_ids(tok, messages, block, params).ids, params)
            assert llm.chat_complete(messages, temperature=0, max_new_tokens=2, prompt_logprobs=0) == expected
            assert llm.chat(messages, temperature=0, max_new_tokens=2) == expected.text


def test_what_was_cut_from_a_long_prompt_is_told_in_characters(llm, gpt1_warnings):
    """The whole prompt's token count is not known (its end alone was tokenized): the library
    says its length in characters, as the CLI does."""
    text = "word and then some more words, " * 400
    assert len(prompt_tail(llm.tokenizer, text, llm.config.block_size)) < len(text)
    llm.generate(text, temperature=0, max_new_tokens=2)
    llm.chat([{"role": "user", "content": text}], temperature=0, max_new_tokens=2)
    said = [r.getMessage() for r in gpt1_warnings]
    assert said[0].startswith(f"the prompt ({len(text):,} characters) was cut to its last ")
    assert said[1].startswith("the message's first ") and " characters and then " in said[1], said


def test_a_huge_prompt_takes_little_memory_in_the_library(tiny_model_dir):
    """2 MB prompts through generate, stream, chat and chat_complete: each took ~300 MB more
    (the tokenizer's ids and offsets of the whole text) to keep a context's worth of tokens."""
    if sys.platform != "linux":
        pytest.skip("/proc/self/status: Linux")
    code = (f"import sys, gpt1; {PEAK_KIB} llm = gpt1.load(sys.argv[1], device='cpu'); text = 'some words, ' * 170_000; "
            "llm.generate('warm up', max_new_tokens=1); before = peak_kib(); "
            "llm.generate(text, max_new_tokens=1); list(llm.stream(text, max_new_tokens=1)); "
            "msgs = [{'role': 'user', 'content': text}]; llm.chat(msgs, max_new_tokens=1); "
            "llm.chat_complete(msgs, max_new_tokens=1); print((peak_kib() - before) // 1024)")
    p = subprocess.run([sys.executable, "-c", code, str(tiny_model_dir)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert int(p.stdout) < 60, f"{p.stdout.strip()} MB more to fit 2 MB prompts"


# ---- 2. the CLI takes its defaults from the library ------------------------------------------------

def _defaults(argv: list[str]) -> dict:
    return vars(build_parser().parse_args(argv))


def _library(function) -> dict:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()}


def test_the_cli_defaults_are_the_librarys():
    from gpt1.data.shards import prepare
    from gpt1.serve.app import create_app

    tokenizer = _defaults(["tokenizer", "train", "corpus", "--out", "tok"])
    assert tokenizer["vocab_size"] == ModelConfig().vocab_size
    assert tokenizer["min_frequency"] == _library(train_tokenizer)["min_frequency"]
    prepared, library = _defaults(["prepare", "corpus", "--tokenizer", "tok", "--out", "data"]), _library(prepare)
    assert [prepared[k] for k in ("val", "seed", "batch_docs")] == [library[k] for k in ("val", "seed", "batch_docs")]
    served, library = _defaults(["serve", "--model", "m"]), _library(create_app)
    assert [served[k] for k in ("max_batch", "max_queue", "prefill_chunk", "body_timeout", "stream_interval")] == [
        library[k] for k in ("max_batch", "max_queue", "prefill_chunk", "body_timeout_s", "stream_interval_ms")]
