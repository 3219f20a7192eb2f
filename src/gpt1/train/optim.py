"""The optimizer of a training run: AdamW, or Muon for the blocks' weight matrices and AdamW for
the rest (`TrainConfig.optimizer`).

AdamW is the model card's: decoupled weight decay on matrices only (not biases or LayerNorm
gains, GPT-2/3 practice), fused into one kernel per step on CPUs and GPUs.

Muon (Keller Jordan et al., 2024; `torch.optim.Muon` since PyTorch 2.9) replaces each 2-D
weight's momentum update by its nearest semi-orthogonal matrix (five Newton-Schulz iterations),
so that every direction of the matrix learns at the same rate. It is meant for the hidden
matrices only: the blocks' attention and MLP weights. The embeddings, the output head, biases
and LayerNorms stay on AdamW, as its authors advise. Its updates are scaled to AdamW's RMS
(`adjust_lr_fn="match_rms_adamw"`) so that one schedule drives both; its learning rate is
`lr x muon_lr_scale` (a param group's `lr_scale`, which the training loop applies). Its weight
decay (each weight x (1 - rate x weight_decay) a step) runs at that rate, not at the RMS-matched
one of its updates: `muon_lr_scale` times AdamW's at the same `weight_decay`.

`embedding_lr_scale` gives the token and position embeddings their own AdamW group at
`lr x embedding_lr_scale`. A step's gradient touches only the rows of the tokens in the batch,
and a row is seen rarely, so a small model learns faster when each visit moves it much
further; modded-nanogpt trains its embeddings at 75x the head's learning rate. The quickstart's
recipe measured it (`tiny-cpu`, docs/training.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from gpt1.core.device import bf16_supported, no_bf16
from gpt1.core.errors import Gpt1Error


class Optimizers:
    """Several optimizers behind one optimizer's interface (what the training loop, GradScaler
    and checkpoints use): their param groups in order, one step, one state dict."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for o in self.optimizers for group in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states = state.get("optimizers")
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            raise Gpt1Error("the checkpoint's optimizer state is not this run's optimizer's "
                            "(was the run started with another `optimizer`?)")
        for o, s in zip(self.optimizers, states):
            o.load_state_dict(s)


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The trainable 2-D weights inside the transformer blocks (Muon's parameters)."""
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if blocks is None:
        raise Gpt1Error("optimizer=muon needs a gpt1 GPT (its blocks' weight matrices)")
    return [p for p in blocks.parameters() if p.requires_grad and p.dim() == 2]


def input_embeddings(model: nn.Module) -> list[nn.Parameter]:
    """The trainable token and position embeddings (`embedding_lr_scale`'s parameters), less a
    token embedding tied to the output head: the head's gradient is dense, and it keeps lr."""
    transformer = getattr(model, "transformer", None)
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    tables = [getattr(transformer, name, None) for name in ("wte", "wpe")]
    return [t.weight for t in tables if isinstance(t, nn.Embedding) and t.weight.requires_grad and t.weight is not head]


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer | Optimizers:
    """The optimizer `cfg.optimizer` names over the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise Gpt1Error("no trainable parameters: every parameter has requires_grad=False")
    muon_params = hidden_matrices(model) if cfg.optimizer == "muon" else []
    # Left in the matrices' group at scale 1, so that the param groups (and checkpoints) are as before the knob.
    embeddings = input_embeddings(model) if cfg.embedding_lr_scale != 1 else []
    apart = {id(p) for p in muon_params + embeddings}
    rest = [p for p in params if id(p) not in apart]
    # Decay matrices (embeddings, linear weights), not biases or LayerNorm gains (GPT-2/3 practice).
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
              {"params": embeddings, "weight_decay": cfg.weight_decay, "lr_scale": cfg.embedding_lr_scale}]
    # The fused kernel does the whole update in one pass (one launch on a GPU) instead of a
    # dozen per tensor: on this project's 2-core CPU it is 2.3x faster than the default for the
    # `small` model, ~10% of a training step.
    adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas),
                              fused=device.type in ("cuda", "cpu"))
    if not muon_params:
        return adamw
    if not hasattr(torch.optim, "Muon"):
        raise Gpt1Error(f"optimizer=muon needs PyTorch >= 2.9 (torch.optim.Muon); this is {torch.__version__}")
    if device.type == "mps" and not bf16_supported(device):  # a GPU without bf16 emulates it: slow but right
        # torch.optim.Muon orthogonalizes the update in bfloat16 whatever the weights' dtype: the
        # first step would fail with MPS's own TypeError.
        raise Gpt1Error(f"optimizer=muon computes its update in bfloat16, and {no_bf16(device)}: "
                        "use optimizer=adamw, or device=cpu (gpt1 quickstart: --device cpu)")
    muon = torch.optim.Muon([{"params": muon_params, "lr_scale": cfg.muon_lr_scale}], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw")
    return Optimizers(muon, adamw)
