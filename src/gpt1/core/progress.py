"""Progress bars and messages: the only way library code talks to the user.

Messages go through the `gpt1` logger (the CLI routes it to stderr, so stdout stays clean
for generated text); progress bars are tqdm on stderr, silenced with GPT1_QUIET=1 or when
`disable=True`. Keeping this in one place lets tests and servers run the library silently.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
logger = logging.getLogger("gpt1")


def info(message: str) -> None:
    logger.info(message)


def warn(message: str) -> None:
    logger.warning(message)


def progress(iterable: Iterable[T] | None = None, *, disable: bool | None = None, **kwargs) -> tqdm:
    """A tqdm bar on stderr; quiet when GPT1_QUIET is set."""
    if disable is None:
        disable = os.environ.get("GPT1_QUIET", "") not in ("", "0")
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("smoothing", 0.1)
    return tqdm(iterable, disable=disable, **kwargs)


class _TqdmHandler(logging.Handler):
    """Writes log lines through tqdm so they do not tear an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=__import__("sys").stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_console_logging(level: int = logging.INFO) -> None:
    """Route the gpt1 logger to stderr (called by the CLI, never by the library)."""
    if any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        return
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
