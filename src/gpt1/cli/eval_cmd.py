"""`gpt1 eval`: perplexity and bits per byte on held-out data, or benchmark tasks scored like lm-eval."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import gpt1
from gpt1.cli.args import DefaultsHelpFormatter, path_arg, positive_int
from gpt1.core.atomic import write_json
from gpt1.core.errors import Gpt1Error
from gpt1.core.paths import file_target
from gpt1.data.sources import describe_skipped
from gpt1.train.tasks import SUITES, TASKS, get_task

# The scoring modules (torch) are imported by the functions that use them: `gpt1 --help` imports this one.
if TYPE_CHECKING:
    from gpt1.train.harness import TaskResult

REPORT_FILE = "report.md"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="perplexity on held-out data, or benchmark tasks (HellaSwag, ARC, ...) scored like lm-eval",
        description="Perplexity mode (--data without --task): the loss, perplexity and bits per byte of a model dir "
                    "on a prepared data dir's val.bin, or on text files/directories/globs/hf:DATASET (one stream, "
                    "tokenized with [EOS] after each document), in context windows that predict every token after "
                    "the first once (the last window ends at the last token, its context overlapping the window "
                    "before, as lm-eval's rolling windows do); --per-document scores each document alone, as "
                    "lm-eval's loglikelihood_rolling does, with its word and byte perplexity. Task mode (--task or "
                    "--suite): multiple-choice and LAMBADA benchmarks with the prompts, "
                    f"continuations and metrics of lm-evaluation-harness 0.4.x. Tasks: {', '.join(TASKS)}.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, type=path_arg, help="model dir (or training run dir; a chat model's adapter is merged)")
    # extend: a repeated --data adds its sources (as finetune's does), where the plain nargs="+"
    # kept only the last one's and scored part of the corpus without a word.
    parser.add_argument("--data", nargs="+", action="extend", type=path_arg, metavar="SOURCE",
                        help="perplexity: a prepared data dir (its val.bin) or text sources (repeat --data to add more). "
                             "Tasks: local task files in the hub's schema instead of the hub: TASK=FILE.jsonl, "
                             "TASK=FOLDER (SPLIT.jsonl files), TASK=hf:NAME@REVISION, a folder holding TASK.jsonl "
                             "files, or with one task its file")
    tasks = parser.add_argument_group("benchmark tasks")
    tasks.add_argument("--task", metavar="NAME[,NAME...]", help=f"tasks to score: {', '.join(TASKS)}")
    tasks.add_argument("--suite", choices=sorted(SUITES),
                       help="quick: " + ", ".join(f"{t} ({n})" for t, n in SUITES["quick"].items())
                            + " examples; full: every task, every example. Writes report.md into the model dir")
    tasks.add_argument("--fewshot", type=int, default=0, metavar="K", help="examples in each prompt (as lm-eval draws them)")
    tasks.add_argument("--limit", type=positive_int, default=None, metavar="N", help="score the first N examples of each task")
    tasks.add_argument("--samples", type=path_arg, metavar="PATH",
                       help="write per-example log-likelihoods as JSON lines to PATH (-: standard output)")
    tasks.add_argument("--report", type=path_arg, metavar="PATH",
                       help=f"write the Markdown report to PATH (-: standard output; --suite: MODEL/{REPORT_FILE})")
    tasks.add_argument("--ppl-data", nargs="+", action="extend", type=path_arg, metavar="SOURCE",
                       help="with --suite/--report: also measure perplexity and bits per byte on these sources")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="perplexity: windows per forward pass (default 8); tasks: requests per batch (default 32)")
    parser.add_argument("--block-size", type=positive_int, default=None,
                        help="window length (default: the model's context)")
    parser.add_argument("--max-batches", type=positive_int, default=None, help="evaluate at most this many batches")
    parser.add_argument("--precision", choices=["fp32", "fp16-mixed", "bf16-mixed"], default="fp32",
                        help="autocast precision of the forward passes")
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    parser.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet/datasets")
    parser.add_argument("--per-document", action="store_true",
                        help="perplexity of text sources: score each document alone after the [EOS] prefix token, "
                             "without the other documents' context or the [EOS] after it, as lm-eval's "
                             "loglikelihood_rolling (wikitext-style tasks) does; bits/byte is then lm-eval's "
                             "bits_per_byte, and its word_perplexity and byte_perplexity are added")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="perplexity, --ppl-data and --chat sources: skip (and count) malformed lines and "
                             "documents instead of stopping at the first one (a task file's are always errors)")
    parser.add_argument("--chat", action="store_true",
                        help="the data is one chat source (OASST2 hub name or export, chat .jsonl/.json, chatterbot; see "
                             "`gpt1 finetune --help`): report the loss, perplexity and bits per byte of the assistant "
                             "tokens of its validation conversations")
    parser.add_argument("--split", default=None,
                        help="with --chat and a dataset (hub name or dataset folder, not a file): read this split whole "
                             "(default: the validation split, or the share of the conversations fine-tuning holds out)")
    parser.add_argument("--json", nargs="?", type=path_arg, const="-", metavar="PATH",
                        help="write the results as JSON to PATH (no PATH: print them to stdout instead of the text)")
    parser.set_defaults(func=eval_command, stdout_product=_stdout_product)


# The outputs (--NAME) that write to standard output when named "-" (--json alone too).
STDOUT_OUTPUTS = ("json", "samples", "report")


def _on_stdout(args: argparse.Namespace) -> list[str]:
    return [f"--{name}" for name in STDOUT_OUTPUTS if getattr(args, name) == "-"]


def _stdout_product(args: argparse.Namespace) -> str | None:
    """What eval writes to stdout that no file holds: an output named "-", or the scores unless
    --json PATH or --suite's report.md holds them."""
    if claimed := _on_stdout(args):
        return f"the output of {claimed[0]} -"
    return None if args.json is not None or args.suite else "the scores"


