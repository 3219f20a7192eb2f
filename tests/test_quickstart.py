"""The main job end to end: `gpt1 quickstart` on its built-in data (tiny time budget), the
rerun that reuses every stage (the samples too, unless what they are made from changed), and the
notebook executed against the model it made."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gpt1
from gpt1.train.config import TrainConfig, load_config

MINUTES = "0.1"  # ~6 s of pretraining, ~1.5 s of fine-tuning: enough for the loss to fall (at 0.05 the
# fine-tune's validation loss did not fall in one CI run)

# The whole pipeline end to end (tens of seconds): the full suite, not the quick loop.
pytestmark = pytest.mark.slow


def _quickstart(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPT1_QUIET": "1"}
    return subprocess.run([sys.executable, "-m", "gpt1", "quickstart", "--out", str(out), "--minutes", MINUTES,
                           "--device", "cpu", *extra], capture_output=True, text=True, timeout=600, env=env)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "qs"
    first = _quickstart(out)
    assert first.returncode == 0, first.stderr[-3000:]
    return out, first


def test_every_stage_runs_and_reports(quickstart):
    out, run = quickstart
    summary = json.loads((out / "summary.json").read_text())
    # The tokenizer and the shards come from the standard library's own source.
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["train"]["tokens"] > 1_000_000 and summary["train_tokens"] == meta["train"]["tokens"]
    assert gpt1.Tokenizer.load(out / "tokenizer").vocab_size == 4096

    for stage in ("base", "chat"):
        records = _metrics(out / stage)
        losses = [r["loss"] for r in records if r.get("loss") is not None]
        val = [r["val_loss"] for r in records if r.get("val_loss") is not None]
        assert len(losses) == summary[f"{stage}_steps"] >= 2
        assert val and val[-1] < losses[0], f"{stage}: the loss did not fall"
        # Scored on the whole held-out split after training: close to the loop's last validation
        # (a sample of it), and in bits per byte below the 8 bits of a byte-level coin toss.
        assert math.isclose(math.log(summary[f"{stage}_val_perplexity"]), val[-1], rel_tol=0.1)
        assert 0 < summary[f"{stage}_val_bits_per_byte"] < 8
    assert summary["base_val_perplexity"] < 4096  # better than guessing uniformly
    # The training stages ran on time budgets, and their schedules ended with the budgets.
    budget = 60 * float(MINUTES)
    assert summary["planned"] == {"pretrain": pytest.approx(budget), "finetune": pytest.approx(budget / 4)}
    assert f"pretrain {summary['seconds']['pretrain']:.0f} s (planned {budget:.0f} s)" in run.stdout
    assert _metrics(out / "base")[-1]["lr"] == pytest.approx(load_config(TrainConfig, "tiny-cpu").min_lr, rel=0.05)

    base, chat = gpt1.load(out / "base", device="cpu"), gpt1.load(out / "chat", device="cpu")
    assert not base.is_chat_model and chat.is_chat_model
    assert base.model.num_params() == chat.model.num_params() == summary["base_parameters"] == 1_858_304  # tiny, vocab 4096
    assert "This is a tiny model (1.9M parameters" in run.stdout
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert [s["use"] for s in summary["samples"]] == ["qa", "creative", "code", "base"]
    assert {s["settings"]["temperature"] for s in summary["samples"]} == {0.7, 0.5, 0.2}
    for sample in summary["samples"][:3]:
        assert f"user: {sample['prompt']}" in run.stdout and f"assistant: {sample['text']}" in run.stdout
    assert f"base model  {out / 'base'}" in run.stdout and "held-out perplexity" in run.stdout and "bits per byte" in run.stdout
    for command in (f"gpt1 chat --model {out / 'chat'}", f"gpt1 serve --model {out / 'chat'}",
                    "gpt1 pretrain --config gpt1-openwebtext", "gpt1 finetune --config gpt1-oasst2-lora"):
        assert command in run.stdout
    for header in ("1/5 tokenizer", "2/5 prepare", "3/5 pretrain", "4/5 finetune", "5/5 samples"):
        assert header in run.stderr


def test_a_second_run_reuses_every_stage(quickstart, capsys):
    """In-process: what is reused, and said, is the command's work, not the interpreter's (a
    second process's startup is seconds of CPU)."""
    from gpt1.cli import main

    out, first = quickstart
    before = {stage: (out / stage / "metrics.jsonl").read_bytes() for stage in ("base", "chat")}
    summary = json.loads((out / "summary.json").read_text())
    # a new budget does not restart finished runs
    rc = main(["quickstart", "--out", str(out), "--minutes", MINUTES, "--device", "cpu", "--minutes", "3"])
    again = subprocess.CompletedProcess([], rc, *capsys.readouterr())
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing" in again.stderr and "already holds this prepared data" in again.stderr
    assert again.stderr.count("already finished") == 2
    # ... and says so, with what to do for the new budget.
    assert f"(continuing the {MINUTES}-min run in {out / 'base'}; for a 3-min one instead, delete that folder)" in again.stderr
    assert {stage: (out / stage / "metrics.jsonl").read_bytes() for stage in before} == before
    # Same models, held-out data and settings: the same scores and samples, taken from summary.json
    # (they took 11 s to make again under load), not generated: their stage keeps its first time.
    rerun = json.loads((out / "summary.json").read_text())
    made_by_samples = ("base_parameters", "base_val_perplexity", "base_val_bits_per_byte", "chat_val_perplexity",
                       "chat_val_bits_per_byte", "samples", "samples_inputs")
    assert {k: rerun[k] for k in made_by_samples} == {k: summary[k] for k in made_by_samples}
    assert "reusing the scores and samples in summary.json" in again.stderr
    # The reused stages keep the figures of the run that made them (the rerun's instant of reuse
    # replaced them: "pretrain 0 s"), and the printout says they were reused.
    stages = ("tokenizer", "prepare", "pretrain", "finetune", "samples")
    assert rerun["reused"] == list(stages)
    assert {s: rerun["seconds"][s] for s in (*stages[:2], "samples")} == {
        s: summary["seconds"][s] for s in (*stages[:2], "samples")}
    for stage in stages[2:4]:  # the budget its run spent (a reuse adds its instant)
        assert rerun["seconds"][stage] == pytest.approx(summary["seconds"][stage], abs=1.0)
    assert rerun["planned"] == summary["planned"] and rerun["ended_early"] == summary["ended_early"]
    assert f"pretrain reused (made in {summary['seconds']['pretrain']:.0f} s, planned " in again.stdout
    assert f"samples reused (made in {summary['seconds']['samples']:.0f} s))." in again.stdout
    for sample in summary["samples"][:3]:
        assert f"assistant: {sample['text']}" in again.stdout


def _rerun_copy(quickstart, tmp_path, capsys, change) -> tuple[dict, dict, str]:
    """The fixture's output copied, changed by `change(out)`, and quickstarted again in-process:
    (the summary before, the summary after, what the rerun said on stderr)."""
    from tests.test_battery import run_main

    out = tmp_path / "qs"
    shutil.copytree(quickstart[0], out)
    before = json.loads((out / "summary.json").read_text())
    change(out)
    rc, stderr = run_main(capsys, "quickstart", "--out", out, "--minutes", MINUTES, "--device", "cpu")
    assert rc == 0, stderr[-3000:]
    return before, json.loads((out / "summary.json").read_text()), stderr


def test_a_rerun_makes_the_scores_and_samples_again_for_a_changed_chat_model(quickstart, tmp_path, capsys):
    """The samples are reused only from the models they were made with: an adapter rewritten since
    (other weights, as a fine-tune's own rerun writes them) is scored and sampled again."""
    from safetensors.torch import load_file, save_file

    def rewrite_adapter(out: Path) -> None:
        file = out / "chat" / "adapter" / "adapter_model.safetensors"
        tensors = {name: t * 3 if ".lora_B." in name else t for name, t in load_file(file).items()}
        save_file(tensors, file, metadata={"format": "pt"})

    before, after, stderr = _rerun_copy(quickstart, tmp_path, capsys, rewrite_adapter)
    assert "summary.json's scores and samples were made with another chat model; making them again" in stderr
    assert "samples" not in after["reused"] and after["seconds"]["samples"] != before["seconds"]["samples"]
    assert after["chat_val_perplexity"] != before["chat_val_perplexity"]  # the new adapter's
    assert after["base_val_perplexity"] == pytest.approx(before["base_val_perplexity"], rel=1e-4)  # the same base's
    changed = {k for k in after["samples_inputs"] if after["samples_inputs"][k] != before["samples_inputs"][k]}
    assert changed == {"chat"}


def test_a_rerun_on_a_corrupt_summary_makes_the_scores_and_samples_again(quickstart, tmp_path, capsys):
    before, after, stderr = _rerun_copy(quickstart, tmp_path, capsys,
                                        lambda out: (out / "summary.json").write_text('{"samples": ['))
    assert "summary.json: invalid JSON at line 1" in stderr
    assert stderr.count("making the scores and samples again") == 1 and "Traceback" not in stderr
    assert "samples" not in after["reused"] and after["seconds"]["samples"] != before["seconds"]["samples"]
    assert after["samples"] == before["samples"] and after["samples_inputs"] == before["samples_inputs"]


def test_what_the_samples_are_made_from_names_every_setting_they_read(quickstart, monkeypatch):
    """What decides a reuse, without a run per case: the record summary.json keeps is today's for
    the same folder (the inputs are identified, not guessed), and another seed, prompt, gpt1 layout
    or a summary from before the record (an older gpt1's) is not reused. (A rerun with another
    --seed is refused earlier, by the data prepared with the first.)"""
    from gpt1 import quickstart as qs

    out, _ = quickstart
    summary = json.loads((out / "summary.json").read_text())
    cfg = qs.QuickstartConfig(out=str(out), minutes=float(MINUTES), device="cpu")
    inputs = qs.samples_inputs(cfg, out)
    assert inputs == summary["samples_inputs"]
    assert [s.text for s in qs._reusable_samples(summary, inputs)["samples"]] == [s["text"] for s in summary["samples"]]
    assert qs._reusable_samples({k: v for k, v in summary.items() if k != "samples_inputs"}, inputs) is None
    assert qs._reusable_samples({**summary, "samples": [{"use": "qa"}]}, inputs) is None  # not what gpt1 writes
    assert qs._reusable_samples({**summary, "chat_val_perplexity": "12"}, inputs) is None

    other_seed = qs.samples_inputs(qs.QuickstartConfig(out=str(out), minutes=0.1, device="cpu", seed=7), out)
    assert [k for k in inputs if other_seed[k] != inputs[k]] == ["samples"]
    monkeypatch.setitem(qs.SAMPLE_PROMPTS, "qa", "What is a network?")
    assert [k for k in inputs if qs.samples_inputs(cfg, out)[k] != inputs[k]] == ["samples"]
    monkeypatch.setattr(qs, "SAMPLES_LAYOUT", qs.SAMPLES_LAYOUT + 1)
    assert qs._reusable_samples(summary, qs.samples_inputs(cfg, out)) is None


def test_the_samples_of_another_gpt1_code_with_the_same_version_are_not_reused(quickstart, tmp_path, monkeypatch):
    """A checkout (or `pip install git+...`) of another commit is still gpt1 0.3.0: a rerun after
    `git pull` took the scores and samples the old decoding and scoring code made for this code's."""
    from gpt1 import quickstart as qs

    out, _ = quickstart
    summary = json.loads((out / "summary.json").read_text())
    cfg = qs.QuickstartConfig(out=str(out), minutes=float(MINUTES), device="cpu")
    other = tmp_path / "gpt1"  # the same version, one line of its sampling code changed
    shutil.copytree(Path(gpt1.__file__).parent, other, ignore=shutil.ignore_patterns("__pycache__"))
    with (other / "inference" / "sampling.py").open("a") as f:
        f.write("\n# a later commit\n")
    monkeypatch.setattr(qs, "LOADED_CODE", qs._code_fingerprint(other))  # a process that imported it
    inputs = qs.samples_inputs(cfg, out)
    assert [k for k in inputs if inputs[k] != summary["samples_inputs"][k]] == ["gpt1"]
    assert qs._reusable_samples(summary, inputs) is None


def test_a_changed_validation_split_of_the_chat_data_is_not_reused(quickstart, tmp_path):
    """Chat data with a validation split (here a folder of train.jsonl and validation.jsonl) is
    scored on that split: the record read only the train split, so an edited validation.jsonl kept
    the chat scores of the conversations it held before."""
    from gpt1 import quickstart as qs

    def write(file: Path, reply: str, n: int) -> None:
        file.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                                         {"role": "assistant", "content": f"{reply} {i}"}]}) + "\n"
                                for i in range(n)))

    chat_data = tmp_path / "dialogs"
    chat_data.mkdir()
    write(chat_data / "train.jsonl", "an answer", 20)
    write(chat_data / "validation.jsonl", "a held-out answer", 5)
    out, _ = quickstart
    cfg = qs.QuickstartConfig(out=str(out), minutes=float(MINUTES), device="cpu", chat_data=str(chat_data))
    before = qs.samples_inputs(cfg, out)
    write(chat_data / "validation.jsonl", "another held-out answer", 5)
    after = qs.samples_inputs(cfg, out)
    assert [k for k in after if after[k] != before[k]] == ["held_out"]


