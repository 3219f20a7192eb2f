import gzip
import json
import os

import pytest

from gpt1.core.errors import Gpt1Error
from gpt1.data.chat_sources import read_conversations
from gpt1.data.readers import HfSpec, parse_hf
from gpt1.data.sources import STDLIB_SKIPPED, SourceStats, iter_documents, resolve_sources


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
