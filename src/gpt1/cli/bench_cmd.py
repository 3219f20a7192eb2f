"""`gpt1 bench`: throughput benchmarks against reference implementations, as a table."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

from gpt1.core.atomic import write_json
from gpt1.core.errors import Gpt1Error
from gpt1.core.paths import file_target, is_stream

BENCHMARKS = ["train", "generate", "prepare", "serve"]  # modules of gpt1.benchmarks, run by default
# Need a package no extra of gpt1's installs (llama-cpp-python, lm-eval), take many minutes
# (quickstart) or load the machine (threads: a busy process beside the decoding): run only when named.
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
    parser.add_argument("--json", metavar="FILE",
                        help="also write the rows as JSON to FILE, after each benchmark (-: print them to stdout "
                             "at the end, the tables to stderr)")
    parser.set_defaults(func=bench_command, stdout_product=lambda args: None if args.json and args.json != "-" else "the results")


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


def format_environment(env: dict) -> str:
    """One line saying when and where the rows below were measured."""
    gpus = ", ".join(env["gpus"]) or "no GPU"
    gpt1 = env["gpt1"] + (f" ({env['git']})" if env.get("git") else "")
    return (f"gpt1 {gpt1}, torch {env['torch']}, Python {env['python']}, {env['os']}; "
            f"{env['cpu']} ({env['cpu_cores']} cores, {env['threads']} torch threads), {gpus}; {env['date']}")


def bench_command(args: argparse.Namespace) -> int:
    names = list(dict.fromkeys(args.names or BENCHMARKS))  # a name given twice runs once
    unknown = [n for n in names if n not in BENCHMARKS + ON_REQUEST]
    if unknown:
        raise Gpt1Error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(BENCHMARKS)} "
                        f"(default), {', '.join(ON_REQUEST)}")
    to_stdout = args.json == "-"
    if args.json == "":  # `--json=`: not a flag left out, a file name missing
        raise Gpt1Error("--json: expected a file name (or - for stdout), got an empty one")
    if args.json and not to_stdout:
        file_target(args.json)  # a bad path found before the benchmarks run, not after
    # A FIFO or a descriptor (`--json >(jq .)`) gets one document, at the end: rewritten after each
    # benchmark it got several, or (a named pipe whose reader ended at the first) a write that waits forever.
    rewrite = args.json and not to_stdout and not is_stream(Path(args.json))
    modules = {name: _benchmark(name) for name in names}
    _check_requirements(modules)  # before any work: not a traceback after the first benchmarks' minutes
    from gpt1.benchmarks import environment

    results: dict = {"environment": environment(), "load_average": {}}
    print(format_environment(results["environment"]), file=sys.stderr if to_stdout else sys.stdout, flush=True)
    for name, module in modules.items():
        before = _load_average()
        results[name] = rows = module.run(quick=args.quick)
        # The machine's load beside each benchmark: a ratio measured beside other work moves (tens of percent).
        load = results["load_average"][name] = {"before": before, "after": _load_average()}
        # With the JSON on stdout, the tables go to stderr: stdout stays one JSON document.
        print(f"\n## {name}\n\n{format_table(rows)}\n{_format_load(load)}", file=sys.stderr if to_stdout else sys.stdout,
              flush=True)
        if rewrite:
            write_json(args.json, results)  # after each benchmark: a later one failing or Ctrl-C keeps these
    if to_stdout:
        print(json.dumps(results, indent=2))
    elif args.json and not rewrite:
        write_json(args.json, results)
    return 0


def _load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (None where the OS has none: Windows)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _format_load(load: dict) -> str:
    if load["before"] is None or load["after"] is None:
        return "load average: unknown on this OS"
    return (f"load average (1/5/15 min) before {' '.join(map(str, load['before']))}, after "
            f"{' '.join(map(str, load['after']))} on {os.cpu_count()} cores")


def _benchmark(name: str):
    if importlib.util.find_spec(f"gpt1.benchmarks.{name}") is None:
        raise Gpt1Error(f"benchmark {name!r} is not installed")
    return importlib.import_module(f"gpt1.benchmarks.{name}")


def _check_requirements(modules: dict) -> None:
    """The optional packages each benchmark declares (`REQUIRES`: module -> what installs it),
    all of them checked before any benchmark runs; a Gpt1Error naming what to install."""
    missing, ready = [], []
    for name, module in modules.items():
        absent = {m: how for m, how in getattr(module, "REQUIRES", {}).items() if importlib.util.find_spec(m) is None}
        if absent:
            missing.append(f"{name} needs {', '.join(absent)} (pip install {' '.join(dict.fromkeys(absent.values()))})")
        else:
            ready.append(name)
    if missing:
        rest = f"; the others run alone: gpt1 bench {' '.join(ready)}" if ready else ""
        raise Gpt1Error(f"missing packages: {'; '.join(missing)}{rest}")
