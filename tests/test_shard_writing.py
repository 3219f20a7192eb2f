"""`gpt1 prepare`'s writing side: the split's hash, buffered shard writes, a file-size limit named
in one line, the prepared folder opened once (PreparedData), the data modules' import surface,
and how long documents are cut into pieces (cut_point)."""

from __future__ import annotations

import importlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt1.core.errors import Gpt1Error
from gpt1.core.tokenizer import Tokenizer, train_tokenizer
from gpt1.data import prepare as prepare_module
from gpt1.data import shards, splitmix, windows

WORDS = ("the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "1234", "x=y;", "café")


def _corpus(folder: Path, documents: int = 60) -> Path:
    rng = random.Random(3)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "docs.jsonl", "w", encoding="utf-8") as f:
        for _ in range(documents):
            f.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(5, 80)))}) + "\n")
    return folder


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Tokenizer]:
    corpus = _corpus(tmp_path_factory.mktemp("corpus"))
    texts = [json.loads(line)["text"] for line in (corpus / "docs.jsonl").read_text("utf-8").splitlines()]
    tokenizer, _ = train_tokenizer(texts, 300, show_progress=False)
    return corpus, tokenizer


# ---- the split's hash --------------------------------------------------

def test_the_split_hash_in_python_ints_is_the_numpy_splitmix64():
    """`_split_hash` computes SplitMix64 on one Python int (6 µs, not 35 µs of a one-element numpy
    array): it must be the very function the windows compute on arrays, or every data dir prepared
    before would split its documents otherwise (and a resumed prepare would mix the two)."""
    rng = random.Random(0)
    edges = [0, 1, 2**63 - 1, 2**63, 2**64 - 1]
    for index in edges + [rng.getrandbits(64) for _ in range(2000)]:
        for seed, salt in ((1337, 0x5EED_5A17), (0, 0), (-1, 7), (2**70 + 5, 0x3A1D_0B75), (rng.getrandbits(40), 1)):
            expected = int(splitmix.hash01(seed, salt, np.array([index], dtype=np.uint64))[0])
            assert splitmix.hash01_int(seed, salt, index) == expected, (seed, salt, index)


def test_a_document_s_split_hash_is_the_one_gpt1_has_always_computed():
    """Pinned to the formula of the data dirs already prepared: SplitMix64 of (seed, salt, the first
    8 bytes of the sha256 of the first piece, little-endian), computed here with numpy as it was."""
    import hashlib

    for seed, text in ((1337, "hello world"), (5, ""), (2**40, "\udcff surrogate-escaped"), (0, "中" * 1000)):
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
        z = np.array([int.from_bytes(digest[:8], "little")], dtype=np.uint64)
        with np.errstate(over="ignore"):
            z = z + np.uint64((seed * 0x632BE59BD9B4E019 + 0x5EED_5A17) % 2**64)
            z = z * np.uint64(0x9E3779B97F4A7C15)
            z ^= z >> np.uint64(30)
            z *= np.uint64(0xBF58476D1CE4E5B9)
            z ^= z >> np.uint64(27)
            z *= np.uint64(0x94D049BB133111EB)
            z ^= z >> np.uint64(31)
        assert prepare_module._split_hash(seed, text) == int(z[0])


# ---- the writer's buffered shards ----------------------------------------

def test_buffered_shards_hold_every_document_and_its_eos_in_order(small, tmp_path):
    """The writer buffers its tokens (one write into memory a document, not numpy's tofile): the
    shards must still hold each document's ids then [EOS], in order, whatever the commits."""
    corpus, tokenizer = small
    out = tmp_path / "d"
    meta = prepare_module.prepare([str(corpus)], tokenizer, out, val=0.2, seed=3, commit_bytes=500, batch_docs=7)
    texts = [json.loads(line)["text"] for line in (corpus / "docs.jsonl").read_text("utf-8").splitlines()]
    sides = {"train": [], "val": []}
    for text in texts:
        side = "val" if prepare_module._split_hash(3, text) < int(0.2 * 2**64) else "train"
        sides[side] += [*tokenizer.encode(text), tokenizer.eos_id]
    assert sides["val"], "the seed holds some documents out"
    for side, ids in sides.items():
        assert np.fromfile(out / meta[side]["file"], dtype=np.uint16).tolist() == ids


def test_a_file_size_limit_while_writing_tokens_names_the_shard(small, tmp_path):
    """A write past the limit fails in the buffered file's write or at a commit's flush: said with
    the shard's name (a plain write's OSError has none), as numpy's tofile was."""
    corpus, tokenizer = small
    tokenizer.save(tmp_path / "tok")
    script = ("import sys; from gpt1.core.tokenizer import Tokenizer; from gpt1.data.prepare import prepare\n"
              "try:\n"
              "    prepare([sys.argv[1]], Tokenizer.load(sys.argv[2]), sys.argv[3], val=0.2, commit_bytes=10)\n"
              "except OSError as e:\n"
              "    print(e.errno, e.filename)\n")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    done = subprocess.run([sys.executable, "-c", script, str(corpus), str(tmp_path / "tok"), str(tmp_path / "d")],
                          capture_output=True, text=True, preexec_fn=limit, timeout=120,
                          env={**os.environ, "GPT1_QUIET": "1"})
    assert done.returncode == 0, done.stderr
    errno_, filename = done.stdout.split()
    assert int(errno_) == 27 and filename.endswith("train.bin.partial"), done.stdout  # EFBIG


# ---- the old import path -------------------------------------------------

