"""Data pipeline at scale, on small inputs: what a kill of `gpt1 prepare` costs (commits inside a
long document, the rerun line), one-document corpora refused before any work, progress bars in
the unit of their totals (compressed sources, `tokenizer train` without a terminal), and a
finished fine-tune rerun that does not read its data."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpt1.data.readers as readers
from gpt1.cli import main
from gpt1.core.errors import Gpt1Error
from gpt1.core.tokenizer import Tokenizer, train_tokenizer
from gpt1.data.readers import ReadMeter
from gpt1.data.shards import ShardWriter, prepare
from gpt1.data.sources import iter_pieces, resolve_sources
from gpt1.train.config import load_config
from gpt1.train.finetune import FinetuneConfig, finetune
from tests.test_battery import run_main


def _words(n: int, seed: int = 0) -> str:
    """`n` pseudo-words: text that compresses like prose (about 3x), not like a repeated line."""
    rng = np.random.default_rng(seed)
    return " ".join(f"w{i}" for i in rng.zipf(1.3, n) % 5000)


# ---- a kill inside a long document resumes there ------------------------------------------

@pytest.fixture
def one_long_document(tmp_path, monkeypatch) -> Path:
    """Three documents, the middle one of ~60 pieces (pieces of 1,000 characters here)."""
    monkeypatch.setattr(readers, "PIECE_CHARS", 1000)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("a short one to start")
    (corpus / "b.txt").write_text(_words(12_000))
    (corpus / "c.txt").write_text("a short one to end")
    return corpus


class Killed(Exception):
    pass


# (val, seed): a fraction, where with seed 5 the long document is the smallest-hash one that the
# split moves to validation at the end (no document fell under the fraction); a count.
@pytest.mark.parametrize("val,seed", [(0.3, 0), (0.3, 5), (1, 0)])
def test_a_kill_inside_a_long_document_resumes_to_the_same_bytes(one_long_document, tokenizer, tmp_path,
                                                                 monkeypatch, val, seed):
    """A document longer than commit_bytes was never committed (a 1.5 GB text file: a kill at
    99% started over). Commits now fall between its pieces; killed after one, with tokens
    written past it, the rerun resumes inside the document and ends with the bytes of an
    uninterrupted run."""
    clean = prepare([str(one_long_document)], tokenizer, tmp_path / "clean", val=val, seed=seed, batch_docs=3)
    real_commit, real_add = ShardWriter.commit, ShardWriter.add
    committed_inside: list[dict] = []

    def commit(self):
        real_commit(self)
        if self.state["pieces"] and not committed_inside:
            committed_inside.append(json.loads(json.dumps(self.state)))  # as written

    def add(self, piece, ids):
        real_add(self, piece, ids)
        if committed_inside and self.state["pieces"] > committed_inside[0]["pieces"] + 4:
            raise Killed  # uncommitted tokens are in the partial files: the rerun truncates them

    monkeypatch.setattr(ShardWriter, "commit", commit)
    monkeypatch.setattr(ShardWriter, "add", add)
    with pytest.raises(Killed):
        prepare([str(one_long_document)], tokenizer, tmp_path / "out", val=val, seed=seed, batch_docs=3,
                commit_bytes=5000)
    monkeypatch.setattr(ShardWriter, "commit", real_commit)
    monkeypatch.setattr(ShardWriter, "add", real_add)
    state = json.loads((tmp_path / "out" / "prepare-state.json").read_text())
    assert state == committed_inside[0] and state["documents"] == 1 and state["pieces"] > 0
    resumed = prepare([str(one_long_document)], tokenizer, tmp_path / "out", val=val, seed=seed, batch_docs=3,
                      commit_bytes=5000)
    assert resumed["train"] == clean["train"] and resumed["val"] == clean["val"]
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    if (val, seed) == (0.3, 5):  # the case this parameter is for: the long document held out whole
        assert clean["val"]["tokens"] > clean["train"]["tokens"]


# ---- the line of a prepare stopped before or after its first commit -----------------------

def _terminate_at_first_piece(monkeypatch):
    real_add = ShardWriter.add

    def add(self, piece, ids):
        real_add(self, piece, ids)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ShardWriter, "add", add)


def test_a_terminated_prepare_says_whether_a_rerun_resumes(one_long_document, tokenizer, tokenizer_dir, tmp_path,
                                                          capsys, monkeypatch):
    """A prepare stopped before its first commit said "run the same command again to resume",
    but its partial files were already deleted and the rerun started over."""
    out = tmp_path / "out"
    _terminate_at_first_piece(monkeypatch)
    rc, err = run_main(capsys, "prepare", "--tokenizer", tokenizer_dir, "--out", out, one_long_document)
    assert rc == 128 + signal.SIGTERM
    assert err.rstrip().endswith("gpt1 prepare: terminated before its first commit (one every 256 MB of text); "
                                 "a rerun starts over"), err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing a rerun could resume from

    # Committed once (a library call with small commits), then stopped again by the CLI: it resumes.
    monkeypatch.undo()
    monkeypatch.setattr(readers, "PIECE_CHARS", 1000)
    real_add = ShardWriter.add

    def add_until_committed(self, piece, ids):
        if self.state_path.exists():
            raise Killed
        real_add(self, piece, ids)

    monkeypatch.setattr(ShardWriter, "add", add_until_committed)
    with pytest.raises(Killed):
        prepare([str(one_long_document)], tokenizer, out, batch_docs=2, commit_bytes=1)
    committed = json.loads((out / "prepare-state.json").read_text())["bytes"]
    monkeypatch.setattr(ShardWriter, "add", real_add)
    _terminate_at_first_piece(monkeypatch)
    rc, err = run_main(capsys, "prepare", "--tokenizer", tokenizer_dir, "--out", out, one_long_document)
    assert rc == 128 + signal.SIGTERM
    assert err.rstrip().endswith("gpt1 prepare: terminated; run the same command again to resume after its last "
                                 f"commit ({committed / 1e6:,.1f} MB of text)"), err

    # A rerun with other settings starts over: the old run's state goes with its files, and the line says so.
    rc, err = run_main(capsys, "prepare", "--tokenizer", tokenizer_dir, "--out", out, "--seed", "3",
                        one_long_document)
    assert rc == 128 + signal.SIGTERM and err.rstrip().endswith("a rerun starts over"), err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


# ---- a corpus of one text file is refused before any work ---------------------------------

def test_one_text_file_is_refused_before_it_is_tokenized(tokenizer, tokenizer_dir, tmp_path, capsys, monkeypatch):
    """One text file is one document, too few for a split: the error came after tokenizing all
    of it (ten minutes for 1.5 GB), and said "use more text" to a user with 1.5 GB of it."""
    big = tmp_path / "big.txt"
    big.write_text(_words(20_000))

    def never(self, texts):
        raise AssertionError("tokenized before the refusal")

    monkeypatch.setattr(Tokenizer, "encode_batch", never)
    with pytest.raises(Gpt1Error, match=r"the corpus has 1 document \(.*big\.txt\): a validation split needs at "
                                        r"least two; a text file is one document: split it into several files, or "
                                        r"use \.jsonl with one document per line"):
        prepare([str(big)], tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    rc, err = run_main(capsys, "prepare", "--tokenizer", tokenizer_dir, "--out", tmp_path / "out2", big)
    assert rc == 2 and err.count("\n") == 1 and "a text file is one document" in err, err
    # Two files and a count that holds out both: every document would go to validation.
    (tmp_path / "two").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "two" / name).write_text("some text")
    with pytest.raises(Gpt1Error, match=r"every one of the 2 documents would go to validation \(--val 2\).*"
                                        "a text file is one document"):
        prepare([str(tmp_path / "two")], tokenizer, tmp_path / "out", val=2)
    # Where the count is not known before reading (a JSONL file), the end says what a document is too.
    monkeypatch.undo()
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "the only document"}) + "\n")
    with pytest.raises(Gpt1Error, match="needs at least two; a text file is one document"):
        prepare([str(tmp_path / "one.jsonl")], tokenizer, tmp_path / "out")


# ---- progress in the unit of the total ----------------------------------------------------

@pytest.fixture
def compressed_sources(tmp_path) -> list[Path]:
    """The same 3,000 documents as a .jsonl.gz and as a parquet file of several row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [_words(100, seed=i) for i in range(3000)]
    gz = tmp_path / "docs.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": docs}), parquet, row_group_size=700)
    return [gz, parquet]


