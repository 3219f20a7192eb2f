"""LoRA: low-rank adapters on the model's linear layers, trainable special-token embeddings,
and the PEFT file layout.

`LoRALinear` adds `scaling * B(A(dropout(x)))` to a frozen `nn.Linear` (A: r x in, B: out x r,
B initialised to zero so training starts from the base model, scaling = alpha / r). Our
attention computes Q, K and V with one fused `c_attn`; each of them gets its own pair (the
model card adapts Q, K and V separately), held as stacked tensors `lora_A` (G, r, in) and
`lora_B` (G, out_g, r) for the G adapted slices of the output. Targets by name:

    q, k, v   slices of attn.c_attn        o     attn.c_proj
    up        mlp.c_fc                     down  mlp.c_proj

`TrainableTokens` keeps the embedding matrix frozen and trains a small table of rows for the
special tokens (role markers, [EOS]): every other row stays bit-identical and the optimizer
holds a few thousand numbers instead of the whole vocabulary.

Saved adapters use PEFT's layout for Hugging Face's GPT2LMHeadModel (`adapter_config.json` +
`adapter_model.safetensors`, keys like `base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`).
PEFT adapts the fused c_attn with one pair; our G pairs are exactly one pair of rank G*r:
lora_A = cat(A_q, A_k, A_v), lora_B = block-diagonal(B_q, B_k, B_v), saved with
rank_pattern {c_attn: G*r} and alpha_pattern {c_attn: G*alpha} so that PEFT's scale alpha'/r'
equals ours. The token rows are PEFT's `trainable_token_indices` on `wte`.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from gpt1.core.atomic import write_json
from gpt1.core.errors import Gpt1Error
from gpt1.core.model import model_state_dict
from gpt1.core.paths import json_path
from gpt1.core.reading import check_regular_file, read_json
from gpt1.core.rng import host_rng_kept
from gpt1.core.weights import check_weight_values, save_safetensors

# target name -> (module path inside a Block, index of the slice of a fused Q|K|V output or None).
# Only these are adapted: a layer added to the model (a SwiGLU gate's c_gate) gets no adapter until
# it is named here.
TARGETS: dict[str, tuple[str, int | None]] = {
    "q": ("attn.c_attn", 0), "k": ("attn.c_attn", 1), "v": ("attn.c_attn", 2),
    "o": ("attn.c_proj", None), "up": ("mlp.c_fc", None), "down": ("mlp.c_proj", None),
}
DEFAULT_TARGETS = ("q", "k", "v", "o", "up", "down")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
TOKEN_KEY = "token_adapter.trainable_tokens_delta"  # PEFT's name for the trained rows (their values)
LORA_PARTS = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", "." + TOKEN_KEY)  # what a plain LoRA saves
# adapter_config.json fields of PEFT's LoRA variants (and layer_replication, target_parameters) whose
# update is not scale·B·A on a module's weight: gpt1 refuses them (an import, a model dir's adapter/)
# rather than reading them as plain LoRA.
PEFT_VARIANTS = ("use_dora", "alora_invocation_tokens", "use_qalora", "use_bdlora", "kasa_config",
                 "monteclora_config", "arrow_config", "layer_replication", "target_parameters")
# PEFT's init_lora_weights that rewrite the base weights as the adapter is made (W - scale·B0·A0; LoftQ's
# quantized W), "pissa_niter_N" too: the adapter applies to that changed base, which is not saved.
PEFT_BASE_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# The step that works for an adapter gpt1 cannot read as plain LoRA (`gpt1 export --merge` reads only
# a gpt1 model dir, never a transformers folder).
PEFT_MERGE = ("merge it with PEFT instead (merge_and_unload(), then save_pretrained of the merged model and "
              "the tokenizer to a new folder) and import that folder")
# What reads any plain LoRA that gpt1's own adapter layout cannot hold (one rank and one scale for all
# modules, per-projection pairs on c_attn, every layer): an import, which merges it.
PEFT_IMPORT = ("a transformers folder with this adapter in its adapter/ (the base model's `gpt1 export`) "
               "reads any plain LoRA exactly, merged: `gpt1 finetune --base FOLDER`, `init_from=hf:FOLDER`, "
               "`gpt1 generate --model FOLDER` (chat, serve and eval too)")


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    token_ids: list[int] = field(default_factory=list)  # embedding rows to train (special tokens)

    def __post_init__(self) -> None:
        if not isinstance(self.targets, (list, tuple)) or not all(isinstance(t, str) for t in self.targets):
            raise Gpt1Error(f"LoRA targets must be a list of names, got {self.targets!r}")
        self.targets = tuple(self.targets)
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            what = f"unknown {unknown}" if unknown else "none given (an adapter needs at least one)"
            raise Gpt1Error(f"LoRA targets: {what}; choose from {', '.join(TARGETS)}")
        if len(set(self.targets)) < len(self.targets):  # one pair each: a repeat was counted twice in PEFT's rank
            repeated = sorted({t for t in self.targets if self.targets.count(t) > 1})
            raise Gpt1Error(f"LoRA targets: {', '.join(repeated)} given more than once; name each target once")
        if not _is_int(self.r) or self.r < 1:
            # r=0 is how some tools ask for full fine-tuning, which gpt1 asks for by name: say so.
            full = " (for full fine-tuning, which trains every weight: full=true)" if self.r == 0 else ""
            raise Gpt1Error(f"LoRA rank r must be a positive integer, got {self.r!r}{full}")
        if not _is_number(self.alpha) or self.alpha <= 0:  # the adapter's scale is alpha / r: 0 turns it off
            raise Gpt1Error(f"LoRA alpha must be a number > 0, got {self.alpha!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise Gpt1Error(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.token_ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in self.token_ids):
            raise Gpt1Error(f"LoRA token_ids must be a list of token ids (whole numbers >= 0), got {self.token_ids!r}")
        # NumPy's scalars (a sweep over np.arange) as Python numbers: the metadata is JSON.
        self.r, self.token_ids = int(self.r), [int(i) for i in self.token_ids]
        self.alpha, self.dropout = (v if type(v) in (int, float) else float(v) for v in (self.alpha, self.dropout))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def _is_int(value: Any) -> bool:  # numbers.*: NumPy's scalars too, as in SamplingParams
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _lora_config(values: Any, where: str) -> LoRAConfig:
    """A LoRAConfig from stored metadata: unknown keys and bad values name the file."""
    if not isinstance(values, dict):
        raise Gpt1Error(f"{where}: expected an object of LoRA settings, got {type(values).__name__}")
    known = [f.name for f in fields(LoRAConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise Gpt1Error(f"{where}: unknown LoRA setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    try:
        return LoRAConfig(**values)
    except Gpt1Error as e:
        raise Gpt1Error(f"{where}: {e}") from None


class LoRALinear(nn.Linear):
    """A frozen nn.Linear (same `weight`/`bias` names, so base weights load unchanged) plus
    low-rank updates of output slices `slices` (name -> (start, end), equal sizes)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 slices: dict[str, tuple[int, int]] | None = None):
        nn.Module.__init__(self)  # reuse base's tensors instead of allocating new ones
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.slices = dict(slices or {"": (0, base.out_features)})
        sizes = {end - start for start, end in self.slices.values()}
        if len(sizes) != 1:
            raise ValueError(f"LoRA slices must have equal sizes, got {self.slices}")
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        G, size = len(self.slices), sizes.pop()
        kwargs = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(G, r, self.in_features, **kwargs))
        self.lora_B = nn.Parameter(torch.zeros(G, size, r, **kwargs))
        for a in self.lora_A:  # as nn.Linear's (and PEFT's) default init
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        columns = torch.cat([torch.arange(s, e) for s, e in self.slices.values()])
        self.register_buffer("lora_columns", columns.to(base.weight.device), persistent=False)
        self._covers_all = bool(torch.equal(columns, torch.arange(self.out_features)))
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A as an (out, in) matrix (zero outside the adapted slices)."""
        blocks = torch.bmm(self.lora_B, self.lora_A).flatten(0, 1) * self.scaling
        return torch.zeros_like(self.weight).index_add(0, self.lora_columns, blocks.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        G, r = self.lora_A.shape[:2]
        h = F.linear(self.lora_dropout(x), self.lora_A.flatten(0, 1)).unflatten(-1, (G, r))
        delta = torch.einsum("...gr,gor->...go", h, self.lora_B).flatten(-2) * self.scaling
        if self._covers_all:
            return out + delta
        # index_add needs one dtype, and under autocast the two can differ: with r == 1 the einsum
        # contracts a dimension of size 1 without a matmul, so autocast leaves delta in fp32 while
        # `out` is bf16/fp16 (for r >= 2 both are autocast's dtype already, and this is a no-op).
        return out.index_add(-1, self.lora_columns, delta.to(out.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, slices={list(self.slices)}"


class TrainableTokens(nn.Embedding):
    """An embedding whose `weight` is frozen except rows `token_ids`, which are read from the
    small trainable table `trainable_tokens` (initialised to those rows)."""

    def __init__(self, base: nn.Embedding, token_ids: Sequence[int]):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq = self.sparse = False
        self.weight = base.weight
        ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long, device=base.weight.device)
        slot = torch.full((self.num_embeddings,), -1, dtype=torch.long, device=base.weight.device)
        slot[ids] = torch.arange(len(ids), device=base.weight.device)
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("token_slot", slot, persistent=False)
        self.trainable_tokens = nn.Parameter(base.weight.detach()[ids].clone())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        slot = self.token_slot[idx]
        trained = F.embedding(slot.clamp(min=0), self.trainable_tokens)
        return torch.where((slot >= 0).unsqueeze(-1), trained, F.embedding(idx, self.weight))

    def merged_weight(self) -> torch.Tensor:
        return self.weight.detach().index_copy(0, self.token_ids, self.trainable_tokens.detach().to(self.weight.dtype))


class TiedTokensHead(nn.Linear):
    """The output head of a tied-embedding model: its rows for the trained tokens come from the
    embedding's table too, so input and output stay tied during training."""

    def __init__(self, base: nn.Linear, embedding: TrainableTokens):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.trainable_tokens = embedding.trainable_tokens
        self.register_buffer("token_ids", embedding.token_ids, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight, self.bias)
        return logits.index_copy(-1, self.token_ids, F.linear(x, self.trainable_tokens))

    def output_weight(self) -> torch.Tensor:
        """The weight `forward` applies, differentiable in the trained rows: the loss
        (GPT.forward with targets, `linear_cross_entropy`) takes the head's weight, not its forward.
        A copy of the table per call, for tied models with trained tokens only."""
        return self.weight.index_copy(0, self.token_ids, self.trainable_tokens.to(self.weight.dtype))


