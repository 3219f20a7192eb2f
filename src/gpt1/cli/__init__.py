"""The `gpt1` command line: thin wrappers that parse flags and call the library.

Each subcommand lives in its own module here with a `register(subparsers)` function that adds
its parser and sets `func`. Building the parser loads no torch (the modules import the library
in their command functions): `gpt1 --help`, `--version` and a mistyped flag answer at once.
`main` turns a Gpt1Error into one line on stderr (exit 2) and Ctrl-C into exit 130, also while
the command's library loads (`_interrupts_held`): a user never sees a traceback for bad input.
`GPT1_DEBUG=1` (or true, yes, on) prints the traceback behind the line as well (for bug reports). Under torchrun
every process runs the same command: an error they all meet alike (a bad flag, a missing folder,
Ctrl-C) is printed once, by LOCAL_RANK 0, and one of a single process's own (`rank_local`, see
`gpt1.train.distributed`) by it.

Text from the terminal enters here, in one place: an argument that is not valid UTF-8 (Python
keeps such bytes as lone surrogates) and invalid UTF-8 on stdin (typed into `gpt1 chat` or
piped into `gpt1 generate`) are bad input like any other, named by its flag. The standard
streams leave here too: one closed at the start is /dev/null on its own descriptor (a command
whose product is stdout, such as generate, refuses to start without it), one that cannot be
written (`--help > /dev/full`) is one line, one the reader closed (`| head`) ends the command
quietly, and text their encoding cannot hold is escaped rather than a crash after the work is
done. A current folder that was deleted is refused before torch loads.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import errno
import importlib
import importlib.util
import io
import os
import re
import signal
import sys
import tempfile
import threading
import traceback

from gpt1 import __version__
from gpt1.core.constants import BPE_TRAINING_THREAD
from gpt1.core.errors import Gpt1Error, address_space_limit, memory_shortage, open_files_hint, threads_hint
from gpt1.core.imports import import_quietly
from gpt1.core.malloc import fit_arenas_to_address_limit
from gpt1.core.progress import env_flag, printable, setup_console_logging
from gpt1.core.sampling_params import ALIASES

# Subcommands in the order `gpt1 --help` lists them; a module that is not there is skipped.
COMMANDS = ["quickstart", "tokenizer", "prepare", "pretrain", "finetune", "generate", "chat",
            "eval", "serve", "export", "bench", "plot", "info"]
# The C extensions a command loads before its work (torch, unless named here), imported while a
# Ctrl-C waits for the import to end (`_interrupts_held`). `prepare` and `tokenizer` use no torch:
# loading it was 2-5 s, half of preparing a 5 MB corpus.
LIBRARIES = {"plot": ("matplotlib.backends.backend_agg",), "prepare": ("numpy",), "tokenizer": ()}


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser with its errors on one line, as every other error (exit 2, as argparse).
    A command's parser (`gpt1 tokenizer train`) puts itself in what it parses, as `command_parser`:
    errors found after parsing are told with its name."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A subcommand's defaults are applied after its parent's: the innermost parser wins.
        self.set_defaults(command_parser=self)

    def error(self, message: str):
        if _said_by_another_process():
            self.exit(2)
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")

    def _print_message(self, message: str, file=None) -> None:
        # argparse drops a failed write, so `gpt1 --help > /dev/full` exited 0 with nothing written.
        # Help and --version are a command's output like any other: a failure on stdout is the same
        # one line as main's, a reader gone (`| head`) ends quietly, and stderr's nobody would see.
        if not message:
            return
        file = file or sys.stderr
        try:
            file.write(message)
            file.flush()
        except BrokenPipeError:
            if file is sys.stdout:
                _stdout_gone()
        except OSError as e:
            if file is sys.stdout:
                _stdout_gone()
                self.exit(2, f"{self.prog}: error: standard output: cannot write ({e.strerror})\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="gpt1",
        description="Train a GPT-style chat model from scratch, fine-tune it with LoRA, and serve it.",
    )
    parser.add_argument("--version", action="version", version=f"gpt1 {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module_name = f"gpt1.cli.{name}_cmd"
        if importlib.util.find_spec(module_name) is not None:
            importlib.import_module(module_name).register(subparsers)
    return parser


# The errors of a write that the user can fix, with how (a read-only output, a full disk, a file-size
# limit); {} is the flag that named the file (`_output_flag`): --out, but eval's is --json.
UNWRITABLE = {errno.EACCES: "choose a writable {}", errno.EPERM: "choose a writable {}",
              errno.EROFS: "choose a writable {}", errno.ENOSPC: "free some space or choose another {}",
              errno.EDQUOT: "free some space or choose another {}",
              errno.EFBIG: "raise the file-size limit (ulimit -f) or choose another {}"}
OUTPUT_FLAGS = ("out", "json", "samples", "report")  # the flags (--NAME) that name what a command writes
RESUMABLE = {"quickstart", "prepare", "pretrain", "finetune"}  # they pick up where a killed run stopped


def _said_by_another_process(error: BaseException | None = None) -> bool:
    """Whether another torchrun process prints this error. Every process of a torchrun launch runs
    the same command on the same input, so the errors all of them meet alike (argv, the recipe,
    the data folder, Ctrl-C) are printed once, by each machine's LOCAL_RANK 0. An error of this
    process's own (`rank_local`: a damaged batch only it draws) is printed where it happens, and
    one that rank 0 reports for all (`reported_elsewhere`) nowhere else. Read from the environment:
    no torch import for a bad flag, and a lone stale LOCAL_RANK (not torchrun) still prints."""
    if getattr(error, "reported_elsewhere", False):
        return True
    torchrun = all(name in os.environ for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    return torchrun and os.environ["LOCAL_RANK"] != "0" and not getattr(error, "rank_local", False)


def debug_enabled() -> bool:
    """Whether GPT1_DEBUG is on: 1, true, yes or on, in any case, as huggingface_hub reads its
    switches (HF_HUB_OFFLINE); GPT1_DEBUG=false turned it on."""
    return env_flag("GPT1_DEBUG")


# The recipe keys of pretrain's and finetune's configs that are true or false (a test keeps them
# equal to the bool fields): `--compile` alone is told compile=true.
SWITCH_KEYS = ("float8", "compile", "gradient_checkpointing", "keep_best", "tensorboard", "full",
               "train_special_tokens", "all_paths", "skip_invalid")


def _recipe_key_hint(args: argparse.Namespace, extra: list[str], argv: list[str]) -> str:
    """` (a recipe key: write device=cpu)` for an unrecognized `--device cpu` or `--device=cpu` of a
    command whose recipe has that key (its parser's `recipe_keys`): a recipe key is key=value, not
    a flag. The value of `--device cpu` is the next argument (argparse took it for an override);
    a flag alone is a switch turned on (`--compile`: compile=true) or, for another key, KEY=VALUE."""
    written = []
    for item in extra:
        flag, sep, value = item.partition("=")
        key = flag.removeprefix("--").replace("-", "_")
        if not flag.startswith("--") or key not in getattr(args, "recipe_keys", ()):
            continue
        if not sep:
            following = argv[argv.index(item) + 1:][:1]
            value = following[0] if following and not following[0].startswith("-") and "=" not in following[0] \
                else "true" if key in SWITCH_KEYS else "VALUE"
        written.append(f"{key}={value}")
    if not written:
        return ""
    return f" (a recipe key: write {written[0]})" if len(written) == 1 else f" (recipe keys: write {' '.join(written)})"


def _flag_hint(args: argparse.Namespace, extra: list[str]) -> str:
    """` (gpt1's flag is --top-p)` for another tool's spelling of one of this command's flags:
    underscores (`--top_p`) or another library's name (`--repetition-penalty`, `--max-tokens`,
    `--frequency-penalty`: sampling_params.ALIASES, with what differs)."""
    options = args.command_parser._option_string_actions  # argparse has no public map of its flags
    for item in extra:
        flag = item.partition("=")[0]
        if not flag.startswith("--"):
            continue
        key = flag.removeprefix("--").replace("-", "_")
        name, differs = ALIASES.get(key, (key, ""))
        ours = "--" + name.replace("_", "-")
        if ours != flag and ours in options:
            return f" (gpt1's flag is {ours}{': ' + differs if differs else ''})"
    return ""


def _check_arguments(args: argparse.Namespace) -> None:
    """Every argument the command got is UTF-8, paths too: gpt1 records paths in JSON (a prepared
    source, a fine-tune's base), shows a run's name in its plot, and safetensors opens a file by
    its name as UTF-8 text. The error names the flag (its position meant counting)."""
    for action in args.command_parser._actions:  # argparse has no public list of a parser's arguments
        values = getattr(args, action.dest, None)
        if values is None:
            continue
        for value in values if isinstance(values, list) else [values]:
            if not isinstance(value, str):
                continue
            # Lone surrogates are bytes the locale could not decode: invalid UTF-8, or valid UTF-8
            # under a locale that is not (LANG=C without Python's UTF-8 mode), which is fine.
            raw = value.encode("utf-8", errors="surrogateescape")
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                name = "/".join(action.option_strings) or action.metavar or action.dest
                raise Gpt1Error(f"argument {name}: not valid UTF-8 (byte {raw[e.start:e.start + 1]!r} at byte "
                                f"{e.start}); pass UTF-8 text, and rename a file or folder whose name is not") from None


def _standard_streams() -> set[int]:
    """stdout and stderr as every command may use them, however the process was started. Returns
    the standard descriptors (0, 1, 2) that were closed at the start (`<&- >&- 2>&-`): they hold
    /dev/null now, and what a command writes there is dropped."""
    closed = set()
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            # /dev/null on that very descriptor: the next file opened would take the lowest free
            # one, and what writes to fd 2 below Python (a C library's warning, a fatal error dump)
            # would write into a run's checkpoints/.lock or the server's socket. Inheritable: a
            # child (serve --engine process) starts with it too, not with its own fd 2 closed.
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: `fd`, as 0..fd-1 are open
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            os.set_inheritable(fd, True)
            closed.add(fd)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        stream = getattr(sys, name)
        if stream is None:  # started with it closed: a stream on the /dev/null above
            setattr(sys, name, open(fd, "w", encoding="utf-8", closefd=False))
        elif isinstance(stream, io.TextIOWrapper):
            # The encoding stays the one the locale or PYTHONIOENCODING asks for (what the terminal
            # shows); text it cannot hold is escaped (gpt1-out) instead of a UnicodeEncodeError that
            # ends the command after its work is done (an export, then printing its non-ASCII path).
            stream.reconfigure(errors="gpt1-out")
    return closed


def _check_working_folder() -> None:
    """The current folder exists: in one that was deleted (`rmdir` from another shell), relative
    paths resolve to nothing and torch's import dies in MKL ("Cannot load libtorch_cpu.so")."""
    try:
        os.getcwd()
    except FileNotFoundError as e:
        raise Gpt1Error(f"the current folder no longer exists ({e.strerror}); cd to an existing folder") from None
    # torch imports dill (a dependency of `datasets`) when it is installed, which asks for a
    # writable temporary folder at import: a container with a read-only root and no /tmp volume
    # got a 60-line traceback from every command.
    try:
        tempfile.gettempdir()
    except FileNotFoundError:
        raise Gpt1Error("no writable temporary folder (TMPDIR, /tmp, /var/tmp, /usr/tmp or the current folder); set "
                        "TMPDIR to one (a container with a read-only root filesystem needs a writable /tmp volume)") from None


def _check_stdout_open(args: argparse.Namespace, closed: set[int]) -> None:
    """A command whose product is its standard output (`stdout_product`, set by its `register`:
    generate's text, `plot --out -`'s image) refuses to start with stdout closed, as `ls >&-`
    fails: the work would be done, its result dropped and the exit status 0. The other commands
    only report there and run on."""
    product = getattr(args, "stdout_product", None)
    if 1 in closed and product is not None and (what := product(args)):
        raise Gpt1Error(f"standard output is closed (started with >&-), and this command writes {what} there; "
                        "redirect it to a file, or to /dev/null to discard it")


def _stdout_gone() -> None:
    """Send what is left for stdout to /dev/null: Python flushes it at exit, which would fail
    again (the reader is gone, or the disk is full) and print a traceback-like complaint."""
    with contextlib.suppress(OSError, ValueError):  # ValueError: a stream without a descriptor (tests)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    fit_arenas_to_address_limit()  # before any thread allocates (torch's, the tokenizers'): see gpt1.core.malloc
    closed = _standard_streams()
    with _interrupts_held():
        parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse takes one run of positionals: `key=value` overrides after a flag
        # (`gpt1 finetune --base B model=x --data D lr=1e-4`) are overrides too, in order.
        if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            hint = _recipe_key_hint(args, extra, sys.argv[1:] if argv is None else argv) or _flag_hint(args, extra)
            args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    command = args.command_parser.prog.partition(" ")[2]  # `tokenizer train`, as argparse's own errors name it
    setup_console_logging()
    if isinstance(sys.stdin, io.TextIOWrapper):
        # By default bad bytes fail deep inside a command (or, under a C locale, travel on as
        # lone surrogates): decoding stdin raises the one clear error at the edge instead.
        sys.stdin.reconfigure(encoding="utf-8", errors="gpt1-stdin")
    try:
        _check_working_folder()
        _check_arguments(args)
        _check_stdout_open(args, closed)
        # A server claims SIGTERM while it serves (uvicorn drains the open requests), then restores
        # this handler and raises the signal again: it ends here too, with its one line.
        with _sigterm_raises():
            with _interrupts_held():
                for module in LIBRARIES.get(args.command, ("torch",)):
                    import_quietly(module)
            status = args.func(args) or 0
            sys.stdout.flush()  # here, where a failure is reported, not at exit
            return status
    except Terminated as e:
        if not _said_by_another_process():
            how = " (hang-up: SIGHUP)" if e.signum != signal.SIGTERM else ""
            _say(f"gpt1 {command}: terminated{how}{_resume_hint(args)}")
        return 128 + e.signum
    except Gpt1Error as e:
        if _said_by_another_process(e):
            return 2
        return _error(command, str(e))
    except BrokenPipeError:
        # The reader of stdout is gone (`gpt1 generate ... | head`): nothing to say, and no one to
        # say it to; the status is the one a shell reports for a command a SIGPIPE ended (141:
        # Windows has no SIGPIPE, and its status says the same).
        _stdout_gone()
        return 128 + getattr(signal, "SIGPIPE", 13)
    except OSError as e:
        # Out of file descriptors (`ulimit -n`), wherever in the command: one line naming the limit.
        if (hint := open_files_hint(e)) is not None:
            where = f"{os.fsdecode(e.filename)}: cannot open" if e.filename is not None else "cannot open a file or socket"
            return _error(command, f"{where} ({e.strerror}); {hint}")
        # A process that cannot be started (fork or clone refused: `ulimit -u`, a container's pids
        # limit, where a thread and a process count alike), e.g. serve --engine process's child.
        if e.errno == errno.EAGAIN and PROCESS_STARTERS.intersection(_raised_by(e)):
            return _error(command, f"cannot start a process or thread ({e.strerror}); {threads_hint()}")
        if e.errno not in UNWRITABLE:
            raise
        # Every writing command meets these the same way (a read-only --out, a full disk, a
        # folder made read-only mid-run): one class, handled here rather than at each write.
        # gpt1 names every file it writes (core.write_errors.writing); a write without a name is one to
        # stdout (`> /dev/full`), or to a file of another package's own; stderr's failures nobody would see.
        if e.filename is None:
            package = _unnamed_writer(e)
            if package is None:
                _stdout_gone()
                return _error(command, f"standard output: cannot write ({e.strerror})")
            return _error(command, f"{package}: cannot write its file ({e.strerror}); "
                                   f"{UNWRITABLE[e.errno].format('output path')}")
        hint = UNWRITABLE[e.errno].format(_output_flag(args, e.filename))
        return _error(command, f"{e.filename}: cannot write ({e.strerror}); {hint}")
    except KeyboardInterrupt:
        if not _said_by_another_process():
            _say(f"\ngpt1 {command}: interrupted{_resume_hint(args)}")
        return 130
    except MemoryError:  # Python's own allocations (an import, a file read) under `ulimit -v`
        return _out_of_memory(command, "an allocation failed")
    except RuntimeError as e:  # torch.OutOfMemoryError (a GPU's) is one; the CPU allocator's is a plain one
        if "can't start new thread" in str(e):  # Python's threading, at `ulimit -u` or a pids limit
            return _error(command, f"cannot start a thread ({e}); {threads_hint()}")
        if memory_shortage(e) is None:
            raise
        asked = re.search(r"allocate (\d+) bytes|Tried to allocate ([\d.]+ [KMGT]iB)", str(e))
        size = (f"{int(asked[1]) / 2**30:.2f} GiB" if asked[1] else asked[2]) if asked else None
        return _out_of_memory(command, f"an allocation of {size} failed" if size else str(e).strip().splitlines()[0])


PROCESS_STARTERS = {"subprocess", "multiprocessing"}  # the modules through which gpt1 starts processes


def _raised_by(error: BaseException) -> list[str]:
    """The top-level modules of the frames `error` came through, innermost first (`subprocess`,
    `tensorboard`, `gpt1`); a thread's frames too, where the main thread raises its error again."""
    frames, tb = [], error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_globals.get("__name__", "").partition(".")[0])
        tb = tb.tb_next
    return frames[::-1] or [""]


