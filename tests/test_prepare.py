"""`gpt1 prepare`: EOS after every document, a deterministic split, atomic output and resume,
and clear errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt1.cli import main
from gpt1.core.errors import Gpt1Error
from gpt1.core.tokenizer import Tokenizer
from gpt1.data.shards import ShardWindows, fixed_windows, load_meta, prepare, sequential_windows
from gpt1.data.sources import iter_documents
from tests.test_battery import assert_one_clear_line, run_main


def _docs(tokens: np.ndarray, eos: int) -> list[tuple[int, ...]]:
    assert tokens[-1] == eos
    cuts = np.flatnonzero(tokens == eos)
    return [tuple(tokens[a + 1:b]) for a, b in zip(np.r_[-1, cuts[:-1]], cuts)]


@pytest.fixture(scope="module")
def small_corpus(corpus_dir) -> Path:
    return corpus_dir / "json"


def test_every_document_once_with_eos_and_a_deterministic_split(small_corpus, tokenizer, tmp_path):
    meta = prepare([str(small_corpus)], tokenizer, tmp_path / "a", val=0.3, seed=7, batch_docs=2)
    expected = sorted(tuple(tokenizer.encode(t)) for t in iter_documents([str(small_corpus)]))
    train = np.memmap(tmp_path / "a" / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(tmp_path / "a" / "val.bin", dtype=np.uint16, mode="r")
    train_docs, val_docs = _docs(train, tokenizer.eos_id), _docs(val, tokenizer.eos_id)
    assert sorted(train_docs + val_docs) == expected  # [EOS] after every document, nothing lost
    assert meta["train"] == {"file": "train.bin", "tokens": len(train), "documents": len(train_docs)}
    assert meta["val"]["documents"] == len(val_docs) > 0
    assert meta["tokenizer"]["fingerprint"] == tokenizer.fingerprint
    assert (tmp_path / "a" / "tokenizer.json").is_file() and meta["dtype"] == "uint16"
    # the same split whatever the batch size; another seed gives another split
    prepare([str(small_corpus)], tokenizer, tmp_path / "b", val=0.3, seed=7, batch_docs=5)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    prepare([str(small_corpus)], tokenizer, tmp_path / "c", val=0.3, seed=8)
    assert (tmp_path / "a" / "val.bin").read_bytes() != (tmp_path / "c" / "val.bin").read_bytes()
    with pytest.raises(Gpt1Error, match=r"batch_docs \(--batch-docs\) must be a whole number >= 1, got 0"):
        prepare([str(small_corpus)], tokenizer, tmp_path / "d", batch_docs=0)


def test_split_by_count(small_corpus, tokenizer, tmp_path):
    n_docs = sum(1 for _ in iter_documents([str(small_corpus)]))
    meta = prepare([str(small_corpus)], tokenizer, tmp_path / "a", val=3, batch_docs=2)
    assert (meta["val"]["documents"], meta["train"]["documents"]) == (3, n_docs - 3)
    again = prepare([str(small_corpus)], tokenizer, tmp_path / "b", val=3, batch_docs=4)
    assert (tmp_path / "a" / "val.bin").read_bytes() == (tmp_path / "b" / "val.bin").read_bytes()
    assert again["val"] == meta["val"]
    val_docs = _docs(np.fromfile(tmp_path / "a" / "val.bin", dtype=np.uint16), tokenizer.eos_id)
    train_docs = _docs(np.fromfile(tmp_path / "a" / "train.bin", dtype=np.uint16), tokenizer.eos_id)
    expected = sorted(tuple(tokenizer.encode(t)) for t in iter_documents([str(small_corpus)]))
    assert sorted(val_docs + train_docs) == expected


def test_interrupted_run_with_changed_sources_starts_over_cleanly(small_corpus, tokenizer, tmp_path):
    """A bad file late in the corpus stops the run after some commits; after the file is changed
    (another size and time) the run starts over and gives exactly the bytes of a clean run."""
    val = 0.3
    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    (corpus / "zz_last.txt").write_bytes(b"bad \xff bytes")
    with pytest.raises(Gpt1Error, match=r"zz_last\.txt: invalid UTF-8"):
        prepare([str(corpus)], tokenizer, tmp_path / "out", val=val, batch_docs=2, commit_bytes=1)
    state = json.loads((tmp_path / "out" / "prepare-state.json").read_text())
    assert state["documents"] > 0
    assert not (tmp_path / "out" / "meta.json").exists() and not (tmp_path / "out" / "train.bin").exists()
    (corpus / "zz_last.txt").write_text("now fine", encoding="utf-8")
    # the fixed file has another size, so its identity changed: resume only when the key matches
    os.utime(corpus / "zz_last.txt", ns=(1, 1))
    state_key = state["key"]
    resumed = prepare([str(corpus)], tokenizer, tmp_path / "out", val=val, batch_docs=2, commit_bytes=1)
    clean = prepare([str(corpus)], tokenizer, tmp_path / "clean", val=val, batch_docs=2)
    assert resumed["train"] == clean["train"] and resumed["val"] == clean["val"]
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lock", "meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert state_key["files"] != resumed["key"]["files"]  # the changed file restarted the run cleanly


def _interrupted_prepare(small_corpus, tokenizer, tmp_path, val):
    """A prepare of a copy of the corpus stopped by a bad file at its end, after some commits:
    (the copy, the bad file)."""
    corpus = tmp_path / "corpus"
    shutil.copytree(small_corpus, corpus)
    bad = corpus / "zz_last.txt"
    bad.write_bytes(b"bad \xff bytes")
    with pytest.raises(Gpt1Error):
        prepare([str(corpus)], tokenizer, tmp_path / "out", val=val, batch_docs=2, commit_bytes=1)
    return corpus, bad


@pytest.mark.parametrize("val", [0.3, 3])
def test_interrupted_run_resumes_to_the_same_bytes(small_corpus, tokenizer, tmp_path, val):
    corpus, bad = _interrupted_prepare(small_corpus, tokenizer, tmp_path, val)
    committed = json.loads((tmp_path / "out" / "prepare-state.json").read_text())["documents"]
    with open(tmp_path / "out" / "train.bin.partial", "ab") as f:  # bytes written after the last commit
        f.write(b"\x01\x00" * 7)
    # same size and mtime: the same source identity, so the run resumes (skipping committed documents)
    stat = bad.stat()
    bad.write_bytes(b"bad x bytes")
    os.utime(bad, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    meta = prepare([str(corpus)], tokenizer, tmp_path / "out", val=val, batch_docs=2, commit_bytes=1)
    clean = prepare([str(corpus)], tokenizer, tmp_path / "clean", val=val, batch_docs=2)
    assert committed > 0 and meta["train"] == clean["train"] and meta["val"] == clean["val"]
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


def test_finished_data_is_kept_or_refused(small_corpus, tokenizer, tmp_path):
    prepare([str(small_corpus)], tokenizer, tmp_path / "out", val=2)
    before = (tmp_path / "out" / "train.bin").stat().st_mtime_ns
    prepare([str(small_corpus)], tokenizer, tmp_path / "out", val=2)  # up to date: nothing rewritten
    assert (tmp_path / "out" / "train.bin").stat().st_mtime_ns == before
    with pytest.raises(Gpt1Error, match=r"already holds data prepared with other settings \(val: 2 -> 3\).*--overwrite"):
        prepare([str(small_corpus)], tokenizer, tmp_path / "out", val=3)
    assert (tmp_path / "out" / "train.bin").stat().st_mtime_ns == before
    assert prepare([str(small_corpus)], tokenizer, tmp_path / "out", val=3, overwrite=True)["val"]["documents"] == 3


def _read_only_run(folder: Path, argv: list[str]) -> subprocess.CompletedProcess | None:
    """`argv` run with `folder` read-only: a read-only bind mount in a private mount namespace
    as root (chmod does not stop root), chmod otherwise; None where neither is possible."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=120)
        finally:
            folder.chmod(0o755)
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount --bind -o ro '{folder}' '{folder}'"], capture_output=True).returncode:
        return None
    command = " ".join(f"'{a}'" for a in argv)
    return subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind -o ro '{folder}' '{folder}' && exec {command}"],
                          capture_output=True, text=True, timeout=120)