# ---- inject, freeze, merge -----------------------------------------------------------------

def inject_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Replace the targeted linear layers of a GPT with LoRALinear (in place), and make the
    embedding rows `config.token_ids` trainable. Returns the model."""
    if any(isinstance(m, (LoRALinear, TrainableTokens)) for m in model.modules()):
        raise Gpt1Error("the model already has LoRA adapters")
    by_module: dict[str, list[str]] = {}
    for target in config.targets:
        by_module.setdefault(TARGETS[target][0], []).append(target)
    C = model.config.n_embd
    if config.r > C:  # every adapted matrix has n_embd rows or columns: a higher rank is only bigger
        raise Gpt1Error(f"LoRA rank r={config.r} is larger than this model's width (n_embd {C}): a rank above the "
                        f"smaller side of the adapted matrices adds parameters (and disk), not capacity; use r <= {C}")
    for block in model.transformer.h:
        for path, names in by_module.items():
            parent_name, attr = path.split(".")
            parent = getattr(block, parent_name)
            base = getattr(parent, attr)
            slices = None
            if TARGETS[names[0]][1] is not None:  # a slice of the fused Q|K|V matrix
                slices = {n: (TARGETS[n][1] * C, (TARGETS[n][1] + 1) * C) for n in sorted(names, key=lambda n: TARGETS[n][1])}
            setattr(parent, attr, LoRALinear(base, config.r, config.alpha, config.dropout, slices).train(model.training))
    if config.token_ids:
        wte = TrainableTokens(model.transformer.wte, config.token_ids)
        model.transformer.wte = wte
        if model.config.tie_embeddings:
            model.lm_head = TiedTokensHead(model.lm_head, wte)
    model.lora_config = config
    return model


def is_adapter_param(name: str) -> bool:
    return ".lora_A" in name or ".lora_B" in name or name.endswith("trainable_tokens")


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    """Freeze every parameter except the LoRA pairs and the trainable token rows."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_param(name))


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module) -> None:
    """Add every LoRA update into its base weight (faster inference); `unmerge_lora` undoes it."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.unmerge()


def _plain_state(model: nn.Module, merge: bool) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in model_state_dict(model).items() if not is_adapter_param(k)}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear) and m.merged != merge:
            with torch.no_grad():
                delta = m.delta_weight()
            state[f"{name}.weight"] = state[f"{name}.weight"] + (delta if merge else -delta)
        elif isinstance(m, TrainableTokens):
            state[f"{name}.weight"] = m.merged_weight()
    return {k: v.detach() for k, v in state.items()}


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain GPT weights without the LoRA updates but with the trained token rows written in:
    the base that the saved adapter applies to."""
    return _plain_state(model, merge=False)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain GPT weights with everything merged in: a model dir that needs no adapter."""
    return _plain_state(model, merge=True)


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the adapters into the weights and put plain modules back (in place)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.merge()
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        elif isinstance(m, TrainableTokens):
            m.weight.index_copy_(0, m.token_ids, m.trainable_tokens.to(m.weight.dtype))
            # _weight, not device="meta": no init of its own (normal_ on meta imports torch._dynamo, 1-2 s)
            plain = nn.Embedding(m.num_embeddings, m.embedding_dim, _weight=m.weight)
        elif isinstance(m, TiedTokensHead):
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        else:
            continue
        plain.weight = m.weight
        if isinstance(plain, nn.Linear):
            plain.bias = m.bias
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, plain)
    if getattr(model.config, "tie_embeddings", False):
        model.lm_head.weight = model.transformer.wte.weight
    model.__dict__.pop("lora_config", None)
    return model


# ---- PEFT layout ---------------------------------------------------------------------------

def to_peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter as PEFT saves it for Hugging Face's GPT2LMHeadModel (module names match
    ours one to one). A fused c_attn's G pairs become one pair of rank G*r (module docstring)."""
    state: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            G, r = m.lora_A.shape[:2]
            B = m.lora_B.detach()
            B_full = torch.zeros(m.out_features, G * r, dtype=B.dtype, device=B.device)
            for g, (start, end) in enumerate(m.slices.values()):
                B_full[start:end, g * r:(g + 1) * r] = B[g]
            state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().flatten(0, 1)
            state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B_full
        elif isinstance(m, TrainableTokens):
            state[f"{PEFT_PREFIX}{name}.{TOKEN_KEY}"] = m.trainable_tokens.detach()
    return state