def test_read_meter_counts_the_files_bytes_read(compressed_sources, tmp_path):
    """The bar's total is the files' sizes but it counted decoded text (2-3x a compressed file):
    it passed 100% a third of the way and lost its ETA. A ReadMeter counts file bytes."""
    long_text = tmp_path / "long.txt"  # longer than one read: --skip-invalid reads it twice, counted once
    long_text.write_text(_words(300_000))
    for source, skip_invalid in [*((s, False) for s in compressed_sources), (long_text, True)]:
        size = source.stat().st_size
        with ReadMeter() as meter:
            seen = [meter.bytes for _ in iter_pieces(resolve_sources([str(source)]), skip_invalid=skip_invalid)]
        assert seen == sorted(seen) and seen[-1] <= size, source  # never back, never past the file
        assert meter.bytes == size, source
        if source.suffix != ".txt":  # gradually: a bar with a rate and an ETA, not a jump at the end
            assert len({b * 4 // size for b in seen}) >= 3, source


def test_the_prepare_bar_ends_at_100_percent_for_compressed_sources(compressed_sources, tokenizer, tmp_path,
                                                                     capsys, monkeypatch):
    monkeypatch.setenv("GPT1_QUIET", "0")
    for source in compressed_sources:
        prepare([str(source)], tokenizer, tmp_path / f"out-{source.name}", val=2)
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prepare:")]
        assert lines and lines[-1].startswith("prepare: 100%"), lines


def test_tokenizer_train_shows_progress_on_stderr_without_a_terminal(corpus_dir, tmp_path, capsys, monkeypatch):
    """With stdout not a terminal (`> log`, a pipe, nohup) `tokenizer train` was silent for ten
    minutes on 1.5 GB: the only bar was the Rust one, on stdout, and only on a terminal."""
    monkeypatch.setenv("GPT1_QUIET", "0")
    rc = main(["tokenizer", "train", "--vocab-size", "300", "--out", str(tmp_path / "tok"), str(corpus_dir / "json")])
    out, err = capsys.readouterr()
    bar = [line for line in err.splitlines() if line.startswith("tokenizer:")]
    assert rc == 0 and out == "" and bar, err
    # With the corpus's size known, a percentage (and an ETA) against it.
    text = [p.read_text() for p in sorted((corpus_dir / "json").glob("*.py"))]
    train_tokenizer(iter(text), 300, total_bytes=sum(len(t.encode()) for t in text))
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if line.startswith("tokenizer:")][-1].startswith("tokenizer: 100%")
    assert lines[-1].startswith("all ") and "bytes read; counting the last of them and computing the merges" in lines[-1]


# ---- a finished fine-tune is finished without its data ------------------------------------

def _chat_file(path: Path) -> Path:
    convs = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(40)]
    path.write_text("".join(json.dumps(c) + "\n" for c in convs))
    return path


