"""The one exception type gpt1 raises for bad input.

Library code raises `Gpt1Error` with a message that names the file, line or field and what
was expected; the CLI prints that message as one line on stderr and exits non-zero. The limits
of the process (`ulimit -n`, `-u`, `-v`) are no bad input, but their errors are told the same
way, with the limit to raise (`open_files_hint`, `threads_hint`).
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Collection, Mapping

try:
    import resource
except ImportError:  # Windows
    resource = None


class Gpt1Error(Exception):
    """A user-facing error: the message is meant to be shown as is, without a traceback."""


def is_compile_error(error: BaseException | None) -> bool:
    """An error of torch.compile's machinery (Dynamo, AOTAutograd, Inductor and its C++/Triton
    builds, e.g. no C++ compiler on the machine), as opposed to one of the model or the data,
    which would fail eagerly too: the first may fall back to eager, the second may not."""
    while error is not None:
        if type(error).__module__.startswith(("torch._dynamo", "torch._inductor", "torch._functorch")):
            return True
        error = error.__cause__
    return False


# What torch's CPU allocator says when the system refuses it memory: "DefaultCPUAllocator: can't
# allocate memory: you tried to allocate N bytes" (posix_memalign) and, on Windows, "...: not enough
# memory: you tried to allocate N bytes" (_aligned_malloc).
_CPU_ALLOCATOR_REFUSED = ("can't allocate memory", "you tried to allocate")


def memory_shortage(error: BaseException) -> str | None:
    """"GPU memory" or "memory" when `error` is an allocation the machine refused (torch's
    `OutOfMemoryError`, its CPU allocator's plain RuntimeError, Python's `MemoryError`); None for
    any other error. By type name, so that the CLI need not import torch to ask."""
    if type(error).__name__ == "OutOfMemoryError":  # torch's: a RuntimeError, a GPU's (or an XPU's, MPS's)
        return "GPU memory" if "CUDA" in str(error) or "MPS" in str(error) else "memory"
    # A Mac's GPU: torch's MPS allocator raises a plain RuntimeError ("MPS backend out of memory
    # (MPS allocated: ...). Tried to allocate ..."), not the OutOfMemoryError that CUDA's raises.
    if isinstance(error, RuntimeError) and str(error).startswith("MPS backend out of memory"):
        return "GPU memory"
    if isinstance(error, MemoryError):
        return "memory"
    if isinstance(error, RuntimeError) and any(words in str(error) for words in _CPU_ALLOCATOR_REFUSED):
        return "memory"
    return None


def other_name_hint(name: str, aliases: Mapping[str, tuple[str, str]], known: Collection[str] | None = None,
                    rename: Mapping[str, str] | None = None) -> str:
    """What an error about the unknown `name` adds when `aliases` (another tool's name -> (gpt1's,
    what differs)) holds it: ` (gpt1's is NAME: what differs)`; else, given `known` (the names the
    caller takes, a hint only to one of them), the closest of them to a typo: ` (did you mean
    max_steps?)`; else "". `rename`: gpt1's names as the caller spells them."""
    ours, note = aliases.get(name, (name, ""))
    ours = (rename or {}).get(ours, ours)
    if ours == name and known is not None:  # no other tool's name: a typo (max_step, maxsteps) of one?
        close = difflib.get_close_matches(name, sorted(known), n=1)
        return f" (did you mean {close[0]}?)" if close else ""
    if ours == name or (known is not None and ours not in known):
        return ""
    return f" (gpt1's is {ours}{': ' + note if note else ''})"


def first_line(error: BaseException) -> str:
    """'TypeName: the first line of its message' (compile errors run to a hundred lines)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def open_files_hint(error: OSError) -> str | None:
    """How to get more file descriptors, when `error` is for want of one (EMFILE: this process's
    `ulimit -n`; ENFILE: the whole system's table); None for any other error."""
    if error.errno == errno.EMFILE:
        return f"raise the open-file limit (ulimit -n{_now('RLIMIT_NOFILE')})"
    if error.errno == errno.ENFILE:
        return "the system's table of open files is full: close files elsewhere or raise it (sysctl fs.file-max)"
    return None


def threads_hint() -> str:
    """How to allow more threads, after one could not start (Python's "can't start new thread",
    EAGAIN from clone or fork). The usual cause is a limit on processes and threads: `ulimit -u`
    (root is exempt), or a container's pids limit (cgroup pids.max); under `ulimit -v`, the stack
    each thread maps (`ulimit -s` of it) may not fit either."""
    hint = f"raise the limit on processes and threads (ulimit -u{_now('RLIMIT_NPROC')}) or the container's pids limit"
    address_space = address_space_limit()
    if address_space is not None:
        hint += f", or the address-space limit each thread's stack takes from (ulimit -v {address_space // 1024})"
    return hint


def address_space_limit() -> int | None:
    """The process's address-space limit in bytes (`ulimit -v`, RLIMIT_AS); None when unlimited."""
    if resource is None:
        return None
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    return None if limit == resource.RLIM_INFINITY else limit


def _now(name: str) -> str:
    """', now N': the soft limit `resource.NAME` is at, where it is finite and known."""
    if resource is None or not hasattr(resource, name):
        return ""
    soft = resource.getrlimit(getattr(resource, name))[0]
    return "" if soft == resource.RLIM_INFINITY else f", now {soft}"
