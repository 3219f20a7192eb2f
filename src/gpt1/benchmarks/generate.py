"""Decode speed: gpt1's engine against recomputing the whole context for every token (nanoGPT's
`generate`) and against `transformers`' `GPT2LMHeadModel.generate` with the same weights
(on a GPU also with its static cache), greedy, measured in the same run and reported as
ratios: `gpt1_speedup` (the other's time over gpt1's) and `vs_gpt1_batch1` (the engine's
tokens/s at this batch size over its tokens/s for one sequence). The engine's rows also give
`step_ms` (its time per generated token, prefill included) and `forward_ms` (its decode forward
alone, timed back to back at mid-generation): the difference is the step's host-side work.

The model has random weights (speed does not depend on them) with the special tokens' output
rows pushed down, so that every run generates exactly `new_tokens` tokens. The full run uses
the reference model (257M parameters, bf16, batches 1 and 32) on a GPU and the `small` preset
(fp32, batches 1 and 16) on a CPU; `quick` uses the `tiny` preset. The engine is warm (on a
GPU its decode step is captured as CUDA graphs in the warm-up, and it is also measured
without them, and compiled by torch.compile before the capture). Times are the best of 3 runs
(1 for the slow recomputing baseline, run at batch 1 only).
"""

from __future__ import annotations

import gc
import itertools
import time

import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

from gpt1.benchmarks import fixed_threads, progress
from gpt1.core.config import ModelConfig
from gpt1.core.device import bf16_supported
from gpt1.core.imports import without_torchao_notices
from gpt1.core.model import GPT
from gpt1.core.sampling_params import SamplingParams
from gpt1.core.tokenizer import SPECIAL_TOKENS, UNK, Tokenizer, _byte_level_chars
from gpt1.formats.hf import hf_config_dict, to_hf_state_dict
from gpt1.inference.engine import Engine

REQUIRES = {"transformers": "'gpt1[hf]'"}  # module -> what installs it, checked by `gpt1 bench` up front


def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level tokenizer of exactly `vocab_size` tokens (the special tokens, the 256 bytes,
    then byte pairs, each with its merge) without training one: decoding is all a speed
    benchmark needs (and llama.cpp, reading the GGUF export, wants the merges)."""
    chars = _byte_level_chars()
    pairs = list(itertools.product(chars, chars))[:max(0, vocab_size - len(SPECIAL_TOKENS) - len(chars))]
    tokens = SPECIAL_TOKENS + chars + ["".join(p) for p in pairs]
    vocab = {t: i for i, t in enumerate(tokens[:vocab_size])}
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return Tokenizer(backend)


def benchmark_model(config: ModelConfig, special_ids: list[int], device: torch.device) -> GPT:
    """Random weights; feature 0 of the final LayerNorm is a constant that only the special
    tokens' output rows read, with a large negative weight: they never win. Without biases
    (`bias=False`) no feature is constant: the special rows are zero, a logit of 0, which a greedy
    step picks only if every other token's logit is negative (in practice never, at any width)."""
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        model.lm_head.weight[special_ids] = 0.0
        ln_f = model.transformer.ln_f
        if ln_f.bias is not None:
            ln_f.weight[0], ln_f.bias[0] = 0.0, 1.0
            model.lm_head.weight[:, 0] = 0.0
            model.lm_head.weight[special_ids, 0] = -100.0
    return model.to(device).eval()


def to_transformers(model: GPT, tokenizer: Tokenizer):
    """`GPT2LMHeadModel` with the same weights (the mapping of `gpt1 export`)."""
    with without_torchao_notices():
        from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(**hf_config_dict(model.config, tokenizer)))
    hf.load_state_dict(to_hf_state_dict(model), strict=not model.config.tie_embeddings)
    return hf.to(next(model.parameters()).device).eval()


