"""Training configuration: the `TrainConfig` dataclass and a generic TOML + `key=value` loader.

A recipe is a flat TOML file whose keys are the fields of a config dataclass, or a run's
record (`RUN/train_config.json`: the config the run began with); any key can be overridden on the
command line as `key=value` (the value is read as a TOML value, so `lr=3e-4`, `compile=true`,
`betas=[0.9, 0.95]` work, and a bare word such as `precision=fp16-mixed` is taken as a string,
for a key that holds a list of strings as the list of it: `languages=en`). Overrides apply in
order: a key given twice takes the last value. `load_config(cls, path, overrides)` works for
any dataclass, including subclasses of `TrainConfig` (the fine-tuning config adds LoRA
fields). An unknown key or a value of the wrong type is a `Gpt1Error` naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import numbers
import os
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from gpt1.core.config import PRESETS
from gpt1.core.device import check_device_name
from gpt1.core.errors import Gpt1Error, other_name_hint
from gpt1.core.progress import info
from gpt1.core.reading import read_json
from gpt1.data.windows import WINDOW_ORDERS

PRECISIONS = ("fp32", "fp16-mixed", "bf16-mixed")
OPTIMIZERS = ("adamw", "muon")
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"  # the recipes shipped with gpt1


@dataclass
class TrainConfig:
    """Every knob of a training run. Defaults are a small, CPU-safe run; recipes set the rest.

    The run length is `max_steps` if it is > 0, else `max_tokens` / tokens per step if that is
    > 0, else `epochs` x an epoch's tokens / tokens per step. In pretraining an epoch is a pass
    over train.bin's windows (`data_order="epochs"`: every token once, but fewer than two windows'
    worth at its ends), or with `data_order="random"` train.bin's token count, in windows drawn
    with replacement (as nanoGPT's): about 63% (1 - 1/e) of its tokens, some more than once.
    """

    model: str = "tiny"  # a ModelConfig preset; vocab_size always comes from the tokenizer
    block_size: int = 0  # context length of the training windows; 0 = the preset's
    # The model's shape from scratch (0 = the preset's); with init_from, 0 or that model's own (checked as it loads)
    n_layer: int = 0
    n_head: int = 0
    n_embd: int = 0
    init_from: str = "scratch"  # "scratch", a gpt1 model dir, or "hf:PATH" (a transformers GPT-2 folder, or a Hub id)
    # The model's dropout rate while it trains (the embeddings', attention's and residual paths');
    # -1 = the model's own: 0 from scratch, the rate init_from's config holds (GPT-2's 0.1, say)
    dropout: float = -1.0
    max_steps: int = 1000
    max_tokens: int = 0
    epochs: float = 0.0
    # Pretraining's windows of train.bin (gpt1.data.windows.ShardWindows): "epochs", each epoch a pass
    # over its non-overlapping windows at an offset and in an order of its own; "random", each drawn
    # at a random start with replacement (nanoGPT's; every run begun before 2026-12-07 evening, which
    # resumes with it whatever this says)
    data_order: str = "epochs"
    # Seconds of training (resumptions added up); 0 = off. With a budget the run ends when it is
    # spent (and at the latest after the steps above): the last step is re-planned as it goes
    # from the measured step time, and the LR schedule follows the plan (at least 10 steps).
    time_budget: float = 0.0
    batch_size: int = 16  # sequences per micro-batch on each device
    grad_accum: int = 1  # micro-batches per optimizer step (per device)
    lr: float = 3e-4
    min_lr: float = 1e-6
    warmup: float = 0.03  # fraction of the steps with a linear warmup, then the decay to min_lr
    # 0 = the cosine; > 0 = warmup-stable-decay: lr until the last `cooldown` fraction of the
    # steps, then linear to min_lr (gpt1.train.schedule)
    cooldown: float = 0.0
    weight_decay: float = 0.0  # applied to matrices only (not biases, norms)
    # A list passes too (TOML has arrays only); checked and stored as the tuple (see `_checked_type`)
    betas: Annotated[Sequence[float], tuple[float, float]] = (0.9, 0.95)
    # adamw (the model card's), or muon: Muon for the blocks' weight matrices at lr x muon_lr_scale,
    # AdamW for the rest (gpt1.train.optim; PyTorch >= 2.9)
    optimizer: str = "adamw"
    muon_lr_scale: float = 4.0
    # The input and position embeddings' AdamW lr is lr x this (a tied input embedding, which is
    # also the output head, keeps lr): each step updates only the rows of the tokens it saw, and
    # small models learn faster when those rows move much further (modded-nanogpt; gpt1.train.optim)
    embedding_lr_scale: float = 1.0
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    precision: str = "fp32"  # fp32, bf16-mixed (fp16-mixed on GPUs without bf16), fp16-mixed (autocast + GradScaler)
    # FP8 matmuls in the blocks' linear layers (torchao; gpt1.train.precision): with
    # precision=bf16-mixed, on GPUs with FP8 tensor cores (compute capability >= 8.9); pretraining only
    float8: bool = False
    compile: bool = False  # torch.compile the model; eager with a warning if compilation fails
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    eval_every: int = 200
    eval_batches: int = 20  # held-out batches (of batch_size windows) per validation
    save_every: int = 200
    keep_checkpoints: int = 1  # the newest checkpoints kept in RUN/checkpoints (older ones are deleted)
    # RUN/best: the model of the lowest validation loss so far, written at each validation that lowers it
    keep_best: bool = False
    # End the run after this many validations in a row without a new lowest loss (0 = off)
    early_stop: int = 0
    seed: int = 1337
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps
    max_bad_steps: int = 20  # consecutive steps skipped for a NaN/inf loss or gradient norm that stop the run
    tensorboard: bool = False  # also log to TensorBoard (needs the tensorboard package)

    def __post_init__(self) -> None:
        # A config built in Python skips load_config: the same strict check of every field (also
        # a subclass's), so compile="no" is refused rather than truthy and max_steps=2.5 is not
        # run as 3 steps; values come back converted (an int to a float, a list to a tuple).
        names, hints = _fields(type(self))
        for name in names:
            setattr(self, name, _check(name, getattr(self, name), names, hints, type(self).__name__))
        check_device_name(self.device)
        if self.model not in PRESETS:  # here, not once the data is read: --print-config printed model=Tiny
            raise Gpt1Error(f"model: unknown model preset {self.model!r}; known presets: {', '.join(PRESETS)}")
        if self.precision not in PRECISIONS:
            raise Gpt1Error(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.float8 and self.precision != "bf16-mixed":
            raise Gpt1Error(f"float8=true runs the blocks' matmuls in FP8 and the rest in bf16: it needs "
                            f"precision=bf16-mixed, got {self.precision!r}")
        # Here, not only when the model is converted: by then the run dir holds this config, and a
        # rerun without float8 would be refused as another run's.
        if self.float8 and importlib.util.find_spec("torchao") is None:
            raise Gpt1Error("float8=true needs torchao: pip install 'gpt1[fp8]' (or pip install torchao)")
        if self.data_order not in WINDOW_ORDERS:
            raise Gpt1Error(f"data_order must be one of {', '.join(WINDOW_ORDERS)}, got {self.data_order!r}")
        if self.optimizer not in OPTIMIZERS:
            raise Gpt1Error(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        for name in ("muon_lr_scale", "embedding_lr_scale"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise Gpt1Error(f"{name} must be a number > 0, got {getattr(self, name)}")
        for name in ("batch_size", "grad_accum", "eval_every", "eval_batches", "save_every", "max_bad_steps",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise Gpt1Error(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_tokens", "block_size", "n_layer", "n_head", "n_embd", "early_stop"):
            if getattr(self, name) < 0:
                raise Gpt1Error(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.epochs >= 0 and math.isfinite(self.epochs)):
            raise Gpt1Error(f"epochs must be a finite number >= 0, got {self.epochs}")
        if not 0 <= self.seed < 2**63:  # what torch.manual_seed and numpy's generators both take
            raise Gpt1Error(f"seed must be a whole number in [0, 2**63), got {self.seed}")
        if not (self.time_budget >= 0 and math.isfinite(self.time_budget)):
            raise Gpt1Error(f"time_budget is seconds >= 0 (0 = off), got {self.time_budget}")
        if self.max_steps == 0 and self.max_tokens == 0 and self.epochs <= 0:
            raise Gpt1Error("set the run length: max_steps, max_tokens or epochs must be > 0")
        if not 0.0 <= self.warmup < 1.0:
            raise Gpt1Error(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        # The sum, with a tolerance: 1.0 - 0.8 is 0.19999999999999996, which refused cooldown=0.2.
        if not (self.cooldown >= 0.0 and self.warmup + self.cooldown <= 1.0 + 1e-9):
            raise Gpt1Error(f"cooldown is a fraction of the steps in [0, 1 - warmup], got {self.cooldown} "
                            f"(warmup {self.warmup})")
        if not (self.lr > 0 and math.isfinite(self.lr) and 0 <= self.min_lr <= self.lr):
            raise Gpt1Error(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise Gpt1Error(f"betas must be in [0, 1), got {list(self.betas)}")
        if not (0 <= self.weight_decay < math.inf and 0 <= self.grad_clip < math.inf):
            raise Gpt1Error(f"weight_decay and grad_clip must be finite numbers >= 0, got {self.weight_decay} "
                            f"and {self.grad_clip}")
        if not (self.dropout == -1 or 0 <= self.dropout < 1):
            raise Gpt1Error(f"dropout is a rate in [0, 1), or -1 for the model's own, got {self.dropout}")
        if not self.init_from or self.init_from == "hf:":
            raise Gpt1Error("init_from must be 'scratch', a model dir, or hf:PATH")

    def resolve_steps(self, tokens_per_step: int, train_tokens: int) -> int:
        """The number of optimizer steps of this run (see the class docstring)."""
        if self.max_steps > 0:
            return self.max_steps
        budget = self.max_tokens if self.max_tokens > 0 else self.epochs * train_tokens
        return max(1, math.ceil(budget / tokens_per_step))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


C = TypeVar("C")


def require_config(cfg: Any, cls: type[C]) -> C:
    """`cfg` checked again at the entry of a run: a copy, every field checked as construction
    checks it, for the run to use and record. A field set by attribute after the config was built
    (`cfg.lr = args.lr`, a str from argparse) is refused by name, as `TrainConfig(lr="3e-4")` is;
    a `cfg` that is not a `cls` (e.g. a dict of its keys) too."""
    if not isinstance(cfg, cls):
        raise Gpt1Error(f"cfg: expected a {cls.__name__} (e.g. {cls.__name__}(max_steps=100) or "
                        f"load_config({cls.__name__}, recipe, overrides)), got {type(cfg).__name__}")
    return dataclasses.replace(cfg)  # runs __post_init__ (the checks and conversions) on a copy


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A recipe file (TOML, or a run's train_config.json): PATH, else PATH.toml (a local file, from the current folder), else the
    recipe shipped in gpt1/configs by that bare name (with or without .toml). A bare name that is
    both a local file and a shipped recipe reads the local file (an edited copy), and says so."""
    text = os.fspath(name_or_path)
    local = next((p for p in (Path(text), Path(f"{text}.toml")) if p.is_file()), None)
    bare = "/" not in text and os.sep not in text  # `./tiny-cpu` names a local file only
    shipped = next((p for p in (CONFIGS_DIR / text, CONFIGS_DIR / f"{text}.toml") if bare and p.is_file()), None)
    if local is not None and shipped is not None:
        info(f"{local}: a local file of that name, used instead of the shipped recipe {shipped.stem}")
    if local or shipped:
        return local or shipped
    if (found := next((p for p in (Path(text), Path(f"{text}.toml")) if p.exists()), None)) is not None:
        kind = "a folder" if found.is_dir() else "not a regular file"
        raise Gpt1Error(f"{found}: {kind}, not a config file (a TOML recipe such as {CONFIGS_DIR.name}/tiny-cpu.toml, "
                        "or a run's train_config.json)")
    names = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.toml")))
    raise Gpt1Error(f"{name_or_path}: config file not found (shipped recipes: {names})")


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None,
                **values: Any) -> C:
    """Build the dataclass `cls` from a TOML recipe, then `key=value` overrides, then `values`.

    Every key is checked against the fields of `cls` and converted to the field's type hint
    by pydantic in strict mode (an int is accepted for a float, a TOML array for a tuple or
    list); anything else raises Gpt1Error naming the key, the expected type and the file or
    override it came from.
    """
    names, hints = _fields(cls)
    data: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        table = _run_record_config(path, cls) if path.suffix == ".json" else _read_toml(path)
        for key, value in table.items():
            data[key] = _check(key, _expand_home(key, value), names, hints, str(path))
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise Gpt1Error(f"override {item!r}: expected key=value")
        value = _expand_home(key, _parse_value(raw.strip(), hints.get(key)))
        data[key] = _check(key, value, names, hints, f"override {item!r}")
    for key, value in values.items():
        data[key] = _check(key, value, names, hints, "argument")
    return cls(**data)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise Gpt1Error(f"{path}: invalid TOML ({e})") from None
    except RecursionError:  # tomllib recurses once per level of nesting
        raise Gpt1Error(f"{path}: invalid TOML for gpt1: arrays or tables nested too deeply") from None
    except UnicodeDecodeError as e:  # TOML files are UTF-8 by the spec
        raise Gpt1Error(f"{path}: invalid UTF-8 at byte offset {e.start} (a TOML file must be UTF-8 text)") from None


