"""`gpt1 bench`: throughput benchmarks against reference implementations, as a table."""

from __future__ import annotations

import argparse
import importlib
import importlib.util

from gpt1.core.errors import Gpt1Error
from gpt1.core.io import file_target, write_json

BENCHMARKS = ["train", "generate", "prepare", "serve"]  # modules of gpt1.benchmarks, run by default
# Need an optional package (llama-cpp-python, lm-eval), take many minutes (quickstart) or load the
# machine (threads: a busy process beside the decoding): run only when named.
ON_REQUEST = ["llamacpp", "eval", "quickstart", "threads"]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="run throughput benchmarks against reference implementations",
        description="Run benchmarks (each measures gpt1 and a reference implementation in the same run and "
                    "reports the ratio) and print the results as a table.")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)}; also, when named: "
                             f"{', '.join(ON_REQUEST)})")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run, for CPUs)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    parser.set_defaults(func=bench_command)


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the rows (the union of their keys, in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def bench_command(args: argparse.Namespace) -> int:
    names = args.names or BENCHMARKS
    unknown = [n for n in names if n not in BENCHMARKS + ON_REQUEST]
    if unknown:
        raise Gpt1Error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(BENCHMARKS)} "
                        f"(default), {', '.join(ON_REQUEST)}")
    if args.json:
        file_target(args.json)  # a bad path found before the benchmarks run, not after
    results = {}
    for name in dict.fromkeys(names):  # a name given twice runs once
        if importlib.util.find_spec(f"gpt1.benchmarks.{name}") is None:
            raise Gpt1Error(f"benchmark {name!r} is not installed")
        rows = importlib.import_module(f"gpt1.benchmarks.{name}").run(quick=args.quick)
        results[name] = rows
        print(f"\n## {name}\n\n{format_table(rows)}", flush=True)
    if args.json:
        write_json(args.json, results)
    return 0