def test_a_stage_made_by_another_recipe_says_to_delete_it(quickstart, tmp_path, capsys):
    """After an upgrade changed the chat recipe (LoRA r 8 -> 32), a rerun said "rerun with the same
    config to resume it": advice for `gpt1 finetune` that a quickstart user cannot follow. (In-process:
    the refusal is the command's, not the interpreter's.)"""
    from tests.test_battery import run_main

    out = tmp_path / "qs"
    shutil.copytree(quickstart[0], out)
    recorded = json.loads((out / "chat" / "train_config.json").read_text())
    recorded["config"]["lora_r"] += 1  # as an earlier gpt1's recipe
    (out / "chat" / "train_config.json").write_text(json.dumps(recorded))
    rc, stderr = run_main(capsys, "quickstart", "--out", out, "--minutes", MINUTES, "--device", "cpu")
    assert rc == 2 and "Traceback" not in stderr
    assert stderr.rstrip().splitlines()[-1].endswith(
        f"made with another recipe or base (an earlier gpt1?): delete {out / 'chat'} to redo this stage")


def test_notebook_runs_top_to_bottom_on_the_quickstart_model(quickstart, monkeypatch, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    out, _ = quickstart
    notebook = nbformat.read(Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb", as_version=4)
    monkeypatch.setenv("GPT1_MODEL", str(out / "chat"))
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "1,858,304 parameters" in text and "chat model" in text
    for use in ("qa", "creative", "code"):
        assert f"--- {use}: temperature=" in text
    assert any("image/png" in o.get("data", {}) for o in outputs), "the training curves were not plotted"
    widgets = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widgets, "the knob sliders were not displayed"


def test_a_stage_that_finishes_its_epochs_before_its_budget_says_so(quickstart, data_dir, tmp_path):
    """A machine fast enough to finish a stage's epochs before its budget is spent ends it there;
    the printout says why it took less than planned (the budget-ended runs above say nothing)."""
    from gpt1.cli.quickstart_cmd import report
    from gpt1.quickstart import QuickstartResult, _reached_step_cap
    from gpt1.train.pretrain import pretrain

    out, run = quickstart
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ended_early"] == {} and "done after" not in run.stdout
    assert not _reached_step_cap(out / "base", summary["base_steps"])

    overrides = ["model=tiny", "n_layer=1", "block_size=32", "batch_size=2", "max_steps=5", "time_budget=600",
                 "eval_every=5", "save_every=5", "device=cpu"]
    finished = pretrain(load_config(TrainConfig, None, overrides), data_dir, tmp_path / "capped")
    assert finished.steps == 5 and _reached_step_cap(tmp_path / "capped", finished.steps)

    fields = {**summary, "out": out, "samples": [], "seconds": {"pretrain": 300.0, "finetune": 63.0},
              "planned": {"pretrain": 300.0, "finetune": 75.0}, "ended_early": {"finetune": "6 epochs of the dialogs"}, "reused": []}
    printed = report(QuickstartResult(**{k: fields[k] for k in QuickstartResult.__dataclass_fields__}))
    assert "pretrain 300 s (planned 300 s) + finetune 63 s (planned 75 s, done after 6 epochs of the dialogs)" in printed


def test_a_second_quickstart_on_the_same_out_is_refused_before_doing_anything(tmp_path, capsys):
    """Two quickstarts on one --out raced through the stages: one died with a traceback, the
    other said the data was missing ("rerun `gpt1 prepare`"). While one holds the folder, a
    second is refused at once, in one line."""
    from gpt1.core.io import exclusive
    from tests.test_battery import assert_one_clear_line, run_main

    out = tmp_path / "qs"
    with exclusive(out, "running the quickstart"):  # the first quickstart, still going
        result = run_main(capsys, "quickstart", "--out", out, "--minutes", MINUTES, "--device", "cpu")
        assert_one_clear_line(*result, rf"{out}: another thread of this process is running the quickstart there already")
    assert [p.name for p in out.iterdir()] == [".lock"]  # no stage started
