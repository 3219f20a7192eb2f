"""The server's log of failed generations: `FailureLog` answers an error that ended an accepted
request, and says it in the log, throttled, with a traceback per place it was raised."""

from __future__ import annotations

import math
import threading
import time

from gpt1.core.errors import Gpt1Error
from gpt1.core.progress import logger
from gpt1.serve.bridge import chunk_batches
from gpt1.serve.errors import ApiError, generation_error

FAILURE_LOG_INTERVAL_S = 5.0  # the most often a failed request is a line in the log
_TRACEBACK_PLACES = 64  # the places whose traceback is logged; a failure raised elsewhere gets its line only


class FailureLog:
    """Answers an error that ended an accepted request, and says it in the server's log, for a
    stream as for a JSON reply (a stream's error event reached its client alone, under an access
    line of 200 OK): a line per failed request, one every FAILURE_LOG_INTERVAL_S at most (the
    next counting those left unsaid), with the traceback of the first failure raised at each
    place. One fault fails every row of the batch: uvicorn logged a ~90-line traceback for each
    (16 at --max-batch 16), and nothing at all for streams."""

    def __init__(self):
        self._lock = threading.Lock()  # requests of every stream fail together
        self._last, self._unsaid = -math.inf, 0
        self._places: set[tuple[str, str, int]] = set()

    def answer(self, e: Exception) -> ApiError:
        """The reply to `e`, which ended a request after `submit` accepted it."""
        error = generation_error(e)  # a GenerationFault (logits that overflow) is the model's: a 500
        if error.status == 500:  # a 503 is no fault (a stopped engine) or is said where it is decided (a shortage)
            self._say(e, error)
        return error

    def _say(self, e: Exception, error: ApiError) -> None:
        place = _raised_at(e)
        with self._lock:
            now = time.monotonic()
            traceback = place is not None and place not in self._places and len(self._places) < _TRACEBACK_PLACES
            if not traceback and now - self._last < FAILURE_LOG_INTERVAL_S:
                self._unsaid += 1
                return
            if traceback:
                self._places.add(place)
            unsaid, self._last, self._unsaid = self._unsaid, now, 0
        logger.error(f"a request got {error.status}: {error.message}"
                     + (f" ({unsaid:,} more times since the last such line)" if unsaid else ""),
                     exc_info=(type(e), e, e.__traceback__) if traceback else None)


def _raised_at(e: Exception) -> tuple[str, str, int] | None:
    """Where `e` was raised (its type, file and line), for a traceback worth logging: None for a
    Gpt1Error, whose message says it all, and for an error first raised by `chunk_batches`, made
    without a traceback (the process engine's, rebuilt from its child's type and message)."""
    if isinstance(e, Gpt1Error) or e.__traceback__ is None:
        return None
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    if tb.tb_frame.f_code is chunk_batches.__code__:
        return None
    return type(e).__qualname__, tb.tb_frame.f_code.co_filename, tb.tb_lineno
