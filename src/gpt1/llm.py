"""`gpt1.load(path)`: a model dir as one object with the model and its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gpt1.config import ModelConfig
from gpt1.model import GPT
from gpt1.modeldir import load_model
from gpt1.tokenizer import Tokenizer


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass
class LLM:
    """A loaded model dir: `.model` (a GPT in eval mode) and `.tokenizer`."""

    model: GPT
    tokenizer: Tokenizer
    path: Path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "LLM":
        path = Path(path)
        device = torch.device(device) if device is not None else default_device()
        model = load_model(path, device=device, dtype=dtype)
        return cls(model=model, tokenizer=Tokenizer.load(path), path=path)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LLM:
    """Load a model dir (pretrained, fine-tuned or a training run dir)."""
    return LLM.load(path, device=device, dtype=dtype)
