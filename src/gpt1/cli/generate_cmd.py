"""`gpt1 generate`: one completion (or, with --chat, one chat reply), streamed to stdout."""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import TYPE_CHECKING, Callable, Iterable

import gpt1
from gpt1.cli.args import add_dtype_flag, path_arg, positive_int, text
from gpt1.core.errors import Gpt1Error
from gpt1.core.progress import info, printable, warn
from gpt1.core.sampling_params import PRESETS, SamplingParams, preset

# gpt1.inference (torch) is imported by the functions that use it: `gpt1 --help` imports this module.
if TYPE_CHECKING:
    from gpt1.inference.decoding import Chunk

# flag -> (SamplingParams field, type, help); defaults are SamplingParams' own.
KNOB_FLAGS = {
    "--temperature": ("temperature", float, "randomness; 0 = greedy"),
    "--top-k": ("top_k", int, "sample among the K most likely tokens; 0 = off"),
    "--top-p": ("top_p", float, "sample among the most likely tokens whose probabilities sum to P; 1 = off"),
    "--min-p": ("min_p", float, "drop tokens less likely than P x the most likely one; 0 = off"),
    "--repeat-penalty": ("repeat_penalty", float, "penalise tokens already in the window (CTRL/llama.cpp); 1 = off"),
    "--repeat-last-n": ("repeat_last_n", int, "the repeat-penalty window in tokens, prompt included; -1 = whole context"),
    "--max-new-tokens": ("max_new_tokens", int, "most tokens to generate"),
    "--seed": ("seed", int, "random seed: the same seed gives the same text (on a CPU, at a fixed thread count: OMP_NUM_THREADS)"),
}


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """The sampling flags shared by `generate` and `chat` (default=None: unset flags keep the
    preset's or SamplingParams' value)."""
    defaults = SamplingParams()
    group = parser.add_argument_group("sampling (defaults: SamplingParams, or the --preset)")
    for flag, (field, kind, description) in KNOB_FLAGS.items():
        group.add_argument(flag, type=kind, default=None, metavar=field.split("_")[-1].upper(),
                           help=f"{description} (default {'random' if field == 'seed' else getattr(defaults, field)})")
    group.add_argument("--stop", action="append", default=None, metavar="TEXT", type=stop_arg,
                       help="stop when the text contains TEXT (not printed), with \\n-style escapes as /set stop "
                            "reads them (--stop '\\n' stops at a line end); repeatable")
    group.add_argument("--preset", choices=sorted(PRESETS),
                       help="the model card's settings: " + "; ".join(
                           f"{name}: temperature {p.temperature}, top-k {p.top_k}, top-p {p.top_p}, "
                           f"repeat penalty {p.repeat_penalty}" for name, p in PRESETS.items()))
    group.add_argument("--no-truncate", action="store_true",
                       help="refuse a prompt that leaves no room for --max-new-tokens instead of keeping its most "
                            "recent tokens")


# One syntax for a stop string wherever it is typed (--stop, /set stop): a shell cannot pass a
# line end in '\n', and /set cannot take a real one.
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}
ESCAPE_HELP = 'escapes: \\n, \\t, \\r, \\", \\xNN, \\uNNNN, \\UNNNNNNNN, \\\\ for a backslash'


def unescape(value: str) -> str:
    """A stop string as typed, its escapes read (a real line end, as from $'\\n', stays one);
    ValueError saying what is wrong with a bad escape."""
    def one(match: re.Match) -> str:
        seq = match.group(1)
        if seq in ESCAPES:
            return ESCAPES[seq]
        if len(seq) > 1:  # \xNN, \uNNNN, \UNNNNNNNN
            code = int(seq[1:], 16)
            if 0xD800 <= code < 0xE000 or code > 0x10FFFF:
                raise ValueError(f"\\{seq} is not a character")
            return chr(code)
        if not seq:
            raise ValueError("it ends in a lone backslash")
        if seq in "xuU":
            raise ValueError(f"\\{seq} needs {dict(x=2, u=4, U=8)[seq]} hex digits")
        raise ValueError(f"unknown escape \\{seq}")

    return re.sub(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.?)", one, value, flags=re.DOTALL)


