"""SplitMix64: the fast, well-mixed, reproducible hash behind the validation split of `gpt1 prepare`
(`gpt1.data.prepare`) and the order of the training windows (`gpt1.data.windows`).

The same function twice: on numpy uint64 arrays, for the windows (a batch of numbers at once), and
on one Python int, for the split (one number per document, where a one-element array cost ~35 µs
of numpy overhead and the int ~6 µs). Both wrap at 2**64; `tests/` pins them equal.
"""

from __future__ import annotations

import numpy as np

_M64 = (1 << 64) - 1
_GOLDEN, _MUL1, _MUL2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_SEED_MUL = 0x632BE59BD9B4E019


def _offset(seed: int, salt: int) -> int:
    """What (seed, salt) adds to every number hashed under them."""
    return (seed * _SEED_MUL + salt) % 2**64


def hash01(seed: int, salt: int, index: np.ndarray) -> np.ndarray:
    """SplitMix64 of (seed, salt, index) as uint64s."""
    return mix(index.astype(np.uint64) + np.uint64(_offset(seed, salt)))


def mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function of the uint64s `z` (a new array)."""
    with np.errstate(over="ignore"):
        z = z * np.uint64(_GOLDEN)
        z ^= z >> np.uint64(30)
        z *= np.uint64(_MUL1)
        z ^= z >> np.uint64(27)
        z *= np.uint64(_MUL2)
        z ^= z >> np.uint64(31)
    return z


def hash01_int(seed: int, salt: int, index: int) -> int:
    """`hash01` of one number 0 <= `index` < 2**64, in Python ints."""
    z = (index + _offset(seed, salt)) & _M64
    z = (z * _GOLDEN) & _M64
    z ^= z >> 30
    z = (z * _MUL1) & _M64
    z ^= z >> 27
    z = (z * _MUL2) & _M64
    return z ^ (z >> 31)