def _unnamed_writer(error: OSError) -> str | None:
    """Whose write failed without a file name: None for standard output, else the package that
    wrote a file of its own. gpt1 names each of its files (core.write_errors.writing), so in its own code
    such a write is a print; in another package's (tensorboard's writer thread) it is stdout only
    where that code was handed stdout (matplotlib drawing `plot --out -`)."""
    package = next((name for name in _raised_by(error) if name not in sys.stdlib_module_names), "gpt1")
    if package in ("gpt1", "__main__"):
        return None
    stdout = {id(stream) for stream in (sys.stdout, getattr(sys.stdout, "buffer", None)) if stream is not None}
    tb = error.__traceback__
    while tb is not None:
        if any(id(value) in stdout for value in tb.tb_frame.f_locals.values()):
            return None
        tb = tb.tb_next
    return package


def _out_of_memory(command: str, what: str) -> int:
    hint = OUT_OF_MEMORY.get(command)
    if hint is None:  # nothing of the command's own to lower: the limit, if one is set, may be what ran out
        limit = address_space_limit()
        hint = OOM_HINT if limit is None else \
            f"raise the address-space limit (ulimit -v, now {limit // 1024}) or use a machine with more free memory"
    return _error(command, f"out of memory: {what}; {hint}")


# What to lower when a command runs out of memory (a traceback before).
OOM_HINT = "use a machine with more free memory"
OUT_OF_MEMORY = {
    "eval": "lower --batch-size, or use a machine with more memory",
    "prepare": "lower --batch-docs, or use a machine with more memory",
    "pretrain": "lower batch_size (grad_accum=N keeps the tokens per step), the model's shape (model, n_layer, "
                "n_embd, block_size), or set gradient_checkpointing=true",
    "finetune": "lower batch_size (grad_accum=N keeps the tokens per step), or set gradient_checkpointing=true",
    "quickstart": "the quickstart's model did not fit: use a machine with more free memory",
}


