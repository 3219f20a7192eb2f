"""Training throughput and memory: one optimizer step (forward, backward, AdamW) of gpt1's `GPT`
against `transformers`' `GPT2LMHeadModel` built with the same config, on the same batch, with
the same precision and optimizer, measured in the same run and reported as a ratio.

- GPU (full run): the reference model (257M parameters, 512 context) at the shipped recipe's
  micro-batch (`gpt1-openwebtext`'s batch_size), in its precision (bf16 autocast, fp16-mixed
  where the card has no bf16), eager and `torch.compile`d. Peak memory is
  `torch.cuda.max_memory_allocated` at a step of each side, less what the GPU held before that
  side was built (the other side's weights and optimizer state): each side as if alone on the GPU.
- CPU (full run): the `small` preset at 4 x 256 tokens, fp32 and bf16 autocast (`quick`: the
  `tiny` preset). Peak memory is the peak RSS (VmHWM, in GB of 10**9 bytes) of a fresh process doing the
  same steps: a subprocess per measurement, which imports both sides' libraries (transformers'
  GPT-2 alone adds ~0.16 GB), so that the two columns differ by what the steps hold. Not
  `getrusage`'s ru_maxrss, which Linux carries from a parent into the child it starts (across
  exec): each child reported the parent's peak whenever that was higher.
  The full CPU run also measures the peak RSS of a 257M (`gpt1`) step at 4 x 512 with gpt1's
  chunked output layer + loss against the full-logits `F.cross_entropy` it replaced. CPU runs
  use the allocator setting of gpt1's training loop (`gpt1.core.malloc`), both sides alike.

The two sides' steps alternate and the time is the median of the measured steps, so that a
busy machine slows both alike. MFU is the honest one of `GPT.flops_per_token` (matmuls that
run) against the card's peak (`gpt1.train.mfu.PEAK_FLOPS`); "TFLOP/s" is the same FLOP count
per second, also shown on CPUs, which have no entry in the peak table.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt1.benchmarks import progress
from gpt1.core.atomic import write_text
from gpt1.core.config import ModelConfig
from gpt1.core.errors import Gpt1Error
from gpt1.core.imports import without_torchao_notices
from gpt1.core.malloc import keep_freed_memory
from gpt1.core.model import GPT
from gpt1.core.tokenizer import EOS, SPECIAL_TOKENS
from gpt1.train.config import TrainConfig, load_config
from gpt1.train.mfu import peak_flops
from gpt1.train.precision import autocast, resolve_precision, use_float8_matmuls

REQUIRES = {"transformers": "'gpt1[hf]'"}  # module -> what installs it, checked by `gpt1 bench` up front
IMPLEMENTATIONS = ("gpt1", "transformers", "gpt1-full-logits", "gpt1-float8")  # what _training_step builds


def _hf_model(config: ModelConfig):
    """transformers' GPT-2 at its fastest for this math: sdpa attention and its fused tanh GELU
    (the "gelu_new" an earlier version used runs eight ops and keeps three more tensors for the
    backward: most of gpt1's measured CPU lead, 1.04x of 1.13x, and a GB of memory on a GPU)."""
    with without_torchao_notices():
        from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, n_inner=config.mlp_hidden, activation_function="gelu_pytorch_tanh",
        layer_norm_epsilon=config.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=config.tie_embeddings, attn_implementation="sdpa",
        bos_token_id=SPECIAL_TOKENS.index(EOS), eos_token_id=SPECIAL_TOKENS.index(EOS)))  # GPT-2 defaults (50256) lie outside small vocabularies


