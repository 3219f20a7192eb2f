"""Multi-GPU / multi-node training through `torchrun` (DistributedDataParallel).

`torchrun --nproc_per_node N -m gpt1 pretrain ...` starts N processes and sets RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in each; `setup()` joins them into one
process group (NCCL on GPUs, gloo on CPUs). Each rank draws its own training windows; gradients
are averaged by DDP; only rank 0 logs, evaluates into files and saves. Without torchrun
everything here is a no-op; a partial set of those variables (left in a shell) is refused.

Errors, one line each (the CLI prints them): a failure every rank meets alike is printed once
(`main_only`, `same_on_every_rank`; the CLI leaves the refusals all ranks raise before training
to LOCAL_RANK 0), an error of one rank's own (`rank_local`: a batch only it draws) by that rank,
and a collective that fails because another process is gone is `PeerGone` on the survivors.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt1.core import device as core_device
from gpt1.core.errors import Gpt1Error


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, info: DistInfo | None = None) -> torch.device:
    """`gpt1.core.device.resolve_device` with this rank's GPU for `auto` and `cuda`. Under torchrun
    each process of a machine needs a GPU of its own: LOCAL_RANK past the GPU count, or one named
    GPU (`cuda:1`) for several processes, is a Gpt1Error (NCCL failed on it with a traceback)."""
    info = info or current()
    device = core_device.resolve_device(name, info.local_rank)
    if device.type != "cuda" or not info.enabled:
        return device
    gpus = torch.cuda.device_count()
    if info.local_rank >= gpus:
        raise Gpt1Error(f"device: this machine has {gpus} CUDA GPU(s) and torchrun started a process with "
                        f"LOCAL_RANK={info.local_rank}: start at most {gpus} per machine (--nproc_per_node {gpus})")
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    if name not in ("auto", "cuda") and local_processes > 1:
        raise Gpt1Error(f"device: {name} would be the GPU of all {local_processes} processes torchrun started on this "
                        "machine; use device=cuda or auto (each process takes the GPU of its LOCAL_RANK)")
    return device


TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> DistInfo:
    """This process's place in a torchrun launch, from the environment: one process when none of
    RANK, LOCAL_RANK, WORLD_SIZE is set. torchrun sets all of TORCHRUN_VARIABLES in every process
    it starts, so a partial or inconsistent set (stale variables left in a shell) is a Gpt1Error
    naming them: torch failed with a traceback, or a lone RANK=1 silenced the result lines."""
    given = {name: os.environ[name] for name in TORCHRUN_VARIABLES if name in os.environ}
    if not given.keys() & {"RANK", "LOCAL_RANK", "WORLD_SIZE"}:
        return DistInfo()
    settings = ", ".join(f"{name}={value}" for name, value in given.items())
    missing = [name for name in TORCHRUN_VARIABLES if name not in given]
    if missing:
        raise Gpt1Error(f"the environment sets {settings} but not {', '.join(missing)}, which torchrun sets too: "
                        f"unset {', '.join(given)} to run as one process, or start the command with torchrun")
    try:
        rank, local_rank, world_size = (int(given[name]) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    except ValueError:
        raise Gpt1Error(f"the environment sets {settings}: RANK, LOCAL_RANK and WORLD_SIZE must be whole "
                        "numbers (torchrun sets them)") from None
    if not 0 <= rank < world_size or local_rank < 0:
        raise Gpt1Error(f"the environment sets {settings}: expected 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0 "
                        "(torchrun sets them)")
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size)


def setup(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if this process was started by torchrun (idempotent)."""
    launch = launched()
    if not launch.enabled:
        return DistInfo()
    if not dist.is_initialized():
        # Checked before torch.cuda is touched: `cuda` on a machine without CUDA is the one line
        # a single process gives, not an AttributeError from torch.cuda.set_device on every rank.
        resolved = resolve_device(device, launch)
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return current()


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                        world_size=dist.get_world_size())
    return DistInfo()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (in place); identity without a process group."""
    if current().enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_object(obj) -> list | None:
    """Every rank's `obj` in rank order on rank 0, None on the others; [obj] without a process group."""
    info = current()
    if not info.enabled:
        return [obj]
    gathered = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank (e.g. a resume decision)."""
    if not current().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class RankZeroError(Gpt1Error):
    """Rank 0's error, raised on the other ranks by `main_only` so that they stop with it. Rank 0
    reports it: the CLI prints nothing for this copy (one line in all, not one per rank)."""

    reported_elsewhere = True


def same_on_every_rank(message: str) -> Gpt1Error:
    """The error for a failure every rank meets alike (e.g. on all-reduced numbers): rank 0's
    Gpt1Error prints it, the others' RankZeroError stays silent."""
    return RankZeroError(message) if current().rank else Gpt1Error(message)


@contextlib.contextmanager
def rank_local():
    """Marks a Gpt1Error raised inside as this rank's own (`error.rank_local`), e.g. a damaged
    window of the batches only it draws: the CLI prints it on whichever rank meets it, where the
    errors every rank raises alike are printed by LOCAL_RANK 0 alone."""
    try:
        yield
    except Gpt1Error as error:
        error.rank_local = True
        raise


class PeerGone(Gpt1Error):
    """A collective failed because another process of the run is gone: it failed (its own line
    says why), was killed (torchrun's report gives its exit code) or stopped answering."""


def _peer_gone(error: BaseException) -> bool:
    # NCCL and the rendezvous store raise DistError's subclasses; gloo raises a plain RuntimeError
    # from its TCP transport ("[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer").
    return isinstance(error, dist.DistError) or "gloo/transport/" in str(error)


@contextlib.contextmanager
def peer_failures():
    """A collective inside that fails because another process is gone raises PeerGone, one line
    naming this rank, instead of the backend's traceback; every other error passes unchanged."""
    try:
        yield
    except RuntimeError as error:
        if not current().enabled or not _peer_gone(error):
            raise
        raise PeerGone(f"rank {current().rank}: stopped because another process of this torchrun run failed "
                       "or was killed (its own error, or torchrun's report of its exit code, says why)") from error


def main_only(fn):
    """`fn()` on rank 0 while the other ranks wait; its result on rank 0, None elsewhere. When it
    raises, every rank raises: rank 0 its error, the others a RankZeroError with its message.
    (Otherwise they would wait for rank 0 at their next collective and fail there, with a
    traceback, once it has exited.)"""
    info = current()
    if not info.enabled:
        return fn()
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as e:
            error = e
    message = broadcast_object(None if error is None else str(error) or type(error).__name__)
    if error is not None:
        raise error
    if message is not None:
        raise RankZeroError(message)
    return result


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