def _output_flag(args, filename) -> str:
    """The output flag whose path is `filename` or holds it (`--json e.json`; `--out RUN` for
    RUN/metrics.jsonl); "output path" for a file no flag named (eval --suite's MODEL/report.md)."""
    file = os.path.abspath(os.fsdecode(filename))
    for name in OUTPUT_FLAGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value != "-":  # --json alone: stdout
            path = os.path.abspath(value)
            if file == path or file.startswith(path.rstrip(os.sep) + os.sep):
                return f"--{name}"
    return "output path"


def _resume_hint(args) -> str:
    """What a rerun of an interrupted command does (a command may know better: `rerun_hint`)."""
    if args.command not in RESUMABLE:
        return ""
    hint = getattr(args, "rerun_hint", None)
    return hint(args) if hint else "; run the same command again to resume"


@contextlib.contextmanager
def _interrupts_held():
    """Hold a Ctrl-C until the block (imports) ends, then raise it. One that lands inside a C
    extension's import (numpy, while torch loads) is lost there, the command running anyway, or
    leaves a half-made module whose next import fails with a traceback. Only where Python's own
    handler is in place (main runs in tests and in other programs too)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    held = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt


class Terminated(BaseException):
    """SIGTERM (or SIGHUP), raised where the command is (a BaseException: no `except Exception`
    swallows it). `signum`: which; the exit status is 128 + it."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


