"""Bad input, sixth round: output-file flags naming a model, run or data dir's own files, plot's
image formats, a tokenizer trained over another one, `info` on folders that are not model dirs,
--print-config without paths, and prepare naming what differs. Same style as
tests/test_battery.py: `gpt1.cli.main` in-process, one clear line on stderr."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gpt1.cli import main
from gpt1.cli.finetune_cmd import PRETRAINING_KEYS
from gpt1.train.config import TrainConfig, load_config
from gpt1.train.finetune import FinetuneConfig
from tests.task_files import hellaswag, write_jsonl
from tests.test_battery import assert_one_clear_line, run_main

METRICS = '{"step": 1, "loss": 8.0, "tokens": 64}\n{"step": 2, "loss": 7.0, "val_loss": 7.5, "tokens": 128}\n'


@pytest.fixture
def run(tiny_model_dir, tmp_path) -> Path:
    """A run dir: a model dir with its metrics, train_config.json, a checkpoint and a loss.png."""
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run)
    (run / "metrics.jsonl").write_text(METRICS)
    (run / "train_config.json").write_text('{"config": {}}\n')
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "checkpoints" / "step-00000002" / "trainer_state.pt").write_bytes(b"state")
    (run / "loss.png").write_bytes(b"an earlier plot")
    return run


def _contents(*folders: Path) -> dict[Path, bytes]:
    return {f: f.read_bytes() for folder in folders for f in sorted(folder.rglob("*")) if f.is_file()}


# ---- output-file flags never replace a folder's own files ----------------------------------

def test_output_flags_refuse_a_model_run_or_data_dirs_own_files(run, data_dir, tmp_path, capsys):
    """plot --out RUN/model.safetensors wrote a PNG over the weights; eval --json RUN/train_config.json
    broke the run; bench --json DATA/meta.json the data dir."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    task = write_jsonl(tmp_path / "hs.jsonl", [hellaswag(i) for i in range(2)])
    before = _contents(run, data)
    eval_json = ["eval", "--model", run, "--data", data, "--max-batches", "1", "--json"]
    cases = [
        (eval_json + [run / "train_config.json"], r"run/train_config\.json: belongs to .*run, a model dir: writing it "
                                                  r"would replace that file; choose another file name"),
        (eval_json + [run / "model.safetensors"], r"run/model\.safetensors: belongs to .*run, a model dir"),
        (eval_json + [data / "train.bin"], r"data/train\.bin: belongs to .*data, a prepared data dir"),
        # not there yet, but it would make the data dir look like a model dir
        (eval_json + [data / "config.json"], r"data/config\.json: belongs to .*data, a prepared data dir"),
        (["eval", "--model", run, "--task", "hellaswag", "--data", task, "--samples", run / "metrics.jsonl"],
         r"run/metrics\.jsonl: belongs to"),
        (["eval", "--model", run, "--task", "hellaswag", "--data", task, "--report", run / "tokenizer.json"],
         r"run/tokenizer\.json: belongs to"),
        (["bench", "generate", "--json", data / "meta.json"], r"data/meta\.json: belongs to .*data, a prepared data dir"),
        (["plot", run, "--out", run / "checkpoints" / "step-00000002" / "plot.png"],
         r"plot\.png: belongs to .*run, a model dir \(its checkpoints/ folder\)"),
        (["plot", run, "--out", run / ".lock"], r"run/\.lock: belongs to"),
    ]
    for argv, pattern in cases:
        assert_one_clear_line(*run_main(capsys, *argv), pattern)
    assert _contents(run, data) == before  # nothing replaced, nothing added

    # A new file in such a folder, or one the command wrote before, is fine.
    assert run_main(capsys, *eval_json, run / "eval.json")[0] == 0
    assert run_main(capsys, *eval_json, run / "eval.json")[0] == 0
    assert json.loads((run / "eval.json").read_text())["tokens"] > 0
    assert run_main(capsys, "plot", run, "--out", run / "loss.png")[0] == 0
    assert (run / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_plot_writes_the_format_its_suffix_names(run, tmp_path, capsys):
    """--out x.svg, x.pdf, x.jpg got PNG bytes; another suffix (a shard's .bin) got them too."""
    for name, magic in (("a.svg", b"<?xml"), ("a.pdf", b"%PDF"), ("a.jpg", b"\xff\xd8\xff"), ("a.JPEG", b"\xff\xd8\xff"),
                        ("a.png", b"\x89PNG"), ("a", b"\x89PNG")):
        assert run_main(capsys, "plot", run, "--out", tmp_path / name)[0] == 0, name
        assert (tmp_path / name).read_bytes().startswith(magic), name
    for name in ("a.txt", "train.bin"):
        assert_one_clear_line(*run_main(capsys, "plot", run, "--out", tmp_path / name),
                              rf"{name}: plot writes \.png, \.svg, \.pdf, \.jpg, \.jpeg files; expected a file name ending "
                              rf"in one of them, not \.{name.split('.')[1]}$")
        assert not (tmp_path / name).exists()


# ---- tokenizer train over another tokenizer ------------------------------------------------

def test_tokenizer_train_refuses_another_tokenizer_json_without_overwrite(tmp_path, capsys):
    """It silently replaced a different tokenizer.json (prepare and pretrain refuse a different setup)."""
    for name, words in (("a", "alpha beta gamma delta"), ("b", "zebra quux xylophone wombat")):
        (tmp_path / name).mkdir()
        for i in range(3):
            (tmp_path / name / f"{i}.txt").write_text(f"{words} {i} " * 20)
    train = ["tokenizer", "train", "--vocab-size", "280", "--min-frequency", "1", "--out", tmp_path / "tok"]
    file = tmp_path / "tok" / "tokenizer.json"
    assert run_main(capsys, *train, tmp_path / "a")[0] == 0
    first = file.read_bytes()
    assert_one_clear_line(*run_main(capsys, *train, tmp_path / "b"),
                          r"tok/tokenizer\.json: holds another tokenizer; pass --overwrite to replace it, or choose another --out$")
    assert file.read_bytes() == first
    rc, err = run_main(capsys, *train, tmp_path / "a")  # the same tokenizer again: no change
    assert rc == 0 and "already holds this tokenizer" in err and file.read_bytes() == first
    assert run_main(capsys, *train, tmp_path / "b", "--overwrite")[0] == 0
    assert file.read_bytes() != first


# ---- info on what is not a model dir -------------------------------------------------------

def test_info_says_what_a_folder_that_is_not_a_model_dir_is(tmp_path, tiny_model_dir, data_dir, tokenizer_dir, capsys):
    """All of these said "config.json: file not found" ('' too: the current folder)."""
    quickstart = tmp_path / "qs"
    for name in ("base", "chat"):
        shutil.copytree(tiny_model_dir, quickstart / name)
    (quickstart / "summary.json").write_text("{}")
    starting = tmp_path / "starting"
    starting.mkdir()
    (starting / "train_config.json").write_text("{}")
    (tmp_path / "other").mkdir()
    tokens = json.loads((data_dir / "meta.json").read_text())["train"]["tokens"]
    for arg, pattern in (
        ("", r"MODEL is empty; expected a preset name \(e\.g\. tiny, gpt1\) or a model dir$"),
        (data_dir, rf"{data_dir}: a prepared data dir \({tokens:,} train tokens, [\d,]+ validation\), not a model dir; "
                   rf"`gpt1 pretrain --data {data_dir} --out RUN` trains one$"),
        (quickstart, rf"qs: not a model dir; it holds the model dirs base/, chat/: try {quickstart}/chat$"),
        (starting, r"starting: a training run dir that has not saved its model yet \(no config\.json\)"),
        (tokenizer_dir, r": a tokenizer dir \(tokenizer\.json\), not a model dir$"),
        (tmp_path / "other", r"other: not a model dir \(no config\.json\)$"),
    ):
        assert_one_clear_line(*run_main(capsys, "info", arg), pattern)
    assert run_main(capsys, "info", quickstart / "chat")[0] == 0


# ---- --print-config ------------------------------------------------------------------------

def test_print_config_needs_no_paths_and_lists_only_keys_that_apply(tmp_path, capsys):
    """It needed --data/--out (--base/--out) though nothing is read; finetune's listed model,
    init_from, muon_lr_scale, embedding_lr_scale, keys fine-tuning refuses."""
    assert main(["pretrain", "--print-config", "--config", "tiny-cpu", "lr=0.01"]) == 0
    (tmp_path / "pt.toml").write_text(capsys.readouterr().out)
    assert load_config(TrainConfig, tmp_path / "pt.toml").lr == 0.01  # a loadable recipe
    assert main(["finetune", "--print-config", "lora_r=4"]) == 0
    printed = capsys.readouterr().out
    assert not set(PRETRAINING_KEYS) & {line.split(" = ")[0] for line in printed.splitlines()}
    assert {"optimizer", "float8"} <= set(PRETRAINING_KEYS)  # refused too, and listed until pass 17
    (tmp_path / "ft.toml").write_text(printed)
    assert load_config(FinetuneConfig, tmp_path / "ft.toml").lora_r == 4
    # Each key left out is one fine-tuning refuses (the list does not drift from FinetuneConfig).
    assert set(PRETRAINING_KEYS) <= set(TrainConfig().to_dict())
    changed = {"model": "small", "init_from": "runs/x", "n_layer": 2, "n_head": 2, "n_embd": 64, "muon_lr_scale": 2.0,
               "embedding_lr_scale": 2.0, "optimizer": "muon", "float8": True, "data_order": "random"}
    for key in PRETRAINING_KEYS:
        assert_one_clear_line(*run_main(capsys, "finetune", "--base", tmp_path / "none", "--out", tmp_path / "o",
                                        f"{key}={json.dumps(changed[key])}"), rf"{key}")
    assert not (tmp_path / "o").exists()
    # Without --print-config a run still needs them, said as argparse says it.
    assert_one_clear_line(*run_main(capsys, "pretrain", "max_steps=1"),
                          r"the following arguments are required: --data, --out \(see gpt1 pretrain --help\)$")
    assert_one_clear_line(*run_main(capsys, "finetune", "--out", tmp_path / "o"),
                          r"the following arguments are required: --base \(see gpt1 finetune --help\)$")


def test_training_help_points_at_the_docs_that_list_every_key(capsys):
    """--help said "see the README for every key"; the keys are in docs/training.md and docs/finetuning.md."""
    for command, doc in (("pretrain", "docs/training.md"), ("finetune", "docs/finetuning.md")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert doc in text and "README" not in text
        assert (Path(__file__).resolve().parents[1] / doc).is_file()


# ---- prepare names what differs ------------------------------------------------------------

def test_prepare_into_a_finished_out_names_the_settings_that_differ(tmp_path, tokenizer_dir, capsys):
    """It said only "already holds data prepared from other sources or settings"."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text(f"document number {i} with some words " * 5)
    prepare = ["prepare", "--tokenizer", tokenizer_dir, "--out", tmp_path / "data", "--val", "2"]
    assert run_main(capsys, *prepare, corpus)[0] == 0
    hint = r"; choose another --out, or pass --overwrite to replace it$"
    assert_one_clear_line(*run_main(capsys, *prepare, corpus, "--seed", "3", "--max-documents", "5"),
                          r"data already holds data prepared with other settings \(seed: 1337 -> 3, "
                          r"max_documents: None -> 5\)" + hint)
    (tmp_path / "more.txt").write_text("one more document")
    assert_one_clear_line(*run_main(capsys, *prepare, corpus, tmp_path / "more.txt"),
                          r"with other settings \(sources: \[.*corpus'\] -> \[.*corpus', .*more\.txt'\]\)" + hint)
    (corpus / "0.txt").write_text("edited")
    assert_one_clear_line(*run_main(capsys, *prepare, corpus), r"with other settings \(files \(changed on disk\)\)" + hint)
    assert run_main(capsys, *prepare, corpus, "--overwrite")[0] == 0
    with open(tmp_path / "data" / "val.bin", "r+b") as f:  # the same settings over a damaged shard
        f.truncate(2)
    assert_one_clear_line(*run_main(capsys, *prepare, corpus),
                          r"with these settings, but its train\.bin/val\.bin do not match meta\.json \(damaged\)" + hint)


def test_serve_without_httptools_names_the_missing_package(tiny_model_dir):
    """With FastAPI and uvicorn installed but not httptools (which gpt1.serve.server extends),
    the line blamed "FastAPI and uvicorn", which were there."""
    import subprocess
    import sys

    blocked = ("import sys; sys.modules['httptools'] = None; from gpt1.cli import main; "
               f"sys.exit(main(['serve', '--model', {str(tiny_model_dir)!r}]))")
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120)
    assert_one_clear_line(result.returncode, result.stderr,
                          r"needs the `serve` extra \(FastAPI, uvicorn, httptools\): httptools is missing; "
                          r"install it with: pip install 'gpt1\[serve\]'$")
