"""`gpt1 bench`: runs a benchmark against its reference and prints the rows as a Markdown table."""

from __future__ import annotations

import json

from gpt1.cli import main
from gpt1.cli.bench_cmd import format_table


def test_format_table_is_markdown_with_every_column():
    table = format_table([{"impl": "gpt1", "tok/s": 1234.5, "ratio": 1.2345}, {"impl": "hf", "extra": None}])
    assert table.splitlines() == ["| impl | tok/s | ratio | extra |", "|---|---|---|---|",
                                  "| gpt1 | 1,234 | 1.23 |  |", "| hf |  |  |  |"]


def test_bench_prepare_quick_reports_a_ratio(tmp_path, capsys):
    assert main(["bench", "prepare", "--quick", "--json", str(tmp_path / "bench.json")]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["prepare"]
    assert rows and all(row["MB"] > 0 and row["tokens"] > 0 for row in rows)
    out = capsys.readouterr().out
    assert "## prepare" in out and "| corpus |" in out


def test_unknown_benchmark_is_a_clear_error(capsys):
    assert main(["bench", "nope"]) == 2
    assert "unknown benchmark(s) nope; available: train, generate, prepare, serve (default), llamacpp, eval" in capsys.readouterr().err
