"""What GPT-2 can hold: the exporters' check of a model against GPT-2's fixed layout.

Both exports describe the model as GPT-2 (`formats/hf.py`: transformers' GPT2LMHeadModel;
`formats/gguf.py`: llama.cpp's gpt2) and copy its weights by name. A model changed beyond GPT-2
(a SwiGLU gate, RMSNorm, rotary positions, a new config field) would be written as a GPT-2 that
loads and computes something else, so `check_gpt2_layout` refuses it first, in one line naming
every difference.

The layout is derived from the `ModelConfig` alone, never from `GPT`: `GPT` is the code a
researcher edits, and a layout read from it would follow every edit. What the weights cannot
show is checked by module type where that is cheap (a norm must be a LayerNorm, an activation
module tanh-GELU); an operation written into a `forward` (a softcap, F.silu) is not seen, which
docs/model.md says.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch.nn as nn

from gpt1.core.config import ModelConfig
from gpt1.core.errors import Gpt1Error

# Every ModelConfig field the exporters carry, and where GPT-2 holds it. A field not named here
# is refused at any value but its default: add it here only once both exporters write it
# (formats/hf.py `hf_config_dict`, formats/gguf.py `_add_hparams`).
GPT2_FIELDS = {
    "vocab_size": "vocab_size",
    "block_size": "n_positions",
    "n_layer": "n_layer",
    "n_head": "n_head",
    "n_embd": "n_embd",
    "mlp_ratio": "n_inner",
    "bias": "zero biases where there are none",
    "tie_embeddings": "tie_word_embeddings",
    "dropout": "resid_pdrop, embd_pdrop, attn_pdrop",
    "norm_eps": "layer_norm_epsilon",
}
# The module types GPT-2 is built of (leaf modules: those without children).
GPT2_MODULES = (nn.Embedding, nn.Dropout, nn.Linear, nn.LayerNorm, nn.GELU)
SHOWN = 4  # names listed per kind of difference; the rest are counted


def gpt2_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The state_dict names and shapes of GPT-2 for `config` (gpt1's names, nn.Linear's (out, in)
    layout): with biases or without, the head's weight also where it is tied to the embedding."""
    C, H, V = config.n_embd, config.mlp_hidden, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (config.block_size, C)}

    def linear(name: str, out: int, inp: int) -> None:
        shapes[f"{name}.weight"] = (out, inp)
        if config.bias:
            shapes[f"{name}.bias"] = (out,)

    def norm(name: str) -> None:
        shapes[f"{name}.weight"] = (C,)
        if config.bias:
            shapes[f"{name}.bias"] = (C,)

    for i in range(config.n_layer):
        block = f"transformer.h.{i}"
        norm(f"{block}.ln_1")
        linear(f"{block}.attn.c_attn", 3 * C, C)
        linear(f"{block}.attn.c_proj", C, C)
        norm(f"{block}.ln_2")
        linear(f"{block}.mlp.c_fc", H, C)
        linear(f"{block}.mlp.c_proj", C, H)
    norm("transformer.ln_f")
    shapes["lm_head.weight"] = (V, C)  # GPT-2's head has no bias
    return shapes


def check_gpt2_layout(model: nn.Module, source: str | Path, target: str) -> None:
    """Raise Gpt1Error, one line starting `source: cannot export to <target>:`, naming every way
    `model` differs from GPT-2 (weights, module types, config fields); nothing when it is GPT-2."""
    config = model.config
    absent = [name for name in GPT2_FIELDS if not hasattr(config, name)]
    if absent:  # the layout below is built from these
        raise Gpt1Error(f"{source}: cannot export to {target}: the model config lacks the field(s) "
                        f"{', '.join(absent)} that the GPT-2 mapping reads")
    problems = _weight_problems(model, gpt2_shapes(config)) + _module_problems(model) + _config_problems(config)
    if problems:
        raise Gpt1Error(f"{source}: cannot export to {target}: {'; '.join(problems)}")


def _weight_problems(model: nn.Module, expected: dict[str, tuple[int, ...]]) -> list[str]:
    state = model.state_dict()
    extra = [name for name in state if name not in expected]
    missing = [name for name in expected if name not in state]
    reshaped = [f"{name} {tuple(state[name].shape)} where GPT-2's is {shape}"
                for name, shape in expected.items() if name in state and tuple(state[name].shape) != shape]
    problems = []
    if extra:
        problems.append(f"the model has weights GPT-2 has no place for ({_listed(extra)})")
    if missing:
        problems.append(f"the model lacks weights GPT-2 has ({_listed(missing)})")
    if reshaped:
        problems.append(f"the model has weights of other shapes ({_listed(reshaped)})")
    if model.config.tie_embeddings and getattr(model, "lm_head", None) is not None and \
            model.lm_head.weight is not model.transformer.wte.weight:
        problems.append("tie_embeddings is true but lm_head.weight is not the token embedding (GPT-2 stores it once)")
    return problems


def _module_problems(model: nn.Module) -> list[str]:
    """Module types GPT-2 lacks: RMSNorm has a weight as LayerNorm has, so a model without biases
    shows it only in its type; likewise an activation module other than tanh-GELU."""
    other = [f"{name} is {type(module).__name__}" for name, module in model.named_modules()
             if not any(module.children()) and type(module) not in GPT2_MODULES]
    other += [f"{name} is GELU(approximate={module.approximate!r})" for name, module in model.named_modules()
              if type(module) is nn.GELU and module.approximate != "tanh"]
    if not other:
        return []
    return [f"modules GPT-2 does not have ({_listed(other)}), where GPT-2 has LayerNorm and tanh-GELU"]


def _config_problems(config: Any) -> list[str]:
    problems = []
    for field in dataclasses.fields(config):
        if field.name in GPT2_FIELDS:
            continue
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        value = getattr(config, field.name)
        if default is dataclasses.MISSING or value != default:
            problems.append(f"config field {field.name}={value!r} has no GPT-2 equivalent")
    return problems


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown if len(names) <= SHOWN else f"{shown}, ... ({len(names)} in all)"
