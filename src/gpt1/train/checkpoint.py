"""Atomic, resumable checkpoints of a training run.

A run dir looks like this::

    RUN/
      train_config.json        the run's TrainConfig as started (a rerun with another config is refused),
                               the resumable settings changed since, and each start's `environment`
      config.json, model.safetensors, tokenizer.json   the latest model: RUN is a model dir
      metrics.jsonl            one JSON line per step and per validation
      loss.png                 the loss / perplexity curve (written at the end)
      checkpoints/step-00001000/
        trainable.safetensors  every parameter with requires_grad (what resume loads)
        trainer_state.pt       optimizer, GradScaler, step, sampler state, every RNG state (every rank's),
                               the lowest validation loss so far and its step, whether early_stop ended the run
        outputs.done           present once RUN's model files were written from this checkpoint (the final
                               checkpoint of a run with a time budget: the budget spent then, as JSON)
      best/                    with keep_best=true: the model of the lowest validation loss (a model dir), and
                               best.json, the step and validation loss it holds

The usable model is RUN itself (rewritten after every checkpoint); a checkpoint holds only what
resuming needs, so the weights are not stored twice (1 GB per copy for the 257M model in FP32).

A checkpoint is written into `checkpoints/.step-N.tmp`, flushed to disk, then renamed to
`checkpoints/step-N` (a directory rename is atomic), and only then are older checkpoints
deleted: a run killed at any moment, even in the middle of a save, leaves the previous
checkpoint intact, and `latest_checkpoint` never sees a half-written one. Saving a step that
exists already renames the old one aside first (`.step-N.old`), renames the new one in, and
only then deletes the old; a kill between the two renames is undone by `remove_partial_saves`.
`trainer_state.pt` holds only tensors, numbers, strings, lists and dicts and is read back with
`torch.load(weights_only=True)`: no pickled objects. The training loop checks what it read
against `STATE_SCHEMA` (`check_trainer_state`) before anything uses it.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from gpt1.core.atomic import write_text
from gpt1.core.crash_points import crash_point
from gpt1.core.errors import Gpt1Error, first_line
from gpt1.core.locks import lock_holder
from gpt1.core.progress import warn
from gpt1.core.weights import check_weight_values, save_safetensors
from gpt1.core.write_errors import writing

CHECKPOINTS_DIR = "checkpoints"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.pt"
OUTPUTS_FILE = "outputs.done"
_NAME = re.compile(r"^step-(\d+)$")

# What trainer_state.pt holds, by type: a dict names the keys it must have, a one-item list is a
# list of such values. `torch.load(weights_only=True)` reads any dict of tensors, numbers and
# strings, so a damaged or hand-edited one is named here, in one line, and not by the KeyError or
# TypeError of the line of the loop that first reads it.
_NUMBER = (int, float)
_RNG = {"torch": torch.Tensor, "cuda": list,  # `rng_state`'s layout ("mps" only on Apple's GPUs)
        "numpy": {"name": str, "keys": list, "pos": int, "has_gauss": int, "cached_gaussian": float},
        "python": {"version": int, "state": list, "gauss_next": (float, type(None))}}
STATE_SCHEMA = {"step": int, "rng": _RNG, "optimizer": dict, "scaler": dict, "sampler": dict, "tokens": int,
                "last": {"loss": (*_NUMBER, type(None)), "val_loss": (*_NUMBER, type(None))}}
# Keys a checkpoint of an older gpt1 lacks (the loop has a default for each): checked when present.
LATER_KEYS = {"end": int, "budget_spent": _NUMBER, "elapsed": _NUMBER, "step_time": (*_NUMBER, type(None)),
              "schedule": (dict, type(None)), "rank_rng": [_RNG],
              "best": {"step": (int, type(None)), "val_loss": (*_NUMBER, type(None))}, "since_best": int,
              "bad_steps": int, "scale_fall": (dict, type(None)), "applied_since_validation": bool,
              "early_stopped": bool}


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may touch, as tensors and JSON-able values."""
    np_state = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # Apple's GPU draws dropout masks from a generator of its own.
        **({"mps": torch.mps.get_rng_state()} if torch.backends.mps.is_available() else {}),
        "numpy": {"name": np_state[0], "keys": np_state[1].tolist(), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": version, "state": list(py_state), "gauss_next": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("mps") is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])
    n = state["numpy"]
    np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, trainer_state: dict[str, Any],
                    keep: int = 1) -> Path:
    """Write checkpoint `step` atomically and delete all but the newest `keep` checkpoints
    (`keep_checkpoints`; this one among them)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_safetensors(tmp / TRAINABLE_FILE, trainable_state(model))
        with writing(tmp / STATE_FILE), open(tmp / STATE_FILE, "wb") as f:  # a full disk names the file
            torch.save({**trainer_state, "step": step, "rng": rng_state()}, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk, Ctrl-C: give the space back now, not at the next run
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    aside = root / f".step-{step:08d}.old"
    if final.exists():  # a rerun of the same step: never a moment without a complete step-N
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
        crash_point("checkpoint-aside")
    os.replace(tmp, final)
    _fsync_dir(root)
    if aside.exists():
        shutil.rmtree(aside)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary dirs of interrupted saves are ignored)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(checkpoint: Path) -> int:
    """The step a checkpoint folder (`step-N`) holds."""
    return int(_NAME.match(checkpoint.name).group(1))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_partial_saves(run_dir: Path) -> None:
    """Delete what interrupted saves left behind (never a complete checkpoint)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if root.is_dir():
        for p in root.glob(".step-*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
        for p in root.glob(".step-*.old"):  # moved aside for a re-save killed before its rename
            final = root / p.name[1:-len(".old")]
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.replace(p, final)


def saved_sampler(run_dir: Path) -> dict | None:
    """The sampler state of the checkpoint `run_dir`'s model files were written from (where the
    batches of the weights a run goes on from ended); None without one, one that cannot be read,
    or, with a warning, where it cannot be told: the run is still training (its weights and its
    checkpoints move on meanwhile), or it was stopped between its latest checkpoint and the model
    files (their weights are an earlier step's: the latest checkpoint's place skipped the batches
    between the two)."""
    holder = lock_holder(run_dir / CHECKPOINTS_DIR)
    if holder is not None and holder != f"process {os.getpid()}":
        warn(f"{run_dir}: {holder} is still training it, so where its batches end is not known: this run's "
             "batches start from the first ones")
        return None
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return None
    if not outputs_written(latest):
        warn(f"{run_dir} was stopped after its step-{checkpoint_step(latest):,} checkpoint, before its model files "
             "were written from it: its weights are an earlier step's, so this run's batches start from the first "
             "ones; run its command again to complete it")
        return None
    try:
        # mmap: the optimizer's state beside it (2 GB for the 257M model) is not read
        sampler = torch.load(latest / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)["sampler"]
    except Exception:  # unreadable, damaged, not a dict: nothing to go on from
        return None
    return sampler if isinstance(sampler, dict) else None


def outputs_written(checkpoint: Path) -> bool:
    return (Path(checkpoint) / OUTPUTS_FILE).is_file()


def mark_outputs_written(checkpoint: Path, budget_spent: float | None = None) -> None:
    """Mark `checkpoint`'s outputs written; `budget_spent`: the time budget the run spent once they
    were (its final checkpoint's writes included, which its trainer state, saved before them, lacks)."""
    write_text(Path(checkpoint) / OUTPUTS_FILE, "" if budget_spent is None else json.dumps({"budget_spent": budget_spent}))


def final_budget_spent(checkpoint: Path) -> float | None:
    """The time budget spent that `mark_outputs_written` kept; None where it kept none (not the final
    checkpoint of a budget run, an older gpt1's mark, no mark, a damaged one)."""
    try:
        spent = json.loads((Path(checkpoint) / OUTPUTS_FILE).read_text(encoding="utf-8"))["budget_spent"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return float(spent) if isinstance(spent, _NUMBER) and not isinstance(spent, bool) and math.isfinite(spent) else None


def load_checkpoint(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load the trainable weights of checkpoint `path` into `model`; return its trainer state."""
    path = Path(path)
    try:
        weights = load_file(str(path / TRAINABLE_FILE))
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or pickled file: safetensors and torch raise their own types
        raise Gpt1Error(f"{path}: cannot read the checkpoint ({first_line(e)}); only tensors, "
                        "numbers and strings are loaded, never pickled objects") from None
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        raise Gpt1Error(f"{path}: the checkpoint's trainable parameters do not match the model "
                        f"(missing {sorted(expected - set(weights))[:3]}, unexpected {sorted(set(weights) - expected)[:3]})")
    # A NaN written by a step that diverged (or a hand-edited file) is named here, not a step later.
    check_weight_values(path / TRAINABLE_FILE, weights, what="checkpoint")
    with torch.no_grad():
        for name, tensor in weights.items():
            if params[name].shape != tensor.shape:
                raise Gpt1Error(f"{path}: {name} has shape {tuple(tensor.shape)}, the model has {tuple(params[name].shape)}")
            params[name].copy_(tensor)
    return state


def check_trainer_state(path: Path, state: Any, sampler: dict[str, Any]) -> None:
    """Refuse, in one line, a trainer state (of checkpoint `path`) that does not fit `STATE_SCHEMA`.
    `sampler`: the batch source's `state_dict()` as it is now. The sampler's layout is its batch
    source's own ({"draws"} for pretraining's, an epoch and a position for a fine-tune's): the
    saved one must have its keys, with values of the same types."""
    sampler_schema = {key: _NUMBER if isinstance(value, float) else type(value)
                      for key, value in sampler.items() if value is not None}
    problem = _mismatch(state, {**STATE_SCHEMA, "sampler": sampler_schema}, "")
    if problem := problem or _mismatch(state, {k: v for k, v in LATER_KEYS.items() if k in state}, ""):
        raise Gpt1Error(f"{Path(path) / STATE_FILE}: cannot read the checkpoint ({problem}); it is not a trainer "
                        "state gpt1 saved (damaged or edited)")


def _mismatch(value: Any, schema: Any, where: str) -> str | None:
    """What in `value` does not fit `schema` (see `STATE_SCHEMA`), e.g. "missing key 'rng'"; None if it fits.
    `where`: the dotted keys that lead to `value`."""
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return f"{repr(where) if where else 'the state'} is {type(value).__name__}, expected dict"
        for key, item in schema.items():
            name = f"{where}.{key}" if where else str(key)
            if key not in value:
                return f"missing key {name!r}"
            if problem := _mismatch(value[key], item, name):
                return problem
        return None
    if isinstance(schema, list):
        if not isinstance(value, list):
            return f"{where!r} is {type(value).__name__}, expected list"
        return next(filter(None, (_mismatch(v, schema[0], f"{where}.{i}") for i, v in enumerate(value))), None)
    types = schema if isinstance(schema, tuple) else (schema,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):  # True is an int, not a count
        expected = " or ".join("None" if t is type(None) else t.__name__ for t in types)
        return f"{where!r} is {type(value).__name__}, expected {expected}"
    return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
