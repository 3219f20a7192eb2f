"""Which torch device to run on: the one place that reads a `--device` / `device=` value.

`auto` (or None) picks CUDA (this process's GPU under torchrun), then Apple's MPS, then the
CPU. A named device must exist here: `cuda` without a CUDA GPU, `mps` off a Mac (`mps:1`
anywhere: a Mac has one), or a name torch does not know is a Gpt1Error saying what is available,
never a failure deep in a run. `bf16_supported` says whether a device has native bfloat16.
"""

from __future__ import annotations

import torch

from gpt1.core.errors import Gpt1Error


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def available_devices() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        found.append("mps")
    return found


def check_device_name(name: str) -> None:
    """Refuse a device name no machine has ("gpu", "cuda:x"), as a config is built; whether this
    machine has it is `resolve_device`'s question, when the run starts (a recipe may be written
    on a laptop for a GPU box)."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise Gpt1Error(f"device: unknown device {name!r}; expected auto, cpu, cuda, cuda:N or mps")
    _check_mps_index(device)


def _check_mps_index(device: torch.device) -> None:
    # A Mac has one MPS device; torch accepts `mps:1` and fails at the first tensor put there.
    if device.type == "mps" and device.index not in (None, 0):
        raise Gpt1Error(f"device: {device} does not exist: a Mac has one MPS device; use mps")


def resolve_device(name: str | torch.device | None = None, local_rank: int = 0) -> torch.device:
    """The device for `name` ("auto"/None, "cpu", "cuda", "cuda:N", "mps" or a torch.device)."""
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise Gpt1Error(f"device: unknown device {name!r}; use auto or one of: {', '.join(available_devices())}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise Gpt1Error(f"device: {name} requested but no CUDA GPU is available here; "
                            f"use auto or one of: {', '.join(available_devices())}")
        if device.index is None:
            return torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise Gpt1Error(f"device: {name} requested but there are {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps":
        _check_mps_index(device)
        if not _mps_available():
            raise Gpt1Error(f"device: mps requested but it is not available here; use one of: "
                            f"{', '.join(available_devices())}")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise Gpt1Error(f"device: {name!r} is not supported; use auto or one of: {', '.join(available_devices())}")
    return device


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` runs bfloat16 natively: a CUDA GPU of compute capability 8.0 or more
    (Ampere on), any ROCm GPU, MPS on macOS 14 or later; a CPU counts too (bf16 is right on every
    CPU, fast on those with AVX-512 BF16 or AMX). Not `torch.cuda.is_bf16_supported()`: it asks
    about the current GPU rather than `device`, and says yes to a T4 or V100, which emulate bf16."""
    if device.type == "cuda":
        return bool(torch.version.hip) or torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "mps":
        return _mps_available() and torch.backends.mps.is_macos_or_newer(14, 0)
    return True


def no_bf16(device: torch.device) -> str:
    """Why `device` lacks bfloat16 (where `bf16_supported` says so), for an error or a warning."""
    if device.type == "mps":
        return "MPS has no bfloat16 before macOS 14, which this Mac does not run"
    major, minor = torch.cuda.get_device_capability(device)
    return (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no native bfloat16, "
            "which needs 8.0 (Ampere) or later")
