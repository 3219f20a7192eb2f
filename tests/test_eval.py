"""`gpt1 eval`: loss and perplexity on prepared shards or text files, checked by hand."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt1.cli import main
from gpt1.core.model import GPT
from gpt1.core.tokenizer import USER, train_tokenizer
from gpt1.data.shards import prepare
from gpt1.data.sources import iter_documents
from gpt1.formats.hf import export_model
from gpt1.formats.modeldir import save_model
from gpt1.train.evaluate import evaluate_data
from gpt1.train.harness import Scored, _metrics, evaluate_task
from gpt1.train.tasks import Document, Example, Request, get_task
from tests.task_files import hellaswag, write_jsonl
from tests.test_battery import assert_one_clear_line, run_main


@pytest.fixture(scope="module")
def data_dir(corpus_dir, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-shards")
    prepare([str(corpus_dir / "json")], tokenizer, out, val=2)
    return out


def _manual_loss(model_dir, tokens: np.ndarray, block: int) -> tuple[float, int]:
    """lm-eval's loglikelihood_rolling, computed directly: disjoint target windows of `block` tokens
    covering every token after the first; the last one ends at the last token and scores only the
    targets the window before did not."""
    import gpt1

    model = gpt1.load(model_dir, device="cpu").model
    total, scored = 0.0, 0
    with torch.no_grad():
        while scored < len(tokens) - 1:
            start = min(scored, len(tokens) - 1 - block)
            w = torch.as_tensor(tokens[start:start + block + 1].astype(np.int64))
            new = start + block - scored  # the last `new` targets of this window are not scored yet
            logits = model(w[None, :-1])[0]
            total += torch.nn.functional.cross_entropy(logits[-new:], w[1:][-new:], reduction="sum").item()
            scored += new
    return total / scored, scored


def test_eval_cli_on_val_shard(tiny_model_dir, data_dir, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data_dir), "--batch-size", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    tokens = np.fromfile(data_dir / "val.bin", dtype=np.uint16)
    loss, n = _manual_loss(tiny_model_dir, tokens, 64)
    assert result["tokens"] == n
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data_dir), "--max-batches", "1",
                 "--batch-size", "2", "--block-size", "16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("loss ") and "perplexity" in out and "(32 tokens of" in out


def test_eval_cli_on_text_files(tiny_model_dir, tokenizer, corpus_dir, capsys):
    files = [str(corpus_dir / "json" / "scanner.py"), str(corpus_dir / "json" / "tool.py")]
    assert main(["eval", "--model", str(tiny_model_dir), "--data", *files, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    ids = []
    for f in files:
        ids += tokenizer.encode(open(f, encoding="utf-8").read()) + [tokenizer.eos_id]
    loss, n = _manual_loss(tiny_model_dir, np.array(ids), 64)
    assert result["tokens"] == n and result["loss"] == pytest.approx(loss, rel=1e-5)
    # Bits per byte: the loss in bits over the text's bytes; [EOS] is no text, it counts zero bytes.
    predicted = ids[1:result["tokens"] + 1]
    text_bytes = len(tokenizer.id_to_bytes(t for t in predicted if t != tokenizer.eos_id))
    assert result["bytes"] == text_bytes
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["tokens"] / (math.log(2) * text_bytes))
    assert main(["eval", "--model", str(tiny_model_dir), "--data", *files]) == 0
    assert f"bits/byte {result['bits_per_byte']:.4f}" in capsys.readouterr().out


def test_eval_refuses_shards_of_another_tokenizer(tiny_model_dir, corpus_dir, tmp_path, capsys):
    other, _ = train_tokenizer(iter_documents([str(corpus_dir / "json")]), 300, show_progress=False)
    prepare([str(corpus_dir / "json")], other, tmp_path / "other", val=2)
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "other")]) == 2
    assert "tokenizer mismatch" in capsys.readouterr().err


def test_counts_must_be_whole_numbers_and_nothing_scored_is_an_error(tiny_model_dir, data_dir, capsys):
    """0 batches or a negative window scored nothing and printed NaN (invalid JSON) with exit 0;
    --batch-size 0 silently meant the default."""
    import gpt1
    from gpt1.core.errors import Gpt1Error

    for flag, value in (("--max-batches", "0"), ("--block-size", "-3"), ("--batch-size", "0"), ("--limit", "0")):
        assert_one_clear_line(*run_main(capsys, "eval", "--model", tiny_model_dir, "--data", data_dir, flag, value),
                              f"argument {flag}: expected a whole number >= 1, got {value}")
    for flag, value in (("--samples", "s.jsonl"), ("--fewshot", "2"), ("--limit", "5")):  # silently ignored before
        assert_one_clear_line(*run_main(capsys, "eval", "--model", tiny_model_dir, "--data", data_dir, flag, value),
                              f"{flag} applies to benchmarks \\(--task or --suite\\), not to perplexity")
    for names in ("", ",", " , "):  # "" fell back to perplexity mode; "," asked for no task at all
        assert_one_clear_line(*run_main(capsys, "eval", "--model", tiny_model_dir, "--data", data_dir, "--task", names),
                              r"--task: expected task names \(NAME\[,NAME...\]\) from: hellaswag, ")
    llm = gpt1.load(tiny_model_dir, device="cpu")
    with pytest.raises(Gpt1Error, match="max batches must be >= 1, got 8, 64, 0"):
        evaluate_data(llm, [str(data_dir)], max_batches=0)
    # One path alone, as a str or a Path: a lone string was iterated into one-character
    # sources ("q: no such file or directory").
    listed = evaluate_data(llm, [str(data_dir)], max_batches=2, show_progress=False)
    for alone in (str(data_dir), data_dir):
        assert evaluate_data(llm, alone, max_batches=2, show_progress=False).loss == listed.loss


def test_skip_invalid_skips_and_counts_bad_lines(tiny_model_dir, corpus_dir, tmp_path, capsys):
    text = (corpus_dir / "json" / "decoder.py").read_text(encoding="utf-8")
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": text}) + "\n{oops\n" + json.dumps({"text": text[:500]}) + "\n")
    assert_one_clear_line(*run_main(capsys, "eval", "--model", tiny_model_dir, "--data", data),
                          re.escape(f"{data}, line 2: invalid JSON") + r".*\(pass --skip-invalid to skip bad lines\)$")
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--skip-invalid", "--json"]) == 0
    captured = capsys.readouterr()
    reported = json.loads(captured.out)
    assert reported["skipped"] == 1 and reported["skipped_by_reason"] == {"malformed lines": 1}
    assert "skipped: 1 malformed lines" in captured.err
    # An entry of a folder that is not a file is counted as what it is (it read "1 invalid document(s)").
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_text(data.read_text().replace("{oops\n", ""))
    os.mkfifo(folder / "pipe.txt")
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(folder), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["skipped_by_reason"] == {"entries that are not regular files": 1}
    assert "skipped: 1 entries that are not regular files" in captured.err

    chat = tmp_path / "chat.jsonl"
    dialogs = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello there"}]}
               for i in range(30)]
    chat.write_text("".join(json.dumps(dialog) + "\n" for dialog in dialogs) + "{oops\n")
    assert_one_clear_line(*run_main(capsys, "eval", "--model", tiny_model_dir, "--data", chat, "--chat"),
                          r"line 31: invalid JSON.*\(pass --skip-invalid to skip bad lines\)$")
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(chat), "--chat", "--skip-invalid"]) == 0
    assert "skipped: 1 malformed lines" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(chat), "--chat", "--skip-invalid", "--json"]) == 0
    reported = json.loads(capsys.readouterr().out)  # "skipped" a count, as for text (it was the dict)
    assert reported["skipped"] == 1 and reported["skipped_by_reason"] == {"malformed lines": 1}
    # A trailing user turn is cut and its conversation still scored: not counted as skipped (it
    # was, so 43 of chatterbot's 101 conversations read as skipped when one was).
    dialogs[0]["messages"].append({"role": "user", "content": "and then?"})
    chat.write_text("".join(json.dumps(dialog) + "\n" for dialog in dialogs))
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(chat), "--chat", "--json"]) == 0
    captured = capsys.readouterr()
    reported = json.loads(captured.out)
    assert reported["skipped"] == 0 and reported["skipped_by_reason"] == {}
    assert reported["cut_by_reason"] == {"trailing user turns (no reply)": 1}
    assert "cut from the 30 conversations read (3 of them scored): 1 trailing user turns (no reply)" in captured.err


def test_split_is_refused_where_there_is_none(tiny_model_dir, tmp_path, capsys):
    """A local chat file has no splits: it was scored whole and labelled with the split asked for."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    assert_one_clear_line(*run_main(capsys, "eval", "--model", tiny_model_dir, "--data", chat, "--chat", "--split",
                                    "nosuch"), re.escape(f"{chat}: a local chat file has no splits (--split nosuch"))
    assert_one_clear_line(*run_main(capsys, "eval", "--model", tiny_model_dir, "--data", chat, "--split", "test"),
                          "--split applies to --chat sources only")


