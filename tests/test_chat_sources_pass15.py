"""Chat sources, pass 15: OpenAI records read back from columnar formats (a null key is an absent
one), empty files in a folder, and a chatterbot `.yml` with invalid UTF-8 under --skip-invalid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpt1.cli import main
from gpt1.core.errors import Gpt1Error
from gpt1.data.chat_sources import EMPTY_FILES, INVALID_UTF8_FILES, NAMES_IGNORED, ChatStats, read_conversations

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

# OpenAI's fine-tuning records with keys on some messages only: Arrow gives every message struct
# of the column every field, so the others read back with "weight": None, "name": None.
OPENAI_RECORDS = [
    {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}", "weight": 1}]}
    for i in range(3)
] + [
    {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "q", "name": "bob"},
                  {"role": "assistant", "content": "a0", "weight": 0}, {"role": "user", "content": "q2"},
                  {"role": "assistant", "content": "a1"}]},
]


CHATS = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(4)]


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read(spec: str, **kwargs) -> tuple[list, ChatStats]:
    stats = ChatStats()
    return read_conversations(spec, stats=stats, **kwargs), stats


# ---- #2: a null key from parquet / datasets is an absent key ---------------------------------

def test_openai_records_read_the_same_from_parquet_and_hf_as_from_jsonl(tmp_path):
    table = pa.Table.from_pylist(OPENAI_RECORDS)
    user = table.column("messages").type.value_type  # the message struct: every key of every message
    assert {"weight", "name"} <= {user.field(i).name for i in range(user.num_fields)}
    pq.write_table(table, tmp_path / "openai.parquet")
    (tmp_path / "hub").mkdir()
    pq.write_table(table, tmp_path / "hub" / "train.parquet")
    expected, stats = read(str(write_jsonl(tmp_path / "openai.jsonl", OPENAI_RECORDS)))
    assert [m.get("weight") for m in expected[3].messages] == [None, None, 0, None, None]
    for spec in (str(tmp_path / "openai.parquet"), f"hf:{tmp_path / 'hub'}"):
        conversations, from_arrow = read(spec)
        assert [(c.messages, c.group) for c in conversations] == [(c.messages, c.group) for c in expected], spec
        assert from_arrow.trimmed[NAMES_IGNORED] == stats.trimmed[NAMES_IGNORED] == 1  # bob's name, not the nulls


def test_a_null_weight_is_no_weight_and_a_set_one_is_still_checked(tmp_path):
    nulls = [{"messages": [{"role": "user", "content": "q", "weight": None, "tool_calls": None},
                           {"role": "assistant", "content": "a", "weight": None, "function_call": None}]}]
    conversations, _ = read(str(write_jsonl(tmp_path / "nulls.jsonl", nulls)))
    assert conversations[0].messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    on_user = [{"messages": [{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]}]
    pq.write_table(pa.Table.from_pylist(on_user), tmp_path / "on_user.parquet")
    with pytest.raises(Gpt1Error, match=r"row 0: field 'messages'\[0\]\.weight: applies to assistant messages only"):
        read(str(tmp_path / "on_user.parquet"))


# ---- #8: an empty file in a folder is passed over and counted -------------------------------

def empty_files(folder: Path) -> None:
    (folder / "empty.jsonl").write_text("")
    (folder / "blank.yml").write_text("# no dialogs yet\n")
    pq.write_table(pa.Table.from_pylist(OPENAI_RECORDS).slice(0, 0), folder / "zero_rows.parquet")


def test_a_folder_passes_over_empty_files_and_counts_them(tmp_path):
    folder = tmp_path / "cf"
    write_jsonl(folder / "a.jsonl", CHATS)
    empty_files(folder)
    for skip_invalid in (False, True):
        conversations, stats = read(str(folder), skip_invalid=skip_invalid)
        assert len(conversations) == 4 and stats.skipped == {EMPTY_FILES: 3}
        assert stats.summary() == "4 conversations (skipped: empty files: 3)"
    with pytest.raises(Gpt1Error, match=r"empty\.jsonl: no conversations found \(the source is empty\)$"):
        read(str(folder / "empty.jsonl"))  # a file named alone is the whole source
    with pytest.raises(Gpt1Error, match=r"blank\.yml: no conversations found \(the file has no dialogs\)$"):
        read(str(folder / "blank.yml"))


def test_a_folder_without_a_record_in_any_file_is_refused(tmp_path):
    folder = tmp_path / "cf"
    folder.mkdir()
    empty_files(folder)
    with pytest.raises(Gpt1Error, match=r"cf: no conversations found \(every chat file is empty: blank\.yml, "
                                        r"empty\.jsonl, zero_rows\.parquet\)$"):
        read(str(folder))
    write_jsonl(folder / "bad.jsonl", [{"text": "not a chat record"}])
    with pytest.raises(Gpt1Error, match=r"cf: no conversations found in any of its chat files \(3 empty\); .*bad\.jsonl: "
                                        r"no conversations found: every line was skipped \(malformed lines: 1; "):
        read(str(folder), skip_invalid=True)


def test_finetune_on_a_folder_with_an_empty_file_trains(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "cf"
    write_jsonl(folder / "a.jsonl", CHATS)
    (folder / "empty.jsonl").write_text("")
    rc = main(["finetune", "--base", str(tiny_model_dir), "--data", str(folder), "--out", str(tmp_path / "ft"),
               "--skip-invalid", "max_steps=1", "batch_size=2", "block_size=32", "eval_batches=1", "device=cpu",
               "lora_r=2"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "4 conversations (skipped: empty files: 1)" in err


# ---- #9: a chatterbot .yml with invalid UTF-8 is a bad file, as a text file is --------------

def test_a_yml_file_with_invalid_utf8_is_skipped_and_counted(tmp_path):
    folder = tmp_path / "cf"
    write_jsonl(folder / "a.jsonl", CHATS)
    (folder / "latin1.yml").write_bytes(b"conversations:\n- - caf\xe9\n  - ok\n")
    with pytest.raises(Gpt1Error, match=r"latin1\.yml: invalid UTF-8 at byte offset 22 \(convert the file to UTF-8, "
                                        r"or pass --skip-invalid to skip such files\)$"):
        read(str(folder))
    conversations, stats = read(str(folder), skip_invalid=True)
    assert len(conversations) == 4 and stats.skipped == {INVALID_UTF8_FILES: 1}
    assert stats.first_skipped[INVALID_UTF8_FILES].endswith("latin1.yml: invalid UTF-8 at byte offset 22")


def test_skip_invalid_skips_a_chat_parquet_row_with_invalid_utf8(tmp_path):
    """The chat reader passed no skip settings to the parquet reader: one bad row stopped the run."""
    def column(values):
        return pa.Array.from_buffers(pa.string(), len(values), pa.array(values, type=pa.binary()).buffers())

    path = tmp_path / "x.messages.parquet"
    pq.write_table(pa.table({
        "message_id": ["m1", "m2", "m3", "m4"], "parent_id": [None, "m1", None, "m3"],
        "role": ["prompter", "assistant", "prompter", "assistant"],
        "text": column([b"hello", b"hi there", b"again", b"caf\xe9 reply"])}), path)
    with pytest.raises(Gpt1Error, match=r"x.messages.parquet, row 3: invalid UTF-8 in column 'text'"):
        read_conversations(str(path))
    stats = ChatStats()
    conversations = read_conversations(str(path), skip_invalid=True, stats=stats)
    assert [[m["content"] for m in c.messages] for c in conversations] == [["hello", "hi there"]]
    assert sum(stats.skipped.values()) >= 1
