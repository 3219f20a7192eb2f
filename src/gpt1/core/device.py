"""Which torch device to run on: the one place that reads a `--device` / `device=` value.

`auto` (or None) picks CUDA (this process's GPU under torchrun), then Apple's MPS, then the
CPU. A named device must exist here: `cuda` without a CUDA GPU, `mps` off a Mac, or a name
torch does not know is a Gpt1Error saying what is available, never a failure deep in a run.
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
        kind = torch.device(name).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda", "mps"):
        raise Gpt1Error(f"device: unknown device {name!r}; expected auto, cpu, cuda, cuda:N or mps")


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
    elif device.type == "mps" and not _mps_available():
        raise Gpt1Error(f"device: mps requested but it is not available here; use one of: {', '.join(available_devices())}")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise Gpt1Error(f"device: {name!r} is not supported; use auto or one of: {', '.join(available_devices())}")
    return device
