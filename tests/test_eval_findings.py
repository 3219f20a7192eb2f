"""`gpt1 eval` at its edges: a perplexity past the float range, text that spells special tokens,
a source shorter than one context, an empty choice (evaluation tester's findings F1-F4)."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt1.cli import main
from gpt1.core.model import GPT
from gpt1.core.tokenizer import USER
from gpt1.formats.hf import export_model
from gpt1.formats.modeldir import save_model
from gpt1.train.harness import Scored, _metrics, evaluate_task
from gpt1.train.tasks import Document, Example, Request, get_task
from tests.task_files import write_jsonl
from tests.test_battery import assert_one_clear_line, run_main


def _strict_json(text: str):
    """json.loads that refuses Infinity and NaN, as RFC 8259 parsers (JavaScript's JSON.parse) do."""
    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def _hellaswag(i: int, endings=None) -> dict:
    """A HellaSwag document short enough for the 64-token test model."""
    return {"activity_label": "Cooking", "ctx_a": "A cook", "ctx_b": "stirs",
            "endings": endings or ["the soup.", "a pot slowly.", "the rice now.", "and sits."], "label": str(i % 4)}


# ---- F1: a perplexity past exp's range is capped, the other tasks' results kept, --json valid --------
@pytest.fixture(scope="module")
def diverged_model_dir(tiny_config, tokenizer, tmp_path_factory) -> Path:
    """Finite weights whose logits are ~1e4 apart, like a model saved from a diverged run: every
    continuation token costs thousands of nats (finite, so not the not-finite error)."""
    torch.manual_seed(0)
    model = GPT(tiny_config)
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(1e4)
    return save_model(tmp_path_factory.mktemp("diverged"), model, tokenizer)


def test_a_lambada_perplexity_past_the_float_range_is_capped_and_json_stays_valid(diverged_model_dir, tmp_path,
                                                                                  capsys):
    """math.exp(-mean) overflowed: an OverflowError traceback, and HellaSwag's results, already
    scored, were lost with it; perplexity mode caps the exponent at 700 instead."""
    write_jsonl(tmp_path / "tasks" / "hellaswag.jsonl", [_hellaswag(i) for i in range(4)])
    write_jsonl(tmp_path / "tasks" / "lambada_openai.jsonl",
                [{"text": "the cat sat on the mat"}, {"text": "a dog ran into the garden"}, {"text": "we read a book"}])
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(diverged_model_dir), "--task", "hellaswag,lambada_openai",
                 "--data", str(tmp_path / "tasks"), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    results = _strict_json(out.read_text())
    assert results["hellaswag"]["n"] == 4 and results["lambada_openai"]["n"] == 3
    ppl = results["lambada_openai"]["metrics"]["perplexity"]
    assert ppl == {"value": math.exp(700), "stderr": None}  # the delta method means nothing here
    assert re.search(r"\| lambada_openai \| 0 \| perplexity \| \d{305}\.\d{4} \|  \| 3 \| 0 \|", table), table


def test_an_error_in_a_later_task_keeps_the_results_of_the_tasks_scored_before(tiny_model_dir, tmp_path, capsys):
    """Only "nothing scored" kept the other tasks' results; any other error (here a bad document in
    the second task's file, read after the first task was scored) lost them."""
    write_jsonl(tmp_path / "tasks" / "hellaswag.jsonl", [_hellaswag(i) for i in range(2)])
    bad = write_jsonl(tmp_path / "tasks" / "piqa.jsonl", [{"goal": "G?", "sol1": "a", "sol2": "b", "label": 5}])
    out = tmp_path / "r.json"
    rc, err = run_main(capsys, "eval", "--model", tiny_model_dir, "--task", "hellaswag,piqa", "--data",
                       tmp_path / "tasks", "--json", out)
    assert_one_clear_line(rc, err, re.escape(f"{bad}, line 1: field 'label' must be one of 0, 1"))
    assert list(_strict_json(out.read_text())) == ["hellaswag"]


def test_a_perplexity_just_below_the_overflow_has_no_infinite_stderr():
    """A mean log-likelihood of -705 gave a perplexity of ~1e306 and a delta-method stderr of inf,
    written to --json as `Infinity` (not JSON)."""
    task = get_task("lambada_openai")
    examples = [Example(Document({"text": f"x {i}"}, f"f.jsonl, line {i + 1}"), [Request("x", f" {i}")], None, [])
                for i in range(2)]
    scores = [[Scored(-700.0, False, 40)], [Scored(-710.0, False, 40)]]
    result = _metrics(task, examples, scores, 0, skipped=0)
    value, stderr = result.metrics["perplexity"]
    assert value == math.exp(700) and stderr is None
    assert _strict_json(json.dumps({"m": result.metrics}))
    # Below the cap the delta-method estimate is kept: ppl x stderr of the mean log-likelihood.
    result = _metrics(task, examples, [[Scored(-2.0, False, 1)], [Scored(-4.0, False, 1)]], 0, skipped=0)
    assert result.metrics["perplexity"] == pytest.approx((math.exp(3.0), math.exp(3.0) * 1.0))


# ---- F2: special-token text is text in gpt1, a special token in the export's tokenizer: warned --------
def test_text_spelling_a_special_token_is_warned_about_as_lm_eval_scores_it_differently(tiny_model_dir, tokenizer,
                                                                                       tmp_path, capsys):
    """transformers' tokenizer of the export (lm-eval's HFLM) turns "<|user|>" in text into the
    special token; gpt1 encodes it as text (by design), so such an example's score differs."""
    from transformers import AutoTokenizer

    export = export_model(tiny_model_dir, tmp_path / "hf")
    hf_ids = AutoTokenizer.from_pretrained(export).encode(f"say {USER} now", add_special_tokens=False)
    assert tokenizer.special_id(USER) in hf_ids
    assert tokenizer.special_id(USER) not in tokenizer.encode(f"say {USER} now")

    data = write_jsonl(tmp_path / "lambada.jsonl", [{"text": "the cat sat on the mat"},
                                                    {"text": f"then she said {USER} now"},
                                                    {"text": "the token is [EOS] here"}])
    rc, err = run_main(capsys, "eval", "--model", tiny_model_dir, "--task", "lambada_openai", "--data", data)
    assert rc == 0, err
    warning = re.escape(f"lambada_openai: 2 example(s) spell special tokens as text ({USER}, [EOS]; "
                        f"the first: {data}, line 2); gpt1 scores that text as text")
    assert re.search(warning, err), err
    assert run_main(capsys, "eval", "--model", tiny_model_dir, "--task", "hellaswag", "--data",
                    write_jsonl(tmp_path / "hs.jsonl", [_hellaswag(i) for i in range(2)]))[0] == 0
    assert "special tokens" not in capsys.readouterr().err  # plain text: no warning


# ---- F3: a source shorter than one context is one shorter window ------------------------------------
def test_a_source_shorter_than_one_context_is_scored_in_one_window(tiny_model_dir, tokenizer, tmp_path, capsys):
    """It was refused ("fewer than one context window"); lm-eval's get_rolling_token_windows scores
    it in one window as long as the document. Checked against transformers on the export."""
    from transformers import AutoModelForCausalLM

    source = tmp_path / "short.py"
    source.write_text("def f(x):\n    return x + 1\n", encoding="utf-8")
    ids = tokenizer.encode(source.read_text(encoding="utf-8")) + [tokenizer.eos_id]
    assert len(ids) < 64  # the test model's context
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(source), "--json"]) == 0
    result = _strict_json(capsys.readouterr().out)
    hf = AutoModelForCausalLM.from_pretrained(export_model(tiny_model_dir, tmp_path / "hf")).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, :-1]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()
    assert result["tokens"] == len(ids) - 1 and result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)

    (tmp_path / "empty.txt").write_text("")
    assert_one_clear_line(*run_main(capsys, "eval", "--model", tiny_model_dir, "--data", tmp_path / "empty.txt"),
                          "empty.txt: 0 token\\(s\\), nothing to predict")
    (tmp_path / "a.txt").write_text("a")  # "a" [EOS]: only the [EOS] is predicted, bits per byte would be NaN
    assert_one_clear_line(*run_main(capsys, "eval", "--model", tiny_model_dir, "--data", tmp_path / "a.txt", "--json"),
                          "a.txt: the 1 token\\(s\\) predicted are special tokens with no text")


