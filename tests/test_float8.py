"""FP8 matmuls in training (`float8=true`, torchao): which layers, the numbers they give, a run
that trains and saves an ordinary model dir, and the clear errors. On a CPU the FP8 matmuls are
emulated (FP8-rounded operands, high-precision matmuls: the numerics, not the speed); their speed
is a GPU benchmark (`scripts/gpu-check.sh`'s float8 step)."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import torch.nn as nn

from gpt1.core.errors import Gpt1Error
from gpt1.core.model import GPT
from gpt1.formats.modeldir import load_model
from gpt1.train.config import TrainConfig, load_config
from gpt1.train.finetune import FinetuneConfig
from gpt1.train.precision import use_float8_matmuls
from gpt1.train.pretrain import pretrain

pytest.importorskip("torchao.float8")

CPU = torch.device("cpu")
TINY = ["model=tiny", "block_size=32", "batch_size=4", "eval_batches=2", "device=cpu", "lr=3e-3", "min_lr=3e-4",
        "max_steps=12", "save_every=12", "eval_every=12", "precision=bf16-mixed"]


def test_the_blocks_linear_layers_become_float8_and_nothing_else_changes(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    reference = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    assert use_float8_matmuls(model, CPU) == 4 * tiny_config.n_layer  # c_attn, attn c_proj, c_fc, mlp c_proj
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {k for k, v in kinds.items() if v == "Float8Linear"} == {k for k in kinds if k.startswith("transformer.h.")}
    assert kinds["lm_head"] == "Linear"
    # On a CPU, emulated: not PyTorch's CPU `_scaled_mm` (300x slower, and not reproducible on every host).
    assert all(m.config.emulate for m in model.modules() if type(m).__name__ == "Float8Linear")
    # The same parameters under the same names: checkpoints and model dirs are ordinary ones.
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())

    # The logits are bf16's to within FP8's rounding (a few % of their spread), not something else.
    x = torch.randint(0, tiny_config.vocab_size, (2, tiny_config.block_size))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = model(x).float(), reference(x).float()
    assert (ours - theirs).pow(2).mean().sqrt() < 0.1 * theirs.std()
    assert not torch.equal(ours, theirs)  # the matmuls did run in FP8


def test_a_float8_run_trains_and_leaves_an_ordinary_model_dir(data_dir, tmp_path):
    fp8 = pretrain(load_config(TrainConfig, None, TINY + ["float8=true"]), data_dir, tmp_path / "fp8")
    bf16 = pretrain(load_config(TrainConfig, None, TINY), data_dir, tmp_path / "bf16")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "fp8" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.5
    # Same seed and batches: FP8 ends where bf16 ends, to within a few percent.
    assert abs(fp8.val_loss - bf16.val_loss) < 0.03 * bf16.val_loss
    assert json.loads((tmp_path / "fp8" / "train_config.json").read_text())["config"]["float8"] is True

    model = load_model(tmp_path / "fp8")
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("overrides, pattern", [
    (["float8=true"], r"float8=true .* needs precision=bf16-mixed, got 'fp32'"),
    (["float8=true", "precision=fp16-mixed"], r"needs precision=bf16-mixed, got 'fp16-mixed'"),
])
def test_float8_without_bf16_is_refused_by_name(overrides, pattern):
    with pytest.raises(Gpt1Error, match=pattern):
        load_config(TrainConfig, None, overrides)


def test_float8_is_for_pretraining_only():
    with pytest.raises(Gpt1Error, match="float8=true is for pretraining"):
        load_config(FinetuneConfig, None, ["float8=true", "precision=bf16-mixed"])


def test_without_torchao_or_on_another_device_the_error_says_what_to_do(tiny_config, monkeypatch):
    with pytest.raises(Gpt1Error, match="runs on CUDA GPUs .* not on meta"):
        use_float8_matmuls(GPT(tiny_config), torch.device("meta"))
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # as if torchao were not installed
    with pytest.raises(Gpt1Error, match=r"needs torchao: pip install 'gpt1\[fp8\]'"):
        use_float8_matmuls(GPT(tiny_config), CPU)
