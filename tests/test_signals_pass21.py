"""Graceful stops of a real `gpt1` process (pass 21): the exit status a supervisor reads."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("sig, status, said", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_a_bpe_training_stopped_while_it_reads_its_corpus_exits_with_the_signals_status(tmp_path, sig, status, said):
    """The Rust trainer, left running in its thread, called back into Python while the interpreter
    shut down, and glibc's thread exit through its frames aborted the process: "FATAL: exception
    not rethrown", killed by SIGABRT (exit 134, a core file) instead of 143 / 130."""
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k in range(20):  # 40 MB: seconds of reading, most of a BPE training's time
        (corpus / f"part{k}.txt").write_text("\n".join(" ".join(rng.choices(words, k=100)) for _ in range(3000)))
    process = subprocess.Popen([sys.executable, "-m", "gpt1", "tokenizer", "train", "--vocab-size", "4096",
                                "--out", str(tmp_path / "tok"), str(corpus)], cwd=tmp_path, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "GPT1_QUIET": "1"})
    assert process.stderr.readline().startswith("training a 4,096-token BPE tokenizer")
    try:
        time.sleep(0.5)  # the corpus is being read
        process.send_signal(sig)
        err = process.stderr.read()
        assert process.wait(60) == status, err
    finally:
        process.kill()
    assert err.strip() == f"gpt1 tokenizer train: {said}"
    assert not (tmp_path / "tok").exists() and not (tmp_path / "core").exists()


def test_no_writable_temporary_folder_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    """torch imports dill (a `datasets` dependency), which asks for a temporary folder at import:
    in a container with a read-only root and no /tmp volume every command was a 60-line traceback."""
    import tempfile

    from tests.test_battery import run_main

    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir's cache
    monkeypatch.setattr(tempfile, "_candidate_tempdir_list", lambda: [str(tmp_path / "missing")])
    rc, err = run_main(capsys, "info", "tiny")
    assert rc == 2 and err.strip().splitlines() == [
        "gpt1 info: error: no writable temporary folder (TMPDIR, /tmp, /var/tmp, /usr/tmp or the current folder); set "
        "TMPDIR to one (a container with a read-only root filesystem needs a writable /tmp volume)"]
