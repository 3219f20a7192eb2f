"""The host's random number generators, left as they were by the library's entry points.

A run seeds and draws from the process-global RNGs (torch's, for the model's initialisation and
dropout; a resume restores Python's and NumPy's too), so that it is reproducible and resumes bit
for bit. A program that trains, fine-tunes or loads a model through the Python API would find
its own random streams reseeded or advanced afterwards; `host_rng_kept` puts them back. The
global RNGs are shared by every thread: two runs at once in one process are not reproducible
(run them one at a time, or in processes of their own).
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def host_rng_kept() -> Iterator[None]:
    """Restore torch's CPU RNG, CUDA's (when initialised: saving it would initialise it),
    Python's `random` and NumPy's global RNG on leaving the block, however it is left. Usable as
    a decorator."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
