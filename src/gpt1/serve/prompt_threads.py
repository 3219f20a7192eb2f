"""The few threads that build prompts (the chat template, tokenizing), off the event loop."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from gpt1.serve.errors import generation_error, resource_shortage

PROMPT_THREADS = 4
T = TypeVar("T")


class PromptThreads:
    """The threads that build prompts (the chat template, tokenizing: up to seconds of CPU for a
    large request, off the event loop): PROMPT_THREADS of them, the requests beyond waiting their
    turn. Starlette's run_in_threadpool grew anyio's pool to 40 threads for a burst of 100 clients,
    and under a limit on threads (`ulimit -u`, a container's pids limit) those left none for the
    engine's OpenMP team, whose failure to start one ends the process (libgomp)."""

    def __init__(self, threads: int = PROMPT_THREADS):
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None  # made by the first start() or run(), ended by stop()
        self._lock = threading.Lock()

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="gpt1-prompt")
            return self._pool

    def start(self) -> None:
        """Start them all now (the pool starts each when work first waits for it): a server claims
        its threads at start, so that no burst of requests has a thread to start later. Started
        already, nothing new starts. One that cannot start (`ulimit -u`, a container's pids limit)
        raises its RuntimeError at once, the threads started before it ended: they waited for it
        10 s, and the server's exit waited for them."""
        pool = self._executor()
        started = threading.Barrier(self.threads)  # busy together, each task takes a thread of its own
        try:
            for _ in range(self.threads):
                pool.submit(started.wait, 10)
        except BaseException:
            started.abort()
            self.stop()
            raise

    def stop(self) -> None:
        """End the threads, once those building a prompt have done so: the app's lifespan ends with
        its server, and each app served left its 4 threads behind. The app served again starts new ones."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    async def run(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) on one of the threads; a 503 to retry when none could be started for now (see
        `generation_error`), not a 500 with a traceback."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor(), fn, *args)
        except Exception as e:
            if resource_shortage(e):
                raise generation_error(e) from None
            raise
