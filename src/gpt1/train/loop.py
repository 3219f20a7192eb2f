"""The training loop shared by pretraining (`gpt1 pretrain`) and chat fine-tuning (`gpt1 finetune`).

The API (stable; both commands call it)::

    from gpt1.train.loop import BatchSource, TrainResult, train

    class BatchSource(Protocol):
        def next_batch(self) -> tuple[Tensor, Tensor]   # x, y: (micro_batch, T) int64 on CPU;
                                                        # y may hold IGNORE_INDEX (-100)
        def state_dict(self) -> dict                    # JSON-able sampler state (saved in checkpoints)
        def load_state_dict(self, state: dict) -> None
        pad_id: int                                     # optional: the id that pads x (not counted as tokens)
        def next_step(self, n: int) -> list[tuple[Tensor, Tensor]]  # optional: a step's n batches at once

    result = train(model, cfg, run_dir, train_data, val_batches, save_model, max_steps=None, data=None,
                   data_source=None)

- `model`: a GPT (possibly with LoRA layers). The optimizer covers exactly the parameters with
  `requires_grad=True`: freeze the rest before calling. Weight decay applies to matrices only.
- `cfg`: a `TrainConfig` (or a subclass). The run lasts `max_steps` optimizer steps if given,
  else `cfg.max_steps` (the caller resolves token or epoch budgets, see `TrainConfig.resolve_steps`).
  Each step takes `cfg.grad_accum` batches from `train_data` on every rank (`next_step` where the
  source has it: one whose order depends on the step's size, as chat epochs do). Its loss is the mean
  over all of its targets (y != IGNORE_INDEX), of every micro-batch and rank: the same loss and
  update however a global batch is split into micro-batches and processes, also when chat
  batches hold different numbers of targets.
- `val_batches()`: a fresh iterable of the same fixed held-out (x, y) batches each time it is
  called; validation loss (token-weighted mean) and perplexity exp(loss) are computed on them
  every `cfg.eval_every` steps and at the end. With torchrun, rank r evaluates batches r, r+W, ...
- `data`: optional, an identity of the training data (a JSON-able dict, e.g. its token and
  document counts: not its path, so that a moved data folder still resumes), recorded in
  `train_config.json`; resuming on data with another identity is refused (a key the run did not
  record, as an older gpt1 wrote it, is not compared, and is recorded from the resume on).
- `data_source`: optional, where the data came from (a JSON-able dict: its path, how it was
  prepared), recorded with each start and resume for information, never compared.
- `save_model(dir, model)`: writes the model into the run dir after each checkpoint (pretraining:
  config.json + model.safetensors + tokenizer.json; fine-tuning: its adapter files). Called with
  the unwrapped model (no DDP, no torch.compile wrapper).

The rest is the loop's: checkpoints (see `gpt1.train.checkpoint`) with the trainable weights,
optimizer, GradScaler, step, sampler state and every RNG state (with torchrun, every rank's);
`train_config.json` (the run as started, the resumable settings changed since with the step they
hold from, and each start's and resume's provenance: `_RunRecord`); one line per step in
`metrics.jsonl` (loss, lr, grad_norm, tokens and tokens_per_sec: input tokens, padding
excluded, mfu) and one per validation (val_loss, val_ppl), which also logs a line of its own
(`step 20: val loss 5.7012, perplexity 299.30`); `loss.png` at the end; once the
step rate settles, the projected wall time of the whole run (revised once, where it could not
count validations and checkpoints yet). A run is finished when its last checkpoint is the
final step and its outputs (`save_model`'s files, `loss.png`) were written from it (marked in
the checkpoint): a run killed in between writes them on its next call; otherwise a call on a
finished run changes nothing in its run dir. A step whose loss or
gradient norm is not finite is skipped; a checkpoint due at it is still saved when the weights
are finite (the skipped step did not touch them), else a warning names the last good checkpoint.
`cfg.max_bad_steps` consecutive skipped steps stop the run; fp16-mixed's overflows (skipped by
the GradScaler) stop it once its loss scale falls below 1. The LR schedule counts skipped steps.
Running `train` again on the same `run_dir` resumes from its latest checkpoint (a different
config, or number of processes, is refused; paths compare by what they name); on CPU the resumed run
ends at exactly the loss of an uninterrupted one. With torchrun (`gpt1.train.distributed`),
each rank's `train_data` must draw its own batches and reach the same state after the same
number of steps; rank 0 checks the run dir, logs and saves, and its failure there stops every
rank (`distributed.main_only`). A collective that fails because another rank is gone is one line
(`distributed.PeerGone`), and an error in a rank's own batches is marked as that rank's
(`distributed.rank_local`), for the CLI to print it there.

Speed: `precision=bf16-mixed` falls back to fp16-mixed on GPUs without bf16
(`gpt1.train.precision`); `compile=true` falls back to eager, with one warning, when
torch.compile fails. A step waits for the device once (for its loss and gradient norm, read
together; fp16-mixed's GradScaler adds one), and CUDA batches are copied from pinned memory
without blocking. On a CPU under a time budget the step's thread count follows the machine's
load (`gpt1.core.threads`; each step's count in `metrics.jsonl`). MFU is `model.flops_per_token` (the matmuls that run, see `GPT`) x tokens/s
over the device's peak from PEAK_FLOPS.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch

from gpt1.core.environment import environment
from gpt1.core.errors import Gpt1Error, first_line, is_compile_error
from gpt1.core.io import crash_point, exclusive, json_path, make_dirs, read_json, write_json, write_text, writing
from gpt1.core.malloc import freed_memory_kept
from gpt1.core.model import IGNORE_INDEX
from gpt1.core.progress import info, progress, warn
from gpt1.core.threads import cpu_thread_tuner
from gpt1.formats.modeldir import BASE_FILE, WEIGHTS_FILE, weights_fingerprint
from gpt1.train import checkpoint as ckpt
from gpt1.train import distributed
from gpt1.train.config import TrainConfig
from gpt1.train.evaluate import evaluate_loss, perplexity
from gpt1.train.optim import build_optimizer
from gpt1.train.plot import plot_metrics
from gpt1.train.precision import autocast, resolve_precision, use_float8_matmuls
from gpt1.train.schedule import BudgetSchedule, lr_at

__all__ = ["BatchSource", "TrainResult", "train", "IGNORE_INDEX", "METRICS_FILE", "CONFIG_FILE",
           "peak_flops", "step_cap_words"]

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "train_config.json"
PLOT_FILE = "loss.png"
RUN_LOCK = Path(ckpt.CHECKPOINTS_DIR, ".lock")  # the lock `gpt1.core.io.exclusive` holds while a run trains
# Keys that may change between a run and its resumption: they do not change the math.
RESUMABLE_CHANGES = {"device", "tensorboard", "eval_batches", "save_every", "max_bad_steps",
                     "gradient_checkpointing"}

# Dense (no sparsity) FP16/BF16 tensor-core peak FLOP/s per GPU, matched against
# torch.cuda.get_device_name(); longest match wins. MFU is reported against this peak.
# Sources: NVIDIA datasheets: H100/H200 SXM 989 TF (H100 PCIe 756), A100 312, L40S 362,
# L40 181, L4 121, A10 125, RTX A6000 155, V100 125, T4 65; Ada and Ampere GeForce
# whitepapers (FP16 with FP32 accumulate): RTX 4090 165, RTX 3090 71.
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "H100 PCIe": 756e12, "H800": 989e12,
    "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "A10": 125e12, "A6000": 155e12, "V100": 125e12, "T4": 65e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12,
}


class BatchSource(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainResult:
    run_dir: Path
    steps: int  # optimizer steps completed (== the run's max_steps when it finished)
    tokens: int  # training tokens seen, all ranks
    train_loss: float | None  # mean loss of the last step
    val_loss: float | None
    val_perplexity: float | None
    seconds: float  # wall time of this invocation
    resumed_from: int  # the step this invocation started at (0 = fresh run)
    # seconds of the time budget its steps used, every invocation's (to its last checkpoint: the
    # final one of a finished run); None without a budget
    budget_spent: float | None = None


def peak_flops(device: torch.device) -> float | None:
    """The peak FLOP/s of a known GPU, None for CPUs and unknown GPUs."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [key for key in PEAK_FLOPS if key in name]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


