"""Serving under load: N concurrent streaming chat clients against `gpt1 serve` on loopback.

The benchmark writes a model dir (random weights whose special tokens never win, so every
reply is exactly `max_tokens` long; the synthetic tokenizer of the generate benchmark),
starts `gpt1 serve --max-batch 32` on it in a subprocess, and sends the same 32 greedy
requests (each its own prompt) with N = 1 (one after another), 16 and 32 clients (asyncio +
httpx, `stream: true`). Per request: time to the first token (TTFT) and the total latency;
per N: their p50/p99, the aggregate tokens/s, the failures (any non-200, error event or
missing `data: [DONE]`) and whether every reply equals its reply at N = 1.

Ratios, measured in the same run: `vs_sequential` is the aggregate tokens/s over that of N = 1
(issue 12's target: >= 3 at N = 16 on a 2-core CPU); `vs_inprocess_batch` is it over the same
32 requests decoded together in this process by the engine, without HTTP (target on a GPU:
>= 0.7 at N = 32). The model is the `small` preset on a CPU and the reference model (257M,
bf16) on a GPU; `quick` is `tiny` with shorter replies. On a CPU the server and the reference
each use one PyTorch thread: the load generator needs a core too. On a machine of 8 cores or
more the clients are spread over up to 4 processes. Each row also gives the cores that the
server process and the load generator kept busy: a side near a whole core (the server's event
loop and engine share one GIL; each load process is one asyncio thread) is the bottleneck.

The full run adds long-stream rows: the 32 requests at once with replies of 256 tokens on a GPU
(128 on a CPU), against the in-process batch at that length, through a server whose engine runs
in a thread (`--engine thread`) started with `--stream-interval 0`, one with `--stream-interval
20`, and, where uvloop is installed (then the default), one with asyncio's event loop (`--loop
asyncio`); then with the engine in a process of its own (`--engine process`, the default on a
GPU) at intervals 0 and 20. The server's cores include its engine process's. At 48 tokens a GPU decodes the whole
in-process batch in well under a tenth of a second, so that row mostly measures what each
request costs before its first token; the long rows measure streaming throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

import gpt1
from gpt1.benchmarks import progress
from gpt1.benchmarks.generate import benchmark_model, synthetic_tokenizer
from gpt1.core.config import ModelConfig
from gpt1.core.errors import Gpt1Error
from gpt1.core.lifeline import parent_death_signal
from gpt1.core.sampling_params import SamplingParams
from gpt1.formats.modeldir import save_model
from gpt1.inference.decoding import chat_prompt_ids
from gpt1.inference.engine import Engine

# module -> what installs it, checked by `gpt1 bench` up front: the server, and the clients' HTTP
REQUIRES = {"fastapi": "'gpt1[serve]'", "uvicorn": "'gpt1[serve]'", "httpx": "'gpt1[serve]'"}
CLIENTS = (1, 16, 32)
REQUESTS = 32  # for every N; each of the N clients sends REQUESTS / N one after another
STREAM_TOKENS = {"cuda": 256, "cpu": 128}  # the long-stream rows' reply length
TEMP_PREFIX = "gpt1-bench-serve-"  # + the benchmark's pid + "-": the model dir it writes
HEALTH_TIMEOUT_S = 2.0  # one look at /health while the server starts


def _event_loops() -> list[str]:
    """The event loops `gpt1 serve --loop` can use here, its default ("auto") first."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return ["asyncio"]
    return ["uvloop", "asyncio"]


