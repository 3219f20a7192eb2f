"""Model configuration: one dataclass, named presets, JSON round trip.

Field names follow nanoGPT / GPT-2 (`vocab_size`, `block_size`, `n_layer`, `n_head`,
`n_embd`) so that configs read the same as everywhere else in the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from gpt1.core.atomic import write_json
from gpt1.core.errors import Gpt1Error
from gpt1.core.reading import read_json


@dataclass
class ModelConfig:
    """The shape of a `GPT`: what config.json holds. Checked when built (and again by `GPT(config)`);
    `preset(name, **overrides)` for the named ones, `from_dict`/`load` for config.json."""

    # A new field is an int, float, bool or str (`_FIELD_TYPES`: what `validate` checks, and what
    # config.json holds), with a default that keeps the model as it was. Besides the model code it
    # needs: the exporters' mapping (`gpt1.formats.gpt2_layout.GPT2_FIELDS` and what hf.py and gguf.py
    # write; until then an export of a model that sets it is refused by name), and, to be set from a
    # recipe, the pretrain recipe's model overrides (`gpt1.train.pretrain.init_model`, TrainConfig).

    vocab_size: int = 51_682
    block_size: int = 512  # context length: the most positions the model has embeddings for
    n_layer: int = 12
    n_head: int = 16
    n_embd: int = 1024
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * n_embd (GPT-2: 4)
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2
    tie_embeddings: bool = False  # the reference model has separate input and output embeddings
    dropout: float = 0.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "ModelConfig":
        """Check every field against its declared type and range, in place (one place for
        config.json, presets with overrides, imported models, and a config changed by attribute
        after it was built: `GPT(config)` checks it again). A NumPy integer becomes an int and an
        int a float where the field is a float, as `TrainConfig` does. Returns the config."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, numbers.Number) and not isinstance(value, (bool, int, float)) and hasattr(value, "item"):
                value = value.item()  # a NumPy scalar (e.g. from a sweep over np.arange): its Python number
            kind = _field_type(f)
            if kind is bool and not isinstance(value, bool):
                raise Gpt1Error(f"model config: {f.name} must be true or false, got {value!r}")
            if kind is int and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SIZE):
                raise Gpt1Error(f"model config: {f.name} must be a whole number from 1 to {MAX_SIZE:,}, got {value!r}")
            if kind is str and not isinstance(value, str):
                raise Gpt1Error(f"model config: {f.name} must be a string, got {value!r}")
            if kind is float:
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                    raise Gpt1Error(f"model config: {f.name} must be a number, got {value!r}")
                value = float(value)  # dropout=0 is stored (and written to config.json) as 0.0
            setattr(self, f.name, value)
        if self.n_embd % self.n_head:
            raise Gpt1Error(f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise Gpt1Error(f"model config: dropout must be in [0, 1), got {self.dropout!r}")
        if not self.norm_eps > 0:
            raise Gpt1Error(f"model config: norm_eps must be > 0 (LayerNorm divides by sqrt(var + eps)), got {self.norm_eps!r}")
        return self

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_ratio * self.n_embd

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named configuration (see `PRESETS`), with optional field overrides."""
        if name not in PRESETS:
            raise Gpt1Error(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
        _refuse_unknown(overrides)  # a typo (n_layers=2) is named with the known fields, not a TypeError of __init__
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """A config from its fields, e.g. `json.load` of a config.json: the keys `save` writes
        beside the fields (METADATA_KEYS) are skipped; any other unknown key is an error."""
        if not isinstance(data, Mapping):
            raise Gpt1Error(f"model config: expected a mapping of field names to values (such as config.json's "
                            f"object), got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k not in METADATA_KEYS}
        _refuse_unknown(data)
        return cls(**data)

    def save(self, path: str | os.PathLike[str], tokenizer_fingerprint: str | None = None) -> None:
        """Write config.json; a model dir records its tokenizer's fingerprint too (checked when
        the tokenizer is loaded from the dir, see `Tokenizer.load`)."""
        extra = {"tokenizer_fingerprint": tokenizer_fingerprint} if tokenizer_fingerprint else {}
        write_json(path, {"model_type": "gpt1", **self.to_dict(), **extra})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ModelConfig":
        data = read_json(path)
        if not isinstance(data, dict):
            raise Gpt1Error(f"{path}: expected a JSON object with the model config")
        try:
            return cls.from_dict(data)
        except Gpt1Error as e:
            raise Gpt1Error(f"{path}: {e}") from None

    def __str__(self) -> str:
        return json.dumps(self.to_dict())


def _refuse_unknown(values: Mapping[Any, Any]) -> None:
    """A Gpt1Error naming the keys of `values` that are not fields of ModelConfig, and the fields."""
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        raise Gpt1Error(f"unknown model config field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


def _field_type(f: dataclasses.Field) -> type:
    """The type `validate` checks a field against; another annotation is refused by name (it would
    otherwise fail as a KeyError while PRESETS are built, at `import gpt1`)."""
    kind = _FIELD_TYPES.get(f.type) if isinstance(f.type, str) else f.type
    if kind not in _FIELD_TYPES.values():
        raise Gpt1Error(f"model config: field {f.name} is declared {f.type!r}; ModelConfig fields must be one of "
                        f"{', '.join(_FIELD_TYPES)} (what validate checks and config.json holds)")
    return kind


# The annotations are strings (from __future__ import annotations): map them to the types.
_FIELD_TYPES = {"int": int, "float": float, "bool": bool, "str": str}
MAX_SIZE = 1 << 24  # any size field; larger ones are typos, and would allocate terabytes
METADATA_KEYS = {"model_type", "tokenizer_fingerprint"}  # in config.json, not fields of the model

PRESETS: dict[str, ModelConfig] = {
    # The model card's reference model: ~257M parameters with untied embeddings.
    "gpt1": ModelConfig(),
    # Learns visible structure in a few CPU minutes; used by the tests and `gpt1 quickstart`.
    "tiny": ModelConfig(vocab_size=4096, block_size=128, n_layer=4, n_head=4, n_embd=128),
    # A step up for a laptop GPU or a long CPU run (17.0M parameters with an 8k vocab).
    "small": ModelConfig(vocab_size=8192, block_size=256, n_layer=6, n_head=6, n_embd=384),
    # 135.8M parameters with a 32k vocab, at 3/4 of the reference width: a single consumer GPU in an afternoon.
    "medium": ModelConfig(vocab_size=32_768, block_size=512, n_layer=12, n_head=12, n_embd=768),
    # OpenAI's GPT-2 small layout (tied embeddings, 1024 context), for imported checkpoints.
    "gpt2": ModelConfig(vocab_size=50_257, block_size=1024, n_layer=12, n_head=12, n_embd=768, tie_embeddings=True),
}