# ---- F4: an empty choice is a schema error naming file, line and field --------------------------------
EMPTY_CHOICES = [
    ("arc_easy", {"question": "Q?", "choices": {"text": ["a", ""], "label": ["A", "B"]}, "answerKey": "A"},
     "field 'choices' must be .*no text empty, got "),
    ("hellaswag", _hellaswag(0, endings=["a.", "", "c.", "d."]), "field 'endings' must be a list of 4 non-empty strings"),
    ("piqa", {"goal": "G?", "sol1": "a", "sol2": "", "label": 0}, "field 'sol2' must be a non-empty string, got \"\""),
    ("winogrande", {"sentence": "_ is here", "option1": "", "option2": "b", "answer": "1"},
     "field 'option1' must be a non-empty string"),
]


@pytest.mark.parametrize("task,doc,message", EMPTY_CHOICES, ids=[t for t, _, _ in EMPTY_CHOICES])
def test_an_empty_choice_names_file_line_and_field(tiny_model_dir, tmp_path, capsys, task, doc, message):
    """acc_norm divided by len("") == 0 (a numpy RuntimeWarning on stderr); lm-eval crashes on an
    empty choice in its first document and scores one elsewhere as -inf."""
    good = {"arc_easy": {"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"},
            "hellaswag": _hellaswag(1),
            "piqa": {"goal": "G?", "sol1": "a", "sol2": "b", "label": 1},
            "winogrande": {"sentence": "a _ b", "option1": "x", "option2": "y", "answer": "2"}}[task]
    data = write_jsonl(tmp_path / f"{task}.jsonl", [good, doc])
    assert_one_clear_line(*run_main(capsys, "eval", "--model", tiny_model_dir, "--task", task, "--data", data),
                          re.escape(f"{data}, line 2: ") + message)