def _run_record_config(path: Path, cls: type) -> dict[str, Any]:
    """A run's record (RUN/train_config.json) as a recipe: the config the run began with, so that
    `--config RUN/train_config.json --out NEW` trains that run again. Less the keys the run set
    itself (`RUN_SET_KEYS`: a fine-tune records its --base as init_from)."""
    record = read_json(path)
    config = record.get("config") if isinstance(record, dict) else None
    if not isinstance(config, dict):
        raise Gpt1Error(f"{path}: not a run's train_config.json (no \"config\" object); a recipe is a TOML file "
                        "(or a run's train_config.json)")
    return {k: v for k, v in config.items() if k not in getattr(cls, "RUN_SET_KEYS", ())}


HOME_KEYS = ("init_from", "data")  # the keys that name paths (also as hf:PATH)


def _expand_home(key: str, value: Any) -> Any:
    """A path key's `~/...` (or `hf:~/...`) from a recipe or an override, with `~` expanded as a
    shell would: TOML never expands it, and zsh (macOS's shell) does not in `data=~/chats.jsonl`."""
    if key not in HOME_KEYS:
        return value
    if isinstance(value, list):
        return [_expand_home(key, v) for v in value]
    if isinstance(value, str):
        prefix = "hf:" if value.startswith("hf:~") else ""
        if value[len(prefix):].startswith("~"):
            return prefix + os.path.expanduser(value[len(prefix):])
    return value


