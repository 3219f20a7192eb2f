"""Exploratory pass 14 (the Python API), the training and model side: a config changed by
attribute after it was built is checked again where it is used, bad input to the model and its
config is one Gpt1Error, the annotations accept what the docs pass, and a CPU run puts glibc's
malloc thresholds back when it returns."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import pydoc
import subprocess
import sys
import typing

import numpy as np
import pytest
import torch

from gpt1.core.config import ModelConfig
from gpt1.core.errors import Gpt1Error
from gpt1.core.model import GPT
from gpt1.train.config import TrainConfig
from gpt1.train.finetune import FinetuneConfig, finetune
from gpt1.train.pretrain import pretrain
from tests.test_malloc import MALLINFO

RUN = dict(model="tiny", block_size=32, batch_size=2, max_steps=1, eval_every=1, eval_batches=1, device="cpu")


# ---- #2: a config changed by attribute is checked again at the entry of a run -------------------

@pytest.mark.parametrize(("key", "value", "message"), [
    ("compile", "no", "TrainConfig: key 'compile' expects bool, got 'no'"),
    ("max_steps", 2.5, "TrainConfig: key 'max_steps' expects int, got 2.5"),
    ("max_steps", -1, "max_steps must be >= 0, got -1"),
    ("lr", "3e-4", "TrainConfig: key 'lr' expects float, got '3e-4'"),  # argparse's str
    ("seed", "1", "TrainConfig: key 'seed' expects int, got '1'"),
])
def test_a_train_config_changed_after_it_was_built_is_refused_by_pretrain_as_construction_would(
        data_dir, tmp_path, key, value, message):
    cfg = TrainConfig(**RUN)
    setattr(cfg, key, value)  # cfg = load_config(...); cfg.lr = args.lr
    with pytest.raises(Gpt1Error, match=f"^{message}"):
        pretrain(cfg, data_dir, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_pretrain_runs_and_records_the_checked_values_of_a_changed_config(data_dir, tmp_path):
    cfg = TrainConfig(**RUN)
    cfg.min_lr, cfg.eval_every, cfg.betas = 0, np.int64(1), [0.8, 0.9]  # an int for a float, NumPy's int, a list
    assert pretrain(cfg, data_dir, tmp_path / "run").steps == 1
    recorded = json.loads((tmp_path / "run" / "train_config.json").read_text())["config"]
    assert isinstance(recorded["min_lr"], float) and recorded["min_lr"] == 0.0
    assert recorded["eval_every"] == 1 and recorded["betas"] == [0.8, 0.9]


def test_a_finetune_config_changed_after_it_was_built_is_refused_by_finetune(tiny_model_dir, tmp_path):
    cfg = FinetuneConfig(data=str(tmp_path / "chats.jsonl"), max_steps=1, device="cpu")
    cfg.lora_r = "8"
    with pytest.raises(Gpt1Error, match="^FinetuneConfig: key 'lora_r' expects int, got '8'"):
        finetune(cfg, tiny_model_dir, tmp_path / "ft")
    cfg.lora_r, cfg.lora_targets = 8, ("q", "gate")  # a value construction refuses by its own check
    with pytest.raises(Gpt1Error, match="gate"):
        finetune(cfg, tiny_model_dir, tmp_path / "ft")
    assert not (tmp_path / "ft").exists()


def test_a_model_config_changed_after_it_was_built_is_refused_by_gpt(tiny_config):
    config = ModelConfig(**tiny_config.to_dict())
    config.n_head = 3  # 64 is not divisible by 3: construction refuses it
    with pytest.raises(Gpt1Error, match=r"n_embd \(64\) must be divisible by n_head \(3\)"):
        GPT(config)
    with pytest.raises(Gpt1Error, match="expected a ModelConfig"):
        GPT(tiny_config.to_dict())


# ---- #5: bad input to ModelConfig and GPT.forward is a Gpt1Error ----------------------------------

def test_a_typo_in_preset_overrides_names_the_known_fields():
    with pytest.raises(Gpt1Error, match=r"unknown model config field\(s\) n_layers; known: .*n_layer"):
        ModelConfig.preset("tiny", n_layers=2)


def test_from_dict_wants_a_mapping():
    with pytest.raises(Gpt1Error, match="expected a mapping of field names to values.*got list"):
        ModelConfig.from_dict([1])


def test_forward_refuses_bad_ids_by_name(tiny_config):
    model = GPT(tiny_config).eval()
    with pytest.raises(Gpt1Error, match=r"a sequence of 65 tokens is longer than the context \(64"):
        model(torch.zeros(1, tiny_config.block_size + 1, dtype=torch.long))
    for bad in (10**6, -1, tiny_config.vocab_size):
        ids = torch.tensor([[1, 2, bad, 3]])
        with pytest.raises(Gpt1Error, match=rf"token id {bad} is outside the vocabulary \[0, {tiny_config.vocab_size}\)"):
            model(ids)
        with pytest.raises(Gpt1Error, match=rf"token id {bad} is outside"):  # the training path too
            model.train()(ids, ids.clamp(0, tiny_config.vocab_size - 1))
        model.eval()
    with pytest.raises(Gpt1Error, match=r"expected token ids of shape \(batch, time\), got shape \(4,\)"):
        model(torch.tensor([1, 2, 3, 4]))
    assert model(torch.tensor([[1, 2, tiny_config.vocab_size - 1]])).shape == (1, 3, tiny_config.vocab_size)


# ---- #4: what type checkers and help() see --------------------------------------------------------

def test_forward_is_typed_per_call_and_gpt_has_its_own_docstring():
    import gpt1.core.model as model_module

    returns = [typing.get_type_hints(f, vars(model_module))["return"] for f in typing.get_overloads(GPT.forward)]
    assert returns == [torch.Tensor, tuple[None, torch.Tensor]]  # model(x): logits; model(x, y): (None, loss)
    text = pydoc.render_doc(GPT)
    assert "model(idx)" in text and "Base class for all neural network modules" not in text.split("Method resolution")[0]


def test_the_annotations_of_betas_and_lora_targets_take_the_lists_the_docs_pass():
    from collections.abc import Sequence

    assert typing.get_type_hints(TrainConfig)["betas"] == Sequence[float]  # what a type checker reads
    assert typing.get_type_hints(FinetuneConfig)["lora_targets"] == Sequence[str]
    assert TrainConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)  # stored as the tuple, checked as one
    assert FinetuneConfig(lora_targets=["q", "v"]).lora_targets == ("q", "v")
    with pytest.raises(Gpt1Error, match=r"key 'betas' expects tuple\[float, float\], got \[0.9\]"):
        TrainConfig(betas=[0.9])


# ---- #9: ModelConfig reads what it writes, NumPy integers, floats ----------------------------------

def test_from_dict_reads_what_save_writes(tiny_config, tmp_path):
    tiny_config.save(tmp_path / "config.json", tokenizer_fingerprint="abc123")
    assert ModelConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == tiny_config


def test_model_config_takes_numpy_integers_and_stores_floats_as_floats():
    config = ModelConfig.preset("tiny", n_layer=np.int64(2), dropout=0)
    assert type(config.n_layer) is int and config.n_layer == 2
    assert type(config.dropout) is float and type(config.to_dict()["dropout"]) is float


# ---- #6: a CPU run puts glibc's malloc thresholds back when it returns -----------------------------

# A 48 MiB buffer (above glibc's largest default mmap threshold, 32 MiB): mallinfo2 tells whether
# it was mapped (hblkhd) and whether its memory stayed in the heap once freed (fordblks).
CHILD = MALLINFO + """
from gpt1.core.malloc import freed_memory_kept
from gpt1.train.config import TrainConfig
from gpt1.train.pretrain import pretrain
def buffer():
    before = libc.mallinfo2().hblkhd
    x = torch.empty(48 * 2**20, dtype=torch.uint8).fill_(1)
    mapped = libc.mallinfo2().hblkhd - before
    del x
    return {"mapped": mapped, "free_in_heap": libc.mallinfo2().fordblks}
report = {}
with freed_memory_kept() as held:
    report["held"], report["inside"] = held, buffer()
report["after_block"] = buffer()
pretrain(TrainConfig(**json.loads(sys.argv[2])), sys.argv[1], sys.argv[3])
report["after_pretrain"] = buffer()
print(json.dumps(report))
"""
BUFFER = 48 * 2**20


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                    reason="glibc >= 2.33 only (mallinfo2)")
def test_a_cpu_run_puts_glibcs_malloc_thresholds_back_when_it_returns(data_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", CHILD, str(data_dir), json.dumps(RUN), str(tmp_path / "run")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    inside = report["inside"]
    assert report["held"] and inside["mapped"] < BUFFER and inside["free_in_heap"] >= BUFFER  # kept during a run
    # Afterwards a large buffer is mapped (and unmapped when freed) again, as before the run. (Whether
    # malloc_trim gave the kept memory back is not asserted: a free chunk below the heap's top is
    # released with madvise and still counts in fordblks.)
    assert report["after_block"]["mapped"] >= BUFFER and report["after_pretrain"]["mapped"] >= BUFFER
