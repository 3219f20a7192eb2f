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

from gpt1.core.errors import Gpt1Error
from gpt1.core.imports import require
from gpt1.formats.hf import export_model
from gpt1.formats.modeldir import load_model
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