def _parse_value(raw: str, hint: Any) -> Any:
    """A command-line value as TOML; a bare word (or anything for a str field) stays a string, and
    for a list of strings is the list of its comma-separated items (`languages=en,de`, as
    `--languages en,de` is told to write: it was the one code "en,de", which matched nothing)."""
    if hint is str or (_takes_str(hint) and not raw.startswith("[")):  # str | list[str]: a list only as [...]
        return _unquoted(raw)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):  # not TOML (or nested past the recursion limit): text
        value = raw
    if isinstance(value, str) and value and _holds_strings(hint) and not raw.startswith("["):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _unquoted(raw: str) -> str:
    return raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'" else raw


def _holds_strings(hint: Any) -> bool:
    """Whether a field holds a list (or tuple) of strings of any length: languages, lora_targets."""
    args = typing.get_args(hint)
    return typing.get_origin(hint) in (list, tuple) and bool(args) and set(args) <= {str, Ellipsis}


# How a value of these types is written (TOML, in a recipe or as key=value): pydantic's "Input
# should be a valid boolean" did not say that True, 1 and yes are not the way.
SPELLINGS = {bool: "true or false: TOML, lower case", int: "a whole number such as 100",
             float: "a TOML number such as 0.5"}


# Other tools' names for gpt1's keys (nanoGPT's train.py, litgpt's, Hugging Face's Trainer, PEFT):
# a recipe copied from one of them says which key to write instead. alias -> (gpt1's key, what differs).
OTHER_TOOLS_KEYS: dict[str, tuple[str, str]] = {
    **dict.fromkeys(("max_iters", "lr_decay_iters"), ("max_steps", "")), "learning_rate": ("lr", ""),
    **dict.fromkeys(("num_epochs", "num_train_epochs"), ("epochs", "")),
    **dict.fromkeys(("eval_interval", "eval_steps"), ("eval_every", "")), "eval_iters": ("eval_batches", ""),
    **dict.fromkeys(("save_steps", "save_interval"), ("save_every", "")),
    "save_total_limit": ("keep_checkpoints", ""), "load_best_model_at_end": ("keep_best", ""),
    "gradient_accumulation_steps": ("grad_accum", ""),
    **dict.fromkeys(("micro_batch_size", "per_device_train_batch_size"), ("batch_size", "")),
    "dtype": ("precision", ""), **dict.fromkeys(("beta1", "beta2"), ("betas", "betas=[0.9, 0.95]")),
    **dict.fromkeys(("warmup_iters", "warmup_steps"), ("warmup", "a fraction of the run's steps, e.g. warmup=0.05")),
    "max_grad_norm": ("grad_clip", ""), "early_stopping_patience": ("early_stop", "validations, not steps"),
    **dict.fromkeys(("r", "lora_rank"), ("lora_r", "")),
}
# FinetuneConfig's own keys (gpt1.train.finetune, above this module; a test keeps the two equal): one
# in a pretraining recipe (a fine-tune's recipe given to gpt1 pretrain) is named as such.
FINETUNE_KEYS = ("data", "full", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "train_special_tokens",
                 "all_paths", "languages", "skip_invalid", "val_fraction")


