"""Bad input, seventh round: folders that are not model dirs where a model is loaded, empty
path arguments, paths that are not paths in the Python API, device names no machine has.
Same style as tests/test_battery.py: `gpt1.cli.main` in-process, one clear line on stderr."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading

import pytest

import gpt1
from gpt1.core.errors import Gpt1Error
from gpt1.core.tokenizer import train_tokenizer
from gpt1.train.config import TrainConfig
from gpt1.train.finetune import FinetuneConfig, finetune
from gpt1.train.pretrain import pretrain
from tests.test_battery import assert_one_clear_line, run_main
from tests.test_chat_cli import in_terminal


def test_loading_a_folder_that_is_not_a_model_dir_says_what_it_is(tmp_path, tiny_model_dir, data_dir, capsys):
    """generate/chat/serve/eval/gpt1.load said "config.json: file not found" (only `info` explained)."""
    quickstart = tmp_path / "qs"
    for name in ("base", "chat"):
        shutil.copytree(tiny_model_dir, quickstart / name)
    for argv in (["generate", "--prompt", "x"], ["chat"], ["serve"]):
        assert_one_clear_line(*run_main(capsys, *argv, "--model", data_dir),
                              rf"{data_dir}: a prepared data dir, not a model dir; `gpt1 pretrain --data {data_dir} --out RUN`")
    assert_one_clear_line(*run_main(capsys, "eval", "--model", quickstart, "--data", data_dir),
                          rf"qs: not a model dir; it holds the model dirs base/, chat/: try {quickstart}/chat$")
    with pytest.raises(Gpt1Error, match=r"qs: not a model dir; it holds the model dirs base/, chat/"):
        gpt1.load(quickstart)


@pytest.mark.parametrize("argv, flag", [
    (["pretrain", "--data", "DATA", "--out", ""], "--out"),
    (["pretrain", "--data", "", "--out", "OUT"], "--data"),
    (["finetune", "--base", "MODEL", "--out", ""], "--out"),
    (["eval", "--model", "MODEL", "--data", "DATA", "--json="], "--json"),
    (["eval", "--model", "", "--data", "DATA"], "--model"),
    (["generate", "--model", "", "--prompt", "x"], "--model"),
    (["export", "--model", "MODEL", "--out", ""], "--out"),
    (["plot", "OUT", "--out", ""], "--out"),
    (["quickstart", "--out", ""], "--out"),
])
def test_an_empty_path_is_refused_by_its_flag(argv, flag, tmp_path, tiny_model_dir, data_dir, capsys, monkeypatch):
    """`--out "$DIR"` with DIR unset trained into the current folder (Path("") is "."), and
    `eval --json=` printed instead of writing, without a word."""
    monkeypatch.chdir(tmp_path)
    argv = [{"DATA": data_dir, "MODEL": tiny_model_dir, "OUT": tmp_path / "run"}.get(a, a) for a in argv]
    assert_one_clear_line(*run_main(capsys, *argv),
                          rf"argument {flag}: expected a path, got an empty one \(an unset shell variable\?\)")
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran


def test_the_python_api_names_a_path_argument_that_is_not_one(tmp_path, data_dir, tiny_model_dir):
    """pretrain(cfg, None, out) was a TypeError about "argument should be a str"."""
    cfg = TrainConfig(max_steps=1, device="cpu")
    with pytest.raises(Gpt1Error, match=r"^data_dir: expected a prepared data dir \(a str or Path\), got NoneType$"):
        pretrain(cfg, None, tmp_path / "run")
    with pytest.raises(Gpt1Error, match=r"^out: expected a run dir \(a str or Path\), got int$"):
        pretrain(cfg, data_dir, 3)
    with pytest.raises(Gpt1Error, match=r"^base: expected a model dir \(a str or Path\), got NoneType$"):
        finetune(FinetuneConfig(max_steps=1), None, tmp_path / "ft")
    assert not (tmp_path / "run").exists() and not (tmp_path / "ft").exists()


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "meta", "tpu"])
def test_a_device_no_machine_has_is_refused_as_the_config_is_built(device, tmp_path, data_dir, capsys):
    """TrainConfig(device="gpu") was accepted and refused only once the run started."""
    with pytest.raises(Gpt1Error, match=rf"^device: unknown device '{device}'; expected auto, cpu, cuda, cuda:N or mps$"):
        TrainConfig(device=device)
    assert_one_clear_line(*run_main(capsys, "pretrain", "--data", data_dir, "--out", tmp_path / "run", f"device={device}"),
                          "unknown device")
    assert not (tmp_path / "run").exists()


def test_a_device_this_machine_lacks_is_still_a_valid_recipe():
    """A recipe may be written on a laptop for a GPU box: only the run checks the machine."""
    assert TrainConfig(device="cuda:1").device == "cuda:1"
    assert FinetuneConfig(device="mps").device == "mps"


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C as an interactive Python has it: a job a shell starts in the background (`cmd &`)
    inherits SIGINT ignored, and Python then installs no KeyboardInterrupt for it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_bpe_training_answers_ctrl_c_while_the_merges_run(ctrl_c_raises):
    """Ctrl-C during the BPE merges (Rust, on the main thread) waited for the whole training,
    which then finished and wrote its tokenizer; now it interrupts while they still run."""
    rng = random.Random(0)  # 100,000 distinct words, each twice: ~0.2 s of reading, ~2.5 s of merges
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(6, 12))) for _ in range(100_000)]
    docs = [" ".join(words[i:i + 100]) for i in range(0, len(words), 100)] * 2

    def texts():
        yield from docs
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()  # once the merges begin

    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(texts(), 20_000, show_progress=False)
    assert any(t.name == "bpe-training" and t.is_alive() for t in threading.enumerate())


def test_chat_data_whose_prompts_all_fill_the_context_says_so(tmp_path, tiny_model_dir, capsys):
    """It said "the chat data is empty after filtering" (pointing at languages or deleted
    messages), the counts that named the cause printed only after the check."""
    long = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    (tmp_path / "long.jsonl").write_text("\n".join(json.dumps(long) for _ in range(5)) + "\n")
    assert_one_clear_line(*run_main(capsys, "finetune", "--base", tiny_model_dir, "--data", tmp_path / "long.jsonl",
                                    "--out", tmp_path / "ft", "max_steps=1"),
                          r"no training sequences: exchanges dropped \(the prompt alone fills the context\): 5$")


def test_a_lora_rank_above_the_models_width_is_refused(tmp_path, tiny_model_dir, capsys):
    """lora_r=100000 on a 128-wide model trained 99.8% of 923M parameters and wrote 15 GB."""
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    assert_one_clear_line(*run_main(capsys, "finetune", "--base", tiny_model_dir, "--data", tmp_path / "chat.jsonl",
                                    "--out", tmp_path / "ft", "max_steps=1", "lora_r=65"),
                          r"LoRA rank r=65 is larger than this model's width \(n_embd 64\): .* use r <= 64$")
    assert not (tmp_path / "ft").exists()


def test_an_interrupted_bpe_training_stops_reading_its_input(ctrl_c_raises):
    """In a notebook the abandoned training went on reading the caller's iterator to its end
    (and each retry added another such thread): it now gets no more text, so it ends soon."""
    consumed = [0]

    def texts():
        rng = random.Random(0)
        for i in range(10**6):
            consumed[0] = i
            if i == 2_000:
                os.kill(os.getpid(), signal.SIGINT)
            yield " ".join("".join(rng.choices("abcdefgh", k=6)) for _ in range(20))

    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(texts(), 1_000, show_progress=False)
    for thread in threading.enumerate():
        if thread.name == "bpe-training":
            thread.join(60)  # the merges on what was read: seconds
            assert not thread.is_alive()
    assert consumed[0] < 10_000


def test_gpt1_quiet_silences_the_bpe_progress_bar_on_a_terminal(corpus_dir, tmp_path, monkeypatch):
    """The Rust trainer's bar (drawn on a terminal) ignored GPT1_QUIET=1, which docs/reliability.md
    says turns the bars off."""
    def shown(quiet: str) -> bytes:
        monkeypatch.setenv("GPT1_QUIET", quiet)
        return in_terminal([sys.executable, "-m", "gpt1", "tokenizer", "train", str(corpus_dir), "--vocab-size", "300",
                            "--out", str(tmp_path / quiet)], typed=[])

    assert b"Pre-processing" not in shown("0")  # the Rust bar is off: gpt1's own bar, on stderr, replaces it
    for quiet in ("0", "1"):  # ... which GPT1_QUIET silences as it does every bar
        done = subprocess.run([sys.executable, "-m", "gpt1", "tokenizer", "train", str(corpus_dir), "--vocab-size",
                               "300", "--out", str(tmp_path / f"piped{quiet}")], capture_output=True,
                              env={**os.environ, "GPT1_QUIET": quiet}, timeout=120)
        assert (b"tokenizer: " in done.stderr) == (quiet == "0") and done.stdout == b"", done.stderr


def test_a_run_started_with_relative_paths_resumes_from_another_folder(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    """`init_from=qs/base` from one folder and `init_from=../qs/base` from its subfolder (the same
    model) was "a different config": the recorded relative path was read from the new folder."""
    shutil.copytree(tiny_model_dir, tmp_path / "base")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(max_steps=2, device="cpu", batch_size=2, block_size=16, eval_every=1, save_every=1, init_from="base")
    assert pretrain(cfg, data_dir, "run").steps == 2
    monkeypatch.chdir(tmp_path / "sub")
    again = pretrain(dataclasses.replace(cfg, init_from="../base"), data_dir, "../run")
    assert again.steps == 2 and again.resumed_from == 2
    recorded = json.loads((tmp_path / "run" / "train_config.json").read_text())["config"]["init_from"]
    assert recorded == str((tmp_path / "base").resolve())


def test_the_prepare_bar_ends_with_every_token_counted(corpus_dir, tokenizer_dir, tmp_path):
    """The bar's last line said tokens=0 for a corpus of one batch (the count was taken before
    each batch's tokens were written, and not after the last)."""
    done = subprocess.run([sys.executable, "-m", "gpt1", "prepare", str(corpus_dir), "--tokenizer", str(tokenizer_dir),
                           "--out", str(tmp_path / "data")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "GPT1_QUIET": "0"})
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    last_bar = [line for line in done.stderr.splitlines() if line.startswith("prepare:")][-1]
    assert f"tokens={meta['train']['tokens'] + meta['val']['tokens']:,}" in last_bar, last_bar