def eval_command(args: argparse.Namespace) -> int:
    if len(claimed := _on_stdout(args)) > 1:  # two documents run together on stdout: neither would parse
        raise Gpt1Error(f"{' and '.join(claimed)} both write to standard output (-); give all but one of them a PATH")
    if args.split is not None and not args.chat:
        raise Gpt1Error("--split applies to --chat sources only")
    if args.task is not None and not [n for n in args.task.split(",") if n.strip()]:
        raise Gpt1Error(f"--task: expected task names (NAME[,NAME...]) from: {', '.join(TASKS)}; got {args.task!r}")
    if args.task or args.suite:
        perplexity_only = [flag for flag, given in (("--chat", args.chat), ("--block-size", args.block_size),
                                                    ("--max-batches", args.max_batches),
                                                    ("--per-document", args.per_document),
                                                    ("--text-field", args.text_field != "text")) if given]
        if perplexity_only:  # each would be silently ignored: tasks score whole examples in the model's context
            raise Gpt1Error(f"{perplexity_only[0]} applies to perplexity (--data without --task/--suite), not to benchmarks")
        return _tasks_eval(args)
    task_only = [flag for flag, given in (("--fewshot", args.fewshot), ("--limit", args.limit), ("--samples", args.samples),
                                          ("--report", args.report), ("--ppl-data", args.ppl_data)) if given]
    if task_only:
        raise Gpt1Error(f"{task_only[0]} applies to benchmarks (--task or --suite), not to perplexity")
    if not args.data:
        raise Gpt1Error("pass --data (perplexity) or --task/--suite (benchmarks)")
    if args.per_document and args.chat:  # --chat scores assistant tokens of conversations, not documents
        raise Gpt1Error("--per-document applies to text sources, not to --chat")
    _check_outputs(args.json)
    llm = gpt1.load(args.model, device=args.device)
    if args.chat:
        return _chat_eval(llm, args)
    result = _perplexity(llm, args.data, args)
    # The scores first, as task mode's table: a --json PATH write that fails anyway (a full disk)
    # does not take them with it. Bare --json prints the JSON instead of the line.
    if args.json != "-":
        if args.per_document:
            print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  bits/byte {result['bits_per_byte']:.4f}  "
                  f"word perplexity {result['word_perplexity']:.4f}  byte perplexity {result['byte_perplexity']:.4f}  "
                  f"({result['tokens']:,} tokens of {result['documents']:,} documents, each scored alone, in "
                  f"{result['source']})")
        else:
            print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  bits/byte {result['bits_per_byte']:.4f}  "
                  f"({result['tokens']:,} tokens of {result['source']})")
    if result["skipped"]:
        print(f"skipped: {describe_skipped(result['skipped_by_reason'])}", file=sys.stderr)
    if args.json:
        _emit_json(args.json, result)
    return 0


