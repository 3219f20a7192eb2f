"""What results depend on beyond the code, its config and its data: the versions (gpt1's, with
its git commit when imported from a checkout; Python's; torch's), the machine (OS, CPU) and
torch's thread count. A training run records it at each start and resume (train_config.json's
`provenance`), `gpt1 bench` above its rows."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import torch

import gpt1


def environment() -> dict[str, Any]:
    """What a run's numbers depend on beyond its config, its data and its seed: the versions
    (gpt1's, with its `git describe --always --dirty` when imported from a git checkout; Python's;
    torch's), the machine (OS, CPU) and torch's CPU thread count, which changes the bits of a CPU
    run (a matmul sums in another order). Recorded at each start and resume of a run."""
    git = _git_describe()
    return {"gpt1": gpt1.__version__, **({"git": git} if git else {}), "python": platform.python_version(),
            "torch": torch.__version__, "os": f"{platform.system()} {platform.release()} {platform.machine()}",
            "cpu": _cpu_name(), "cpu_cores": os.cpu_count(), "threads": torch.get_num_threads()}


@functools.cache  # the code this process runs is the one it imported: asked once
def _git_describe() -> str | None:
    """`git describe --always --dirty` of the checkout gpt1 is imported from (`src/gpt1` or
    `gpt1/` at its root; never the repository an installed copy happens to sit in); None when it
    is not one, or git is absent or fails. The dirty mark comes from `git status` with optional
    locks off: `describe --dirty` rewrites the index, under the feet of a git command running there."""
    package = Path(gpt1.__file__).resolve().parent
    if checkout_root(package) is None:
        return None
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=10,
                              env=env, check=True).stdout.strip()

    try:
        described = git("describe", "--always")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return described + ("-dirty" if dirty else "") if described else None


def checkout_root(package: Path) -> Path | None:
    """The root of the gpt1 checkout that `package` (the imported `gpt1/`) sits in: a folder with
    `.git` and a pyproject.toml whose project is gpt1, holding `src/gpt1` or `gpt1/`. Not a `.git`
    above a copy that pip installed (`pip install --target vendor` inside the user's own repository
    recorded that repository's commit as gpt1's)."""
    if any(package.parent.glob("gpt1-*.dist-info")):  # pip's record beside it: an installed copy
        return None
    for root in (package.parent.parent,) if package.parent.name == "src" else (package.parent,):
        try:
            project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8")).get("project", {})
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            continue
        if (root / ".git").exists() and project.get("name") == "gpt1":
            return root
    return None


def _cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; platform's guess elsewhere, which may be empty)."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
