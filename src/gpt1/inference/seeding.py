"""Each sampled request's own random generator: one draw per row and step from it, so that a
seeded request gives the same tokens whatever shares its batch, and on every machine."""

from __future__ import annotations

import os

import numpy as np
import torch


def request_generator(seed: int | None) -> torch.Generator:
    """A generator seeded with `seed` (all 64 bits of it), or from the OS for None."""
    # On the CPU whatever the model's device: one draw per row and step, and the same seed
    # gives the same draws on every machine.
    g = torch.Generator()
    if seed is None:  # not g.seed(), which opens /dev/urandom: out of descriptors (ulimit -n), a 500
        g.manual_seed(int.from_bytes(os.urandom(4), "little"))  # getrandom(2): no file; 32 bits, as MT19937 takes
    elif seed < 2**32:
        g.manual_seed(seed)
    else:
        g.set_state(_mt19937_state(seed))
    return g


def _mt19937_state(seed: int) -> torch.Tensor:
    """The CPU generator's state for a seed of up to 64 bits. Its MT19937 seeds itself from the
    seed's low 32 bits alone (seeds 5 and 2**32 + 5 drew the same text); this fills the 624 state
    words by MT19937's init_by_array over the seed's two 32-bit halves, as NumPy's
    RandomState([low, high]) does, in the layout of `Generator.get_state()`: the initial seed
    (u64), `left` and `seeded` (i32), `next` (u64), then the words (u64 each)."""
    state = bytearray(torch.Generator().get_state().numpy().tobytes())
    words = np.random.RandomState([seed & 0xFFFF_FFFF, seed >> 32]).get_state()[1].astype("<u8").tobytes()
    state[:24] = seed.to_bytes(8, "little") + (1).to_bytes(4, "little") * 2 + bytes(8)  # as manual_seed leaves them
    state[24:24 + len(words)] = words
    return torch.frombuffer(state, dtype=torch.uint8).clone()
