"""`gpt1 bench`: runs a benchmark against its reference and prints the rows as a Markdown table."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys

import pytest
import torch

from gpt1.cli import main
from gpt1.cli.bench_cmd import format_table
from gpt1.core.errors import Gpt1Error
from tests.test_battery import assert_one_clear_line, run_main


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
    assert "unknown benchmark(s) nope; available: train, generate, prepare, serve (default), llamacpp, eval, quickstart, threads" in capsys.readouterr().err


def test_missing_packages_are_named_in_one_line_before_any_benchmark_runs():
    """A minimal install (transformers and httpx blocked): the default set names every missing
    package and its extra at once, instead of a traceback after the first benchmarks' work."""
    code = ("import sys; sys.modules['transformers'] = sys.modules['httpx'] = None\n"
            "from gpt1.cli import main; sys.exit(main(['bench', '--quick']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "GPT1_QUIET": "1"})
    line = assert_one_clear_line(done.returncode, done.stderr)
    assert line == ("gpt1 bench: error: missing packages: train needs transformers (pip install 'gpt1[hf]'); "
                    "generate needs transformers (pip install 'gpt1[hf]'); serve needs httpx (pip install "
                    "'gpt1[serve]'); the others run alone: gpt1 bench prepare")
    assert done.stdout == ""  # no table: nothing ran


def _fake_benchmarks(monkeypatch, later_fails_with: BaseException | None = None) -> None:
    """prepare answers a row at once; threads, run after it, fails (when asked) as a later benchmark might."""
    from gpt1.benchmarks import prepare, threads

    def fail(quick=False):
        raise later_fails_with

    monkeypatch.setattr(prepare, "run", lambda quick=False: [{"corpus": "fake", "MB": 1.0}])
    monkeypatch.setattr(threads, "run", fail if later_fails_with else lambda quick=False: [{"threads": 1}])


@pytest.mark.parametrize("failure", [Gpt1Error("the second benchmark failed"), KeyboardInterrupt()])
def test_json_keeps_the_finished_benchmarks_when_a_later_one_fails(tmp_path, monkeypatch, capsys, failure):
    _fake_benchmarks(monkeypatch, later_fails_with=failure)
    rc, _ = run_main(capsys, "bench", "prepare", "threads", "--json", tmp_path / "bench.json")
    assert rc == (2 if isinstance(failure, Gpt1Error) else 130)
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results.pop("environment")["torch"] == torch.__version__
    assert set(results.pop("load_average")) == {"prepare"}
    assert results == {"prepare": [{"corpus": "fake", "MB": 1.0}]}


def test_json_dash_prints_the_results_to_stdout_and_the_tables_to_stderr(tmp_path, monkeypatch, capsys):
    _fake_benchmarks(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "prepare", "threads", "--json", "-"]) == 0
    out, err = capsys.readouterr()
    results = json.loads(out)
    env = results.pop("environment")  # when and where: a README table says where its rows came from
    load = results.pop("load_average")  # and beside what: a ratio measured beside other work moves
    assert results == {"prepare": [{"corpus": "fake", "MB": 1.0}], "threads": [{"threads": 1}]}
    assert set(load) == {"prepare", "threads"} and all(
        len(side) == 3 and all(x >= 0 for x in side) for one in load.values() for side in one.values())
    assert "load average (1/5/15 min) before " in err
    assert env["torch"] == torch.__version__ and env["python"] == platform.python_version()
    assert env["cpu_cores"] == os.cpu_count() and env["gpus"] == [] and env["date"].startswith("20")
    assert "## prepare" in err and "## threads" in err
    assert f"torch {torch.__version__}, Python {platform.python_version()}" in err.splitlines()[0]
    assert not (tmp_path / "-").exists()


def test_json_with_an_empty_file_name_is_refused(capsys):
    rc, err = run_main(capsys, "bench", "prepare", "--json=")
    assert_one_clear_line(rc, err, r"--json: expected a file name \(or - for stdout\), got an empty one")


