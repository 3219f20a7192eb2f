"""The reader layer: one error policy for every file format, shared by text and chat sources."""

from __future__ import annotations

import gzip
import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpt1.core.errors import Gpt1Error
from gpt1.data.chat_sources import read_conversations
from gpt1.data.readers import BadRecord, read_jsonl, read_text
from gpt1.data.sources import SourceStats, iter_documents
from tests.test_battery import assert_one_clear_line, run_main

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _gz(path, text: str) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(text)


def _truncated(path, text: str) -> None:
    _gz(path, text)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _both_paths(path):
    """Read a file as text documents and as chat conversations."""
    yield lambda: list(iter_documents([str(path)]))
    yield lambda: read_conversations(str(path))


@pytest.mark.parametrize("name", ["a.txt.gz", "a.jsonl.gz"])
def test_truncated_and_non_gzip_files_are_one_clear_error(tmp_path, name):
    line = json.dumps({"text": "some words " * 50, **CHAT}) + "\n"
    truncated = tmp_path / ("t_" + name)
    _truncated(truncated, line * 2000)
    not_gzip = tmp_path / ("n_" + name)
    not_gzip.write_text("plain text, not gzip")
    for read in _both_paths(truncated) if name.endswith(".jsonl.gz") else [lambda: list(iter_documents([str(truncated)]))]:
        with pytest.raises(Gpt1Error, match=r"t_a\.\w+\.gz: cannot read after (line|byte) [\d,]+ \(the compressed file is truncated\)"):
            read()
    for read in _both_paths(not_gzip) if name.endswith(".jsonl.gz") else [lambda: list(iter_documents([str(not_gzip)]))]:
        with pytest.raises(Gpt1Error, match=r"n_a\.\w+\.gz: not a gzip file"):
            read()


def test_lone_surrogate_escapes_and_deep_json_are_bad_records(tmp_path):
    lone = tmp_path / "lone.jsonl"
    lone.write_text('{"text": "ok"}\n{"text": "bad \\ud800 here"}\n{"text": "pair \\ud83d\\ude00 fine"}\n')
    with pytest.raises(BadRecord, match=r"lone.jsonl, line 2: a lone surrogate escape \(\\ud800\)"):
        list(iter_documents([str(lone)]))
    stats = SourceStats()
    assert list(iter_documents([str(lone)], skip_invalid=True, stats=stats)) == ["ok", "pair \U0001F600 fine"]
    assert stats.skipped["malformed lines"] == 1
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    for read in _both_paths(deep):
        with pytest.raises(BadRecord, match=r"deep.jsonl, line 1: JSON nested too deeply"):
            read()
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps(CHAT) + "\n" + json.dumps({"messages": [{"role": "user", "content": "\ud800"}]},
                                                         ensure_ascii=True) + "\n")
    with pytest.raises(BadRecord, match=r"chat.jsonl, line 2: a lone surrogate"):
        read_conversations(str(chat))