def escape(value: str) -> str:
    """`value` as it is typed for unescape(): line ends, tabs, backslashes and what a terminal
    cannot show as escapes, and so are spaces at either end (/set strips those)."""
    shown = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\\": "\\\\"}

    def one(char: str) -> str:
        if char in shown or char.isprintable():
            return shown.get(char, char)
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"

    return re.sub(r"^ +| +$", lambda spaces: "\\x20" * len(spaces.group()), "".join(map(one, value)))


def stop_arg(value: str) -> str:
    """--stop TEXT: the text with its escapes read (argparse names the flag in the error)."""
    try:
        return unescape(text(value))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{value}: {e} ({ESCAPE_HELP})") from None


def sampling_params_from_args(args: argparse.Namespace):
    """SamplingParams from the preset (or the defaults) plus only the flags that were given."""
    knobs = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in KNOB_FLAGS.items()}
    knobs = {k: v for k, v in knobs.items() if v is not None}
    if args.stop is not None:
        knobs["stop"] = tuple(args.stop)
    if args.no_truncate:
        knobs["truncate_prompt"] = False
    check_new_tokens(knobs.get("max_new_tokens"))
    return (preset(args.preset) if args.preset else SamplingParams()).override(**knobs)


def check_new_tokens(value) -> None:
    """Refuse a max_new_tokens below 1 (before SamplingParams, whose range includes 0): the
    library's 0 generates nothing and scores a prompt (its prompt_logprobs), which the CLI does not print."""
    if isinstance(value, int) and not isinstance(value, bool) and value < 1:
        raise Gpt1Error(f"max_new_tokens must be an integer >= 1 here, got {value} (0 generates nothing: it scores "
                        "a prompt, in the library or the server's /v1/completions)")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=path_arg, metavar="DIR", help="model dir (config.json, model.safetensors, tokenizer.json)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1, mps (default: the best available)")
    add_dtype_flag(parser)


def warn_if_capped(params: SamplingParams, prompt_ids: list[int], block_size: int, how: str) -> bool:
    """Say so when a max_new_tokens the user chose cannot be reached: the context ends generation
    earlier (`how`: how to change it). Counts the prompt as the model will see it. True if it warned."""
    from gpt1.inference.decoding import fit_prompt, new_token_limit

    prompt_tokens = len(fit_prompt(prompt_ids, block_size, params))
    limit = new_token_limit(prompt_tokens, block_size, params)
    if limit < params.max_new_tokens:
        warn(f"max_new_tokens {params.max_new_tokens} does not fit: the context is {block_size} tokens and the prompt "
             f"takes {prompt_tokens}, so generation stops after at most {limit} tokens ({how})")
    return limit < params.max_new_tokens


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate a completion (or a chat reply) with every sampling knob, streamed",
        description="Generate text from a prompt, streamed to stdout as it is produced (token counts and speed go "
                    "to stderr). The prompt comes from --prompt or standard input. With --chat the prompt is a user "
                    "turn in the chat template and the output is the assistant's reply.")
    add_model_flags(parser)
    parser.add_argument("--prompt", default=None, type=text, help="the prompt (default: read standard input)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn and print the assistant's reply")
    parser.add_argument("--system", default=None, metavar="TEXT", type=text, help="with --chat: a system message before the user turn")
    parser.add_argument("--num-samples", type=positive_int, default=1, metavar="N",
                        help="N samples of the prompt, decoded together and printed in turn, each after a line of "
                             f"{len(SAMPLE_SEPARATOR.strip())} dashes; with --seed S their seeds are S, S+1, ... "
                             "(default 1)")
    add_sampling_flags(parser)
    parser.set_defaults(func=generate_command, stdout_product=lambda args: "the generated text")


# Between two samples of --num-samples, as nanoGPT's sample.py prints them: a line of dashes.
SAMPLE_SEPARATOR = "\n---------------\n"


def terminal_text(out) -> Callable[[str], str]:
    """How generated text is written to `out`: as it is, except to a terminal, where its control
    characters (but line ends and tabs) are shown as escapes (`printable`): a sampled ESC would
    start an escape sequence that acts on the terminal (recolour, retitle, rewrite lines)."""
    return printable if out.isatty() else str