def _check(key: str, value: Any, names: frozenset[str], hints: dict[str, Any], where: str) -> Any:
    """`value` as the type of the field `key` (pydantic, strict: no "1" for 1, no 1 for true; an
    int is a float and an array a tuple, as JSON has no other spelling for them)."""
    if key not in names:
        hint = " (a gpt1 finetune key)" if key in FINETUNE_KEYS else other_name_hint(key, OTHER_TOOLS_KEYS, known=names)
        raise Gpt1Error(f"{where}: unknown key {key!r}{hint}; known keys: {', '.join(sorted(names))}")
    if isinstance(value, numbers.Number) and not isinstance(value, (bool, int, float)) and hasattr(value, "item"):
        value = value.item()  # a NumPy (or torch) scalar, e.g. from a sweep over np.arange: its Python number
    if isinstance(value, str) and _takes_str(hints[key]):
        # As typed: a path from argv holds lone surrogates under a locale that is not UTF-8
        # (LANG=C without Python's UTF-8 mode), which JSON cannot carry; recorded via json_path.
        return value
    try:
        return _adapter(hints[key]).validate_json(json.dumps(value), strict=True)
    except (ValidationError, TypeError, ValueError) as e:
        reason = (SPELLINGS.get(hints[key]) or _strings_spelling(key, value, hints[key]) or _tuple_spelling(hints[key])
                  or (e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)))
        raise Gpt1Error(f"{where}: key {key!r} expects {_type_name(hints[key])}, got {value!r} ({reason})") from None


