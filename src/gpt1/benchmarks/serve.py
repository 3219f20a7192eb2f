"""Serving under load: N concurrent streaming chat clients against `gpt1 serve` on loopback.

The benchmark writes a model dir (random weights whose special tokens never win, so every
reply is exactly `max_tokens` long; the synthetic tokenizer of the generate benchmark),
starts `gpt1 serve` on it in a subprocess, and drives N = 1, 8, 32 clients (asyncio + httpx),
each sending its requests one after another with `stream: true`. Per request: time to the
first token (TTFT) and the total latency; per N: their p50/p99, the aggregate tokens/s and
the failures (any non-200, error event or missing `data: [DONE]`).

Reference, measured in the same run: the same requests generated one after another in this
process with `gpt1.inference.generate.stream` (no HTTP, no queue); `vs_direct` is the server's
aggregate tokens/s over that. The model is the `tiny` preset on a CPU and the reference
model (257M) on a GPU; `quick` is tiny with shorter replies and fewer requests. On a CPU the
server and the reference each use one PyTorch thread: the load generator needs a core too, and
a model this small gains nothing from more (on a busy machine OpenMP threads that wait for
each other make it several times slower).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import gpt1
from gpt1.benchmarks.generate import benchmark_model, synthetic_tokenizer
from gpt1.core.config import ModelConfig
from gpt1.core.errors import Gpt1Error
from gpt1.core.sampling_params import SamplingParams
from gpt1.formats.modeldir import save_model
from gpt1.inference.generate import chat_prompt_ids, stream

CLIENTS = (1, 8, 32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _messages(i: int) -> list[dict]:
    # Short: the synthetic tokenizer has no merges (a token per byte) and tiny's context is 128.
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Request {i}: the sea?"}]


async def _one_request(client, i: int, max_tokens: int) -> dict:
    """One streamed chat completion: ttft and latency in seconds, tokens, ok."""
    body = {"model": "bench", "messages": _messages(i), "max_tokens": max_tokens, "seed": i, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens, done = None, 0, False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return {"ok": False}
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return {"ok": False}
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if ttft is None and any(c["delta"].get("content") for c in event["choices"]):
                    ttft = time.perf_counter() - start
    except Exception:  # noqa: BLE001 - a transport error is a failed request, counted
        return {"ok": False}
    return {"ok": done and ttft is not None, "ttft": ttft, "latency": time.perf_counter() - start, "tokens": tokens}


async def _load(url: str, clients: int, per_client: int, max_tokens: int) -> tuple[list[dict], float]:
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(600)) as client:
        async def worker(c: int) -> list[dict]:
            return [await _one_request(client, c * per_client + r, max_tokens) for r in range(per_client)]

        start = time.perf_counter()
        results = await asyncio.gather(*(worker(c) for c in range(clients)))
        wall = time.perf_counter() - start
    return [r for rs in results for r in rs], wall


def _direct(model_dir: Path, requests: int, max_tokens: int) -> tuple[float, float]:
    """(tokens/s, median ttft in s) of the same requests generated in-process, one by one."""
    llm = gpt1.load(model_dir)
    tokens, ttfts = 0, []
    for i in range(-1, requests):  # request -1 is a warm-up
        if i == 0:
            tokens, start = 0, time.perf_counter()
        params = SamplingParams(max_new_tokens=max_tokens, seed=abs(i))
        ids, _ = chat_prompt_ids(llm.tokenizer, _messages(i), llm.config.block_size, params)
        t0, first = time.perf_counter(), None
        for chunk in stream(llm.model, llm.tokenizer, ids, params):
            if first is None and chunk.text:
                first = time.perf_counter() - t0
            tokens = tokens + chunk.completion_tokens if chunk.finish_reason else tokens
        ttfts += [first or 0.0] if i >= 0 else []
    return tokens / (time.perf_counter() - start), float(np.median(ttfts))


def _wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Gpt1Error(f"gpt1 serve exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise Gpt1Error(f"gpt1 serve did not answer {url}/health within {timeout:.0f} s")


def run(quick: bool = False) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = ModelConfig.preset("gpt1" if device == "cuda" and not quick else "tiny")
    max_tokens = 16 if quick else 64
    requests_per_n = 8 if quick else 32  # per N; each of the N clients sends requests_per_n / N (at least 1)
    tokenizer = synthetic_tokenizer(config.vocab_size)
    model = benchmark_model(config, tokenizer.special_ids, torch.device("cpu"))
    label = f"{config.n_layer}x{config.n_embd} ({model.num_params() / 1e6:.1f}M)"
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpt1-bench-serve-") as tmp:
        model_dir = save_model(Path(tmp) / "model", model, tokenizer)
        del model
        threads = torch.get_num_threads()
        if device == "cpu":
            torch.set_num_threads(1)
        try:
            direct_tps, direct_ttft = _direct(model_dir, 4 if quick else 8, max_tokens)
        finally:
            torch.set_num_threads(threads)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpt1", "serve", "--model", str(model_dir), "--port", str(port),
             "--log-level", "warning"],
            env={**os.environ, "GPT1_QUIET": "1", **({"OMP_NUM_THREADS": "1"} if device == "cpu" else {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_until_up(url, proc)
            asyncio.run(_load(url, 1, 1, max_tokens))  # warm-up
            for n in CLIENTS:
                per_client = max(1, requests_per_n // n)
                results, wall = asyncio.run(_load(url, n, per_client, max_tokens))
                ok = [r for r in results if r["ok"]]
                ttft = np.array([r["ttft"] for r in ok]) * 1000
                latency = np.array([r["latency"] for r in ok]) * 1000
                tps = sum(r["tokens"] for r in ok) / wall
                rows.append({
                    "clients": n, "requests": len(results), "failures": len(results) - len(ok),
                    "ttft_p50_ms": float(np.percentile(ttft, 50)) if ok else None,
                    "ttft_p99_ms": float(np.percentile(ttft, 99)) if ok else None,
                    "latency_p50_ms": float(np.percentile(latency, 50)) if ok else None,
                    "latency_p99_ms": float(np.percentile(latency, 99)) if ok else None,
                    "tokens_per_s": tps, "direct_tokens_per_s": direct_tps, "vs_direct": tps / direct_tps,
                    "direct_ttft_ms": direct_ttft * 1000,
                    "max_tokens": max_tokens, "model": label, "device": device,
                })
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return rows