def print_samples(chunks: Iterable[tuple[int, Chunk]], n: int, out) -> tuple[list[Chunk], str]:
    """Write the text of `n` samples to `out` in order, SAMPLE_SEPARATOR between them: the first
    as it is produced, a later one's pieces held until the samples before it have ended. Each
    sample's last chunk (its finish reason and token counts), and the last character written."""
    shown = terminal_text(out)
    held: list[list[str]] = [[] for _ in range(n)]
    lasts: list[Chunk | None] = [None] * n
    current, end = 0, "\n"
    for index, chunk in chunks:
        held[index].append(chunk.text)
        if chunk.finish_reason is not None:
            lasts[index] = chunk
        while current < n:
            text, held[current] = "".join(held[current]), []
            if text:
                out.write(shown(text))
                out.flush()
                end = text[-1]
            if lasts[current] is None:
                break
            current += 1
            if current < n:
                out.write(SAMPLE_SEPARATOR)
                end = SAMPLE_SEPARATOR[-1]
    return lasts, end


def warn_if_base_model(llm: gpt1.LLM, model: str) -> None:
    if not llm.is_chat_model:
        warn(f"{model} has no chat template: it is a base model, which continues the conversation text "
             "rather than answering it")


def generate_command(args: argparse.Namespace) -> int:
    from gpt1.inference import generate as gen
    from gpt1.inference.decoding import chat_prompt_ids, fit_new_tokens, prompt_tail, warn_if_cut, warn_if_message_cut

    params = sampling_params_from_args(args)
    if args.system is not None and not args.chat:
        raise Gpt1Error("--system needs --chat")
    prompt = args.prompt
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():  # None: started with stdin closed (0<&-)
            raise Gpt1Error("no prompt: give --prompt TEXT or pipe the prompt on standard input")
        # `echo X | gpt1 generate` is the prompt X, as --prompt X and `$(cat file)` are: one line
        # end goes (a prompt that should end in one ends in two).
        try:
            prompt = sys.stdin.read().removesuffix("\n").removesuffix("\r")
        except OSError as e:  # opened write-only (`0>/dev/null`): EBADF
            raise Gpt1Error(f"standard input: cannot read ({e.strerror})") from None
    llm = gpt1.load(args.model, device=args.device, dtype=args.dtype)
    # Only the prompt's end can reach the model: a long one is tokenized from there (see prompt_tail).
    kept = prompt_tail(llm.tokenizer, prompt, llm.config.block_size) if params.truncate_prompt else prompt
    chosen = args.max_new_tokens is not None  # else the default, a bound: capped by fit_new_tokens
    if args.chat:
        warn_if_base_model(llm, args.model)
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else [])
        messages.append({"role": "user", "content": kept})
        ids, _, cut = chat_prompt_ids(llm.tokenizer, messages, llm.config.block_size, params,
                                      max_new_tokens_chosen=chosen)
        warn_if_message_cut(cut, len(prompt) - len(kept))
    else:
        ids = llm.tokenizer.encode(kept)
    params = fit_new_tokens(params, ids, llm.config.block_size, chosen)
    if chosen:
        warn_if_capped(params, ids, llm.config.block_size, "lower --max-new-tokens")
    samples = params.samples(args.num_samples)
    start = time.perf_counter()
    lasts, text_end = print_samples(gen.stream_batch(llm.model, llm.tokenizer, [ids] * len(samples), samples),
                                    len(samples), sys.stdout)
    # On a terminal the stats line below starts a line of its own; into a file or a pipe the text
    # goes as generated, the same as the server's and llm.generate's.
    if text_end != "\n" and sys.stdout.isatty():
        sys.stdout.write("\n")
    seconds = time.perf_counter() - start
    prompt_tokens, generated = lasts[0].prompt_tokens, sum(last.completion_tokens for last in lasts)
    # A tail's token count is not the prompt's: its length is told in characters.
    warn_if_cut(len(ids), prompt_tokens, len(prompt) if not args.chat and len(kept) < len(prompt) else None)
    info(f"[{prompt_tokens} prompt tokens, {generated} generated{f' ({len(lasts)} samples)' if len(lasts) > 1 else ''} "
         f"in {seconds:.2f} s ({generated / max(seconds, 1e-9):.1f} tokens/s, {str(llm.dtype).removeprefix('torch.')} "
         f"on {llm.device}), finish: {', '.join(last.finish_reason for last in lasts)}]")
    return 0