def step_cap_words(cfg: TrainConfig) -> tuple[str, str]:
    """The words around the steps a run announces (`at most 600 steps ...; time_budget=20 s may
    end it sooner`) where its time budget may end it first: then they are a cap, not its length."""
    if cfg.time_budget <= 0:
        return "", ""
    return "at most ", f"; time_budget={cfg.time_budget:g} s may end it sooner"


def _check_run_dir(run_dir: Path, cfg: TrainConfig, max_steps: int, data: dict | None = None,
                   world_size: int = 1, redo_hint: str | None = None) -> _RunRecord:
    """Refuse a run dir that holds another run (or anything else); the run's train_config.json
    to write once the run trains (`_RunRecord.start`: a rerun of a finished run writes nothing).
    `redo_hint` replaces the advice to rerun as before (a caller like the quickstart has its own)."""
    config = cfg.to_dict()
    for key in PATH_KEYS & config.keys():  # recorded as the paths they name: a resume from another folder matches
        if isinstance(config[key], str):
            config[key] = json_path(_resolved(config[key]))
        elif isinstance(config[key], list):  # a fine-tune's several --data sources
            config[key] = [json_path(_resolved(v)) if isinstance(v, str) else v for v in config[key]]
    wanted = {"config": config, "max_steps": max_steps, "world_size": world_size,
              **({"data": data} if data is not None else {})}
    file = run_dir / CONFIG_FILE
    # Validations change no weight; under a time budget their time counts in the plan, though.
    resumable = RESUMABLE_CHANGES | ({"eval_every"} if not cfg.time_budget else set())
    if file.is_file() and ckpt.latest_checkpoint(run_dir) is None and not _has_outputs(run_dir):
        # Stopped before its first checkpoint (out of memory at the first step, say): nothing to resume
        # and nothing lost, so a rerun with another config (the smaller batch_size advised) starts over.
        # (A finished run whose checkpoints/ was deleted to free the disk still has its model: kept.)
        info(f"{run_dir}: its run stopped before its first checkpoint; starting over")
    elif file.is_file():
        old = read_json(file)
        old_cfg = old.get("config") if isinstance(old, dict) else None
        if not isinstance(old_cfg, dict):
            raise Gpt1Error(f"{file}: expected an object with the run's \"config\"; the run dir is damaged "
                            "(restore the file, or choose another --out)")
        # The global batch and each rank's share of the data follow the number of processes: on
        # another number a resume would replay or skip batches. (A run dir from before it was
        # recorded resumes unchecked: its number is unknown.)
        old_world = old.get("world_size")
        if isinstance(old_world, int) and old_world != world_size:
            how = f"with {old_world} processes (torchrun --nproc_per_node {old_world})" if old_world > 1 else \
                "in one process (without torchrun)"
            raise Gpt1Error(f"{run_dir} was trained by {old_world} process{'es' if old_world > 1 else ''}, this run has "
                            f"{world_size}: resume it {how}, or choose another --out")
        # A key that an older gpt1 did not write had its default value then; one changed on a
        # resume has its latest value.
        old_cfg = _settings(old, _field_defaults(cfg))
        if old_cfg.get("time_budget"):
            resumable -= {"eval_every"}
        keys = sorted(k for k in set(old_cfg) | set(wanted["config"])
                      if k not in resumable and not _same_setting(run_dir, k, old_cfg.get(k), wanted["config"].get(k)))
        if old.get("max_steps") != max_steps and "max_steps" not in keys:
            keys.append(f"max_steps (resolved: {old.get('max_steps')} -> {max_steps})")
        if keys:
            diffs = ", ".join(f"{k}: {old_cfg.get(k)!r} -> {wanted['config'].get(k)!r}" if k in old_cfg or k in wanted["config"]
                              else k for k in keys)
            raise Gpt1Error(f"{run_dir} holds a run with a different config ({diffs}); "
                            + (redo_hint or "rerun with the same config to resume it, or choose another --out"))
        # A run dir from before the data was recorded resumes unchecked (its data is unknown), and
        # one from before a part of it was (pretraining's content check) unchecked on that part.
        old_data = old.get("data")
        if data is not None and isinstance(old_data, dict):
            diffs = ", ".join(f"{k}: {old_data[k]!r} -> {data.get(k)!r}" for k in sorted(old_data)
                              if old_data[k] != data.get(k))
            if diffs:
                raise Gpt1Error(f"{run_dir} holds a run on other training data ({diffs}); "
                                + (redo_hint or "rerun with the data it was trained on to resume it, or choose another --out"))
        # The run as started stays recorded; what it did not record (an older gpt1) is, from now on.
        record = {**old, "world_size": world_size}
        if data is not None:
            record["data"] = {**data, **old_data} if isinstance(old_data, dict) else data
        return _RunRecord(file, record, wanted["config"], resumable, _field_defaults(cfg))
    else:
        _refuse_other_files(run_dir)
    return _RunRecord(file, wanted, wanted["config"], resumable, _field_defaults(cfg))


