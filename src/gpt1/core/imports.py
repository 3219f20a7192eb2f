"""Optional packages, imported where they are used, with one clear error when they cannot be.

`require("transformers", "Hugging Face interop", "pip install 'gpt1[hf]'")` returns the module.
Two failures read differently, because they have different fixes:

- the package is not installed: "<purpose> needs the `transformers` package: <install>";
- it is installed but its import fails (transformers with too old a safetensors, pyarrow built
  for another numpy): "<purpose>: `transformers` is installed but failed to import: <its own
  message>". Installing it again would change nothing; the message names what would.
"""

from __future__ import annotations

import contextlib
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


# The set-up notices that a library logs at its import, by logger, and that are not the user's
# business: matplotlib, where HOME cannot be written (a container's user, a shared account), said in
# two multi-line warnings at every plot, pretrain and finetune that it made itself a temporary
# config dir. It still makes that dir (its own choice: a fixed folder in /tmp would be another
# user's to plant a matplotlibrc in); its other warnings (a bad line in the user's matplotlibrc)
# still come through.
SETUP_NOTICES = {"matplotlib": ("mkdir -p failed for path ", "Matplotlib created a temporary cache directory ")}


def import_quietly(module: str) -> ModuleType:
    """Import `module` without its package's `SETUP_NOTICES`."""
    package = module.partition(".")[0]
    filters = []
    for name, notices in SETUP_NOTICES.items():
        if name.partition(".")[0] == package:
            filters.append((logging.getLogger(name), _dropping(notices)))
            filters[-1][0].addFilter(filters[-1][1])
    try:
        return importlib.import_module(module)
    finally:
        for logger, dropping in filters:
            logger.removeFilter(dropping)


def _dropping(notices: tuple[str, ...]):
    return lambda record: not record.getMessage().startswith(notices)


# torchao's notices at its import, by logger: the CUDA kernels it cannot load on this machine (it
# does not need them here) and "register_constant() on Enum subclasses is deprecated". transformers
# imports torchao where it is installed (gpt1[fp8], so gpt1[dev]): a benchmark's reference side
# printed four such lines before its table.
TORCHAO_NOTICES = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def without_torchao_notices():
    """Imports in this block (torchao's, or transformers' and lm-eval's that import it) log no
    warnings through `TORCHAO_NOTICES`; errors still come through."""
    quiet = [logging.getLogger(name) for name in TORCHAO_NOTICES]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