def test_finished_data_in_a_read_only_folder_needs_no_lock(small_corpus, tokenizer_dir, tmp_path):
    """Rerunning the prepare that made a folder (a shared read-only copy, a script that always
    prepares first) says there is nothing to do; it failed creating the folder's `.lock`. While
    another process holds the lock (rewriting the folder), it is still refused as busy."""
    from gpt1.core.io import exclusive

    argv = [sys.executable, "-m", "gpt1", "prepare", str(small_corpus), "--tokenizer", str(tokenizer_dir),
            "--out", str(tmp_path / "out"), "--val", "2"]
    assert subprocess.run(argv, capture_output=True, text=True, timeout=120).returncode == 0
    (tmp_path / "out" / ".lock").unlink()  # as in a copy made without it
    result = _read_only_run(tmp_path / "out", argv)
    if result is None:
        pytest.skip("no way to make a folder read-only for root here (unshare -m)")
    assert result.returncode == 0 and "already holds this prepared data" in result.stderr, result.stderr
    assert not (tmp_path / "out" / ".lock").exists()
    with exclusive(tmp_path / "out", "preparing data"):
        busy = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert busy.returncode == 2 and "is preparing data there already" in busy.stderr, busy.stderr


def test_bad_inputs(tmp_path, tokenizer, small_corpus):
    from tokenizers import AddedToken

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(Gpt1Error, match="the corpus is empty"):
        prepare([str(tmp_path / "empty")], tokenizer, tmp_path / "out", val=1)
    assert not (tmp_path / "out" / "meta.json").exists() and not (tmp_path / "out" / "train.bin").exists()
    with pytest.raises(Gpt1Error, match=r"val \(--val\) must be"):
        prepare([str(small_corpus)], tokenizer, tmp_path / "out2", val=float("inf"))
    with pytest.raises(Gpt1Error, match=r"max_documents \(--max-documents\) must be a whole number >= 1, got -1"):
        prepare([str(small_corpus)], tokenizer, tmp_path / "out2", max_documents=-1)
    with pytest.raises(Gpt1Error, match="every one of the"):
        prepare([str(small_corpus)], tokenizer, tmp_path / "out3", val=10_000)
    with pytest.raises(Gpt1Error, match=r"val \(--val\) must be"):
        prepare([str(small_corpus)], tokenizer, tmp_path / "out4", val=2.5)
    big = type(tokenizer).load(tokenizer.save(tmp_path / "big"))
    big.backend.add_tokens([AddedToken(f"tok{i}", normalized=False) for i in range(66_000)])
    with pytest.raises(Gpt1Error, match="must be at most 65,536"):
        prepare([str(small_corpus)], big, tmp_path / "out5", val=1)
    assert not (tmp_path / "out5").exists()