def _settings(record: dict, defaults: dict) -> dict:
    """A run's settings as of its latest resume: its config as started (a key an older gpt1 did
    not write at its default `defaults`), with the resumable ones changed since (`changes`)."""
    settings = {**defaults, **record["config"]}
    for change in record.get("changes") or []:
        if isinstance(change, dict):
            settings.update({k: v for k, v in change.items() if k != "from_step"})
    return settings


class _RunRecord:
    """A run's train_config.json: the run as started (`config`, the resolved `max_steps`,
    `world_size`, the training data's identity `data`), the resumable settings changed since, each
    with the step it holds from (`changes`: [{"from_step": 40, "eval_batches": 1}]), and one
    `provenance` entry per start and resume (versions, machine, device, precision, command line).
    Written once the run trains (a rerun of a finished run changes nothing), on rank 0."""

    def __init__(self, file: Path, record: dict, config: dict, resumable: set[str], defaults: dict):
        self.file, self.record, self.config, self.resumable, self.defaults = file, record, config, resumable, defaults

    def start(self, step: int, provenance: dict) -> None:
        """Record this invocation, which trains from `step`, and the resumable settings it changes."""
        changes = [c for c in self.record.pop("changes", None) or [] if isinstance(c, dict)]
        if changes and changes[-1].get("from_step") == step:
            changes.pop()  # an invocation's that saved no step after it: they held for no step kept
        was = _settings({**self.record, "changes": changes}, self.defaults)
        changed = {k: self.config[k] for k in sorted(self.resumable & self.config.keys()) if was.get(k) != self.config[k]}
        changes += [{"from_step": step, **changed}] if changed else []
        earlier = self.record.pop("provenance", None)
        self.record |= {**({"changes": changes} if changes else {}),
                        "provenance": [*(earlier if isinstance(earlier, list) else []), {"from_step": step, **provenance}]}
        self.write()

    def note(self, **values) -> None:
        """Add what this invocation found out as it ran (compile fell back to eager) to its provenance."""
        self.record["provenance"][-1].update(values)
        self.write()

    def write(self) -> None:
        write_json(self.file, self.record)


def _has_outputs(run_dir: Path) -> bool:
    """Whether a run dir holds a model a checkpoint wrote (its weights, adapter or base record)."""
    return any((run_dir / name).exists() for name in (WEIGHTS_FILE, BASE_FILE, "adapter"))


def _refuse_other_files(run_dir: Path) -> None:
    """Refuse a folder that holds no run but other files. A new run's lock (`checkpoints/.lock`,
    taken before its train_config.json is written) is no other file: a run killed in between
    left a folder that is still new."""
    if (run_dir / CONFIG_FILE).is_file() or not run_dir.is_dir():
        return
    lock = run_dir / RUN_LOCK
    others = [p for p in run_dir.iterdir() if p != lock.parent or not p.is_dir()]
    if lock.parent.is_dir():
        others += [p for p in lock.parent.iterdir() if p != lock]
    if others:
        raise Gpt1Error(f"{run_dir} is not empty and holds no gpt1 run ({CONFIG_FILE} is missing); "
                        "choose a new or empty --out")


# Keys that may name a local file or folder: the same one spelled differently (runs/a, runs/a/,
# an absolute path) is the same setting. `data` is fine-tuning's chat source.
PATH_KEYS = {"init_from", "data"}


def _same_setting(run_dir: Path, key: str, old, new) -> bool:
    if old == new:
        return True
    if key in PATH_KEYS and isinstance(old, list) and isinstance(new, list):  # several --data sources
        return len(old) == len(new) and all(_same_setting(run_dir, key, o, n) for o, n in zip(old, new))
    if key not in PATH_KEYS or not isinstance(old, str) or not isinstance(new, str):
        return False
    if _resolved(old) == _resolved(new):
        return True
    # A path recorded resolved that is gone now (the chat data of a finished fine-tune, deleted):
    # named as typed, relative to here, it is still the same path.
    prefix = "hf:" if new.startswith("hf:") else ""
    if not Path(new.removeprefix(prefix)).exists() and old == prefix + str(Path(new.removeprefix(prefix)).resolve()):
        return True
    # Chat data read by gpt1 (FOLDER) or by `datasets` (hf:FOLDER) is one source; its fingerprint, checked
    # apart, tells whether the two read alike (a run begun before gpt1 read folders resumes with hf:).
    if key == "data" and _resolved(old).removeprefix("hf:") == _resolved(new).removeprefix("hf:"):
        return True
    # A fine-tune records its base's weights and adapter (BASE_FILE): the same elsewhere are the same base.
    base = run_dir / BASE_FILE
    if key == "init_from" and base.is_file() and (Path(new) / WEIGHTS_FILE).is_file():
        return read_json(base).get("sha256") == weights_fingerprint(new)
    return False


def _resolved(value: str) -> str:
    """A path-valued setting (a path, or hf:PATH) as the absolute path it names, if it exists."""
    prefix = "hf:" if value.startswith("hf:") else ""
    path = Path(value.removeprefix(prefix))
    return prefix + str(path.resolve()) if value != "scratch" and path.exists() else value