def _takes_str(hint: Any) -> bool:
    """Whether a field takes a plain string (`str`, or a union with it such as `str | list[str]`)."""
    return hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType) and str in typing.get_args(hint))


def _tuple_spelling(hint: Any) -> str | None:
    """How a fixed-length tuple such as betas is written: pydantic said "Field required" of [0.9]."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is not tuple or not args or Ellipsis in args or len(set(args)) != 1:
        return None
    kind = {float: "numbers", int: "whole numbers", str: "strings", bool: "booleans"}.get(args[0], "values")
    return f"an array of exactly {len(args)} {kind}"


def _strings_spelling(key: str, value: Any, hint: Any) -> str | None:
    """How a list of strings is written. `lora_targets=["q","v"]` unquoted in a shell arrives as
    [q,v], the quotes dropped, which TOML cannot read: the whole argument is quoted instead."""
    if not _holds_strings(hint):
        return None
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        items = ", ".join(json.dumps(_unquoted(v.strip())) for v in value[1:-1].split(",") if v.strip())
        return f"the shell dropped the quotes around the strings: quote the whole argument, '{key}=[{items}]'"
    return f"an array of strings, e.g. {key}=[\"a\", \"b\"]"


@functools.cache  # a config is checked field by field on every construction (and dataclasses.replace)
def _fields(cls: type) -> tuple[frozenset[str], dict[str, Any]]:
    """The names of `cls`'s init fields and the types their values are checked as."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return (frozenset(f.name for f in dataclasses.fields(cls) if f.init),
            {name: _checked_type(hint) for name, hint in hints.items()})


def _checked_type(hint: Any) -> Any:
    """The type a field's value is checked and stored as. `Annotated[Sequence[float], tuple[float,
    float]]` says both sides: a type checker lets a caller pass any sequence (a list, as the docs
    and TOML write it), and the value is checked as, and converted to, the tuple."""
    if typing.get_origin(hint) is Annotated:
        return hint.__metadata__[0]
    return hint


@functools.cache
def _adapter(hint: Any) -> TypeAdapter:
    return TypeAdapter(hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if typing.get_origin(hint) is None else str(hint).replace("typing.", "")
