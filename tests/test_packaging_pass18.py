"""Pass 18, gpt1 as an installed package: the commit a run records is gpt1's own or none."""

from __future__ import annotations

from pathlib import Path

from gpt1.core.environment import checkout_root


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
