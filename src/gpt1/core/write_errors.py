"""A failed write's error names its file, whatever library did the writing."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Iterator

from gpt1.core.errors import Gpt1Error


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Name `path` in the error of a write to it that fails in the block (a full disk, a
    file-size limit), so that the CLI can say which file in one line. The writers gpt1 uses
    leave it out: a plain write's OSError has no file name; numpy's `tofile` has no errno either
    ("16329 requested and 5217 written"); safetensors raises a SafetensorError that holds the
    OS error as text; torch.save replaces the OSError with a RuntimeError of its own ("unexpected
    pos") as it closes its zip writer. An error that names its file already passes unchanged."""
    try:
        yield
    except Exception as e:
        cause = _os_error(e)
        if cause is None or cause.filename is not None:
            raise
        if cause.errno is None:
            raise Gpt1Error(f"{path}: cannot write (the disk is full or a file-size limit was reached); "
                            "free some space or raise the limit (ulimit -f)") from e
        raise OSError(cause.errno, cause.strerror, str(path)) from e


def _os_error(error: Exception) -> OSError | None:
    """The OSError behind a failed write, whatever the writer raised (see `writing`)."""
    if isinstance(error, OSError):
        return error
    # Only a write that imported safetensors can have raised its error.
    safetensors = sys.modules.get("safetensors")
    if safetensors is not None and isinstance(error, safetensors.SafetensorError) and \
            (code := re.search(r"\(os error (\d+)\)", str(error))):
        return OSError(int(code[1]), os.strerror(int(code[1])))
    if isinstance(error, RuntimeError) and isinstance(error.__context__, OSError):
        return error.__context__
    return None