# SIGHUP too: a closed terminal or SSH session (or `kill -HUP`) killed a command at once, skipping
# its cleanup, and a server's open streams were cut without their error event.
TERMINATING = (signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else []))


@contextlib.contextmanager
def _sigterm_raises(enabled: bool = True):
    """SIGTERM (`kill`, a scheduler's stop) and SIGHUP end the command as Ctrl-C does, through its
    cleanup (temporary files deleted, locks released) instead of at once. Each only where nothing
    else has claimed it (a server installs its own; nohup ignores SIGHUP), and restored after (main
    runs in tests too)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated(signum)

    claimed = [sig for sig in TERMINATING if signal.getsignal(sig) is signal.SIG_DFL]
    for sig in claimed:
        signal.signal(sig, terminate)
    try:
        yield
    finally:
        for sig in claimed:
            signal.signal(sig, signal.SIG_DFL)


def _error(command: str, message: str) -> int:
    if debug_enabled():
        with contextlib.suppress(OSError, ValueError):
            traceback.print_exc()
    # A message quoting a library's may hold newlines; spaces inside it (a quoted value) stay.
    one_line = printable(re.sub(r"\s*\n\s*", " ", message.strip()))  # names from files made elsewhere
    _say(f"gpt1 {command}: error: {one_line}")
    return 2


def _say(line: str) -> None:
    """Write the command's last line to stderr. A stderr that cannot take it (a log file at its
    `ulimit -f` or on a full disk) must not change the exit status that a supervisor reads: a
    SIGTERM's 143 became 1 with the failed write's traceback. What is left unwritten goes to
    /dev/null, or Python's flush at exit would fail again (exit status 120)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # ValueError: stderr closed (a test's stream, a caller's)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stderr.fileno())
            os.close(devnull)


