"""`gpt1 eval` against lm-eval-harness where they parted: per-document rolling
log-likelihood (`--per-document`, lm-eval's wikitext-style metrics) and prompts longer than the
context (cut from the left as lm-eval's HFLM cuts them, no longer skipped).

The reference is the real `lm-eval` package run offline on the `gpt1 export` of the test model.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from gpt1.cli import main
from gpt1.formats.hf import export_model
from tests.task_files import SCHEMAS, piqa, write_jsonl, write_task_folders
from tests.test_battery import assert_one_clear_line, run_main

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def export_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return export_model(tiny_model_dir, tmp_path_factory.mktemp("pass22") / "hf")


@pytest.fixture(scope="module")
def hflm(export_dir):
    """lm-eval's HF model on the export (a 64-token context, as gpt1's model dir)."""
    os.environ.update(OFFLINE)
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(export_dir), dtype="float32", device="cpu", batch_size=8)
    assert lm.max_length == 64
    return lm


def _documents(tokenizer) -> list[str]:
    """One-line documents, whitespace at either end, non-ASCII text, an empty document, and the
    start of a source file cut to one context's length, one token either side of it, two contexts
    + 1 (a one-token tail) and three + 10 tokens."""
    ids = tokenizer.encode((Path(json.__file__).parent / "decoder.py").read_text(encoding="utf-8"))
    cut = [tokenizer.decode(ids[:n]) for n in (63, 64, 65, 129, 202)]
    assert [len(tokenizer.encode(text)) for text in cut] == [63, 64, 65, 129, 202]
    return ["x = 1", "  def f(a, b):\n    return a + b\n", "café naïve résumé — ok", "", "\treturn None  ",
            "import os\n\nimport sys", *cut, "one\n\ntwo  three"]


def test_per_document_gives_lm_eval_loglikelihood_rolling_metrics(tiny_model_dir, tokenizer, hflm, tmp_path, capsys):
    """The stream (one [EOS] after each document, each seeing the documents before) gave other
    bits per byte than lm-eval's wikitext-style tasks on the same documents; --per-document gives
    lm-eval's word_perplexity, byte_perplexity and bits_per_byte, computed here with lm-eval's own
    code: HFLM.loglikelihood_rolling per document, its count_words / count_bytes and aggregations."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.metrics import bits_per_byte, weighted_perplexity
    from lm_eval.api.task import ConfigurableTask

    docs = _documents(tokenizer)
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    requests = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    lls = hflm.loglikelihood_rolling(requests, disable_tqdm=True)
    words = [(ll, ConfigurableTask.count_words(d)) for ll, d in zip(lls, docs)]
    n_bytes = [(ll, ConfigurableTask.count_bytes(d)) for ll, d in zip(lls, docs)]
    expected = {"word_perplexity": weighted_perplexity(words), "byte_perplexity": weighted_perplexity(n_bytes),
                "bits_per_byte": bits_per_byte(n_bytes)}

    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--per-document", "--batch-size", "3",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for metric, value in expected.items():
        assert result[metric] == pytest.approx(value, rel=1e-4), metric
    assert result["documents"] == len(docs) - 1 and result["skipped_by_reason"] == {"empty documents": 1}
    assert result["words"] == sum(w for _, w in words) and result["bytes"] == sum(b for _, b in n_bytes)
    assert result["tokens"] == sum(len(tokenizer.encode(d)) for d in docs)  # every token once, no [EOS] target
    assert -result["loss"] * result["tokens"] == pytest.approx(sum(lls), rel=1e-4)

    # The default is still the one stream, whose number differs (cross-document context, [EOS] targets).
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--json"]) == 0
    stream = json.loads(capsys.readouterr().out)
    assert stream["tokens"] == result["tokens"] + result["documents"] - 1 and "word_perplexity" not in stream
    assert abs(stream["bits_per_byte"] - result["bits_per_byte"]) > 1e-3

    # The batch size only groups the windows: the same sums (float rounding aside).
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--per-document", "--batch-size", "16"]) == 0
    line = capsys.readouterr().out
    assert f"bits/byte {result['bits_per_byte']:.4f}" in line and f"of {len(docs) - 1} documents, each scored alone" in line


