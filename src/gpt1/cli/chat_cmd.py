"""`gpt1 chat`: an interactive multi-turn chat in the terminal, replies streamed."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from typing import TYPE_CHECKING

import gpt1
from gpt1.cli.args import text
from gpt1.cli.generate_cmd import (
    ESCAPE_HELP,
    add_model_flags,
    add_sampling_flags,
    check_new_tokens,
    escape,
    sampling_params_from_args,
    terminal_text,
    unescape,
    warn_if_base_model,
    warn_if_capped,
)
from gpt1.core.errors import Gpt1Error
from gpt1.core.progress import info, printable
from gpt1.core.sampling_params import KNOB_RANGES, alias_hint, preset

# gpt1.inference (torch) is imported by the functions that use it: `gpt1 --help` imports this module.
if TYPE_CHECKING:
    from gpt1.inference.decoding import Chunk

PRESET_KNOBS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n")
HELP = """commands:
  /set KNOB VALUE  change a sampling knob, e.g. /set temperature 0.7 (/set alone shows them all;
                   /set stop TEXT sets one stop string with \\n-style escapes as --stop, /set stop
                   clears it; /set max_new_tokens default: back to the default, 256 or the room the
                   context leaves)
  /preset NAME     use a preset's sampling knobs: qa, creative or code
  /system TEXT     set the system message (/system alone removes it)
  /reset           forget the conversation (the system message stays)
  /help            this help
  /quit            leave (so do Ctrl-D and Ctrl-C at the prompt; Ctrl-C during a reply stops the reply)
  //TEXT           send a message that starts with "/" (//etc/hosts sends /etc/hosts)"""
NO_ARGUMENT = ("quit", "exit", "q", "help", "reset")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "chat", help="interactive multi-turn chat in the terminal",
        description="Chat with a model: type a message, the reply streams back. The conversation is kept\n"
                    "within the context by dropping the oldest turns. A base model (no chat_template.jinja)\n"
                    "just continues the text.",
        epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.add_argument("--system", default=None, metavar="TEXT", type=text, help="a system message for the whole conversation")
    add_sampling_flags(parser)
    parser.set_defaults(func=chat_command)


# Sampling knobs the terminal chat has no use for: it prints the reply's text only (`/set` listed
# them as "logprobs random", and `/set logprobs 3` failed on "got 3.0").
NOT_CHAT_KNOBS = ("logprobs", "prompt_logprobs")


def parse_knob(params, name: str, value: str):
    """`params` with the knob `name` set from the text `value` (as typed after /set)."""
    name = name.replace("-", "_")
    if name in NOT_CHAT_KNOBS:
        raise Gpt1Error(f"{name}: the terminal chat shows no log-probabilities; the Python API's `logprobs=` and "
                        "the server's `logprobs` do")
    if name not in KNOB_RANGES:
        raise Gpt1Error(f"unknown knob {name!r}{alias_hint(name)}; known: {', '.join(k for k in KNOB_RANGES if k not in NOT_CHAT_KNOBS)}")
    if name == "stop":
        # Escapes let a user type a newline stop string as \n (the same syntax as --stop).
        try:
            parsed = (unescape(value),) if value else ()
        except ValueError as e:
            raise Gpt1Error(f"stop {value}: {e} ({ESCAPE_HELP})") from None
        return dataclasses.replace(params, stop=parsed).validate()
    try:
        if name == "seed" and value.lower() in ("", "none", "random"):
            parsed = None
        elif name == "truncate_prompt":
            parsed = {"true": True, "on": True, "1": True, "false": False, "off": False, "0": False}[value.lower()]
        elif name in ("top_k", "repeat_last_n", "max_new_tokens", "seed"):
            parsed = int(value)
        else:
            parsed = float(value)
    except (KeyError, ValueError):
        raise Gpt1Error(f"{name} must be {KNOB_RANGES[name]}, got {value!r}") from None
    if name == "max_new_tokens":
        check_new_tokens(parsed)
    return params.override(**{name: parsed})


def knob_text(value) -> str:
    if value is None:
        return "random"  # the only knob of the chat's that can be None is the seed
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):  # stop strings, each as `/set stop` takes it
        return ", stop ".join(map(escape, value)) if value else "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