def _piqa_file(path):
    return write_jsonl(path, [{"goal": f"G{i}?", "sol1": "a", "sol2": "b", "label": i % 2} for i in range(2)])


def test_output_paths_are_checked_before_the_model_loads(tiny_model_dir, data_dir, tmp_path, capsys, monkeypatch):
    """A folder given as --samples/--json/--report was found only after all the scoring, and the
    results were lost. With no model there, the path is the error: nothing was loaded first."""
    import shutil

    import gpt1.train.harness as harness

    folder = tmp_path / "folder"
    folder.mkdir()
    piqa = _piqa_file(tmp_path / "piqa.jsonl")
    no_model = tmp_path / "no-model"
    task = ["eval", "--model", no_model, "--task", "piqa", "--data", piqa]
    for argv in ([*task, "--samples", folder], [*task, "--json", folder], [*task, "--report", folder],
                 ["eval", "--model", no_model, "--data", data_dir, "--json", folder]):
        assert_one_clear_line(*run_main(capsys, *argv), re.escape(f"{folder}: is a folder; expected the name of a file"))
    assert_one_clear_line(*run_main(capsys, *task, "--samples", f"{tmp_path}/x/"),
                          re.escape(f"{tmp_path}/x/: names a folder (a trailing /)"))
    # --suite's MODEL/report.md: checked once the model dir loaded, before any task is scored.
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model / "report.md").mkdir()
    monkeypatch.setattr(harness, "evaluate_task", lambda *a, **k: pytest.fail("scored before the path was checked"))
    assert_one_clear_line(*run_main(capsys, "eval", "--model", model, "--suite", "quick", "--data",
                                    *(f"{t}=hf:x" for t in ("hellaswag", "arc_easy", "piqa", "lambada_openai"))),
                          "report.md: is a folder; expected the name of a file to write")


