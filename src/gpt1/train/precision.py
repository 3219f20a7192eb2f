"""Mixed precision: the autocast context of a `precision` setting (fp32, fp16-mixed, bf16-mixed),
the fallback from bf16 to fp16 on GPUs without bf16 support, and FP8 matmuls (`float8=true`).

FP8 training (torchao's float8, `convert_to_float8_training`) swaps the blocks' `nn.Linear`
layers for `Float8Linear`: each of their matmuls casts its input and weight to float8 e4m3 (the
output's gradient to e5m2) with one dynamic scale per tensor (its absolute maximum) and runs on
the FP8 tensor cores at twice bf16's peak, accumulating and returning in bf16. The weights, their
gradients and the optimizer stay as they were (FP32 masters), and so do the state dict's names:
a checkpoint or model dir of an FP8 run is an ordinary one. The output head (its 51,682 rows are
not a multiple of 16, which FP8 matmuls need, and its logits are the most precision-sensitive
matmul), the embeddings, the attention's QK^T and AV, and LayerNorms stay in bf16; torchtitan,
which trains Llama 3 this way, keeps the head out too.

A CPU has no FP8 matmul units: there the casts and scales are the same, but each matmul runs in
high precision on the FP8-rounded operands (torchao's `emulate=True`), the numerics of an FP8 run
at ordinary matmul speed. PyTorch's own CPU `_scaled_mm` was 300x slower than that (3 s for two
512-wide layers on 128 rows) and, on one CI host, not reproducible across a resume.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from gpt1.core.device import bf16_supported, no_bf16
from gpt1.core.errors import Gpt1Error
from gpt1.core.imports import without_torchao_notices
from gpt1.core.progress import warn
from gpt1.train.config import PRECISIONS

# FP8 tensor cores: compute capability 8.9 (Ada: L4, L40S, RTX 4090) and 9.0+ (Hopper H100/H200, Blackwell).
FLOAT8_MIN_CAPABILITY = (8, 9)


def resolve_precision(precision: str, device: torch.device, doing: str = "training") -> str:
    """The precision to train (or evaluate: `doing`) in: `precision`, one of PRECISIONS, except
    bf16-mixed where the device has no bf16 (`gpt1.core.device.bf16_supported`), which falls back
    with a warning: on a CUDA GPU before Ampere to fp16-mixed (autocast + GradScaler); on MPS
    before macOS 14 to fp32, which every Mac runs (GradScaler on MPS is recent in PyTorch, and
    untested here)."""
    if precision not in PRECISIONS:  # autocast() would take any other name for bf16
        raise Gpt1Error(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "bf16-mixed" or bf16_supported(device):
        return precision
    if device.type == "mps":
        warn(f"{no_bf16(device)}: {doing} in fp32 instead of bf16-mixed")
        return "fp32"
    mixed = "fp16-mixed (autocast + GradScaler)" if doing == "training" else "fp16-mixed"
    warn(f"{no_bf16(device)}: {doing} in {mixed} instead of bf16-mixed")
    return "fp16-mixed"


def autocast(device: torch.device, precision: str):
    """Autocast for fp16-mixed / bf16-mixed (weights stay FP32: the "master" copy); a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16-mixed" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_float8_matmuls(model: nn.Module, device: torch.device) -> int:
    """Swap the linear layers inside `model`'s transformer blocks for torchao's `Float8Linear`
    (see the module docstring), in place; returns how many. A GPU without FP8 tensor cores, a
    device other than CUDA or CPU, or torchao missing is a Gpt1Error. On a CPU the FP8 matmuls
    run emulated (no FP8 units): for tests and checks, not for speed."""
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < FLOAT8_MIN_CAPABILITY:
            raise Gpt1Error(f"float8=true needs FP8 tensor cores (compute capability >= 8.9: H100/H200, L4, "
                            f"L40S, RTX 4090); {torch.cuda.get_device_name(device)} is "
                            f"{capability[0]}.{capability[1]}. Train with precision=bf16-mixed alone")
    elif device.type == "cpu":
        warn("float8=true on a CPU: it has no FP8 matmul units, so the FP8 matmuls are emulated "
             "(FP8-rounded operands, high-precision matmuls): useful to check a recipe, not to train fast")
    else:
        raise Gpt1Error(f"float8=true runs on CUDA GPUs (and, emulated, on CPUs), not on {device.type}")
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if blocks is None:
        raise Gpt1Error("float8=true needs a gpt1 GPT (its blocks' linear layers)")
    convert, config = _torchao_float8()

    def in_a_block(module: nn.Module, name: str) -> bool:
        # FP8 matmuls need both dimensions to be multiples of 16.
        return (name.startswith("transformer.h.") and isinstance(module, nn.Linear)
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    before = sum(1 for m in blocks.modules() if isinstance(m, nn.Linear))
    convert(model, module_filter_fn=in_a_block, config=config(emulate=device.type == "cpu"))
    converted = sum(1 for m in blocks.modules() if type(m).__name__ == "Float8Linear")
    if converted < before:
        warn(f"float8=true: {before - converted} of the blocks' {before} linear layers stay in bf16 "
             "(a dimension that is not a multiple of 16)")
    return converted


def _torchao_float8():
    """torchao's `convert_to_float8_training` and `Float8LinearConfig`, imported without its notices about the CUDA kernels
    it cannot load on this machine (it does not need them for float8 training)."""
    try:
        with without_torchao_notices():
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise Gpt1Error("float8=true needs torchao: pip install 'gpt1[fp8]' (or pip install torchao)") from None
    return convert_to_float8_training, Float8LinearConfig
