"""What a training run leaves to read besides its model: the files it logs to, their pieces.

RUN/metrics.jsonl (`METRICS_FILE`: one line a step, written by the loop, `gpt1.train.loop`), the
TensorBoard event log in RUN/tensorboard (`tensorboard=true`: opened and closed here, written by
the loop), RUN/loss.png (`PLOT_FILE`, drawn from metrics.jsonl at the end), and `fmt`, how the
log lines write a loss. The loop wraps each TensorBoard call in `writing`, which names the folder
in the error of a write its thread could not do (`writer_thread_unprinted` keeps that thread from
printing it first).
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Iterator

from gpt1.core.errors import Gpt1Error, first_line
from gpt1.core.paths import make_dirs
from gpt1.core.progress import warn
from gpt1.train.plot import plot_metrics

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"


def fmt(value: float | None, spec: str = ".4f") -> str:
    """A loss (or perplexity) as the log lines write it; "n/a" for none."""
    if value is None:
        return "n/a"
    return format(value, spec if abs(value) < 1e9 else ".4g")  # a diverged run's perplexity has 300 digits


def plot_loss(run_dir: Path) -> None:
    """Draw loss.png, a by-product: one that cannot be drawn (matplotlib's fonts past `ulimit -n`,
    its extension past `ulimit -v`, a folder in the way) is a warning, not a failed run whose
    model is written."""
    try:
        plot_metrics(run_dir / METRICS_FILE, run_dir / PLOT_FILE, title=run_dir.name)
    except Exception as e:  # noqa: BLE001 - whatever it was, the run's results stand
        warn(f"{run_dir / PLOT_FILE} not drawn ({first_line(e)}); `gpt1 plot {run_dir}` draws it")


def open_tensorboard(run_dir: Path, start_step: int):
    """A SummaryWriter on RUN/tensorboard, whose first event it writes at once (the caller names the
    folder in a failed write: `writing`); None, with a warning, where tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warn("tensorboard=true but the tensorboard package is not installed (pip install tensorboard); not logging to it")
        return None
    log_dir = run_dir / TENSORBOARD_DIR
    try:  # made here, not by SummaryWriter, whose FileExistsError was a traceback
        make_dirs(log_dir)
    except Gpt1Error as e:
        raise Gpt1Error(f"{e}; tensorboard=true writes its event files in that folder "
                        "(move what is there away, or set tensorboard=false)") from None
    # Steps after `start_step` that a killed run had logged are dropped by readers (as
    # metrics.jsonl is trimmed): the resumed run logs them again.
    return SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1)


def close_tensorboard(writer) -> None:
    """Close tensorboard's writer, whose close raises the error of a write its thread could not do
    (it flushes first); the thread is stopped either way: left running, it would try again later."""
    try:
        writer.close()
    except BaseException:
        for file_writer in (writer.all_writers or {}).values():
            with contextlib.suppress(OSError):
                file_writer.close()
        raise


@contextlib.contextmanager
def writer_thread_unprinted() -> Iterator[None]:
    """tensorboard's writer thread keeps the error of a write it could not do (a full disk, a
    file-size limit), which the writer raises at its next call in the loop, in one line naming the
    folder (`writing`); the dying thread printed it first too, a traceback ("Exception in thread
    Thread-1") above that line. Other threads' errors are printed as before."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        # Its thread class keeps what it raised as `exception`, which the writer's calls raise again.
        if not (type(args.thread).__module__.startswith("tensorboard.")
                and args.exc_value is getattr(args.thread, "exception", None)):
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        if threading.excepthook is hook:  # not put back over a hook installed since
            threading.excepthook = previous