def test_the_table_is_printed_before_the_files_are_written(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A write that fails anyway (a full disk) took the results with it: the table came last."""
    import gpt1.train.harness as harness
    from gpt1.core.errors import Gpt1Error

    def disk_full(path, results):
        raise Gpt1Error(f"{path}: no space left on device")

    monkeypatch.setattr(harness, "write_samples", disk_full)
    rc = main(["eval", "--model", str(tiny_model_dir), "--task", "piqa", "--data", str(_piqa_file(tmp_path / "p.jsonl")),
               "--samples", str(tmp_path / "s.jsonl")])
    captured = capsys.readouterr()
    assert_one_clear_line(rc, captured.err, "s.jsonl: no space left on device")
    assert "| piqa | 0 | acc |" in captured.out


def test_ppl_data_needs_the_report_and_is_read_before_the_tasks(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """--ppl-data without --report/--suite was silently ignored, even a path that does not exist."""
    import gpt1.train.harness as harness

    piqa = _piqa_file(tmp_path / "piqa.jsonl")
    task = ["eval", "--model", tiny_model_dir, "--task", "piqa", "--data", piqa, "--ppl-data", tmp_path / "nope"]
    assert_one_clear_line(*run_main(capsys, *task),
                          re.escape("--ppl-data applies with --report or --suite (it adds perplexity to the report)"))
    monkeypatch.setattr(harness, "evaluate_task", lambda *a, **k: pytest.fail("scored before --ppl-data was read"))
    assert_one_clear_line(*run_main(capsys, *task, "--report", tmp_path / "r.md"), "nope")
    assert not (tmp_path / "r.md").exists()


@pytest.mark.parametrize("batch_size", [1, 3])
def test_every_token_is_predicted_once_including_the_tail(tiny_model_dir, tokenizer, tmp_path, batch_size):
    """The tail after the last whole window was dropped: 361 tokens on a 128-token context scored 256.
    Now the last window ends at the last token (lm-eval's rolling windows) and scores only the new ones."""
    import gpt1

    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x * 2 + 1  # a comment\n" * 12)
    llm = gpt1.load(tiny_model_dir, device="cpu")
    ids = np.array(tokenizer.encode(text.read_text()) + [tokenizer.eos_id])
    block = 16
    assert (len(ids) - 1) % block, "the stream must end in a partial window"
    result = evaluate_data(llm, [str(text)], batch_size=batch_size, block_size=block, show_progress=False)
    loss, n = _manual_loss(tiny_model_dir, ids, block)
    assert result.tokens == n == len(ids) - 1
    assert result.loss == pytest.approx(loss, rel=1e-5)
    # Bits per byte over exactly the scored tokens' text: all of it but the first token's ([EOS] has none).
    assert result.bytes == len(tokenizer.id_to_bytes(int(t) for t in ids[1:] if t != tokenizer.eos_id))


def _overflowing_model(tiny_model_dir, tmp_path):
    """A model whose weights are finite but whose activations overflow fp16 (as a badly scaled one can)."""
    out = tmp_path / "big"
    shutil.copytree(tiny_model_dir, out)
    weights = load_file(out / "model.safetensors")
    weights["transformer.h.0.mlp.c_fc.weight"] *= 1e6
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_a_loss_that_is_not_finite_is_an_error_not_a_nan(tiny_model_dir, data_dir, tmp_path, capsys):
    """fp16 overflow printed `loss nan perplexity nan` with exit 0 and wrote NaN (not JSON) to --json."""
    big = _overflowing_model(tiny_model_dir, tmp_path)
    out = tmp_path / "out.json"
    assert_one_clear_line(*run_main(capsys, "eval", "--model", big, "--data", data_dir, "--precision", "fp16-mixed",
                                    "--json", out),
                          r"val\.bin: the loss of the model .*big is not finite \(nan\) in fp16-mixed "
                          r"\(float32 weights\).*try --precision bf16-mixed or fp32")
    assert not out.exists()
    chats = tmp_path / "chats.jsonl"  # --chat's assistant-token loss likewise
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hello {i}, how are you?"},
                                                      {"role": "assistant", "content": f"fine, thanks {i}."}]}) + "\n"
                             for i in range(20)))
    assert_one_clear_line(*run_main(capsys, "eval", "--model", big, "--data", chats, "--chat", "--precision", "fp16-mixed"),
                          r"chats\.jsonl \(held-out 5% of the conversations\): the assistant-token loss of the model "
                          r".*big is not finite \(nan\) in fp16-mixed")
    assert main(["eval", "--model", str(big), "--data", str(data_dir), "--max-batches", "1", "--json"]) == 0  # fp32: fine
    assert math.isfinite(json.loads(capsys.readouterr().out)["loss"])


