"""The bad-input battery (issue 17): every writing command over truncated, invalid and hostile
inputs ends with one line on stderr, no traceback and exit code 2; GPT1_DEBUG=1 shows the
traceback behind the line. Most cases run `gpt1.cli.main` in-process (the same code path as
the `gpt1` script, minus the interpreter start); those about the process itself (stdin, argv
bytes, GPT1_DEBUG, a run killed mid-way) run the real command in a subprocess."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt1.cli import main
from gpt1.core.lora import LoRAConfig, inject_lora, save_adapter
from gpt1.formats.modeldir import load_model

pytestmark = pytest.mark.slow

CHAT = {"text": "some text", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def assert_one_clear_line(rc: int, stderr: str, pattern: str = "") -> str:
    import re

    assert rc == 2, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr
    assert errors[0].startswith("gpt1 "), stderr
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


def run_main(capsys, *argv) -> tuple[int, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse refuses a flag's value by exiting
        rc = e.code
    return rc, capsys.readouterr().err


def gpt1(*args, stdin: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt1", *map(os.fsdecode, args)], input=stdin, capture_output=True,
                          timeout=300, env={**os.environ, "GPT1_QUIET": "1", **(env or {})})


# ---- hostile files -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hostile")
    line = json.dumps(CHAT) + "\n"
    with gzip.open(d / "truncated.jsonl.gz", "wt") as f:
        f.write(line * 3000)
    data = (d / "truncated.jsonl.gz").read_bytes()
    (d / "truncated.jsonl.gz").write_bytes(data[: len(data) // 2])
    with gzip.open(d / "truncated.txt.gz", "wt") as f:
        f.write("words and more words " * 20000)
    data = (d / "truncated.txt.gz").read_bytes()
    (d / "truncated.txt.gz").write_bytes(data[: len(data) // 2])
    (d / "not-gzip.jsonl.gz").write_text(line)
    (d / "lone-surrogate.jsonl").write_text(line + '{"text": "\\udc80", "messages": [{"role": "user", "content": '
                                            '"\\ud800"}, {"role": "assistant", "content": "x"}]}\n')
    (d / "deep.jsonl").write_text(line + "[" * 100_000 + "]" * 100_000 + "\n")
    (d / "bad-utf8.jsonl").write_bytes(line.encode() + b'{"text": "caf\xe9"}\n')
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (d / "bad.yml").write_text("conversations:\n- - hi\n  - [unclosed\n")
    return d


TEXT_CASES = {
    "truncated.txt.gz": r"truncated.txt.gz: cannot read after byte [\d,]+ \(the compressed file is truncated\)",
    "truncated.jsonl.gz": r"truncated.jsonl.gz: cannot read after line [\d,]+ \(the compressed file is truncated\)",
    "not-gzip.jsonl.gz": r"not-gzip.jsonl.gz: not a gzip file",
    "lone-surrogate.jsonl": r"lone-surrogate.jsonl, line 2: a lone surrogate escape",
    "deep.jsonl": r"deep.jsonl, line 2: JSON nested too deeply",
    "bad-utf8.jsonl": r"bad-utf8.jsonl, line 2: invalid UTF-8 at byte offset 13",
    "latin1.txt": r"latin1.txt: invalid UTF-8 at byte offset 3",
}
CHAT_CASES = {name: pattern for name, pattern in TEXT_CASES.items() if name.endswith(".jsonl") or "jsonl.gz" in name}
CHAT_CASES["bad.yml"] = r"bad.yml: not valid YAML at line \d+, column \d+"


@pytest.mark.parametrize("name", TEXT_CASES)
def test_text_commands_over_hostile_files(name, hostile, tokenizer_dir, tiny_model_dir, tmp_path, capsys):
    source = hostile / name
    # A second document: prepare refuses one text file (one document, no validation split) before reading it.
    (good := tmp_path / "good.txt").write_text("def add(a, b):\n    return a + b\n", encoding="utf-8")
    commands = {
        "tokenizer train": ["tokenizer", "train", "--vocab-size", "300", "--out", tmp_path / "tok", source],
        "prepare": ["prepare", "--tokenizer", tokenizer_dir, "--out", tmp_path / "data", source, good],
        "eval": ["eval", "--model", tiny_model_dir, "--device", "cpu", "--data", source],
    }
    for argv in commands.values():
        assert_one_clear_line(*run_main(capsys, *argv), TEXT_CASES[name])


@pytest.mark.parametrize("name", CHAT_CASES)
def test_finetune_over_hostile_files(name, hostile, tiny_model_dir, tmp_path, capsys):
    argv = ["finetune", "--base", tiny_model_dir, "--data", hostile / name, "--out", tmp_path / "ft",
            "max_steps=1", "device=cpu"]
    assert_one_clear_line(*run_main(capsys, *argv), CHAT_CASES[name])


# ---- hostile model dirs --------------------------------------------------------------------

def _model_copy(tiny_model_dir: Path, tmp_path: Path, **config_changes) -> Path:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **config_changes}))
    return model


CONFIG_CASES = {
    "dropout-string": ({"dropout": "0.1"}, r"config.json: model config: dropout must be a number, got '0.1'"),
    "norm_eps-string": ({"norm_eps": "x"}, r"norm_eps must be a number, got 'x'"),
    "bias-string": ({"bias": "false"}, r"bias must be true or false, got 'false'"),
    "huge-block": ({"block_size": 10**12}, r"block_size must be a whole number from 1 to 16,777,216"),
    "norm_eps-negative": ({"norm_eps": -1}, r"norm_eps must be > 0"),
    "larger-block": ({"block_size": 4096}, r"wpe.weight has shape \(64, 64\), the config expects \(4096, 64\)"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_export_and_eval_over_bad_config_json(case, tiny_model_dir, tmp_path, capsys, hostile):
    changes, pattern = CONFIG_CASES[case]
    model = _model_copy(tiny_model_dir, tmp_path, **changes)
    assert_one_clear_line(*run_main(capsys, "export", "--model", model, "--out", tmp_path / "hf"), pattern)
    assert_one_clear_line(*run_main(capsys, "eval", "--model", model, "--device", "cpu", "--data",
                                    hostile / "bad.yml"), pattern)


def test_broken_model_dirs(tiny_model_dir, tokenizer, corpus_dir, tmp_path, capsys):
    from gpt1.core.tokenizer import train_tokenizer
    from gpt1.data.sources import iter_documents

    model = _model_copy(tiny_model_dir, tmp_path)
    (model / "config.json").write_text("{not json")
    assert_one_clear_line(*run_main(capsys, "export", "--model", model, "--out", tmp_path / "a"),
                          r"config.json: invalid JSON at line 1")
    shutil.rmtree(model)
    # NaN weights used to give empty output with finish "stop": now a clear error on load
    model = _model_copy(tiny_model_dir, tmp_path)
    weights = load_file(str(model / "model.safetensors"))
    weights["transformer.h.0.attn.c_attn.weight"][0, 0] = float("nan")
    save_file(weights, str(model / "model.safetensors"))
    assert_one_clear_line(*run_main(capsys, "export", "--model", model, "--out", tmp_path / "b"),
                          r"transformer.h.0.attn.c_attn.weight holds NaN or infinite values")
    shutil.rmtree(model)
    # a tokenizer.json from another training (same size), and one larger than the model's vocabulary
    model = _model_copy(tiny_model_dir, tmp_path)
    other, _ = train_tokenizer(iter_documents([str(corpus_dir / "email")]), tokenizer.vocab_size, show_progress=False)
    other.save(model)
    assert_one_clear_line(*run_main(capsys, "export", "--model", model, "--out", tmp_path / "c"),
                          r"tokenizer.json: not the tokenizer this model was trained with")
    bigger, _ = train_tokenizer(iter_documents([str(corpus_dir)]), tokenizer.vocab_size + 50, show_progress=False)
    bigger.save(model)
    assert_one_clear_line(*run_main(capsys, "export", "--model", model, "--out", tmp_path / "c"),
                          r"562 tokens, but the model .* has 512 token embeddings")
    # a tokenizer.json with holes in its ids
    tokenizer.save(model)
    data = json.loads((model / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab[next(t for t, i in vocab.items() if i == len(vocab) - 1)] = len(vocab) + 10
    (model / "tokenizer.json").write_text(json.dumps(data))
    assert_one_clear_line(*run_main(capsys, "export", "--model", model, "--out", tmp_path / "d"),
                          r"tokenizer.json: the token ids have holes \(no token has id 511\)")


def _with_adapter(tiny_model_dir: Path, tmp_path: Path, name: str) -> Path:
    model = tmp_path / name
    shutil.copytree(tiny_model_dir, model)
    lora = load_model(model)
    inject_lora(lora, LoRAConfig(r=2, targets=("q", "v"), token_ids=[3, 4]))
    save_adapter(lora, model / "adapter")
    return model


def _set_metadata(model: Path, value: str) -> None:
    file = model / "adapter" / "adapter_model.safetensors"
    save_file(load_file(str(file)), str(file), metadata={"format": "pt", "gpt1_lora": value})


def test_bad_adapter_metadata(tiny_model_dir, tmp_path, capsys):
    good = {"r": 2, "alpha": 8.0, "dropout": 0.0, "targets": ["q", "v"], "token_ids": [3, 4]}
    cases = {
        "range": (json.dumps({**good, "token_ids": [3, 99_999]}), r"trains token ids up to 99,999, but the model has 512"),
        "types": (json.dumps({**good, "r": "2"}), r"gpt1_lora\): LoRA rank r must be a positive integer, got '2'"),
        "targets": (json.dumps({**good, "targets": 5}), r"LoRA targets must be a list of names, got 5"),
        "unknown": (json.dumps({**good, "rank": 4}), r"unknown LoRA setting\(s\) rank"),
        "json": ("{not json", r"gpt1_lora\): invalid JSON"),
    }
    for name, (metadata, pattern) in cases.items():
        model = _with_adapter(tiny_model_dir, tmp_path, name)
        _set_metadata(model, metadata)
        assert_one_clear_line(*run_main(capsys, "export", "--model", model, "--out", tmp_path / f"{name}-hf"), pattern)
    # a PEFT-style adapter (no gpt1 metadata) without r / lora_alpha
    model = _with_adapter(tiny_model_dir, tmp_path, "peft")
    file = model / "adapter" / "adapter_model.safetensors"
    save_file(load_file(str(file)), str(file), metadata={"format": "pt"})
    config = json.loads((model / "adapter" / "adapter_config.json").read_text())
    del config["r"], config["lora_alpha"]
    (model / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    assert_one_clear_line(*run_main(capsys, "export", "--model", model, "--out", tmp_path / "peft-hf"),
                          r"adapter_config.json: missing r and lora_alpha")


def test_a_fine_tuned_dir_without_its_adapter_is_refused(tiny_model_dir, tmp_path, capsys):
    """A fine-tuned dir keeps the base's weights and its LoRA in adapter/: without adapter/ it ran
    as the base model, silently."""
    model = _with_adapter(tiny_model_dir, tmp_path, "chat")
    (model / "base.json").write_text(json.dumps({"path": str(tiny_model_dir), "sha256": "0" * 64}))
    assert run_main(capsys, "generate", "--model", model, "--prompt", "hi", "--max-new-tokens", "2")[0] == 0
    shutil.rmtree(model / "adapter")
    assert_one_clear_line(*run_main(capsys, "generate", "--model", model, "--prompt", "hi"),
                          r"chat: a fine-tuned model dir \(base.json\) without its adapter/ folder")


# ---- flags, run dirs, devices --------------------------------------------------------------

def test_bad_flags_and_damaged_run_dirs(tokenizer_dir, tiny_model_dir, corpus_dir, tmp_path, capsys):
    source = corpus_dir / "json"
    assert_one_clear_line(*run_main(capsys, "tokenizer", "train", "--max-documents", "-1", "--out", tmp_path / "t",
                                    source), r"--max-documents: expected a whole number >= 1, got -1")
    for val in ("inf", "nan", "-1", "2.5"):
        assert_one_clear_line(*run_main(capsys, "prepare", "--val", val, "--tokenizer", tokenizer_dir,
                                        "--out", tmp_path / "d", source), r"--val: expected a fraction")
    assert_one_clear_line(*run_main(capsys, "prepare", "--tokenizer", tokenizer_dir, "--out", tiny_model_dir, source),
                          r"is a model dir: prepared data .* needs a folder of its own")
    assert_one_clear_line(*run_main(capsys, "tokenizer", "train", "--vocab-size", "300", "--out", tiny_model_dir,
                                    source), r"is a model dir: its tokenizer.json belongs to it")
    assert not (tmp_path / "d").exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"")  # a run with a model to lose (one without starts over)
    (run / "train_config.json").write_text("[1, 2")
    assert run_main(capsys, "prepare", "--tokenizer", tokenizer_dir, "--out", tmp_path / "data", "--val", "4",
                    source)[0] == 0
    assert_one_clear_line(*run_main(capsys, "pretrain", "--data", tmp_path / "data", "--out", run, "model=tiny",
                                    "device=cpu", "max_steps=1"), r"train_config.json: invalid JSON")
    (run / "train_config.json").write_text("[1, 2]")
    assert_one_clear_line(*run_main(capsys, "pretrain", "--data", tmp_path / "data", "--out", run, "model=tiny",
                                    "device=cpu", "max_steps=1"), r"train_config.json: expected an object")
    for device, pattern in (("banana", r"unknown device 'banana'"), ("cuda", r"cuda requested but no CUDA GPU")):
        if device == "cuda" and torch.cuda.is_available():
            continue
        assert_one_clear_line(*run_main(capsys, "pretrain", "--data", tmp_path / "data", "--out", tmp_path / device,
                                        "model=tiny", f"device={device}", "max_steps=1"), pattern)
        assert_one_clear_line(*run_main(capsys, "eval", "--model", tiny_model_dir, "--device", device,
                                        "--data", tmp_path / "data"), pattern)
        assert_one_clear_line(*run_main(capsys, "generate", "--model", tiny_model_dir, "--device", device,
                                        "--prompt", "hi"), pattern)


def test_a_pickled_trainer_state_is_refused_in_one_line(tokenizer_dir, corpus_dir, tmp_path, capsys):
    import pickle

    data = tmp_path / "data"
    assert run_main(capsys, "prepare", "--tokenizer", tokenizer_dir, "--out", data, "--val", "4", corpus_dir / "json")[0] == 0
    args = ["pretrain", "--data", data, "--out", tmp_path / "run", "model=tiny", "block_size=32", "batch_size=2",
            "device=cpu", "max_steps=2", "eval_batches=1"]
    assert run_main(capsys, *args)[0] == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    (checkpoint / "trainer_state.pt").write_bytes(pickle.dumps({"step": 2, "hostile": Path("x")}))
    (checkpoint / "outputs.done").unlink()
    assert_one_clear_line(*run_main(capsys, *args), r"cannot read the checkpoint \(UnpicklingError: .*never pickled")


# ---- the process itself: stdin, argv, GPT1_DEBUG, unwritable folders ----------------------

def test_invalid_utf8_on_stdin_and_in_arguments(tiny_model_dir):
    result = gpt1("generate", "--model", tiny_model_dir, "--device", "cpu", "--max-new-tokens", "2", stdin=b"caf\xe9\n")
    assert_one_clear_line(result.returncode, result.stderr.decode(), r"stdin: the input is not valid UTF-8 \(byte b'\\xe9'\)")
    result = gpt1("generate", "--model", tiny_model_dir, "--device", "cpu", "--max-new-tokens", "2", "--prompt", b"caf\xe9")
    assert_one_clear_line(result.returncode, result.stderr.decode(), r"argument --prompt: not valid UTF-8 \(byte b'\\xe9' at byte 3\)")
    # gpt1 chat reports the line and reads on, and a piped session with a failed line exits 2 (tests/test_chat_cli.py)
    result = gpt1("chat", "--model", tiny_model_dir, "--device", "cpu", stdin=b"hello \xff\n")
    assert result.returncode == 2 and "error: line 1 is not valid UTF-8" in result.stderr.decode()


def test_gpt1_debug_shows_the_traceback_behind_the_line(hostile, tokenizer_dir, tmp_path):
    argv = ["prepare", "--tokenizer", tokenizer_dir, "--out", tmp_path / "d", hostile / "deep.jsonl"]
    quiet = gpt1(*argv)
    line = assert_one_clear_line(quiet.returncode, quiet.stderr.decode(), "JSON nested too deeply")
    debug = gpt1(*argv, env={"GPT1_DEBUG": "1"})
    stderr = debug.stderr.decode()
    assert debug.returncode == 2 and "Traceback (most recent call last)" in stderr and "readers.py" in stderr
    assert stderr.rstrip().endswith(line)


@pytest.fixture
def unwritable(tmp_path):
    """A folder nobody may write into: immutable (chattr +i) as root, read-only otherwise."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("chattr +i is not supported here (and root ignores file modes)")
        yield folder
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_an_unwritable_out_for_every_writing_command(unwritable, tokenizer_dir, tiny_model_dir, corpus_dir, data_dir,
                                                    tmp_path, capsys):
    source, data = corpus_dir / "json", data_dir
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(CHAT) + "\n" for _ in range(20)))
    commands = [
        ["tokenizer", "train", "--vocab-size", "300", "--out", unwritable, source],
        ["tokenizer", "train", "--vocab-size", "300", "--out", unwritable / "sub", source],
        ["prepare", "--tokenizer", tokenizer_dir, "--out", unwritable / "data", source],
        ["pretrain", "--data", data, "--out", unwritable / "run", "model=tiny", "device=cpu", "max_steps=1"],
        ["finetune", "--base", tiny_model_dir, "--data", chat, "--out", unwritable / "ft", "device=cpu"],
        ["export", "--model", tiny_model_dir, "--out", unwritable / "hf"],
    ]
    for argv in commands:
        assert_one_clear_line(*run_main(capsys, *argv), r"locked")


