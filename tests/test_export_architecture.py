"""A model changed beyond GPT-2 is refused by both exporters, not exported as a GPT-2 that computes
something else. Each changed model is built as a researcher's edit of core/model.py would build it
(its classes replaced for the test), saved and loaded through the real model folder, then exported."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import gpt1.core.config
import gpt1.core.model
import gpt1.formats.modeldir
from gpt1.benchmarks.generate import benchmark_model
from gpt1.core.config import ModelConfig
from gpt1.core.errors import Gpt1Error
from gpt1.core.model import GPT, MLP, Block
from gpt1.formats.gguf import export_gguf
from gpt1.formats.gpt2_layout import check_gpt2_layout, gpt2_shapes
from gpt1.formats.hf import export_model
from gpt1.formats.modeldir import save_model


class SwiGLU(MLP):
    """nanoGPT-style SwiGLU edit: a gate beside c_fc."""

    def __init__(self, config):
        super().__init__(config)
        self.c_gate = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)


class RMSNormBlock(Block):
    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        self.ln_1, self.ln_2 = nn.RMSNorm(config.n_embd), nn.RMSNorm(config.n_embd)


class RotaryGPT(GPT):
    """Rotary positions: no learned position table."""

    def __init__(self, config):
        super().__init__(config)
        del self.transformer.wpe


@dataclass
class SoftcapConfig(ModelConfig):
    logit_softcap: float = 0.0


def _swiglu(monkeypatch):
    monkeypatch.setattr(gpt1.core.model, "MLP", SwiGLU)
    return {}


def _rmsnorm(monkeypatch):
    monkeypatch.setattr(gpt1.core.model, "Block", RMSNormBlock)
    return {}


def _rmsnorm_without_biases(monkeypatch):
    monkeypatch.setattr(gpt1.core.model, "Block", RMSNormBlock)
    return {"bias": False}  # the weights are LayerNorm(bias=False)'s: only the module type shows it


def _rotary(monkeypatch):
    monkeypatch.setattr(gpt1.formats.modeldir, "GPT", RotaryGPT)
    return {}


def _softcap(monkeypatch):
    for module in (gpt1.core.config, gpt1.formats.modeldir):
        monkeypatch.setattr(module, "ModelConfig", SoftcapConfig)
    return {"logit_softcap": 5.0}


CHANGES = {  # edit -> what the one-line refusal must name
    "swiglu": (_swiglu, "the model has weights GPT-2 has no place for (transformer.h.0.mlp.c_gate.weight, "),
    "rmsnorm": (_rmsnorm, "the model lacks weights GPT-2 has (transformer.h.0.ln_1.bias, "),
    "rmsnorm-no-bias": (_rmsnorm_without_biases, "modules GPT-2 does not have (transformer.h.0.ln_1 is RMSNorm, "),
    "rotary": (_rotary, "the model lacks weights GPT-2 has (transformer.wpe.weight)"),
    "softcap": (_softcap, "config field logit_softcap=5.0 has no GPT-2 equivalent"),
}


@pytest.fixture(params=list(CHANGES))
def changed_dir(request, monkeypatch, tiny_config, tokenizer, tmp_path):
    """A saved model dir of an edited architecture, the edit still in place (as in the researcher's code)."""
    edit, expected = CHANGES[request.param]
    overrides = edit(monkeypatch)
    config = gpt1.core.config.ModelConfig(**{**tiny_config.to_dict(), **overrides})
    torch.manual_seed(0)
    model = gpt1.formats.modeldir.GPT(config)
    save_model(tmp_path / "model", model, tokenizer)
    return tmp_path / "model", expected


EXPORTERS = {"hf": (lambda model_dir, out: export_model(model_dir, out / "hf"), "Hugging Face (GPT-2)"),
             "gguf": (lambda model_dir, out: export_gguf(model_dir, out / "model.gguf"), "GGUF (llama.cpp's gpt2)")}


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_each_exporter_refuses_a_model_gpt2_cannot_hold(changed_dir, tmp_path, exporter):
    model_dir, expected = changed_dir
    export, target = EXPORTERS[exporter]
    with pytest.raises(Gpt1Error) as e:
        export(model_dir, tmp_path / "out")
    assert str(e.value).startswith(f"{model_dir}: cannot export to {target}: ")
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_every_difference_is_named_in_one_line_and_long_lists_are_counted(tiny_config):
    model = GPT(dataclasses.replace(tiny_config, n_layer=3))
    for block in model.transformer.h:
        block.mlp.c_gate = nn.Linear(tiny_config.n_embd, tiny_config.mlp_hidden)
    model.transformer.ln_f = nn.RMSNorm(tiny_config.n_embd)
    del model.transformer.wpe
    with pytest.raises(Gpt1Error) as e:
        check_gpt2_layout(model, "M", "T")
    message = str(e.value)
    assert message.startswith("M: cannot export to T: the model has weights GPT-2 has no place for "
                              "(transformer.h.0.mlp.c_gate.weight, transformer.h.0.mlp.c_gate.bias, ")
    assert "transformer.h.1.mlp.c_gate.bias, ... (6 in all)" in message
    assert "lacks weights GPT-2 has (transformer.wpe.weight, transformer.ln_f.bias)" in message
    assert "transformer.ln_f is RMSNorm" in message


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tie", [True, False])
def test_the_shipped_architecture_passes_in_every_variant(tiny_config, bias, tie):
    model = GPT(dataclasses.replace(tiny_config, bias=bias, tie_embeddings=tie))
    check_gpt2_layout(model, "M", "T")  # no error
    assert set(gpt2_shapes(model.config)) == set(model.state_dict())


def test_a_new_config_field_at_its_default_exports_and_a_changed_activation_is_named(tiny_config):
    model = GPT(tiny_config)
    model.config = SoftcapConfig(**tiny_config.to_dict())  # at its default: the model is GPT-2
    check_gpt2_layout(model, "M", "T")
    model.transformer.h[1].mlp.gelu = nn.GELU()  # exact GELU, not GPT-2's tanh approximation
    with pytest.raises(Gpt1Error, match=r"transformer\.h\.1\.mlp\.gelu is GELU\(approximate='none'\)"):
        check_gpt2_layout(model, "M", "T")


def _config_module_with(field_line: str, monkeypatch) -> types.ModuleType:
    """core/config.py as it is once a researcher adds `field_line` to ModelConfig: executed as a
    module of its own, so that its presets are built as at `import gpt1`."""
    source = inspect.getsource(gpt1.core.config)
    anchor = "    norm_eps: float = 1e-5\n"
    assert anchor in source
    module = types.ModuleType("edited_config")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses looks its module up there
    exec(compile(source.replace(anchor, anchor + field_line + "\n"), "edited_config.py", "exec"), module.__dict__)
    return module


def test_a_string_config_field_is_supported_and_another_type_is_named(monkeypatch):
    edited = _config_module_with('    norm: str = "layer"', monkeypatch)  # before the fix: KeyError 'str' here
    assert edited.PRESETS["tiny"].norm == "layer"
    assert edited.ModelConfig.from_dict({"norm": "rms"}).norm == "rms"
    with pytest.raises(Gpt1Error, match="model config: norm must be a string, got 3"):
        edited.ModelConfig(norm=3)
    with pytest.raises(Gpt1Error, match=r"model config: field softcap is declared 'float \| None'; "
                                        r"ModelConfig fields must be one of int, float, bool, str"):
        _config_module_with("    softcap: float | None = None", monkeypatch)


def test_an_output_head_with_a_bias_is_refused_as_the_loss_would_never_train_it(monkeypatch, tiny_config):
    class BiasedLinear(nn.Linear):  # the researcher's `nn.Linear(n_embd, vocab_size, bias=True)`
        def __init__(self, in_features, out_features, bias=True, **kwargs):
            super().__init__(in_features, out_features, bias=True, **kwargs)

    monkeypatch.setattr(torch.nn, "Linear", BiasedLinear)
    with pytest.raises(Gpt1Error, match=r"GPT: lm_head must be an nn.Linear without a bias, got a BiasedLinear "
                                        r"with a bias: the loss computes the output layer from lm_head.weight alone"):
        GPT(tiny_config)


def test_bench_generate_builds_a_model_without_biases(tiny_config):
    special = [0, 1, 2]
    model = benchmark_model(dataclasses.replace(tiny_config, bias=False), special, torch.device("cpu"))
    assert model.transformer.ln_f.bias is None
    torch.manual_seed(1)
    logits = model(torch.randint(3, tiny_config.vocab_size, (2, 16)))
    assert (logits[..., special] == 0).all()
    assert (logits.argmax(-1) >= len(special)).all()  # greedy never picks a special token
    # With biases the special tokens are pushed far down, as before.
    biased = benchmark_model(tiny_config, special, torch.device("cpu"))
    assert (biased(torch.randint(3, tiny_config.vocab_size, (2, 16)))[..., special] < -50).all()