def recompute_generate(model: GPT, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """nanoGPT's loop: the whole context through the model for every new token (greedy)."""
    with torch.inference_mode():
        for _ in range(new_tokens):
            next_id = model(idx, last_only=True)[:, -1].argmax(dim=-1, keepdim=True)  # as nanoGPT: head on the last position
            idx = torch.cat([idx, next_id], dim=1)
    return idx[:, -new_tokens:]


def _timed(fn, device: torch.device, repeats: int):
    """(best seconds, result) over `repeats` runs."""
    best, result = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def engine_generate(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Token ids of each prompt, all submitted at once to a warm engine and stepped to the end."""
    requests = engine.submit(prompts, params, lambda i: lambda item: None)
    while engine.busy:
        engine.step()
    return [r.state.token_ids for r in requests]


def decode_forward_ms(engine: Engine, batch: int, position: int, device: torch.device, repeats: int = 50) -> float:
    """Milliseconds of the engine's decode forward alone for `batch` rows at `position`."""
    ids, starts = [0] * batch, [position] * batch
    with torch.inference_mode():
        seconds, _ = _timed(lambda: [engine.decode_forward(ids, starts) for _ in range(repeats)], device, 3)
    return seconds / repeats * 1e3


def _measure(quick: bool) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    if quick:
        config, prompt_len, new_tokens, batches = ModelConfig.preset("tiny"), 32, 32, [1, 4]
    else:
        # Recomputing the context of the 257M model for every token takes hours on a CPU.
        config = ModelConfig.preset("gpt1" if gpu else "small")
        prompt_len, new_tokens, batches = 128, 256 if gpu else 128, [1, 32] if gpu else [1, 16]
    dtype = torch.bfloat16 if gpu and bf16_supported(device) else torch.float32
    repeats = 3
    tokenizer = synthetic_tokenizer(config.vocab_size)
    model = benchmark_model(config, tokenizer.special_ids, device).to(dtype)
    hf = to_transformers(model, tokenizer).to(dtype)
    params = SamplingParams(temperature=0, max_new_tokens=new_tokens)
    label = f"{config.n_layer}x{config.n_embd} ({model.num_params() / 1e6:.0f}M, {str(dtype).removeprefix('torch.')})"
    rows, batch1_tps = [], None
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        idx = torch.randint(len(SPECIAL_TOKENS), config.vocab_size, (batch, prompt_len), generator=g).to(device)
        prompts = idx.tolist()
        engines = {"gpt1 engine": Engine(model, tokenizer, max_batch=batch, max_queue=0, prefill_chunk=prompt_len * batch)}
        if gpu:
            engines["gpt1 engine (no CUDA graphs)"] = Engine(model, tokenizer, max_batch=batch, max_queue=0,
                                                             prefill_chunk=prompt_len * batch, cuda_graphs=False)
            # torch.compile, then captured: its bucket compiles in the warm-up call, untimed.
            engines["gpt1 engine (compiled)"] = Engine(model, tokenizer, max_batch=batch, max_queue=0,
                                                       prefill_chunk=prompt_len * batch, compile=True)

        def ours(engine: Engine):
            return torch.tensor(engine_generate(engine, prompts, params), device=device)

        def theirs(**kwargs):
            with torch.inference_mode():
                out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new_tokens,
                                  do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_id, **kwargs)
            return out[:, prompt_len:]

        implementations = {name: (lambda e=engine: ours(e)) for name, engine in engines.items()}
        implementations["transformers generate"] = theirs
        if gpu:  # the fast transformers path (a CUDA-graph-friendly cache); its default cache elsewhere
            implementations["transformers generate (static cache)"] = lambda: theirs(cache_implementation="static")
        if batch == 1:  # quadratic: minutes at larger batches
            implementations["recompute context (nanoGPT)"] = lambda: recompute_generate(model, idx, new_tokens)
        reference = None
        for name, fn in implementations.items():
            engine = engines.get(name)
            row = {"batch": batch, "implementation": name, "model": label, "device": device.type,
                   "prompt": prompt_len, "new_tokens": new_tokens}
            try:
                slow = name.startswith("recompute")
                if not slow:
                    fn()  # warm-up: kernels, allocator, graph capture, compilation
                seconds, tokens = _timed(fn, device, 1 if slow else repeats)
            except Exception as e:  # noqa: BLE001 - a reference that fails here is reported, not fatal
                if reference is None:
                    raise
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            else:
                reference = reference or (seconds, tokens)
                tps = batch * new_tokens / seconds
                if name == "gpt1 engine" and batch == 1:
                    batch1_tps = tps
                row |= {
                    "tokens_per_s": tps,
                    "gpt1_speedup": seconds / reference[0],
                    "vs_gpt1_batch1": tps / batch1_tps if name == "gpt1 engine" and batch1_tps else None,
                    "same_tokens_as_gpt1": bool(torch.equal(tokens.to(device), reference[1])),
                    "step_ms": seconds / new_tokens * 1e3 if engine else None,
                    "forward_ms": decode_forward_ms(engine, batch, prompt_len + new_tokens // 2, device) if engine else None,
                }
            progress("generate", row)
            rows.append(row)
    return rows


def run(quick: bool = False) -> list[dict]:
    with fixed_threads() as threads:
        rows = [{**row, "torch_threads": threads} for row in _measure(quick)]
    # Free the captured graphs and transformers' compiled generate now, not in the interpreter's
    # own teardown (a GPU run once hung there, after its table was printed).
    gc.collect()
    if torch.cuda.is_available():
        torch._dynamo.reset()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return rows
