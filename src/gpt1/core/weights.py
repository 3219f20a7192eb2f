"""Weights files: values checked before use, and safetensors written atomically and reproducibly.

No torch import here: the functions take tensors, and safetensors is imported by the one that
writes them, so importing this module loads neither.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from gpt1.core.atomic import atomic_path
from gpt1.core.errors import Gpt1Error

if TYPE_CHECKING:
    import torch


# The dtypes a weights file may hold (torch's names): converted to the model's on load.
WEIGHT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def check_weight_values(file: str | Path, state: dict[str, torch.Tensor], what: str = "model") -> None:
    """Refuse weights that load but compute garbage: integer (or float8, quantized) tensors, which
    loading would convert silently, and NaN or infinite values (a diverged training). fp16, bf16
    and f64 are fine: they are converted on load."""
    for name, tensor in state.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in WEIGHT_DTYPES:
            raise Gpt1Error(f"{file}: {name} holds {dtype} numbers, expected "
                            "floating-point weights (float32, float16, bfloat16 or float64; integer or quantized "
                            "weights are not supported)")
        if not tensor.isfinite().all():
            raise Gpt1Error(f"{file}: {name} holds NaN or infinite values: the {what} is broken "
                            "(e.g. saved from a diverged training); use an earlier checkpoint")


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None, *,
                     within: str | os.PathLike | None = None) -> None:
    """Save a state dict as safetensors, atomically (tensors are made contiguous first); `within`:
    as `atomic_path`'s."""
    from safetensors.torch import save_file  # torch: see the module docstring

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(path, within=within) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        if metadata and len(metadata) > 1:
            _sort_metadata(tmp)


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its metadata keys in sorted order. safetensors' writer
    keeps them in a Rust HashMap, whose order changes from process to process: the same adapter
    came out as two different files (and fingerprints) from two runs of one command."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:  # the same JSON in another order: as long, padded with spaces as the writer pads
            f.seek(8)
            f.write(text.ljust(size))
