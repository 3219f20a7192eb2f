"""Platform differences in gpt1.core.io, the CLI's exit status and the server's socket, tested
here on Linux by simulating the other platform in the one thing that differs (sys.platform, what
Windows' os.kill does, a module or signal it lacks, what macOS's /dev/fd is, a case-insensitive
name); the rest is the real code on real files, processes and sockets."""

from __future__ import annotations

import ctypes
import fcntl
import io as stdio
import json
import os
import signal
import socket
import subprocess
import sys
import types

import pytest

from gpt1.cli import main
from gpt1.core import io, locks, temp_files
from gpt1.core.errors import Gpt1Error
from gpt1.data import sources
from gpt1.serve.server import bind

REAL_KILL = os.kill


@pytest.fixture
def windows(monkeypatch):
    """sys.platform is "win32", and os.kill is Windows': TerminateProcess for any signal, and a
    plain OSError (WinError 87) for a pid that is gone. Returns the pids it was asked to signal."""
    monkeypatch.setattr(sys, "platform", "win32")
    signalled = []

    def kill(pid, sig):
        signalled.append(pid)
        try:
            REAL_KILL(pid, signal.SIGKILL)
        except ProcessLookupError:
            raise OSError(22, "The parameter is incorrect") from None

    monkeypatch.setattr(os, "kill", kill)
    return signalled


class _Kernel32:
    """kernel32's process calls, answered from this machine's processes."""
    last_error = 0

    def OpenProcess(self, access, inherit, pid):
        try:
            REAL_KILL(pid, 0)
        except ProcessLookupError:
            self.last_error = 87  # ERROR_INVALID_PARAMETER
            return 0
        return pid

    def GetExitCodeProcess(self, handle, code):
        code._obj.value = 259  # STILL_ACTIVE
        return 1

    def CloseHandle(self, handle):
        return 1


def test_a_write_on_windows_signals_no_process_and_sweeps_a_dead_writers_temps(tmp_path, windows, monkeypatch):
    """os.kill(pid, 0) killed the live writer whose pid a temp name carried, and kept a dead
    one's temp (up to 1 GB) for good: its OSError read as "alive"."""
    kernel32 = _Kernel32()
    monkeypatch.setattr(temp_files, "ctypes", ctypes, raising=False)  # imported on Windows only
    monkeypatch.setattr(ctypes, "WinDLL", lambda name, use_last_error: kernel32, raising=False)
    monkeypatch.setattr(ctypes, "get_last_error", lambda: kernel32.last_error, raising=False)
    gone = subprocess.Popen(["true"])
    gone.wait()
    writer = subprocess.Popen(["sleep", "30"])
    try:
        live_temp = tmp_path / f".x.json.{writer.pid}.abcdefgh.tmp"
        dead_temp = tmp_path / f".x.json.{gone.pid}.abcdefgh.tmp"
        live_temp.write_text("half")
        dead_temp.write_text("half")
        io.write_json(tmp_path / "x.json", {"a": 1})
        assert windows == [] and writer.poll() is None
        assert live_temp.exists() and not dead_temp.exists()
    finally:
        writer.kill()
        writer.wait()


def test_the_folder_lock_holds_on_windows(tmp_path, windows, monkeypatch):
    """Windows has no fcntl: there was no lock at all, so a second trainer ran in the same dir."""
    monkeypatch.setitem(sys.modules, "fcntl", None)

    def locking(fd, mode, nbytes):  # per handle, as Windows' (flock's are per open file too)
        assert os.lseek(fd, 0, os.SEEK_CUR) >= 200  # past the pid text that readers read
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if mode == msvcrt.LK_NBLCK else fcntl.LOCK_UN)

    msvcrt = types.SimpleNamespace(LK_NBLCK=2, LK_UNLCK=0, locking=locking)
    monkeypatch.setattr(locks, "msvcrt", msvcrt, raising=False)
    me = f"process {os.getpid()}"
    with io.exclusive(tmp_path, "training"):
        with pytest.raises(Gpt1Error, match="another thread of this process is training there already"):
            with io.exclusive(tmp_path, "training"):
                pass
        assert io.lock_holder(tmp_path) == me
        with pytest.raises(Gpt1Error, match=f"{me} is using it; cannot replace it while it runs"):
            io.check_unlocked(tmp_path, "replace it")
    assert io.lock_holder(tmp_path) is None
    with io.exclusive(tmp_path, "training"):
        pass


def test_a_reader_gone_on_windows_ends_quietly(monkeypatch):
    """`gpt1 generate ... | head` on Windows: AttributeError, no signal.SIGPIPE there."""
    monkeypatch.delattr(signal, "SIGPIPE")

    class ReaderGone(stdio.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ReaderGone())
    assert main(["info", "tiny"]) == 141


def test_a_second_server_on_windows_cannot_take_a_port_in_use(monkeypatch):
    """Windows' SO_REUSEADDR lets a socket bind a port another one listens on, as Linux's
    SO_REUSEPORT does; its SO_EXCLUSIVEADDRUSE refuses that, as Linux's SO_REUSEADDR does."""
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(socket, "SO_EXCLUSIVEADDRUSE", socket.SO_REUSEADDR, raising=False)
    monkeypatch.setattr(socket, "SO_REUSEADDR", socket.SO_REUSEPORT)
    first = bind("127.0.0.1", 0)
    first.listen()  # bind() only binds now (the server listens once its engine runs)
    try:
        with pytest.raises(Gpt1Error, match=r"cannot listen on 127\.0\.0\.1:\d+: .*another server on that port"):
            bind("127.0.0.1", first.getsockname()[1]).close()
    finally:
        first.close()


