"""The output layer and the loss without the full logits: `linear_cross_entropy`.

`F.cross_entropy(F.linear(hidden, weight).float(), targets)` holds the logits of a whole batch
(tokens x vocab floats: 5 GB for the reference recipe's 48 x 512 micro-batch, and as much again
for their gradient). Here the output matmul and the cross-entropy run a chunk of tokens at a
time, with the same FLOPs and the same loss and gradients to fp32 tolerance.
"""

from __future__ import annotations

import torch

from gpt1.core.constants import IGNORE_INDEX  # -100, as in PyTorch and HF (defined torch-free for the data layer)

# The fp32 logits of at most this many bytes exist at once in the loss (see `linear_cross_entropy`).
# On a CPU, 64 MiB (~320 tokens of the 51,682-token vocabulary) is large enough for efficient
# matmuls and keeps a 257M step at 4 x 512 tokens well below the full logits' memory. A GPU wants
# fewer, larger chunks: on an H200 (reference recipe, 48 x 512, bf16) 1 GiB (~5,200 tokens) made
# the step 25% faster eager and 35% faster compiled than 64 MiB, at 18.3 GB peak eager (15.2 at
# 64 MiB, 32.4 with the full logits) and 16.7 GB compiled (22.8 at 64 MiB).
LOSS_CHUNK_BYTES = {"cpu": 64 * 2**20}
LOSS_CHUNK_BYTES_ACCELERATOR = 2**30  # CUDA and any other device type


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T`, `chunk` rows at a time, gradients included.

    Once a row's log-sum-exp is known its logit gradient is (softmax - one_hot) / n, so the
    forward pass computes the gradients of `hidden` and `weight` chunk by chunk and keeps
    them instead of the logits; backward only scales them. Same FLOPs as the plain output
    layer + `F.cross_entropy`, no recomputation, and (rows x vocab) floats at most per chunk.
    The matmuls run in `dtype` (bf16/fp16 under autocast), the softmax and the loss in fp32,
    as `F.cross_entropy(logits.float())` does; the gradients come back in the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, dtype):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        h_all, w = hidden.to(dtype), weight.to(dtype)
        valid = targets != IGNORE_INDEX
        n_valid = valid.sum().float()  # the loss is the mean over them (NaN when none, as F.cross_entropy)
        # The logit gradients are (softmax - one_hot) / n. In fp16, whose smallest normal number
        # is 6e-5 while a softmax entry of a 51k vocabulary is ~2e-5, they enter the matmuls
        # as (softmax - one_hot) x 1024 instead, and the sums are divided by 1024 n in fp32.
        fp16 = dtype == torch.float16
        # (Without targets the loss is NaN but the gradients are 0, not NaN: the training loop
        # gives such a micro-batch the weight 0.)
        n_rows = n_valid.clamp(min=1)
        row_factor = (1024.0 if fp16 else 1.0 / n_rows)
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None
        for start in range(0, hidden.size(0), chunk):
            rows = slice(start, start + chunk)
            h, keep = h_all[rows], valid[rows]
            logits = (h @ w.t()).float()
            y = torch.where(keep, targets[rows], 0).unsqueeze(1)
            target_logit = logits.gather(1, y).squeeze(1)
            # log-sum-exp in place, in few passes over the chunk: exp(logits - max), summed
            row_max = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(row_max).exp_()
            total = probs.sum(dim=1, keepdim=True)
            loss += torch.where(keep, row_max.squeeze(1) + total.squeeze(1).log() - target_logit, 0.0).sum()
            if not (need_hidden or need_weight):
                continue
            # the logit gradients in place of the logits, 0 on ignored rows
            row_keep = keep.unsqueeze(1) * row_factor
            grad_fp32 = probs.mul_(row_keep / total).scatter_add_(1, y, -row_keep)
            grad = grad_fp32.to(dtype)
            if need_hidden:
                if grad_hidden.dtype == dtype:
                    torch.mm(grad, w, out=grad_hidden[rows])
                else:
                    grad_hidden[rows] = grad @ w
            if need_weight:  # summed over the chunks in fp32, without a vocab x d temporary in fp32
                # In fp16 the weight's gradient is taken in fp32: its sum over a chunk's rows of
                # 1024 x (softmax - one_hot) x h passes fp16's 65,504 once a target is frequent in
                # the chunk (line ends, indents), and GradScaler cannot lower the fixed 1024 (a
                # `tiny-cpu` run skipped every step after its first). The hidden states' gradient,
                # a sum over the vocabulary of bounded terms, stays in fp16.
                a, b = (grad_fp32.t(), h.float()) if fp16 else (grad.t(), h)
                if grad_weight is None:
                    grad_weight = (a @ b).float()
                elif a.dtype == grad_weight.dtype:
                    grad_weight.addmm_(a, b)
                else:
                    grad_weight += a @ b
        # fp16: the hidden states' gradient is divided by 1024 n in backward, in fp32 and together with
        # the loss's own gradient (a GradScaler's scale). An fp16 factor 1/(1024 n) is subnormal above
        # n = 16 and 0 from n = 32,768 (an fp16 `hidden` got 0.98x its gradient at n = 1,000, none at
        # 40,000), and a gradient divided by n before the scale multiplies it underflows in fp16.
        unscale = 1.0 / (1024.0 * n_rows) if fp16 else None
        if fp16 and grad_weight is not None:
            grad_weight.mul_(unscale)  # in fp32 (above)
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), unscale)
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        # In place: the saved gradients serve this one backward pass (the Function is once-differentiable).
        grad_hidden, grad_weight, unscale = ctx.saved_tensors
        grad_loss = grad_loss.float()
        return (_times(grad_hidden, grad_loss if unscale is None else grad_loss * unscale), _times(grad_weight, grad_loss),
                None, None, None)


def _times(grad: torch.Tensor | None, factor: torch.Tensor) -> torch.Tensor | None:
    """`grad` times the fp32 scalar `factor`, in place; an fp16 or bf16 `grad` by way of fp32. (Times an
    fp32 tensor on a GPU, type promotion takes the factor in the gradient's dtype: 1/(1024 n) is 0 in
    fp16 from n = 32,768, a GradScaler's 65,536 inf, and a 1/3 in bf16 0.3340.)"""
    if grad is None:
        return None
    if grad.dtype in (torch.float16, torch.bfloat16):
        return grad.copy_(grad.float().mul_(factor))
    return grad.mul_(factor.to(grad.dtype))


def default_loss_chunk(vocab_size: int, device_type: str) -> int:
    """Tokens per chunk of `linear_cross_entropy` on `device_type`: its LOSS_CHUNK_BYTES of fp32 logits."""
    return max(1, LOSS_CHUNK_BYTES.get(device_type, LOSS_CHUNK_BYTES_ACCELERATOR) // (4 * vocab_size))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """`F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE_INDEX)`,
    without ever holding more than `chunk` rows of logits (default: the device's LOSS_CHUNK_BYTES of fp32).

    `hidden` (..., d), `targets` (...): the mean over targets != IGNORE_INDEX. Under autocast
    the matmuls run in the autocast dtype, as `F.linear` would.
    """
    hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    chunk = chunk or default_loss_chunk(weight.size(0), device_type)
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, dtype)