def _training_step(impl: str, config: ModelConfig, batch_size: int, device: torch.device, precision: str,
                   compile: bool = False):
    """A closure doing one optimizer step of `impl` on a fixed random batch."""
    if impl not in IMPLEMENTATIONS:  # a misspelt name would time plain gpt1 under its label
        raise ValueError(f"unknown implementation {impl!r}; expected one of {', '.join(IMPLEMENTATIONS)}")
    torch.manual_seed(0)
    x = torch.randint(3, config.vocab_size, (batch_size, config.block_size + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]
    model = (_hf_model(config) if impl == "transformers" else GPT(config)).to(device).train()
    if impl == "gpt1-float8":
        use_float8_matmuls(model, device)
    # Fused AdamW on both sides: gpt1's loop uses it on CUDA and CPU, and so does transformers'
    # Trainer by default (optim="adamw_torch_fused" with torch >= 2.8).
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16-mixed")
    forward = torch.compile(model) if compile else model

    def loss_of_batch() -> torch.Tensor:
        if impl == "transformers":
            return forward(input_ids=inputs, labels=inputs).loss  # shifts the labels inside (T - 1 predictions)
        if impl == "gpt1-full-logits":  # the output layer and loss gpt1 had before its chunked loss
            logits = forward(inputs)
            return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return forward(inputs, targets)[1]

    def step() -> None:
        with autocast(device, precision):
            loss = loss_of_batch()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def _median_seconds(steps: dict, n_warmup: int, n_steps: int, device: torch.device) -> dict[str, float]:
    """Median seconds per step of each closure, the closures taking turns."""
    return {name: statistics.median(t) for name, t in _step_seconds(steps, n_warmup, n_steps, device).items()}


def _step_seconds(steps: dict, n_warmup: int, n_steps: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each step of each closure, the closures taking turns (after `n_warmup` each)."""
    for _ in range(n_warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(n_steps):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return times


def _steps_and_peaks_cuda(impls: tuple[str, ...], config: ModelConfig, batch_size: int, device: torch.device,
                          precision: str, compile: bool) -> tuple[dict, dict[str, float]]:
    """Each side's step closure, built one after the other, and the GB it allocates at the peak
    of a step (after two steps, so that the optimizer state exists and compilation is done): what
    the GPU holds at that peak less what it held before the side was built, which is the other
    sides' weights and optimizer state, untouched by this side's step. So each side is compiled
    once, and measured as if it were alone on the GPU."""
    steps, peaks = {}, {}
    for impl in impls:
        before = torch.cuda.memory_allocated(device)
        steps[impl] = step = _training_step(impl, config, batch_size, device, precision, compile)
        step()
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize()
        peaks[impl] = (torch.cuda.max_memory_allocated(device) - before) / 1e9
    return steps, peaks


def peak_rss_gb(impl: str, preset: str, batch_size: int, block_size: int, precision: str,
                steps: int = 2) -> float | None:
    """Peak RSS (GB, 10**9 bytes, as the GPU rows) of a fresh process doing `steps` CPU training
    steps of `impl` (see the module docstring); None where the OS does not say (no /proc)."""
    code = ("from gpt1.benchmarks.train import _child_steps; "
            f"_child_steps({impl!r}, {preset!r}, {batch_size}, {block_size}, {precision!r}, {steps})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:  # e.g. killed for memory: its last line says why, not a CalledProcessError
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise Gpt1Error(f"train benchmark: the peak-memory process ({impl}, {preset}, {precision}) failed: {why}")
    kib = json.loads(done.stdout.strip().splitlines()[-1])
    return None if kib is None else kib * 1024 / 1e9


def _peak_rss_kib() -> int | None:
    """This process's peak RSS since it started (Linux: VmHWM, which belongs to the address space
    and starts afresh at exec, unlike ru_maxrss)."""
    try:
        with open("/proc/self/status", "rb") as f:  # bytes: its Name: line may cut a character in two
            return next((int(line.split()[1]) for line in f if line.startswith(b"VmHWM:")), None)
    except OSError:
        return None


def _child_steps(impl: str, preset: str, batch_size: int, block_size: int, precision: str, steps: int) -> None:
    with without_torchao_notices():
        from transformers import GPT2LMHeadModel  # noqa: F401 - both sides' libraries, whichever side runs

    keep_freed_memory()
    config = ModelConfig.preset(preset, block_size=block_size)
    step = _training_step(impl, config, batch_size, torch.device("cpu"), precision)
    for _ in range(steps):
        step()
    print(json.dumps(_peak_rss_kib()))


def _row(config: ModelConfig, batch_size: int, device: torch.device, precision: str, seconds: dict,
         memory: dict, mode: str) -> dict:
    tokens = batch_size * config.block_size
    with torch.device("meta"):
        flops = GPT(config).flops_per_token(config.block_size)
    peak = peak_flops(device)
    ours, theirs = tokens / seconds["gpt1"], tokens / seconds["transformers"]
    return {"model": f"{config.n_layer}x{config.n_embd}, vocab {config.vocab_size:,}", "device": device.type,
            "precision": precision, "mode": mode, "batch": f"{batch_size}x{config.block_size}",
            "gpt1 tok/s": ours, "transformers tok/s": theirs, "ratio": ours / theirs,
            "gpt1 TFLOP/s": flops * ours / 1e12, "gpt1 MFU": flops * ours / peak if peak else None,
            "gpt1 peak GB": memory.get("gpt1"), "transformers peak GB": memory.get("transformers")}


def measure(config: ModelConfig, batch_size: int, device: torch.device, precision: str, n_warmup: int,
            n_steps: int, compile: bool = False, preset: str | None = None) -> dict:
    impls = ("gpt1", "transformers")
    if device.type == "cuda":
        steps, memory = _steps_and_peaks_cuda(impls, config, batch_size, device, precision, compile)
        n_warmup = 1  # three steps each already
    else:
        # Both sides' memory processes at once: each measures its own peak, and together they
        # take half the wall time (mostly imports) of one after the other.
        with ThreadPoolExecutor(len(impls)) as pool:
            peaks = {impl: pool.submit(peak_rss_gb, impl, preset, batch_size, config.block_size, precision)
                     for impl in impls}
            memory = {impl: peak.result() for impl, peak in peaks.items()}
        steps = {impl: _training_step(impl, config, batch_size, device, precision, compile) for impl in impls}
    times = _step_seconds(steps, n_warmup, n_steps, device)
    del steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    seconds = {name: statistics.median(t) for name, t in times.items()}
    row = _row(config, batch_size, device, precision, seconds, memory, "compiled" if compile else "eager")
    # The ratio of each pair of steps (taken in turn): how far one row's ratio can be trusted on a loaded machine.
    pairs = [theirs / ours for ours, theirs in zip(times["gpt1"], times["transformers"])]
    row["ratio range"] = f"{min(pairs):.2f}-{max(pairs):.2f}"
    progress("train", row)
    return row


def memory_rows(preset: str, batch_size: int, block_size: int) -> list[dict]:
    """Peak RSS of a CPU fp32 step with the chunked loss against the full logits (subprocesses)."""
    full = peak_rss_gb("gpt1-full-logits", preset, batch_size, block_size, "fp32")
    chunked = peak_rss_gb("gpt1", preset, batch_size, block_size, "fp32")
    return [{"model": preset, "device": "cpu", "precision": "fp32", "batch": f"{batch_size}x{block_size}",
             "peak RSS GB, full logits": full, "peak RSS GB, chunked loss": chunked,
             "saved GB": full - chunked if full is not None and chunked is not None else None}]


def _setup(quick: bool) -> tuple[torch.device, ModelConfig, int, str]:
    """Device, model config, micro-batch and precision of the full (GPU: the recipe's) run."""
    if torch.cuda.is_available() and not quick:
        device = torch.device("cuda")
        recipe = load_config(TrainConfig, "gpt1-openwebtext")
        return (device, ModelConfig.preset(recipe.model, block_size=recipe.block_size), recipe.batch_size,
                resolve_precision(recipe.precision, device))
    return torch.device("cpu"), ModelConfig.preset("tiny" if quick else "small"), 4, "fp32"


def run(quick: bool = False) -> list[dict]:
    device, config, batch_size, precision = _setup(quick)
    if device.type == "cuda":
        rows = []
        for compile in (False, True):
            try:
                rows.append(measure(config, batch_size, device, precision, n_warmup=3, n_steps=10, compile=compile))
            except Exception as e:  # noqa: BLE001 - e.g. a compiler missing on this machine: keep the eager row
                if not compile:
                    raise
                rows.append({"mode": "compiled", "error": f"{type(e).__name__}: {e}"[:300]})
                progress("train", rows[-1])
        return rows
    keep_freed_memory()  # as gpt1's training loop runs on a CPU; both sides alike
    preset = "tiny" if quick else "small"
    n_warmup, n_steps = (1, 3) if quick else (2, 7)
    rows = [measure(config, batch_size, device, precision, n_warmup, n_steps, preset=preset)
            for precision in ("fp32", "bf16-mixed")]
    if not quick:
        rows += memory_rows("gpt1", 4, 512)
    return rows


def micro_batch_rows(quick: bool = False, sizes: tuple[int, ...] | None = None) -> list[dict]:
    """gpt1's training step alone at several micro-batches (issue 13's "tuned micro-batch"): on a
    GPU the recipe's batch_size and 2x and 4x it (the same optimizer step with grad_accum 1/2 and
    1/4 as large), compiled, in the recipe's precision; `quick` or a CPU: `tiny` at 2 and 4, eager.
    A row per size with tokens/s, honest MFU and peak GB (GPU), or the error (e.g. out of memory)."""
    device, config, batch_size, precision = _setup(quick)
    cuda = device.type == "cuda"
    sizes = sizes or ((batch_size, 2 * batch_size, 4 * batch_size) if cuda else (2, 4))
    with torch.device("meta"):
        flops = GPT(config).flops_per_token(config.block_size)
    peak = peak_flops(device)
    rows = []
    for size in sizes:
        row = {"model": f"{config.n_layer}x{config.n_embd}, vocab {config.vocab_size:,}", "device": device.type,
               "precision": precision, "mode": "compiled" if cuda else "eager", "micro-batch": f"{size}x{config.block_size}"}
        try:
            if cuda:
                steps, memory = _steps_and_peaks_cuda(("gpt1",), config, size, device, precision, compile=True)
            else:
                steps, memory = {"gpt1": _training_step("gpt1", config, size, device, precision)}, {}
            tokens_per_s = size * config.block_size / _median_seconds(steps, 1, 3 if quick else 8, device)["gpt1"]
            row |= {"tok/s": tokens_per_s, "MFU": flops * tokens_per_s / peak if peak else None,
                    "peak GB": memory.get("gpt1")}
            del steps
        except torch.OutOfMemoryError as e:
            row["error"] = f"out of memory: {e}"[:200]
        if cuda:
            torch.cuda.empty_cache()
        rows.append(row)
        progress("train", row)
    return rows


def float8_rows(quick: bool = False) -> list[dict]:
    """gpt1's training step with its blocks' matmuls in FP8 (`float8=true`) against the same step in
    bf16, taking turns in the same run: on a GPU the recipe's shape and micro-batch, compiled (FP8
    pays only with its casts fused); `quick` or a CPU: `tiny` at 4 x 128, eager (a dry run: a CPU
    has no FP8 units). One row: both tokens/s, the ratio, honest MFU against the card's bf16 peak
    (as torchtitan reports it; FP8's own peak is twice that) and peak GB (GPU); or the error."""
    device, config, batch_size, _ = _setup(quick)
    cuda = device.type == "cuda"
    precision = "bf16-mixed"  # what float8=true runs beside
    impls = ("gpt1", "gpt1-float8")
    with torch.device("meta"):
        flops = GPT(config).flops_per_token(config.block_size)
    peak = peak_flops(device)
    row = {"model": f"{config.n_layer}x{config.n_embd}, vocab {config.vocab_size:,}", "device": device.type,
           "mode": "compiled" if cuda else "eager", "batch": f"{batch_size}x{config.block_size}"}
    try:
        if cuda:
            steps, memory = _steps_and_peaks_cuda(impls, config, batch_size, device, precision, compile=True)
        else:
            steps, memory = {impl: _training_step(impl, config, batch_size, device, precision) for impl in impls}, {}
        seconds = _median_seconds(steps, 1, 3 if quick or not cuda else 10, device)
        bf16, fp8 = (batch_size * config.block_size / seconds[impl] for impl in impls)
        row |= {"bf16 tok/s": bf16, "float8 tok/s": fp8, "ratio": fp8 / bf16,
                "bf16 MFU": flops * bf16 / peak if peak else None, "float8 MFU": flops * fp8 / peak if peak else None,
                "bf16 peak GB": memory.get("gpt1"), "float8 peak GB": memory.get("gpt1-float8")}
        del steps
    except Exception as e:  # noqa: BLE001 - e.g. torchao missing or too old for this torch: say so, in the row
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    if cuda:
        torch.cuda.empty_cache()
    progress("train", row)
    return [row]


def profile_steps(out: str | Path, quick: bool = False, compile: bool | None = None, steps: int = 3,
                  rows: int = 40) -> list[Path]:
    """Where each side's training step spends its time: a `torch.profiler` table (the top `rows`
    operators and kernels by self time on the device, summed over `steps` steps) of gpt1's and
    transformers' step at the full run's shapes, written to `out/train-profile-{gpt1,transformers}.txt`.
    `compile`: torch.compile both sides (default: on a GPU, where the gap to study is the
    compiled one). Returns the files."""
    from torch.profiler import ProfilerActivity, profile

    device, config, batch_size, precision = _setup(quick)
    compile = device.type == "cuda" if compile is None else compile
    cuda = device.type == "cuda"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for impl in ("gpt1", "transformers"):
        step = _training_step(impl, config, batch_size, device, precision, compile)
        for _ in range(3):  # compilation, the optimizer's state, the allocator
            step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            if cuda:
                torch.cuda.synchronize()
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        header = (f"{impl}: {steps} training steps, {config.n_layer}x{config.n_embd} vocab {config.vocab_size:,}, "
                  f"batch {batch_size}x{config.block_size}, {precision}, {'compiled' if compile else 'eager'}, "
                  f"on {torch.cuda.get_device_name() if cuda else 'cpu'}\n")
        files.append(path := out / f"train-profile-{impl}.txt")
        write_text(path, header + prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=80))
        progress("train", {"profile": str(path)})
        del step, prof
        if cuda:
            torch.cuda.empty_cache()
    return files