def _stdin_not_utf8(error: UnicodeError) -> tuple[str, int]:
    raise Gpt1Error(f"stdin: the input is not valid UTF-8 (byte {error.object[error.start:error.start + 1]!r}); "
                    "type or pipe UTF-8 text")


codecs.register_error("gpt1-stdin", _stdin_not_utf8)


def _unencodable_output(error: UnicodeEncodeError) -> tuple[str | bytes, int]:
    # Lone surrogates are bytes Python could not decode (a file name under LANG=C): written back
    # as they came. Other text the encoding lacks (generated text under PYTHONIOENCODING=ascii)
    # is written as \x escapes: visible, where a replacement character would hide what it was.
    try:
        return codecs.lookup_error("surrogateescape")(error)
    except UnicodeError:
        return codecs.backslashreplace_errors(error)


codecs.register_error("gpt1-out", _unencodable_output)


def run() -> None:
    try:
        status = main()
    except KeyboardInterrupt:  # before a command started: while the parser was built or read argv
        if not _said_by_another_process():
            _say("\ngpt1: interrupted")
        status = 130
    # A BPE training interrupted while Rust reads its corpus keeps calling back into Python from
    # its (daemon) thread; at the interpreter's shutdown that thread is ended from inside glibc,
    # through the Rust frames, which abort the process: "FATAL: exception not rethrown", exit 134
    # and a core file instead of 130/143. Nothing of gpt1's waits on atexit, so skip the shutdown.
    if any(t.name == BPE_TRAINING_THREAD and t.is_alive() for t in threading.enumerate()):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)
    sys.exit(status)
