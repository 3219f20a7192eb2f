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

    result = train(model, cfg, run_dir, train_data, val_batches, save_model, *, max_steps=None, data=None,
                   data_source=None, redo_hint=None, announce=(), continues=None)

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
- `redo_hint`: optional, the advice of the error that refuses a run dir holding another run (another
  config or data), instead of "rerun with the same config ..., or choose another --out" (the
  quickstart has its own).
- `announce`: optional, lines that describe the run (its model and length), logged on rank 0 once
  the run dir is checked: a refused resume does not read as a run that started.
- `continues`: optional, the run whose batches this one goes on from (a JSON-able dict: its path and
  where its sampler ended, which `train_data` starts after), recorded in `train_config.json` as
  `continues` by a fresh start; a resume keeps the record (and its checkpoint the sampler's place).

The rest is the loop's: checkpoints (see `gpt1.train.checkpoint`) with the trainable weights,
optimizer, GradScaler, step, sampler state and every RNG state (with torchrun, every rank's);
`train_config.json` (the run as started, the resumable settings changed since with the step they
hold from, and each start's and resume's provenance: `gpt1.train.run_record`); one line per step in
`metrics.jsonl` (loss, lr, grad_norm, tokens and tokens_per_sec: input tokens, padding
excluded, mfu), to which a validation adds val_loss and val_ppl, and logs a line of its own
(`step 20: val loss 5.7012, perplexity 299.30`); `loss.png` at the end; once the
step rate settles, the projected wall time of the whole run (revised once, where it could not
count validations and checkpoints yet). A run is finished when its last checkpoint is the
final step and its outputs (`save_model`'s files, `loss.png`) were written from it (marked in
the checkpoint): a run killed in between writes them on its next call; otherwise a call on a
finished run changes nothing in its run dir. The lowest validation loss so far and its step are
kept in the trainer state and added to each validation's metrics (`best_val_loss`, `best_step`);
with `cfg.keep_best`, each validation that lowers it writes `save_model`'s files into `RUN/best`
(whole or not at all: `BEST_DIR`), with `best.json`: the step and loss it holds. A resume removes
a `RUN/best` of a step past its checkpoint's (written by the attempt that stopped after it, whose
steps the resume trains again), and says so: the next validation below the lowest writes it again.
With `cfg.early_stop` = N, N validations in a row that do not lower it end the run at that step,
which then counts as its last (a rerun is that of a finished run; the checkpoint keeps that
early_stop ended it, for the last line). `cfg.keep_checkpoints`: how many of the newest checkpoints
are kept. A step whose loss or gradient norm is not finite is skipped; a validation or checkpoint
due at it still runs when the weights are finite (the skipped step did not touch them), else a warning names the last good
checkpoint. `cfg.max_bad_steps` consecutive skipped steps stop the run (a resumed run counts on
from its checkpoint's); fp16-mixed's overflows (skipped by the GradScaler, which halves its loss
scale for each; a NaN/inf loss, not the scale's doing, leaves it as it is) stop it once its loss
scale falls below 1. The LR schedule and the tokens seen count skipped steps.
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

import contextlib
import datetime
import itertools
import json
import math
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import torch

from gpt1.core.atomic import atomic_dir, write_json
from gpt1.core.constants import IGNORE_INDEX
from gpt1.core.crash_points import crash_point
from gpt1.core.environment import environment
from gpt1.core.errors import Gpt1Error, first_line, is_compile_error
from gpt1.core.locks import exclusive
from gpt1.core.malloc import freed_memory_kept
from gpt1.core.paths import OWN_FILES, OWN_FOLDERS, check_within, make_dirs
from gpt1.core.progress import info, progress, warn
from gpt1.core.reading import read_json
from gpt1.core.threads import cpu_thread_tuner
from gpt1.core.write_errors import writing
from gpt1.train import checkpoint as ckpt
from gpt1.train import distributed
from gpt1.train.budget import PLOT_SECONDS, SAVE_RATE, RunRate, TimeBudget, duration
from gpt1.train.config import TrainConfig
from gpt1.train.evaluate import evaluate_loss, perplexity
from gpt1.train.metrics_file import trim_metrics
from gpt1.train.optim import build_optimizer
from gpt1.train.plot import plot_metrics
from gpt1.train.precision import autocast, resolve_precision, use_float8_matmuls
from gpt1.train.run_record import CONFIG_FILE, RUN_LOCK, RunRecord, check_run_dir, refuse_other_files
from gpt1.train.schedule import BudgetSchedule, lr_at

__all__ = ["BatchSource", "TrainResult", "train", "IGNORE_INDEX", "METRICS_FILE", "CONFIG_FILE", "BEST_DIR",
           "peak_flops", "step_cap_words"]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
BEST_DIR = "best"  # RUN/best: the model of the lowest validation loss (keep_best=true)
BEST_RECORD = "best.json"  # in RUN/best: the step and validation loss of the model it holds

# Dense (no sparsity) FP16/BF16 tensor-core peak FLOP/s per GPU, matched against
# torch.cuda.get_device_name() as whole words ("A100" is not in "RTX A1000", nor "T4" in "T400");
# longest match wins. MFU is reported against this peak.
# Sources: NVIDIA datasheets: H100/H200/GH200 SXM 989 TF (H100 PCIe 756, H100 NVL 835), A100 312, L40S 362,
# L40 181, L4 121, A10 125, RTX A6000 155, V100 125, T4 65; Ada and Ampere GeForce
# whitepapers (FP16 with FP32 accumulate): RTX 4090 165, RTX 3090 71.
PEAK_FLOPS = {
    "H200": 989e12, "GH200": 989e12, "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H800": 989e12,
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
    # seconds of the time budget the run used, every invocation's: to the end of its final checkpoint
    # (its outputs and loss.png written) for a finished run, else to its latest checkpoint; None without a budget
    budget_spent: float | None = None
    best_step: int | None = None  # the step of the lowest validation loss (RUN/best with keep_best); None: no validation
    best_val_loss: float | None = None
    budget_spent_before: float | None = None  # of budget_spent, the invocations' before this one (0.0: a fresh run)


def peak_flops(device: torch.device) -> float | None:
    """The peak FLOP/s of a known GPU, None for CPUs and unknown GPUs."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [key for key in PEAK_FLOPS if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name)]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


def step_cap_words(cfg: TrainConfig) -> tuple[str, str]:
    """The words around the steps a run announces (`at most 600 steps ...; time_budget=20 s may
    end it sooner`) where its time budget may end it first: then they are a cap, not its length."""
    if cfg.time_budget <= 0:
        return "", ""
    return "at most ", f"; time_budget={cfg.time_budget:g} s may end it sooner"


def train(model: torch.nn.Module, cfg: TrainConfig, run_dir: str | Path, train_data: BatchSource,
          val_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
          save_model: Callable[[Path, torch.nn.Module], None], *, max_steps: int | None = None,
          data: dict | None = None, data_source: dict | None = None, redo_hint: str | None = None,
          announce: Sequence[str] = (), continues: dict | None = None) -> TrainResult:
    """Train `model` (see the module docstring); resumes from `run_dir`'s latest checkpoint.
    `data`: an identity of the training data (JSON-able), recorded in train_config.json; a
    resume on data with another identity is refused. `data_source`: where the data came from
    (JSON-able: its path, how it was prepared), recorded with each start and resume, never compared.
    `announce`: lines describing the run, logged once the run dir is checked. `continues`: the run
    whose batches this one goes on from, recorded by a fresh start."""
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

        def check_and_hold() -> RunRecord:
            # A folder of other files is refused before the lock is made in it. (One with a lock
            # is a run, maybe being created by another process: the lock tells which.)
            if not (run_dir / RUN_LOCK).exists():
                refuse_other_files(run_dir)
            # A run dir from elsewhere (downloaded, unpacked) may link its files out of it: the run's
            # writes would replace what they name (its loss.png linked to ~/.bashrc). `checkpoints`
            # may link elsewhere (a bigger disk): only the step folders gpt1 names are written there.
            for name in sorted((OWN_FILES | OWN_FOLDERS | {PLOT_FILE, BEST_DIR, "tensorboard"}) - {ckpt.CHECKPOINTS_DIR}):
                check_within(run_dir / name, run_dir)
            # One process trains in a run dir at a time: a second one would delete the first's
            # partial saves (below) and interleave its metrics. Released when the process ends,
            # however it ends. The run dir is checked (and train_config.json written) under it: a
            # run started at the same moment is told that this one trains there, not that the
            # folder it is making holds something else.
            held.enter_context(exclusive(run_dir / ckpt.CHECKPOINTS_DIR, "training"))
            record = check_run_dir(run_dir, cfg, max_steps, data, dist.world_size, redo_hint)
            ckpt.remove_partial_saves(run_dir)
            return record

        # Every collective of the run happens inside: one whose peer is gone is one line, not gloo's or NCCL's traceback.
        with distributed.peer_failures():
            record = distributed.main_only(check_and_hold)  # a refusal there stops every rank; rank 0's record
            for line in announce if dist.is_main else ():
                info(line)
            run = _Run(run_dir, model, cfg, train_data, val_batches, save_model, max_steps, dist, device, record)
            return _train_in(run, data_source, continues, started)


def _train_in(run: _Run, data_source: dict | None, continues: dict | None, started: float) -> TrainResult:
    """The run itself, once its run dir is checked and held (see `train`): resumed from its latest
    checkpoint, then one optimizer step at a time up to its end, which a time budget re-plans."""
    state = run.resume()
    run.begin(data_source, continues)
    run.plan(state)
    with run.logs():
        for step in itertools.count(run.start_step):
            if step >= run.end:
                break
            began = time.perf_counter()
            lr = run.set_lr(step)
            with distributed.rank_local():  # a damaged batch is this rank's alone
                batches = _next_step(run.train_data, run.cfg.grad_accum)
            loss, grad_norm, tokens = run.forward_backward(batches)
            run.tokens_seen += tokens  # a skipped step's too: its batches were drawn, as an overflow's are
            done = step + 1
            if skipped := _skipped(loss, grad_norm, fp16=run.scaler.is_enabled()):
                metric = run.skip(done, skipped, loss, lr)
            else:
                run.optimizer_step(done, grad_norm)
                elapsed = time.perf_counter() - began
                metric = run.metric(done, loss, lr, grad_norm, tokens / elapsed, batches)
                run.tune_threads(elapsed, batches)
                run.last["loss"] = loss
                run.replan(done)
            run.validate_if_due(done, metric, skipped)
            run.log(metric)
            run.save_if_due(done, skipped)
    return run.finish(started)


def _skipped(loss: float, grad_norm: float, fp16: bool) -> str | None:
    """Why a step is skipped: its loss or gradient norm is NaN/inf (applied, the clip would scale
    every gradient by max_norm/NaN and the update turn every weight into NaN); None if it is not.
    (The loss is all-reduced, as DDP's gradients are: every rank skips alike.) In fp16-mixed a
    non-finite gradient is the GradScaler's overflow: `scaler.step` skips it (`_Run.optimizer_step`)."""
    if not math.isfinite(loss):
        return "non-finite loss"
    return "non-finite gradient" if not math.isfinite(grad_norm) and not fp16 else None


class _Run:
    """One invocation of a run, as `_train_in` takes it step by step: the model and its optimizer;
    what a checkpoint keeps (the step, tokens seen, the last losses, the planned end, the time
    budget spent); the plan (time budget, LR schedule, projected wall time); the logs (metrics.jsonl,
    tensorboard, the progress bar). Its methods are the pieces of a step."""

    def __init__(self, run_dir: Path, model: torch.nn.Module, cfg: TrainConfig, train_data: BatchSource, val_batches,
                 save_model, max_steps: int, dist: distributed.DistInfo, device: torch.device, record: RunRecord | None):
        self.run_dir, self.cfg, self.train_data, self.val_batches = run_dir, cfg, train_data, val_batches
        self.save_model, self.max_steps, self.dist, self.device = save_model, max_steps, dist, device
        self.record = record  # train_config.json (rank 0's), written once the run is known to train
        model.to(device)
        model.train()
        if cfg.float8:
            use_float8_matmuls(model, device)  # before the optimizer: it swaps modules (same parameters)
        if hasattr(model, "gradient_checkpointing"):
            model.gradient_checkpointing = cfg.gradient_checkpointing
        self.optimizer = build_optimizer(model, cfg, device)
        self.precision = resolve_precision(cfg.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16-mixed")
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # The model as saved and evaluated; as trained (DDP with torchrun, see `begin`); as called (compiled).
        self.raw_model = self.model = self.step_model = model
        self.pad_id = getattr(train_data, "pad_id", None)
        self.peak, self.flops_per_token = peak_flops(device), getattr(model, "flops_per_token", None)
        # What a checkpoint keeps: a fresh run's until `resume`.
        self.start_step, self.tokens_seen, self.last = 0, 0, {"loss": None, "val_loss": None}
        self.end = max_steps  # the planned last step (re-planned under a time budget)
        self.budget_spent = 0.0  # as of the latest checkpoint: what a rerun reports too
        # Seconds of the run so far as of the latest checkpoint, every invocation's (its time budget's
        # where it has one, pauses not counted; else wall time): the clock of metrics.jsonl's `elapsed`
        self.elapsed_before = 0.0
        self.began = time.perf_counter()  # when this invocation's time began (`plan`)
        self.finished = False  # the run had finished before this invocation (`begin`)
        # The lowest validation loss so far and its step, and the validations since it (early_stop)
        self.best: dict = {"step": None, "val_loss": None}
        self.since_best = 0
        self.early_stopped: bool | None = False  # early_stop ended the run (None: an older gpt1's checkpoint, unsaid)
        self.bad_steps = 0  # consecutive skipped steps
        # Whether a step changed the weights since the last validation: one due after skipped steps
        # alone would measure the same weights again (and count against early_stop: two NaN batches
        # ended a run as "no longer improving").
        self.applied_since_validation = True
        # fp16-mixed: the overflows since the loss scale last grew (`optimizer_step`): the first's
        # step, how many, and the scale the latest left; None before the first.
        self.scale_fall: dict | None = None
        self.budget: TimeBudget | None = None
        self.schedule: BudgetSchedule | None = None
        self.rate: RunRate | None = None
        self.metrics = self.writer = self.threads = self.bar = None  # `logs` opens them

    def resume(self) -> dict | None:
        """Load the latest checkpoint (weights, optimizer, GradScaler, sampler, step, RNG states) or
        seed a fresh run; the checkpoint's trainer state, None for a fresh run."""
        cfg, dist = self.cfg, self.dist
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is None:
            torch.manual_seed(cfg.seed + 1000 * dist.rank)
            return None
        state = ckpt.load_checkpoint(latest, self.raw_model)
        ckpt.check_trainer_state(latest, state, self.train_data.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.train_data.load_state_dict(state["sampler"])
        self.start_step, self.tokens_seen, self.last = state["step"], state["tokens"], state["last"]
        self.end, self.budget_spent = state.get("end", self.max_steps), state.get("budget_spent", 0.0)
        if self.start_step >= self.end:  # a finished run: what its final checkpoint spent, its own writes included
            self.budget_spent = ckpt.final_budget_spent(latest) or self.budget_spent
        self.elapsed_before = state.get("elapsed", self.budget_spent)  # an older gpt1's: its budget's, else 0
        # A checkpoint of an older gpt1 has no best: the next validation is the first.
        self.best, self.since_best = dict(state.get("best", self.best)), state.get("since_best", 0)
        # An older gpt1's checkpoint does not say: a run with steps left was not ended; a finished one, unsaid (None).
        self.early_stopped = state.get("early_stopped", None if self.start_step >= self.end else False)
        # A run killed inside a stretch of skipped steps stops where an uninterrupted one does (reset
        # to 0, it went on max_bad_steps more); an older gpt1's checkpoint has neither.
        self.bad_steps, self.scale_fall = state.get("bad_steps", 0), state.get("scale_fall")
        self.applied_since_validation = state.get("applied_since_validation", True)
        if dist.is_main and self.start_step < self.end:  # a finished run says so at the end ("nothing to do"), not "resuming"
            budget = cfg.time_budget
            spent = (f"; {duration(self.budget_spent)} of its {duration(budget)} time budget spent, "
                     f"{duration(max(0.0, budget - self.budget_spent))} left" if budget > 0 else "")
            info(f"resuming {self.run_dir} from step {self.start_step:,} of {self.end:,} ({latest.name}){spent}")
        # Each rank restores its own RNG states (its dropout masks go on as in an uninterrupted run).
        # A checkpoint of an older gpt1 holds rank 0's alone: the other ranks reseed reproducibly.
        rank_rngs = state.get("rank_rng")
        if not rank_rngs or len(rank_rngs) != dist.world_size:
            rank_rngs = None
        ckpt.set_rng_state(rank_rngs[dist.rank] if rank_rngs else state["rng"])
        if dist.rank and not rank_rngs:
            torch.manual_seed(cfg.seed + 1000 * dist.rank + self.start_step)
        return state

    def begin(self, data_source: dict | None, continues: dict | None = None) -> None:
        """Record this invocation in train_config.json (`RunRecord.start`; a fresh start, the run it
        `continues`), remove a RUN/best that the attempt stopped after the checkpoint wrote, say what
        RUN/best keeps where this resume turns keep_best off, and drop the metric lines
        a killed run logged after its last checkpoint; then wrap the model for the steps (DDP with
        torchrun, torch.compile with compile=true). A rerun of a finished run (at most writing the
        outputs a kill left unwritten) changes nothing in the run dir: its record, metrics and event
        log stay as the run left them."""
        self.finished = self.start_step >= self.end
        if not self.finished:
            if self.start_step and self.cfg.keep_best and self.best["step"] is not None:
                # train_config.json is rank 0's (`train`): its answer is every rank's, which reset alike.
                off = distributed.broadcast_object(
                    not self.record.setting_at(self.best["step"], "keep_best") if self.dist.is_main else None)
                if off:
                    self._start_keeping_best()
            distributed.main_only(self._drop_later_best)
            if self.dist.is_main and self.start_step and not self.cfg.keep_best:
                self._warn_best_kept()
            spent = {"budget_spent": self.budget_spent} if self.cfg.time_budget > 0 else {}
            distributed.main_only(lambda: self.record.start(
                self.start_step, {**_provenance(self.cfg, self.device, self.precision, data_source), **spent},
                continues=continues if self.start_step == 0 else None))
            if self.dist.is_main:  # lines a killed run logged after its last checkpoint (or before its first)
                trim_metrics(self.run_dir / METRICS_FILE, self.start_step)
        distributed.barrier()
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.raw_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step_model = torch.compile(self.model) if self.cfg.compile else self.model

    def _drop_later_best(self) -> None:
        """Rank 0: remove a RUN/best that this run's checkpoint did not see written: the model of a
        validation after the checkpoint (its `best.json` says which step), by the attempt that stopped
        there, whose steps this one trains anew; kept, it stayed as the best (a run that validated at
        other steps, or turned keep_best off, never replaced it) and the run named another step's.
        A fresh start's RUN/best is an attempt's stopped before its first checkpoint. Said in one line
        on a resume, where the next validation below the lowest writes it again (with keep_best)."""
        best = self.run_dir / BEST_DIR
        held = _best_held(best)
        if self.start_step and (held is None or held["step"] <= self.start_step):
            return  # an older gpt1's best/ (no best.json) cannot tell: it stays
        if not best.is_dir():
            return
        if best.is_symlink():  # a link the user made (to a folder in RUN): what it names, then the link
            shutil.rmtree(best.resolve())  # (rmtree refuses a link; a dangling one would stop the next write)
            best.unlink()
        else:
            shutil.rmtree(best)
        if self.start_step:
            lowest = self.best["val_loss"]
            again = ("nothing writes it again (keep_best=false)" if not self.cfg.keep_best else
                     "the first validation of this run writes it" if lowest is None else
                     f"a validation below {_fmt(lowest)} (step {self.best['step']:,}'s) writes it again")
            info(f"removed {best}: it held step {held['step']:,}'s model (val loss {_fmt(held['val_loss'])}), written after "
                 f"the checkpoint this run resumes from (step {self.start_step:,}); {again}")

    def _warn_best_kept(self) -> None:
        """keep_best turned off on this resume: RUN/best stays (the user's files), holding the model
        of the lowest validation loss while it was on, which no later validation replaces (the run's
        last line no longer names it). Said on the resume that turns it off, naming the step its
        `best.json` records (an older gpt1's best/ has none: the lowest as of the checkpoint)."""
        best = self.run_dir / BEST_DIR
        if not best.is_dir() or not self.record.settings_before(self.start_step).get("keep_best"):
            return
        held = _best_held(best) or self.best  # an older gpt1's best/ has no record: the lowest as of the checkpoint
        step, loss = held["step"], held["val_loss"]
        which = f"step {step:,}'s model (val loss {_fmt(loss)})" if step is not None else "an earlier model"
        warn(f"keep_best=false: {best} keeps {which}, the lowest while keep_best was on; later validations no "
             "longer replace it, even with a lower loss")

    def _start_keeping_best(self) -> None:
        """keep_best on at this resume, off when the lowest validation so far ran: its model is
        gone (where keep_best was on then, RUN/best holds it, and it stays the lowest). Kept as the
        lowest, no later validation above it would ever write RUN/best (and the run's last line
        would name a RUN/best that is not there). So the lowest starts over from here, early_stop's
        count with it, and the resume says so. Every rank resets alike."""
        step, loss = self.best["step"], self.best["val_loss"]
        self.best, self.since_best = {"step": None, "val_loss": None}, 0
        if self.dist.is_main:
            warn(f"keep_best=true from step {self.start_step:,}: step {step:,}'s val loss ({_fmt(loss)}) was the "
                 f"lowest while keep_best was off, and its model was not kept; {self.run_dir / BEST_DIR} will hold "
                 "the lowest validation from here on"
                 + (f", and early_stop={self.cfg.early_stop} counts from here" if self.cfg.early_stop else ""))

    def plan(self, state: dict | None) -> None:
        """The plan from here, `state` the resumed checkpoint's: under a time budget, the end
        re-planned after every step (`TimeBudget`) and a rate that never rises after its warmup
        (`BudgetSchedule`); else the fixed plan's `lr_at`, and on rank 0 its projected wall time.
        This invocation's time (its budget's, its `elapsed`) counts from here."""
        cfg = self.cfg
        self.began = time.perf_counter()
        if cfg.time_budget > 0:
            schedule_state = state.get("schedule") if state is not None else None
            if state is not None and schedule_state is None:
                # Saved before the schedule's state was (2026-12-05, ef57fb6): rebuilt from the rate its
                # last step ran at, which the optimizer's state keeps; else the cooldown restarts at the peak.
                group = self.optimizer.param_groups[0]
                schedule_state = BudgetSchedule.state_from_rate(cfg.lr, cfg.warmup, self.start_step, self.end,
                                                                group["lr"] / group.get("lr_scale", 1.0))
            step_time = state.get("step_time") if state is not None else None  # the budget's median (None before 2026-12)
            # Guesses for the run's end until timed: a validation's forward passes at a third of a
            # training step's forward and backward each; a checkpoint from the bytes it writes.
            trainable = sum(p.numel() * p.element_size() for p in self.params)
            self.budget = TimeBudget(cfg.time_budget, self.budget_spent, self.max_steps, cfg.eval_every, cfg.cooldown,
                                     end=self.end, step_time=step_time,
                                     validation_steps=cfg.eval_batches / (3 * cfg.grad_accum * self.dist.world_size),
                                     save_seconds=4 * trainable / SAVE_RATE, plot_seconds=PLOT_SECONDS)
            self.schedule = BudgetSchedule(cfg.lr, cfg.min_lr, cfg.warmup, cfg.cooldown, schedule_state)
        elif self.dist.is_main:
            self.rate = RunRate(self.start_step, self.end, cfg.eval_every, cfg.save_every)

    @contextlib.contextmanager
    def logs(self):
        """metrics.jsonl, the tensorboard log, the thread tuner and the progress bar, for the steps
        inside; closed (and the thread count put back) however they end."""
        cfg, dist = self.cfg, self.dist
        logs = dist.is_main and not self.finished  # rank 0 logs; a rerun of a finished run writes nothing
        # What must be closed or put back is made inside the `try` that does so: made before it, a
        # failed setup step (a file named tensorboard in the run dir) left metrics.jsonl open.
        with _writer_thread_unprinted() if cfg.tensorboard and logs else contextlib.nullcontext():
            try:
                self.writer = _tensorboard(self.run_dir, self.start_step) if cfg.tensorboard and logs else None
                self.metrics = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") if logs else None
                self.threads = _thread_tuner(self.device, cfg, dist)
                # Made last: no bar above an error.
                self.bar = progress(total=self.end, initial=self.start_step, desc=self.run_dir.name, unit="step",
                                    disable=None if dist.is_main else True)
                yield
            except BaseException:
                # The error in flight is the one to report: closing flushes a line left in the buffer
                # by a failed write again, whose failure (no file name) would replace the one naming
                # metrics.jsonl; the tensorboard writer raises its thread's failed write again. (Each
                # is closed either way.)
                if self.metrics:
                    with contextlib.suppress(OSError):
                        self.metrics.close()
                if self.writer:
                    with contextlib.suppress(OSError):
                        _close_tensorboard(self.writer)
                    self.writer = None  # closed: not again below
                raise
            finally:
                if self.threads:
                    torch.set_num_threads(self.threads.max_threads)
                if self.bar is not None:  # not `if bar`: a tqdm's truth is its total
                    self.bar.close()
                if self.metrics:
                    with writing(self.metrics.name):
                        self.metrics.close()
                if self.writer:
                    with writing(self.writer.get_logdir()):
                        _close_tensorboard(self.writer)

    def set_lr(self, step: int) -> float:
        """Set the learning rate of step `step` (0-based) on every parameter group; the rate."""
        cfg = self.cfg
        if self.schedule:
            # By time, or by steps where max_steps caps the plan (then the plan is exact).
            due = self.budget.cooldown_due or (self.end == self.max_steps and self.schedule.in_planned_cooldown(step, self.end))
            lr = self.schedule.at(step, self.end, due, warm_end=self.budget.warm_end)
        else:
            lr = lr_at(step, self.end, cfg.lr, cfg.min_lr, cfg.warmup, cfg.cooldown)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's group runs at a multiple of lr
        return lr

    def forward_backward(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float, int]:
        """Forward and backward of the step's micro-batches, the gradients unscaled and clipped; the
        step's loss, gradient norm and input tokens (every rank's), read in its one wait for the device."""
        cfg, dist, device = self.cfg, self.dist, self.device
        # The step's loss is the mean over all of its targets, on every rank: each micro-batch's
        # mean loss is weighted by its share of them (chat batches hold different numbers of
        # reply tokens; a mean of the means weighs a short reply's tokens more). Counted on
        # the host before the copy to the device: no wait.
        n_targets = [int((y != IGNORE_INDEX).sum()) for _, y in batches]
        total, tokens = sum(n_targets), sum(_real_tokens(x, self.pad_id) for x, _ in batches)
        if dist.enabled:  # DDP averages the ranks' gradients: each rank's weights are x world_size
            counts = distributed.all_reduce_sum(_to_device(torch.tensor([total, tokens]), device))
            total = counts[0]
        loss_sum = torch.zeros((), device=device)
        for micro, (x, y) in enumerate(batches):
            x, y = _to_device(x, device), _to_device(y, device)
            # DDP averages gradients on every backward; only the last micro-batch needs it.
            sync = micro == cfg.grad_accum - 1 or not dist.enabled
            n = n_targets[micro]
            loss = self._micro_batch(x, y, sync, n * dist.world_size / total if n else 0.0)
            if n:  # a micro-batch without targets has a NaN mean loss (and weight 0)
                loss_sum += loss * n
        mean_loss = distributed.all_reduce_sum(loss_sum) / total  # NaN without targets: the step is skipped
        self.scaler.unscale_(self.optimizer)  # clip and report the true gradient norm, not the scaled one
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        # The step's one wait for the device: the loss and the gradient norm in one transfer
        # (with torchrun, the step's token count of all ranks too, in float64: exact).
        if dist.enabled:
            mean_loss, grad_norm, tokens = torch.stack([mean_loss.double(), grad_norm.double(), counts[1].double()]).tolist()
            return mean_loss, grad_norm, int(tokens)
        mean_loss, grad_norm = torch.stack([mean_loss.float(), grad_norm.float()]).tolist()
        return mean_loss, grad_norm, tokens

    def _micro_batch(self, x: torch.Tensor, y: torch.Tensor, sync: bool, weight) -> torch.Tensor:
        """`_loss_and_backward` of one micro-batch; where torch.compile fails, on the eager model from then on."""
        try:
            return _loss_and_backward(self.step_model, self.model, x, y, sync, self.device, self.precision, self.scaler,
                                      weight)
        except Exception as e:
            if self.step_model is self.model or not is_compile_error(e):
                raise
            warn(f"torch.compile failed ({first_line(e)}); training continues without it (eager, as with compile=false)")
            if self.record:
                self.record.note(compiled=False, compile_error=first_line(e))
            self.step_model = self.model
            return _loss_and_backward(self.model, self.model, x, y, sync, self.device, self.precision, self.scaler, weight)

    def skip(self, done: int, skipped: str, loss: float, lr: float) -> dict:
        """Step `done`, `skipped` (see `_skipped`): its gradients dropped, the weights untouched; its
        line of metrics.jsonl. The run stops after `cfg.max_bad_steps` in a row, or where it ends skipping."""
        self.bad_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            # Closes this step's unscale_ at the scale it ran at (its growth count kept): the loss was
            # NaN/inf before it was scaled, so the scale did not cause it. Backed off (`update()`
            # reads the gradients' inf/NaN as an overflow), a NaN loss on every third batch halved
            # it to 6e-11 in 150 steps, where the blocks' gradients underflow to 0.
            scale = self.scaler.get_scale()
            self.scaler.update(scale)
            self._stop_below_1(done, scale, overflow=False)
        what = _what(skipped)
        if self.bad_steps >= self.cfg.max_bad_steps:
            raise _bad_steps_error(f"the {what} was NaN/inf for {self.bad_steps} consecutive steps "
                                   f"(last at step {done:,})", self.run_dir, self.precision)
        if done == self.end and self.bad_steps >= max(1, done // 2):
            # A run shorter than max_bad_steps that ends skipping (all of it, or its second
            # half) has no model worth writing: it "finished" with exit 0 on garbage weights. Its
            # steps since step 0, as bad_steps counts across a resume: counted from this process's
            # start, a run resumed just before its last step (skipped) failed where one run straight finished.
            raise _bad_steps_error(f"the {what} was NaN/inf for the last {self.bad_steps} of the run's "
                                   f"{done:,} steps", self.run_dir, self.precision)
        return {"step": done, "loss": loss if math.isfinite(loss) else None, "lr": lr, "tokens": self.tokens_seen,
                "elapsed": round(self.elapsed(), 3), "skipped": skipped}

    def optimizer_step(self, done: int, grad_norm: float) -> None:
        """Apply step `done`'s gradients (fp16-mixed: unless they overflowed, which the GradScaler skips)."""
        self.scaler.step(self.optimizer)  # with fp16, skipped when the gradients overflowed (an inf/NaN norm)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled() and not math.isfinite(grad_norm):
            # An overflow halves the scale; at the start of a run a few halvings from 65,536 find
            # one that fits. (Read on a skipped step only: a normal step waits for the device no more.)
            self.bad_steps += 1
            scale, fall = self.scaler.get_scale(), self.scale_fall
            if fall is None or scale >= fall["scale"]:  # the first overflow, or the scale grew since the last
                fall = {"step": done, "overflows": 0}
            self.scale_fall = {**fall, "overflows": fall["overflows"] + 1, "scale": scale}
            self._stop_below_1(done, scale, overflow=True)
        else:
            self.bad_steps = 0
            self.applied_since_validation = True

    def _stop_below_1(self, done: int, scale: float, overflow: bool) -> None:
        """fp16-mixed: stop once the loss scale, as updated after step `done` (an `overflow` or a NaN
        loss), is below 1, as DeepSpeed stops at its minimum scale: gradients that stay NaN/inf however
        small the scale are not an overflow. The error says what brought it there: the overflows
        since it last grew."""
        if scale >= 1.0:
            return
        fall = self.scale_fall
        if not overflow:  # a NaN loss leaves the scale as it is: this one comes from an older gpt1's checkpoint
            what = f"the fp16 loss scale was {scale:g} at step {done:,}"
        elif (overflows := fall["overflows"]) == (steps := done - fall["step"] + 1):
            what = (f"the gradient norm was NaN/inf for {overflows} consecutive steps (last at step {done:,}) "
                    f"although the fp16 loss scale fell to {scale:g}")
        else:
            start = scale / self.scaler.get_backoff_factor() ** overflows
            what = (f"{overflows} fp16 overflows (a NaN/inf gradient norm) in the last {steps:,} steps (last at "
                    f"step {done:,}) brought the loss scale from {start:g} to {scale:g}")
        raise _bad_steps_error(what, self.run_dir, self.precision)

    def metric(self, done: int, loss: float, lr: float, grad_norm: float, tokens_per_sec: float,
               batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
        """Step `done`'s line of metrics.jsonl (a validation adds to it)."""
        # MFU at the length of the step's last micro-batch (a fine-tune's batches differ in length).
        metric = {"step": done, "loss": loss, "lr": lr,
                  "grad_norm": grad_norm if math.isfinite(grad_norm) else None,  # inf: an fp16 overflow
                  "tokens": self.tokens_seen, "tokens_per_sec": tokens_per_sec,
                  "mfu": (self.flops_per_token(batches[-1][0].size(1)) * tokens_per_sec / (self.peak * self.dist.world_size)
                          if self.peak and self.flops_per_token else None),
                  "elapsed": round(self.elapsed(), 3)}
        if self.threads:
            metric["threads"] = torch.get_num_threads()  # the count this step ran on
        if self.scaler.is_enabled() and not math.isfinite(grad_norm):
            metric["skipped"] = "fp16 overflow"
        return metric

    def elapsed(self) -> float:
        """Seconds of the run so far, every invocation's (to the latest checkpoint for those before this
        one): its time budget's, pauses not counted, else wall time."""
        return self.budget.spent() if self.budget else self.elapsed_before + time.perf_counter() - self.began

    def tune_threads(self, elapsed: float, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The thread tuner (a CPU run under a time budget) times the step; it may change the count."""
        # Per position computed, padding included: chat batches differ in length.
        if self.threads and (message := self.threads.step_done(elapsed, size=sum(x.numel() for x, _ in batches))):
            info(message)

    def replan(self, done: int) -> None:
        """Under a time budget, the last step re-planned after step `done` from the time steps take."""
        if self.budget:
            self.end = self.budget.plan(done, self.end, self.dist)
            self.bar.total = self.end

    def validate_if_due(self, done: int, metric: dict, skipped: str | None) -> None:
        """The validation due after step `done` (every `cfg.eval_every` steps, and the last). After a
        skipped step (`skipped`, see `_skipped`) too where the weights are finite, as the step left
        them: skipped, the last step's result reported an older validation as the final one. Not
        where no step changed the weights since the last one: the same numbers again, which counted
        against `early_stop` (the last one's are the weights' own)."""
        due = done % self.cfg.eval_every == 0 or done == self.end
        if due and self.applied_since_validation and (not skipped or self._finite_weights()):
            self.validate(done, metric)

    def _finite_weights(self) -> bool:
        return all(torch.isfinite(p).all() for p in self.params)

    def validate(self, done: int, metric: dict) -> None:
        """The validation loss and perplexity after step `done`, added to its `metric` and logged;
        the lowest so far (with keep_best, its model in RUN/best), and the early stop it may call."""
        began = time.perf_counter()
        self.applied_since_validation = False
        val_loss, tokens = evaluate_loss(self.raw_model, self.val_batches(), self.device, self.precision)
        if not tokens:  # nothing held out (a fine-tune with val_fraction=0, whose start said so): no "val loss nan"
            return
        if math.isfinite(val_loss):
            self.last["val_loss"] = val_loss
            metric.update(val_loss=val_loss, val_ppl=perplexity(val_loss))
        # The loss is all-reduced: every rank finds the same best, and stops at the same step.
        improved = math.isfinite(val_loss) and (self.best["val_loss"] is None or val_loss < self.best["val_loss"])
        if improved:
            self.best, self.since_best = {"step": done, "val_loss": val_loss}, 0
            if self.cfg.keep_best:
                distributed.main_only(self._save_best)  # a failed write (a full disk) stops every rank
        else:
            self.since_best += 1
        if self.best["step"] is not None:
            metric.update(best_val_loss=self.best["val_loss"], best_step=self.best["step"])
        self._timed("validation", time.perf_counter() - began)  # RUN/best's write counts as the validation's
        if self.dist.is_main:  # a line of its own: a log off a terminal has every validation, not the bar's last
            info(f"step {done:,}: val loss {_fmt(val_loss)}, perplexity {_fmt(perplexity(val_loss), '.2f')}"
                 + self._best_words(improved))
        if self.cfg.early_stop and self.since_best >= self.cfg.early_stop and done < self.end:
            if self.dist.is_main:
                kept = ", " + (self._best_not_kept() or f"its model in {self.run_dir / BEST_DIR}") if self.cfg.keep_best else ""
                info(f"step {done:,}: early stop: {self.since_best} validations in a row without a val loss below "
                     f"{_fmt(self.best['val_loss'])} (step {self.best['step']:,}{kept}); the run ends here, "
                     f"{self.end - done:,} steps before its planned end (early_stop={self.cfg.early_stop})")
            self.end = done  # the last step: its checkpoint is saved now, and a rerun finds the run finished
            self.early_stopped = True  # what ended it, for its last line (a time budget may end a run at that step too)
            self.bar.total = done

    def _best_not_kept(self) -> str | None:
        """Rank 0, with keep_best: why the model of the lowest validation loss is not in RUN/best, as
        its `best.json` tells (a resume removed the RUN/best of a later step, and no validation since
        went below the lowest); None where it is there."""
        best = self.run_dir / BEST_DIR
        held = _best_held(best)
        if not best.is_dir():
            return f"its model not kept: there is no {best}"
        if held is None or held["step"] == self.best["step"]:  # None: an older gpt1's best/, taken as it was
            return None
        return f"its model not kept: {best} holds step {held['step']:,}'s (val loss {_fmt(held['val_loss'])})"

    def _best_words(self, improved: bool) -> str:
        """What a validation line adds where the run keeps its best or may stop early: where the best is."""
        if not (self.cfg.keep_best or self.cfg.early_stop) or self.best["step"] is None:
            return ""
        if improved:
            return f"; the lowest so far{f', written to {self.run_dir / BEST_DIR}' if self.cfg.keep_best else ''}"
        return (f"; the lowest: {_fmt(self.best['val_loss'])} at step {self.best['step']:,}"
                + (f", {self.since_best} of early_stop={self.cfg.early_stop}" if self.cfg.early_stop else ""))

    def _save_best(self) -> None:
        """RUN/best: `save_model`'s files of the model as it is now, replacing the earlier best whole,
        with the run's train_config.json (`gpt1 eval --chat RUN/best` holds out what the run held out)."""
        # The run's own folder: a file another process put there (eval's report.md) is dropped with
        # a warning, never a reason to stop the run (it ended a keep_best run before its first checkpoint).
        with atomic_dir(self.run_dir / BEST_DIR, owned=True) as tmp:
            self.save_model(tmp, self.raw_model)
            shutil.copyfile(self.run_dir / CONFIG_FILE, tmp / CONFIG_FILE)
            write_json(tmp / BEST_RECORD, self.best)  # which step it holds: a resume tells a later attempt's apart

    def log(self, metric: dict) -> None:
        """A step's `metric` into metrics.jsonl, tensorboard and the progress bar; the projected wall time."""
        done = metric["step"]
        self._write_metric(metric)
        if self.writer:
            with writing(self.writer.get_logdir()):  # its thread's failed write (a full disk) is raised here
                for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "val_loss", "val_ppl"):
                    if metric.get(key) is not None:
                        self.writer.add_scalar(key, metric[key], done)
        val = self.last["val_loss"]
        if "tokens_per_sec" in metric:  # an applied step (or an fp16 overflow); a skipped one leaves the bar's numbers
            self.bar.set_postfix(refresh=False, loss=f"{metric['loss']:.4f}", lr=f"{metric['lr']:.2e}",
                                 tok_s=f"{metric['tokens_per_sec']:,.0f}", **({"val": f"{val:.4f}"} if val is not None else {}))
        self.bar.update(1)
        if self.rate:
            self.rate.step_done(done)

    def _write_metric(self, metric: dict) -> None:
        if self.metrics:
            with writing(self.metrics.name):  # a full disk names the file
                self.metrics.write(json.dumps(metric) + "\n")
                self.metrics.flush()

    def save_if_due(self, done: int, skipped: str | None = None) -> None:
        """The checkpoint due after step `done` (every `cfg.save_every` steps, and the last), and the
        run dir's model from it. After a skipped step (`skipped`, see `_skipped`) only where the
        weights are finite, as the step left them; else a warning."""
        if not _save_due(done, self.cfg.save_every, self.end):
            return
        if skipped and not self._finite_weights():
            if self.dist.is_main:
                warn(f"step {done:,}: no checkpoint saved: the {_what(skipped)} and the weights are not finite; "
                     f"the last good checkpoint is {ckpt.latest_checkpoint(self.run_dir) or 'none'}")
            return
        # Every rank's RNG states (dropout), gathered by rank 0, which saves them all.
        rank_rngs = distributed.gather_object(ckpt.rng_state()) if self.dist.enabled else None
        began = time.perf_counter()
        # Rank 0 saves; its failure (e.g. a full disk) stops every rank.
        distributed.main_only(lambda: self._save(done, rank_rngs))
        self._timed("checkpoint", time.perf_counter() - began)

    def _save(self, done: int, rank_rngs: list | None) -> None:
        """Rank 0's checkpoint of step `done`, then the run dir's model (at the end, loss.png too) from it."""
        self.budget_spent = self.budget.spent() if self.budget else 0.0
        state = {"optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                 "sampler": self.train_data.state_dict(), "tokens": self.tokens_seen, "last": dict(self.last),
                 "config": self.cfg.to_dict(), "max_steps": self.max_steps, "end": self.end,
                 "budget_spent": self.budget_spent, "elapsed": self.elapsed(),
                 "step_time": self.budget.step_time if self.budget else None,
                 "schedule": self.schedule.state_dict() if self.schedule else None,
                 "best": dict(self.best), "since_best": self.since_best,
                 "bad_steps": self.bad_steps, "scale_fall": dict(self.scale_fall) if self.scale_fall else None,
                 "applied_since_validation": self.applied_since_validation, "early_stopped": bool(self.early_stopped),
                 **({"rank_rng": rank_rngs} if rank_rngs else {})}
        checkpoint = ckpt.save_checkpoint(self.run_dir, done, self.raw_model, state, keep=self.cfg.keep_checkpoints)
        final = done == self.end
        _write_outputs(self.run_dir, checkpoint, self.raw_model, self.save_model, final=final,
                       spent=self._spent_at_end if final and self.budget else None)

    def _spent_at_end(self) -> float:
        """The time budget the run spent, its final checkpoint's writes included: what it reports (and
        a rerun of the finished run, from the checkpoint's mark)."""
        self.budget_spent = self.budget.spent()
        return self.budget_spent

    def _timed(self, kind: str, seconds: float) -> None:
        """A validation pass or checkpoint ("validation", "checkpoint") took `seconds`: not step time."""
        if self.rate:
            self.rate.timed(kind, seconds)
        if self.budget:
            self.budget.timed(seconds, kind)

    def finish(self, started: float) -> TrainResult:
        """The run's result (`started`: when `train` was called), once its final checkpoint is known
        to be saved; the outputs a run killed after it left unwritten are written now."""
        run_dir, end = self.run_dir, self.end
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is None or ckpt.checkpoint_step(latest) < end:
            # The final checkpoint is written unless the weights went NaN/inf (a warning said so): a
            # run without its final weights has failed, whatever its step count.
            raise distributed.same_on_every_rank(
                f"the run ended at step {end:,} with non-finite weights, so no final model was written; "
                f"the last good checkpoint is {latest or 'none'}. Lower lr, or check the data")
        if self.dist.is_main and self.finished and not ckpt.outputs_written(latest):
            info(f"{run_dir}: its outputs are older than its last checkpoint ({latest.name}); writing them")
            _write_outputs(run_dir, latest, self.raw_model, self.save_model, final=True)
        val = self.last["val_loss"]
        result = TrainResult(run_dir=run_dir, steps=end, tokens=self.tokens_seen, train_loss=self.last["loss"],
                             val_loss=val, val_perplexity=perplexity(val) if val is not None else None,
                             seconds=time.perf_counter() - started, resumed_from=self.start_step,
                             budget_spent=self.budget_spent if self.budget else None,
                             best_step=self.best["step"], best_val_loss=self.best["val_loss"],
                             budget_spent_before=self.budget.spent_before if self.budget else None)
        if self.dist.is_main:
            if self.finished:
                info(f"{run_dir} already finished its {end:,} steps; nothing to do")
            best = self.best["step"]
            lowest = (f"; the lowest val loss {_fmt(self.best['val_loss'])} at step {best:,}"
                      + (f" ({self._best_not_kept() or run_dir / BEST_DIR})" if self.cfg.keep_best else "")
                      if best is not None and (best != end or self.cfg.keep_best) else "")
            info(f"done: {end:,} steps ({self._ended_by()}), {self.tokens_seen:,} tokens; train loss "
                 f"{_fmt(result.train_loss)}, val loss {_fmt(val)}, val perplexity {_fmt(result.val_perplexity, '.2f')}"
                 f"{lowest}")
        return result

    def _ended_by(self) -> str:
        """What ended the run, for its last line: early_stop, its time budget, or its length (max_steps,
        or the max_tokens or epochs it was resolved from)."""
        cfg, end = self.cfg, self.end
        # Recorded when it fires; an older gpt1's checkpoint did not say: the count tells (a time budget that
        # ended the run at the validation where the count reached early_stop read as early_stop's doing).
        fired = self.early_stopped if self.early_stopped is not None else \
            end < self.max_steps and cfg.early_stop and self.since_best >= cfg.early_stop
        if fired:
            return f"ended by early_stop={cfg.early_stop}"
        budget = f"time_budget={cfg.time_budget:g} s"  # as the start said it (7.5 s read "8 s" here)
        if self.budget and end < self.max_steps:
            return f"ended by its {budget}: {self.budget_spent:.1f} s spent"
        return "its full length" + (f", within its {budget}" if self.budget else "")


def _best_held(best: Path) -> dict | None:
    """The step and validation loss of the model in RUN/best, from its `best.json`; None where there is
    no RUN/best, or one without a readable record (an older gpt1's)."""
    try:
        held = read_json(best / BEST_RECORD) if (best / BEST_RECORD).is_file() else None
    except Gpt1Error:
        return None
    ok = isinstance(held, dict) and isinstance(held.get("step"), int) and isinstance(held.get("val_loss"), (int, float))
    return {"step": held["step"], "val_loss": held["val_loss"]} if ok else None


def _provenance(cfg: TrainConfig, device: torch.device, precision: str, data_source: dict | None) -> dict:
    """What this invocation of a run ran on (train_config.json's `provenance`; never compared on
    resume): when and how it was started, the versions and the machine (`gpt1.core.environment`),
    the device as resolved and its name, the precision after its fallback (`resolve_precision`),
    whether it compiles (`note`d false with the error when compile falls back to eager), and the data's source."""
    return {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": list(sys.argv), **environment(), "device": str(device),
            **({"device_name": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}),
            "precision": precision, "compiled": cfg.compile, **({"data": data_source} if data_source else {})}


def _what(skipped: str) -> str:
    """What was not finite at a step `_skipped` skipped, as the messages name it."""
    return "loss" if skipped == "non-finite loss" else "gradient norm"


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
                   save_model: Callable[[Path, torch.nn.Module], None], final: bool,
                   spent: Callable[[], float] | None = None) -> None:
    """The run dir's model (and, at the end, loss.png) from `checkpoint`'s weights; marked in
    the checkpoint once written, so a kill in between is completed by the next run. `spent`: the
    time budget spent once they are written, kept in the mark (the final checkpoint's)."""
    crash_point("before-outputs")
    save_model(run_dir, model)
    if final:
        _plot(run_dir)
    ckpt.mark_outputs_written(checkpoint, spent() if spent else None)


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
    # metrics.jsonl is trimmed): the resumed run logs them again. Its first event is written at once.
    with writing(log_dir):
        return SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1)


def _close_tensorboard(writer) -> None:
    """Close tensorboard's writer, whose close raises the error of a write its thread could not do
    (it flushes first); the thread is stopped either way: left running, it would try again later."""
    try:
        writer.close()
    except BaseException:
        for file_writer in (writer.all_writers or {}).values():
            with contextlib.suppress(OSError):
                file_writer.close()
        raise


@contextlib.contextmanager
def _writer_thread_unprinted() -> Iterator[None]:
    """tensorboard's writer thread keeps the error of a write it could not do (a full disk, a
    file-size limit), which the writer raises at its next call here, in one line naming the
    folder (`writing`); the dying thread printed it first too, a traceback ("Exception in thread
    Thread-1") above that line. Other threads' errors are printed as before."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        # Its thread class keeps what it raised as `exception`, which the writer's calls raise again.
        if not (type(args.thread).__module__.startswith("tensorboard.")
                and args.exc_value is getattr(args.thread, "exception", None)):
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        if threading.excepthook is hook:  # not put back over a hook installed since
            threading.excepthook = previous


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
