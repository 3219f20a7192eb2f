"""Optional packages, imported where they are used, with one clear error when they cannot be.

`require("transformers", "Hugging Face interop", "pip install 'gpt1[hf]'")` returns the module.
Two failures read differently, because they have different fixes:

- the package is not installed: "<purpose> needs the `transformers` package: <install>";
- it is installed but its import fails (transformers with too old a safetensors, pyarrow built
  for another numpy): "<purpose>: `transformers` is installed but failed to import: <its own
  message>". Installing it again would change nothing; the message names what would.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from gpt1.core.errors import Gpt1Error


def require(module: str, purpose: str, install: str) -> ModuleType:
    """Import `module` (dotted names too), or raise Gpt1Error saying why it cannot be used for `purpose`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if is_missing(e, module):
            raise Gpt1Error(f"{purpose} needs the `{e.name}` package: {install}") from None
        raise Gpt1Error(failed_import(purpose, module, e)) from None


def is_missing(error: ImportError, module: str) -> bool:
    """Whether `error`, raised importing `module`, says that `module` itself (or a package it is
    part of) is not installed. An installed module that imports a missing or too old dependency
    raises an ImportError too, naming the dependency: that is not `module` missing."""
    name = error.name if isinstance(error, ModuleNotFoundError) else None
    return name is not None and (module == name or module.startswith(name + "."))


def failed_import(purpose: str, module: str, error: ImportError) -> str:
    """The one-line message for an installed `module` whose import raised `error`."""
    return f"{purpose}: `{module}` is installed but failed to import: {' '.join(str(error).split())}"


def import_quietly(module: str) -> ModuleType:
    """Import `module` with its package's log at ERROR meanwhile: matplotlib's import told a user
    whose HOME cannot be written (a container's user, a shared account), in two multi-line
    warnings, that it made itself a temporary config dir, at every plot, pretrain and finetune.
    It still makes that dir (its own choice: a fixed folder in /tmp would be another user's to
    plant a matplotlibrc in)."""
    logger = logging.getLogger(module.partition(".")[0])
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return importlib.import_module(module)
    finally:
        logger.setLevel(level)