def _perplexity(llm, data: list[str], args: argparse.Namespace) -> dict:
    from gpt1.train.evaluate import evaluate_data

    result = evaluate_data(llm, data, batch_size=args.batch_size or 8, block_size=args.block_size,
                           max_batches=args.max_batches, precision=args.precision, text_field=args.text_field,
                           skip_invalid=args.skip_invalid, per_document=args.per_document)
    scores = {"loss": result.loss, "perplexity": result.perplexity, "bits_per_byte": result.bits_per_byte,
              "tokens": result.tokens, "bytes": result.bytes, "source": result.source, "skipped": result.skipped,
              "skipped_by_reason": result.skipped_by_reason}
    if args.per_document:  # lm-eval's three loglikelihood_rolling metrics, bits_per_byte among them
        scores.update(word_perplexity=result.word_perplexity, byte_perplexity=result.byte_perplexity,
                      documents=result.documents, words=result.words)
    return scores


def _check_outputs(*paths: str | None) -> None:
    """Each file to write checked before the model loads (in the way, or not writable): a bad
    path found before the scoring, not after."""
    for path in paths:
        if path and path != "-":  # --json with no PATH: stdout
            file_target(path)


def _emit_json(target: str, obj: dict) -> None:
    if target == "-":
        print(json.dumps(obj))
    else:
        write_json(target, obj)


def _chat_eval(llm, args: argparse.Namespace) -> int:
    from gpt1.data.conversation import ChatStats
    from gpt1.train.evaluate import evaluate_chat

    if len(args.data) != 1:
        raise Gpt1Error("--chat takes one chat source in --data")
    if args.text_field != "text":  # chat records hold messages, not a text field: it would be ignored
        raise Gpt1Error("--text-field applies to text sources, not to --chat (chat records hold 'messages')")
    stats = ChatStats()
    result = evaluate_chat(llm, args.data[0], split=args.split, batch_size=args.batch_size or 8,
                           max_batches=args.max_batches, precision=args.precision, block_size=args.block_size,
                           skip_invalid=args.skip_invalid, stats=stats)
    if args.json != "-":  # the scores before the --json PATH write, as in perplexity mode
        print(f"assistant-token loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  "
              f"bits/byte {result.bits_per_byte:.4f}  ({result.tokens:,} tokens of {result.conversations:,} "
              f"conversations in {result.source})")
    if stats.skipped:
        print(f"skipped: {describe_skipped(stats.skipped)}", file=sys.stderr)
    if stats.trimmed:
        # Counted as the data is read: with no --split, the training share's conversations too.
        where = ("conversations still scored" if stats.conversations == result.conversations else
                 f"the {stats.conversations:,} conversations read ({result.conversations:,} of them scored)")
        print(f"cut from {where}: {describe_skipped(stats.trimmed)}", file=sys.stderr)
    if args.json:
        _emit_json(args.json, {"loss": result.loss, "perplexity": result.perplexity, "bits_per_byte": result.bits_per_byte,
                               "tokens": result.tokens, "bytes": result.bytes, "conversations": result.conversations,
                               "source": result.source, "skipped": sum(stats.skipped.values()),
                               "skipped_by_reason": dict(stats.skipped),  # "skipped" a count, as for text
                               "conversations_read": stats.conversations,  # cut_by_reason counts over these
                               "cut_by_reason": dict(stats.trimmed)})  # parts of conversations still kept
    return 0


