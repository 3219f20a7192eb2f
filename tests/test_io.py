"""Atomic writes: all or nothing, and files get the usual permissions (not mkstemp's 0600)."""

from __future__ import annotations

import os
import stat

import pytest

from gpt1.core.io import atomic_path, write_json


def test_atomic_write_has_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "model.json"
    write_json(target, {"version": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == '{\n  "version": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json"]


def test_an_unwritable_folder_is_a_clear_error(tmp_path):
    import subprocess

    from gpt1.core.errors import Gpt1Error

    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("chattr +i is not supported here (and root ignores file modes)")
    else:
        folder.chmod(0o555)
    try:
        with pytest.raises(Gpt1Error, match=r"locked: cannot write x.json there \((Permission denied|Operation not permitted)\)"):
            write_json(folder / "x.json", {"a": 1})
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)
    assert list(folder.iterdir()) == []
