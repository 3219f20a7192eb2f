"""The engine's decode step in shapes that never change, so that it can be captured as CUDA graphs
(and compiled by `torch.compile`) once per batch-size bucket and replayed at every step."""

from __future__ import annotations

import contextlib
from typing import Callable, Protocol

import torch

from gpt1.core.errors import first_line, is_compile_error
from gpt1.core.model import GPT, SlotCache
from gpt1.core.progress import warn


class SlotPool(Protocol):
    """What the decode step reads of its engine (`gpt1.inference.engine.Engine`)."""

    model: GPT
    cache: SlotCache
    device: torch.device
    max_batch: int


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """The engine's forwards run in the model's dtype, whatever autocast the caller is in (a
    training script's eval callback under bfloat16 autocast): its bfloat16 keys and values could
    not be written into the float32 KV cache ("Index put requires the source and destination dtypes
    match"), and the engine's dtype is the one documented (`dtype_name`, the server's /health)."""
    # Entered only under an autocast (an autocast context costs 7 us a step), and only for a device
    # torch has one for.
    if not torch.amp.is_autocast_available(device.type) or not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


class BucketedDecode:
    """The decode step in fixed shapes: batch sizes rounded up to a power of two (at most
    max_batch), attention over the whole slot. With `capture` (CUDA) each bucket's forward is
    captured once as a CUDA graph and replayed with new inputs; without, the same bucketed
    forward runs eagerly (what the tests check on a CPU). With `compile`, each bucket's forward
    is first compiled by `torch.compile` (Inductor fuses the step's ~13 small kernels per layer,
    which at batch 1 on a GPU bound the step more than reading the weights does), then captured."""

    def __init__(self, engine: SlotPool, capture: bool = True, compile: bool = False):
        self.engine, self.capture, self.compile = engine, capture, compile
        self.buckets: dict[int, tuple[Callable[[], torch.Tensor], torch.Tensor]] = {}

    def bucket(self, rows: int) -> int:
        return min(1 << (rows - 1).bit_length(), self.engine.max_batch)

    def bucket_for(self, rows: int) -> tuple[Callable[[], torch.Tensor], torch.Tensor]:
        """The bucket that serves `rows` rows, built (compiled, captured) on first use."""
        size = self.bucket(rows)
        if size not in self.buckets:
            with no_autocast(self.engine.device):  # warm_up's builds too: compiled and captured as a step runs
                self.buckets[size] = self._build(size)
        return self.buckets[size]

    def decode(self, ids: list[int], starts: list[int]) -> torch.Tensor:
        run, static_inputs = self.bucket_for(len(ids))
        size = static_inputs.size(1)
        # The bucket's rows beyond the live ones write at the last position, which no row holds
        # while it has tokens to feed: those slots may hold a prompt being prefilled.
        pad = size - len(ids)
        static_inputs.copy_(torch.tensor([ids + [0] * pad, starts + [self.engine.cache.max_len - 1] * pad]),
                            non_blocking=True)  # one copy to the device per step
        return run()[:len(ids)]

    def _build(self, size: int):
        engine = self.engine
        static_inputs = torch.zeros(2, size, dtype=torch.long, device=engine.device)  # token ids; positions
        static_ids, static_starts = static_inputs[0, :, None], static_inputs[1]

        def forward() -> torch.Tensor:
            engine.cache.prepare(slice(0, size), static_starts[:, None])
            return engine.model(static_ids, cache=engine.cache, last_only=True)[:, -1]

        # Warm-up, compilation and capture write at the last position, which no live row holds yet.
        static_starts.fill_(engine.cache.max_len - 1)
        if self.compile:
            compiled = torch.compile(forward, fullgraph=True, dynamic=False)
            try:
                # Every bucket's closure shares one code object: a bucket is one more compilation of
                # it, which Dynamo's recompile limit (8 by default) would refuse past the 8th bucket.
                with torch._dynamo.config.patch(recompile_limit=max(8, len(self.buckets) + 1)):
                    compiled()
                forward = compiled
            except Exception as e:  # e.g. no C++ compiler (Windows without MSVC, macOS without Xcode's tools)
                if not is_compile_error(e):
                    raise
                warn(f"torch.compile failed ({first_line(e)}); the engine decodes without it (as without --compile)")
                self.compile = False
        if not self.capture:
            return forward, static_inputs
        # On the engine's own GPU: a capture on another one (the thread's current device, cuda:0
        # for --device cuda:1) records nothing, and every replay would return the capture's logits.
        stream = torch.cuda.Stream(engine.device)
        stream.wait_stream(torch.cuda.current_stream(engine.device))
        with torch.cuda.device(engine.device), torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (allocator, kernels), as PyTorch advises
                forward()
        torch.cuda.current_stream(engine.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(engine.device), torch.cuda.graph(graph):
            logits = forward()

        def replay() -> torch.Tensor:
            graph.replay()
            return logits

        return replay, static_inputs
