"""The decode loop: KV cache vs full recomputation, seeds, batching, stops, context limits,
streaming of multi-byte characters, cancellation, and the LLM methods."""

import os
import subprocess
import sys
import threading

import pytest
import torch

from gpt1 import GPT, load
from gpt1.core.chat_template import encode_chat
from gpt1.core.errors import Gpt1Error
from gpt1.core.sampling_params import SamplingParams
from gpt1.core.tokenizer import ASSISTANT, SYSTEM, USER
from gpt1.inference.generate import chat_prompt_ids, generate, generate_batch, stream
from tests.model_factories import model_without_stops

GREEDY = SamplingParams(temperature=0, max_new_tokens=24)
TEXT = "def parse(self, data):\n    return json.loads(data)\n"


@pytest.fixture(scope="module")
def model(tiny_config, tokenizer):
    return model_without_stops(tiny_config, tokenizer, seed=7)


def scripted_model(config, chain: list[int]) -> GPT:
    """A GPT whose greedy choice after chain[i] is chain[i + 1]: attention and MLP are zeroed,
    so the logits depend on the last token only (its embedding row is a unit vector e_i and
    the output row of chain[i + 1] reads e_i)."""
    assert len(set(chain)) == len(chain) and len(chain) <= config.n_embd
    m = GPT(config).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.fill_(1.0 if "ln" in name and name.endswith("weight") else 0.0)
        for i, (a, b) in enumerate(zip(chain, chain[1:])):
            m.transformer.wte.weight[a, i] = 10.0
            m.lm_head.weight[b, i] = 10.0
    return m


def script(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text)
    assert len(set(ids)) == len(ids), "the test text needs distinct tokens"
    return ids