def test_a_hellaswag_ending_emptied_by_its_cleaning_is_never_chosen_by_acc_norm(tiny_model_dir, tmp_path):
    """"[header]" is a non-empty ending that lm-eval's cleaning empties; lm-eval divides its score
    by 0 too (-inf, never chosen). No numpy warning reaches the user."""
    import gpt1

    data = write_jsonl(tmp_path / "hs.jsonl", [_hellaswag(i, endings=["[header]", "a pot.", "the rice.", "x."])
                                               for i in range(4)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning fails the test
        result = evaluate_task(gpt1.load(tiny_model_dir, device="cpu"), "hellaswag", source=str(data),
                               show_progress=False)
    assert result.n == 4
    for sample in result.samples:
        assert sample["requests"][0]["continuation"] == " "
        lls = np.array([r["loglikelihood"] for r in sample["requests"][1:]])
        lengths = np.array([len(r["continuation"]) - 1 for r in sample["requests"][1:]])
        assert sample["acc_norm"] == float(1 + int(np.argmax(lls / lengths)) == sample["gold"])


def test_a_precision_name_it_does_not_know_is_refused_not_run_as_bf16(tiny_model_dir, tmp_path):
    """autocast() took any name but fp32/fp16-mixed for bf16: the library's evaluate_data and
    Scorer ran `precision="fp16"` (a typo) in bf16 and reported it as fp16."""
    import gpt1
    from gpt1.core.errors import Gpt1Error
    from gpt1.train.evaluate import evaluate_data
    from gpt1.train.harness import Scorer

    llm = gpt1.load(tiny_model_dir, device="cpu")
    text = tmp_path / "t.txt"
    text.write_text("one two three four five six seven eight nine ten\n" * 4)
    with pytest.raises(Gpt1Error, match=r"precision must be one of fp32, fp16-mixed, bf16-mixed, got 'fp16'"):
        evaluate_data(llm, str(text), precision="fp16", show_progress=False)
    with pytest.raises(Gpt1Error, match=r"got 'bf16'"):
        Scorer(llm.model, precision="bf16")
    assert evaluate_data(llm, str(text), precision="bf16-mixed", show_progress=False).loss > 0
