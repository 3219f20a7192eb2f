"""The GPT model: a GPT-2-style decoder-only transformer with a KV cache.

Reads top to bottom: `KVCache`, `SlotCache`, `CausalSelfAttention`, `MLP`, `Block`, `GPT`.
Parameter names and layouts match Hugging Face's `GPT2LMHeadModel` one to one (ours are
`nn.Linear`, theirs `Conv1D`, so a weight is transposed on the way across): learned
positions, pre-LayerNorm, tanh-approximated GELU ("gelu_new"), biases everywhere but the
output head. That makes export, import and a logits-equality test straightforward for this
architecture; the exporters check a model against GPT-2's layout (`gpt1.formats.gpt2_layout`)
and refuse one changed beyond it (docs/model.md, "Changing the model").

The model knows nothing about training: no optimizer, no schedule, no data. With targets,
`forward` computes the loss with `gpt1.core.loss.linear_cross_entropy`: the output layer and
the cross-entropy a chunk of tokens at a time, so that the logits of a whole batch
(tokens x vocab floats: 5 GB for the reference recipe's 48 x 512 micro-batch) never exist.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, overload

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gpt1.core.config import ModelConfig
from gpt1.core.errors import Gpt1Error
from gpt1.core.loss import linear_cross_entropy


class KVCache:
    """Keys and values of past positions, preallocated for `max_len` positions per sequence.

    With the cache, generating a token costs one position of compute instead of re-running
    the whole context. Layer i writes its new keys/values at `[length, length + T)` and
    attends over `[0, length + T)`; `GPT.forward` advances `length` after the last layer.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.max_len = max_len or config.block_size
        shape = (config.n_layer, batch_size, config.n_head, self.max_len, config.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class SlotCache:
    """A preallocated pool of cache rows ("slots") for continuous batching: rows hold unrelated
    sequences, each at its own length, and one forward serves several of them.

    `prepare(rows, positions, key_len)` points the next forward at `rows` (a slice of the pool,
    or a tensor of row indices) with `positions` (B, T): the position of each new token, where
    its key/value is written and which query sees the keys at positions <= its own (a per-row
    causal mask over keys [0, key_len)). Keys beyond a row's length hold stale data from earlier
    sequences; the mask hides them until the row overwrites them. A padding token can be given
    the last position, `max_len - 1`, which no row holds while it still has tokens to feed.
    """

    def __init__(self, config: ModelConfig, slots: int, max_len: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        self.max_len = max_len or config.block_size
        shape = (config.n_layer, slots, config.n_head, self.max_len, config.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.positions: torch.Tensor | None = None  # (B, T), read by GPT.forward
        self.mask: torch.Tensor | None = None  # (B, 1, T, key_len), added to the attention scores
        self._rows: slice | torch.Tensor = slice(0, 0)
        self._row_index: torch.Tensor | None = None  # (B, 1): the pool rows written
        # Each layer's index into the pool as a tensor: writes index the whole pool at once
        # (`update`), never a view of it, which torch.compile would turn into a copy of the pool.
        # (1, 1), not 0-d: indexing treats a 0-d tensor as a Python int, i.e. as a view.
        self._layer_index = [torch.full((1, 1), i, device=device) for i in range(config.n_layer)]
        self._key_len = 0

    def prepare(self, rows: slice | torch.Tensor, positions: torch.Tensor, key_len: int | None = None) -> None:
        self._key_len = key_len or self.max_len
        self._rows = rows
        if isinstance(rows, slice):
            self._row_index = torch.arange(rows.start or 0, rows.stop, device=positions.device)[:, None]
        else:
            self._row_index = rows[:, None]
        self.positions = positions
        visible = torch.arange(self._key_len, device=positions.device) <= positions[:, None, :, None]
        # Additive (0 / -inf) in the cache's dtype, made once per forward: a boolean mask would be
        # converted to this by scaled_dot_product_attention in every layer (kernels that, in a
        # decode step, cost as much time as the attention itself).
        self.mask = torch.zeros(visible.shape, dtype=self.k.dtype, device=positions.device).masked_fill_(
            visible.logical_not(), float("-inf"))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One index_put on the pool itself. Writing through a view of it (`self.k[layer][rows]`)
        # does the same eagerly, but a compiled step then copies the whole pool back (the mutated
        # input is the pool): on a CPU, `small` at 16 rows, 83 ms per compiled step instead of 13.
        index = (self._layer_index[layer], self._row_index, slice(None), self.positions)
        self.k[index] = k.transpose(1, 2)  # (B, T, n_head, head_size) at [layer, row, :, position]
        self.v[index] = v.transpose(1, 2)
        # Read: a view when the rows are a slice of the pool (the decode step), else a gather.
        return self.k[layer, self._rows, :, :self._key_len], self.v[layer, self._rows, :, :self._key_len]

    def move(self, src: int, dst: int) -> None:
        """Copy row `src` into row `dst` (the engine keeps its live rows contiguous)."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row `src` into row `dst` (a prompt prefilled once
        for several rows; the whole slot, max_len positions, cost more than short prompts save)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.layer_idx = layer_idx
        self.dropout = config.dropout
        # Q, K and V in one matrix: one large matmul is faster than three small ones.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | SlotCache | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        # scaled_dot_product_attention dispatches to FlashAttention / memory-efficient kernels
        # on GPU when it can. `is_causal` (no explicit mask) is the fastest path: use it for
        # plain training batches; an explicit mask is only needed for padding or a cache.
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and T > 1 and k.size(2) == T,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_hidden, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | SlotCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


def _embedding(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    """`nn.Embedding(num_embeddings, embedding_dim)` that skips its own init on the meta device,
    where normal_ imports torch._dynamo: 1-2 s of every gpt1.load and `gpt1 info`. On a real
    device the init runs as before, though GPT._init_weights sets the values again: its draws
    from the RNG keep a seed giving the weights it always gave."""
    weight = torch.empty(num_embeddings, embedding_dim)  # on the device that `with torch.device(...)` set
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding(num_embeddings, embedding_dim, _weight=weight)


class GPT(nn.Module):
    """A GPT-2-style decoder-only transformer (see the module docstring), initialised as GPT-2.

    `GPT(config)` builds it from a `ModelConfig`; `model(idx)` returns the logits (B, T, vocab),
    `model(idx, targets)` returns (None, loss). `gpt1.load(dir)` gives one with trained weights.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise Gpt1Error(f"config: expected a ModelConfig (e.g. ModelConfig.preset('tiny')), got {type(config).__name__}")
        # Checked again: a field set by attribute after the config was built (n_head=3) is refused
        # here by name, not by a reshape error in the first forward.
        self.config = config.validate()
        self.transformer = nn.ModuleDict(dict(
            wte=_embedding(config.vocab_size, config.n_embd),
            wpe=_embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        _check_output_head(self.lm_head)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        # Recompute each block's activations in the backward pass instead of storing them:
        # ~30% more compute for far less memory (fits the 257M model on small GPUs).
        self.gradient_checkpointing = False
        self.loss_chunk: int | None = None  # tokens per chunk of the loss; None: the device's LOSS_CHUNK_BYTES of logits
        if self.lm_head.weight.is_meta:  # shapes only (`gpt1 info`): no values to set, and init on meta imports torch._dynamo
            return
        self.apply(self._init_weights)
        # GPT-2: residual projections are scaled by 1/sqrt(2 * n_layer) so that the variance
        # of the residual stream does not grow with depth (two residual adds per block).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, exclude_positions: bool = False) -> int:
        """Parameter count (a tied head is counted once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_positions:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward) of the matmuls that run:

            6 x (transformer matrices + output head) + 12 x n_layer x T x d

        A weight matrix of n parameters costs 2n FLOPs per token forward and 4n backward (the
        input's gradient and the weight's); a frozen one (LoRA fine-tuning) 2n less, and an
        unmerged LoRA adapter's A and B are matrices like any other (trained: 6 per parameter). The input
        and position embeddings are table lookups, not matmuls, and are left out (a tied input
        embedding is counted once, as the output head). The attention's QK^T and AV add
        2 x 2 x T x d forward per layer, 3 x that in all (PaLM, appendix B; causal masking is
        not subtracted). Biases, LayerNorms and the softmax are not counted.
        """
        c = self.config
        T = seq_len or c.block_size
        layers = [m for block in self.transformer.h for m in block.modules() if isinstance(m, nn.Linear)]
        matmuls = [m.weight for m in layers] + [self.lm_head.weight]
        # A LoRA adapter's A and B run beside their frozen matrix until merged into it.
        matmuls += [w for m in layers if not getattr(m, "merged", True) for w in (m.lora_A, m.lora_B)]
        weights = sum((6 if w.requires_grad else 4) * w.numel() for w in matmuls)
        return weights + 12 * c.n_layer * T * c.n_embd

    # For type checkers: without targets the result is the logits, with them (None, loss).
    @overload
    def forward(self, idx: torch.Tensor, targets: None = None, *, cache: KVCache | SlotCache | None = None,
                positions: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor: ...

    @overload
    def forward(self, idx: torch.Tensor, targets: torch.Tensor, *, cache: KVCache | SlotCache | None = None,
                positions: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                last_only: bool = False) -> tuple[None, torch.Tensor]: ...

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | SlotCache | None = None,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor | tuple[None, torch.Tensor]:
        """Logits (B, T, vocab) for token ids `idx` (B, T); with `targets`, (None, loss).

        `targets` (B, T) uses IGNORE_INDEX (-100) for positions excluded from the loss; the loss
        (the mean cross-entropy) comes from `linear_cross_entropy`, which never holds the
        logits of the whole batch, so none are returned.
        `cache` continues from the positions it already holds (a `SlotCache` brings its own
        per-row positions and mask: call its `prepare` first). `positions` (B, T) overrides the
        default positions (needed for left-padded batches); `attention_mask` (B, S) marks with
        True/1 the keys a row may attend to, S = cached + new positions (0 for padding).
        `last_only` returns the logits of the last position only, (B, 1, vocab): all that
        sampling needs, and it skips the output layer (the model's largest matmul) for the
        rest of a prompt.

        Bad input is a `Gpt1Error`: `idx` not 2-D, more positions than `block_size`, and (on a
        CPU, see `_token_embeddings`) an id outside the vocabulary.
        """
        if idx.dim() != 2:
            raise Gpt1Error(f"idx: expected token ids of shape (batch, time), got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if isinstance(cache, SlotCache):
            positions, mask = cache.positions, cache.mask
        else:
            start = cache.length if cache is not None else 0
            if positions is None:
                if start + T > self.config.block_size:
                    raise Gpt1Error(f"idx: a sequence of {start + T} tokens is longer than the context "
                                    f"({self.config.block_size}, the model's block_size)")
                positions = torch.arange(start, start + T, device=idx.device).unsqueeze(0)
            mask = self._attention_mask(T, start, attention_mask, idx.device)

        x = self.transformer.drop(self._token_embeddings(idx) + self.transformer.wpe(positions))
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask, cache)
        if isinstance(cache, KVCache):
            cache.length += T
        if last_only:
            x = x[:, -1:]
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x)
        # The loss computes the output layer itself, x @ weight.T a chunk at a time, and never calls
        # lm_head: anything applied to the logits above (a bias, a softcap, a scale) must also go into
        # the loss, or training and `gpt1 eval` run without it while generation runs with it.
        # The head as its forward applies it: a tied LoRA model's head (lora.TiedTokensHead) reads
        # its trained token rows from the embedding's table, which `lm_head.weight` (frozen) lacks.
        head = self.lm_head
        weight = head.output_weight() if hasattr(head, "output_weight") else head.weight
        return None, linear_cross_entropy(x, weight, targets, self.loss_chunk)

    if TYPE_CHECKING:  # `model(idx)` typed as `forward` is: nn.Module declares __call__ as Callable[..., Any]
        @overload
        def __call__(self, idx: torch.Tensor, targets: None = None, *, cache: KVCache | SlotCache | None = None,
                     positions: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                     last_only: bool = False) -> torch.Tensor: ...

        @overload
        def __call__(self, idx: torch.Tensor, targets: torch.Tensor, *, cache: KVCache | SlotCache | None = None,
                     positions: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                     last_only: bool = False) -> tuple[None, torch.Tensor]: ...

        def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def _token_embeddings(self, idx: torch.Tensor) -> torch.Tensor:
        """`wte(idx)`, where an id outside the vocabulary is a Gpt1Error naming it on a CPU.

        Only there, and only once the embedding's own IndexError has found one: the check then
        costs nothing. On an accelerator, finding such an id takes a device-to-host sync, which
        every training step and every decode step of the engine would pay; there the entry
        points check instead (generate and the engine their prompts, the data readers the
        tokens of a corpus), and a compiled forward is left as it is traced.
        """
        wte = self.transformer.wte
        if idx.device.type != "cpu" or torch.compiler.is_compiling():
            return wte(idx)
        try:
            return wte(idx)
        except IndexError:
            outside = idx[(idx < 0) | (idx >= wte.num_embeddings)]
            if not outside.numel():
                raise
            raise Gpt1Error(f"idx: token id {outside[0].item()} is outside the vocabulary "
                            f"[0, {wte.num_embeddings})") from None

    @staticmethod
    def _attention_mask(T: int, start: int, key_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        """A boolean (B or 1, 1, T, start + T) mask, or None when plain causal attention will do."""
        if key_mask is None and (start == 0 or T == 1):
            return None  # causal from scratch, or one new query that may see every cached key
        S = start + T
        query_pos = torch.arange(start, S, device=device).unsqueeze(1)
        key_pos = torch.arange(S, device=device).unsqueeze(0)
        mask = (key_pos <= query_pos)[None, None]  # (1, 1, T, S)
        if key_mask is not None:
            mask = mask & key_mask.bool()[:, None, None, :S]
            # A padding query may have no visible key at all; letting every query see itself
            # keeps softmax finite (those rows are never used).
            mask = mask | (key_pos == query_pos)[None, None]
        return mask


def _check_output_head(head: nn.Module) -> None:
    """The head must be what the loss computes: `forward` with targets takes `lm_head.weight` into
    `linear_cross_entropy` (the logits a chunk at a time), so a head with a bias or a forward of its
    own would train and evaluate without them (a bias would never get a gradient)."""
    if type(head) is not nn.Linear or head.bias is not None:
        what = f"a {type(head).__name__}" + (" with a bias" if getattr(head, "bias", None) is not None else "")
        raise Gpt1Error(f"GPT: lm_head must be an nn.Linear without a bias, got {what}: the loss computes the "
                        "output layer from lm_head.weight alone (GPT.forward with targets, a chunk at a time), so "
                        "a bias would never be trained and whatever the head adds would be missing from training "
                        "and `gpt1 eval`; to add one, put it into that loss too, then into this check")


def model_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The weights to save: a tied output head is stored once (as the input embedding)."""
    state = dict(model.state_dict())
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state