def peft_adapter_config(config: LoRAConfig, base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json for `config` (PEFT's LoraConfig fields)."""
    modules = sorted({TARGETS[t][0] for t in config.targets})
    groups = sum(1 for t in config.targets if TARGETS[t][1] is not None)
    alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    rank_pattern, alpha_pattern = {}, {}
    if groups > 1:
        rank_pattern["attn.c_attn"] = groups * config.r
        alpha_pattern["attn.c_attn"] = groups * alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": modules,
        "fan_in_fan_out": True,  # Hugging Face's GPT-2 uses Conv1D (weights stored as in x out)
        "bias": "none",
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        # In the order of the saved rows: TrainableTokens holds them sorted, PEFT reads them as listed.
        "trainable_token_indices": {"wte": sorted(set(config.token_ids))} if config.token_ids else None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def save_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` (PEFT's layout) atomically."""
    config: LoRAConfig = getattr(model, "lora_config", None)
    if config is None:
        raise Gpt1Error("the model has no LoRA adapters to save")
    directory = Path(directory)
    if base_model_name_or_path is not None:  # before the weights: JSON records only UTF-8 paths
        base_model_name_or_path = json_path(base_model_name_or_path)
    metadata = {"format": "pt", "gpt1_lora": json.dumps(asdict(config))}
    save_safetensors(directory / ADAPTER_WEIGHTS, to_peft_state_dict(model), metadata=metadata)
    write_json(directory / ADAPTER_CONFIG, peft_adapter_config(config, base_model_name_or_path))
    return directory


def read_peft_config(directory: str | Path) -> dict[str, Any]:
    """An adapter folder's adapter_config.json, as PEFT wrote it, once it is a LoRA that gpt1 can read
    as W += scale·B·A on the base as saved (a model dir's adapter/, or an import's): a LoRA variant
    (PEFT_VARIANTS) or an init that rewrote the base (PEFT_BASE_INITS) is refused, naming what works."""
    where = Path(directory) / ADAPTER_CONFIG
    peft = read_json(where)
    if not isinstance(peft, dict) or peft.get("peft_type") != "LORA":
        raise Gpt1Error(f"{where}: expected a PEFT LoRA adapter config (peft_type LORA)")
    variants = [key for key in PEFT_VARIANTS if peft.get(key)]
    if variants:
        raise Gpt1Error(f"{where}: {', '.join(variants)}: a LoRA variant whose update is not scale·B·A, "
                        f"which gpt1 does not merge; {PEFT_MERGE}")
    init = peft.get("init_lora_weights")
    if isinstance(init, str) and init.lower().split("_niter_")[0] in PEFT_BASE_INITS:  # PEFT: "OLoRA" is olora
        # Merged as plain LoRA onto the base as saved, not the one it was trained on: other logits (0.9 off PEFT's).
        raise Gpt1Error(f"{where}: init_lora_weights {init!r} changed the base weights when the adapter was made "
                        "(W - scale·B·A of the initial pair), so it does not apply to the base as saved; save it "
                        "from PEFT as plain LoRA: save_pretrained(DIR, path_initial_model_for_weight_conversion="
                        "INITIAL), INITIAL the adapter as saved before training (pissa, olora, corda, lora_ga: it "
                        f"writes a plain LoRA of rank 2r), or {PEFT_MERGE}")
    return peft


def adapter_weights_file(directory: str | Path) -> Path:
    """The adapter's adapter_model.safetensors; an adapter_model.bin is named, since gpt1 never
    unpickles a file it did not write (a FIFO there would block the read forever: refused too)."""
    directory = Path(directory)
    weights, pickle = directory / ADAPTER_WEIGHTS, directory / "adapter_model.bin"
    if not weights.exists() and pickle.exists():
        raise Gpt1Error(f"{pickle}: a pickle (PEFT's save_pretrained with safe_serialization=False), which gpt1 "
                        "never loads; save the adapter again where you trust the file, with PEFT's "
                        "save_pretrained(DIR, safe_serialization=True) (its default)")
    check_regular_file(weights)
    return weights


def peft_token_ids(peft: dict[str, Any], module: str) -> Any:
    """The ids PEFT's trainable_token_indices gives `module` (its full name), unchecked, or None: a
    list is the input embedding's (transformer.wte), an object maps a module (the end of its name)
    to its ids. The stored rows follow the ids as listed."""
    ids = peft.get("trainable_token_indices")
    if isinstance(ids, dict):
        return next((v for k, v in ids.items() if module == k or module.endswith("." + k)), None)
    return ids if module == "transformer.wte" else None


def read_adapter_config(directory: str | Path) -> LoRAConfig:
    """Our LoRAConfig for an adapter folder (written by `save_adapter`, or by PEFT for GPT-2)."""
    return _read_adapter(Path(directory))[0]


def _read_adapter(directory: Path) -> tuple[LoRAConfig, bool]:
    """The adapter's LoRAConfig, and whether gpt1 wrote it (its weights' gpt1_lora metadata)."""
    peft = read_peft_config(directory)
    weights = adapter_weights_file(directory)
    try:
        with safe_open(str(weights), "pt") as f:
            ours = (f.metadata() or {}).get("gpt1_lora")
            # The modules' full names, which PEFT matches rank_pattern / alpha_pattern keys against.
            names = sorted({key.removeprefix(PEFT_PREFIX).rpartition(".lora_")[0]
                            for key in f.keys() if ".lora_A." in key})
    except Exception as e:  # missing or corrupt file: safetensors raises its own types
        raise Gpt1Error(f"{weights}: not a readable safetensors file ({e})") from None
    if ours:
        where = f"{weights} (metadata gpt1_lora)"
        try:
            values = json.loads(ours)
        except json.JSONDecodeError as e:
            raise Gpt1Error(f"{where}: invalid JSON ({e})") from None
        except (ValueError, RecursionError):  # json's own limits: int digits, and nesting
            raise Gpt1Error(f"{where}: invalid JSON for gpt1: a number of over 4,300 digits, or nesting past "
                            "Python's recursion limit") from None
        return _lora_config(values, where), True
    # An adapter from elsewhere: derive the targets from PEFT's fields.
    where = str(directory / ADAPTER_CONFIG)
    missing = [key for key in ("r", "lora_alpha") if key not in peft]
    if missing:
        raise Gpt1Error(f"{where}: missing {' and '.join(missing)} (a PEFT LoRA config needs r and lora_alpha)")
    modules = peft.get("target_modules") or []
    modules = [modules] if isinstance(modules, str) else modules
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise Gpt1Error(f"{where}: target_modules must be a list of module names, got {modules!r}")
    if not isinstance(peft.get("rank_pattern") or {}, dict):
        raise Gpt1Error(f"{where}: rank_pattern must be an object, got {peft['rank_pattern']!r}")
    tokens = peft_token_ids(peft, "transformer.wte")
    if tokens is not None and not isinstance(tokens, list):
        raise Gpt1Error(f"{where}: trainable_token_indices must be a list of token ids (the input embedding's) or "
                        f"an object of them by module, got {peft['trainable_token_indices']!r}")
    if not _is_int(peft["r"]) or peft["r"] < 1:
        raise Gpt1Error(f"{where}: r must be a positive integer, got {peft['r']!r}")
    by_module = {path: name for name, (path, index) in TARGETS.items() if index is None}
    targets: list[str] = []
    for module in modules:
        if module.endswith("c_attn"):
            name = next((n for n in names if n == module or n.endswith("." + module)), module)
            targets += _qkv_targets(directory, peft, name)
        elif matching := [name for path, name in by_module.items() if path == module or path.endswith("." + module)]:
            targets += matching  # as PEFT matches names: "c_proj" is both attn.c_proj and mlp.c_proj
        else:
            raise Gpt1Error(f"{directory / ADAPTER_CONFIG}: unsupported target module {module!r}")
    return _lora_config({"r": peft["r"], "alpha": _peft_alpha(peft, names or modules, where),
                         "dropout": peft.get("lora_dropout", 0.0), "targets": targets,
                         "token_ids": tokens or []}, where), False


def _qkv_targets(directory: Path, peft: dict, module: str) -> list[str]:
    """Which of q, k and v a c_attn pair without gpt1's metadata adapts (PEFT's save_pretrained
    drops that metadata). gpt1 writes n of them as one pair of rank n*r whose lora_B is
    block-diagonal (module docstring): n comes from the rank, which n from where lora_B is
    non-zero. The first choice that fits every layer is taken: a projection whose update is zero
    everywhere adds nothing, wherever it is put."""
    r = peft["r"]
    rank = peft_pattern_value(peft, "rank_pattern", module, r, directory / ADAPTER_CONFIG)
    n = rank // r if _is_int(rank) and rank % r == 0 else 0
    if not 1 <= n <= 3:
        raise Gpt1Error(f"{directory}: a c_attn adapter of rank {rank} is not one to three per-projection pairs "
                        f"of rank {r} (only adapters written by gpt1 are supported); {PEFT_IMPORT}")
    with safe_open(str(directory / ADAPTER_WEIGHTS), "pt") as f:
        Bs = [f.get_tensor(key) for key in f.keys() if key.endswith(".c_attn.lora_B.weight")]
    # Missing tensors and other shapes are left to load_adapter, which names them.
    Bs = [B for B in Bs if B.ndim == 2 and B.shape[0] % 3 == 0 and B.shape[1] == rank and B.shape == Bs[0].shape]
    if not Bs:
        return ["q", "k", "v"][:n]
    nonzero = torch.stack(Bs).ne(0).any(0)  # where some layer's lora_B is non-zero
    C = len(nonzero) // 3
    for names in itertools.combinations(("q", "k", "v"), n):
        rows = [(TARGETS[t][1] * C, (TARGETS[t][1] + 1) * C) for t in names]
        if not torch.any(nonzero & ~_block_mask(nonzero, rows, r)):
            return list(names)
    which = "q, k and v" if n == 3 else f"any {('one', 'two')[n - 1]} of q, k and v"
    raise Gpt1Error(f"{directory}: the c_attn adapter of rank {rank} is not {('one', 'two', 'three')[n - 1]} "
                    f"per-projection pair{'s' if n > 1 else ''} of rank {r}: its lora_B is not block-diagonal over "
                    f"{which} (a PEFT pair on the fused c_attn, or one trained on in PEFT; only adapters written "
                    f"by gpt1 are supported); {PEFT_IMPORT}")


def _block_mask(B: torch.Tensor, rows: Sequence[tuple[int, int]], r: int) -> torch.Tensor:
    """True where a lora_B of gpt1's may be non-zero: column block g (of r columns) writes only
    the output rows rows[g] = (start, end)."""
    mask = torch.zeros_like(B, dtype=torch.bool)
    for g, (start, end) in enumerate(rows):
        mask[start:end, g * r:(g + 1) * r] = True
    return mask


def _peft_alpha(peft: dict, modules: list[str], where: str) -> float:
    """gpt1's alpha for a PEFT config: its scale (alpha / r) times r. PEFT scales each module by
    its own values (`peft_scale`): one scale for all is what gpt1 can hold (c_attn's rank 3r pair
    is three of gpt1's rank-r pairs); options that change the math otherwise are refused rather
    than silently dropped (the variants by `read_peft_config`)."""
    r = peft["r"]
    scales = {module: peft_scale(peft, module, where)[1] for module in modules}
    scale = next(iter(scales.values()), peft_scale(peft, "", where)[1])
    if not all(math.isclose(other, scale) for other in scales.values()):
        first: dict[str, str] = {}  # one module per scale: the layers repeat them
        for module, value in scales.items():
            first.setdefault(f"{value:.3g}", module)
        listed = ", ".join(f"{module}: {value}" for value, module in first.items())
        raise Gpt1Error(f"{where}: the modules' LoRA scales differ ({listed}, from alpha_pattern, rank_pattern "
                        f"or use_rslora); gpt1 holds one scale alpha / r; {PEFT_IMPORT}")
    return scale * r


def peft_scale(peft: dict[str, Any], module: str, where: str | Path) -> tuple[int, float]:
    """PEFT's rank and scale for `module` (its full name): lora_alpha / r, or over sqrt(r) with
    use_rslora, r and alpha from the rank_pattern / alpha_pattern key that matches the name."""
    r = peft_pattern_value(peft, "rank_pattern", module, peft.get("r"), where)
    alpha = peft_pattern_value(peft, "alpha_pattern", module, peft.get("lora_alpha"), where)
    named = f" for {module}" if module else ""
    if not _is_int(r) or r < 1:
        raise Gpt1Error(f"{where}: r{named} must be a positive integer (r or rank_pattern), got {json.dumps(r)}")
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise Gpt1Error(f"{where}: lora_alpha{named} must be a number (lora_alpha or alpha_pattern), "
                        f"got {json.dumps(alpha)}")
    return r, alpha / (math.sqrt(r) if peft.get("use_rslora") else r)


def peft_pattern_value(peft: dict[str, Any], field: str, module: str, default: Any, where: str | Path) -> Any:
    """The value of `field` (rank_pattern or alpha_pattern) for `module`: that of the first key
    that matches the end of its name, as peft.utils.other.get_pattern_key matches (a key is a
    regular expression), else `default`."""
    patterns = peft.get(field) or {}
    if not isinstance(patterns, dict):
        raise Gpt1Error(f"{where}: {field} must be an object, got {json.dumps(patterns)}")
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error as e:
            raise Gpt1Error(f"{where}: {field} key {key!r} is not a regular expression ({e})") from None
    return default


@torch.no_grad()
def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Inject LoRA into a plain GPT as the adapter folder describes and load its weights."""
    directory = Path(directory)
    config, ours = _read_adapter(directory)
    # An adapter from elsewhere that gpt1's layout cannot hold: say what reads it.
    elsewhere = "" if ours else f"; {PEFT_IMPORT}"
    vocab_size = model.config.vocab_size
    if any(i >= vocab_size for i in config.token_ids):
        raise Gpt1Error(f"{directory}: the adapter trains token ids up to {max(config.token_ids):,}, but the model "
                        f"has {vocab_size:,} tokens: not an adapter for this model")
    with host_rng_kept():  # its random init is overwritten below: loading draws nothing from the host's RNG
        inject_lora(model, config)
    try:  # read again after _read_adapter: a folder replaced in between (a run saving best/) lost it
        state = load_file(str(directory / ADAPTER_WEIGHTS))
    except Exception as e:  # safetensors raises its own types, and FileNotFoundError
        raise Gpt1Error(f"{directory / ADAPTER_WEIGHTS}: not a readable safetensors file ({e}); if its folder was "
                        "being replaced, try again") from None
    expected = to_peft_state_dict(model)
    if set(state) != set(expected):
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if not ours and not all(key.endswith(LORA_PARTS) for key in unexpected):
            elsewhere = f"; {PEFT_MERGE}"  # other tensors (modules_to_save, biases): no import merges them
        raise Gpt1Error(f"{directory / ADAPTER_WEIGHTS}: adapter does not fit the model "
                        f"(missing: {missing[:3]}, unexpected: {unexpected[:3]}){elsewhere}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise Gpt1Error(f"{directory / ADAPTER_WEIGHTS}: {key} has shape {tuple(tensor.shape)}, "
                            f"the model expects {tuple(expected[key].shape)}{elsewhere}")
    check_weight_values(directory / ADAPTER_WEIGHTS, state, "adapter")
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            A = state[f"{PEFT_PREFIX}{name}.lora_A.weight"]
            B = state[f"{PEFT_PREFIX}{name}.lora_B.weight"]
            G, r = m.lora_A.shape[:2]
            blocks = torch.stack([B[s:e, g * r:(g + 1) * r] for g, (s, e) in enumerate(m.slices.values())])
            if torch.any(B[~_block_mask(B, list(m.slices.values()), r)]):
                raise Gpt1Error(f"{directory}: {name}.lora_B is not block-diagonal over {list(m.slices)} "
                                f"(only adapters written by gpt1 are supported){elsewhere}")
            m.lora_A.copy_(A.view_as(m.lora_A))
            m.lora_B.copy_(blocks)
        elif isinstance(m, TrainableTokens):
            rows = state[f"{PEFT_PREFIX}{name}.{TOKEN_KEY}"]
            if not ours:  # PEFT's rows follow trainable_token_indices as listed (the shapes: no repeats), ours sorted
                rows = rows[sorted(range(len(config.token_ids)), key=config.token_ids.__getitem__)]
            m.trainable_tokens.copy_(rows)
    return model
