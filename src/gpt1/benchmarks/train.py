"""Training throughput: tokens/s of one optimizer step (forward, backward, AdamW) of gpt1's
`GPT` against `transformers`' `GPT2LMHeadModel` built with the same config, the same batch,
the same precision and optimizer, measured in the same run and reported as a ratio.

The full run uses the reference model (257M parameters, 512 context, batch 8, bf16 autocast)
on a GPU and the `small` preset on a CPU; `quick` uses the `tiny` preset on the CPU.
Each side runs warmup steps first; the time is the median of the measured steps.
"""

from __future__ import annotations

import statistics
import time

import torch

from gpt1.core.config import ModelConfig
from gpt1.core.model import GPT
from gpt1.core.tokenizer import EOS, SPECIAL_TOKENS
from gpt1.train.precision import autocast


def _hf_model(config: ModelConfig):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, n_inner=config.mlp_hidden, activation_function="gelu_new",
        layer_norm_epsilon=config.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=config.tie_embeddings, attn_implementation="sdpa",
        bos_token_id=SPECIAL_TOKENS.index(EOS), eos_token_id=SPECIAL_TOKENS.index(EOS)))  # GPT-2 defaults (50256) lie outside small vocabularies


def _steps_per_second(step, n_warmup: int, n_steps: int, device: torch.device) -> float:
    for _ in range(n_warmup):
        step()
    times = []
    for _ in range(n_steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1.0 / statistics.median(times)


def measure(config: ModelConfig, batch_size: int, device: torch.device, precision: str,
            n_warmup: int, n_steps: int) -> dict:
    torch.manual_seed(0)
    x = torch.randint(3, config.vocab_size, (batch_size, config.block_size + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]
    ours = GPT(config).to(device).train()
    theirs = _hf_model(config).to(device).train()
    fused = device.type == "cuda"
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=fused)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4, fused=fused)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16-mixed")

    def step_ours():
        with autocast(device, precision):
            _, loss = ours(inputs, targets)
        scaler.scale(loss).backward()
        scaler.step(opt_ours)
        scaler.update()
        opt_ours.zero_grad(set_to_none=True)

    def step_theirs():
        with autocast(device, precision):
            loss = theirs(input_ids=inputs, labels=inputs).loss  # shifts labels inside (T - 1 predictions)
        scaler.scale(loss).backward()
        scaler.step(opt_theirs)
        scaler.update()
        opt_theirs.zero_grad(set_to_none=True)

    tokens = batch_size * config.block_size
    ours_tps = tokens * _steps_per_second(step_ours, n_warmup, n_steps, device)
    theirs_tps = tokens * _steps_per_second(step_theirs, n_warmup, n_steps, device)
    return {"model": f"{ours.num_params() / 1e6:.1f}M", "device": device.type, "precision": precision,
            "batch": f"{batch_size}x{config.block_size}", "gpt1 tok/s": ours_tps,
            "transformers tok/s": theirs_tps, "ratio": ours_tps / theirs_tps}


def run(quick: bool = False) -> list[dict]:
    if torch.cuda.is_available() and not quick:
        device = torch.device("cuda")
        precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "fp16-mixed"
        return [measure(ModelConfig.preset("gpt1"), 8, device, precision, n_warmup=3, n_steps=10)]
    device = torch.device("cpu")
    if quick:
        return [measure(ModelConfig.preset("tiny"), 4, device, "fp32", n_warmup=2, n_steps=5)]
    return [measure(ModelConfig.preset("small"), 4, device, "fp32", n_warmup=2, n_steps=5)]