def _stream_setups() -> list[tuple[str, str, float]]:
    """The long-stream rows' (--engine, event loop, --stream-interval ms): the engine in a thread
    with the default loop writing each token at once and at most every 20 ms, and the other loop
    (if installed) at once; then the engine in its own process, at once and every 20 ms."""
    default, *others = _event_loops()
    return ([("thread", default, 0.0), ("thread", default, 20.0)] + [("thread", loop, 0.0) for loop in others]
            + [("process", default, 0.0), ("process", default, 20.0)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _messages(i: int) -> list[dict]:
    # Short: the synthetic tokenizer has no merges (a token per byte) and tiny's context is 128.
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Request {i}: the sea?"}]


def _body(i: int, max_tokens: int) -> dict:
    return {"model": "bench", "messages": _messages(i), "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}


async def _one_request(client, i: int, max_tokens: int) -> dict:
    """One streamed chat completion: ttft and latency in seconds, tokens, text, ok."""
    start = time.perf_counter()
    ttft, tokens, done, text = None, 0, False, []
    try:
        async with client.stream("POST", "/v1/chat/completions", json=_body(i, max_tokens)) as response:
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
                for choice in event["choices"]:
                    if choice["delta"].get("content"):
                        ttft = ttft if ttft is not None else time.perf_counter() - start
                        text.append(choice["delta"]["content"])
    except Exception:  # noqa: BLE001 - a transport error is a failed request, counted
        return {"ok": False}
    return {"ok": done and ttft is not None, "ttft": ttft, "latency": time.perf_counter() - start, "tokens": tokens,
            "text": "".join(text), "index": i}


async def _clients(url: str, client_ids: list[int], per_client: int, max_tokens: int,
                   start_at: float) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=len(client_ids), max_keepalive_connections=len(client_ids))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(600)) as client:
        async def worker(c: int) -> list[dict]:
            return [await _one_request(client, c * per_client + r, max_tokens) for r in range(per_client)]

        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        results = await asyncio.gather(*(worker(c) for c in client_ids))
    return [r for rs in results for r in rs]


def _load_part(url: str, client_ids: list[int], per_client: int, max_tokens: int,
               start_at: float) -> tuple[list[dict], float, float]:
    """Some of the clients, in one process: their results, the time they ended, the CPU seconds."""
    cpu = time.process_time()
    results = asyncio.run(_clients(url, client_ids, per_client, max_tokens, start_at))
    return results, time.monotonic(), time.process_time() - cpu


def _load(url: str, clients: int, max_tokens: int, pool: ProcessPoolExecutor | None = None,
          processes: int = 1) -> tuple[list[dict], float, float]:
    """The N clients' results, the wall time and the load generator's busy cores. With a pool,
    the clients are spread over `processes` of its processes, so that the load generator (~100 us of CPU per
    streamed token with httpx) is not what a fast server is measured against."""
    per_client = REQUESTS // clients
    # The processes start together and end at times compared with this one's: on a clock they share
    # that no one sets. time.time jumps with an NTP step or `date -s` (+120 s read as a load of 121 s,
    # -20 s as a 20 s stall); time.monotonic is the system's clock since boot on Linux, macOS and
    # Windows (CLOCK_MONOTONIC, mach_absolute_time, GetTickCount64), the same in every process.
    start_at = time.monotonic() + (0.5 if pool else 0.0)
    if pool is None:
        parts = [_load_part(url, list(range(clients)), per_client, max_tokens, start_at)]
    else:
        futures = [pool.submit(_load_part, url, list(range(clients))[i::processes], per_client, max_tokens, start_at)
                   for i in range(min(processes, clients))]
        parts = [f.result() for f in futures]
    wall = max(end for _, end, _ in parts) - start_at
    return [r for rs, _, _ in parts for r in rs], wall, sum(cpu for _, _, cpu in parts) / wall


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds so far of a process and its live children (the engine process
    of `--engine process`) (Linux), else None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:  # bytes: the process name in it may not be UTF-8
            fields = f.read().rsplit(b")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        children = []
    return seconds + sum(_cpu_seconds(c) or 0.0 for c in children)


def _inprocess_batch(model_dir: Path, max_tokens: int) -> float:
    """Tokens/s of the same requests decoded together in this process (the engine, no HTTP)."""
    llm = gpt1.load(model_dir)
    params = SamplingParams(temperature=0, max_new_tokens=max_tokens)
    prompts = [chat_prompt_ids(llm.tokenizer, _messages(i), llm.config.block_size, params)[0] for i in range(REQUESTS)]
    engine = Engine(llm.model, llm.tokenizer, max_batch=REQUESTS, max_queue=0)
    best = 0.0
    for _ in range(2):  # the first run warms up (and captures CUDA graphs on a GPU)
        start = time.perf_counter()
        requests = engine.submit(prompts, params, lambda i: lambda item: None)
        while engine.busy:
            engine.step()
        best = max(best, sum(r.state.completion_tokens for r in requests) / (time.perf_counter() - start))
    return best


def _remove_stale_dirs() -> None:
    """Remove this user's model dirs of earlier runs whose process is gone: a run killed outright
    (SIGKILL) could not remove its own. POSIX only (elsewhere `os.kill(pid, 0)` is no probe)."""
    if os.name != "posix":
        return
    for path in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*-*"):
        pid, _, rest = path.name[len(TEMP_PREFIX):].partition("-")
        if not (pid.isdigit() and rest) or path.is_symlink() or not path.is_dir() or path.stat().st_uid != os.getuid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:  # PermissionError: alive, another user's
            pass


def _wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    # Time is counted while this process runs (a longer gap between two looks than a look takes is a
    # pause: SIGSTOP, a debugger, Ctrl-Z of both processes), and the server is asked once more after
    # the time is up: else a pause past the deadline failed a server that was up by then.
    waited, last = 0.0, time.monotonic()
    while True:
        if proc.poll() is not None:
            raise Gpt1Error(f"gpt1 serve exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=HEALTH_TIMEOUT_S).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if waited > timeout:
            raise Gpt1Error(f"gpt1 serve did not answer {url}/health within {timeout:.0f} s")
        time.sleep(0.1)
        now = time.monotonic()
        waited, last = waited + min(now - last, HEALTH_TIMEOUT_S + 1), now


@contextlib.contextmanager
def _server(model_dir: Path, device: str, stream_interval_ms: float = 0.0,
            loop: str = "auto", engine: str = "auto") -> Iterator[tuple[str, subprocess.Popen]]:
    """`gpt1 serve` on the model in a subprocess: its URL and process, stopped on exit."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt1", "serve", "--model", str(model_dir), "--port", str(port),
         "--max-batch", str(REQUESTS), "--stream-interval", str(stream_interval_ms), "--loop", loop, "--engine", engine,
         "--log-level", "warning"],
        env={**os.environ, "GPT1_QUIET": "1", **({"OMP_NUM_THREADS": "1"} if device == "cpu" else {})},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        # SIGTERM (the server drains and stops) should this process die without stopping it (SIGKILL)
        preexec_fn=parent_death_signal())
    try:
        _wait_until_up(url, proc)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _measure(url: str, proc: subprocess.Popen, clients: int, max_tokens: int, pool, processes: int) -> tuple[dict, list[dict]]:
    """One load of REQUESTS requests by `clients` clients: the row's measurements and the replies."""
    server_cpu = _cpu_seconds(proc.pid)
    results, wall, client_cores = _load(url, clients, max_tokens, pool, processes)
    server_cores = (_cpu_seconds(proc.pid) - server_cpu) / wall if server_cpu is not None else None
    ok = [r for r in results if r["ok"]]
    ttft = np.array([r["ttft"] for r in ok]) * 1000
    latency = np.array([r["latency"] for r in ok]) * 1000
    return {
        "clients": clients, "requests": len(results), "failures": len(results) - len(ok),
        "ttft_p50_ms": float(np.percentile(ttft, 50)) if ok else None,
        "ttft_p99_ms": float(np.percentile(ttft, 99)) if ok else None,
        "latency_p50_ms": float(np.percentile(latency, 50)) if ok else None,
        "latency_p99_ms": float(np.percentile(latency, 99)) if ok else None,
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "server_cores_busy": server_cores, "client_cores_busy": client_cores,
    }, ok


def run(quick: bool = False) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = ModelConfig.preset("tiny" if quick else "gpt1" if device == "cuda" else "small")
    max_tokens = 16 if quick else 48
    stream_tokens = STREAM_TOKENS[device]
    tokenizer = synthetic_tokenizer(config.vocab_size)
    model = benchmark_model(config, tokenizer.special_ids, torch.device("cpu"))
    label = f"{config.n_layer}x{config.n_embd} ({model.num_params() / 1e6:.1f}M)"
    rows = []
    _remove_stale_dirs()
    with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as tmp:
        model_dir = save_model(Path(tmp) / "model", model, tokenizer)
        del model
        threads = torch.get_num_threads()
        if device == "cpu":
            torch.set_num_threads(1)
        try:
            inprocess_tps = _inprocess_batch(model_dir, max_tokens)
            stream_inprocess_tps = None if quick else _inprocess_batch(model_dir, stream_tokens)
        finally:
            torch.set_num_threads(threads)
        progress("serve", {"in-process batch": REQUESTS, "tokens_per_s": inprocess_tps,
                           f"tokens_per_s at {stream_tokens} tokens": stream_inprocess_tps})
        processes = min(4, (os.cpu_count() or 1) // 4)  # under 8 cores the clients stay in this process; 16 cores: 4
        pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) if processes > 1 else None
        try:
            with _server(model_dir, device) as (url, proc):
                _load(url, REQUESTS, max_tokens, pool, processes)  # warm-up (and the pool's processes start)
                sequential_tps, sequential_texts = None, {}
                for n in CLIENTS:
                    row, ok = _measure(url, proc, n, max_tokens, pool, processes)
                    if n == 1:
                        sequential_tps, sequential_texts = row["tokens_per_s"], {r["index"]: r["text"] for r in ok}
                    row.update(vs_sequential=row["tokens_per_s"] / sequential_tps if sequential_tps else None,
                               vs_inprocess_batch=row["tokens_per_s"] / inprocess_tps,
                               inprocess_batch_tokens_per_s=inprocess_tps,  # the ratio's reference, in the row
                               same_replies_as_sequential=all(sequential_texts.get(r["index"]) == r["text"] for r in ok),
                               max_tokens=max_tokens, engine="process" if device == "cuda" else "thread",
                               event_loop=_event_loops()[0], stream_interval_ms=0, model=label, device=device)
                    rows.append(row)
                    progress("serve", row)
            # Long streams: throughput once the requests' fixed costs (connection, parsing, the
            # prompt) are spread over many tokens.
            for engine, loop, interval in () if quick else _stream_setups():
                with _server(model_dir, device, interval, loop, engine) as (url, proc):
                    _load(url, REQUESTS, max_tokens, pool, processes)  # warm-up
                    row, ok = _measure(url, proc, REQUESTS, stream_tokens, pool, processes)
                    row.update(vs_sequential=None, vs_inprocess_batch=row["tokens_per_s"] / stream_inprocess_tps,
                               inprocess_batch_tokens_per_s=stream_inprocess_tps,
                               same_replies_as_sequential=None, max_tokens=stream_tokens, engine=engine,
                               event_loop=loop, stream_interval_ms=interval, model=label, device=device)
                    rows.append(row)
                    progress("serve", row)
        finally:
            if pool is not None:
                pool.shutdown()
    return rows
