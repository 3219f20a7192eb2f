"""gpt1: train a GPT-style chat model from scratch on one machine, fine-tune it, serve it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Raised whenever what gpt1 writes to disk changes meaning (a run record's keys, the data's split
# rule, a sampler's state): run records keep it, so a user installed from a wheel can tell which gpt1
# began a run (0.2.0: the chat split, data fingerprints and continuations of 2026-12-07; 0.3.0:
# data_order, epochs as passes over the data, 2026-12-07 evening).
__version__ = "0.3.0"

# The public names, imported on first use (PEP 562): `import gpt1` alone does not load torch, so
# the `gpt1` command can catch a Ctrl-C pressed while torch loads (gpt1.cli.run).
_EXPORTS = {"ModelConfig": "gpt1.core.config", "Gpt1Error": "gpt1.core.errors", "GPT": "gpt1.core.model",
            "KVCache": "gpt1.core.model", "Tokenizer": "gpt1.core.tokenizer",
            "train_tokenizer": "gpt1.core.tokenizer", "LLM": "gpt1.inference.llm", "load": "gpt1.inference.llm"}
__all__ = ["GPT", "KVCache", "LLM", "ModelConfig", "Gpt1Error", "Tokenizer", "load", "train_tokenizer", "__version__"]

if TYPE_CHECKING:
    from gpt1.core.config import ModelConfig
    from gpt1.core.errors import Gpt1Error
    from gpt1.core.model import GPT, KVCache
    from gpt1.core.tokenizer import Tokenizer, train_tokenizer
    from gpt1.inference.llm import LLM, load
else:
    # Out of the type checkers' sight (the imports above are what they read): a module
    # __getattr__ makes every name of gpt1 valid to mypy and pyright, `gpt1.laod` included.
    def __getattr__(name: str) -> Any:
        if name not in _EXPORTS:
            raise AttributeError(f"module 'gpt1' has no attribute {name!r}")
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # once
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