class ChatSession:
    """The state of a terminal chat: knobs, system message and history, and its commands."""

    def __init__(self, llm, params, system: str | None = None, max_new_tokens_chosen: bool = False):
        self.llm = llm
        self.params = params
        self.system = system
        self.history: list[dict[str, str]] = []
        # Whether the user chose max_new_tokens (--max-new-tokens, /set): only such a value that
        # does not fit is worth a word, and one word per value, not one per turn.
        self.max_new_tokens_chosen = max_new_tokens_chosen
        self.capped_warned = False

    def command(self, line: str) -> bool:
        """Run a /command; False means quit. Bad input raises Gpt1Error (the session goes on)."""
        name, _, rest = line[1:].partition(" ")
        rest = rest.strip()
        if name in NO_ARGUMENT and rest:  # "/reset me" is more likely a message than a wish to forget
            raise Gpt1Error(f"/{name} takes no argument (a message that starts with / is typed //{line[1:]})")
        if name in ("quit", "exit", "q"):
            return False
        if name == "help":
            print(HELP, file=sys.stderr)
        elif name == "reset":
            self.history.clear()
            print("(conversation cleared)", file=sys.stderr)
        elif name == "set":
            knob, _, value = rest.partition(" ")
            value = value.strip()
            if knob.replace("-", "_") == "max_new_tokens" and value.lower() == "default":
                # Back to gpt1's default: a bound that the context's room lowers without a word.
                default = next(f.default for f in dataclasses.fields(self.params) if f.name == "max_new_tokens")
                self.params = dataclasses.replace(self.params, max_new_tokens=default)
                self.max_new_tokens_chosen, self.capped_warned = False, False
            elif knob:
                self.params = parse_knob(self.params, knob, value)
                if knob.replace("-", "_") == "max_new_tokens":
                    self.max_new_tokens_chosen, self.capped_warned = True, False
            print(f"({self.describe()})", file=sys.stderr)
        elif name == "preset":
            # A preset sets how tokens are chosen; length, stop strings and seed stay as they are.
            chosen = preset(rest)
            self.params = dataclasses.replace(self.params, **{k: getattr(chosen, k) for k in PRESET_KNOBS})
            print(f"({rest}: {self.describe()})", file=sys.stderr)
        elif name == "system":
            self.system = rest or None
            print(f"(system message {'set' if rest else 'removed'})", file=sys.stderr)
        else:
            raise Gpt1Error(f"unknown command /{name}; type /help (a message that starts with / is typed //{line[1:]})")
        return True

    def describe(self) -> str:
        """The knobs as /set takes them: `stop none`, `stop \\n`, `seed random`, `truncate_prompt on`."""
        return ", ".join(f"{f.name} {knob_text(getattr(self.params, f.name))}" for f in dataclasses.fields(self.params)
                         if f.name not in NOT_CHAT_KNOBS)

    def reply(self, text: str, out=None) -> str:
        """Stream the reply to `text` to `out` (default: the current stdout); keeps history within the context."""
        from gpt1.inference import generate as gen
        from gpt1.inference.decoding import chat_prompt_ids, fit_new_tokens, prompt_tail, warn_if_cut, warn_if_message_cut

        out = out or sys.stdout
        shown = terminal_text(out)  # the history keeps the reply as generated
        # Only the end of a message longer than the context can stay: it is tokenized (and kept in
        # the history) from there, with the same ids (see prompt_tail).
        kept = prompt_tail(self.llm.tokenizer, text, self.llm.config.block_size) if self.params.truncate_prompt else text
        self.history.append({"role": "user", "content": kept})
        # An empty --system is a system message, as in `generate --chat` and the server.
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        ids = None
        try:
            block = self.llm.config.block_size
            # The default max_new_tokens (not chosen) keeps room for the reply by dropping old turns, as
            # a chosen one does, but never cuts or refuses a message that fits the context with the
            # system message: it is then capped at the room left, as `generate --chat` caps it.
            ids, dropped, cut = chat_prompt_ids(self.llm.tokenizer, system + self.history, block, self.params,
                                                max_new_tokens_chosen=self.max_new_tokens_chosen, reply_room=True)
            params = fit_new_tokens(self.params, ids, block, self.max_new_tokens_chosen)
            if self.max_new_tokens_chosen and not self.capped_warned:
                self.capped_warned = warn_if_capped(params, ids, block, "/set max_new_tokens N to change it")
        except Gpt1Error as e:
            self.history.pop()
            if ids is None or not self.history:
                raise
            # With truncation off, the earlier turns are what does not fit: say how to go on.
            raise Gpt1Error(f"the conversation with this message is {len(ids)} tokens and no longer fits the "
                            f"{block}-token context ({e}); /reset starts a new one, /set truncate_prompt on "
                            "drops the oldest turns") from None
        if dropped:
            del self.history[:dropped]
            info(f"(dropped the {dropped} oldest message(s) to fit the {self.llm.config.block_size}-token context)")
        pieces: list[str] = []
        last = None
        try:
            for last in gen.stream(self.llm.model, self.llm.tokenizer, ids, params):
                out.write(shown(last.text))
                out.flush()
                pieces.append(last.text)
        except KeyboardInterrupt:
            # Ctrl-C stops this reply, not the session; the partial reply stays in the history.
            print("\n(reply interrupted)", file=sys.stderr)
            last = None
        out.write("\n")
        out.flush()
        if last is not None:  # on a line of its own, after the reply: one message longer than the context
            warn_if_message_cut(cut, len(text) - len(kept))
            warn_if_cut(len(ids), last.prompt_tokens)
            self._say_why_cut_short(last)
        reply = "".join(pieces)
        self.history.append({"role": "assistant", "content": reply})
        return reply

    def _say_why_cut_short(self, last: Chunk) -> None:
        """A reply that ended at a length limit (the chat page's words, which tell the two apart):
        the context's, before max_new_tokens were generated, or max_new_tokens'."""
        if last.finish_reason != "length":
            return
        if last.completion_tokens < self.params.max_new_tokens:  # the user's (or the default) max, not the capped one
            info(f"(stopped at the context limit: {self.llm.config.block_size} tokens)")
        else:
            info(f"(stopped at max_new_tokens {self.params.max_new_tokens}: /set max_new_tokens N for longer replies)")


