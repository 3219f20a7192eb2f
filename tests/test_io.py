"""Atomic writes: all or nothing, files and folders get the usual permissions (not mkstemp's 0600 or
mkdtemp's 0700), and a path that cannot be written is one clear error naming it."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from gpt1.core.errors import Gpt1Error
from gpt1.core.io import atomic_dir, atomic_path, make_dirs, write_json


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


def test_a_folder_as_the_file_to_write_is_a_clear_error(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(Gpt1Error, match=r"out: is a folder; expected the name of a file to write"):
        write_json(folder, {"a": 1})
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # A folder that does not exist yet, said with a trailing slash, is not a file name either.
    with pytest.raises(Gpt1Error, match=r"new/: names a folder \(a trailing /\); expected the name of a file"):
        write_json(f"{tmp_path}/new/", {"a": 1})
    assert not (tmp_path / "new").exists()


def test_a_file_where_a_folder_should_be_is_a_clear_error(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(Gpt1Error, match=r"a.txt: exists and is not a folder"):
        write_json(tmp_path / "a.txt" / "x.json", {"a": 1})
    with pytest.raises(Gpt1Error, match=r"a.txt/sub: cannot create the folder: .*a.txt is not a folder"):
        write_json(tmp_path / "a.txt" / "sub" / "x.json", {"a": 1})
    with pytest.raises(Gpt1Error, match=r"a.txt: exists and is not a folder"):
        make_dirs(tmp_path / "a.txt")
    assert (tmp_path / "a.txt").read_text() == "text"


def test_atomic_dir_has_umask_permissions_and_replaces_the_old_folder(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old")
    old = os.umask(0o022)
    try:
        with atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
            assert (out / "old.txt").is_file()  # untouched until the new folder is complete
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary or moved-aside folder left


def test_atomic_dir_failure_leaves_the_old_folder_and_no_temp(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_atomic_dir_where_it_cannot_be_made_is_a_clear_error(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(Gpt1Error, match=r"a.txt: exists and is not a folder"):
        with atomic_dir(tmp_path / "a.txt"):
            pass
    with pytest.raises(Gpt1Error, match=r"a.txt: exists and is not a folder"):
        with atomic_dir(tmp_path / "a.txt" / "hf"):
            pass
    if Path("/proc/self").is_dir():  # a folder that exists but where nothing can be created
        with pytest.raises(Gpt1Error, match=r"/proc: cannot write gpt1x there \("):
            with atomic_dir("/proc/gpt1x"):
                pass


def test_a_killed_writer_s_temps_are_swept_by_the_next_and_a_live_one_s_kept(tmp_path):
    """SIGKILL runs no cleanup: a killed export left its temp (1 GB for a 257M model) beside the
    output for good. Temps carry their writer's pid; the next writer of the name deletes the dead ones'."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    leftovers = [tmp_path / f".x.json.{dead_pid}.k2j4.tmp", tmp_path / f".out.{dead_pid}.a1b2.tmp",
                 tmp_path / f".out.{dead_pid}.c3d4.old"]
    leftovers[0].write_text("half")
    for folder in leftovers[1:]:
        (folder / "inner").mkdir(parents=True)
    live = tmp_path / f".x.json.{os.getpid()}.zzzz.tmp"  # another writer of this process, still going
    live.write_text("busy")
    other = tmp_path / f".y.json.{dead_pid}.k2j4.tmp"  # another name's: not this writer's to judge
    other.write_text("half")
    write_json(tmp_path / "x.json", {"a": 1})
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("new")
    assert not any(p.exists() for p in leftovers) and live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "x.json", "out"])