def test_a_checkpoint_folder_that_turns_unwritable_mid_run(data_dir, tmp_path, capsys):
    if os.geteuid() != 0:
        pytest.skip("needs chattr +i (root)")
    args = ["pretrain", "--data", data_dir, "--out", tmp_path / "run", "model=tiny", "block_size=32", "batch_size=2",
            "device=cpu", "max_steps=4", "save_every=2", "eval_batches=1"]
    killed = gpt1(*args, env={"GPT1_CRASH_AT": "before-outputs:1"})  # stopped right after the step-2 checkpoint
    assert killed.returncode == 137
    checkpoints = tmp_path / "run" / "checkpoints"
    if subprocess.run(["chattr", "+i", str(checkpoints)], capture_output=True).returncode:
        pytest.skip("chattr +i is not supported here")
    try:
        result = run_main(capsys, *args)
    finally:
        subprocess.run(["chattr", "-i", str(checkpoints)], check=True)
    assert_one_clear_line(*result, r"checkpoints.*cannot write")
    assert sorted(p.name for p in checkpoints.iterdir()) == [".lock", "step-00000002"]  # and the run's lock


def test_messages_that_pointed_the_wrong_way(tiny_model_dir, tmp_path, capsys):
    """A taken port and an address not of this machine got the same "another server on that
    port?" hint; a file given as --model was "not found"; `--type ""` was taken as the default;
    `lora_targets=[]` was "unknown empty list"."""
    import socket

    from gpt1.core.errors import Gpt1Error
    from gpt1.core.lora import LoRAConfig
    from gpt1.serve.server import bind

    with bind("127.0.0.1", 0) as taken:
        with pytest.raises(Gpt1Error, match="another server on that port"):
            bind("127.0.0.1", taken.getsockname()[1])
    try:
        socket.create_server(("192.0.2.1", 0)).close()  # TEST-NET-1: not this machine's, unless it is
    except OSError:
        with pytest.raises(Gpt1Error, match=r"not an address of this machine; try --host 127.0.0.1"):
            bind("192.0.2.1", 0)
    a_file = tmp_path / "model.txt"
    a_file.write_text("x")
    assert_one_clear_line(*run_main(capsys, "generate", "--model", a_file, "--prompt", "hi"),
                          r"model.txt: a file, not a model directory")
    assert_one_clear_line(*run_main(capsys, "export", "--model", tiny_model_dir, "--format", "gguf", "--type", "",
                                    "--out", tmp_path / "m.gguf"), r"unknown GGUF type ''")
    with pytest.raises(Gpt1Error, match=r"LoRA targets: none given \(an adapter needs at least one\)"):
        LoRAConfig(targets=())


def test_a_model_preset_that_is_not_init_from_s_model_is_refused(tiny_model_dir, data_dir, tmp_path, capsys):
    """init_from decides the model: `model=small` beside it trained the init_from model and said nothing."""
    args = ("pretrain", "--data", data_dir, "--out", tmp_path / "run", f"init_from={tiny_model_dir}", "max_steps=1",
            "device=cpu", "block_size=0")
    assert_one_clear_line(*run_main(capsys, *args, "model=small"),
                          r"model=small \(\d+ layers x \d+ wide, \d+ heads\) is not the model of init_from=.*"
                          r"\(2 layers x 64 wide, 4 heads\): init_from decides the model")
    assert not (tmp_path / "run").exists()
    assert run_main(capsys, *args)[0] == 0  # the default preset is no choice: init_from's model trains
