"""Multi-GPU / multi-node training through `torchrun` (DistributedDataParallel).

`torchrun --nproc_per_node N -m gpt1 pretrain ...` starts N processes and sets RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in each; `setup()` joins them into one
process group (NCCL on GPUs, gloo on CPUs). Each rank draws its own training windows; gradients
are averaged by DDP; only rank 0 logs, evaluates into files and saves. Without torchrun
everything here is a no-op; a partial set of those variables (left in a shell) is refused.
"""

from __future__ import annotations

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
    """`gpt1.core.device.resolve_device` with this rank's GPU for `auto` and `cuda`."""
    return core_device.resolve_device(name, (info or current()).local_rank)


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
        use_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
        if use_cuda:
            torch.cuda.set_device(launch.local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
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