def test_atomic_dir_refuses_to_replace_a_folder_a_process_is_working_in(tmp_path):
    """`gpt1 export --force --out RUN` moved a training run's folder aside under it (the run then
    died on its missing metrics file)."""
    from gpt1.core.io import exclusive

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with exclusive(tmp_path / "run" / "checkpoints", "training"):
        with pytest.raises(Gpt1Error, match=rf"run/checkpoints: process {os.getpid()} is using it; cannot replace it"):
            with atomic_dir(tmp_path / "run"):
                pass
    assert (tmp_path / "run" / "metrics.jsonl").exists()
    with atomic_dir(tmp_path / "run") as tmp:  # once it has ended (its lock file stays behind)
        (tmp / "new").write_text("x")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["new"]


def test_sigterm_ends_a_command_through_its_cleanup(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """SIGTERM killed a command at once: an export's temp folder stayed beside its output. Now it
    ends the command as Ctrl-C does (cleanup, one line, exit 143); the handler is put back after."""
    import signal

    import gpt1.formats.hf as hf
    from gpt1.cli import main

    real = hf._write_base

    def terminated_midway(*args, **kwargs):
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(hf, "_write_base", terminated_midway)
    assert main(["export", "--model", str(tiny_model_dir), "--out", str(tmp_path / "hf")]) == 143
    assert capsys.readouterr().err.strip().endswith("gpt1 export: terminated")
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_failed_write_names_its_file_whatever_the_writer_raised(tmp_path):
    """A full disk or a file-size limit was a traceback or "a file: cannot write": a plain write's
    OSError has no file name, numpy's tofile has no errno either, safetensors raises its own
    SafetensorError, torch.save a RuntimeError over the OSError."""
    import errno

    from safetensors import SafetensorError

    from gpt1.core.io import writing

    def torch_save_like():
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    target = tmp_path / "w.bin"
    for raised, code in [(lambda: OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
                         (lambda: SafetensorError("Error while serializing: I/O error: File too large (os error 27)"),
                          errno.EFBIG)]:
        with pytest.raises(OSError) as e, writing(target):
            raise raised()
        assert (e.value.errno, e.value.filename) == (code, str(target)) and e.value.strerror == os.strerror(code)
    with pytest.raises(OSError) as e, writing(target):
        torch_save_like()
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(target))
    with pytest.raises(Gpt1Error, match=r"w.bin: cannot write \(the disk is full or a file-size limit was reached\)"):
        with writing(target):
            raise OSError("16329 requested and 5217 written")  # numpy's tofile
    named = OSError(errno.EACCES, "Permission denied", "other.txt")
    for unchanged in (named, ValueError("not a write error"), SafetensorError("invalid tensor")):
        with pytest.raises(type(unchanged)) as e, writing(target):
            raise unchanged
        assert e.value is unchanged


def test_a_failed_write_leaves_no_folder_it_made_and_names_a_folder_s_file_by_its_final_path(tmp_path):
    """`tokenizer train --out new` under a file-size limit left an empty new/; a failed export
    named its file in the temporary folder (out/.hf.1234.x8s7.tmp/model.safetensors)."""
    import errno

    from gpt1.core.io import writing

    (tmp_path / "kept").mkdir()
    for target in (tmp_path / "new" / "deeper" / "x.json", tmp_path / "kept" / "x.json"):
        with pytest.raises(RuntimeError), atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    with pytest.raises(OSError) as e, atomic_dir(tmp_path / "new2" / "hf") as tmp:
        with writing(tmp / "model.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.filename == str(tmp_path / "new2" / "hf" / "model.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and list((tmp_path / "kept").iterdir()) == []


def test_a_path_is_recorded_in_json_by_its_bytes_not_the_locale():
    """Under a non-UTF-8 locale Python holds the UTF-8 name "basé" as surrogate escapes: it was
    refused as "not valid UTF-8". Bytes that are not UTF-8 still are."""
    from gpt1.core.io import json_path

    assert json_path("runs/bas\udcc3\udca9") == json_path("runs/basé") == "runs/basé"
    with pytest.raises(Gpt1Error, match=r"^runs/bas\\xff: not valid UTF-8: gpt1 records this path in JSON"):
        json_path("runs/bas\udcff")


def test_the_same_tensors_and_metadata_make_the_same_bytes(tmp_path):
    # safetensors keeps the metadata in a Rust HashMap, seeded per map: one adapter (two keys)
    # came out in two byte layouts across runs, and its fingerprint with it.
    import hashlib

    import torch
    from safetensors.torch import load_file

    from gpt1.core.io import save_safetensors

    tensors = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.zeros(4)}
    metadata = {"format": "pt", "gpt1_lora": '{"r": 8, "é": 1}', "k": "1", "m": "2"}
    digests = set()
    for i in range(8):
        save_safetensors(tmp_path / f"{i}.safetensors", tensors, metadata=metadata)
        digests.add(hashlib.sha256((tmp_path / f"{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    from safetensors import safe_open

    with safe_open(str(tmp_path / "0.safetensors"), "pt") as f:
        assert f.metadata() == metadata
    assert all(torch.equal(load_file(tmp_path / "0.safetensors")[k], v) for k, v in tensors.items())


# Folders written whole in a group's shared (setgid) folder, and a replaced folder that cannot be
# deleted whole.

def test_a_folder_written_whole_in_a_setgid_folder_keeps_the_bit(tmp_path):
    """chmod of mkdtemp's folder cleared the setgid bit it inherited: an export or best/ in a shared
    group folder had its files in the writer's own group, unreadable by the rest of the group."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o2770)
    with atomic_dir(shared / "export") as tmp:
        (tmp / "config.json").write_text("{}")
    assert os.stat(shared / "export").st_mode & stat.S_ISGID
    # And a folder that had the bit keeps it when replaced, outside a setgid folder too.
    plain = tmp_path / "plain"
    plain.mkdir()
    os.chmod(plain, 0o2755)
    with atomic_dir(plain) as tmp:
        (tmp / "config.json").write_text("{}")
    assert os.stat(plain).st_mode & stat.S_ISGID
    assert stat.S_IMODE(os.stat(plain).st_mode) & 0o777 == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _undeletable(file) -> None:
    """A file its folder cannot lose: immutable for root (permissions do not stop it), else its
    folder read-only."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(file)]).returncode != 0:
            pytest.skip("no chattr +i here")
    else:
        os.chmod(file.parent, 0o500)


def _deletable(file) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(file)], check=True)
    else:
        os.chmod(file.parent, 0o700)


def test_a_replaced_folder_that_cannot_be_deleted_whole_is_a_warning(tmp_path, caplog):
    """Another user's files in the replaced folder (a group member's best/ at a resume): the new
    folder was in place, yet the write failed with 'adapter: cannot write (Permission denied)' and a
    copy of the old folder stayed beside it for good."""
    best = tmp_path / "best"
    (best / "adapter").mkdir(parents=True)
    stuck = best / "adapter" / "adapter_model.safetensors"
    stuck.write_text("old")
    _undeletable(stuck)
    try:
        with caplog.at_level("WARNING", logger="gpt1"), atomic_dir(best) as tmp:
            (tmp / "config.json").write_text("new")
        assert (best / "config.json").read_text() == "new"
        warnings = [r.message for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and warnings[0].startswith(f"{best}: written; the folder it replaced could not be "
                                                             "deleted whole"), warnings
        assert warnings[0].endswith("by hand") and "adapter/adapter_model.safetensors)" in warnings[0]
        [left] = tmp_path.glob(".best.*")
        assert f"delete {left} by hand" in warnings[0]
        # Said once: the next write (the next best/ of the run, another process's) leaves it alone, and
        # does not take it for a killed writer's temp (it warned at every write after, "left by a killed writer").
        caplog.clear()
        with caplog.at_level("WARNING", logger="gpt1"), atomic_dir(best) as tmp:
            (tmp / "config.json").write_text("newer")
        assert [r.message for r in caplog.records if r.levelname == "WARNING"] == []
        assert [*tmp_path.glob(".best.*")] == [left]
    finally:
        for left in tmp_path.glob(".best.*"):
            _deletable(left / "adapter" / "adapter_model.safetensors")
            shutil.rmtree(left)