def _tasks_eval(args: argparse.Namespace) -> int:
    from gpt1.train.harness import NothingScored, evaluate_task, task_sources

    if args.task and args.suite:
        raise Gpt1Error("pass --task or --suite, not both")
    if args.fewshot < 0:
        raise Gpt1Error(f"--fewshot must be >= 0, got {args.fewshot}")
    if args.skip_invalid and not args.ppl_data:
        raise Gpt1Error("--skip-invalid applies to perplexity sources (--ppl-data here), not to task files")
    if args.ppl_data and not (args.report or args.suite):  # it would be silently ignored: only the report shows it
        raise Gpt1Error("--ppl-data applies with --report or --suite (it adds perplexity to the report)")
    if args.suite:
        limits = SUITES[args.suite]
    else:
        names = [n.strip() for n in args.task.split(",") if n.strip()]
        limits = {get_task(n).name: args.limit for n in names}
    if args.suite and not args.report:
        _check_report_folder(Path(args.model))
    sources = task_sources(list(limits), args.data)
    _check_outputs(args.json, args.samples, args.report)
    llm = gpt1.load(args.model, device=args.device)
    if args.suite and not args.report:  # MODEL/report.md, now that the model dir is known to exist
        file_target(Path(args.model) / REPORT_FILE, hint="pass --report PATH to write the report elsewhere")
    report = args.report or (str(Path(args.model) / REPORT_FILE) if args.suite else None)
    # Perplexity first: a bad --ppl-data source is found before the tasks are scored.
    ppl = _perplexity(llm, args.ppl_data, args) if args.ppl_data else None
    results, unscored, failed = [], [], None
    for name, limit in limits.items():
        try:
            results.append(evaluate_task(llm, name, source=sources[name], num_fewshot=args.fewshot,
                                         limit=args.limit if args.limit is not None else limit,
                                         batch_size=args.batch_size or 32, precision=args.precision))
        except NothingScored as e:  # the other tasks' results still count
            unscored.append(str(e))
        except Gpt1Error as e:  # a bad task file, a broken model: stop, but keep what was scored before
            failed = e
            break
    if results:
        _emit_results(args, llm, results, report, ppl)
    if failed or unscored:
        raise Gpt1Error("; ".join(unscored + ([str(failed)] if failed else [])))
    return 0


def _check_report_folder(model: Path) -> None:
    """--suite writes MODEL/report.md: not into the best/ of a run still training, which replaces
    that folder whole at each new lowest validation loss (the report was deleted, or its write
    ended the run when the two met)."""
    from gpt1.core.locks import lock_holder
    from gpt1.formats.modeldir import RUN_LOCK_DIR
    from gpt1.train.keep_best import BEST_DIR

    if model.name == BEST_DIR and (holder := lock_holder(model.parent / RUN_LOCK_DIR)):
        raise Gpt1Error(f"{model}: {holder} is training {model.parent}, and replaces {model} at each new lowest "
                        f"validation loss, a {REPORT_FILE} in it with it; pass --report PATH to write the report "
                        "elsewhere")


def _emit_results(args: argparse.Namespace, llm, results: list[TaskResult], report: str | None, ppl: dict | None) -> None:
    from gpt1.train.harness import format_results, report_text, results_json, samples_text, write_report, write_samples

    # The table first: a write that fails anyway (a full disk) does not take the results with it.
    # Stdout that holds --samples - or --report - holds only that, and the table goes to stderr
    # (as bench's tables with --json -); --json - replaces the table.
    if args.json != "-":
        print(format_results(results), file=sys.stderr if "-" in (args.samples, report) else sys.stdout)
        block_size = llm.model.config.block_size
        truncated = sum(r.truncated for r in results)
        if truncated:  # scored as lm-eval scores them, but not on the whole question: say how many
            print(f"{truncated} example(s) were longer than the model's context ({block_size} tokens): their prompts "
                  "were cut from the left to fit, as lm-eval cuts them", file=sys.stderr)
        skipped = sum(r.skipped for r in results)
        if skipped:
            print(f"{skipped} example(s) have an answer longer than the model's context ({block_size} tokens) and "
                  "were skipped (lm-eval stops on them with an AssertionError)", file=sys.stderr)
    # The small files before the report: a write that fails (a full disk) takes only itself.
    if args.json:
        _emit_json(args.json, results_json(results))
    if args.samples:
        _write_to(args.samples, write_samples, samples_text, results)
    if report:
        _write_to(report, write_report, report_text, args.model, results, suite=args.suite, perplexity=ppl,
                  device=str(llm.device))
        if not _on_stdout(args):
            print(f"report: {report}", file=sys.stderr)


def _write_to(target: str, write, text, *args, **kwargs) -> None:
    """`write(target, *args, **kwargs)` (one of the harness's file writers), or for "-" the same
    text, `text(*args, **kwargs)`, on stdout (it went through a temporary file: a full TMPDIR
    failed an output that needs no disk)."""
    if target != "-":
        write(target, *args, **kwargs)
        return
    sys.stdout.write(text(*args, **kwargs))
    sys.stdout.flush()
