"""Regression guards for the numbers `gpt1 eval` reports and for what the exports carry: greedy
checks of continuations shorter than their batch's longest, acc_norm by characters, the HF
export's LayerNorm epsilon, and the GGUF end-of-turn token.

Each test here failed on a mutant of the line it guards (mutation testing, pass 13)."""

import dataclasses
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: everything here is local

import numpy as np
import pytest
import torch

import gpt1
from gpt1.core.tokenizer import USER
from gpt1.formats.hf import export_model
from gpt1.formats.modeldir import save_model
from gpt1.train.harness import Scorer, evaluate_task
from tests.model_factories import random_model

TEXT = "def parse(self, data):\n    return json.loads(data)\n"


def lm_eval_score(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """lm-eval HFLM's (loglikelihood, is_greedy) of one request, scored alone: the logits of
    context + continuation[:-1] at the continuation's positions; greedy when every argmax is
    the continuation's token (no padding in sight)."""
    with torch.no_grad():
        logits = model(torch.tensor([context + continuation[:-1]]))[0, -len(continuation):].log_softmax(-1)
    target = torch.tensor(continuation)
    return float(logits.gather(-1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all())


def greedy_tokens(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out]))[0, -1].argmax()))
    return out[len(ids):]


def test_a_greedy_continuation_shorter_than_its_batch_is_greedy(tiny_config, tokenizer):
    """LAMBADA's acc: continuations of 1, 2 and 4 tokens that are the model's own greedy text,
    scored in one batch beside a longer one that is not: each as lm-eval scores it alone."""
    model = random_model(tiny_config, seed=3, final_norm_scale=15.0)
    ids = tokenizer.encode(TEXT)
    pairs = [(ids[:n], greedy_tokens(model, ids[:n], k)) for n, k in ((5, 1), (9, 2), (12, 4))]
    wrong = greedy_tokens(model, ids[:7], 6)
    pairs.append((ids[:7], wrong[:-1] + [(wrong[-1] + 1) % tiny_config.vocab_size]))
    scored = Scorer(model, batch_size=8).score(pairs)
    expected = [lm_eval_score(model, c, k) for c, k in pairs]
    assert [e[1] for e in expected] == [True, True, True, False]
    assert [s.is_greedy for s in scored] == [e[1] for e in expected]
    assert [s.loglikelihood for s in scored] == pytest.approx([e[0] for e in expected], abs=1e-4)


ACCENTED = ["café crème", "naïve résumé", "über straße", "données été", "à la carte", "crème brûlée",
            "señor niño", "façade déjà"]


def test_acc_norm_divides_by_each_choice_s_length_in_characters(tiny_model_dir, tmp_path):
    """lm-eval: argmax(loglikelihood / len(choice)), len in characters. Choices with accents
    (two bytes each) beside ASCII ones of the same length tell characters from bytes."""
    rng = np.random.default_rng(1)
    docs = []
    for i in range(24):
        accented = ACCENTED[i % len(ACCENTED)]
        plain = "".join(rng.choice(list("qxzjvkwy"), len(accented)))
        docs.append({"goal": "Pick one:", "sol1": accented, "sol2": plain, "label": i % 2})
    source = tmp_path / "piqa.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")

    result = evaluate_task(gpt1.load(tiny_model_dir), "piqa", source=str(source), show_progress=False)
    assert result.n == len(docs)

    def acc_norm(length) -> float:
        hits = [np.argmax([r["loglikelihood"] / length(doc[f"sol{j + 1}"]) for j, r in enumerate(s["requests"])])
                == doc["label"] for s, doc in zip(result.samples, docs)]
        return float(np.mean(hits))

    by_chars, by_bytes = acc_norm(len), acc_norm(lambda c: len(c.encode()))
    assert by_chars != by_bytes  # the data tells the two apart
    assert result.metrics["acc_norm"][0] == pytest.approx(by_chars)


def test_an_hf_export_keeps_a_non_default_layer_norm_epsilon(tmp_path, tiny_config, tokenizer):
    """A model with norm_eps 1e-2 (as a GPT-2 checkpoint with another epsilon imports) gives
    gpt1's logits in transformers; with 1e-5 in the config they would be off."""
    from transformers import AutoModelForCausalLM

    model = random_model(dataclasses.replace(tiny_config, norm_eps=1e-2), seed=2)
    save_model(tmp_path / "model", model, tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(export_model(tmp_path / "model", tmp_path / "hf")).eval()
    assert hf.config.layer_norm_epsilon == 1e-2
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=1e-4)


def test_a_gguf_export_names_user_the_end_of_turn_token(chat_dir, tokenizer, tmp_path):
    """docs/gguf.md: llama.cpp ends a reply where the model starts the next user turn."""
    gguf = pytest.importorskip("gguf")
    from gpt1.formats.gguf import export_gguf

    reader = gguf.GGUFReader(export_gguf(chat_dir, tmp_path / "chat.gguf", "f32"))
    field = reader.fields.get("tokenizer.ggml.eot_token_id")
    assert field is not None and int(field.contents()) == tokenizer.token_to_id(USER)