def test_every_name_that_left_gpt1_data_shards_is_importable_from_it():
    """`from gpt1.data.shards import prepare, ShardWindows, ...` as before the split: the same
    objects as in their new modules (a class patched there is patched for both)."""
    for name, (module, attribute) in shards._HOMES.items():
        assert getattr(shards, name) is getattr(importlib.import_module(module), attribute), name
    from gpt1.data.shards import COMMIT_BYTES, ShardWindows, ShardWriter, prepare  # noqa: F401

    assert prepare is prepare_module.prepare and ShardWindows is windows.ShardWindows
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        shards.nothing_here  # noqa: B018


def test_reading_shards_loads_neither_the_writer_nor_torch():
    """`gpt1.data.shards` is the format and its reading: importing it (gpt1 info, gpt1 eval's
    check) loads neither torch nor the samplers nor the writer until one is asked for."""
    code = ("import sys, gpt1.data.shards as s; print('torch' in sys.modules, 'gpt1.data.prepare' in sys.modules, "
            "'gpt1.data.windows' in sys.modules); s.ShardWindows; print('gpt1.data.windows' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "False", "False", "True"], done.stderr


# ---- a prepared data dir, opened once -----------------

def test_prepared_data_opens_a_data_dir_once_checked(small, tmp_path):
    corpus, tokenizer = small
    out = tmp_path / "d"
    meta = prepare_module.prepare([str(corpus)], tokenizer, out, val=3)
    data = shards.PreparedData.open(str(out))
    assert data.meta == meta and data.folder == out
    assert data.tokenizer.fingerprint == tokenizer.fingerprint
    assert (data.train_path, data.val_path) == (out / "train.bin", out / "val.bin")
    data.check_tokenizer(tokenizer, "the same")
    other, _ = train_tokenizer(["something else entirely", "and more"] * 50, 280, show_progress=False)
    with pytest.raises(Gpt1Error, match="tokenizer mismatch"):
        data.check_tokenizer(other, "a model")
    os.truncate(out / "val.bin", 2)
    with pytest.raises(Gpt1Error, match="sizes do not match"):
        shards.PreparedData.open(out)


# ---- cut_point scans back a chunk at a time ---------------

def _cut_point_whole_window(text: str, size: int, longest: int | None = None) -> int:
    """`cut_point` as it was: its whole second half matched at once, the last boundary kept."""
    from gpt1.core.text_pieces import _BOUNDARIES

    start = size // 2
    window = text[start - 1:size + 1]
    for boundary, ok in _BOUNDARIES:
        cuts = [m.start() + start - 1 for m in boundary.finditer(window)]
        cut = next((c for c in reversed(cuts) if start <= c < size and ok(text, c)), None)
        if cut is not None:
            return cut
    limit = max(size, longest or size)
    later = [c for boundary, ok in _BOUNDARIES for m in boundary.finditer(text[size - 1:limit + 1])
             if size <= (c := m.start() + size - 1) < min(limit, len(text)) and ok(text, c)]
    return min(later) if later else min(limit, len(text))


@pytest.mark.parametrize("scan", [1, 2, 3, 8, 64])
def test_cut_point_scanning_back_in_chunks_cuts_where_the_whole_window_did(scan, monkeypatch):
    """A boundary at a position depends on the characters either side alone, so the last one found
    scanning back a chunk at a time is the last one of the whole half: pieces are cut the same way
    (a resumed prepare skips committed pieces by count, so they must be)."""
    from gpt1.core import text_pieces
    monkeypatch.setattr(text_pieces, "SCAN_CHARS", scan)
    rng = random.Random(scan)
    alphabet = list("ab Z09_'.,;-\n\t\x1c\x1f") + ["é", "中", "。", "ก", "\u00a0", "\u2003", "٣", "Ⅻ", "\U0001F600", "\u0378"]
    for _ in range(3000):
        weights = [rng.random() ** 3 for _ in alphabet]
        text = "".join(rng.choices(alphabet, weights, k=rng.randint(0, 120)))
        size = rng.randint(0, 100)
        longest = rng.choice([None, size, size + rng.randint(0, 50)])
        assert text_pieces.cut_point(text, size, longest) == _cut_point_whole_window(text, size, longest), \
            (text, size, longest)


@pytest.mark.slow
def test_a_file_size_limit_hit_in_a_libc_buffer_fails_the_prepare(tmp_path):
    """numpy's `tofile` lost the write errors libc had buffered: under a 64 KiB file-size limit a
    5.7 MB corpus was "prepared" (exit 0) into a train.bin cut at 65,536 bytes while meta.json
    counted 4.9M tokens. The shard writer's own buffered writes fail, naming the shard, and no
    meta.json is written."""
    corpus = tmp_path / "c.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for i in range(20000):
            f.write(json.dumps({"text": f"document {i} " + "lorem ipsum dolor sit amet " * 10}) + "\n")
    texts = [json.loads(line)["text"] for line in corpus.read_text("utf-8").splitlines()[:2000]]
    tokenizer, _ = train_tokenizer(texts, 400, show_progress=False)
    tokenizer.save(tmp_path / "tok")

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))

    done = subprocess.run([sys.executable, "-m", "gpt1", "prepare", str(corpus), "--tokenizer", str(tmp_path / "tok"),
                           "--out", str(tmp_path / "data")], capture_output=True, text=True, preexec_fn=limit,
                          timeout=300, env={**os.environ, "GPT1_QUIET": "1"})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "train.bin.partial: cannot write (File too large)" in lines[0]
    assert not (tmp_path / "data" / "meta.json").exists()
