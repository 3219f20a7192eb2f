"""n samples of one prompt (the library's `n`, `gpt1 generate --num-samples`, OpenAI's `n` on both
endpoints, through the real `openai` client and a real server on loopback), and other libraries'
names for gpt1's knobs told gpt1's."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from gpt1.cli import main
from gpt1.cli.chat_cmd import parse_knob
from gpt1.cli.generate_cmd import SAMPLE_SEPARATOR
from gpt1.core.errors import Gpt1Error
from gpt1.core.sampling_params import SamplingParams
from gpt1.inference.generate import generate_batch
from gpt1.serve import background_server, create_app

PROMPT = "import"
KNOBS = dict(temperature=1.0, max_new_tokens=12)
MSG = [{"role": "user", "content": "Name a colour."}]


# ---- n in the library ----------------------------------------------------------------------------
def test_n_samples_of_one_prompt_differ_and_a_seed_makes_the_set_reproducible(llm):
    """generate_batch([ids] * 3) under one seed gave one text three times, and there was no `n`."""
    samples = llm.generate(PROMPT, n=3, seed=1337, **KNOBS)
    assert isinstance(samples, list) and len(samples) == 3 and len(set(samples)) == 3
    assert llm.generate(PROMPT, n=3, seed=1337, **KNOBS) == samples
    # Sample i is seeded seed + i: the first is the text the seed gives alone.
    assert [llm.generate(PROMPT, seed=1337 + i, **KNOBS) for i in range(3)] == samples
    # Unseeded, each sample is a draw of its own.
    assert len(set(llm.generate(PROMPT, n=4, **KNOBS))) > 1
    # Greedy samples are all the most likely text (as OpenAI answers n with temperature 0).
    assert llm.generate(PROMPT, n=2, temperature=0, max_new_tokens=8) == [llm.generate(PROMPT, temperature=0,
                                                                                         max_new_tokens=8)] * 2
    assert llm.generate(PROMPT, n=1, seed=5, **KNOBS) == [llm.generate(PROMPT, seed=5, **KNOBS)]
    replies = llm.chat(MSG, n=2, seed=3, **KNOBS)
    assert replies == [llm.chat(MSG, seed=3 + i, **KNOBS) for i in range(2)]
    for bad in (0, -1, True, 2.0, "2"):
        with pytest.raises(Gpt1Error, match="n must be an integer >= 1"):
            llm.generate(PROMPT, n=bad)


def test_generate_batch_takes_one_sampling_params_per_prompt(llm):
    ids = llm.tokenizer.encode(PROMPT)
    samples = SamplingParams(seed=1337, **KNOBS).samples(3)
    assert [c.text for c in generate_batch(llm.model, llm.tokenizer, [ids] * 3, samples)] == \
        llm.generate(PROMPT, n=3, seed=1337, **KNOBS)
    with pytest.raises(Gpt1Error, match="2 SamplingParams for 3 prompts"):
        generate_batch(llm.model, llm.tokenizer, [ids] * 3, samples[:2])
    with pytest.raises(Gpt1Error, match="or a list of one per prompt, got list"):
        generate_batch(llm.model, llm.tokenizer, [ids], [{"temperature": 0}])


def test_seeds_of_samples_wrap_at_two_to_the_64():
    assert [p.seed for p in SamplingParams(seed=-2).samples(3)] == [2**64 - 2, 2**64 - 1, 0]
    assert [p.seed for p in SamplingParams().samples(2)] == [None, None]


# ---- gpt1 generate --num-samples -----------------------------------------------------------------
def test_generate_prints_n_samples_in_turn_between_lines_of_dashes(capsys, tiny_model_dir, llm):
    code = main(["generate", "--model", str(tiny_model_dir), "--device", "cpu", "--prompt", PROMPT, "--num-samples", "3",
                 "--seed", "1337", "--temperature", "1", "--max-new-tokens", "12"])
    out, err = capsys.readouterr()
    assert code == 0
    # Into a pipe the samples go exactly as generated, split by the separator.
    assert out == SAMPLE_SEPARATOR.join(llm.generate(PROMPT, n=3, seed=1337, **KNOBS))
    assert SAMPLE_SEPARATOR == "\n---------------\n"  # nanoGPT's sample.py line
    assert " generated (3 samples) in " in err and err.count("length") + err.count("stop") >= 3
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--num-samples", "0"])
    assert "--num-samples: expected a whole number >= 1, got 0" in capsys.readouterr().err


# ---- n on the server, through the openai client ----------------------------------------------------
@pytest.fixture(scope="module")
def server(llm):
    with background_server(create_app(llm, max_batch=4, max_queue=4)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def submitted(url: str) -> int:
    metrics = httpx.get(f"{url}/metrics").text
    return int(float(re.search(r"^gpt1_requests_submitted_total\{[^}]*\} (\S+)$", metrics, re.M).group(1)))


def test_chat_n_gives_n_choices_each_a_request_seeded_in_turn(server, client):
    before = submitted(server)
    reply = client.chat.completions.create(model="m", messages=MSG, n=3, seed=7, max_tokens=6, temperature=1.0)
    assert submitted(server) - before == 3  # a request to the engine per choice, decoded together
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) == 3
    singles = [client.chat.completions.create(model="m", messages=MSG, seed=7 + i, max_tokens=6, temperature=1.0)
               for i in range(3)]
    assert texts == [s.choices[0].message.content for s in singles]
    # The prompt is counted once, the choices' tokens summed (as OpenAI and vLLM count them).
    assert reply.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert reply.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)

    # Streamed: each chunk names its choice; each choice gets its role, its text and its finish.
    streamed: dict[int, str] = {}
    roles, finishes, usage = [], [], None
    for chunk in client.chat.completions.create(model="m", messages=MSG, n=3, seed=7, max_tokens=6, temperature=1.0,
                                                stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
            roles += [choice.index] if choice.delta.role else []
            finishes += [choice.index] if choice.finish_reason else []
    assert streamed == dict(enumerate(texts))
    assert sorted(roles) == sorted(finishes) == [0, 1, 2]
    assert usage.completion_tokens == reply.usage.completion_tokens and usage.prompt_tokens == reply.usage.prompt_tokens

    greedy = client.chat.completions.create(model="m", messages=MSG, n=2, max_tokens=6, temperature=0)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def test_completions_n_orders_the_choices_prompt_by_prompt(client):
    reply = client.completions.create(model="m", prompt=["a", "bb"], n=2, seed=3, max_tokens=5, temperature=1.0)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(["a", "bb"]):  # prompt i's choices are i * n, i * n + 1, seeded seed, seed + 1
        alone = client.completions.create(model="m", prompt=prompt, n=2, seed=3, max_tokens=5, temperature=1.0)
        assert [c.text for c in reply.choices[2 * i:2 * i + 2]] == [c.text for c in alone.choices]
    singles = [client.completions.create(model="m", prompt=p, max_tokens=5, temperature=1.0, seed=3) for p in ("a", "bb")]
    assert reply.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)

    streamed: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(model="m", prompt=["a", "bb"], n=2, seed=3, max_tokens=5, temperature=1.0,
                                           stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == {c.index: c.text for c in reply.choices}
    assert (usage.prompt_tokens, usage.completion_tokens) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)


def test_n_below_one_or_beyond_what_the_server_holds_is_a_400_naming_n(client):
    for kwargs, message in [(dict(n=0), "n must be an integer >= 1"),
                            (dict(n=9), "this server holds at most 8 at once"),
                            (dict(n=5, prompt=["a", "b"]), "2 prompts x 5 choices = 10")]:
        create = client.completions.create if "prompt" in kwargs else client.chat.completions.create
        body = {} if "prompt" in kwargs else {"messages": MSG}
        with pytest.raises(openai.BadRequestError) as caught:
            create(model="m", max_tokens=2, **body, **kwargs)
        assert caught.value.body["param"] == "n" and message in caught.value.body["message"]


# ---- other libraries' names for gpt1's knobs --------------------------------------------------------
def test_a_knob_spelled_as_another_library_spells_it_is_told_gpt1s_name(llm):
    for alias, known in [("repetition_penalty", "repeat_penalty"), ("num_return_sequences", "n"),
                         ("max_length", "max_new_tokens"), ("do_sample", "temperature"), ("max_tokens", "max_new_tokens")]:
        with pytest.raises(Gpt1Error, match=rf"unknown sampling knob\(s\) {alias} \(gpt1's is {known}\b"):
            llm.generate("x", **{alias: 1})
    with pytest.raises(Gpt1Error, match=r"unknown sampling knob\(s\) temprature; known"):  # no hint for a typo
        llm.generate("x", temprature=1)
    with pytest.raises(Gpt1Error, match=r"unknown knob 'repetition_penalty' \(gpt1's is repeat_penalty\)"):
        parse_knob(SamplingParams(), "repetition_penalty", "1.1")


def test_the_server_tells_gpt1s_name_for_another_apis_field(server):
    for field, known in [("repetition_penalty", "repeat_penalty"), ("max_new_tokens", "max_tokens"),
                         ("num_return_sequences", "n")]:
        r = httpx.post(f"{server}/v1/chat/completions", json={"messages": MSG, "max_tokens": 2, field: 1})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == field
        assert error["message"].startswith(f"{field}: unrecognized request argument (gpt1's is {known}")
