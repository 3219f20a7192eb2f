"""The training and evaluation windows of a prepared shard: x = tokens[s:s+T], y = tokens[s+1:s+T+1].

`ShardWindows` is pretraining's batch source (a `BatchSource`): every window a pure function of
(seed, its sequence number), in an order of epochs (each window once per pass) or drawn at random;
`fixed_windows` the held-out batches the loop evaluates on, the same every time; `sequential_windows`
the windows of perplexity, predicting every token once. The shards themselves (their format, how
they are opened and checked) are `gpt1.data.shards`'; `gpt1 prepare` writes them (`gpt1.data.prepare`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from gpt1.core.constants import IGNORE_INDEX
from gpt1.core.errors import Gpt1Error
from gpt1.data.shards import open_shard
from gpt1.data.splitmix import hash01, mix

if TYPE_CHECKING:
    import torch  # imported by `_tensors` when a reader runs: `gpt1 prepare` never loads it

# Of the hashes (SplitMix64) of each use: a random window's start, an epoch's offset, its order.
_WINDOW_SALT, _OFFSET_SALT, _PERMUTATION_SALT = 0x3A1D_0B75, 0x0FF5_E7E0, 0x9E27_F315
# The windows' orders (`ShardWindows`), the first the default: every window of an epoch once, or
# each window drawn at random with replacement (nanoGPT's; the only order until 2026-12-07).
WINDOW_ORDERS = ("epochs", "random")
STORED_ORDER = 1 << 16  # windows an epoch's order is shuffled and kept for (512 KiB); more are computed
FEISTEL_ROUNDS = 6  # of the keyed permutation of an epoch's windows (4 make a pseudo-random one; 2 spare)


def _window_rows(data: np.ndarray, starts: np.ndarray, block_size: int, vocab_size: int | None = None,
                 path: str | Path = "") -> np.ndarray:
    """The windows tokens[s:s+T+1] of each start `s`, as int64 rows."""
    buf = np.stack([data[s:s + block_size + 1] for s in starts.tolist()]).astype(np.int64)
    # A damaged shard (or one made with a larger vocabulary) would fail deep in the embedding:
    # checking each batch is cheap, scanning a many-GB shard up front is not.
    if vocab_size is not None and buf.max() >= vocab_size:
        row, col = divmod(int(np.argmax(buf >= vocab_size)), buf.shape[1])
        raise Gpt1Error(f"{path}: token id {int(buf[row, col]):,} at token {int(starts[row]) + col:,} is not below "
                        f"the vocabulary size {vocab_size:,}; the shard is damaged or was made with another "
                        "tokenizer (run `gpt1 prepare` again)")
    return buf


def _tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # torch is imported here, by the readers that training and evaluation use, and not with this
    # module: `gpt1 prepare` needs none of it, and loading it was 2-5 s of a small preparation.
    import torch

    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


def _windows(data: np.ndarray, starts: np.ndarray, block_size: int, vocab_size: int | None = None,
             path: str | Path = "") -> tuple[torch.Tensor, torch.Tensor]:
    buf = _window_rows(data, starts, block_size, vocab_size, path)
    return _tensors(buf[:, :-1], buf[:, 1:])


class ShardWindows:
    """Windows of a shard (a `BatchSource`): x = tokens[s:s+T], y = tokens[s+1:s+T+1].

    The window of global sequence number s is a pure function of (seed, s), so the stream is
    reproducible, resumable from a single counter, and split across torchrun ranks without overlap:
    draw c of rank r holds global micro-batch c * world_size + r. One process with grad_accum * W
    draws per step sees exactly the windows of W ranks with grad_accum draws each. `order`:

    - "epochs" (the default): epoch e = s // n is a pass over n = (len - T) // T non-overlapping
      windows (at least 1) at an offset in [0, T) drawn from (seed, e), in an order of its own (a
      keyed permutation, `_permuted`): each epoch trains on every token once, but fewer than 2T at
      the shard's ends; `epoch_tokens` = n * T.
    - "random": each start is a hash of (seed, s) modulo len - T, drawn with replacement
      (nanoGPT's): one epoch's worth of windows covers about 63% (1 - 1/e) of the tokens, some of
      them more than once; `epoch_tokens` is the shard's length.

    `start`: the sequence number of the first window (a run that goes on from another's windows, on
    the same data and seed, starts after the ones it drew: `sequences_drawn`; from 0 it drew them
    again, in order), rounded up to a whole draw of every rank (world_size * batch_size windows):
    the draws are counted from window 0, so that a checkpoint's `draws` alone says where the stream
    is, as every gpt1 reads it. With `vocab_size`, a batch holding an id outside the vocabulary is
    refused with the shard's name.
    """

    def __init__(self, path: str | Path, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, vocab_size: int | None = None, start: int = 0,
                 order: str = WINDOW_ORDERS[0]):
        if order not in WINDOW_ORDERS:
            raise Gpt1Error(f"data_order must be one of {', '.join(WINDOW_ORDERS)}, got {order!r}")
        self.path, self.vocab_size, self.order = path, vocab_size, order
        self.data = open_shard(path, block_size, "training")
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        # An epoch's windows: they need T + 1 tokens each, at any offset below T (a shard shorter
        # than 2T holds one, at an offset below len - T).
        self.epoch_windows = max(1, (len(self.data) - block_size) // block_size)
        self.offsets = min(block_size, len(self.data) - block_size * self.epoch_windows)
        # `start`: windows before draw 0 that make no whole draw, only ever from a checkpoint of the
        # gpt1 of 2026-12-07 that saved one (`load_state_dict`). Rounded up, a continuation skips
        # fewer than a draw's windows, which no run drew: nothing is lost.
        self.start, self.draws = 0, -(-start // (world_size * batch_size))

    @property
    def epoch_tokens(self) -> int:
        """The tokens of one epoch (`TrainConfig.epochs` counts these): its windows' for "epochs"."""
        return self.epoch_windows * self.block_size if self.order == "epochs" else len(self.data)

    def window_starts(self, sequences: np.ndarray) -> np.ndarray:
        """The first token of the window of each global sequence number in `sequences`."""
        sequences = sequences.astype(np.uint64)
        if self.order == "random":
            return (hash01(self.seed, _WINDOW_SALT, sequences) % np.uint64(len(self.data) - self.block_size)).astype(np.int64)
        epochs, index = np.divmod(sequences, np.uint64(self.epoch_windows))
        offsets = hash01(self.seed, _OFFSET_SALT, epochs) % np.uint64(self.offsets)
        windows = _permuted(self.seed, epochs, index, self.epoch_windows)
        return (offsets + np.uint64(self.block_size) * windows).astype(np.int64)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.start + (self.draws * self.world_size + self.rank) * self.batch_size
        starts = self.window_starts(np.arange(first, first + self.batch_size, dtype=np.uint64))
        self.draws += 1
        return _windows(self.data, starts, self.block_size, self.vocab_size, self.path)

    def state_dict(self) -> dict:
        # "draws" alone, the layout every gpt1 reads: one older than continuations (2026-12-07)
        # reads no other key, and resumed a continuation saved as a "start" and the draws after it
        # at its parent's windows. "start" only where that gpt1 of 2026-12-07 left one inside a draw.
        # "order" where it is not "random", the only order of the checkpoints saved without one.
        return {"draws": self.draws, **({"start": self.start} if self.start else {}),
                **({"order": self.order} if self.order != "random" else {})}

    def load_state_dict(self, state: dict) -> None:
        # Another order than the checkpoint's would go on with other windows than the run drew. (A
        # state without one is random's, or "draws" written by hand: the training loop refuses the
        # first for an "epochs" sampler, whose state has a key it lacks, `check_trainer_state`.)
        if state.get("order", self.order) != self.order:
            raise Gpt1Error(f"the sampler state's windows are in the {state['order']!r} order, this run's in the "
                            f"{self.order!r} order: resume it with data_order={state['order']}")
        # A "start" of the gpt1 of 2026-12-07 (its draws counted after it), as whole draws: the same windows.
        start, per_draw = int(state.get("start", 0)), self.world_size * self.batch_size
        self.draws, self.start = int(state["draws"]) + start // per_draw, start % per_draw


def _permuted(seed: int, epochs: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    """Where each `index` in range(n) goes in its epoch's order (uint64s): a permutation of
    range(n) keyed by (seed, epoch). Up to STORED_ORDER windows, numpy's shuffle of range(n), kept
    for the epoch: a Feistel network on a few bits is far from uniform (at n = 5, one order came
    up 1.6x as often as it should; on 4**h numbers it makes even permutations only). Beyond, computed
    for these indices alone, never stored (17M windows of OpenWebText): a balanced Feistel network
    on the 2h-bit numbers, 2**(2h) >= n (4n at most), walked again from any result >= n until one
    falls in range (cycle-walking, which keeps it a permutation: the walk from i ends before it
    comes back to i)."""
    if n <= STORED_ORDER:
        out = np.empty(len(index), dtype=np.uint64)
        for epoch in np.unique(epochs):  # one, or two where a batch crosses into the next epoch
            here = epochs == epoch
            out[here] = _shuffled(seed, int(epoch), n)[index[here].astype(np.int64)]
        return out
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    keys = np.stack([hash01(seed, _PERMUTATION_SALT, epochs * np.uint64(FEISTEL_ROUNDS) + np.uint64(r))
                     for r in range(FEISTEL_ROUNDS)])
    out = _feistel(index.astype(np.uint64), keys, half)
    while (walk := out >= np.uint64(n)).any():
        out[walk] = _feistel(out[walk], keys[:, walk], half)
    return out


@functools.lru_cache(maxsize=2)  # this epoch's, and the next one's where a batch crosses into it
def _shuffled(seed: int, epoch: int, n: int) -> np.ndarray:
    """range(n) sorted by a keyed 64-bit hash of each number: a uniform shuffle that is the same
    with every numpy (a Generator's may change between releases, and with it a resumed run's windows)."""
    epoch_key = hash01(seed, _PERMUTATION_SALT, np.array([epoch], dtype=np.uint64))[0]
    order = np.argsort(mix(np.arange(n, dtype=np.uint64) + epoch_key), kind="stable").astype(np.uint64)
    order.flags.writeable = False
    return order


def _feistel(x: np.ndarray, keys: np.ndarray, half: int) -> np.ndarray:
    """One pass of the Feistel network over the 2*`half`-bit numbers `x`, round r keyed by `keys[r]`."""
    bits, mask = np.uint64(half), np.uint64((1 << half) - 1)
    left, right = x >> bits, x & mask
    for key in keys:
        left, right = right, left ^ (mix(key + right) & mask)
    return (left << bits) | right


def sequences_drawn(sampler: dict, batch_size: int, world_size: int) -> int:
    """The windows a run drew in all, from the `ShardWindows` state of its checkpoint (each of its
    `world_size` ranks' draws of `batch_size` windows, after those it started at): where a run that
    goes on from it starts."""
    return int(sampler.get("start", 0)) + int(sampler["draws"]) * world_size * batch_size


def fixed_windows(path: str | Path, block_size: int, batch_size: int, n_batches: int,
                  vocab_size: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n_batches` held-out batches of windows spread evenly over a shard (the same every time),
    at most as many as the shard holds without overlapping targets (eval_batches=1000000 built
    100,000 windows, 30 views of each token, and 23 GB, before the first step); a shard shorter
    than one batch of them gives one batch of the windows it holds. With `vocab_size`, an id
    outside the vocabulary is refused (as `ShardWindows` does)."""
    data = open_shard(path, block_size, "validation")
    # Whole batches, rounded down: rounded up, the windows' spacing fell below block_size and up to
    # half of the targets were scored twice, in a validation said to hold "no overlap".
    fit = (len(data) - 1) // block_size  # windows whose targets do not overlap (at least 1: `open_shard`)
    n_batches = min(n_batches, max(1, fit // batch_size))
    starts = np.linspace(0, len(data) - block_size - 1, min(batch_size * n_batches, fit)).astype(np.int64)
    return [_windows(data, starts[i:i + batch_size], block_size, vocab_size, path)
            for i in range(0, len(starts), batch_size)]


def sequential_windows(tokens: np.ndarray, block_size: int, batch_size: int, max_batches: int | None = None,
                       vocab_size: int | None = None, path: str | Path = "") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Windows predicting every token of `tokens` after the first exactly once, in order: perplexity
    (`tokens` holds at least `block_size + 1`). The targets are cut into disjoint runs of
    `block_size`; the last, shorter run is predicted by a window ending at the last token, as
    lm-eval's loglikelihood_rolling does: its inputs overlap the window before, so each target has
    a full context, and the targets that window already predicted are IGNORE_INDEX. With
    `vocab_size`, an id outside the vocabulary is refused, naming `path`."""
    n_targets = len(tokens) - 1
    nominal = np.arange(0, n_targets, block_size, dtype=np.int64)
    if max_batches is not None:
        nominal = nominal[:max_batches * batch_size]
    starts = np.minimum(nominal, n_targets - block_size)
    for i in range(0, len(starts), batch_size):
        buf = _window_rows(tokens, starts[i:i + batch_size], block_size, vocab_size, path)
        scored_before = nominal[i:i + batch_size] - starts[i:i + batch_size]  # > 0: the tail
        # A new array: a one-row batch's x is a view of `buf` too, and keeps its tokens.
        y = np.where(np.arange(block_size)[None] < scored_before[:, None], IGNORE_INDEX, buf[:, 1:])
        yield _tensors(buf[:, :-1], y)

