"""Mixed precision: the autocast context of a `precision` setting (fp32, fp16-mixed, bf16-mixed),
and the fallback from bf16 to fp16 on GPUs without bf16 support."""

from __future__ import annotations

import contextlib

import torch

from gpt1.core.progress import warn


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision to train in: `precision`, except bf16-mixed on a CUDA GPU without bf16
    (before Ampere), which falls back to fp16-mixed (autocast + GradScaler) with a warning."""
    if precision == "bf16-mixed" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        warn(f"{torch.cuda.get_device_name(device)} has no bf16 support: training in fp16-mixed "
             "(autocast + GradScaler) instead of bf16-mixed")
        return "fp16-mixed"
    return precision


def autocast(device: torch.device, precision: str):
    """Autocast for fp16-mixed / bf16-mixed (weights stay FP32: the "master" copy); a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16-mixed" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)
