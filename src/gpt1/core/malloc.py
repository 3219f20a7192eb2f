"""The host allocator: let glibc's malloc reuse freed memory instead of returning it at once.

By default glibc serves every allocation of 32 MiB or more with a fresh `mmap` and unmaps it on
free, so a CPU training step that allocates the same large buffers every time (fp32 logits, their
gradients) page-faults all of them in again, zeroed, on every step. With the thresholds raised,
those buffers come back from the heap warm. Measured on 2 cores (torch 2.13, 2026-12-04): the
quickstart's `tiny` step (16 x 128, whose fp32 logits are 32 MiB) 158-165 -> 149-152 ms, ~6%;
gpt1's `small` step (4 x 256) the same within noise; transformers' `small` step, whose loss
allocates more such buffers, 632-638 -> 583-608 ms (fp32) and 409-415 -> 343-375 ms (bf16).

PyTorch's CPU tuning guide recommends jemalloc or tcmalloc for the same reason; this gets most of
it with glibc, which every Linux Python already has. It is a process-wide setting (like
`torch.set_num_threads`): the training loop holds it while it trains on a CPU
(`freed_memory_kept`), and when the last run ends puts glibc's default thresholds back and
returns the memory kept (`malloc_trim`), so that a notebook or a server that trained once does not
keep up to 512 MiB of freed heap for the rest of its life. glibc has no call that reads the
thresholds, and none that turns their dynamic adjustment back on once `mallopt` set them: what
comes back are the values that adjustment rises to at most (an mmap threshold of 32 MiB, a trim
threshold of 64 MiB on 64-bit), the largest glibc would have set itself.
Environment variables win: a process started with MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_
set keeps its own choice, and elsewhere than glibc (macOS, musl) nothing changes.

Under an address-space limit (`ulimit -v`, RLIMIT_AS) glibc's arenas are capped too
(`fit_arenas_to_address_limit`, which the CLI applies before a command starts): each thread that
allocates gets an arena of its own, up to 8 per core, and each reserves 64 MiB of address space
at once. The tokenizers' threads of `gpt1 prepare` took them until Rust's allocator aborted the
process ("memory allocation of 1 bytes failed", SIGABRT) under a limit that
`MALLOC_ARENA_MAX=1` fitted in.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import threading
from collections.abc import Iterator

try:
    import resource
except ImportError:  # Windows
    resource = None

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ARENA_BYTES = 64 * 2**20  # the address space one arena reserves (HEAP_MAX_SIZE on 64-bit)
# Allocations below MMAP_THRESHOLD come from the heap; up to TRIM_THRESHOLD of free memory at its
# top is kept for reuse. Larger allocations (a 257M model's weights, its optimizer state) are
# still mapped and returned to the system when freed.
MMAP_THRESHOLD = 256 * 2**20
TRIM_THRESHOLD = 512 * 2**20

# glibc's defaults as its dynamic adjustment leaves them at most (DEFAULT_MMAP_THRESHOLD_MAX, and
# the trim threshold it sets beside it): what a run puts back (see the module docstring).
DEFAULT_MMAP_THRESHOLD = 4 * 2**20 * ctypes.sizeof(ctypes.c_long)  # 32 MiB on 64-bit
DEFAULT_TRIM_THRESHOLD = 2 * DEFAULT_MMAP_THRESHOLD
ENV_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_lock = threading.Lock()  # runs in several threads share the one setting
_for_good = False  # keep_freed_memory() was called: kept for the rest of the process
_runs = 0  # the runs inside freed_memory_kept() that hold the raised thresholds now


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for the rest of the process (see the module
    docstring; the benchmarks' setting); True if they are set now."""
    global _for_good
    with _lock:
        _for_good = _for_good or _set_thresholds(MMAP_THRESHOLD, TRIM_THRESHOLD)
        return _for_good


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """The raised thresholds while the block runs (a training run on a CPU); yields whether they
    are set. When the last such block ends, glibc's defaults come back and the freed memory kept
    is returned to the system, unless `keep_freed_memory` set them for good."""
    global _runs
    with _lock:
        held = _for_good or _runs > 0 or _set_thresholds(MMAP_THRESHOLD, TRIM_THRESHOLD)
        _runs += held
    try:
        yield held
    finally:
        with _lock:
            _runs -= held
            if held and not _runs and not _for_good and _set_thresholds(DEFAULT_MMAP_THRESHOLD, DEFAULT_TRIM_THRESHOLD):
                _glibc().malloc_trim(0)


def _set_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    """mallopt both thresholds; False where the environment chose them, or off glibc."""
    if any(name in os.environ for name in ENV_SETTINGS):
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))


def fit_arenas_to_address_limit() -> int | None:
    """Under an address-space limit, cap glibc's malloc arenas (see the module docstring) at one
    per 8 x 64 MiB of the limit, at least 2: the main thread's and one that the other threads
    share. Their reservations then take at most about an eighth of the limit (128 MiB of a 900 MB
    `ulimit -v`, where glibc's default lets 2 cores make 16 arenas: 1 GiB), while a large limit
    keeps an arena per thread, up to glibc's own default (8 per core), so that threads that
    allocate at once (the tokenizers') do not wait on each other's lock. Returns the cap set, or
    None: no limit, not glibc, or MALLOC_ARENA_MAX / GLIBC_TUNABLES' arena_max set (the
    environment's choice wins). Call it before the threads start: an arena once made stays."""
    if resource is None or "MALLOC_ARENA_MAX" in os.environ or "arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    libc = _glibc() if limit != resource.RLIM_INFINITY else None
    if libc is None:
        return None
    arenas = min(max(2, limit // (8 * ARENA_BYTES)), 8 * (os.cpu_count() or 1))
    return arenas if libc.mallopt(M_ARENA_MAX, arenas) else None


def _glibc() -> ctypes.CDLL | None:
    """glibc, whose `mallopt` these settings are; None elsewhere (macOS, musl, Windows)."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None