def test_invalid_utf8_in_jsonl_names_the_line_in_both_paths(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps({"text": "ok", **CHAT}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    for read in _both_paths(bad):
        with pytest.raises(BadRecord, match=r"bad.jsonl, line 2: invalid UTF-8 at byte offset 13"):
            read()


def test_read_text_gives_bounded_pieces_that_join_to_the_file(tmp_path, monkeypatch):
    import gpt1.data.readers as readers

    monkeypatch.setattr(readers, "PIECE_CHARS", 64)
    monkeypatch.setattr(readers, "READ_BYTES", 50)
    text = "".join(f"w{i} " if i % 7 else "é€😀x " for i in range(400)) + "x" * 300
    (tmp_path / "a.txt").write_text(text)
    pieces = list(read_text(tmp_path / "a.txt"))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 64
    words = [p for p in pieces if "x" * 10 not in p]
    assert len(words) > 10 and all(p[-1] != " " for p in words) and all(p[0] == " " for p in pieces[1:len(words)])
    (tmp_path / "b.txt").write_bytes(text.encode()[:500] + b"\xff" + b"tail" * 100)
    with pytest.raises(BadRecord, match=r"b.txt: invalid UTF-8 at byte offset 500"):
        list(read_text(tmp_path / "b.txt"))


@pytest.mark.parametrize("text", [
    "xx" + "\nfunction" * 400,  # words between line ends only: it was cut inside "function"
    "ab\tcd" * 300,  # tabs
    "字" * 40 + "中文。" * 300,  # no whitespace at all: at its punctuation
    "don't stop'" * 200,  # "'" may start a contraction: never cut before it
])
def test_pieces_end_where_the_tokenizer_s_pre_tokens_do(text, tmp_path, monkeypatch, tokenizer):
    """The docs promise the ids of a text read in pieces are exactly those of the whole; with
    cuts only before a space, a text without spaces in a piece's second half was cut mid-word."""
    import gpt1.data.readers as readers

    monkeypatch.setattr(readers, "PIECE_CHARS", 64)
    (tmp_path / "a.txt").write_text(text)
    pieces = list(read_text(tmp_path / "a.txt"))
    assert "".join(pieces) == text and len(pieces) > 10
    assert [i for p in pieces for i in tokenizer.encode(p)] == tokenizer.encode(text)


@pytest.mark.parametrize("unit", ["a\U00031350", "!\x1c"])
def test_pieces_end_where_the_tokenizer_s_pre_tokens_do_beyond_python_s_unicode(unit, tmp_path, monkeypatch):
    """Python's \\s holds U+001C-U+001F (punctuation to the tokenizer), and its \\W a letter newer
    than its Unicode tables (U+31350, Unicode 15): cuts there split one pre-token, so a long
    document's ids in `gpt1 prepare` were not those of the whole (35,005 tokens for 35,000)."""
    import gpt1.data.readers as readers
    from gpt1.core.tokenizer import train_tokenizer

    tokenizer, _ = train_tokenizer(iter([unit * 3000, "hello world, some plain text. " * 200]), 280, show_progress=False)
    monkeypatch.setattr(readers, "PIECE_CHARS", 64)
    text = unit * 300
    (tmp_path / "a.txt").write_text(text)
    pieces = list(read_text(tmp_path / "a.txt"))
    assert "".join(pieces) == text and len(pieces) > 5
    assert [i for p in pieces for i in tokenizer.encode(p)] == tokenizer.encode(text)


def test_read_jsonl_counts_skipped_lines_and_goes_on(tmp_path):
    from collections import Counter

    f = tmp_path / "x.jsonl"
    f.write_bytes(b'{"a": 1}\n{bad\n\n\xff\n{"a": 2}\n')
    skipped = Counter()
    assert list(read_jsonl(f, skip_invalid=True, skipped=skipped)) == [(1, {"a": 1}), (5, {"a": 2})]
    assert skipped["malformed lines"] == 2
    with pytest.raises(BadRecord, match=r"x.jsonl, line 2: invalid JSON .*pass --skip-invalid"):
        list(read_jsonl(f, skipped=Counter()))
    # A caller that cannot skip (a benchmark task file) gets the error without the hint.
    with pytest.raises(BadRecord, match=r"x.jsonl, line 2: invalid JSON") as error:
        list(read_jsonl(f))
    assert "skip-invalid" not in str(error.value)


def test_bad_yaml_is_one_line(tmp_path):
    bad = tmp_path / "dialogs.yml"
    bad.write_text("conversations:\n- - hi\n  - [unclosed\n")
    with pytest.raises(Gpt1Error, match=r"dialogs.yml: not valid YAML at line \d+, column \d+") as error:
        read_conversations(str(bad))
    assert "\n" not in str(error.value)



@pytest.mark.parametrize("skip_invalid", [False, True])
def test_yaml_nested_past_the_recursion_limit_is_one_line(tmp_path, skip_invalid):
    """A chatterbot file 400 levels deep was a ~3,000-line RecursionError traceback in finetune and
    eval --chat, with --skip-invalid too (330 levels read)."""
    deep = tmp_path / "deep.yml"
    # At least a level per frame of the limit: an in-process torch.compile earlier in the session
    # raises it to 2,000 (Inductor's compile_fx), which 400 levels no longer reach.
    levels = max(400, sys.getrecursionlimit())
    deep.write_text("conversations:\n- " + "[" * levels + "]" * levels + "\n")
    with pytest.raises(Gpt1Error, match=r"^\S*deep.yml: not valid YAML for gpt1: nested too deeply") as error:
        read_conversations(str(deep), skip_invalid=skip_invalid)
    assert "\n" not in str(error.value)


# A parquet text column that is not a string.

@pytest.mark.parametrize("column, arrow_type, shown", [
    (pa.array([7, None, 8], pa.int64()), "int64", "7"),
    (pa.array([b"hello world", b"\xff"], pa.binary()), "binary", "b'hello world'"),
    (pa.array([["a", "b"], ["c"]]), "list<element: string>", "['a', 'b']"),
])
def test_a_parquet_text_column_that_is_not_strings_is_one_clear_error(column, arrow_type, shown, tmp_path, capsys):
    """An AttributeError traceback from deep in the reader, with --skip-invalid too."""
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": pa.array(range(len(column))), "text": column}), path)
    expected = (f"{path}: column 'text' has type {arrow_type}, not string (row 0: {shown}): every row is of that "
                "type, so --skip-invalid cannot skip them; name the column of text with --text-field (columns: id, text)")
    for skip_invalid in (False, True):
        with pytest.raises(Gpt1Error) as refused:
            list(iter_documents([str(path)], skip_invalid=skip_invalid))
        assert str(refused.value) == expected
    rc, err = run_main(capsys, "tokenizer", "train", "--vocab-size", 280, "--out", tmp_path / "tok", "--skip-invalid", path)
    assert rc == 2 and err.splitlines()[-1] == f"gpt1 tokenizer train: error: {expected}"


def test_a_parquet_string_column_with_nulls_still_skips_them(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": pa.array(["one", None, "two"], pa.large_string())}), path)
    stats = SourceStats()
    assert list(iter_documents([str(path)], stats=stats)) == ["one", "two"] and stats.skipped == {"null rows": 1}


# Byte order marks at the start of source files.

BOM = b"\xef\xbb\xbf"


def test_a_byte_order_mark_starting_a_text_file_is_dropped(tmp_path):
    """Windows editors start UTF-8 files with a BOM: it became a U+FEFF token at every document's start."""
    text = "caf\u00e9 cr\u00e8me, deux fois\nline two\n"
    (tmp_path / "plain").mkdir()
    (tmp_path / "bom").mkdir()
    for folder, prefix in (("plain", b""), ("bom", BOM)):
        (tmp_path / folder / "a.txt").write_bytes(prefix + text.encode())
        (tmp_path / folder / "b.csv").write_bytes(prefix + b"x,y\n1,2\n")
        with gzip.open(tmp_path / folder / "c.txt.gz", "wb") as f:
            f.write(prefix + text.encode())
    plain = list(iter_documents([str(tmp_path / "plain")]))
    assert list(iter_documents([str(tmp_path / "bom")])) == plain
    assert plain[0] == text
    # only the file's first mark: one further in is text, kept
    (tmp_path / "twice.txt").write_bytes(BOM + b"a" + BOM + b"b")
    assert list(read_text(tmp_path / "twice.txt")) == ["a\ufeffb"]
    # a file holding only a mark is empty; the byte offset of bad UTF-8 still counts the mark
    (tmp_path / "only.txt").write_bytes(BOM)
    assert list(read_text(tmp_path / "only.txt")) == [""]
    (tmp_path / "bad.txt").write_bytes(BOM + b"ab\xe9c")
    with pytest.raises(BadRecord, match=r"bad.txt: invalid UTF-8 at byte offset 5$"):
        list(read_text(tmp_path / "bad.txt"))


def test_a_byte_order_mark_starting_a_jsonl_file_is_skipped(tmp_path, capsys):
    """json.loads refuses a BOM: line 1 of a Windows-saved .jsonl was 'invalid JSON' (or, with
    --skip-invalid, silently dropped)."""
    lines = [json.dumps({"text": "first document"}), json.dumps({"text": "second"})]
    (tmp_path / "plain.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "bom.jsonl").write_bytes(BOM + (tmp_path / "plain.jsonl").read_bytes())
    assert list(iter_documents([str(tmp_path / "bom.jsonl")])) == ["first document", "second"]
    # a mark alone on the first line is a blank line
    (tmp_path / "blank.jsonl").write_bytes(BOM + b"\n" + (tmp_path / "plain.jsonl").read_bytes())
    assert list(iter_documents([str(tmp_path / "blank.jsonl")])) == ["first document", "second"]
    # chat files read through the same reader
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (tmp_path / "chat.jsonl").write_bytes(BOM + json.dumps(chat).encode() + b"\n")
    assert [c.messages for c in read_conversations(str(tmp_path / "chat.jsonl"))] == [chat["messages"]]
    # the byte offset of bad UTF-8 on line 1 counts the mark (as a hex editor shows it)
    (tmp_path / "bad.jsonl").write_bytes(BOM + b'{"text": "a\xe9"}\n')
    assert_one_clear_line(*run_main(capsys, "tokenizer", "train", "--vocab-size", "300", "--out", tmp_path / "t",
                                    tmp_path / "bad.jsonl"), r"bad.jsonl, line 1: invalid UTF-8 at byte offset 14 ")
