"""Chat encoding: conversations -> training ids, loss masks and padded batches.

Encoding (`encode_conversations`) uses the one chat template (`gpt1.core.chat_template`); labels
keep only assistant reply tokens (their text and closing [EOS]), except a reply with
`"weight": 0` (OpenAI's fine-tuning records), which stays as context. A conversation longer than
the context is split at assistant-turn boundaries into pieces that fit; a single exchange
longer than the context is truncated (its tail is lost), and dropped when no assistant token
survives; a piece left with no reply to learn (weight 0) is dropped. Each case is counted.
A message's text is encoded in pieces (`core.text_pieces.text_pieces`) and only until the context is
full: the ids kept are those of encoding it whole, in bounded memory (a 27 MB reply took 3.5 GB).
"""
from __future__ import annotations

import functools
import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from gpt1.core.chat_template import encode_chat_with_labels
from gpt1.core.constants import IGNORE_INDEX
from gpt1.core.errors import Gpt1Error
from gpt1.core.progress import progress as progress_bar
from gpt1.core.text_pieces import text_pieces
from gpt1.data.conversation import Conversation


@dataclass
class EncodedChats:
    """Token ids of many conversations, flat: sequence i is tokens[offsets[i]:offsets[i+1]];
    `loss_mask` is True on the tokens the model learns (assistant replies)."""

    tokens: np.ndarray  # int32
    loss_mask: np.ndarray  # bool
    offsets: np.ndarray  # int64, len = sequences + 1
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sequence(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], self.loss_mask[a:b]

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_loss_tokens(self) -> int:
        """Tokens that are training targets: assistant tokens after the first position."""
        first = self.loss_mask[self.offsets[:-1]].sum() if len(self) else 0
        return int(self.loss_mask.sum() - first)

    def fingerprint(self) -> str:
        """sha256 of the sequences and their loss masks: what training sees (a resume on an edit
        of the data that keeps the number of sequences is told apart)."""
        digest = hashlib.sha256()
        for array in (self.offsets, self.tokens, self.loss_mask):  # int64, int32, bool: fixed by the encoder
            digest.update(array.tobytes())
        return digest.hexdigest()

    def why_empty(self) -> str:
        """Why no sequence is left, for the errors that say so: the counts name the cause (a
        context too short for the prompts read as "filtering" otherwise)."""
        if not self.skipped:
            return "the chat data is empty after filtering"
        return "; ".join(f"{why}: {n:,}" for why, n in sorted(self.skipped.items()))

    def summary(self) -> str:
        text = f"{len(self):,} sequences, {self.num_tokens:,} tokens ({self.num_loss_tokens:,} assistant tokens)"
        if self.skipped:
            text += " (" + ", ".join(f"{why}: {n:,}" for why, n in sorted(self.skipped.items())) + ")"
        return text


def encode_conversations(tokenizer, conversations: Iterable[Conversation], max_len: int,
                         progress: bool = False) -> EncodedChats:
    """Encode with the chat template; sequences hold at most `max_len` tokens (block_size + 1:
    inputs are ids[:-1] and targets ids[1:]). Over-long conversations: see the module docstring."""
    if max_len < 2:
        raise Gpt1Error(f"max_len must be at least 2, got {max_len}")
    tokens: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    skipped: Counter = Counter()
    # A message needs at most max_len ids here: the rest is cut (ids identical to a whole encode).
    encode_text = functools.partial(_encode_prefix, tokenizer, max_tokens=max_len)

    def emit(ids: list[int], labels: list[int]) -> int:
        if all(label == IGNORE_INDEX for label in labels[1:]):  # only replies of weight 0: nothing to learn
            skipped["pieces with no reply to learn (weight 0) dropped"] += 1
            return 0
        tokens.append(np.asarray(ids, dtype=np.int32))
        masks.append(np.asarray(labels, dtype=np.int64) != IGNORE_INDEX)
        return 1

    for conversation in progress_bar(conversations, disable=None if progress else True, desc="encoding", unit=" conv"):
        # The template encodes each message on its own, so a conversation's ids are the
        # concatenation of its exchanges' ids: splitting at exchange boundaries is exact.
        units, current = [], []
        for message in conversation.messages:
            current.append(message)
            if message["role"] == "assistant":
                units.append((*encode_chat_with_labels(tokenizer, current, encode_text), message.get("weight", 1)))
                current = []
        ids: list[int] = []
        labels: list[int] = []
        pieces = 0
        for unit_ids, unit_labels, weight in units:
            learned = unit_labels if weight else [IGNORE_INDEX] * len(unit_labels)  # weight 0: context only
            if len(ids) + len(unit_ids) <= max_len:
                ids += unit_ids
                labels += learned
                continue
            if ids:
                pieces += emit(ids, labels)
            ids, labels = unit_ids[:max_len], learned[:max_len]
            if len(unit_ids) > max_len:
                if all(label == IGNORE_INDEX for label in unit_labels[1:max_len]):
                    skipped["exchanges dropped (the prompt alone fills the context)"] += 1
                    ids, labels = [], []
                else:
                    skipped["exchanges truncated to the context"] += 1
        if ids:
            pieces += emit(ids, labels)
        if pieces > 1:
            skipped["conversations split at turn boundaries"] += 1
    offsets = np.zeros(len(tokens) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in tokens], out=offsets[1:])
    return EncodedChats(
        tokens=np.concatenate(tokens) if tokens else np.zeros(0, np.int32),
        loss_mask=np.concatenate(masks) if masks else np.zeros(0, bool),
        offsets=offsets,
        skipped=skipped,
    )


