
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpt1.core.errors import Gpt1Error
from gpt1.data import readers
from gpt1.data.chat_sources import read_conversations
from gpt1.data.readers import PIECE_CHARS, HfSpec, parse_hf, read_parquet
from gpt1.data.sources import STDLIB_SKIPPED, SourceStats, iter_documents, iter_pieces, resolve_sources
from tests.test_battery import assert_one_clear_line, run_main


def test_reads_text_jsonl_gz_parquet_dirs_and_globs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "sub" / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n\n" + json.dumps({"text": "delta"}) + "\n")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "epsilon"}) + "\n")
    pq.write_table(pa.table({"text": ["zeta", "eta"]}), tmp_path / "e.parquet")
    stats = SourceStats()
    docs = list(iter_documents([str(tmp_path)], stats=stats))
    assert sorted(docs) == sorted(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta"])
    assert stats.documents == 7 and stats.bytes == sum(len(d) for d in docs)
    assert list(iter_documents([str(tmp_path / "*.txt")])) == ["alpha"]


def test_hf_source_reads_a_local_dataset_folder(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)))
    assert list(iter_documents([f"hf:{tmp_path / 'ds'}"])) == ["doc 0", "doc 1", "doc 2"]


def test_missing_file_and_empty_directory(tmp_path):
    with pytest.raises(Gpt1Error, match="nope.txt: no such file"):
        resolve_sources([str(tmp_path / "nope.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(Gpt1Error, match="directory has no text files"):
        resolve_sources([str(tmp_path / "empty")])
    with pytest.raises(Gpt1Error, match="matches no files"):
        resolve_sources([str(tmp_path / "*.none")])


def test_invalid_utf8_names_file_and_offset_or_is_skipped(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good text \xff more")
    (tmp_path / "ok.txt").write_text("fine")
    with pytest.raises(Gpt1Error, match=r"bad.txt: invalid UTF-8 at byte offset 10"):
        list(iter_documents([str(bad)]))
    stats = SourceStats()
    assert list(iter_documents([str(tmp_path)], skip_invalid=True, stats=stats)) == ["fine"]
    assert stats.skipped["files with invalid UTF-8"] == 1


def test_malformed_jsonl_line_names_line(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "ok"}\n{not json}\n{"title": "no text"}\n')
    with pytest.raises(Gpt1Error, match=r"x.jsonl, line 2"):
        list(iter_documents([str(f)]))
    stats = SourceStats()
    assert list(iter_documents([str(f)], skip_invalid=True, stats=stats)) == ["ok"]
    assert stats.skipped["malformed lines"] == 2


def test_stdlib_source_is_the_standard_library_source():
    import os
    from pathlib import Path

    root = Path(os.__file__).resolve().parent
    sources = resolve_sources(["stdlib"])
    paths = [Path(s.location) for s in sources]
    assert len(paths) > 300 and all(p.suffix == ".py" and s.kind == "text" for p, s in zip(paths, sources))
    assert root / "os.py" in paths and root / "json" / "decoder.py" in paths
    assert not any(set(p.relative_to(root).parts[:1]) & STDLIB_SKIPPED for p in paths)


def test_hf_revision_and_a_script_dataset_get_clear_answers(tmp_path, monkeypatch):
    assert parse_hf("hf:Skylion007/openwebtext@refs/convert/parquet") == HfSpec(
        "Skylion007/openwebtext", "refs/convert/parquet")
    assert parse_hf("hf:OpenAssistant/oasst2:validation") == HfSpec("OpenAssistant/oasst2", None, "validation")
    assert parse_hf("hf:a/b@v1.0:test") == HfSpec("a/b", "v1.0", "test")
    assert parse_hf("data/train.jsonl") is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text(json.dumps({"text": "doc"}) + "\n")
    assert list(iter_documents(["hf:ds@main"])) == ["doc"]
    # datasets >= 4 refuses loading scripts (as the hub's OpenWebText had one): say what works.
    (tmp_path / "scripted").mkdir()
    (tmp_path / "scripted" / "scripted.py").write_text("import datasets\n")
    # A local folder has no hub branch to read instead (it was told hf:scripted@refs/convert/parquet).
    with pytest.raises(Gpt1Error, match=r"hf:scripted:train: cannot open the dataset .*scripts are no longer "
                                        r"supported.*; convert the data to files \(.parquet, .jsonl\) and pass their "
                                        r"folder, or install `datasets<4`, which runs loading scripts$"):
        list(iter_documents(["hf:scripted"]))
    with pytest.raises(Gpt1Error, match=r"hf:scripted:train: cannot open.*install `datasets<4`"):
        read_conversations("hf:scripted")


@pytest.mark.timeout(60)  # before the fix, opening the pipe blocked forever
def test_a_folder_or_glob_skips_and_counts_entries_that_are_not_regular_files(tmp_path):
    """A pipe named x.txt in a folder hung the reader; a dangling link crashed one command and was
    silently dropped by a glob. One rule: skipped, and counted in the stats."""
    (tmp_path / "a.txt").write_text("fine")
    os.mkfifo(tmp_path / "pipe.txt")
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "nothing")
    for spec in (tmp_path, tmp_path / "*.txt"):
        stats = SourceStats()
        assert list(iter_documents([str(spec)], stats=stats)) == ["fine"]
        assert stats.skipped == {"entries that are not regular files": 2}
        assert stats.summary().endswith("(skipped: 2 entries that are not regular files)")
    # named alone, a pipe is still refused
    with pytest.raises(Gpt1Error, match=r"pipe.txt: not a regular file or directory"):
        resolve_sources([str(tmp_path / "pipe.txt")])


# Text sources: invalid UTF-8 and damaged pages in parquet, long records in pieces, globs
# walked as folders are, one JSON Lines suffix table, compressed files, left-out files, `hf:` folders
# that `datasets` would read in part, null texts, save_to_disk folders.

def _jsonl(path, *texts) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def _latin1_parquet(path, values: list[bytes], column: str = "text", **others) -> str:
    """A parquet file whose string column holds bytes as written (other writers than pyarrow do not check UTF-8)."""
    strings = pa.Array.from_buffers(pa.string(), len(values), pa.array(values, type=pa.binary()).buffers())
    pq.write_table(pa.table({column: strings, **others}), path)
    return str(path)


# ---- invalid UTF-8 and damaged pages in parquet ------------------------------------------------

def test_invalid_utf8_in_a_parquet_row_names_file_row_and_column_or_is_skipped(tmp_path, tokenizer_dir, capsys):
    bad = _latin1_parquet(tmp_path / "bad.parquet", [b"good one", b"bad caf\xe9", b"good three"])
    with pytest.raises(Gpt1Error, match=r"bad.parquet, row 1: invalid UTF-8 in column 'text' .*--skip-invalid"):
        list(iter_documents([bad]))
    stats = SourceStats()
    assert list(iter_documents([bad], skip_invalid=True, stats=stats)) == ["good one", "good three"]
    assert stats.skipped == {"malformed rows": 1}
    # The command line: one line, not a traceback.
    more = _jsonl(tmp_path / "a.jsonl", *(f"document {i}" for i in range(6)))
    rc, err = run_main(capsys, "prepare", "--tokenizer", tokenizer_dir, "--out", tmp_path / "o", more, bad)
    assert rc == 2 and "Traceback" not in err and "bad.parquet, row 1: invalid UTF-8 in column 'text'" in err


def test_invalid_utf8_in_a_chat_parquet_file_is_one_clear_error(tmp_path):
    """The chat path reads parquet through the same reader (a nested column: messages)."""
    path = _latin1_parquet(tmp_path / "x.messages.parquet", [b"caf\xe9", b"ok"], message_id=["m1", "m2"],
                           parent_id=[None, "m1"], role=["prompter", "assistant"])
    with pytest.raises(Gpt1Error, match=r"x.messages.parquet, row 0: invalid UTF-8 in column 'text'"):
        list(read_parquet(path))


def test_a_corrupt_dictionary_page_is_one_error_naming_the_file(tmp_path):
    """A flipped byte in a dictionary-encoded page: pyarrow's ArrowInvalid ("Index not in
    dictionary bounds", a ValueError) went up as a traceback."""
    docs = [f"document number {i % 7}" for i in range(200)]
    pq.write_table(pa.table({"text": docs}), tmp_path / "base.parquet", compression="none", row_group_size=50)
    data = (tmp_path / "base.parquet").read_bytes()
    outcomes = set()
    for offset in range(4, len(data) - 8):
        flipped = bytearray(data)
        flipped[offset] ^= 0xFF
        (tmp_path / "f.parquet").write_bytes(bytes(flipped))
        try:
            list(iter_documents([str(tmp_path / "f.parquet")]))
            outcomes.add("read")
        except Gpt1Error as e:
            outcomes.add("Gpt1Error")
            assert str(e).startswith(str(tmp_path / "f.parquet"))
    assert "Gpt1Error" in outcomes  # and nothing else escaped


# ---- a long record's text in bounded pieces ----------------------------------------------------

@pytest.fixture(scope="module")
def long_text() -> str:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta\n", "eta", "theta"]
    return " ".join(words[(i * 7) % 8] for i in range(PIECE_CHARS // 3))  # ~1.5 pieces


@pytest.mark.parametrize("form", ["jsonl", "parquet", "hf"])
def test_a_long_record_arrives_in_pieces_with_the_ids_of_the_whole(form, long_text, tokenizer, tmp_path):
    if form == "jsonl":
        spec = _jsonl(tmp_path / "big.jsonl", long_text)
    elif form == "parquet":
        pq.write_table(pa.table({"text": [long_text]}), tmp_path / "big.parquet")
        spec = str(tmp_path / "big.parquet")
    else:
        datasets.Dataset.from_dict({"text": [long_text]}).save_to_disk(tmp_path / "saved")
        spec = f"hf:{tmp_path / 'saved'}"
    pieces = list(iter_pieces([spec]))
    assert len(pieces) > 1 and all(len(p.text) <= PIECE_CHARS for p in pieces)
    assert [p.ends_document for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert [i for p in pieces for i in tokenizer.encode(p.text)] == tokenizer.encode(long_text)


# ---- a glob walked as a folder is ------------------------------------------------------------

def test_a_recursive_glob_reads_a_linked_folder_once_and_leaves_out_backups(tmp_path, caplog):
    (tmp_path / "cyc" / "a").mkdir(parents=True)
    (tmp_path / "cyc" / "a" / "x.txt").write_text("doc a")
    (tmp_path / "cyc" / "y.txt").write_text("doc b")
    (tmp_path / "cyc" / "a" / "up").symlink_to("..")  # a link back up
    (tmp_path / "cyc" / "d").mkdir()
    (tmp_path / "cyc" / "d" / "z.md").write_text("doc d")
    (tmp_path / "cyc" / "e").symlink_to("d")  # a second link to a folder
    (tmp_path / "cyc" / "y.txt~").write_text("editor backup")
    (tmp_path / "cyc" / "#y.txt#").write_text("editor autosave")
    with caplog.at_level("WARNING", logger="gpt1"):
        docs = list(iter_documents([str(tmp_path / "cyc" / "**")]))
    assert sorted(docs) == ["doc a", "doc b", "doc d"]  # glob.glob: 164 documents, backups included
    assert any("left out 2 files" in r.message and "y.txt~" in r.message for r in caplog.records)
    assert sorted(iter_documents([str(tmp_path / "cyc")])) == ["doc a", "doc b", "doc d"]  # the folder, the same
    # A pattern ending in a suffix names its files' type: read as text.
    (tmp_path / "cyc" / "run.log").write_text("a log")
    assert list(iter_documents([str(tmp_path / "cyc" / "*.log")])) == ["a log"]


def test_a_relative_glob_names_its_files_as_glob_did(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    for name in ("b.txt", "a.txt", "d/c.txt"):
        (tmp_path / name).write_text(name)
    assert [s.location for s in resolve_sources(["*.txt"])] == ["a.txt", "b.txt"]
    assert [s.location for s in resolve_sources(["**/*.txt"])] == ["a.txt", "b.txt", os.path.join("d", "c.txt")]


# ---- one JSON Lines table; compressed files; files left out ---------------------------

def test_json_and_ndjson_gz_are_json_lines_as_for_chat_sources(tmp_path):
    from gpt1.data import chat_sources

    with gzip.open(tmp_path / "a.ndjson.gz", "wt") as f:
        f.write(json.dumps({"text": "ndgz"}) + "\n")
    spec = _jsonl(tmp_path / "b.json", "plain json lines")
    assert list(iter_documents([str(tmp_path / "a.ndjson.gz"), spec])) == ["ndgz", "plain json lines"]
    assert all(s.endswith(readers.JSONL_SUFFIXES) for s in chat_sources.JSONL_SUFFIXES)


def test_bz2_and_xz_are_read_and_zstd_is_named(tmp_path, caplog):
    line = (json.dumps({"text": "compressed doc"}) + "\n").encode()
    (tmp_path / "a.jsonl.bz2").write_bytes(bz2.compress(line))
    (tmp_path / "b.txt.xz").write_bytes(lzma.compress(b"xz doc"))
    (tmp_path / "c.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00" * 16)
    (tmp_path / "d.arrow").write_bytes(b"ARROW1")
    with caplog.at_level("WARNING", logger="gpt1"):
        assert list(iter_documents([str(tmp_path)])) == ["compressed doc", "xz doc"]
    (warning,) = [r.message for r in caplog.records if "left out" in r.message]
    assert "left out 2 files" in warning and "c.jsonl.zst, d.arrow" in warning and "zstd -d" in warning
    with pytest.raises(Gpt1Error, match=r"c.jsonl.zst: compressed with zstd, which gpt1 does not read"):
        list(iter_documents([str(tmp_path / "c.jsonl.zst")]))
    (tmp_path / "e.jsonl").write_bytes(gzip.compress(line))  # compressed, under a name that does not say so
    with pytest.raises(Gpt1Error, match=r"e.jsonl: compressed with gzip, but its name does not end in .gz"):
        list(iter_documents([str(tmp_path / "e.jsonl")], skip_invalid=True))


# ---- hf:FOLDER that `datasets` would read in part --------------------------------------------

def test_an_hf_folder_that_datasets_would_read_in_part_is_refused(tmp_path):
    (tmp_path / "mixed").mkdir()
    _jsonl(tmp_path / "mixed" / "a.jsonl", "json a")
    _jsonl(tmp_path / "mixed" / "b.jsonl", "json b")
    pq.write_table(pa.table({"text": ["pq 0"]}), tmp_path / "mixed" / "c.parquet")
    with pytest.raises(Gpt1Error, match=r"would read only part of this folder .* leave out c.parquet; pass the folder "
                                        r"without hf:"):
        list(iter_documents([f"hf:{tmp_path / 'mixed'}"]))
    assert sorted(iter_documents([str(tmp_path / "mixed")])) == ["json a", "json b", "pq 0"]  # the way round
    (tmp_path / "named").mkdir()
    _jsonl(tmp_path / "named" / "train.jsonl", "train doc")
    _jsonl(tmp_path / "named" / "extra.jsonl", "extra doc")
    with pytest.raises(Gpt1Error, match=r"leave out extra.jsonl"):
        list(iter_documents([f"hf:{tmp_path / 'named'}"]))


# ---- null texts, one rule; save_to_disk folders -------------------------------------------

def test_a_null_text_is_skipped_and_counted_in_every_format(tmp_path):
    (tmp_path / "n.jsonl").write_text('{"text": null}\n{"text": "x"}\n')
    pq.write_table(pa.table({"text": [None, "y"]}), tmp_path / "n.parquet")
    datasets.Dataset.from_dict({"text": [None, "z"], "n": [1, 2]}).save_to_disk(tmp_path / "saved")
    stats = SourceStats()
    docs = list(iter_documents([str(tmp_path / "n.jsonl"), str(tmp_path / "n.parquet"), f"hf:{tmp_path / 'saved'}"],
                               stats=stats))
    assert docs == ["x", "y", "z"] and stats.skipped == {"null lines": 1, "null rows": 2}
    datasets.Dataset.from_dict({"text": [1, 2]}).save_to_disk(tmp_path / "ints")
    with pytest.raises(Gpt1Error, match=r"field 'text' is int, not a string .*cannot skip them; name the column"):
        list(iter_documents([f"hf:{tmp_path / 'ints'}"], skip_invalid=True))


def test_a_save_to_disk_folder_gets_a_hint_and_a_damaged_one_a_clear_error(tmp_path):
    datasets.Dataset.from_dict({"text": ["a"]}).save_to_disk(tmp_path / "saved")
    with pytest.raises(Gpt1Error, match=rf"saved: a dataset folder written by `datasets` \(save_to_disk\): read it as "
                                        rf"hf:{tmp_path / 'saved'}$"):
        resolve_sources([str(tmp_path / "saved")])
    (tmp_path / "saved" / "dataset_info.json").unlink()
    with pytest.raises(Gpt1Error, match=r"without its dataset_info.json \(damaged, or copied in part\)"):
        list(iter_documents([f"hf:{tmp_path / 'saved'}"]))


# What --skip-invalid skipped, said when nothing is left; odd entries in a source folder.

def test_tokenizer_train_names_what_skip_invalid_skipped(tmp_path, capsys):
    """Every file skipped for invalid UTF-8 gave 'the sources held no documents', not saying why."""
    (tmp_path / "bin.dat").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_bytes(b"")
    assert_one_clear_line(*run_main(capsys, "tokenizer", "train", "--vocab-size", "300", "--out", tmp_path / "t",
                                    "--skip-invalid", tmp_path / "bin.dat", tmp_path / "empty.txt"),
                          r"no text to train the tokenizer on: the sources held no documents "
                          r"\(skipped: 1 empty documents, 1 files with invalid UTF-8\)$")
    assert not (tmp_path / "t").exists()


def _folder_with_odd_entries(folder: Path) -> Path:
    folder.mkdir()
    for i in range(3):
        (folder / f"a{i}.txt").write_text(f"document {i}: " + "hello world " * 20)
    (folder / os.fsdecode(b"caf\xe9.txt")).write_text("bonjour " * 20)  # a name that is not UTF-8
    os.mkfifo(folder / "pipe.txt")
    (folder / "dangling.txt").symlink_to(folder / "nothing")
    return folder


@pytest.mark.timeout(120)  # before the fix, opening the pipe blocked forever
def test_pipes_dangling_links_and_non_utf8_names_in_a_source_folder(tmp_path, tokenizer_dir, capsys):
    """A pipe in a folder hung prepare and tokenizer train; a dangling link and a file name that is
    not UTF-8 gave tracebacks in prepare (its resume key), while a glob dropped the link silently."""
    folder = _folder_with_odd_entries(tmp_path / "f")
    skipped = "(skipped: 2 entries that are not regular files)"
    for spec, out in ((folder, tmp_path / "d"), (folder / "*.txt", tmp_path / "g")):
        rc, err = run_main(capsys, "prepare", "--tokenizer", tokenizer_dir, "--out", out, spec)
        assert rc == 0 and "Traceback" not in err and f"prepared 4 documents, 0.0 MB {skipped}" in err, err
        assert json.loads((out / "meta.json").read_text())["skipped"] == {"entries that are not regular files": 2}
    rc, err = run_main(capsys, "tokenizer", "train", "--vocab-size", "270", "--out", tmp_path / "t", folder)
    assert rc == 0 and f"corpus: 4 documents, 0.0 MB {skipped}" in err, err
    assert "tokenizer on 4 file(s) or dataset(s) from 1 SOURCE argument(s)" in err  # the skipped entries are not


def test_prepare_names_what_it_skipped_when_the_corpus_is_empty(tmp_path, tokenizer_dir, capsys):
    """Every file skipped gave '(skipped: {'files with invalid UTF-8': 1})', a Python dict."""
    (tmp_path / "bin.dat").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    assert_one_clear_line(*run_main(capsys, "prepare", "--tokenizer", tokenizer_dir, "--out", tmp_path / "d",
                                    "--skip-invalid", tmp_path / "bin.dat"),
                          r"the corpus is empty: .*bin.dat held no documents \(skipped: 1 files with invalid UTF-8\)$")
    (tmp_path / "f").mkdir()
    os.mkfifo(tmp_path / "f" / "pipe.txt")
    assert_one_clear_line(*run_main(capsys, "prepare", "--tokenizer", tokenizer_dir, "--out", tmp_path / "d",
                                    tmp_path / "f"),
                          r"held no documents \(skipped: 1 entries that are not regular files\)$")
