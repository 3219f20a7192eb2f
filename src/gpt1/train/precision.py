"""Mixed precision: the autocast context of a `precision` setting (fp32, fp16-mixed, bf16-mixed)."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, precision: str):
    """Autocast for fp16-mixed / bf16-mixed (weights stay FP32: the "master" copy); a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16-mixed" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)
