"""CPU decode speed: gpt1's `generate` against llama.cpp (through llama-cpp-python) running the
same model exported with `gpt1 export --format gguf`, greedy, one sequence, same prompt, same
number of threads, measured in the same run.

Decode tokens/s leaves the prompt out: each side is timed generating `new_tokens` tokens and
generating 1 token from the same prompt, and the difference is the time of the other
`new_tokens - 1`. The model has random weights with the special tokens pushed down (see
`gpt1.benchmarks.generate`), so both sides generate every token asked for. Full run: the
`small` preset (6x384, 8k vocab); quick: `tiny`. Times are the best of `repeats` runs.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

import torch

from gpt1.benchmarks import fixed_threads
from gpt1.benchmarks.generate import benchmark_model, synthetic_tokenizer
from gpt1.core.config import ModelConfig
from gpt1.core.sampling_params import SamplingParams
from gpt1.core.tokenizer import SPECIAL_TOKENS
from gpt1.formats.gguf import export_gguf
from gpt1.formats.modeldir import save_model
from gpt1.inference.generate import generate

# module -> what installs it, checked by `gpt1 bench` up front: the reference, and the export it reads
REQUIRES = {"llama_cpp": "llama-cpp-python", "gguf": "'gpt1[gguf]'"}


def cpu_has_amx() -> bool:
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text(errors="replace").split()
    except OSError:  # not Linux: no /proc
        return False


def open_llama(llama_cpp, path: Path, **kwargs):
    """`llama_cpp.Llama(model_path=path, **kwargs)`, with llama.cpp's weight repacking off on CPUs with
    AMX (llama.cpp's `--no-repack`). There its AMX q8_0 matmul segfaults in the first decode on
    small models like these (llama-cpp-python 0.3.36 on an Intel Xeon, 2026-12-05; the file reads
    fine without repacking; llama.cpp issue #20824). llama-cpp-python has no argument for it, so
    the default model parameters are wrapped while the model loads."""
    low_level = llama_cpp.llama_cpp
    with contextlib.ExitStack() as stack:
        if cpu_has_amx() and "use_extra_bufts" in dict(low_level.llama_model_params._fields_):
            defaults = low_level.llama_model_default_params

            def without_repacking():
                params = defaults()
                params.use_extra_bufts = False
                return params

            low_level.llama_model_default_params = without_repacking
            stack.callback(setattr, low_level, "llama_model_default_params", defaults)
        return llama_cpp.Llama(model_path=str(path), **kwargs)


def _best(fn, repeats: int) -> tuple[float, list[int]]:
    best, result = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _decode_rate(generate_n, new_tokens: int, repeats: int) -> tuple[float, list[int]]:
    """(decode tokens/s, the tokens) of `generate_n(n)`, the prompt's prefill subtracted."""
    generate_n(new_tokens)  # warm-up: allocations, caches
    full, tokens = _best(lambda: generate_n(new_tokens), repeats)
    first, _ = _best(lambda: generate_n(1), repeats)
    return (new_tokens - 1) / max(full - first, 1e-9), tokens


def run(quick: bool = False) -> list[dict]:
    import llama_cpp

    config = ModelConfig.preset("tiny" if quick else "small")
    prompt_len, new_tokens, repeats = (32, 32, 2) if quick else (128, 128, 3)
    # One thread, and (full run) every thread torch uses: llama.cpp's threads wait for each
    # other by spinning, so on a machine busy with other work its multi-thread numbers
    # collapse (observed: 1,500 tokens/s on 1 thread, 4 on 2); one thread is the robust figure.
    all_threads = torch.get_num_threads()
    thread_counts = [1] if quick else sorted({1, all_threads})
    tokenizer = synthetic_tokenizer(config.vocab_size)
    model = benchmark_model(config, tokenizer.special_ids, torch.device("cpu"))
    prompt = torch.randint(len(SPECIAL_TOKENS), config.vocab_size, (prompt_len,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    label = f"{config.n_layer}x{config.n_embd} ({model.num_params() / 1e6:.0f}M)"

    def ours(n: int) -> list[int]:
        return generate(model, tokenizer, prompt, SamplingParams(temperature=0, max_new_tokens=n)).token_ids

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        save_model(Path(tmp) / "model", model, tokenizer)
        files = {t: export_gguf(Path(tmp) / "model", Path(tmp) / f"model-{t}.gguf", t) for t in ("f32", "f16", "q8_0")}
        try:
            for threads in thread_counts:
                torch.set_num_threads(threads)
                with fixed_threads():  # gpt1's side on `threads`, as llama.cpp's: its tuner off
                    rate, reference = _decode_rate(ours, new_tokens, repeats)
                group = [{"implementation": "gpt1 generate", "type": "f32", "tokens_per_s": rate}]
                for out_type, path in files.items():
                    rate, tokens = _llama_cpp_rate(llama_cpp, path, config, prompt, threads, new_tokens, repeats)
                    group.append({"implementation": "llama.cpp (llama-cpp-python)", "type": out_type,
                                  "tokens_per_s": rate, "same_tokens_as_gpt1": tokens == reference})
                for row in group:
                    row.update(model=label, threads=threads, prompt=prompt_len, new_tokens=new_tokens,
                               ratio_to_gpt1=row["tokens_per_s"] / group[0]["tokens_per_s"])
                rows += group
        finally:
            torch.set_num_threads(all_threads)
    return rows


def _llama_cpp_rate(llama_cpp, path: Path, config: ModelConfig, prompt: list[int], threads: int,
                    new_tokens: int, repeats: int) -> tuple[float, list[int]]:
    llm = open_llama(llama_cpp, path, n_ctx=config.block_size, n_threads=threads, n_threads_batch=threads,
                     verbose=False)

    def theirs(n: int) -> list[int]:
        llm.reset()  # no prompt-prefix cache between runs: the prompt is evaluated every time, as in gpt1
        out = []
        for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(token)
            if len(out) == n:
                break
        return out

    try:
        return _decode_rate(theirs, new_tokens, repeats)
    finally:
        llm.close()
