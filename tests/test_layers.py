"""The package's layers import only downward, and nothing imports in a circle.

core -> formats -> data -> train -> inference -> serve -> (quickstart, benchmarks) -> cli: a
module may import its own layer or any layer to its left, never one to its right. Optional heavy
packages are imported lazily, and gpt1's own modules at the top of a module, so this reads the
whole graph; the command line (gpt1.cli) is the exception: it imports the library inside each
command, so that `gpt1 --help` and a usage error load no torch (tests/test_cli_parser.py).
"""

import ast
import importlib
import pathlib

import pytest

import gpt1

PACKAGE = pathlib.Path(gpt1.__file__).parent
LAYERS = ["core", "formats", "data", "train", "inference", "serve", "quickstart", "benchmarks", "cli"]
# gpt1.serve needs the optional `serve` extra (FastAPI, uvicorn): the one gpt1 package that
# the command line imports when it is used rather than at start-up.
LAZY = {"gpt1.serve"}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = file
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package itself re-exports the public API from every layer
    return LAYERS.index(parts[1])


def _gpt1_imports(file: pathlib.Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import of a gpt1 module."""
    tree = ast.parse(file.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gpt1"):
            found.append((node.module, node.lineno, id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in top) for a in node.names if a.name.startswith("gpt1")]
    return found


def test_every_module_sits_in_a_known_layer():
    unknown = [m for m in _modules() if m != "gpt1" and m.split(".")[1] not in LAYERS + ["__main__"]]
    assert not unknown, f"modules outside the layers {LAYERS}: {unknown}"


def test_imports_run_downward_and_at_the_top():
    upward, hidden = [], []
    for module, file in _modules().items():
        if module in ("gpt1", "gpt1.__main__"):
            continue
        for imported, line, at_top in _gpt1_imports(file):
            if not at_top and imported not in LAZY and not module.startswith("gpt1.cli"):
                hidden.append(f"{module}:{line} imports {imported} inside a function")
            target = _layer(imported)
            if target is not None and target > _layer(module):
                upward.append(f"{module}:{line} imports {imported} (layer {LAYERS[target]} is above {LAYERS[_layer(module)]})")
    assert not upward, "\n".join(upward)
    assert not hidden, "\n".join(hidden)


@pytest.mark.parametrize("module", sorted(m for m in _modules() if not m.startswith("gpt1.serve") and m != "gpt1.__main__"))
def test_each_module_imports_on_its_own(module):
    # A circle shows up as an ImportError when a module is the first one imported.
    importlib.import_module(module)