def test_windows_are_reproducible_and_split_across_ranks(small_corpus, tokenizer, tmp_path):
    prepare([str(small_corpus)], tokenizer, tmp_path / "d", val=2)
    path = tmp_path / "d" / "train.bin"
    tokens = np.fromfile(path, dtype=np.uint16)
    single = ShardWindows(path, 16, 2, seed=3)
    batches = [single.next_batch() for _ in range(4)]
    for x, y in batches:
        assert x.dtype.is_floating_point is False and x.shape == y.shape == (2, 16)
        assert (x[:, 1:] == y[:, :-1]).all()
        for row in x.numpy():  # every window is a real slice of the shard
            start = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(tokens, 16) == row, axis=1))
            assert len(start) >= 1
    # two ranks with half the draws each see the same windows, interleaved
    ranks = [ShardWindows(path, 16, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    interleaved = [ranks[i % 2].next_batch() for i in range(4)]
    assert all((a[0] == b[0]).all() for a, b in zip(batches, interleaved))
    # resuming from the state continues the stream
    resumed = ShardWindows(path, 16, 2, seed=3)
    resumed.load_state_dict(json.loads(json.dumps({"draws": 2})))
    assert (resumed.next_batch()[0] == batches[2][0]).all()
    first, again = fixed_windows(tmp_path / "d" / "val.bin", 16, 2, 3), fixed_windows(tmp_path / "d" / "val.bin", 16, 2, 3)
    assert len(first) == 3 and all((a[0] == b[0]).all() for a, b in zip(first, again))
    assert load_meta(tmp_path / "d")["train"]["tokens"] == len(tokens)


def test_prepare_cli(small_corpus, tokenizer_dir, tmp_path, capsys):
    assert main(["prepare", str(small_corpus), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "d"),
                 "--val", "2"]) == 0
    assert "prepared" in capsys.readouterr().err
    assert load_meta(tmp_path / "d")["val"]["documents"] == 2
    assert main(["prepare", str(tmp_path / "missing"), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "e")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    # /dev/null exists: it was "no such file or directory" too, which is not what is wrong with it.
    assert main(["prepare", os.devnull, "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "e")]) == 2
    assert f"{os.devnull}: not a regular file or directory" in capsys.readouterr().err
    # The Python API takes one source alone too (a lone string was read as one-character specs).
    assert prepare(small_corpus, Tokenizer.load(tokenizer_dir), tmp_path / "d", val=2) == load_meta(tmp_path / "d")


def test_a_small_corpus_always_has_a_validation_document(small_corpus, tokenizer, tmp_path):
    """Issue 16: 20-40 files with the default --val 0.0005 used to fail ("no document went to
    validation"); the smallest-hash document is held out instead, and nothing is lost."""
    meta = prepare([str(small_corpus)], tokenizer, tmp_path / "a")
    assert meta["val"]["documents"] == 1
    train = np.fromfile(tmp_path / "a" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "a" / "val.bin", dtype=np.uint16)
    expected = sorted(tuple(tokenizer.encode(t)) for t in iter_documents([str(small_corpus)]))
    assert sorted(_docs(train, tokenizer.eos_id) + _docs(val, tokenizer.eos_id)) == expected
    assert meta["train"]["tokens"] == len(train) and meta["val"]["tokens"] == len(val)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [".lock", "meta.json", "tokenizer.json", "train.bin", "val.bin"]
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_text("a single document")
    with pytest.raises(Gpt1Error, match="needs at least two"):
        prepare([str(tmp_path / "one")], tokenizer, tmp_path / "b")


def test_long_documents_are_tokenized_in_pieces_to_the_same_ids(tokenizer, tmp_path, monkeypatch):
    import gpt1.data.readers as readers

    words = " ".join(f"word{i % 97}  x{i % 13}\n" if i % 50 == 0 else f"w{i % 89}" for i in range(6000))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "long.txt").write_text(words)
    (tmp_path / "corpus" / "short.txt").write_text("a short one")
    whole = prepare([str(tmp_path / "corpus")], tokenizer, tmp_path / "whole", val=1)
    monkeypatch.setattr(readers, "PIECE_CHARS", 1000)
    assert len(list(readers.read_text(tmp_path / "corpus" / "long.txt"))) > 20
    pieces = prepare([str(tmp_path / "corpus")], tokenizer, tmp_path / "pieces", val=1, batch_docs=3)
    # The same documents' ids; not always on the same sides: a document's side is the hash of its
    # first piece, and long.txt's is now 1,000 characters, not all of it.
    assert pieces["train"]["tokens"] + pieces["val"]["tokens"] == whole["train"]["tokens"] + whole["val"]["tokens"]

    def documents(folder):
        return sorted(_docs(np.fromfile(folder / "train.bin", dtype=np.uint16), tokenizer.eos_id)
                      + _docs(np.fromfile(folder / "val.bin", dtype=np.uint16), tokenizer.eos_id))
    assert documents(tmp_path / "pieces") == documents(tmp_path / "whole")


@pytest.mark.parametrize("val", [3, 0.3])
def test_a_kill_inside_a_commit_resumes_to_the_same_bytes(small_corpus, tokenizer_dir, tmp_path, val):
    """Issue 17 item 1: the count-mode candidates and prepare-state.json were two commits; a kill
    between them resumed into different shards. Killed at that exact point, the rerun matches."""
    script = ("import sys; from gpt1.core.tokenizer import Tokenizer; from gpt1.data.shards import prepare; "
              f"prepare([sys.argv[1]], Tokenizer.load(sys.argv[2]), sys.argv[3], val={val}, batch_docs=2, commit_bytes=1)")
    for nth in (2, 4):
        out = tmp_path / f"out{nth}"
        env = {**os.environ, "GPT1_CRASH_AT": f"prepare-commit:{nth}"}
        killed = subprocess.run([sys.executable, "-c", script, str(small_corpus), str(tokenizer_dir), str(out)],
                                env=env, capture_output=True, text=True, timeout=120)
        assert killed.returncode == 137, killed.stderr
        assert not (out / "meta.json").exists()
        from gpt1.core.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(tokenizer_dir)
        resumed = prepare([str(small_corpus)], tokenizer, out, val=val, batch_docs=2, commit_bytes=1)
        clean = prepare([str(small_corpus)], tokenizer, tmp_path / f"clean{nth}", val=val, batch_docs=2)
        assert resumed["train"] == clean["train"] and resumed["val"] == clean["val"]
        for name in ("train.bin", "val.bin"):
            assert (out / name).read_bytes() == (tmp_path / f"clean{nth}" / name).read_bytes()
        assert sorted(p.name for p in out.iterdir()) == [".lock", "meta.json", "tokenizer.json", "train.bin", "val.bin"]


def test_prepare_into_a_model_dir_is_refused(small_corpus, tokenizer, tiny_model_dir, tmp_path):
    """Issue 17 item 3: prepare --out MODEL_DIR replaced the model's tokenizer.json."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = (model / "tokenizer.json").read_bytes()
    with pytest.raises(Gpt1Error, match="is a model dir"):
        prepare([str(small_corpus)], tokenizer, model, val=1)
    assert (model / "tokenizer.json").read_bytes() == before


def test_an_out_that_is_or_lies_under_a_file_is_one_clear_line(small_corpus, tokenizer_dir, tmp_path, capsys):
    from tests.test_battery import assert_one_clear_line, run_main

    file = tmp_path / "a.txt"
    file.write_text("mine")
    for out, pattern in [(file, "a.txt is not a folder"), (file / "data", "a.txt/data lies under .*a.txt, which is not a folder")]:
        result = run_main(capsys, "prepare", "--tokenizer", tokenizer_dir, "--out", out, small_corpus)
        assert_one_clear_line(*result, f"--out .*{pattern}: the prepared data needs a folder")
    assert file.read_text() == "mine"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_second_prepare_on_the_same_out_is_one_clear_line_and_leaves_the_first_alone(
        small_corpus, tokenizer_dir, tmp_path, capsys):
    """Two prepares on one --out: the second deleted the first's partial files and meta.json
    (a traceback, and a folder left without meta.json). Now it is refused while the first holds the folder."""
    from gpt1.core.io import exclusive
    from tests.test_battery import assert_one_clear_line, run_main

    out = tmp_path / "d"
    args = ["prepare", "--tokenizer", tokenizer_dir, "--out", out, "--val", "2", small_corpus]
    bad = tmp_path / "corpus"  # the first run's files: an interrupted prepare
    shutil.copytree(small_corpus, bad)
    (bad / "zz_last.txt").write_bytes(b"bad \xff bytes")
    with pytest.raises(Gpt1Error, match="invalid UTF-8"):
        prepare([str(bad)], Tokenizer.load(tokenizer_dir), out, val=2, batch_docs=2, commit_bytes=1)
    before = _files(out)
    assert "train.bin.partial" in before and "prepare-state.json" in before
    with exclusive(out, "preparing data"):  # the first run, still going
        assert_one_clear_line(*run_main(capsys, *args), rf"{out}: another thread of this process is preparing data there already")
        assert _files(out) == before
    assert run_main(capsys, *args)[0] == 0  # once it has ended, the folder is free
    assert load_meta(out)["val"]["documents"] == 2


def test_a_rerun_says_why_an_interrupted_prepare_starts_over(small_corpus, tokenizer, tmp_path, caplog):
    """Missing partial files were reported as "other settings" (the settings were the same)."""
    corpus, bad = _interrupted_prepare(small_corpus, tokenizer, tmp_path, 2)
    (tmp_path / "out" / "train.bin.partial").unlink()
    stat = bad.stat()  # fixed, with the same size and time: the same settings
    bad.write_bytes(b"bad x bytes")
    os.utime(bad, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with caplog.at_level("INFO", logger="gpt1"):
        prepare([str(corpus)], tokenizer, tmp_path / "out", val=2)
    assert "holds an interrupted prepare whose partial files are missing; starting over" in caplog.text
    assert "other settings" not in caplog.text


def test_prepare_into_a_started_training_run_is_refused(small_corpus, tokenizer_dir, data_dir, tmp_path, capsys):
    """A run killed (or still running) before it writes its model files has train_config.json and
    checkpoints/ but no config.json: prepare (and tokenizer train) wrote their tokenizer.json into it."""
    from gpt1.train.config import TrainConfig, load_config
    from gpt1.train.pretrain import pretrain
    from tests.test_battery import assert_one_clear_line, run_main

    run = tmp_path / "run"
    overrides = ["model=tiny", "n_layer=1", "block_size=32", "batch_size=2", "max_steps=2", "save_every=2",
                 "eval_every=2", "device=cpu"]
    env = {**os.environ, "GPT1_CRASH_AT": "before-outputs", "GPT1_QUIET": "1"}
    script = ("import sys; from gpt1.train.config import TrainConfig, load_config; from gpt1.train.pretrain import pretrain; "
              f"pretrain(load_config(TrainConfig, None, {overrides!r}), sys.argv[1], sys.argv[2])")
    killed = subprocess.run([sys.executable, "-c", script, str(data_dir), str(run)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == 137, killed.stderr
    assert (run / "train_config.json").is_file() and not (run / "config.json").exists()
    before = _files(run)
    result = run_main(capsys, "prepare", "--tokenizer", tokenizer_dir, "--out", run, "--val", "2", small_corpus)
    assert_one_clear_line(*result, rf"{run} is a training run dir: prepared data .* needs a folder of its own")
    result = run_main(capsys, "tokenizer", "train", "--vocab-size", "300", "--out", run, small_corpus)
    assert_one_clear_line(*result, rf"{run} is a training run dir: its tokenizer.json belongs to it")
    assert _files(run) == before
    assert pretrain(load_config(TrainConfig, None, overrides), data_dir, run).steps == 2  # the run still resumes


def test_an_older_gpt1s_interrupted_prepare_leaves_no_partial_file(small_corpus, tokenizer, tmp_path, caplog):
    """gpt1 before 2026-11-27 kept the count mode's held-out candidates in one `.val-heap.partial`
    (now one per commit, `.val-heap.partial.N`): the run that starts over left it in the finished dir."""
    corpus, bad = _interrupted_prepare(small_corpus, tokenizer, tmp_path, 2)
    bad.write_bytes(b"bad x bytes")  # fixed: what stopped the interrupted run
    out = tmp_path / "out"
    state = json.loads((out / "prepare-state.json").read_text())
    for key in ("heap_file", "commits", "smallest_train"):  # what the older state did not hold
        state.pop(key, None)
    (out / "prepare-state.json").write_text(json.dumps(state))
    (out / ".val-heap.partial").write_bytes(b"\0" * 4096)
    with caplog.at_level("INFO", logger="gpt1"):
        prepare([str(corpus)], tokenizer, out, val=2)
    assert "damaged or from another gpt1 version; starting over" in caplog.text
    assert not [p.name for p in out.iterdir() if ".partial" in p.name]


# `gpt1 prepare` loads no torch.

# The command as `gpt1` runs it (`main`, its LIBRARIES, the prepare), then what it loaded.
PREPARE_THEN_MODULES = "import sys\nfrom gpt1.cli import main\nrc = main(sys.argv[1:])\nprint(rc, 'torch' in sys.modules)"


def test_prepare_runs_without_loading_torch(corpus_dir, tokenizer_dir, data_dir, tmp_path):
    """Loading torch, which prepare never uses, was 2-5 s: 40-55% of preparing a 5 MB corpus."""
    out = tmp_path / "data"
    ran = subprocess.run([sys.executable, "-c", PREPARE_THEN_MODULES, "prepare", str(corpus_dir / "json"),
                          "--tokenizer", str(tokenizer_dir), "--out", str(out), "--val", "2"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "GPT1_QUIET": "1"})
    assert ran.returncode == 0 and ran.stdout.split() == ["0", "False"], ran.stderr
    # The readers that training and evaluation use import torch themselves, and give what they gave.
    x, y = ShardWindows(data_dir / "train.bin", 16, 2, seed=0).next_batch()
    assert x.dtype == y.dtype and str(x.dtype) == "torch.int64" and bool((x[:, 1:] == y[:, :-1]).all())
    tokens = np.arange(40, dtype=np.uint16)
    (x, y), = sequential_windows(tokens[:21], 16, 4)  # two windows; the second scores only its last 4
    assert y[1, :12].tolist() == [-100] * 12 and y[1, 12:].tolist() == [17, 18, 19, 20] and x[1, 0] == 4


# A prepare into a finished out names the settings that differ.

def test_prepare_into_a_finished_out_names_the_settings_that_differ(tmp_path, tokenizer_dir, capsys):
    """It said only "already holds data prepared from other sources or settings"."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"{i}.txt").write_text(f"document number {i} with some words " * 5)
    prepare = ["prepare", "--tokenizer", tokenizer_dir, "--out", tmp_path / "data", "--val", "2"]
    assert run_main(capsys, *prepare, corpus)[0] == 0
    hint = r"; choose another --out, or pass --overwrite to replace it$"
    assert_one_clear_line(*run_main(capsys, *prepare, corpus, "--seed", "3", "--max-documents", "5"),
                          r"data already holds data prepared with other settings \(seed: 1337 -> 3, "
                          r"max_documents: None -> 5\)" + hint)
    (tmp_path / "more.txt").write_text("one more document")
    assert_one_clear_line(*run_main(capsys, *prepare, corpus, tmp_path / "more.txt"),
                          r"with other settings \(sources: \[.*corpus'\] -> \[.*corpus', .*more\.txt'\]\)" + hint)
    (corpus / "0.txt").write_text("edited")
    assert_one_clear_line(*run_main(capsys, *prepare, corpus), r"with other settings \(files \(changed on disk\)\)" + hint)
    assert run_main(capsys, *prepare, corpus, "--overwrite")[0] == 0
    with open(tmp_path / "data" / "val.bin", "r+b") as f:  # the same settings over a damaged shard
        f.truncate(2)
    assert_one_clear_line(*run_main(capsys, *prepare, corpus),
                          r"with these settings, but its train\.bin/val\.bin do not match meta\.json \(damaged\)" + hint)


# A prepare that failed before its first commit.

def test_a_prepare_that_failed_before_its_first_commit_leaves_no_shards_and_eval_says_so(
        tmp_path, tokenizer_dir, tiny_model_dir, capsys):
    """A prepare stopped by a bad file left train.bin.partial/val.bin.partial that nothing could
    resume from; `gpt1 eval --data` on the folder then said "directory has no text files" where
    pretrain said the prepare did not finish."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("good text " * 200)
    (corpus / "b.txt").write_bytes(b"bad \xff byte")
    assert_one_clear_line(*run_main(capsys, "prepare", corpus, "--tokenizer", tokenizer_dir, "--out", tmp_path / "data"),
                          "invalid UTF-8")
    assert not list((tmp_path / "data").glob("*.partial"))
    for argv in (["eval", "--model", tiny_model_dir, "--data", tmp_path / "data"],
                 ["pretrain", "--data", tmp_path / "data", "--out", tmp_path / "run"]):
        assert_one_clear_line(*run_main(capsys, *argv), r"data: no meta\.json: not a prepared data dir, or `gpt1 prepare` "
                                                        r"did not finish")