@pytest.mark.parametrize("argv, message", [
    (["--data", "{data_dir}", "--per-document"], "is a prepared data dir; per-document scoring .* reads text sources"),
    (["--data", "{docs}", "--per-document", "--max-batches", "1"], "max batches \\(--max-batches\\) cuts one stream"),
    (["--data", "{docs}", "--per-document", "--chat"], "--per-document applies to text sources, not to --chat"),
    (["--task", "piqa", "--data", "{docs}", "--per-document"], "--per-document applies to perplexity"),
])
def test_per_document_refuses_what_it_cannot_score_as_lm_eval(tiny_model_dir, data_dir, tmp_path, capsys, argv, message):
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": "x = 1"}])
    argv = [a.format(data_dir=data_dir, docs=docs) for a in argv]
    assert_one_clear_line(*run_main(capsys, "eval", "--model", tiny_model_dir, *argv), message)


def test_a_prompt_longer_than_the_context_is_cut_from_the_left_as_lm_eval_cuts_it(tiny_model_dir, hflm, tmp_path,
                                                                                 capsys):
    """Such examples were skipped (a 128-token model: 3-shot PIQA scored 1 of 14 examples, lm-eval
    14); now every request's log-likelihood, greedy flag and the accuracy are lm-eval's HFLM's on
    the export, which cuts (context + continuation)[-(max_length + 1):]."""
    from lm_eval.api.instance import Instance

    root = tmp_path / "tasks"
    write_task_folders(root, {"piqa": SCHEMAS["piqa"]})
    long = {**piqa(7), "goal": "How can the teacher open the door of the old house on the hill faster, " * 3 + "today?"}
    short = piqa(3)
    write_jsonl(root / "piqa" / "validation.jsonl", [long, short])
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "piqa", "--data", f"piqa={root / 'piqa'}",
                 "--fewshot", "2", "--samples", str(tmp_path / "s.jsonl"), "--json", str(tmp_path / "r.json")]) == 0
    captured = capsys.readouterr()
    samples = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    result = json.loads((tmp_path / "r.json").read_text())["piqa"]
    assert result["n"] == 2 and result["skipped"] == 0 and result["truncated"] == 2
    assert "2 example(s) were longer than the model's context (64 tokens): their prompts were cut from the left" \
        in captured.err
    assert "| piqa | 2 | acc |" in captured.out

    requests = [r for s in samples for r in s["requests"]]
    assert all(r["context_tokens_cut"] > 0 for r in requests)
    reference = hflm.loglikelihood([Instance("loglikelihood", {}, (r["context"], r["continuation"]), i)
                                    for i, r in enumerate(requests)], disable_tqdm=True)
    for request, (ll, greedy) in zip(requests, reference):
        assert request["loglikelihood"] == pytest.approx(ll, abs=1e-4) and request["is_greedy"] == greedy
    lls = [ll for ll, _ in reference]  # two choices per example, in the samples' order
    acc = [float(lls[2 * k:2 * k + 2].index(max(lls[2 * k:2 * k + 2])) == s["gold"]) for k, s in enumerate(samples)]
    assert result["metrics"]["acc"]["value"] == pytest.approx(sum(acc) / len(acc))


def test_an_answer_longer_than_the_context_is_skipped_and_said_so(tiny_model_dir, tokenizer, tmp_path, capsys):
    """A continuation of more tokens than the context leaves no context to cut down to; lm-eval's
    HFLM stops on its assertion there. gpt1 skips and counts the example; a long prompt with a
    short answer is scored (it was skipped with it)."""
    word = "\u2603" * 40  # 40 snowmen: no merge of the test tokenizer joins them
    assert len(tokenizer.encode(" " + word)) > 64
    long_prompt = {"text": " ".join(["the old dog walks along the river"] * 30)}
    data = write_jsonl(tmp_path / "lambada.jsonl", [{"text": f"the cat sat on {word}"}, long_prompt,
                                                   {"text": "the cat sat on the mat"}])
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "lambada_openai", "--data", str(data),
                 "--json", str(tmp_path / "r.json")]) == 0
    err = capsys.readouterr().err
    result = json.loads((tmp_path / "r.json").read_text())["lambada_openai"]
    assert (result["n"], result["truncated"], result["skipped"]) == (2, 1, 1)
    assert "1 example(s) have an answer longer than the model's context (64 tokens) and were skipped (lm-eval stops" \
        in err
    assert math.isfinite(result["metrics"]["perplexity"]["value"])

    only_long = write_jsonl(tmp_path / "only.jsonl", [{"text": f"the cat sat on {word}"}])
    assert_one_clear_line(*run_main(capsys, "eval", "--model", tiny_model_dir, "--task", "lambada_openai", "--data",
                                    only_long),
                          "lambada_openai: nothing scored: all 1 examples have an answer \\(continuation\\) longer than "
                          "the model's context of 64 tokens")
