"""A Hugging Face Hub model id where gpt1 takes a transformers folder (`init_from=hf:NAME`,
`finetune --base hf:NAME`): fetched through huggingface_hub's cache, as transformers'
from_pretrained fetches it. The Hub cannot be reached from the test machines, so each test writes
the cache's own layout (models--OWNER--NAME/refs, snapshots/COMMIT) holding a gpt1 export, and
runs the real command in a subprocess with HF_HUB_OFFLINE=1 and HF_HUB_CACHE there: the code path
of a model downloaded once and used again offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt1.core.errors import Gpt1Error
from gpt1.formats.hf import export_model, hub_folder
from gpt1.formats.modeldir import load_model, save_model
from tests.model_factories import random_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_config, tokenizer) -> tuple[Path, torch.nn.Module]:
    """A Hub cache holding me/tiny-gpt1 (main and the tag v1: one commit), a gpt1 export."""
    root = tmp_path_factory.mktemp("hub")
    model = random_model(tiny_config, seed=11)
    source = root / "model"
    save_model(source, model, tokenizer)
    repo = root / "cache" / "models--me--tiny-gpt1"
    export_model(source, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    for ref in ("main", "v1"):
        (repo / "refs" / ref).write_text(COMMIT)
    return root / "cache", model


def _gpt1(cache: Path, *argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "gpt1", *map(str, argv)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_finetune_base_and_init_from_take_a_hub_model_id(hub_cache, data_dir, tmp_path):
    cache, model = hub_cache
    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n'
                     * 8)
    done = _gpt1(cache, "finetune", "--base", "hf:me/tiny-gpt1", "--data", chats, "--out", tmp_path / "ft",
                 "max_steps=1", "batch_size=4", "device=cpu")
    assert done.returncode == 0, done.stderr
    assert "me/tiny-gpt1: the Hugging Face Hub model, from " in done.stderr
    base = load_model(tmp_path / "ft", adapter="ignore")  # the base the adapter applies to: the Hub model's
    for name, tensor in model.state_dict().items():
        if name != "transformer.wte.weight":  # special-token rows are trained
            torch.testing.assert_close(base.state_dict()[name], tensor, msg=name)
    # A revision (a tag here), for pretraining.
    done = _gpt1(cache, "pretrain", "--data", data_dir, "--out", tmp_path / "pt", "init_from=hf:me/tiny-gpt1@v1",
                 "max_steps=1", "batch_size=2", "device=cpu")
    assert done.returncode == 0, done.stderr
    assert load_model(tmp_path / "pt").config.n_embd == model.config.n_embd


def test_a_hub_id_that_is_not_there_says_so_and_a_local_folder_wins(hub_cache, data_dir, tmp_path, monkeypatch):
    cache, _ = hub_cache
    done = _gpt1(cache, "finetune", "--base", "hf:me/not-there", "--data", "chatterbot", "--out", tmp_path / "ft")
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()[-1:]
    assert "me/not-there: no such folder, and as a Hugging Face Hub model id: not in the local cache, and " \
           "HF_HUB_OFFLINE is set" in line and "hf download me/not-there --local-dir DIR" in line
    done = _gpt1(cache, "pretrain", "--data", data_dir, "--out", tmp_path / "pt", "init_from=hf:me/tiny-gpt1@v9")
    assert done.returncode == 2 and "me/tiny-gpt1@v9: no such folder" in done.stderr, done.stderr
    # A folder of that name in the working directory is the folder, never the Hub's model.
    local = tmp_path / "me" / "tiny-gpt1"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub_folder("me/tiny-gpt1") == Path("me/tiny-gpt1")
    for spec in ("./missing", "~/missing", "a b", "/abs/missing"):  # paths, never Hub ids
        assert hub_folder(spec) == Path(spec)
    with pytest.raises(Gpt1Error, match="model directory not found"):
        from gpt1.formats.hf import import_hf_model
        import_hf_model(tmp_path / "nothing-here")
    shutil.rmtree(local)


def test_commands_that_take_a_gpt1_model_dir_say_what_hf_names(capsys):
    """`gpt1 info` reads gpt1 model dirs only; generate/chat/serve/eval take a Hub id too (not in
    the cache here: the Hub's own one-line error)."""
    from tests.test_battery import run_main

    code, err = run_main(capsys, "info", "hf:me/tiny-gpt1")
    assert code == 2 and "hf:me/tiny-gpt1: model directory not found; this takes a gpt1 model dir" in err
    assert "`gpt1 pretrain init_from=hf:me/tiny-gpt1` or `gpt1 finetune --base hf:me/tiny-gpt1`" in err
    code, err = run_main(capsys, "generate", "--model", "hf:me/tiny-gpt1", "--prompt", "x")
    assert code == 2 and "me/tiny-gpt1: no such folder, and as a Hugging Face Hub model id: not in the local cache" in err


def test_only_the_files_an_import_reads_are_fetched():
    """huggingface_hub's `*` matches `/`: "*.safetensors" fetched every checkpoint-N/ a Trainer pushed."""
    from huggingface_hub.utils import filter_repo_objects

    from gpt1.formats.hf import HUB_FILES

    files = ["config.json", "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "adapter/adapter_config.json",
             "adapter/adapter_model.safetensors", "checkpoint-500/model.safetensors", "onnx/config.json",
             "original/consolidated.safetensors", "pytorch_model.bin", "tf_model.h5", "README.md"]
    assert sorted(filter_repo_objects(files, allow_patterns=HUB_FILES)) == sorted(files[:9])


def test_generate_runs_a_hub_model_id_from_the_cache(hub_cache):
    """generate/chat/serve/eval take `--model hf:OWNER/NAME[@REVISION]` as training does (refused
    before: "this takes a gpt1 model dir"): the export in the cache, imported, greedy text as gpt1's."""
    cache, model = hub_cache
    done = _gpt1(cache, "generate", "--model", "hf:me/tiny-gpt1@v1", "--prompt", "the", "--max-new-tokens", "4",
                 "--temperature", "0", "--device", "cpu")
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    assert "me/tiny-gpt1@v1: the Hugging Face Hub model, from " in done.stderr
