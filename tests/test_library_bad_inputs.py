"""The Python API's bad-input battery: configs built in Python get load_config's type checks, and
the public functions refuse a wrong container (a dict for SamplingParams, flat ids for a batch, a
path for a loaded model) with one Gpt1Error naming the argument, never a raw TypeError or
AttributeError from deep inside."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

import gpt1
from gpt1.core.errors import Gpt1Error
from gpt1.core.sampling_params import SamplingParams
from gpt1.core.tokenizer import Tokenizer, train_tokenizer
from gpt1.formats.modeldir import save_model
from gpt1.inference.generate import generate, generate_batch, stream
from gpt1.train.config import TrainConfig, load_config
from gpt1.train.evaluate import evaluate_data
from gpt1.train.finetune import FinetuneConfig, finetune
from gpt1.train.pretrain import pretrain
from tests.model_factories import model_without_stops
from tests.test_battery import assert_one_clear_line, run_main

# ---- configs built in Python ----------------------------------------------------------------

@pytest.mark.parametrize("cls, values, expected", [
    (TrainConfig, {"compile": "no"}, "key 'compile' expects bool, got 'no'"),  # was truthy: it compiled
    (TrainConfig, {"tensorboard": "false"}, "key 'tensorboard' expects bool, got 'false'"),
    (TrainConfig, {"max_steps": 2.5}, "key 'max_steps' expects int, got 2.5"),  # ran 3 steps, recorded 2.5
    (TrainConfig, {"seed": 1.5}, "key 'seed' expects int, got 1.5"),
    (TrainConfig, {"max_steps": None}, "key 'max_steps' expects int, got None"),
    (TrainConfig, {"batch_size": "4"}, "key 'batch_size' expects int, got '4'"),
    (TrainConfig, {"lr": "3e-4"}, "key 'lr' expects float, got '3e-4'"),
    (TrainConfig, {"time_budget": "10"}, "key 'time_budget' expects float, got '10'"),
    (TrainConfig, {"betas": (0.9,)}, "key 'betas' expects tuple"),
    (FinetuneConfig, {"data": "x", "languages": "en"}, "key 'languages' expects list"),  # was matched by substring
    (FinetuneConfig, {"data": "x", "lora_r": 2.5}, "key 'lora_r' expects int, got 2.5"),
])
def test_a_config_built_in_python_is_type_checked_as_load_config_does(cls, values, expected):
    with pytest.raises(Gpt1Error, match=f"^{cls.__name__}: {expected}".replace("(", r"\(")):
        cls(**values)
    with pytest.raises(Gpt1Error, match=f"argument: {expected}".replace("(", r"\(")):  # the same words
        load_config(cls, None, [], **values)


def test_a_config_built_in_python_is_converted_and_replace_still_works():
    cfg = TrainConfig(lr=1, betas=[0.9, 0.99], max_steps=5)
    assert isinstance(cfg.lr, float) and cfg.betas == (0.9, 0.99)  # as load_config gives them
    assert dataclasses.replace(cfg, max_steps=7).max_steps == 7
    with pytest.raises(Gpt1Error, match="key 'compile' expects bool"):
        dataclasses.replace(cfg, compile="yes")
    assert FinetuneConfig(data="x", languages=["en"]).languages == ["en"]


def test_numpy_scalars_are_numbers_in_every_config():
    # A sweep over np.arange: TrainConfig and LoRAConfig said np.int64(8) was "not a positive integer"
    # while SamplingParams took it; each keeps Python's numbers (its metadata is JSON).
    import numpy as np

    from gpt1.core.lora import LoRAConfig

    cfg = TrainConfig(max_steps=np.int64(5), lr=np.float32(0.5))
    assert (cfg.max_steps, cfg.lr) == (5, 0.5) and type(cfg.max_steps) is int and type(cfg.lr) is float
    lora = LoRAConfig(r=np.int64(4), alpha=np.float32(8), dropout=np.float64(0.1), token_ids=[np.int64(3)])
    assert (lora.r, lora.alpha, lora.token_ids) == (4, 8.0, [3]) and type(lora.r) is int and type(lora.alpha) is float
    json.dumps(dataclasses.asdict(lora))
    with pytest.raises(Gpt1Error, match="key 'max_steps' expects int"):
        TrainConfig(max_steps=np.float64(2.5))


def test_pretrain_and_finetune_refuse_what_is_not_a_config(tmp_path, data_dir, tiny_model_dir):
    with pytest.raises(Gpt1Error, match=r"^cfg: expected a TrainConfig .*got dict$"):
        pretrain({"max_steps": 2}, data_dir, tmp_path / "run")
    with pytest.raises(Gpt1Error, match=r"^cfg: expected a FinetuneConfig .*got TrainConfig$"):
        finetune(TrainConfig(max_steps=2), tiny_model_dir, tmp_path / "ft")
    assert not (tmp_path / "run").exists() and not (tmp_path / "ft").exists()


def test_float8_without_torchao_fails_before_the_run_dir_exists(tmp_path, data_dir, capsys, monkeypatch):
    # None in sys.modules is a real import failure (ImportError on `import torchao`), as without the package.
    monkeypatch.setitem(sys.modules, "torchao", None)
    run = tmp_path / "f8"
    rc, err = run_main(capsys, "pretrain", "--data", data_dir, "--out", run, "float8=true", "precision=bf16-mixed",
                       "max_steps=1", "device=cpu")
    assert_one_clear_line(rc, err, r"float8=true needs torchao: pip install 'gpt1\[fp8\]'")
    assert not run.exists()  # a rerun without float8 is not refused as another run's config
    with pytest.raises(Gpt1Error, match="needs torchao"):
        TrainConfig(float8=True, precision="bf16-mixed")


# ---- generation and evaluation --------------------------------------------------------------

def test_generation_refuses_a_wrong_container_by_name(llm):
    model, tok = llm.model, llm.tokenizer
    greedy = SamplingParams(temperature=0, max_new_tokens=2)
    with pytest.raises(Gpt1Error, match=r"^prompts: expected a list of prompts \(each a list of token ids\), "
                                        r"got a list of ints"):
        generate_batch(model, tok, [5, 6, 7], greedy)
    with pytest.raises(Gpt1Error, match="got a list of ints"):
        generate_batch(model, tok, torch.tensor([5, 6, 7]), greedy)
    with pytest.raises(Gpt1Error, match=r"^prompts: .* got NoneType at index 1$"):
        generate_batch(model, tok, [[5], None], greedy)
    with pytest.raises(Gpt1Error, match=r"^prompts: .* got NoneType$"):
        generate_batch(model, tok, None, greedy)
    for params in ({"temperature": 0}, None):
        with pytest.raises(Gpt1Error, match=r"^params: expected a SamplingParams \(e.g. SamplingParams\(temperature=0\)\)"):
            generate(model, tok, [5], params)
        with pytest.raises(Gpt1Error, match="^params: expected a SamplingParams"):
            next(stream(model, tok, [5], params))
    with pytest.raises(Gpt1Error, match="^prompt_ids: expected a list of token ids, got int$"):
        generate(model, tok, 5, greedy)
    # what is right still runs: a generator of prompts, a tensor of ids
    assert len(generate_batch(model, tok, (ids for ids in [[5], [6, 7]]), greedy)) == 2
    assert generate(model, tok, torch.tensor([5, 6]), greedy).completion_tokens == 2


def test_evaluate_data_refuses_a_path_or_a_bare_model(llm, data_dir):
    for wrong, name in ((str(llm.path), "str"), (llm.model, "GPT")):
        with pytest.raises(Gpt1Error, match=rf"^llm: expected a loaded model dir \(llm = gpt1.load\(path\)\), got {name}$"):
            evaluate_data(wrong, [str(data_dir)], max_batches=1, show_progress=False)


def test_load_refuses_a_path_that_is_not_one():
    with pytest.raises(Gpt1Error, match=r"^path: expected a model dir \(a str or Path\), got NoneType$"):
        gpt1.load(None)
    with pytest.raises(Gpt1Error, match="^tokenizer path: expected a model dir or a tokenizer.json .* got NoneType$"):
        Tokenizer.load(None)


# ---- the tokenizer --------------------------------------------------------------------------

def test_tokenizer_refuses_a_wrong_container_by_name(tokenizer):
    last = tokenizer.vocab_size - 1
    cases = [
        (lambda: tokenizer.decode("abc"), r"^token ids: expected a list of ints, got str$"),
        (lambda: tokenizer.decode(5), r"^token ids: expected a list of ints, got int$"),
        (lambda: tokenizer.decode([[5, 6]]), r"^token ids must be integers, got \[5, 6\]$"),
        (lambda: tokenizer.decode([5, 1.5]), r"^token ids must be integers, got 1.5$"),
        (lambda: tokenizer.id_to_bytes([99999]), rf"^token id 99999 is not in the tokenizer's vocabulary \(ids 0 to {last}\)$"),
        # a negative id read the table from its end: the bytes of another token
        (lambda: tokenizer.id_to_bytes([-1]), r"^token id -1 is not in the tokenizer's vocabulary"),
        (lambda: tokenizer.id_to_bytes([None]), r"^token ids must be integers, got None$"),
        (lambda: tokenizer.encode_batch("abc"), r"^texts to encode: expected a list of strings, got one str"),
        (lambda: tokenizer.encode_batch(["a", None]), r"^texts\[1\] to encode: expected a string, got NoneType$"),
        (lambda: tokenizer.encode_batch(["a", "b\udc80"]), r"^texts\[1\] to encode: a lone surrogate"),
        (lambda: train_tokenizer(["hello world"] * 10, 300.5, show_progress=False), "^vocab size must be a whole number, got 300.5$"),
    ]
    for call, pattern in cases:
        with pytest.raises(Gpt1Error, match=pattern):
            call()
    ids = tokenizer.encode("héllo")
    assert tokenizer.decode(torch.tensor(ids)) == tokenizer.decode(iter(ids)) == "héllo"
    assert tokenizer.id_to_bytes(i for i in ids) == "héllo".encode()
    assert tokenizer.encode_batch(["a", "héllo"]) == [tokenizer.encode("a"), ids]


# ---- Hugging Face export: batched generation (docs/interop.md) ------------------------------

def test_hf_export_batched_generate_with_left_padding_equals_gpt1(tmp_path, tiny_config, tokenizer, monkeypatch):
    """The export's tokenizer pads on the right (as GPT-2's on the Hub, what training collators
    expect); the documented `padding_side = "left"` gives gpt1's greedy text in a batch."""
    pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpt1.formats.hf import export_model

    model = model_without_stops(tiny_config, tokenizer, seed=3)
    save_model(tmp_path / "model", model, tokenizer)
    out = export_model(tmp_path / "model", tmp_path / "hf")
    prompts = ["def f(x):", "import os\nimport sys\n\nclass A:"]
    want = [generate(model, tokenizer, tokenizer.encode(p), SamplingParams(temperature=0, max_new_tokens=8)).token_ids
            for p in prompts]
    hf_tok, hf = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf_tok.padding_side == "right"
    hf_tok.padding_side = "left"
    inputs = hf_tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        got = hf.generate(**inputs, do_sample=False, max_new_tokens=8)[:, inputs["input_ids"].shape[1]:].tolist()
    assert got == want


def test_library_argument_errors_are_gpt1_errors(tiny_model_dir):
    # docs/reliability.md: library code raises one exception type; these were ValueErrors, which a
    # caller catching Gpt1Error (as documented) did not catch.
    from gpt1.formats.modeldir import load_model
    from gpt1.serve import create_app

    with pytest.raises(Gpt1Error, match="adapter must be 'merge', 'keep' or 'ignore', got 'merged'"):
        load_model(tiny_model_dir, adapter="merged")
    llm = gpt1.load(tiny_model_dir, device="cpu")
    with pytest.raises(Gpt1Error, match="engine must be 'thread' or 'process', got 'proc'"):
        create_app(llm, engine="proc")
    with pytest.raises(Gpt1Error, match="device and dtype apply to engine='process'"):
        create_app(llm, dtype="bfloat16")
