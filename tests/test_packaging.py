"""What a user gets from the package rather than from the code: optional packages that are missing
or broken (one line that says which, and why), the sdist, and exports that do not depend on the
installed transformers version."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from gpt1.core.environment import checkout_root
from gpt1.core.errors import Gpt1Error
from gpt1.core.imports import require
from gpt1.formats.hf import export_model
from gpt1.formats.modeldir import load_model
from gpt1.quickstart import _plot
from tests.test_battery import assert_one_clear_line

ROOT = Path(__file__).parents[1]
# What pyarrow 26 says at import under numpy 1.24: the kind of error a "not installed" message hid.
BROKEN = "pyarrow requires NumPy 2.0 or newer, found 1.24.0"


def _package(root: Path, name: str, body: str) -> Path:
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(body)
    return root


def _gpt1(*argv, pythonpath: Path | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    """The real command in a subprocess, with `pythonpath` ahead of the installed packages."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    command = ["-c", code] if code else ["-m", "gpt1", *map(str, argv)]
    return subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=120)


# ---- optional packages: missing, or installed but broken -------------------------------------
def test_require_tells_a_missing_package_from_a_broken_one(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    _package(tmp_path, "gpt1_test_broken", f"raise ImportError({BROKEN!r})\n")
    _package(tmp_path, "gpt1_test_needs_dep", "import gpt1_test_absent_dependency\n")

    with pytest.raises(Gpt1Error) as missing:
        require("gpt1_test_absent", "doing X", "pip install 'gpt1[x]'")
    assert str(missing.value) == "doing X needs the `gpt1_test_absent` package: pip install 'gpt1[x]'"
    with pytest.raises(Gpt1Error) as missing_parent:  # a module of a package that is not there
        require("gpt1_test_absent.parquet", "doing X", "pip install x")
    assert str(missing_parent.value) == "doing X needs the `gpt1_test_absent` package: pip install x"

    with pytest.raises(Gpt1Error) as broken:  # installing it again would change nothing: say why
        require("gpt1_test_broken", "doing X", "pip install x")
    assert str(broken.value) == f"doing X: `gpt1_test_broken` is installed but failed to import: {BROKEN}"
    with pytest.raises(Gpt1Error) as dependency:  # its own dependency missing is not it missing
        require("gpt1_test_needs_dep", "doing X", "pip install x")
    assert str(dependency.value) == ("doing X: `gpt1_test_needs_dep` is installed but failed to import: "
                                     "No module named 'gpt1_test_absent_dependency'")
    assert require("json", "doing X", "pip install x") is json


@pytest.mark.parametrize("package,command", [
    ("gguf", "export --format gguf --model MODEL --out OUT/m.gguf"),
    ("httptools", "serve --model MODEL --port 0"),
    ("datasets", "prepare --tokenizer TOKENIZER --out OUT/data hf:someone/corpus"),
    ("pyarrow", "prepare --tokenizer TOKENIZER --out OUT/data OUT/docs.parquet"),
    ("transformers", "finetune --base hf:OUT/hf --data chatterbot --out OUT/ft"),
], ids=lambda value: value.split()[0])
def test_a_broken_optional_package_shows_its_own_import_error(tmp_path, tiny_model_dir, tokenizer_dir, package, command):
    """transformers with too old a safetensors, datasets or pyarrow built for another numpy: the
    package is there but its import fails. The line said "needs the `X` package: pip install ..."
    (serve: "X is missing"), which installs nothing, and a parquet file gave a traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["def f(x):\n    return x\n"] * 4}), tmp_path / "docs.parquet")
    export_model(tiny_model_dir, tmp_path / "hf")
    argv = [{"MODEL": tiny_model_dir, "TOKENIZER": tokenizer_dir}.get(word, word)
            for word in command.replace("OUT", str(tmp_path)).split()]
    result = _gpt1(*argv, pythonpath=_package(tmp_path / "site", package, f"raise ImportError({BROKEN!r})\n"))
    line = assert_one_clear_line(result.returncode, result.stderr)
    assert f"`{package}" in line and line.endswith(f"` is installed but failed to import: {BROKEN}")


# ---- the sdist -------------------------------------------------------------------------------
def test_sdist_holds_the_tests_with_their_helpers_the_docs_and_the_licence(tmp_path):
    """The sdist held tests/test_*.py without conftest.py and the helpers they import (no test
    collected), no docs (the README links to them), no notebook and no LICENSE."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
        ".git", ".venv", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache", "build", "dist"))
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    built = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=tree, capture_output=True,
                           text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    with tarfile.open(tmp_path / "dist" / built.stdout.split()[-1]) as sdist:
        names = {name.partition("/")[2] for name in sdist.getnames()}
    wanted = {"LICENSE", "configs/tiny-cpu.toml"} | {
        str(path.relative_to(tree)) for folder in ("tests", "docs", "notebooks", "scripts")
        for path in (tree / folder).rglob("*") if path.is_file()}
    assert {"tests/conftest.py", "tests/model_factories.py", "docs/interop.md"} <= wanted
    assert wanted - names == set()


# ---- the Hugging Face export -----------------------------------------------------------------
def test_hf_export_writes_every_config_key_itself_whatever_transformers_is_installed(tmp_path, tiny_model_dir):
    """transformers 4.x's save_pretrained left out values equal to its own defaults: no top_k,
    top_p or repetition_penalty in generation_config.json, no tie_word_embeddings in config.json;
    read by transformers 5 or vLLM, the export sampled without top-k. gpt1 now writes both files
    itself: without transformers at all, the same bytes."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = export_model(tiny_model_dir, tmp_path / "hf")
    blocked = _gpt1(code=("import sys; sys.modules['transformers'] = None; from gpt1.cli import main; "
                          f"sys.exit(main(['export', '--model', {str(tiny_model_dir)!r}, '--out', {str(tmp_path / 'bare')!r}]))"))
    assert blocked.returncode == 0, blocked.stderr
    for name in ("config.json", "generation_config.json"):
        assert (tmp_path / "bare" / name).read_bytes() == (out / name).read_bytes()

    model = load_model(tiny_model_dir)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["tie_word_embeddings"] is model.config.tie_embeddings
    assert config["n_ctx"] == config["n_positions"] == model.config.block_size  # llama.cpp's converter reads n_ctx
    generation = json.loads((out / "generation_config.json").read_text())
    assert {k: generation[k] for k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "max_length")} \
        == dict(do_sample=True, temperature=0.7, top_k=50, top_p=1.0, repetition_penalty=1.0, max_length=64)

    loaded = GenerationConfig.from_pretrained(out)
    assert (loaded.top_k, loaded.top_p, loaded.repetition_penalty) == (50, 1.0, 1.0)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.tie_word_embeddings is model.config.tie_embeddings
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=0)


# What a broken optional piece must not take down.

def test_the_quickstarts_curves_are_a_by_product(tmp_path, caplog):
    """matplotlib 3.7 beside numpy 2 fails to import: the quickstart's last stage ended in a
    traceback after both models were written, and its samples were never printed. A plot that
    cannot be drawn is a warning (as each run's own loss.png is)."""
    for run in ("base", "chat"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": 5.0 - s / 10, "lr": 1e-3}) + "\n" for s in range(1, 6)))
    assert _plot(tmp_path) == tmp_path / "loss.png" and (tmp_path / "loss.png").stat().st_size > 0
    (tmp_path / "loss.png").unlink()
    (tmp_path / "loss.png").mkdir()  # something in the way: plot_runs raises
    assert _plot(tmp_path) is None
    assert any("loss.png not drawn (" in r.getMessage()
               and f"`gpt1 plot {tmp_path / 'base'} {tmp_path / 'chat'}` draws it" in r.getMessage() for r in caplog.records)


# gpt1 as an installed package: the commit a run records is gpt1's own or none.

def _folder(path, *files):
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files:
        (path / name).write_text(text)
    return path


def test_a_run_records_the_commit_of_a_gpt1_checkout_and_never_of_the_repository_a_copy_sits_in(tmp_path):
    """`pip install --target vendor` inside the user's own repository recorded that repository's
    commit (and its -dirty) as gpt1's: any `.git` one or two folders up counted."""
    gpt1_project = ("pyproject.toml", '[project]\nname = "gpt1"\n')
    checkout = _folder(tmp_path / "checkout", gpt1_project)
    (checkout / ".git").mkdir()
    assert checkout_root(_folder(checkout / "src" / "gpt1")) == checkout
    flat = _folder(tmp_path / "flat", gpt1_project)
    (flat / ".git").mkdir()
    assert checkout_root(_folder(flat / "gpt1")) == flat

    user_repo = _folder(tmp_path / "userrepo", ("pyproject.toml", '[project]\nname = "my-app"\n'))
    (user_repo / ".git").mkdir()
    vendored = _folder(user_repo / "vendor" / "gpt1")
    _folder(user_repo / "vendor" / "gpt1-0.1.0.dist-info")
    assert checkout_root(vendored) is None
    assert checkout_root(_folder(user_repo / "gpt1")) is None  # the user's project, not gpt1
    assert checkout_root(_folder(user_repo / "src" / "gpt1")) is None
    # A checkout with pip's record beside its package is an installed copy too.
    _folder(checkout / "src" / "gpt1-0.1.0.dist-info")
    assert checkout_root(checkout / "src" / "gpt1") is None


def test_the_quickstarts_install_hint_names_the_missing_extras_as_this_copy_was_installed(monkeypatch, tmp_path):
    """It said `pip install -e ".[serve,hf]" in a clone` to everyone, also to a wheel's user."""
    import importlib.util

    import gpt1
    from gpt1.cli import quickstart_cmd

    assert quickstart_cmd._extras_line() == []  # the dev extras are installed here
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real_find_spec(name, *a))
    in_checkout = checkout_root(Path(gpt1.__file__).resolve().parent) is not None
    assert quickstart_cmd._extras_line() == [
        "  (serve needs the `serve` extra: " + ('pip install -e ".[serve]")' if in_checkout else 'pip install "gpt1[serve]")')]
    vendored = tmp_path / "vendor" / "gpt1"
    vendored.mkdir(parents=True)
    (tmp_path / "vendor" / "gpt1-0.1.0.dist-info").mkdir()
    monkeypatch.setattr(gpt1, "__file__", str(vendored / "__init__.py"))
    assert quickstart_cmd._extras_line() == ['  (serve needs the `serve` extra: pip install "gpt1[serve]")']


# A missing optional package of the server, named.

def test_serve_without_httptools_names_the_missing_package(tiny_model_dir):
    """With FastAPI and uvicorn installed but not httptools (which gpt1.serve.server extends),
    the line blamed "FastAPI and uvicorn", which were there."""
    import subprocess
    import sys

    blocked = ("import sys; sys.modules['httptools'] = None; from gpt1.cli import main; "
               f"sys.exit(main(['serve', '--model', {str(tiny_model_dir)!r}]))")
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120)
    assert_one_clear_line(result.returncode, result.stderr,
                          r"needs the `serve` extra \(FastAPI, uvicorn, httptools\): httptools is missing; "
                          r"install it with: pip install 'gpt1\[serve\]'$")
