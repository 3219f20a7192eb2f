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
`torch.set_num_threads`): the training loop applies it when it trains on a CPU. Environment
variables win: a process started with MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ set keeps
its own choice, and elsewhere than glibc (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
# Allocations below MMAP_THRESHOLD come from the heap; up to TRIM_THRESHOLD of free memory at its
# top is kept for reuse. Larger allocations (a 257M model's weights, its optimizer state) are
# still mapped and returned to the system when freed.
MMAP_THRESHOLD = 256 * 2**20
TRIM_THRESHOLD = 512 * 2**20

_applied = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (see the module docstring); True if they are set now."""
    global _applied
    if _applied:
        return True
    if platform.libc_ver()[0] != "glibc" or any(
            name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