def _ft_cfg(data: Path, *overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, ["batch_size=4", "block_size=32", "eval_batches=1", "device=cpu",
                                              "lora_r=2", "val_fraction=0.2", *overrides], data=str(data))


@pytest.mark.parametrize("length", ["max_steps=2", "epochs=0.2"])
def test_rerunning_a_finished_finetune_does_not_read_its_data(tiny_model_dir, tmp_path, caplog, length):
    """A rerun of a finished fine-tune read and encoded the whole chat dataset (2 minutes for
    200k conversations) only to say "nothing to do". It decides from the run dir now: the data
    may even be gone. A run with steps left still reads and checks its data."""
    data = _chat_file(tmp_path / "chat.jsonl")
    cfg = _ft_cfg(data, length)
    first = finetune(cfg, tiny_model_dir, tmp_path / "run")
    data.unlink()
    caplog.clear()
    with caplog.at_level("INFO", logger="gpt1"):
        again = finetune(cfg, tiny_model_dir, tmp_path / "run")
    assert f"already finished its {first.steps} steps; nothing to do" in caplog.text
    assert (again.steps, again.train_loss, again.val_loss) == (first.steps, first.train_loss, first.val_loss)
    with pytest.raises(Gpt1Error, match="different config"):  # the recipe is still checked against the run's
        finetune(_ft_cfg(data, length, "lora_r=4"), tiny_model_dir, tmp_path / "run")


def test_resuming_an_unfinished_finetune_still_reads_its_data(tiny_model_dir, tmp_path, monkeypatch, stop_training_at):
    data = _chat_file(tmp_path / "chat.jsonl")
    cfg = _ft_cfg(data, "max_steps=4", "save_every=2", "eval_every=100")
    stop_training_at(3, Killed)
    with pytest.raises(Killed):
        finetune(cfg, tiny_model_dir, tmp_path / "run")
    monkeypatch.undo()
    data.unlink()
    with pytest.raises(Gpt1Error, match="chat.jsonl"):
        finetune(cfg, tiny_model_dir, tmp_path / "run")


# The `tokenizer train` bar counts the files' bytes.

@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_the_tokenizer_bar_ends_at_its_total_for_escaped_jsonl(suffix, tmp_path, capsys, monkeypatch):
    """Its total was the file's size, its count the text's UTF-8 bytes: a .jsonl written with
    ensure_ascii (6 bytes a character as \\uXXXX, 2-3 in UTF-8) ended at 48%; a .gz had no total."""
    lines = "".join(json.dumps({"text": f"Привет, мир {i}. 你好，世界。 Γειά σου κόσμε."}) + "\n" for i in range(300))
    path = tmp_path / f"escaped{suffix}"
    path.write_bytes(gzip.compress(lines.encode()) if suffix.endswith(".gz") else lines.encode())
    monkeypatch.setenv("GPT1_QUIET", "0")
    rc, err = run_main(capsys, "tokenizer", "train", "--vocab-size", 280, "--out", tmp_path / "tok", path)
    bar = [line for line in err.splitlines() if line.startswith("tokenizer:")]
    assert rc == 0 and bar, err
    done, total = re.search(r"\| *([\d.]+k?)/([\d.]+k?) ", bar[-1]).groups()
    assert bar[-1].startswith("tokenizer: 100%") and done == total, bar[-1]


# The prepare bar ends with every token counted.

def test_the_prepare_bar_ends_with_every_token_counted(corpus_dir, tokenizer_dir, tmp_path):
    """The bar's last line said tokens=0 for a corpus of one batch (the count was taken before
    each batch's tokens were written, and not after the last)."""
    done = subprocess.run([sys.executable, "-m", "gpt1", "prepare", str(corpus_dir), "--tokenizer", str(tokenizer_dir),
                           "--out", str(tmp_path / "data")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "GPT1_QUIET": "0"})
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    last_bar = [line for line in done.stderr.splitlines() if line.startswith("prepare:")][-1]
    assert f"tokens={meta['train']['tokens'] + meta['val']['tokens']:,}" in last_bar, last_bar