def test_bench_eval_leaves_the_environment_as_it_found_it(monkeypatch):
    """Its offline and single-threaded-tokenizer settings are its own: left behind, they halved a
    later prepare's MB/s in the same `gpt1 bench` run."""
    pytest.importorskip("lm_eval")
    from gpt1.benchmarks import eval as eval_bench

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # one set before, the others unset
    for name in ("HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM"):
        monkeypatch.delenv(name, raising=False)
    before, seen = dict(os.environ), {}

    def model_dir(preset, out):  # the work, cut short once it has seen the settings
        seen.update((name, os.environ.get(name)) for name in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM"))
        raise RuntimeError("stop here")

    monkeypatch.setattr(eval_bench, "_model_dir", model_dir)
    with pytest.raises(RuntimeError, match="stop here"):
        eval_bench.run(quick=True)
    assert seen == {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    assert dict(os.environ) == before


def test_bench_generate_runs_both_sides_on_one_stated_thread_count(monkeypatch):
    """gpt1's thread tuner lowered its own side's count under load and left its last choice to the
    reference rows and the next benchmarks: every side now runs on the count found, untuned, and
    each row says which."""
    import torch

    from gpt1.benchmarks import generate as generate_bench
    from gpt1.core import threads as threads_module

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    found, tuned = torch.get_num_threads(), []
    real = threads_module.cpu_thread_tuner

    def recording(*args, **kwargs):
        tuner = real(*args, **kwargs)
        tuned.append(tuner is not None)
        return tuner

    monkeypatch.setattr("gpt1.inference.engine.cpu_thread_tuner", recording)
    rows = generate_bench.run(quick=True)
    assert rows and all(row["torch_threads"] == found for row in rows)
    assert tuned and not any(tuned)  # every engine of the run had its tuner off
    assert torch.get_num_threads() == found and "OMP_NUM_THREADS" not in os.environ


@pytest.mark.slow
def test_bench_quickstart_scores_both_recipes_on_the_same_held_out_documents():
    from gpt1.benchmarks.quickstart import BEFORE_VOCAB, compare
    from gpt1.quickstart import QuickstartConfig

    rows = compare(minutes=0.05)  # 3 s of training each
    before, after = rows
    assert (before["config"], after["config"]) == ("before", "after")
    assert (before["vocab"], after["vocab"]) == (BEFORE_VOCAB, QuickstartConfig.vocab_size)
    # bits per byte compares the two only if they are scored on the same text: the same documents,
    # less what each tokenization leaves after its last whole context window
    assert before["val_documents"] == after["val_documents"] > 0
    assert abs(before["val_bytes"] - after["val_bytes"]) <= 0.01 * before["val_bytes"]
    for row in rows:
        assert row["steps"] >= 1 and row["tokens"] > 0 and 0 < row["val_bits_per_byte"] < 8
        assert row["train_s"] < 60  # the budget ended the run (1,000,000 steps otherwise)
    assert before["vs_before"] == 1.0
    assert math.isclose(after["vs_before"], after["val_bits_per_byte"] / before["val_bits_per_byte"])


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two CPU cores and CPU affinity (Linux)")
def test_bench_threads_measures_tuned_and_fixed_counts_and_leaves_the_process_as_it_was(tmp_path):
    affinity, threads, omp = os.sched_getaffinity(0), torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    assert main(["bench", "threads", "--quick", "--json", str(tmp_path / "bench.json")]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["threads"]
    assert [(r["condition"], r["threads"], r["batch"]) for r in rows] == [
        (condition, setting, batch) for condition in ("quiet", "busy neighbour") for batch in (1, 8)
        for setting in ("2 fixed", "1 fixed", "tuned")]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    tuned = [r for r in rows if r["threads"] == "tuned"]
    assert all(r["vs_2_fixed"] > 0 and r["vs_best_fixed"] > 0 and r["tuned_to"] in (1, 2) for r in tuned)
    assert os.sched_getaffinity(0) == affinity and torch.get_num_threads() == threads
    assert os.environ.get("OMP_NUM_THREADS") == omp


@pytest.mark.slow
def test_gpu_check_script_runs_the_named_benchmarks_and_keeps_their_json(tmp_path):
    """scripts/gpu-check.sh, the one prepared run for a lent GPU machine, dry-run on this CPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "QUICK": "1", "STEPS": "prepare profile microbatch float8", "OUT": str(tmp_path / "out"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # python3 with torch
    # Run from an empty folder: no .whl/ there to install (a checkout may hold the GPU machine's
    # Python 3.12 wheels), and gpt1 comes from the installed package instead of ./src.
    done = subprocess.run(["bash", str(root / "scripts" / "gpu-check.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch" in (tmp_path / "out" / "device.txt").read_text()
    assert json.loads((tmp_path / "out" / "prepare.json").read_text())["prepare"]
    assert "| corpus |" in (tmp_path / "out" / "prepare.log").read_text()
    for impl in ("gpt1", "transformers"):  # the profile step: each side's step, operator by operator
        table = (tmp_path / "out" / f"train-profile-{impl}.txt").read_text()
        assert table.startswith(f"{impl}: 3 training steps") and "aten::mm" in table and "# of Calls" in table
    sizes = json.loads((tmp_path / "out" / "microbatch.json").read_text())  # gpt1 alone at two micro-batches
    assert [row["micro-batch"] for row in sizes] == ["2x128", "4x128"] and all(row["tok/s"] > 0 for row in sizes)
    [fp8] = json.loads((tmp_path / "out" / "float8.json").read_text())  # FP8 matmuls beside bf16 (torchao)
    assert "error" not in fp8, fp8
    assert fp8["bf16 tok/s"] > 0 and fp8["float8 tok/s"] > 0 and math.isclose(fp8["ratio"], fp8["float8 tok/s"] / fp8["bf16 tok/s"])


@pytest.mark.slow
def test_serve_load_spread_over_processes_gets_every_reply_and_counts_its_cores(tiny_model_dir):
    """The serve benchmark's load generator, in this process and spread over two spawned ones,
    against a real server on loopback: the same 32 complete replies either way."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import gpt1
    from gpt1.benchmarks.serve import REQUESTS, _load
    from gpt1.serve import background_server, create_app

    with background_server(create_app(gpt1.load(tiny_model_dir), max_batch=8)) as url:
        alone, wall, cores = _load(url, 8, 4)
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            spread, spread_wall, spread_cores = _load(url, 8, 4, pool, 2)
    for results in (alone, spread):
        assert len(results) == REQUESTS and all(r["ok"] and r["tokens"] == 4 for r in results)
        assert sorted(r["index"] for r in results) == list(range(REQUESTS))
    assert {r["index"]: r["text"] for r in alone} == {r["index"]: r["text"] for r in spread}
    assert wall > 0 and spread_wall > 0 and 0 < cores and 0 < spread_cores


@pytest.mark.parametrize("found", ["0.5.0.dev1", "0.5.0", "1.0.0"])
def test_bench_eval_refuses_an_lm_eval_that_defines_acc_norm_differently(found):
    """lm-eval 0.5 divides acc_norm by the ending's length with its leading space: the row said
    same_acc_as_lm_eval False with no word why."""
    from gpt1.benchmarks.eval import _check_lm_eval_version

    with pytest.raises(Gpt1Error, match=rf"found lm-eval {re.escape(found)}, which computes acc_norm differently: "
                                        r"pip install 'lm-eval>=0.4.13,<0.5'"):
        _check_lm_eval_version(found)
    _check_lm_eval_version("0.4.13")  # the version gpt1's task definitions follow
