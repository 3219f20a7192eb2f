"""`gpt1 eval`: loss and perplexity on prepared shards or text files, checked by hand."""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt1.cli import main
from gpt1.core.tokenizer import train_tokenizer
from gpt1.data.shards import prepare
from gpt1.data.sources import iter_documents
from gpt1.train.evaluate import evaluate_data
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