def test_a_task_scored_from_log_likelihoods_that_are_not_finite_is_an_error(tiny_model_dir, tmp_path, capsys):
    """All-NaN logits scored hellaswag acc 0.25, chance level: a plausible number from nothing."""
    big = _overflowing_model(tiny_model_dir, tmp_path)
    docs = write_jsonl(tmp_path / "h.jsonl", [hellaswag(i) for i in range(4)])
    rc, err = run_main(capsys, "eval", "--model", big, "--task", "hellaswag", "--data", docs, "--precision", "fp16-mixed")
    assert_one_clear_line(rc, err, r"hellaswag: .*h\.jsonl, line \d: the log-likelihood of the model .*big is not finite "
                                   r"\(nan\) in fp16-mixed \(float32 weights\).*try --precision bf16-mixed or fp32")
    assert "| hellaswag |" not in capsys.readouterr().out


# `gpt1 eval` at its edges: a perplexity past the float range, text that spells special tokens, a
# source shorter than one context, an empty choice.

def _strict_json(text: str):
    """json.loads that refuses Infinity and NaN, as RFC 8259 parsers (JavaScript's JSON.parse) do."""
    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def _hellaswag(i: int, endings=None) -> dict:
    """A HellaSwag document short enough for the 64-token test model."""
    return {"activity_label": "Cooking", "ctx_a": "A cook", "ctx_b": "stirs",
            "endings": endings or ["the soup.", "a pot slowly.", "the rice now.", "and sits."], "label": str(i % 4)}