def test_a_budget_run_reports_the_budget_it_spent_over_every_invocation(tmp_path, data_dir):
    """The quickstart took a reused (or killed and resumed) stage's time from this invocation:
    "pretrain reused (made in 1 s)" for a run that trained 18 s."""
    cfg = TrainConfig(max_steps=10_000, time_budget=1.5, device="cpu", batch_size=2, block_size=16, eval_every=50,
                      save_every=50)
    first = pretrain(cfg, data_dir, tmp_path / "run")
    assert first.budget_spent >= 1.5
    again = pretrain(cfg, data_dir, tmp_path / "run")
    assert again.resumed_from == again.steps == first.steps
    assert again.budget_spent == pytest.approx(first.budget_spent, abs=0.5) and again.seconds < first.budget_spent


def test_a_prepare_that_failed_before_its_first_commit_leaves_no_shards_and_eval_says_so(
        tmp_path, tokenizer_dir, tiny_model_dir, capsys):
    """A prepare stopped by a bad file left train.bin.partial/val.bin.partial that nothing could
    resume from; `gpt1 eval --data` on the folder then said "directory has no text files" where
    pretrain said the prepare did not finish."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("good text " * 200)
    (corpus / "b.txt").write_bytes(b"bad \xff byte")
    assert_one_clear_line(*run_main(capsys, "prepare", corpus, "--tokenizer", tokenizer_dir, "--out", tmp_path / "data"),
                          "invalid UTF-8")
    assert not list((tmp_path / "data").glob("*.partial"))
    for argv in (["eval", "--model", tiny_model_dir, "--data", tmp_path / "data"],
                 ["pretrain", "--data", tmp_path / "data", "--out", tmp_path / "run"]):
        assert_one_clear_line(*run_main(capsys, *argv), r"data: no meta\.json: not a prepared data dir, or `gpt1 prepare` "
                                                        r"did not finish")


def test_eval_chat_of_data_too_small_to_hold_any_out_says_so(tmp_path, tiny_model_dir, capsys):
    """It blamed "filtering" ("the chat data is empty after filtering"): one conversation is
    one message tree, which a 5% val_fraction never holds out."""
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (tmp_path / "one.jsonl").write_text(json.dumps(chat) + "\n")
    assert_one_clear_line(*run_main(capsys, "eval", "--model", tiny_model_dir, "--chat", "--data", tmp_path / "one.jsonl"),
                          r"one.jsonl: nothing held out to evaluate: val_fraction 0.05 holds out whole message trees, "
                          r"and the data has 1 tree \(--chat scores the share fine-tuning holds out\); use more data, or a "
                          r"dataset with a validation split$")
