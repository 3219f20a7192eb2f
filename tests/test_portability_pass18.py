"""Pass 18, what a Windows or macOS user meets that Linux can exercise: globs written with `/` on
Windows, a Mac's out-of-memory error, Muon on a Mac without bfloat16, CRLF text."""

from __future__ import annotations

import os
import types

import pytest

from gpt1.data import sources


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
