"""Progress bars and messages: the only way library code talks to the user.

Messages go through the `gpt1` logger (the CLI routes it to stderr, so stdout stays clean
for generated text); progress bars are tqdm on stderr, silenced with GPT1_QUIET=1 or when
`disable=True`. When stderr is not a terminal (a log file, CI, `2>&1 | tee`), a bar is a plain
line every PLAIN_INTERVAL seconds instead of `\r` redraws that flood the log; in Jupyter it is
tqdm's widget, as wide as the cell. Keeping this in one place lets tests and servers run the
library silently.
The lines are `printable`: control characters in them (from names in files made elsewhere) are
written as escapes, not sent to the terminal as escape sequences.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import TYPE_CHECKING, Iterable, TypeVar

if TYPE_CHECKING:
    from tqdm.auto import tqdm

T = TypeVar("T")
logger = logging.getLogger("gpt1")
PLAIN_INTERVAL = 10.0  # seconds between a bar's lines when stderr is not a terminal
# C0 controls but tab and newline, DEL, and C1 controls (U+0080-U+009F; U+009B is a CSI of its own).
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with its control characters (but newline and tab) as visible escapes, as repr
    writes them (ESC as `\\x1b`, CR as `\\r`): a message quotes names from files made elsewhere
    (config.json's unknown fields, a checkpoint's tensor names), and raw escape sequences in it
    would act on the terminal that shows it: set its clipboard (OSC 52), hide text, rewrite lines."""
    return _CONTROLS.sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), text)


def info(message: str) -> None:
    logger.info(message)


def warn(message: str) -> None:
    logger.warning(message)


def env_flag(name: str) -> bool:
    """Whether the environment switch `name` is on: 1, true, yes or on, in any case, as
    huggingface_hub reads HF_HUB_OFFLINE (anything but "" and "0" was on: GPT1_QUIET=false too)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def quiet() -> bool:
    """Whether GPT1_QUIET turns the progress bars off (also those drawn outside tqdm)."""
    return env_flag("GPT1_QUIET")


def progress(iterable: Iterable[T] | None = None, *, disable: bool | None = None, **kwargs) -> tqdm:
    """A tqdm bar on stderr; quiet when GPT1_QUIET is set, or when there is no stderr (None
    under pythonw, `python app.py 2>&-` and some daemons)."""
    if disable is None:
        disable = quiet()
    kwargs.setdefault("smoothing", 0.1)
    from tqdm.auto import tqdm  # here: tqdm.auto loads asyncio, 0.2 s of every `gpt1 --help`
    if sys.stderr is None:
        disable = True
    elif sys.stderr.isatty() or _draws_widgets(tqdm):
        # In Jupyter (whose stderr is no terminal) tqdm.auto draws a widget: the log file's
        # settings made it 100 px wide (ncols), updated every 10 s. dynamic_ncols: the cell's width.
        kwargs.setdefault("dynamic_ncols", True)
    else:
        kwargs.setdefault("file", _PlainLines(sys.stderr))
        kwargs.setdefault("mininterval", PLAIN_INTERVAL)
        # A line at the first update PLAIN_INTERVAL s after the last one, and no more: tqdm's monitor
        # thread (maxinterval) redraws a slow bar without resetting its clock, so the next update
        # printed a second line a second later. miniters=1 keeps fast bars from skipping lines.
        kwargs.setdefault("maxinterval", float("inf"))
        kwargs.setdefault("miniters", 1)
        kwargs.setdefault("ncols", 100)
        kwargs.setdefault("ascii", True)
    return tqdm(iterable, disable=disable, **kwargs)


def _draws_widgets(bar_class: type) -> bool:
    """Whether tqdm.auto chose its notebook bar (an ipywidgets bar, in a Jupyter kernel). Asked of
    the tqdm.notebook that this choice imported: importing it here would load IPython everywhere."""
    notebook = sys.modules.get("tqdm.notebook")
    return notebook is not None and issubclass(bar_class, notebook.tqdm_notebook)


class _PlainLines:
    """A stream for tqdm that turns each `\r` redraw into a line of its own, leaving out a line
    that says nothing new (the same count and postfix as the last one, only the clock moved on:
    closing a bar redraws its last state, which a log then had twice)."""

    def __init__(self, stream):
        self.stream = stream
        self._last = ""

    def write(self, text: str) -> None:
        for part in text.replace("\n", "\r").split("\r"):
            if part.strip() and (news := _without_clock(part)) != self._last:
                self._last = news
                self.stream.write(part.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _without_clock(line: str) -> str:
    """A bar's line without its elapsed<remaining time and rate (the first two fields in its
    `[...]`) and without the bar drawn between its `|`s, whose width follows the clock's length
    (`00:00<?, ?step/s` is shorter than `00:00<00:00, 5888.12step/s`, so the bar is longer)."""
    head, bracket, fields = line.rstrip().rpartition("[")
    if not bracket:
        return line
    before_bar, _, rest = head.partition("|")
    after_bar = rest.rpartition("|")[2] if "|" in rest else rest
    return f"{before_bar}|{after_bar}[{', '.join(fields.split(', ')[2:])}"


class _TqdmHandler(logging.Handler):
    """Writes log lines through tqdm so they do not tear an active progress bar, `printable`."""

    def emit(self, record: logging.LogRecord) -> None:
        if sys.stderr is None:  # tqdm.write would print it on stdout instead
            return
        from tqdm.auto import tqdm

        try:
            tqdm.write(printable(self.format(record)), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_console_logging(level: int = logging.INFO) -> None:
    """Route the gpt1 logger to stderr (called by the CLI, never by the library)."""
    if any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        return
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