def test_an_open_descriptor_under_macos_dev_fd_is_written_into(tmp_path, monkeypatch):
    """macOS's /dev/fd is a file system of its own, not a link into /proc: `--json /dev/stdout >
    out.json` was not taken for a stream there (`/dev/fd: cannot write 1 there`)."""
    realpath = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda p, **kw: "/dev/fd" if os.fspath(p) == "/dev/fd" else realpath(p, **kw))
    out = tmp_path / "out.json"
    with open(out, "w") as shell_redirect:
        descriptor = f"/dev/fd/{shell_redirect.fileno()}"
        assert io.is_stream(descriptor)
        io.write_json(descriptor, {"a": 1})
        assert os.fstat(shell_redirect.fileno()).st_size > 0  # written into the open file, not renamed onto it
    assert json.loads(out.read_text()) == {"a": 1}


def test_an_own_file_named_in_another_case_is_refused(tmp_path):
    """On a case-insensitive file system (APFS, NTFS) `--out RUN/Model.safetensors` is the weights."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    os.link(model / "model.safetensors", model / "Model.safetensors")  # one file, two cases: as APFS has it
    for name in ("Model.safetensors", "Train_Config.json"):  # the weights; a new name that would be the run's file
        with pytest.raises(Gpt1Error, match=f"{name}: belongs to .*model, a model dir"):
            io.file_target(model / name)
    (model / "Config.json").write_text("{}")  # a file of its own on this (case-sensitive) file system
    assert io.file_target(model / "Config.json") == model / "Config.json"


# What a Windows or macOS user meets that Linux can exercise: globs written with `/` on Windows,
# Muon on a Mac without bfloat16, CRLF text.

def _as_on_windows(monkeypatch):
    """The sources module's `os` with Windows' separators ("\\", and "/" as the alternative):
    the only thing that differs there for the glob code."""
    windows_os = types.ModuleType("os_as_on_windows")
    windows_os.__dict__.update(os.__dict__)
    windows_os.sep, windows_os.altsep = "\\", "/"
    monkeypatch.setattr(sources, "os", windows_os)


def test_a_glob_written_with_slashes_matches_on_windows(tmp_path, monkeypatch):
    """cmd.exe and PowerShell leave globs to the program; gpt1 split them only at "\\", so the
    documented `notes/*.txt` and `corpus/**/*.txt` matched nothing there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "a.txt").write_text("a")
    (tmp_path / "corpus" / "sub" / "b.txt").write_text("b")
    _as_on_windows(monkeypatch)
    assert [s.location for s in sources.resolve_sources(["corpus/*.txt"])] == ["corpus/a.txt"]
    assert [s.location for s in sources.resolve_sources(["corpus/**/*.txt"])] == ["corpus/a.txt", "corpus/sub/b.txt"]
    assert [s.location for s in sources.resolve_sources(["corpus\\*.txt"])] == ["corpus/a.txt"]


def test_muon_on_a_mac_without_bfloat16_is_refused_before_the_first_step(monkeypatch, tiny_config):
    """torch.optim.Muon (the quickstart's recipe) orthogonalizes in bfloat16 whatever the weights'
    dtype; on MPS before macOS 14 the first step failed with MPS's TypeError, a traceback."""
    import torch

    from gpt1.core import device as core_device
    from gpt1.core.errors import Gpt1Error
    from gpt1.train.config import TrainConfig
    from gpt1.train.optim import build_optimizer
    from tests.model_factories import random_model

    monkeypatch.setattr(core_device, "_mps_available", lambda: True)
    sonoma = False
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: sonoma)
    model, mps = random_model(tiny_config, seed=0), torch.device("mps")
    with pytest.raises(Gpt1Error, match=r"^optimizer=muon computes its update in bfloat16, and MPS has no bfloat16 "
                                        r"before macOS 14.*use optimizer=adamw, or device=cpu"):
        build_optimizer(model, TrainConfig(optimizer="muon"), mps)
    build_optimizer(model, TrainConfig(optimizer="adamw"), mps)  # AdamW has no bfloat16 step
    sonoma = True
    build_optimizer(model, TrainConfig(optimizer="muon"), mps)


@pytest.mark.parametrize("read_bytes", [1, 2, 3, 7, 1 << 20])
def test_crlf_and_cr_line_ends_read_as_lf_across_every_chunk_edge(tmp_path, monkeypatch, read_bytes):
    """A text saved on Windows (`\\r\\n`) trained, tokenized and scored differently from the same
    text with `\\n` (7 of 300 BPE merges spent on "\\r"; bits per byte 3.30 against 2.91), where
    Python's text files and `datasets`' text loader read both the same."""
    from gpt1.data import readers
    from gpt1.data.readers import BadRecord, read_text

    monkeypatch.setattr(readers, "READ_BYTES", read_bytes)
    lf = "def f():\n    return 1\n\nclass é:\n    pass\n"
    (tmp_path / "crlf.txt").write_bytes(lf.replace("\n", "\r\n").encode())
    (tmp_path / "cr.txt").write_bytes(lf.replace("\n", "\r").encode())
    (tmp_path / "lf.txt").write_bytes(lf.encode())
    for name in ("crlf.txt", "cr.txt", "lf.txt"):
        assert "".join(read_text(tmp_path / name)) == lf, name
    (tmp_path / "end.txt").write_bytes(b"a\r")  # a "\r" that ends the file is a line end too
    assert "".join(read_text(tmp_path / "end.txt")) == "a\n"
    # Invalid UTF-8 is still reported at its offset in the file's own bytes.
    (tmp_path / "bad.txt").write_bytes(b"a\r\nb\r\n\xff")
    with pytest.raises(BadRecord, match="invalid UTF-8 at byte offset 6$"):
        "".join(read_text(tmp_path / "bad.txt"))
