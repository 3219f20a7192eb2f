"""Log-probabilities: `SamplingParams.logprobs` / `prompt_logprobs` through the engine (in this
process and in its own), `LLM.complete`, and the server's two OpenAI shapes, read by the real
`openai` client and by lm-eval-harness's real `local-completions` model."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
import torch

from gpt1.core.errors import Gpt1Error
from gpt1.core.sampling_params import SamplingParams
from gpt1.inference.engine import Engine
from gpt1.inference.engine_process import EngineProcess
from gpt1.inference.generate import generate_batch
from gpt1.serve import background_server, create_app


@pytest.fixture(scope="module")
def url(llm):
    with background_server(create_app(llm, max_batch=4)) as url:
        yield url


def reference(llm, ids: list[int]) -> torch.Tensor:
    """log-softmax of a plain forward over the whole sequence, no cache: (len(ids), vocab)."""
    with torch.no_grad():
        return llm.model(torch.tensor([ids]))[0].float().log_softmax(-1)


def assert_entries(entries, ids: list[int], rows: torch.Tensor, top: int) -> None:
    """Each entry is its token's log-probability in `rows`, with the row's `top` most likely."""
    assert [e.token_id for e in entries] == ids
    for e, row in zip(entries, rows):
        assert e.logprob == pytest.approx(row[e.token_id].item(), abs=1e-4)
        values, indices = row.topk(top)
        assert [t for t, _ in e.top] == indices.tolist()
        assert [lp for _, lp in e.top] == pytest.approx(values.tolist(), abs=1e-4)


def test_the_reply_tokens_logprobs_are_the_models_own_whatever_the_knobs(llm):
    """Greedy and sampled rows (temperature, top-k, repeat penalty) in one batch, beside a row that
    asks for none: each token's number is the plain forward's log-softmax (the distribution before
    the knobs, as vLLM's default), and asking for them changes no token."""
    tok = llm.tokenizer
    prompts = [tok.encode("import json\n"), tok.encode("def load(fp):"), tok.encode("class Message:")]
    asked = [SamplingParams(temperature=0, max_new_tokens=10, logprobs=3),
             SamplingParams(temperature=1.3, top_k=5, repeat_penalty=1.3, seed=7, max_new_tokens=10, logprobs=0),
             SamplingParams(temperature=0.8, seed=1, max_new_tokens=10)]
    with_logprobs = generate_batch(llm.model, tok, prompts, asked)
    without = generate_batch(llm.model, tok, prompts, [SamplingParams(**{**p.__dict__, "logprobs": None}) for p in asked])
    assert [c.token_ids for c in with_logprobs] == [c.token_ids for c in without]
    assert with_logprobs[2].logprobs is None and with_logprobs[0].prompt_logprobs is None
    for prompt, completion, params in zip(prompts, with_logprobs[:2], asked):
        ids = [e.token_id for e in completion.logprobs]  # a stop token that ended the reply comes last
        assert completion.token_ids and ids[:len(completion.token_ids)] == completion.token_ids
        assert len(ids) == completion.completion_tokens
        rows = reference(llm, prompt + ids)[len(prompt) - 1:-1]
        assert_entries(completion.logprobs, ids, rows, params.logprobs)
    greedy = with_logprobs[0].logprobs
    assert all(e.token_id == e.top[0][0] for e in greedy)  # greedy takes the most likely


def test_prompt_logprobs_cross_prefill_chunks(llm):
    """A prompt fed in chunks of 4 (two prompts sharing each step's budget): every token after the
    first has its log-probability, the one at a chunk's edge too; the first has None."""
    tok = llm.tokenizer
    prompts = [tok.encode("from collections import OrderedDict, namedtuple"), tok.encode("x = 1 + y * 2 - z")]
    params = [SamplingParams(temperature=0, max_new_tokens=2, prompt_logprobs=2),
              SamplingParams(temperature=0, max_new_tokens=2, prompt_logprobs=0, logprobs=1)]
    chunks: dict[int, list] = {0: [], 1: []}
    engine = Engine(llm.model, tok, max_batch=2, max_queue=2, prefill_chunk=4, cuda_graphs=False)
    engine.submit(prompts, params, lambda i: chunks[i].append)
    while engine.busy:
        engine.step()
    for i, prompt in enumerate(prompts):
        assert len(prompt) > 4
        firsts = [c.prompt_logprobs for c in chunks[i] if c.prompt_logprobs is not None]
        assert len(firsts) == 1 and chunks[i][0].prompt_logprobs is firsts[0]  # on the first chunk only
        scored = firsts[0]
        assert len(scored) == len(prompt) and scored[0] is None
        assert_entries(scored[1:], prompt[1:], reference(llm, prompt)[:-1], params[i].prompt_logprobs)


def test_the_engine_process_gives_the_same_numbers(llm):
    tok = llm.tokenizer
    prompt = tok.encode("import email")
    params = SamplingParams(temperature=0, max_new_tokens=6, logprobs=2, prompt_logprobs=1)
    local = generate_batch(llm.model, tok, [prompt], params)[0]
    chunks = []
    with EngineProcess(llm.path, tok, llm.config, device="cpu", max_batch=2, max_queue=2) as engine:
        done = __import__("threading").Event()
        engine.submit([prompt], params, lambda i: lambda c: (chunks.append(c), c.finish_reason and done.set()))
        assert done.wait(60)
    remote = [e for c in chunks for e in c.logprobs]
    assert [e.token_id for e in remote] == local.token_ids
    assert [e.logprob for e in remote] == pytest.approx([e.logprob for e in local.logprobs], abs=1e-5)
    assert [e.top for e in remote][0][0][0] == local.logprobs[0].top[0][0]
    assert chunks[0].prompt_logprobs[0] is None
    assert [e.logprob for e in chunks[0].prompt_logprobs[1:]] == pytest.approx(
        [e.logprob for e in local.prompt_logprobs[1:]], abs=1e-5)


def test_llm_complete_returns_them_and_the_text_calls_refuse_them(llm):
    completion = llm.complete("import os", temperature=0, max_new_tokens=4, logprobs=1, prompt_logprobs=0)
    ids = llm.tokenizer.encode("import os")
    assert len(completion.prompt_logprobs) == len(ids) and completion.prompt_logprobs[0] is None
    assert completion.text == llm.generate("import os", temperature=0, max_new_tokens=4)
    assert len(completion.logprobs) == completion.completion_tokens
    assert [c.text for c in llm.complete("a", n=2, seed=3, max_new_tokens=4)] == llm.generate("a", n=2, seed=3,
                                                                                             max_new_tokens=4)
    for call in (lambda: llm.generate("a", logprobs=1), lambda: llm.chat([{"role": "user", "content": "a"}],
                                                                         prompt_logprobs=0)):
        with pytest.raises(Gpt1Error, match="llm.complete"):
            call()
    messages = [{"role": "user", "content": "Hello"}]
    reply = llm.chat_complete(messages, temperature=0, max_new_tokens=5, logprobs=2)
    assert reply.text == llm.chat(messages, temperature=0, max_new_tokens=5)
    assert len(reply.logprobs) == reply.completion_tokens and all(len(e.top) == 2 for e in reply.logprobs)
    assert [c.text for c in llm.chat_complete(messages, n=2, seed=4, max_new_tokens=3)] == llm.chat(
        messages, n=2, seed=4, max_new_tokens=3)
    with pytest.raises(Gpt1Error, match=r"logprobs must be None or an integer in \[0, 20\]"):
        llm.complete("a", logprobs=21)
    with pytest.raises(Gpt1Error, match="gpt1's is logprobs"):
        llm.complete("a", top_logprobs=2)


def test_chat_logprobs_with_the_openai_client_streamed_or_not(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    kwargs = dict(model="m", messages=[{"role": "user", "content": "Hello"}], temperature=0, max_tokens=12,
                  logprobs=True, top_logprobs=2)
    reply = client.chat.completions.create(**kwargs).choices[0]
    content = reply.logprobs.content
    text = content[:-1] if reply.finish_reason == "stop" else content  # the token that stopped it comes last
    assert content and b"".join(bytes(t.bytes) for t in text).decode("utf-8", "replace") == reply.message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob and t.logprob <= 0
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(**kwargs, stream=True)
                if c.choices and c.choices[0].logprobs is not None]
    assert [t.token for piece in streamed for t in piece.content] == [t.token for t in content]
    assert [t.logprob for piece in streamed for t in piece.content] == pytest.approx([t.logprob for t in content])
    plain = client.chat.completions.create(**{**kwargs, "logprobs": None, "top_logprobs": None}).choices[0]
    assert plain.logprobs is None and plain.message.content == reply.message.content


def test_completion_echo_and_logprobs_in_the_legacy_shape(url, llm):
    ids = llm.tokenizer.encode("import json")
    r = httpx.post(f"{url}/v1/completions", timeout=30, json={
        "prompt": ids, "echo": True, "logprobs": 2, "max_tokens": 3, "temperature": 0})
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    plain = httpx.post(f"{url}/v1/completions", timeout=30, json={"prompt": "import json", "max_tokens": 3,
                                                                  "temperature": 0}).json()["choices"][0]
    assert choice["text"] == "import json" + plain["text"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    tokens = lp["tokens"][:-1] if choice["finish_reason"] == "stop" else lp["tokens"]
    assert "".join(tokens) == choice["text"] and lp["text_offset"][0] == 0
    assert lp["text_offset"][len(ids)] == len("import json")
    rows = reference(llm, ids)
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx([rows[j - 1, ids[j]].item() for j in range(1, len(ids))],
                                                             abs=1e-4)
    assert all(len(top) == 2 for top in lp["top_logprobs"][1:])
    # Not echoed: the reply's tokens only, their offsets after the prompt (OpenAI's count).
    reply = httpx.post(f"{url}/v1/completions", timeout=30, json={
        "prompt": "import json", "logprobs": 0, "max_tokens": 3, "temperature": 0}).json()["choices"][0]
    assert reply["text"] == plain["text"] and reply["logprobs"]["text_offset"][0] == len("import json")
    assert reply["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"][len(ids):], abs=1e-5)
    assert reply["logprobs"]["top_logprobs"] == [{}] * len(reply["logprobs"]["tokens"])
    # Streamed, echo first: the same text and numbers.
    with httpx.stream("POST", f"{url}/v1/completions", timeout=30, json={
            "prompt": ids, "echo": True, "logprobs": 2, "max_tokens": 3, "temperature": 0, "stream": True}) as s:
        import json
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == choice["text"]
    assert [v for e in events for v in e["choices"][0]["logprobs"]["token_logprobs"]] == lp["token_logprobs"]


def test_lm_eval_harness_scores_through_the_server_as_on_the_model(url, llm, tiny_model_dir, tmp_path):
    """lm-eval-harness's own `local-completions` model (echo, logprobs: 1, its tokenizer from the HF
    export) against the server: the log-likelihoods of continuations are the model's, and whether
    each is greedy."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from gpt1.formats.hf import export_model

    export_model(tiny_model_dir, tmp_path / "hf")
    lm = LocalCompletionsAPI(base_url=f"{url}/v1/completions", tokenizer_backend="huggingface",
                             tokenizer=str(tmp_path / "hf"), model="m", max_length=64, max_retries=1)
    pairs = [("import json", "\nimport os"), ("def f(x):", " return x")]  # no trailing space: lm-eval moves it
    scores = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                              disable_tqdm=True)
    tok = llm.tokenizer
    for (context, continuation), (loglikelihood, greedy) in zip(pairs, scores):
        whole, ctx = tok.encode(context + continuation), tok.encode(context)  # as lm-eval's _encode_pair splits
        cont = whole[len(ctx):]
        rows = reference(llm, ctx + cont)
        expected = [rows[len(ctx) + j - 1, t] for j, t in enumerate(cont)]
        assert loglikelihood == pytest.approx(sum(v.item() for v in expected), abs=1e-3)
        assert greedy == all(rows[len(ctx) + j - 1].argmax().item() == t for j, t in enumerate(cont))
        assert math.isfinite(loglikelihood) and loglikelihood < 0


@pytest.mark.parametrize("body,param,message", [
    ({"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
    ({"messages": [{"role": "user", "content": "a"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs",
     "in [0, 20]"),
    ({"prompt": "a", "logprobs": -1}, "logprobs", "in [0, 20]"),
])
def test_out_of_range_counts_are_400s_that_name_the_field(url, body, param, message):
    path = "chat/completions" if "messages" in body else "completions"
    r = httpx.post(f"{url}/v1/{path}", json={**body, "max_tokens": 2}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == param and message in r.json()["error"]["message"]


def test_text_offsets_decode_the_bytes_in_order_streamed_or_not(url, llm):
    """A character split across tokens (byte-level BPE) counted each token's `bytes:\\xc3` name as
    14 characters, and a stream re-synced at each chunk: offsets past the text, going back."""
    prompt = "héllo wörld — “quotes” "
    body = {"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 12, "temperature": 0, "stop": [" h", "e"]}
    choice = httpx.post(f"{url}/v1/completions", timeout=30, json=body).json()["choices"][0]
    lp, text = choice["logprobs"], choice["text"]
    assert any(t.startswith("bytes:") for t in lp["tokens"])  # a character split across tokens
    offsets = lp["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0
    for token, offset in zip(lp["tokens"][:len(llm.tokenizer.encode(prompt))], offsets):
        if not token.startswith("bytes:"):  # a whole token's text is where its offset says
            assert text[offset:offset + len(token)] == token
    with httpx.stream("POST", f"{url}/v1/completions", timeout=30, json={**body, "stream": True}) as s:
        import json
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert [o for e in events for o in e["choices"][0]["logprobs"]["text_offset"]] == offsets
    # Not echoed: counted from the prompt's start all the same.
    reply = httpx.post(f"{url}/v1/completions", timeout=30, json={**body, "echo": False}).json()["choices"][0]
    assert reply["logprobs"]["text_offset"] == offsets[len(offsets) - len(reply["logprobs"]["text_offset"]):]


def test_a_request_cancelled_in_its_prefill_has_one_entry_per_prompt_token(llm):
    tok = llm.tokenizer
    prompt = tok.encode("from collections import OrderedDict, namedtuple, defaultdict")
    chunks = []
    engine = Engine(llm.model, tok, max_batch=1, max_queue=1, prefill_chunk=4, cuda_graphs=False)
    [request] = engine.submit([prompt], SamplingParams(temperature=0, max_new_tokens=4, prompt_logprobs=0),
                              lambda i: chunks.append)
    engine.step()  # its first 4 tokens
    request.cancel()
    while engine.busy:
        engine.step()
    [chunk] = chunks
    assert chunk.finish_reason == "cancelled" and len(chunk.prompt_logprobs) == len(prompt) == chunk.prompt_tokens
    # The 4 tokens fed scored the 4 after the first (the 4th's logits predict the 5th).
    assert chunk.prompt_logprobs[0] is None and all(e is not None for e in chunk.prompt_logprobs[1:5])
    assert chunk.prompt_logprobs[5:] == [None] * (len(prompt) - 5)


def test_max_new_tokens_0_scores_a_whole_context_of_prompt_and_samples_nothing(llm):
    """max_new_tokens=0 scores the prompt alone: a prompt of the whole context is scored whole
    (with 1 it loses its first token to the room kept for a reply), beside rows that generate."""
    tok, block = llm.tokenizer, llm.config.block_size
    ids = tok.encode("import json\nimport os\n" * 40)[:block]
    assert len(ids) == block
    scored = llm.complete(tok.decode(ids), max_new_tokens=0, prompt_logprobs=1)
    assert (scored.text, scored.token_ids, scored.finish_reason, scored.completion_tokens) == ("", [], "length", 0)
    assert scored.prompt_tokens == block and len(scored.prompt_logprobs) == block
    assert_entries(scored.prompt_logprobs[1:], ids[1:], reference(llm, ids)[:-1], 1)
    assert len(llm.complete(tok.decode(ids), max_new_tokens=1, prompt_logprobs=0).prompt_logprobs) == block - 1
    assert llm.generate("import json", max_new_tokens=0) == ""
    # In one engine with rows that generate, staggered: the same numbers, and the others' tokens unchanged.
    chunks: dict[int, list] = {0: [], 1: [], 2: []}
    engine = Engine(llm.model, tok, max_batch=3, max_queue=3, prefill_chunk=16, cuda_graphs=False)
    talk = SamplingParams(temperature=0, max_new_tokens=6)
    engine.submit([tok.encode("def f(x):")], talk, lambda i: chunks[0].append)
    engine.step()
    engine.submit([ids, tok.encode("class A:")], [SamplingParams(max_new_tokens=0, prompt_logprobs=1), talk],
                  lambda i: chunks[i + 1].append)
    while engine.busy:
        engine.step()
    [only] = chunks[1]
    assert (only.text, only.finish_reason, only.completion_tokens) == ("", "length", 0)
    assert [e.logprob for e in only.prompt_logprobs[1:]] == pytest.approx(
        [e.logprob for e in scored.prompt_logprobs[1:]], abs=1e-5)
    assert "".join(c.text for c in chunks[0]) == llm.generate("def f(x):", temperature=0, max_new_tokens=6)
    assert "".join(c.text for c in chunks[2]) == llm.generate("class A:", temperature=0, max_new_tokens=6)
    assert engine.free_slots == 3 and engine.stats.completed == 3
    # Its forwards are counted (gpt1_engine_steps_total): 4 prefill chunks of 16 for 64 tokens.
    alone = Engine(llm.model, tok, max_batch=1, max_queue=1, prefill_chunk=16, cuda_graphs=False)
    alone.submit([ids], SamplingParams(max_new_tokens=0, prompt_logprobs=0), lambda i: lambda chunk: None)
    while alone.busy:
        alone.step()
    assert (alone.stats.steps, alone.stats.completed, alone.stats.tokens) == (4, 1, 0)


def test_max_tokens_0_with_echo_scores_the_prompt_through_the_openai_client(url, llm):
    """OpenAI's legacy scoring request (old lm-eval's `gpt3` model, HELM): `echo`, `logprobs`,
    `max_tokens: 0`: the prompt back with its tokens' log-probabilities, nothing generated. A
    chat completion still needs at least 1 (it scores no prompt)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    prompt = "import json\nimport os"
    ids = llm.tokenizer.encode(prompt)
    reply = client.completions.create(model="m", prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    choice = reply.choices[0]
    assert (choice.text, choice.finish_reason) == (prompt, "length")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 0)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == prompt and lp.token_logprobs[0] is None
    rows = reference(llm, ids)
    assert lp.token_logprobs[1:] == pytest.approx([rows[j - 1, ids[j]].item() for j in range(1, len(ids))], abs=1e-4)
    streamed = list(client.completions.create(model="m", prompt=prompt, echo=True, logprobs=1, max_tokens=0,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == prompt
    assert [v for c in streamed for v in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs
    assert streamed[-1].choices[0].finish_reason == "length"
    assert client.completions.create(model="m", prompt=prompt, max_tokens=0).choices[0].text == ""
    whole = llm.tokenizer.encode("import json\nimport os\n" * 40)[:llm.config.block_size]  # the whole context
    scored = client.completions.create(model="m", prompt=whole, echo=True, logprobs=0, max_tokens=0).choices[0]
    assert len(scored.logprobs.token_logprobs) == len(whole) and scored.finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match=r"resulted in 64 tokens, which leaves no room for the completion "
                                                     r"\(max_tokens 0 scores a prompt of the whole context\)"):
        client.completions.create(model="m", prompt=whole, echo=True, logprobs=0, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match=r"resulted in 65 tokens, more than max_tokens 0 scores \(the "
                                                     r"whole context, 64 tokens\)"):
        client.completions.create(model="m", prompt=whole + whole[:1], echo=True, logprobs=0, max_tokens=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}], max_tokens=0)
    assert refused.value.body["param"] == "max_tokens" and "/v1/completions" in refused.value.body["message"]


def test_a_prompt_scored_alone_on_a_model_that_overflows_fails_as_a_sampled_one(llm):
    """A row that samples nothing met no finiteness check: NaN scores came back as a success (and
    as bare NaN, invalid JSON, in a stream)."""
    import copy

    from gpt1.inference.engine import GenerationFault

    broken = copy.deepcopy(llm.model)
    with torch.no_grad():
        broken.transformer.h[1].mlp.c_fc.weight.fill_(float("nan"))
    prompt = llm.tokenizer.encode("import json\nimport os")
    for max_new_tokens in (0, 1):
        with pytest.raises(GenerationFault, match="NaN or infinite"):
            generate_batch(broken, llm.tokenizer, [prompt], SamplingParams(max_new_tokens=max_new_tokens,
                                                                           prompt_logprobs=0))