def read_line(number: int) -> str:
    """Line `number` of the input, without its line end; EOFError at the end. Each line is decoded
    alone: one that is not UTF-8 is a Gpt1Error naming it, for the caller to report and read on
    (decoding stdin in chunks made one bad byte end the session, earlier piped lines unanswered)."""
    terminal = sys.stdin.isatty()
    try:
        if terminal and sys.stdout.isatty():
            return input("> ")  # with readline's line editing and history
        if terminal:  # stdout is a file (`gpt1 chat > transcript.txt`): the prompt is no part of it
            print("> ", end="", file=sys.stderr, flush=True)
        raw = sys.stdin.buffer.readline() if hasattr(sys.stdin, "buffer") else sys.stdin.readline()  # tests: text
        if not raw:
            raise EOFError
        return (raw if isinstance(raw, str) else raw.decode("utf-8")).removesuffix("\n")
    except UnicodeDecodeError as e:
        where = "that message" if terminal else f"line {number}"
        raise Gpt1Error(f"{where} is not valid UTF-8 (byte {e.object[e.start:e.start + 1]!r} at byte {e.start}); "
                        f"it was not sent: {'type' if terminal else 'pipe'} UTF-8 text") from None


def chat_command(args: argparse.Namespace) -> int:
    params = sampling_params_from_args(args)
    llm = gpt1.load(args.model, device=args.device, dtype=args.dtype)
    warn_if_base_model(llm, args.model)
    session = ChatSession(llm, params, args.system, max_new_tokens_chosen=args.max_new_tokens is not None)
    if sys.stdin is None:  # started with stdin closed (0<&-): nothing to read, as at end of input
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:  # not on Windows
            pass
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="strict")  # input() on a terminal: a UnicodeDecodeError for read_line
    info("type a message; /help for commands, /quit or Ctrl-D to leave")
    failed: list[int] = []  # the input lines that failed
    for number in itertools.count(1):
        try:
            line = read_line(number)
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print(file=sys.stderr)
            break
        except Gpt1Error as e:
            print(f"error: {printable(str(e))}", file=sys.stderr)
            failed.append(number)
            continue
        except OSError as e:  # opened write-only (`0>/dev/null`: EBADF): no line will ever come
            raise Gpt1Error(f"standard input: cannot read ({e.strerror})") from None
        text = line.strip()
        if not text:
            continue
        try:
            if text.startswith("//"):
                session.reply(line.rstrip("\r").lstrip()[1:])
            elif text.startswith("/"):
                if not session.command(text):
                    break
            else:
                session.reply(line.rstrip("\r"))  # a Windows line end is not part of the message
        except Gpt1Error as e:
            print(f"error: {printable(str(e))}", file=sys.stderr)
            failed.append(number)
    # A typist saw each error as it came and went on; a script piping lines in reads only the exit
    # status, which says whether every line was done (at the end of the input or at /quit).
    if failed and not interactive:
        lines = ", ".join(map(str, failed[:10])) + (", ..." if len(failed) > 10 else "")
        raise Gpt1Error(f"{len(failed)} input line(s) failed (line {lines}; the errors are above)")
    return 0