def reference_greedy(model, ids, n, repeat_penalty=1.0, repeat_last_n=64):
    """nanoGPT-style: recompute the whole context for every token (no cache), with
    transformers' repetition penalty processor on the window."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[:, -1]
            if repeat_penalty != 1.0:
                window = ids if repeat_last_n == -1 else ids[-repeat_last_n:]
                logits = RepetitionPenaltyLogitsProcessor(repeat_penalty)(torch.tensor([window]), logits)
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out


@pytest.mark.parametrize("penalty, last_n", [(1.0, 64), (1.5, 8), (1.5, -1)])
def test_greedy_with_kv_cache_equals_full_recompute(model, tokenizer, penalty, last_n):
    prompt = tokenizer.encode(TEXT)[:12]
    params = SamplingParams(temperature=0, max_new_tokens=24, repeat_penalty=penalty, repeat_last_n=last_n)
    completion = generate(model, tokenizer, prompt, params)
    assert completion.finish_reason == "length" and completion.completion_tokens == 24
    assert completion.token_ids == reference_greedy(model, prompt, 24, penalty, last_n)
    assert completion.text == tokenizer.decode(completion.token_ids)


def test_same_seed_same_text(model, tokenizer):
    prompt = tokenizer.encode(TEXT)[:8]
    params = SamplingParams(temperature=1.0, top_k=100, max_new_tokens=20)
    runs = [generate(model, tokenizer, prompt, params.override(seed=s)).token_ids for s in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_batched_equals_one_at_a_time(model, tokenizer):
    ids = tokenizer.encode(TEXT)
    prompts = [ids[:3], ids[5:15], ids[:7], ids[2:19]]  # different lengths: left padding
    for params in (GREEDY.override(max_new_tokens=12), SamplingParams(temperature=1.0, max_new_tokens=12, seed=5)):
        batch = generate_batch(model, tokenizer, prompts, params)
        for prompt, got in zip(prompts, batch):
            alone = generate(model, tokenizer, prompt, params)
            assert got.token_ids == alone.token_ids and got.text == alone.text
            assert got.prompt_tokens == len(prompt) and got.finish_reason == "length"


def test_batch_rows_finish_independently(tiny_config, tokenizer):
    """A row that stops early (EOS) leaves the batch; the others go on unchanged."""
    chain = script(tokenizer, "abc;de") + [tokenizer.eos_id]
    m = scripted_model(tiny_config, chain)
    short, long = [chain[3]], [chain[0]]  # the first ends after 2 tokens, the second after 5
    results = generate_batch(m, tokenizer, [short, [9, 10] + long], GREEDY)
    assert [r.text for r in results] == [tokenizer.decode(chain[4:-1]), tokenizer.decode(chain[1:-1])]
    assert [r.finish_reason for r in results] == ["stop", "stop"]


def test_eos_stops_and_multibyte_characters_stream_whole(tiny_config, tokenizer):
    text = "aé世🙂!"
    chain = [tokenizer.encode("x")[0]] + script(tokenizer, text) + [tokenizer.eos_id]
    assert len(tokenizer.encode(text)) > len(text)  # characters are split across byte tokens
    m = scripted_model(tiny_config, chain)
    chunks = list(stream(m, tokenizer, chain[:1], GREEDY))
    assert "".join(c.text for c in chunks) == text
    assert all("\ufffd" not in c.text for c in chunks)  # no piece holds half a character
    assert len([c for c in chunks if c.text]) >= 4
    last = chunks[-1]
    assert last.finish_reason == "stop" and all(c.finish_reason is None for c in chunks[:-1])
    assert (last.prompt_tokens, last.completion_tokens) == (1, len(chain) - 1)  # the EOS counts
    completion = generate(m, tokenizer, chain[:1], GREEDY)
    assert completion.token_ids == chain[1:-1] and completion.text == text


def test_stream_of_random_bytes_concatenates_to_decode(model, tokenizer):
    params = SamplingParams(temperature=1.5, max_new_tokens=60, seed=3)
    chunks = list(stream(model, tokenizer, tokenizer.encode("é"), params))
    completion = generate(model, tokenizer, tokenizer.encode("é"), params)
    assert "".join(c.text for c in chunks) == completion.text == tokenizer.decode(completion.token_ids)


@pytest.mark.parametrize("stop, expected, reason", [
    ((";",), "abc", "stop"),
    (("c;d", "zz"), "ab", "stop"),
    (("c;x",), "abc;de", "stop"),  # held back while it could still be "c;x", then released
    (("e",), "abc;d", "stop"),
])
def test_stop_strings_are_cut_and_never_streamed(tiny_config, tokenizer, stop, expected, reason):
    chain = script(tokenizer, "abc;de") + [tokenizer.eos_id]
    m = scripted_model(tiny_config, chain)
    params = GREEDY.override(stop=stop)
    chunks = list(stream(m, tokenizer, chain[:1], params))
    streamed = "".join(c.text for c in chunks)
    assert chain[:1] == tokenizer.encode("a")  # so the text starts after "a"
    assert "a" + streamed == expected and chunks[-1].finish_reason == reason
    for s in stop:
        assert s not in streamed
    assert generate(m, tokenizer, chain[:1], params).text == streamed


def test_too_long_prompt_keeps_its_most_recent_tokens(model, tokenizer, tiny_config):
    prompt = (tokenizer.encode(TEXT) * 10)[:100]  # the context is 64 tokens
    params = GREEDY.override(max_new_tokens=10)
    completion = generate(model, tokenizer, prompt, params)
    assert completion.prompt_tokens == 54 and completion.completion_tokens == 10
    assert completion.token_ids == generate(model, tokenizer, prompt[-54:], params).token_ids
    with pytest.raises(Gpt1Error, match=r"prompt \(100 tokens\) plus max_new_tokens \(10\) exceed the context of 64"):
        generate(model, tokenizer, prompt, params.override(truncate_prompt=False))
    # More new tokens than the context holds: the prompt keeps half the context and
    # generation ends at the context limit.
    long_run = generate(model, tokenizer, prompt, params.override(max_new_tokens=1000))
    assert (long_run.prompt_tokens, long_run.completion_tokens, long_run.finish_reason) == (32, 32, "length")
    with pytest.raises(Gpt1Error, match="exceed the context"):
        generate(model, tokenizer, prompt[:5], params.override(max_new_tokens=60, truncate_prompt=False))


def test_bad_prompt_ids_and_empty_prompt(model, tokenizer, tiny_config):
    with pytest.raises(Gpt1Error, match=r"prompt: token id 9999 is outside the vocabulary \[0, 512\)"):
        generate(model, tokenizer, [5, 9999], GREEDY)
    with pytest.raises(Gpt1Error, match=r"prompt 1: token id -1"):
        generate_batch(model, tokenizer, [[5], [-1]], GREEDY)
    empty = generate(model, tokenizer, [], GREEDY.override(max_new_tokens=3))
    assert empty.prompt_tokens == 1  # starts from [EOS], the document boundary
    # NumPy and torch integers are token ids (they were called "outside the vocabulary"); text,
    # floats and bools are not, and say so; a generator of prompts is read once.
    import numpy as np

    expected = generate(model, tokenizer, [5, 6], GREEDY).token_ids
    assert generate(model, tokenizer, np.array([5, 6]), GREEDY).token_ids == expected
    assert generate(model, tokenizer, torch.tensor([5, 6]), GREEDY).token_ids == expected
    assert [c.token_ids for c in generate_batch(model, tokenizer, (p for p in [[5, 6], [7]]), GREEDY)] == \
        [expected, generate(model, tokenizer, [7], GREEDY).token_ids]
    with pytest.raises(Gpt1Error, match=r"prompt: expected token ids \(a list of ints\), got text; encode it"):
        generate(model, tokenizer, "hello", GREEDY)
    for bad in ([5, 6.0], [True], [5, None]):
        with pytest.raises(Gpt1Error, match=r"prompt: token ids must be integers, got "):
            generate(model, tokenizer, bad, GREEDY)
    assert empty.token_ids == generate(model, tokenizer, [tokenizer.eos_id], GREEDY.override(max_new_tokens=3)).token_ids


def test_cancel_from_another_thread_stops_the_stream(model, tokenizer):
    cancel, first = threading.Event(), threading.Event()
    chunks = []

    def consume():
        for chunk in stream(model, tokenizer, [5, 6], SamplingParams(temperature=0, max_new_tokens=50), cancel):
            chunks.append(chunk)
            first.set()
            cancel.wait(timeout=30)

    worker = threading.Thread(target=consume)
    worker.start()
    assert first.wait(timeout=30)
    cancel.set()
    worker.join(timeout=30)
    assert chunks[-1].finish_reason == "cancelled"
    assert chunks[-1].completion_tokens == chunks[-2].completion_tokens < 50


def test_chat_prompt_drops_the_oldest_turns(tokenizer):
    turns = [{"role": r, "content": f"message number {i} " * 4} for i, r in enumerate(["user", "assistant"] * 6)]
    messages = [{"role": "system", "content": "be brief"}] + turns + [{"role": "user", "content": "last"}]
    params = SamplingParams(max_new_tokens=40)
    ids, dropped, cut = chat_prompt_ids(tokenizer, messages, 256, params)
    assert cut == 0
    assert 0 < dropped < len(turns) and dropped % 2 == 0  # whole user + assistant pairs
    assert len(ids) <= 256 - 40
    assert ids[0] == tokenizer.special_id(SYSTEM) and ids[-1] == tokenizer.special_id(ASSISTANT)
    assert tokenizer.special_id(USER) == ids[len(tokenizer.encode("be brief")) + 1]
    assert chat_prompt_ids(tokenizer, messages, 4096, params) == (chat_prompt_ids(tokenizer, messages, 4096, params)[0], 0, 0)
    whole, none_dropped, _ = chat_prompt_ids(tokenizer, messages, 256, params.override(truncate_prompt=False))
    assert none_dropped == 0 and len(whole) > 256 - 40


def test_a_long_conversation_is_encoded_once_whatever_it_drops(tokenizer, monkeypatch):
    """Each dropped turn re-encoded every remaining message: 2,000 short turns took seconds of the
    server's event loop (20,000 froze it for minutes). Now every message is encoded once, and the
    prompt is the same as encoding the kept conversation whole."""
    system = {"role": "system", "content": "be brief"}
    turns = [{"role": r, "content": f"turn {i}"} for i, r in enumerate(["user", "assistant"] * 1000)] + [
        {"role": "user", "content": "last"}]
    encode, calls = tokenizer.encode, []
    monkeypatch.setattr(tokenizer, "encode", lambda text: calls.append(text) or encode(text))
    ids, dropped, cut = chat_prompt_ids(tokenizer, [system] + turns, 256, SamplingParams(max_new_tokens=40))
    assert len(calls) <= len(turns) + 1
    assert cut == 0 and dropped % 2 == 0 and 0 < len(ids) <= 256 - 40
    assert ids == encode_chat(tokenizer, [system] + turns[dropped:])


def test_a_last_message_too_long_loses_the_start_of_its_text_not_the_system_message_or_its_marker(tokenizer):
    """It lost both: the engine kept the prompt's last tokens, so the model saw the user's text
    with no system message and no <|user|> before it."""
    system = {"role": "system", "content": "Always answer in French."}
    user = {"role": "user", "content": " ".join(f"word{i}" for i in range(300))}
    params = SamplingParams(max_new_tokens=40)
    for messages in ([system, user], [system, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, user]):
        ids, dropped, cut = chat_prompt_ids(tokenizer, messages, 256, params)
        assert len(ids) == 256 - 40 and dropped == len(messages) - 2
        system_ids = encode_chat(tokenizer, [system], add_generation_prompt=False)
        assert ids[:len(system_ids)] == system_ids and ids[len(system_ids)] == tokenizer.special_id(USER)
        assert ids[len(system_ids) + 1:-1] == tokenizer.encode(user["content"])[cut:]  # its most recent text
        assert ids[-1] == tokenizer.special_id(ASSISTANT)
    with pytest.raises(Gpt1Error, match="the system message leaves no room.*max_new_tokens 40"):
        chat_prompt_ids(tokenizer, [{"role": "system", "content": "be brief " * 200}, user], 256, params)
    # The budget and the way out, right: it said "(256 of context less max_new_tokens 256)" for a
    # budget of 128, and "lower max_new_tokens", which does nothing until it is below half.
    words = 1
    while len(tokenizer.encode("be brief " * words)) < 160:
        words += 1
    system = {"role": "system", "content": "be brief " * words}
    needed = len(encode_chat(tokenizer, [system, {"role": "user", "content": "x"}]))
    assert 128 < needed < 256
    for messages in ([system, user], [system]):  # a system message alone was cut, silently
        with pytest.raises(Gpt1Error) as error:
            chat_prompt_ids(tokenizer, messages, 256, SamplingParams())
        need = needed if len(messages) > 1 else needed - 2  # not: the user marker and "x"
        assert str(error.value) == (f"the system message leaves no room for the conversation: the prompt needs "
                                    f"{need} tokens with it and may take 128 here (half the 256-token context, as "
                                    f"max_new_tokens 256 leaves less); shorten the system message or lower "
                                    f"max_new_tokens to at most {256 - need}")
        ids, _, _ = chat_prompt_ids(tokenizer, messages, 256, SamplingParams(max_new_tokens=256 - need))
        system_ids = encode_chat(tokenizer, [system], add_generation_prompt=False)
        assert ids[:len(system_ids)] == system_ids and len(ids) == need  # whole, and the last message cut to fit


def test_llm_methods(tiny_model_dir):
    llm = load(tiny_model_dir, device="cpu")
    assert not llm.is_chat_model
    expected = generate(llm.model, llm.tokenizer, llm.tokenizer.encode("import"), GREEDY.override(max_new_tokens=8)).text
    assert llm.generate("import", temperature=0, max_new_tokens=8) == expected
    assert "".join(llm.stream("import", temperature=0, max_new_tokens=8)) == expected
    assert llm.generate("x", preset="code", seed=4, max_new_tokens=8) == llm.generate(
        "x", temperature=0.2, top_k=30, top_p=0.8, repeat_penalty=1.05, seed=4, max_new_tokens=8)
    messages = [{"role": "user", "content": "hello"}]
    reply = generate(llm.model, llm.tokenizer, encode_chat(llm.tokenizer, messages), GREEDY.override(max_new_tokens=8)).text
    assert llm.chat(messages, temperature=0, max_new_tokens=8) == reply
    assert "".join(llm.chat_stream(messages, temperature=0, max_new_tokens=8)) == reply
    with pytest.raises(Gpt1Error, match="unknown sampling knob.*top_n"):
        llm.generate("x", top_n=3)
    with pytest.raises(Gpt1Error, match="unknown sampling preset 'poetry'"):
        llm.generate("x", preset="poetry")
    with pytest.raises(Gpt1Error, match=r"messages\[0\].role"):
        llm.chat([{"role": "robot", "content": "hi"}])


def test_a_stream_still_held_at_exit_ends_quietly(tiny_model_dir):
    # Closed in the interpreter's teardown, it restored the thread count through a torch that was
    # None already: "Exception ignored ... AttributeError" after every such script.
    script = ("import sys, gpt1\nllm = gpt1.load(sys.argv[1])\n"
              "held = llm.stream('the cat', max_new_tokens=16, seed=1)\nprint(next(held))\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the thread tuner on, as for users
    proc = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() and proc.stderr == "", proc.stderr


def test_the_python_api_names_a_prompt_that_is_not_text(tiny_model_dir):
    """`generate(None)` and a lone surrogate ended in the Rust tokenizer's "TextInputSequence
    must be str" (wrong for the surrogate, which is a str)."""
    import gpt1
    from gpt1.core.errors import Gpt1Error

    llm = gpt1.load(tiny_model_dir, device="cpu")
    for bad, message in ((None, "prompt: expected a string, got NoneType"), (["a"], "expected a string, got list"),
                         ("ok \ud800", r"prompt: a lone surrogate \('\\ud800'\) at character 3")):
        with pytest.raises(Gpt1Error, match=message):
            llm.generate(bad, max_new_tokens=2)
        with pytest.raises(Gpt1Error, match=message):
            list(llm.stream(bad, max_new_tokens=2))
    with pytest.raises(Gpt1Error, match=r"messages\[0\].content: a lone surrogate"):
        llm.chat([{"role": "user", "content": "\udc80"}], max_new_tokens=2)