def _field_defaults(cfg: TrainConfig) -> dict:
    """The config class's default values, as `to_dict` writes them."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
    defaults |= {f.name: f.default_factory() for f in dataclasses.fields(cfg)
                 if f.default_factory is not dataclasses.MISSING}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines after `step` (written by a run killed after its last checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # cut by a kill, damaged, 4,300+ digits, "[[[..." too deep (as `gpt1 plot`)
            continue
        if isinstance(record, dict) and isinstance(record.get("step", 0), int) and record.get("step", 0) <= step:
            kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))


def train(model: torch.nn.Module, cfg: TrainConfig, run_dir: str | Path, train_data: BatchSource,
          val_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
          save_model: Callable[[Path, torch.nn.Module], None], *, max_steps: int | None = None,
          data: dict | None = None, data_source: dict | None = None, redo_hint: str | None = None) -> TrainResult:
    """Train `model` (see the module docstring); resumes from `run_dir`'s latest checkpoint.
    `data`: an identity of the training data (JSON-able), recorded in train_config.json; a
    resume on data with another identity is refused. `data_source`: where the data came from
    (JSON-able: its path, how it was prepared), recorded with each start and resume, never compared."""
    started = time.perf_counter()
    run_dir = Path(run_dir)
    max_steps = max_steps if max_steps is not None else cfg.max_steps
    if max_steps < 1:
        raise Gpt1Error("the run needs max_steps >= 1 (resolve max_tokens / epochs before calling train)")
    dist = distributed.current()
    device = distributed.resolve_device(cfg.device, dist)
    with contextlib.ExitStack() as held:
        if device.type == "cpu":
            # The step's large buffers reused, not page-faulted in every step; glibc's defaults
            # come back when the run ends (a library call leaves the process as it found it).
            held.enter_context(freed_memory_kept())

        def check_and_hold() -> _RunRecord:
            # A folder of other files is refused before the lock is made in it. (One with a lock
            # is a run, maybe being created by another process: the lock tells which.)
            if not (run_dir / RUN_LOCK).exists():
                _refuse_other_files(run_dir)
            # One process trains in a run dir at a time: a second one would delete the first's
            # partial saves (below) and interleave its metrics. Released when the process ends,
            # however it ends. The run dir is checked (and train_config.json written) under it: a
            # run started at the same moment is told that this one trains there, not that the
            # folder it is making holds something else.
            held.enter_context(exclusive(run_dir / ckpt.CHECKPOINTS_DIR, "training"))
            record = _check_run_dir(run_dir, cfg, max_steps, data, dist.world_size, redo_hint)
            ckpt.remove_partial_saves(run_dir)
            return record

        # Every collective of the run happens inside: one whose peer is gone is one line, not gloo's or NCCL's traceback.
        with distributed.peer_failures():
            record = distributed.main_only(check_and_hold)  # a refusal there stops every rank; rank 0's record
            return _train_in(run_dir, model, cfg, train_data, val_batches, save_model, max_steps, dist, device, started,
                             record, data_source)


def _train_in(run_dir: Path, model: torch.nn.Module, cfg: TrainConfig, train_data: BatchSource, val_batches,
              save_model, max_steps: int, dist, device: torch.device, started: float,
              record: _RunRecord | None, data_source: dict | None) -> TrainResult:
    """The run itself, once its run dir is checked and held (see `train`); `record`: its
    train_config.json (rank 0's), written once it is known to train."""
    model.to(device)
    model.train()
    if cfg.float8:
        use_float8_matmuls(model, device)  # before the optimizer: it swaps modules (same parameters)
    if hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = cfg.gradient_checkpointing
    optimizer = build_optimizer(model, cfg, device)
    precision = resolve_precision(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16-mixed")
    params = [p for g in optimizer.param_groups for p in g["params"]]

    start_step, tokens_seen, last = 0, 0, {"loss": None, "val_loss": None}
    end, budget_spent = max_steps, 0.0  # the planned last step (re-planned under a time budget)
    schedule_state, step_time = None, None
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is not None:
        state = ckpt.load_checkpoint(latest, model)
        ckpt.check_trainer_state(latest, state, train_data.state_dict())
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        train_data.load_state_dict(state["sampler"])
        start_step, tokens_seen, last = state["step"], state["tokens"], state["last"]
        end, budget_spent = state.get("end", max_steps), state.get("budget_spent", 0.0)
        schedule_state = state.get("schedule")
        step_time = state.get("step_time")  # the budget's median step time (None before 2026-12)
        if schedule_state is None and cfg.time_budget > 0:
            # Saved before the schedule's state was (2026-12-05, ef57fb6): rebuilt from the rate its
            # last step ran at, which the optimizer's state keeps; else the cooldown restarts at the peak.
            group = optimizer.param_groups[0]
            schedule_state = BudgetSchedule.state_from_rate(cfg.lr, cfg.warmup, start_step, end,
                                                            group["lr"] / group.get("lr_scale", 1.0))
        if dist.is_main and start_step < end:  # a finished run says so at the end ("nothing to do"), not "resuming"
            info(f"resuming {run_dir} from step {start_step:,} of {end:,} ({latest.name})")
        # Each rank restores its own RNG states (its dropout masks go on as in an uninterrupted run).
        # A checkpoint of an older gpt1 holds rank 0's alone: the other ranks reseed reproducibly.
        rank_rngs = state.get("rank_rng")
        if not rank_rngs or len(rank_rngs) != dist.world_size:
            rank_rngs = None
        ckpt.set_rng_state(rank_rngs[dist.rank] if rank_rngs else state["rng"])
        if dist.rank and not rank_rngs:
            torch.manual_seed(cfg.seed + 1000 * dist.rank + start_step)
    else:
        torch.manual_seed(cfg.seed + 1000 * dist.rank)
    # A rerun of a finished run (at most writing the outputs a kill left unwritten) changes nothing
    # in the run dir: its record, metrics and event log stay as the run left them.
    finished = start_step >= end
    if not finished:
        distributed.main_only(lambda: record.start(start_step, _provenance(cfg, device, precision, data_source)))
        if dist.is_main:  # lines a killed run logged after its last checkpoint (or before its first)
            _trim_metrics(run_dir / METRICS_FILE, start_step)
    distributed.barrier()

    raw_model = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = torch.compile(model) if cfg.compile else model

    saved = {"budget_spent": budget_spent}  # as of the latest checkpoint: what a rerun reports too

    def trainer_state() -> dict:
        saved["budget_spent"] = budget.spent() if budget else 0.0
        return {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "sampler": train_data.state_dict(), "tokens": tokens_seen, "last": dict(last),
                "config": cfg.to_dict(), "max_steps": max_steps, "end": end,
                "budget_spent": saved["budget_spent"], "step_time": budget.step_time if budget else None,
                "schedule": schedule.state_dict() if schedule else None}

    def save_if_due(done: int) -> None:
        if _save_due(done, cfg.save_every, end):
            # Every rank's RNG states (dropout), gathered by rank 0, which saves them all.
            rank_rngs = distributed.gather_object(ckpt.rng_state()) if dist.enabled else None

            def save() -> None:
                state = {**trainer_state(), **({"rank_rng": rank_rngs} if rank_rngs else {})}
                checkpoint = ckpt.save_checkpoint(run_dir, done, raw_model, state)
                _write_outputs(run_dir, checkpoint, raw_model, save_model, final=done == end)

            began = time.perf_counter()
            distributed.main_only(save)  # rank 0 saves; its failure (e.g. a full disk) stops every rank
            took = time.perf_counter() - began
            if rate:
                rate.timed("checkpoint", took)
            if budget:
                budget.timed(took)

    def log_metrics(metric: dict) -> None:
        if metrics:
            with writing(metrics.name):  # a full disk names the file
                metrics.write(json.dumps(metric) + "\n")
                metrics.flush()

    budget = (_TimeBudget(cfg.time_budget, budget_spent, max_steps, cfg.eval_every, cfg.cooldown, end=end,
                          step_time=step_time) if cfg.time_budget > 0 else None)
    # A re-planned run's rate never rises after its warmup (see BudgetSchedule); a fixed plan's is lr_at.
    schedule = BudgetSchedule(cfg.lr, cfg.min_lr, cfg.warmup, cfg.cooldown, schedule_state) if budget else None
    peak = peak_flops(device)
    flops_per_token = getattr(raw_model, "flops_per_token", None)
    bad_steps = 0
    rate = _RunRate(start_step, end, cfg.eval_every, cfg.save_every) if dist.is_main and not budget else None
    # What must be closed or put back is made inside the `try` that does so: made before it, a
    # failed setup step (a file named tensorboard in the run dir) left metrics.jsonl open.
    metrics = writer = bar = threads = None

    pad_id = getattr(train_data, "pad_id", None)

    def loss_and_backward(x: torch.Tensor, y: torch.Tensor, sync: bool, weight) -> torch.Tensor:
        nonlocal step_model
        try:
            return _loss_and_backward(step_model, model, x, y, sync, device, precision, scaler, weight)
        except Exception as e:
            if step_model is model or not is_compile_error(e):
                raise
            warn(f"torch.compile failed ({first_line(e)}); training continues without it (eager, as with compile=false)")
            if record:
                record.note(compiled=False, compile_error=first_line(e))
            step_model = model
            return _loss_and_backward(model, model, x, y, sync, device, precision, scaler, weight)

    try:
        writer = _tensorboard(run_dir, start_step) if cfg.tensorboard and dist.is_main and not finished else None
        metrics = open(run_dir / METRICS_FILE, "a", encoding="utf-8") if dist.is_main and not finished else None
        threads = _thread_tuner(device, cfg, dist)
        bar = progress(total=end, initial=start_step, desc=run_dir.name, unit="step",  # last: no bar above an error
                       disable=None if dist.is_main else True)
        for step in itertools.count(start_step):
            if step >= end:
                break
            t0 = time.perf_counter()
            if schedule:
                # By time, or by steps where max_steps caps the plan (then the plan is exact).
                due = budget.cooldown_due or (end == max_steps and schedule.in_planned_cooldown(step, end))
                lr = schedule.at(step, end, due, warm_end=budget.warm_end)
            else:
                lr = lr_at(step, end, cfg.lr, cfg.min_lr, cfg.warmup, cfg.cooldown)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's group runs at a multiple of lr
            # The step's loss is the mean over all of its targets, on every rank: each micro-batch's
            # mean loss is weighted by its share of them (chat batches hold different numbers of
            # reply tokens; a mean of the means weighs a short reply's tokens more). Counted on
            # the host before the copy to the device: no wait.
            with distributed.rank_local():  # a damaged batch is this rank's alone
                batches = _next_step(train_data, cfg.grad_accum)
            n_targets = [int((y != IGNORE_INDEX).sum()) for _, y in batches]
            total, step_tokens = sum(n_targets), sum(_real_tokens(x, pad_id) for x, _ in batches)
            if dist.enabled:  # DDP averages the ranks' gradients: each rank's weights are x world_size
                counts = distributed.all_reduce_sum(_to_device(torch.tensor([total, step_tokens]), device))
                total = counts[0]
            loss_sum = torch.zeros((), device=device)
            for micro, (x, y) in enumerate(batches):
                x, y = _to_device(x, device), _to_device(y, device)
                # DDP averages gradients on every backward; only the last micro-batch needs it.
                sync = micro == cfg.grad_accum - 1 or not dist.enabled
                n = n_targets[micro]
                loss = loss_and_backward(x, y, sync, n * dist.world_size / total if n else 0.0)
                if n:  # a micro-batch without targets has a NaN mean loss (and weight 0)
                    loss_sum += loss * n
            mean_loss = distributed.all_reduce_sum(loss_sum) / total  # NaN without targets: the step is skipped
            done = step + 1
            scaler.unscale_(optimizer)  # clip and report the true gradient norm, not the scaled one
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            # The step's one wait for the device: the loss and the gradient norm in one transfer
            # (with torchrun, the step's token count of all ranks too, in float64: exact).
            if dist.enabled:
                mean_loss, grad_norm, step_tokens = torch.stack(
                    [mean_loss.double(), grad_norm.double(), counts[1].double()]).tolist()
                step_tokens = int(step_tokens)
            else:
                mean_loss, grad_norm = torch.stack([mean_loss.float(), grad_norm.float()]).tolist()
            # A step whose loss or gradient norm is NaN/inf is skipped: applied, the clip would
            # scale every gradient by max_norm/NaN and the update turn every weight into NaN.
            # (The loss is all-reduced, as DDP's gradients are: every rank skips alike.) In
            # fp16-mixed a non-finite gradient is the GradScaler's overflow: `scaler.step` skips it.
            skipped = ("non-finite loss" if not math.isfinite(mean_loss) else
                       "non-finite gradient" if not math.isfinite(grad_norm) and not scaler.is_enabled() else None)
            if skipped:
                bad_steps += 1
                optimizer.zero_grad(set_to_none=True)
                if scaler.is_enabled():
                    scaler.update()  # closes this step's unscale_ (and lowers the scale: the gradients hold inf/NaN)
                what = "loss" if skipped == "non-finite loss" else "gradient norm"
                if bad_steps >= cfg.max_bad_steps:
                    raise _bad_steps_error(f"the {what} was NaN/inf for {bad_steps} consecutive steps "
                                           f"(last at step {done:,})", run_dir, precision)
                if done == end and bad_steps >= max(1, (done - start_step) // 2):
                    # A run shorter than max_bad_steps that ends skipping (all of it, or its second
                    # half) has no model worth writing: it "finished" with exit 0 on garbage weights.
                    raise _bad_steps_error(f"the {what} was NaN/inf for the last {bad_steps} of the run's "
                                           f"{done - start_step:,} steps", run_dir, precision)
                log_metrics({"step": done, "loss": mean_loss if math.isfinite(mean_loss) else None, "lr": lr,
                             "skipped": skipped})
                bar.update(1)
                if _save_due(done, cfg.save_every, end):
                    if all(torch.isfinite(p).all() for p in params):  # the step was skipped: still good
                        save_if_due(done)
                    elif dist.is_main:
                        warn(f"step {done:,}: no checkpoint saved: the {what} and the weights are not finite; "
                             f"the last good checkpoint is {ckpt.latest_checkpoint(run_dir) or 'none'}")
                continue
            scaler.step(optimizer)  # with fp16, skipped when the gradients overflowed (an inf/NaN norm)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if scaler.is_enabled() and not math.isfinite(grad_norm):
                # An overflow halves the scale; at the start of a run a few halvings from 65,536 find
                # one that fits. Gradients that stay NaN/inf however small the scale are not an
                # overflow: stop once it falls below 1, as DeepSpeed does at its minimum scale. (Read
                # on a skipped step only: a normal step waits for the device no more.)
                bad_steps += 1
                if (scale := scaler.get_scale()) < 1.0:
                    raise _bad_steps_error(f"the gradient norm was NaN/inf for {bad_steps} consecutive steps "
                                           f"(last at step {done:,}) although the fp16 loss scale fell to {scale:g}",
                                           run_dir, precision)
            else:
                bad_steps = 0
            tokens_seen += step_tokens
            elapsed = time.perf_counter() - t0
            tokens_per_sec = step_tokens / elapsed
            metric = {"step": done, "loss": mean_loss, "lr": lr,
                      "grad_norm": grad_norm if math.isfinite(grad_norm) else None,  # inf: an fp16 overflow
                      "tokens": tokens_seen, "tokens_per_sec": tokens_per_sec,
                      "mfu": (flops_per_token(x.size(1)) * tokens_per_sec / (peak * dist.world_size)
                              if peak and flops_per_token else None)}
            if threads:
                metric["threads"] = torch.get_num_threads()  # the count this step ran on
                # Per position computed, padding included: chat batches differ in length.
                if message := threads.step_done(elapsed, size=sum(x.numel() for x, _ in batches)):
                    info(message)
            if scaler.is_enabled() and not math.isfinite(grad_norm):
                metric["skipped"] = "fp16 overflow"
            last["loss"] = mean_loss
            if budget:
                end = budget.plan(done, end, dist)
                bar.total = end

            if done % cfg.eval_every == 0 or done == end:
                began = time.perf_counter()
                val_loss, _ = evaluate_loss(raw_model, val_batches(), device, precision)
                took = time.perf_counter() - began
                if rate:
                    rate.timed("validation", took)
                if budget:
                    budget.timed(took)
                if math.isfinite(val_loss):
                    last["val_loss"] = val_loss
                    metric.update(val_loss=val_loss, val_ppl=perplexity(val_loss))
                if dist.is_main:  # a line of its own: a log off a terminal has every validation, not the bar's last
                    info(f"step {done:,}: val loss {_fmt(val_loss)}, perplexity {_fmt(perplexity(val_loss), '.2f')}")
            log_metrics(metric)
            if writer:
                for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "val_loss", "val_ppl"):
                    if metric.get(key) is not None:
                        writer.add_scalar(key, metric[key], done)
            bar.set_postfix(refresh=False, loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:,.0f}",
                            **({"val": f"{last['val_loss']:.4f}"} if last["val_loss"] is not None else {}))
            bar.update(1)
            if rate:
                rate.step_done(done)

            save_if_due(done)
    except BaseException:
        if metrics:
            # The error in flight is the one to report: closing flushes a line left in the buffer
            # by a failed write again, whose failure (no file name) would replace the one naming
            # metrics.jsonl. (The file is closed either way.)
            with contextlib.suppress(OSError):
                metrics.close()
        raise
    finally:
        if threads:
            torch.set_num_threads(threads.max_threads)
        if bar is not None:  # not `if bar`: a tqdm's truth is its total
            bar.close()
        if metrics:
            with writing(metrics.name):
                metrics.close()
        if writer:
            writer.close()

    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None or ckpt.checkpoint_step(latest) < end:
        # The final checkpoint is written unless the weights went NaN/inf (a warning said so): a
        # run without its final weights has failed, whatever its step count.
        raise distributed.same_on_every_rank(
            f"the run ended at step {end:,} with non-finite weights, so no final model was written; "
            f"the last good checkpoint is {latest or 'none'}. Lower lr, or check the data")
    if dist.is_main and start_step >= end and not ckpt.outputs_written(latest):
        info(f"{run_dir}: its outputs are older than its last checkpoint ({latest.name}); writing them")
        _write_outputs(run_dir, latest, raw_model, save_model, final=True)
    val = last["val_loss"]
    result = TrainResult(run_dir=run_dir, steps=end, tokens=tokens_seen, train_loss=last["loss"],
                         val_loss=val, val_perplexity=perplexity(val) if val is not None else None,
                         seconds=time.perf_counter() - started, resumed_from=start_step,
                         budget_spent=saved["budget_spent"] if budget else None)
    if dist.is_main:
        if start_step >= end:
            info(f"{run_dir} already finished its {end:,} steps; nothing to do")
        info(f"done: {end:,} steps, {tokens_seen:,} tokens; train loss {_fmt(result.train_loss)}, "
             f"val loss {_fmt(val)}, val perplexity {_fmt(result.val_perplexity, '.2f')}")
    return result


def _provenance(cfg: TrainConfig, device: torch.device, precision: str, data_source: dict | None) -> dict:
    """What this invocation of a run ran on (train_config.json's `provenance`; never compared on
    resume): when and how it was started, the versions and the machine (`gpt1.core.environment`),
    the device as resolved and its name, the precision after its fallback (`resolve_precision`),
    whether it compiles (`note`d false with the error when compile falls back to eager), and the data's source."""
    return {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": list(sys.argv), **environment(), "device": str(device),
            **({"device_name": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}),
            "precision": precision, "compiled": cfg.compile, **({"data": data_source} if data_source else {})}


def _bad_steps_error(what: str, run_dir: Path, precision: str) -> Gpt1Error:
    """The error that stops a run whose steps keep being skipped (NaN/inf), with advice that fits its precision."""
    good = ckpt.latest_checkpoint(run_dir)
    advice = "Lower lr, try bf16-mixed instead of fp16-mixed, or check the data." if precision == "fp16-mixed" else \
        "Lower lr, or check the data."
    # The numbers it stops on are all-reduced: every rank stops here.
    return distributed.same_on_every_rank(
        f"{what}; stopped. The last good checkpoint is {good or 'none (no checkpoint was saved yet)'}. {advice}")


def _thread_tuner(device: torch.device, cfg: TrainConfig, dist):
    """A CPU run under a time budget keeps its step on the fastest thread count as the load
    changes (`gpt1.core.threads`); OMP_NUM_THREADS, when set, fixes the count instead. Runs
    without a budget keep theirs: bit-exact resume needs the same count throughout."""
    if cfg.time_budget <= 0 or dist.enabled:
        return None
    return cpu_thread_tuner(device)


def _next_step(source: BatchSource, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A step's `n` micro-batches: drawn together where the source can (`next_step`), else one by one."""
    next_step = getattr(source, "next_step", None)
    return next_step(n) if next_step else [source.next_batch() for _ in range(n)]


def _save_due(done: int, save_every: int, max_steps: int) -> bool:
    return done % save_every == 0 or done == max_steps


def _write_outputs(run_dir: Path, checkpoint: Path, model: torch.nn.Module,
                   save_model: Callable[[Path, torch.nn.Module], None], final: bool) -> None:
    """The run dir's model (and, at the end, loss.png) from `checkpoint`'s weights; marked in
    the checkpoint once written, so a kill in between is completed by the next run."""
    crash_point("before-outputs")
    save_model(run_dir, model)
    if final:
        _plot(run_dir)
    ckpt.mark_outputs_written(checkpoint)


def _plot(run_dir: Path) -> None:
    """Draw loss.png, a by-product: one that cannot be drawn (matplotlib's fonts past `ulimit -n`,
    its extension past `ulimit -v`, a folder in the way) is a warning, not a failed run whose
    model is written."""
    try:
        plot_metrics(run_dir / METRICS_FILE, run_dir / PLOT_FILE, title=run_dir.name)
    except Exception as e:  # noqa: BLE001 - whatever it was, the run's results stand
        warn(f"{run_dir / PLOT_FILE} not drawn ({first_line(e)}); `gpt1 plot {run_dir}` draws it")


def _fmt(value: float | None, spec: str = ".4f") -> str:
    if value is None:
        return "n/a"
    return format(value, spec if abs(value) < 1e9 else ".4g")  # a diverged run's perplexity has 300 digits


def _tensorboard(run_dir: Path, start_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warn("tensorboard=true but the tensorboard package is not installed (pip install tensorboard); not logging to it")
        return None
    log_dir = run_dir / "tensorboard"
    try:  # made here, not by SummaryWriter, whose FileExistsError was a traceback
        make_dirs(log_dir)
    except Gpt1Error as e:
        raise Gpt1Error(f"{e}; tensorboard=true writes its event files in that folder "
                        "(move what is there away, or set tensorboard=false)") from None
    # Steps after `start_step` that a killed run had logged are dropped by readers (as
    # metrics.jsonl is trimmed): the resumed run logs them again.
    return SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on `device`; to a GPU from pinned memory, so that the copy does not block the host."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _real_tokens(x: torch.Tensor, pad_id: int | None) -> int:
    """The tokens of a (CPU) input batch that are not padding."""
    return x.numel() if pad_id is None else int((x != pad_id).sum())


def _loss_and_backward(step_model, model, x, y, sync: bool, device: torch.device, precision: str,
                       scaler: torch.amp.GradScaler, weight: float | torch.Tensor) -> torch.Tensor:
    """Forward and backward of one micro-batch, its mean loss weighted by `weight` (its share of
    the step's targets); its mean loss (detached, on the device)."""
    with (contextlib.nullcontext() if sync else model.no_sync()), autocast(device, precision):
        _, loss = step_model(x, y)
    scaler.scale(loss * weight).backward()
    return loss.detach()


class _RunRate:
    """Prints the projected wall time of the whole run: the time per step, measured over
    SETTLE_STEPS steps once the first WARMUP_STEPS (compilation, allocator warm-up) are behind it,
    plus each validation and checkpoint of the run at the time the latest one took. Printed once
    the step rate settles, where validations and checkpoints (every 200 steps in the card's
    recipe) have usually not run yet: the line says what it counts, and once both have run a
    revised line follows if the projection moved by more than REVISE. Two lines at most."""

    WARMUP_STEPS = 3
    SETTLE_STEPS = 10
    REVISE = 0.1

    def __init__(self, start_step: int, max_steps: int, eval_every: int, save_every: int):
        self.start_step, self.max_steps = start_step, max_steps
        self.every = {"validation": eval_every, "checkpoint": save_every}
        self.took: dict[str, float] = {}  # seconds of the latest validation pass and checkpoint
        self.since: tuple[int, float] | None = None
        self.paused = 0.0  # seconds of validations and checkpoints since `since`: not step time
        self.per_step: float | None = None
        self.projected: float | None = None  # the printed projection of the whole run
        self.final = False  # the projection counts validations and checkpoints: no revision to come

    def timed(self, kind: str, seconds: float) -> None:
        """A validation pass or checkpoint ("validation", "checkpoint") took `seconds`."""
        self.took[kind] = seconds
        self.paused += seconds

    def step_done(self, done: int) -> None:
        if self.final:
            return
        now = time.perf_counter()
        if done - self.start_step == self.WARMUP_STEPS:
            self.since, self.paused = (done, now), 0.0
        elif self.per_step is None and self.since and done - self.since[0] >= self.SETTLE_STEPS:
            self.per_step = (now - self.since[1] - self.paused) / (done - self.since[0])
            self.report(done, first=True)
        elif self.per_step is not None and len(self.took) == len(self.every) and done < self.max_steps:
            self.report(done, first=False)

    def seconds(self, after: int) -> float:
        """The projected seconds of the steps after step `after`, with their validations and checkpoints."""
        return (self.max_steps - after) * self.per_step + sum(
            took * _due_after(after, self.max_steps, self.every[kind]) for kind, took in self.took.items())

    def report(self, done: int, first: bool) -> None:
        total, left = self.seconds(self.start_step), self.seconds(done)
        self.final = len(self.took) == len(self.every)
        if not first and abs(total - self.projected) <= self.REVISE * self.projected:
            return
        self.projected = total
        counts = {(True, True): "validation and checkpoints included",
                  (True, False): "validation included; no checkpoint has run yet",
                  (False, True): "checkpoints included; no validation has run yet",
                  (False, False): "steps only: no validation or checkpoint has run yet"}
        info(f"projected wall time{'' if first else ', revised'}: {_duration(total)} for "
             f"{self.max_steps - self.start_step:,} steps at {self.per_step:.3g} s/step "
             f"({counts['validation' in self.took, 'checkpoint' in self.took]}); {_duration(left)} to go")


def _due_after(after: int, last: int, every: int) -> int:
    """How many of the steps after `after`, up to `last`, are multiples of `every` or `last` itself."""
    return last // every - after // every + (last % every != 0) if last > after else 0


class _TimeBudget:
    """The last step of a run with a time budget: re-planned after every step from the time per
    step measured over the recent steps, so that the run (and its LR schedule) ends when the
    budget is spent, whatever the machine's load does meanwhile.

    A step's time is the *median* of the recent steps' own times, so that one slow step does not
    shrink the plan (the mean over a 50-step window took a 5 s stall for a slower machine and cut a
    cosine by 45% in one step); the validations and checkpoints of the window (`timed`) are added,
    spread over its steps. A step far slower than the median held a pause: the process was stopped
    (Ctrl-Z, SIGSTOP, a debugger). The pause is not charged, as neither a suspended machine (the
    monotonic clock stops then) nor the downtime between a kill and a resume is: charged, a 30 s
    pause ended a 20 s run at once, at the peak LR. A machine that runs slowly (a busy neighbour)
    slows every step and moves the median: that is charged."""

    WARMUP_STEPS = 3  # the first steps of a process (allocator, kernel selection, compilation) are not timed
    ROBUST_STEPS = 5  # timed steps before the plan (and the pause check) follows their median
    MIN_STEPS = 10  # whatever the budget: a loss curve, not a point
    OVERRUN = 0.05  # the share of the budget a run may go over to finish its schedule (see plan)
    # A step held a pause when it took PAUSE_FACTOR times the median and PAUSE_SECONDS more: the
    # slow steps of a running process (a neighbour's burst, page faults, a thread-count probe)
    # stay under both, and validations and checkpoints are timed apart (`timed`).
    PAUSE_FACTOR, PAUSE_SECONDS = 10.0, 5.0

    def __init__(self, seconds: float, spent_before: float, max_steps: int, eval_every: int, cooldown: float = 0.0,
                 clock=time.perf_counter, end: int | None = None, step_time: float | None = None):
        self.seconds, self.spent_before, self.max_steps, self.clock = seconds, spent_before, max_steps, clock
        end = max_steps if end is None else end
        self.cooldown = cooldown
        # The time left is the cooldown's share of the budget (updated by plan()).
        self.cooldown_due = cooldown > 0 and seconds - spent_before <= cooldown * seconds
        self.started = self.clock()
        self.paused = 0.0  # seconds of the pauses found in this process: not charged
        self.aside = 0.0  # seconds of validations and checkpoints since the latest plan (see timed)
        # The median step time (validations and checkpoints aside): measured, else the one the
        # checkpoint of a resumed run recorded (its steps left after the budget may still fit).
        self.step_time: float | None = step_time
        self.per_step: float | None = None  # seconds a step, validations and checkpoints included
        # The plan the LR warmup follows (BudgetSchedule.at's warm_end): the plan itself, now that
        # a stall in the first timed steps no longer sways it (their mean once shrank a 600-step
        # plan to 60 and ended the warmup at step 4).
        self.warm_end = end
        self.first: int | None = None  # the first step this process took
        self.last: tuple[int, float] | None = None  # (steps done, clock) at the latest plan
        # Per plan: (steps, their seconds, seconds of validations and checkpoints among them).
        self.samples: collections.deque[tuple[int, float, float]] = collections.deque(maxlen=max(20, eval_every))
        self.cut = False  # the plan was cut to the steps that fit in the overrun (said once)

    def spent(self) -> float:
        return self.spent_before + self.clock() - self.started - self.paused

    def timed(self, seconds: float) -> None:
        """A validation pass or a checkpoint took `seconds`: charged, but not a step's time."""
        self.aside += seconds

    def _median(self) -> float:
        return statistics.median(work / steps for steps, work, _ in self.samples)

    def _record(self, done: int, now: float, dist) -> None:
        """Times the steps since the latest plan; a pause among them is not charged."""
        self.first = done if self.first is None else self.first
        if self.last is not None and self.last[0] - self.first + 1 >= self.WARMUP_STEPS:
            steps, work = done - self.last[0], now - self.last[1] - self.aside
            if len(self.samples) >= self.ROBUST_STEPS:
                median = self._median()
                if work > steps * max(self.PAUSE_FACTOR * median, median + self.PAUSE_SECONDS):
                    pause = work - steps * median  # the steps are charged their usual time
                    self.paused += pause
                    work -= pause
                    if dist.is_main:
                        info(f"step {done:,}: paused for ~{pause:.0f} s: not counted against the time budget")
            self.samples.append((steps, work, self.aside))
        self.last, self.aside = (done, now), 0.0

    def plan(self, done: int, end: int, dist) -> int:
        self._record(done, self.clock(), dist)
        left = self.seconds - self.spent()
        floor = min(self.max_steps, max(done, self.MIN_STEPS))
        measured = len(self.samples) >= self.ROBUST_STEPS
        if measured:
            self.step_time = self._median()
            self.per_step = self.step_time + sum(a for _, _, a in self.samples) / sum(n for n, _, _ in self.samples)
        if left <= 0:
            # Out of time. The steps left of the plan still run if they fit in OVERRUN of the
            # budget (a validation pass or a checkpoint near the end took longer than planned):
            # stopping now would leave the LR above min_lr, at the peak under warmup-stable-decay.
            # A plan that does not fit is cut to the steps that do (two at least), so that the
            # schedule still ends at min_lr, on a shorter decay.
            short = end - done
            fit = int(self.OVERRUN * self.seconds / self.step_time) if self.step_time else 0
            fitting = min(end, done + max(2, fit))
            new_end = max(floor, fitting)
            if new_end < end and not self.cut and dist.is_main:
                # Name what decided the steps left: the overrun, or the minimum run length (its
                # steps may take far longer than the overrun; "fit in 5% more time" hid a 12x overrun).
                why = (f"that fit in {self.OVERRUN:.0%} more time" if new_end == fitting else
                       f"left of the minimum of {self.MIN_STEPS} steps a run takes, whatever its time budget")
                warn(f"step {done:,}: the time budget ran out {short:,} steps before the planned end; the LR "
                     f"decays to min_lr over the {new_end - done:,} steps {why}")
            self.cut = self.cut or new_end < end
        elif not measured:
            new_end = end
        else:
            new_end = max(floor, min(self.max_steps, done + max(1, int(left / self.per_step))))
        due = self.cooldown > 0 and left <= self.cooldown * self.seconds
        # Every rank must stop at the same step, on the same rate: rank 0's plan is the plan.
        if dist.enabled:
            new_end, due = distributed.broadcast_object((new_end, due))
        self.cooldown_due, self.warm_end = bool(due), int(new_end)
        return int(new_end)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