def _encode_prefix(tokenizer, text: str, max_tokens: int) -> list[int]:
    """The ids of `text`, or of a prefix of it that gives at least `max_tokens`: equal to the first
    ids of encoding it whole, piece by piece and no further than needed (one 27 MB message took
    3.5 GB to encode whole, for the 129 tokens a context kept)."""
    ids: list[int] = []
    for piece in text_pieces(text):
        ids += tokenizer.encode(piece)
        if len(ids) >= max_tokens:
            break
    return ids


def pad_batch(sequences: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int = 0):
    """(x, y) int64 tensors (B, T), T = longest sequence - 1: x = ids[:-1] padded with [PAD],
    y = ids[1:] where the loss mask is set, IGNORE_INDEX elsewhere (and on padding)."""
    T = max(len(ids) for ids, _ in sequences) - 1
    x = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    y = torch.full((len(sequences), T), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, mask) in enumerate(sequences):
        ids_t = torch.from_numpy(ids.astype(np.int64))
        n = len(ids) - 1
        x[row, :n] = ids_t[:-1]
        y[row, :n] = torch.where(torch.from_numpy(mask[1:]), ids_t[1:], IGNORE_INDEX)
    return x, y


class ChatBatches:
    """Padded training batches of chat sequences in a deterministic shuffled order.

    Epoch e visits the sequences in a permutation seeded by (seed, e). An optimizer step takes the
    next `micro_batch x grad_accum x world_size` sequences of it (a step that runs past the epoch's
    end is topped up from its start, as DistributedSampler pads, and the next step starts the next
    epoch) and deals them into grad_accum x world_size micro-batches: micro-batch j holds every
    (grad_accum x world_size)-th of them from j, and rank r takes micro-batches r, r + world_size, ...
    So the step's sequences follow from its global batch alone, however it is split into
    micro-batches and processes (drawn per micro-batch, an epoch's end fell part-way through a
    step of several micro-batches and the splits trained on different sequences from then on), and
    N ranks with grad_accum A take exactly the micro-batches of one process with N x A.
    `next_step(grad_accum)` gives a step's micro-batches, `next_batch()` a step of one. The state
    (epoch, position) is JSON-able and a restored source yields exactly the batches the original
    would have. `epoch`: the first epoch (a run that goes on from another's epochs on the same
    sequences starts at the next one, not at epoch 0's order again).
    """

    def __init__(self, data: EncodedChats, micro_batch: int, *, seed: int = 0, pad_id: int = 0,
                 rank: int = 0, world_size: int = 1, epoch: int = 0):
        if len(data) == 0:
            raise Gpt1Error(f"no training sequences: {data.why_empty()}")
        self.data = data
        self.micro_batch = micro_batch
        self.seed = seed
        self.pad_id = pad_id
        self.rank = rank
        self.world_size = world_size
        self.epoch = epoch
        self.position = 0  # index into this epoch's order of the next step's first sequence
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.data))

    def epoch_steps(self, grad_accum: int = 1) -> int:
        """Optimizer steps of `grad_accum` micro-batches per rank in an epoch: its last step is
        topped up from its start, so an epoch takes ceil(sequences / global batch) of them."""
        return -(-len(self.data) // (self.micro_batch * grad_accum * self.world_size))

    def steps_for(self, epochs: float, grad_accum: int = 1) -> int:
        """Optimizer steps that make `epochs` epochs: whole epochs of `epoch_steps` each, a fraction
        that share of an epoch's steps, rounded up (at least one). From the steps, not from the
        sequences (epochs x sequences / global batch fell short of the last epoch by the top-ups)."""
        # round(): float noise (0.07 x 100 = 7.000000000000001) is not a part of one more step.
        return max(1, math.ceil(round(epochs * self.epoch_steps(grad_accum), 6)))

    def next_step(self, grad_accum: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's `grad_accum` micro-batches of the next optimizer step."""
        parts = grad_accum * self.world_size  # the step's micro-batches, all ranks
        size = self.micro_batch * parts
        chunk = self._order[self.position:self.position + size]
        if len(chunk) < size:  # an epoch's last step is topped up from its start (as DistributedSampler)
            chunk = np.concatenate([chunk, np.resize(self._order, size - len(chunk))])
        self.position += size
        if self.position >= len(self.data):
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        return [pad_batch([self.data.sequence(int(i)) for i in chunk[j::parts]], self.pad_id)
                for j in range(self.rank, parts, self.world_size)]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_step(1)[0]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "sequences": len(self.data)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("sequences") != len(self.data) or state.get("seed") != self.seed:
            raise Gpt1Error(f"cannot resume: the checkpoint was made on {state.get('sequences')} chat sequences "
                            f"(seed {state.get('seed')}), the data now gives {len(self.data)} (seed {self.seed})")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._permutation(self.epoch)


def iter_batches(data: EncodedChats, micro_batch: int, pad_id: int = 0):
    """Every sequence once, in order, as padded (x, y) batches: for validation."""
    for start in range(0, len(data), micro_batch):
        yield pad_batch([data.sequence(i) for i in range(start, min(start + micro_batch, len(data)))], pad_id)
