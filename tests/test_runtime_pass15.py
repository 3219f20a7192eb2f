"""Pass 15 (static analysis), runtime findings: the engine under a process name that is not
UTF-8, and a run dir whose `tensorboard` is a file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpt1.core.errors import Gpt1Error
from gpt1.train.config import TrainConfig, load_config
from gpt1.train.pretrain import pretrain

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc are Linux's")

# The child names itself as a script "ааааааааа.py" run by its shebang is named: the kernel keeps
# 15 bytes of the name, which cuts its eighth "а" (2 bytes in UTF-8) in half.
CUT_NAME_CHILD = """
import ctypes, sys
ctypes.CDLL(None).prctl(15, ctypes.c_char_p(("а" * 9).encode()), 0, 0, 0)  # PR_SET_NAME
with open("/proc/self/comm", "rb") as f:
    comm = f.read()
try:
    comm.decode()
    sys.exit("the process name is valid UTF-8: nothing tested")
except UnicodeDecodeError:
    pass
import gpt1, torch
from gpt1.inference.engine import free_memory
assert free_memory(torch.device("cpu")) > 0  # what an engine with a cache to check reads
llm = gpt1.load(sys.argv[1], device="cpu")
print(repr(llm.chat([{"role": "user", "content": "hi"}], max_new_tokens=3, temperature=0)))
"""


@linux_only
def test_the_engine_runs_under_a_process_name_cut_in_the_middle_of_a_character(chat_dir):
    """free_memory read /proc/self/status (whose `Name:` is the process name) as UTF-8 text:
    every Engine, so llm.chat, `gpt1 generate/chat/serve`, failed with a UnicodeDecodeError."""
    out = subprocess.run([sys.executable, "-c", CUT_NAME_CHILD, str(chat_dir)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONWARNINGS": "error::ResourceWarning"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("'") and "Traceback" not in out.stderr


TINY = ["model=tiny", "block_size=32", "batch_size=2", "eval_batches=1", "eval_every=2", "device=cpu"]


def open_paths() -> list[str]:
    """What this process's open file descriptors point at (files, "pipe:[...]", sockets), sorted."""
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return sorted(paths)


def _metrics_descriptors() -> list[str]:
    """The files named metrics.jsonl this process holds open."""
    return [p for p in open_paths() if p.endswith("metrics.jsonl")]


@linux_only
def test_a_file_named_tensorboard_in_the_run_dir_is_one_error_and_leaves_no_file_open(data_dir, tmp_path):
    """A resumed run with tensorboard=true whose run dir holds a FILE named tensorboard: a
    FileExistsError traceback from SummaryWriter, and metrics.jsonl (opened before it) was left
    open, held by the traceback's frame."""
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    pretrain(load_config(TrainConfig, None, [*TINY, "max_steps=2", "save_every=1"]), data_dir, run)
    shutil.rmtree(run / "checkpoints" / "step-00000002")  # killed before its last save (the only one kept)
    (run / "tensorboard").write_text("not a folder")
    cfg = load_config(TrainConfig, None, [*TINY, "max_steps=2", "save_every=1", "tensorboard=true"])
    with pytest.raises(Gpt1Error, match=r"tensorboard: exists and is not a folder; tensorboard=true writes") as e:
        pretrain(cfg, data_dir, run)
    assert "\n" not in str(e.value)
    assert _metrics_descriptors() == []  # closed already, with the frame still alive in e's traceback
    # Moved away, the run resumes and logs to the folder.
    (run / "tensorboard").unlink()
    assert pretrain(cfg, data_dir, run).steps == 2
    assert any(Path(run, "tensorboard").iterdir())