# ---- a perplexity past exp's range is capped, the other tasks' results kept, --json valid --------
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


# ---- special-token text is text in gpt1, a special token in the export's tokenizer: warned --------
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


# ---- a source shorter than one context is one shorter window ------------------------------------
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


# ---- an empty choice is a schema error naming file, line and field --------------------------------
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


# `gpt1 eval --data` on another preparation of the corpus.

def test_eval_on_another_preparation_of_the_corpus_says_it_is_not_held_out(data_dir, corpus_dir, tokenizer, tmp_path,
                                                                          caplog):
    """`gpt1 eval --data DIR` called any val.bin held out: the corpus prepared with another seed held
    out 16 documents, all 16 in the model's training data, and nothing said so."""
    import gpt1
    from gpt1.data.shards import prepare
    from gpt1.train.evaluate import evaluate_data
    from tests.test_train import _run

    _run(data_dir, tmp_path / "run", ["max_steps=1", "eval_batches=1"])
    other = tmp_path / "other"
    prepare([str(corpus_dir)], tokenizer, other, val=8, seed=7)
    llm = gpt1.load(tmp_path / "run", device="cpu")
    with caplog.at_level("INFO", logger="gpt1"):
        evaluate_data(llm, data_dir, show_progress=False, max_batches=1)  # the warning comes before the scoring
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    with caplog.at_level("INFO", logger="gpt1"):
        evaluate_data(llm, other, show_progress=False, max_batches=1)
    assert [r.message for r in caplog.records if r.levelname == "WARNING"] == [
        f"{other / 'val.bin'} is not the validation split {llm.path} was trained beside (its train_config.json "
        "records another one): its documents may be in the model's training data, so this is not a held-out score"]


# The counts `gpt1 eval --chat` gives for the conversations it scored.

def test_eval_chat_says_what_its_cut_counts_count(tiny_model_dir, tmp_path, capsys):
    """Without --split the cuts are counted as the data is read, the training share included: "cut
    from conversations still scored: 20" where one conversation was scored."""
    import json

    from gpt1.cli import main

    chat = tmp_path / "chat.jsonl"
    dialogs = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello there"}]
                + ([{"role": "user", "content": "and then?"}] if i % 2 else [])} for i in range(40)]
    chat.write_text("".join(json.dumps(dialog) + "\n" for dialog in dialogs))
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(chat), "--chat", "--json"]) == 0
    captured = capsys.readouterr()
    reported = json.loads(captured.out)
    assert reported["conversations_read"] == 40 and 0 < reported["conversations"] < 40
    assert reported["cut_by_reason"] == {"trailing user turns (no reply)": 20}
    assert (f"cut from the 40 conversations read ({reported['conversations']} of them scored): 20 trailing user "
            "turns (no reply)") in captured.err


# `eval --chat` of data too small to hold any out.

def test_eval_chat_of_data_too_small_to_hold_any_out_says_so(tmp_path, tiny_model_dir, capsys):
    """It blamed "filtering" ("the chat data is empty after filtering"): one conversation is
    one message tree, which a 5% val_fraction never holds out."""
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (tmp_path / "one.jsonl").write_text(json.dumps(chat) + "\n")
    assert_one_clear_line(*run_main(capsys, "eval", "--model", tiny_model_dir, "--chat", "--data", tmp_path / "one.jsonl"),
                          r"one.jsonl: nothing held out to evaluate: val_fraction 0.05 holds out whole message trees, "
                          r"and the data has 1 tree \(--chat scores the share fine-tuning holds out\); use more data, or a "
                          r"dataset with a validation split$")
