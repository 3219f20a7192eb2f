"""Room for the engine's KV cache: its size (`kv_cache_bytes`) and the bytes a device can still
allocate (`free_memory`), so that an engine too large for the machine is refused with a message
that says so, before it is allocated, rather than killed by the kernel's OOM killer without a word.

On a GPU torch knows the free memory; on the CPU it is the least of three limits that each
bound what the process may allocate: the machine's available memory, the memory limits of the
process's cgroup (a container's, which the machine's figure ignores) and its rlimits (`ulimit -v`,
`ulimit -d`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from gpt1.core.model import GPT


def kv_cache_bytes(model: GPT, max_batch: int, max_len: int | None = None) -> int:
    """Memory of the slot pool: keys and values of every layer for max_batch x max_len positions
    (default: block_size)."""
    c = model.config
    itemsize = next(model.parameters()).element_size()
    return 2 * c.n_layer * max_batch * c.n_head * (max_len or c.block_size) * c.head_size * itemsize


CHECKED_KV_BYTES = 64 << 20  # the smallest KV cache whose room is checked before it is allocated


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`, or None when unknown. On the CPU, the least
    of what the machine has (MemAvailable), what the process's cgroup lets it use (a container's
    memory limit, which MemAvailable ignores: a cache that passed was OOM-killed without a word),
    and what its rlimits leave (`ulimit -v`, `ulimit -d`)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    rooms = [room for room in (_machine_room(), _cgroup_room(), _rlimit_room()) if room is not None]
    return max(min(rooms), 0) if rooms else None


def _machine_room() -> int | None:
    try:
        for line in _proc_text("/proc/meminfo").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# cgroup v2 (one hierarchy, controllers "") and v1's memory controller: where they are mounted,
# the limit, the usage, and the page cache within the usage (memory.stat), which the kernel
# reclaims before it fails an allocation and so is room too.
_CGROUPS = {"": ("/sys/fs/cgroup", "memory.max", "memory.current", "file"),
            "memory": ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache")}


def _cgroup_room() -> int | None:
    """The least room under the memory limits of the process's cgroup and those above it."""
    try:
        lines = _proc_text("/proc/self/cgroup").splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        kind = "" if controllers == "" else "memory" if "memory" in controllers.split(",") else None
        if kind is None:
            continue
        mount, limit_file, usage_file, cache_key = _CGROUPS[kind]
        mount = Path(mount)
        folder = mount / path.lstrip("/")
        for level in (folder, *folder.parents):  # a limit above the process's cgroup holds too
            if not level.is_relative_to(mount):
                break
            with contextlib.suppress(OSError, ValueError):
                limit = (level / limit_file).read_text().strip()
                if limit == "max" or int(limit) >= 1 << 62:  # no limit (v1 says so with a huge number)
                    continue
                counters = dict(entry.split() for entry in (level / "memory.stat").read_text().splitlines())
                in_use = int((level / usage_file).read_text()) - int(counters.get(cache_key, 0))
                rooms.append(int(limit) - in_use)
    return min(rooms, default=None)


def _rlimit_room() -> int | None:
    """What RLIMIT_AS (`ulimit -v`) and RLIMIT_DATA (`ulimit -d`) leave the process: torch's CPU
    allocator maps large tensors, which both count."""
    try:
        import resource  # Unix only
        status = dict(line.split(":", 1) for line in _proc_text("/proc/self/status").splitlines() if ":" in line)
    except (ImportError, OSError):
        return None
    rooms = []
    for limit, used in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        soft = resource.getrlimit(limit)[0]
        with contextlib.suppress(KeyError, ValueError, IndexError):
            if soft != resource.RLIM_INFINITY:
                rooms.append(soft - int(status[used].split()[0]) * 1024)  # "VmSize:  123456 kB"
    return min(rooms, default=None)


def _proc_text(path: str) -> str:
    """A /proc file's text, decoded as file names are (`os.fsdecode`: undecodable bytes kept as
    surrogates). The kernel copies into these files names it was given as bytes: a process name
    (status's `Name:`), cut at 15 bytes, often ends in half a character, and cgroup paths are
    any bytes. Read in text mode (the locale's encoding, strict), such a name made every Engine
    fail with a UnicodeDecodeError; decoded so, a cgroup path maps back to its exact bytes."""
    with open(path, "rb") as f:
        return os.fsdecode(f.read())


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
