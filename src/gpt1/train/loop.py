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
with `cfg.keep_best` its model is kept in `RUN/best` (`gpt1.train.keep_best`). With
`cfg.early_stop` = N, N validations in a row that do not lower it end the run at that step,
which then counts as its last (a rerun is that of a finished run; the checkpoint keeps that
early_stop ended it, for the last line). `cfg.keep_checkpoints`: how many of the newest checkpoints
are kept. A step whose loss or gradient norm is not finite is skipped, and too many stop the run
(`gpt1.train.bad_steps`); a validation or checkpoint due at it still runs when the weights are
finite (the skipped step did not touch them), else a warning names the last good checkpoint.
The LR schedule and the tokens seen count skipped steps.
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
load (`gpt1.core.threads`; each step's count in `metrics.jsonl`). MFU: see `gpt1.train.mfu`.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import torch

from gpt1.core.constants import IGNORE_INDEX
from gpt1.core.crash_points import crash_point
from gpt1.core.environment import environment
from gpt1.core.errors import Gpt1Error, first_line, is_compile_error
from gpt1.core.locks import exclusive
from gpt1.core.malloc import freed_memory_kept
from gpt1.core.paths import OWN_FILES, OWN_FOLDERS, check_within
from gpt1.core.progress import info, progress, warn
from gpt1.core.threads import cpu_thread_tuner
from gpt1.core.write_errors import writing
from gpt1.train import checkpoint as ckpt
from gpt1.train import distributed
from gpt1.train.bad_steps import SkippedSteps, what_was_not_finite, why_skipped
from gpt1.train.budget import PLOT_SECONDS, SAVE_RATE, RunRate, TimeBudget, duration
from gpt1.train.config import TrainConfig
from gpt1.train.evaluate import evaluate_loss, perplexity
from gpt1.train.keep_best import BEST_DIR, LowestValidation
from gpt1.train.metrics_file import trim_metrics
from gpt1.train.mfu import PEAK_FLOPS, peak_flops  # noqa: F401 - PEAK_FLOPS: this module's name before it moved
from gpt1.train.optim import build_optimizer
from gpt1.train.precision import autocast, resolve_precision, use_float8_matmuls
from gpt1.train.run_log import (
    METRICS_FILE,
    PLOT_FILE,
    TENSORBOARD_DIR,
    close_tensorboard,
    fmt,
    open_tensorboard,
    plot_loss,
    writer_thread_unprinted,
)
from gpt1.train.run_record import CONFIG_FILE, RUN_LOCK, RunRecord, check_run_dir, refuse_other_files
from gpt1.train.schedule import BudgetSchedule, lr_at

__all__ = ["BatchSource", "TrainResult", "train", "IGNORE_INDEX", "METRICS_FILE", "CONFIG_FILE", "BEST_DIR",
           "peak_flops", "step_cap_words"]


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
            for name in sorted((OWN_FILES | OWN_FOLDERS | {PLOT_FILE, BEST_DIR, TENSORBOARD_DIR}) - {ckpt.CHECKPOINTS_DIR}):
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
            if skipped := why_skipped(loss, grad_norm, fp16=run.scaler.is_enabled()):
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
        self.lowest = LowestValidation(run_dir, cfg, save_model, dist)  # and its model in RUN/best (keep_best)
        self.early_stopped: bool | None = False  # early_stop ended the run (None: an older gpt1's checkpoint, unsaid)
        # Whether a step changed the weights since the last validation: one due after skipped steps
        # alone would measure the same weights again (and count against early_stop: two NaN batches
        # ended a run as "no longer improving").
        self.applied_since_validation = True
        self.skips = SkippedSteps(cfg.max_bad_steps, run_dir, self.precision)  # in a row, and fp16's overflows
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
        self.lowest.load_state_dict(state)
        # An older gpt1's checkpoint does not say: a run with steps left was not ended; a finished one, unsaid (None).
        self.early_stopped = state.get("early_stopped", None if self.start_step >= self.end else False)
        self.skips.load_state_dict(state)
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
        `continues`), settle RUN/best with the resume (`LowestValidation.resume`), and drop the metric lines
        a killed run logged after its last checkpoint; then wrap the model for the steps (DDP with
        torchrun, torch.compile with compile=true). A rerun of a finished run (at most writing the
        outputs a kill left unwritten) changes nothing in the run dir: its record, metrics and event
        log stay as the run left them."""
        self.finished = self.start_step >= self.end
        if not self.finished:
            self.lowest.resume(self.start_step, self.record)
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
        with writer_thread_unprinted() if cfg.tensorboard and logs else contextlib.nullcontext():
            try:
                if cfg.tensorboard and logs:
                    with writing(self.run_dir / TENSORBOARD_DIR):  # its first event is written at once
                        self.writer = open_tensorboard(self.run_dir, self.start_step)
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
                        close_tensorboard(self.writer)
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
                        close_tensorboard(self.writer)

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
        """Step `done`, `skipped` (see `why_skipped`): its gradients dropped, the weights untouched; its
        line of metrics.jsonl. The run stops after `cfg.max_bad_steps` in a row, or where it ends skipping."""
        self.optimizer.zero_grad(set_to_none=True)
        scale = None
        if self.scaler.is_enabled():
            # Closes this step's unscale_ at the scale it ran at (its growth count kept): the loss was
            # NaN/inf before it was scaled, so the scale did not cause it. Backed off (`update()`
            # reads the gradients' inf/NaN as an overflow), a NaN loss on every third batch halved
            # it to 6e-11 in 150 steps, where the blocks' gradients underflow to 0.
            scale = self.scaler.get_scale()
            self.scaler.update(scale)
        self.skips.skipped(done, skipped, self.end, scale)
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
            self.skips.overflowed(done, self.scaler.get_scale(), self.scaler.get_backoff_factor())
        else:
            self.skips.applied()
            self.applied_since_validation = True

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
        skipped step (`skipped`, see `why_skipped`) too where the weights are finite, as the step left
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
        improved = self.lowest.validated(done, val_loss, self.raw_model)
        best = self.lowest.best
        if best["step"] is not None:
            metric.update(best_val_loss=best["val_loss"], best_step=best["step"])
        self._timed("validation", time.perf_counter() - began)  # RUN/best's write counts as the validation's
        if self.dist.is_main:  # a line of its own: a log off a terminal has every validation, not the bar's last
            info(f"step {done:,}: val loss {fmt(val_loss)}, perplexity {fmt(perplexity(val_loss), '.2f')}"
                 + self.lowest.words(improved))
        if self.lowest.stops_early(done, self.end):
            self.end = done  # the last step: its checkpoint is saved now, and a rerun finds the run finished
            self.early_stopped = True  # what ended it, for its last line (a time budget may end a run at that step too)
            self.bar.total = done

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
        run dir's model from it. After a skipped step (`skipped`, see `why_skipped`) only where the
        weights are finite, as the step left them; else a warning."""
        if not _save_due(done, self.cfg.save_every, self.end):
            return
        if skipped and not self._finite_weights():
            if self.dist.is_main:
                warn(f"step {done:,}: no checkpoint saved: the {what_was_not_finite(skipped)} and the weights are not finite; "
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
                 **self.lowest.state_dict(),
                 **self.skips.state_dict(),
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
                             best_step=self.lowest.best["step"], best_val_loss=self.lowest.best["val_loss"],
                             budget_spent_before=self.budget.spent_before if self.budget else None)
        if self.dist.is_main:
            if self.finished:
                info(f"{run_dir} already finished its {end:,} steps; nothing to do")
            info(f"done: {end:,} steps ({self._ended_by()}), {self.tokens_seen:,} tokens; train loss "
                 f"{fmt(result.train_loss)}, val loss {fmt(val)}, val perplexity {fmt(result.val_perplexity, '.2f')}"
                 f"{self.lowest.done_words(end)}")
        return result

    def _ended_by(self) -> str:
        """What ended the run, for its last line: early_stop, its time budget, or its length (max_steps,
        or the max_tokens or epochs it was resolved from)."""
        cfg, end = self.cfg, self.end
        # Recorded when it fires; an older gpt1's checkpoint did not say: the count tells (a time budget that
        # ended the run at the validation where the count reached early_stop read as early_stop's doing).
        fired = self.early_stopped if self.early_stopped is not None else \
            end < self.max_steps and cfg.early_stop and self.lowest.since >= cfg.early_stop
        if fired:
            return f"ended by early_stop={cfg.early_stop}"
        budget = f"time_budget={cfg.time_budget:g} s"  # as the start said it (7.5 s read "8 s" here)
        if self.budget and end < self.max_steps:
            return f"ended by its {budget}: {self.budget_spent:.1f} s spent"
        return "its full length" + (f", within its {budget}" if self.budget else "")


def _provenance(cfg: TrainConfig, device: torch.device, precision: str, data_source: dict | None) -> dict:
    """What this invocation of a run ran on (train_config.json's `provenance`; never compared on
    resume): when and how it was started, the versions and the machine (`gpt1.core.environment`),
    the device as resolved and its name, the precision after its fallback (`resolve_precision`),
    whether it compiles (`note`d false with the error when compile falls back to eager), and the data's source."""
    return {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": list(sys.argv), **environment(), "device": str(device),
            **({"device_name": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}),
            "precision": precision, "compiled": cfg.compile, **({"data": data_source} if data_source else {})}


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
        plot_loss(run_dir)
    ckpt.mark_outputs_written(checkpoint, spent() if spent else None)


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
