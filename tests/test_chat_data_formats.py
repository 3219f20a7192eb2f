"""Chat data as users bring it (exploratory pass 11): folders, mixtures of sources, OpenAI's
fine-tuning records, oversized messages, and errors that say why nothing was left."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpt1.cli import main
from gpt1.core.chat_template import encode_chat_with_labels
from gpt1.core.constants import IGNORE_INDEX
from gpt1.core.errors import Gpt1Error
from gpt1.data.chat import encode_conversations
from gpt1.data.chat_sources import (
    EMPTY_FILES,
    INVALID_UTF8_FILES,
    NAMES_IGNORED,
    TOOL_CALLS,
    ChatStats,
    Conversation,
    hf_split_names,
    read_conversations,
)
from gpt1.data.readers import PIECE_CHARS
from gpt1.train.config import load_config
from gpt1.train.evaluate import evaluate_chat
from gpt1.train.finetune import FinetuneConfig, finetune
from tests.test_battery import assert_one_clear_line, run_main

TINY_RUN = ["max_steps=1", "batch_size=2", "block_size=32", "eval_batches=1", "device=cpu", "lora_r=2"]


def chats(tag: str, n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{tag} q{i}"}, {"role": "assistant", "content": f"{tag} a{i}"}]}
            for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def tags(conversations: list[Conversation]) -> list[str]:
    return sorted({c.messages[0]["content"].split()[0] for c in conversations})


# ---- 1. a folder is read by gpt1's readers: every chat file, none dropped ------------------------

def test_a_folder_reads_every_chat_file_and_names_the_others(tmp_path, caplog):
    """`datasets` read the most common file type only (c.parquet and d.yml were dropped) and,
    once one file was named like a split, only the files named so."""
    folder = tmp_path / "kinds"
    write_jsonl(folder / "a.jsonl", chats("a", 3))
    write_jsonl(folder / "b.jsonl.gz", chats("b", 2))
    write_parquet(folder / "c.parquet", chats("c", 2))
    (folder / "sub").mkdir()
    (folder / "sub" / "d.yml").write_text("conversations:\n- - d q\n  - d a\n")
    write_jsonl(folder / ".cache" / "x.jsonl", chats("hidden", 1))
    (folder / "LICENSE.txt").write_text("MIT\n")
    (folder / "notes.txt").write_text("made by hand\n")
    stats = ChatStats()
    with caplog.at_level("WARNING", logger="gpt1"):
        got = read_conversations(str(folder), stats=stats)
    assert len(got) == stats.conversations == 8 and tags(got) == ["a", "b", "c", "d"]
    assert hf_split_names(str(folder)) is None
    assert "kinds: left out 2 files that are not chat data (.jsonl" in caplog.text
    assert caplog.text.rstrip().endswith("LICENSE.txt, notes.txt")

    # A damaged line names its file and line, and --skip-invalid skips it (datasets failed whole).
    (folder / "a.jsonl").write_text((folder / "a.jsonl").read_text() + '{"messages": [\n')
    with pytest.raises(Gpt1Error, match=r"kinds/a.jsonl, line 4: invalid JSON"):
        read_conversations(str(folder))
    assert len(read_conversations(str(folder), skip_invalid=True)) == 8


def test_a_folder_whose_files_name_splits(tmp_path):
    """Files named for splits are the folder's splits, as `datasets` names them; a file named for
    none beside them was dropped by `datasets` without a word: refused, by name."""
    folder = tmp_path / "split"
    write_jsonl(folder / "train.jsonl", chats("train", 4))
    write_jsonl(folder / "chats_dev.jsonl", chats("dev", 2))
    write_parquet(folder / "test.parquet", chats("test", 1))
    assert hf_split_names(str(folder)) == ["test", "train", "validation"]
    assert tags(read_conversations(str(folder))) == ["train"]
    assert tags(read_conversations(str(folder), "validation")) == ["dev"]
    write_jsonl(folder / "more_chats.jsonl", chats("more", 3))
    for call in (lambda: read_conversations(str(folder)), lambda: hf_split_names(str(folder))):
        with pytest.raises(Gpt1Error, match=r"split: some files name a split \(chats_dev.jsonl, test.parquet, "
                                            r"train.jsonl\) and others none \(more_chats.jsonl\)"):
            call()
    (folder / "more_chats.jsonl").unlink()
    (folder / "test.parquet").unlink()
    (folder / "train.jsonl").unlink()
    with pytest.raises(Gpt1Error, match=r"split: no files for the split 'train' \(its files are named for validation\)"):
        read_conversations(str(folder))
    with pytest.raises(Gpt1Error, match=r"empty: no chat files \(looked for .jsonl.*\); found: notes.txt"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("x")
        read_conversations(str(tmp_path / "empty"))


def test_a_hub_dataset_download_is_read_as_its_card_lists_its_files(tmp_path):
    """A repository downloaded from the hub (OASST2's has four exports beside data/*.parquet) is
    read as the hub reads it, the files its README.md lists, not every file below it."""
    repo = tmp_path / "repo"
    write_jsonl(repo / "data" / "train-00000-of-00001.jsonl", chats("t", 3))
    write_jsonl(repo / "data" / "validation-00000-of-00001.jsonl", chats("v", 2))
    write_jsonl(repo / "2023-11-05_all.messages.jsonl", chats("export", 4))
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                    "    path: data/train-*\n  - split: validation\n    path: data/validation-*\n---\n# A card\n")
    assert hf_split_names(str(repo)) == ["train", "validation"]
    assert tags(read_conversations(str(repo))) == ["t"] and tags(read_conversations(str(repo), "validation")) == ["v"]


def test_a_folder_written_by_save_to_disk_is_read_with_load_from_disk(tmp_path):
    """load_dataset refused a Dataset's folder ("use load_from_disk instead", advice for Python)."""
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "saved"
    datasets.Dataset.from_list(chats("saved", 5)).save_to_disk(str(single))
    assert len(read_conversations(str(single))) == 5 and hf_split_names(str(single)) == ["train"]
    with pytest.raises(Gpt1Error, match=r"saved as one Dataset \(save_to_disk\), which has no split 'validation'"):
        read_conversations(f"hf:{single}:validation")
    both = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(chats("t", 4)),
                          "validation": datasets.Dataset.from_list(chats("v", 2))}).save_to_disk(str(both))
    assert hf_split_names(str(both)) == ["train", "validation"]
    assert tags(read_conversations(str(both), "validation")) == ["v"]
    with pytest.raises(Gpt1Error, match=r"no split 'test' \(splits: train, validation\)"):
        read_conversations(str(both), "test")


# ---- 2. several sources: a mixture -------------------------------------------------------------

def test_several_data_sources_are_read_together_and_resume(tiny_model_dir, tmp_path, capsys, monkeypatch,
                                                           stop_training_at):
    """`--data A --data B` trained on B alone; `data = [...]` in a recipe was "no such file"."""
    ra, rb, rc = (write_jsonl(tmp_path / f"{name}.jsonl", chats(name, n)) for name, n in (("ra", 6), ("rb", 4), ("rc", 4)))
    run = [*TINY_RUN[1:], "max_steps=2", "save_every=1"]
    argv = ["finetune", "--base", tiny_model_dir, "--out", tmp_path / "run", "--data", ra, "--data", rb, *run]
    stop_training_at(2, KeyboardInterrupt)  # a checkpoint at step 1 to resume from
    code, err = run_main(capsys, *argv)
    monkeypatch.undo()
    assert code == 130, err
    assert f"chat data {ra} + {rb}: 10 conversations ({ra}: 6 + {rb}: 4)" in err
    assert json.loads((tmp_path / "run/train_config.json").read_text())["config"]["data"] == [str(ra), str(rb)]
    code, err = run_main(capsys, *argv)
    assert code == 0 and "from step 1 of 2" in err, err
    other = [rc if a == rb else a for a in argv]
    assert_one_clear_line(*run_main(capsys, *other), r"different config \(data: \[.*ra.jsonl', '.*rb.jsonl'\] -> "
                                                      r"\[.*ra.jsonl', '.*rc.jsonl'\]")
    # The recipe's list; one source stays a string (as run dirs record it); the shell's expansion
    # of `--data *.jsonl`, which leaves the other files among the overrides.
    (tmp_path / "mix.toml").write_text(f'data = ["{ra}", "{rc}"]\n')
    assert load_config(FinetuneConfig, tmp_path / "mix.toml").sources == [str(ra), str(rc)]
    assert load_config(FinetuneConfig, None, [f'data=["{ra}"]']).data == str(ra)
    assert_one_clear_line(*run_main(capsys, "finetune", "--base", tiny_model_dir, "--out", tmp_path / "x", "--data", ra,
                                    rb), r"rb.jsonl: not a KEY=VALUE override; to train on several chat sources, "
                                         r"repeat --data")
    with pytest.raises(Gpt1Error, match="each named once"):
        FinetuneConfig(data=[str(ra), str(ra)])


# ---- 3. one huge message: encoded in pieces, and only as far as the context needs ------------

def test_a_long_message_is_encoded_in_bounded_pieces_with_the_same_ids(tokenizer):
    words = "the quick brown fox jumps over the lazy dog, 12 times; héllo 日本語\n".split(" ")
    long_text = " ".join(words[i % len(words)] for i in range(PIECE_CHARS // 2))  # > 2 pieces
    assert len(long_text) > 2 * PIECE_CHARS
    conversations = [
        Conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": long_text}], "a"),
        Conversation([{"role": "user", "content": long_text}, {"role": "assistant", "content": "ok"}], "b"),
        Conversation([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a"}, {"role": "user", "content": "more?"},
                      {"role": "assistant", "content": long_text[:2000]}], "c"),
    ]
    for max_len in (33, 129):
        got = encode_conversations(tokenizer, conversations, max_len)
        # What encoding every message whole gives, cut to the context, exchange by exchange.
        ids_a, labels_a = encode_chat_with_labels(tokenizer, conversations[0].messages)
        assert got.sequence(0)[0].tolist() == ids_a[:max_len]
        assert got.sequence(0)[1].tolist() == [label != IGNORE_INDEX for label in labels_a[:max_len]]
        first, second = (encode_chat_with_labels(tokenizer, conversations[2].messages[i:j]) for i, j in ((0, 3), (3, 5)))
        assert got.sequence(1)[0].tolist() == first[0]
        assert got.sequence(2)[0].tolist() == second[0][:max_len]
        assert len(got) == 3 and dict(got.skipped) == {"exchanges dropped (the prompt alone fills the context)": 1,
                                                       "exchanges truncated to the context": 2,
                                                       "conversations split at turn boundaries": 1}


def test_a_huge_message_takes_little_memory(tokenizer_dir):
    """A 27 MB reply took 3.5 GB (the tokenizer's ~130 bytes per character) for the 129 tokens kept."""
    script = textwrap.dedent(f"""
        import resource
        from gpt1.core.tokenizer import Tokenizer
        from gpt1.data.chat import encode_conversations
        from gpt1.data.chat_sources import Conversation
        tokenizer = Tokenizer.load({str(tokenizer_dir)!r})
        reply = "lorem ipsum dolor " * 300_000  # 5.4M characters
        encode_conversations(tokenizer, [Conversation([{{"role": "user", "content": "hi"}}], "g")], 129)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        data = encode_conversations(tokenizer, [Conversation([{{"role": "user", "content": "hi"}},
                                                              {{"role": "assistant", "content": reply}}], "g")], 129)
        assert data.num_tokens == 129
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 150, f"peak RSS grew {done.stdout.strip()} MB"  # whole: ~700 MB


# ---- 4. nothing left: the error says why --------------------------------------------------------

def test_empty_chat_data_errors_carry_the_readers_counts(tiny_model_dir, chat_dir, tmp_path):
    order = write_jsonl(tmp_path / "order.jsonl", [{"messages": [{"role": "assistant", "content": "x"},
                                                                 {"role": "user", "content": "y"}]}] * 5)
    cfg = load_config(FinetuneConfig, None, TINY_RUN, data=str(order))
    with pytest.raises(Gpt1Error, match=r"^no training sequences: 0 conversations \(skipped: conversations out of "
                                        r"turn order .*: 5\)$"):
        finetune(cfg, tiny_model_dir, tmp_path / "run1")
    oasst = write_jsonl(tmp_path / "o.messages.jsonl", [
        {"message_id": "p", "parent_id": None, "role": "prompter", "text": "Q", "lang": "en"},
        {"message_id": "a", "parent_id": "p", "role": "assistant", "text": "A", "lang": "en"}])
    cfg = load_config(FinetuneConfig, None, [*TINY_RUN, 'languages=["EN"]'], data=str(oasst))
    with pytest.raises(Gpt1Error, match=r"no training sequences: 0 conversations \(skipped: messages in other languages, "
                                        r"with their replies: 1\); the languages left out .*: en: 1$"):
        finetune(cfg, tiny_model_dir, tmp_path / "run2")
    import gpt1

    with pytest.raises(Gpt1Error, match=r"order.jsonl: no conversations to evaluate: 0 conversations \(skipped: "
                                        r"conversations out of turn order"):
        evaluate_chat(gpt1.load(chat_dir, device="cpu"), str(order), show_progress=False)


# ---- 5. OpenAI's fine-tuning records: weight, name, tools --------------------------------------

def test_openai_weight_name_and_tool_calls(tokenizer, tmp_path, caplog):
    records = [{"messages": [
        {"role": "user", "content": "Hi", "name": "alice"},
        {"role": "assistant", "content": "BAD REPLY", "weight": 0},
        {"role": "user", "content": "Again", "name": "bob"},
        {"role": "assistant", "content": "Good reply", "weight": 1}]}]
    path = write_jsonl(tmp_path / "w.jsonl", records)
    stats = ChatStats()
    with caplog.at_level("WARNING", logger="gpt1"):
        conversations = read_conversations(str(path), stats=stats)
    assert stats.trimmed[NAMES_IGNORED] == 2
    assert "w.jsonl: 'name' on 2 messages is ignored (gpt1's chat template has no speaker names)" in caplog.text
    ids, mask = encode_conversations(tokenizer, conversations, 129).sequence(0)
    assert tokenizer.decode([int(i) for i, m in zip(ids, mask) if m]) == "Good reply[EOS]"
    # weight 1 is the default: the same ids and mask as without it
    plain = [{k: v for k, v in m.items() if k not in ("weight", "name")} for m in records[0]["messages"]]
    plain[1]["content"] = "x"
    weighted = [dict(m, weight=1) if m["role"] == "assistant" else m for m in plain]
    a, b = (encode_conversations(tokenizer, read_conversations(str(write_jsonl(tmp_path / f"{n}.jsonl",
                                                                                [{"messages": m}]))), 129)
            for n, m in (("plain", plain), ("weighted", weighted)))
    assert a.fingerprint() == b.fingerprint()
    # A piece of a split conversation that holds only a weight-0 reply has nothing to learn: dropped, counted.
    long = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "BAD " * 60, "weight": 0},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "Good"}]
    split = encode_conversations(tokenizer, read_conversations(str(write_jsonl(tmp_path / "l.jsonl", [{"messages": long}]))), 33)
    assert len(split) == 1 and split.skipped["pieces with no reply to learn (weight 0) dropped"] == 1
    ids, mask = split.sequence(0)
    assert tokenizer.decode([int(i) for i, m in zip(ids, mask) if m]) == "Good[EOS]"

    def refused(message: dict, pattern: str) -> None:
        bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "q"}, message]}])
        with pytest.raises(Gpt1Error, match=pattern):
            read_conversations(str(bad))

    refused({"role": "assistant", "content": "a", "weight": 0.5}, r"line 1: field 'messages'\[1\].weight: expected 0 "
                                                                   r"\(leave this reply out of the loss\) or 1, got 0.5")
    refused({"role": "assistant", "content": "a", "weight": True}, r"weight: expected 0 .* got True")
    refused({"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]},
            r"line 1: field 'messages'\[1\]: tool calls and tool results \(the 'tool' role\) are not supported")
    refused({"role": "tool", "content": "42", "tool_call_id": "c"}, r"tool calls and tool results .* not supported")
    with pytest.raises(Gpt1Error, match=r"messages'\[0\].weight: applies to assistant messages only"):
        read_conversations(str(write_jsonl(tmp_path / "u.jsonl", [{"messages": [{"role": "user", "content": "q", "weight": 1},
                                                                                {"role": "assistant", "content": "a"}]}])))
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
        *chats("ok", 1)])
    stats = ChatStats()
    assert tags(read_conversations(str(mixed), skip_invalid=True, stats=stats)) == ["ok"]
    assert stats.skipped == {TOOL_CALLS: 1, "conversations whose replies all have weight 0 (nothing to learn)": 1}


# ---- 6. --skip-invalid skipping every line says so -----------------------------------------------

def test_skipping_every_line_says_so_with_the_first_reason(tmp_path):
    dolly = write_jsonl(tmp_path / "dolly.jsonl", [{"instruction": "q", "context": "", "response": "a"}] * 3)
    with pytest.raises(Gpt1Error, match=r"dolly.jsonl: no conversations found: every line was skipped \(malformed "
                                        r"lines: 3; the first: line 1: not a chat record that gpt1 reads: .* found "
                                        r"fields: context, instruction, response\)$"):
        read_conversations(str(dolly), skip_invalid=True)
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes("".join(json.dumps(r) + "\n" for r in chats("x", 2)).encode("utf-16"))
    with pytest.raises(Gpt1Error, match=r"utf16.jsonl: no conversations found: every line was skipped \(malformed "
                                        r"lines: \d; the first: line 1: invalid UTF-8 at byte offset 0\)"):
        read_conversations(str(utf16), skip_invalid=True)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(Gpt1Error, match=r"empty.jsonl: no conversations found \(the source is empty\)"):
        read_conversations(str(tmp_path / "empty.jsonl"), skip_invalid=True)


# ---- 8, 9. OASST: NaN ranks, parent cycles -------------------------------------------------------

def test_oasst_nan_rank_is_unranked(tmp_path):
    """NaN compared as neither better nor worse than 0: min() kept the reply that came first."""
    ranked = tmp_path / "nan.messages.jsonl"  # json.dumps writes NaN for a pandas float column's nulls
    ranked.write_text(
        '{"message_id": "p", "parent_id": null, "role": "prompter", "text": "Q?", "rank": NaN}\n'
        '{"message_id": "x", "parent_id": "p", "role": "assistant", "text": "unranked", "rank": NaN}\n'
        '{"message_id": "y", "parent_id": "p", "role": "assistant", "text": "rank 1", "rank": 1.0}\n'
        '{"message_id": "z", "parent_id": "p", "role": "assistant", "text": "rank 0", "rank": 0.0}\n')
    assert read_conversations(str(ranked))[0].messages[1]["content"] == "rank 0"


def test_oasst_messages_in_a_parent_cycle_are_counted(tmp_path):
    """They reach no root and no orphan, so the walk never met them: gone, uncounted."""
    cycle = write_jsonl(tmp_path / "cycle.messages.jsonl", [
        {"message_id": "p", "parent_id": None, "role": "prompter", "text": "Q?"},
        {"message_id": "a", "parent_id": "p", "role": "assistant", "text": "A."},
        {"message_id": "x", "parent_id": "y", "role": "prompter", "text": "cycle 1"},
        {"message_id": "y", "parent_id": "x", "role": "assistant", "text": "cycle 2"},
        {"message_id": "r", "parent_id": "y", "role": "prompter", "text": "below the cycle"},
        {"message_id": "s", "parent_id": "s", "role": "prompter", "text": "its own parent"}])
    stats = ChatStats()
    assert len(read_conversations(str(cycle), stats=stats)) == 1
    assert stats.skipped == {"messages whose parents form a cycle (no prompt at their root)": 4}


def test_split_names_are_case_sensitive_and_json_is_json_lines(tmp_path):
    # As `datasets` reads a folder: Train.jsonl/Valid.jsonl name no split (pooled, as before the
    # folder reader), and a .json file holds JSON Lines (a folder of them was "no chat files").
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    folder = tmp_path / "cased"
    folder.mkdir()
    for name, n in (("Train.jsonl", 3), ("Valid.jsonl", 2), ("more.json", 1)):
        (folder / name).write_text((json.dumps(record) + "\n") * n)
    assert hf_split_names(str(folder)) is None
    assert len(read_conversations(str(folder))) == 6
    (tmp_path / "array.json").write_text(json.dumps([record]))  # one JSON array, as alpaca_data.json: read (pass 18)
    assert len(read_conversations(str(tmp_path / "array.json"))) == 1


# Surrogate escapes in chatterbot dialogs.

def _dialogs(tmp_path, *dialogs: list[str]):
    """A chatterbot .yml file whose strings are written as YAML double-quoted escapes."""
    path = tmp_path / "d.yml"
    path.write_text("conversations:\n" + "".join(
        "- " + "\n  ".join(f'- "{turn}"' for turn in turns) + "\n" for turns in dialogs), encoding="utf-8")
    return path


def test_a_lone_surrogate_in_a_chatterbot_dialog_names_the_dialog_and_is_skippable(tmp_path):
    """It failed later, in the chat template, naming neither the file nor the dialog, and
    --skip-invalid did not skip it."""
    path = _dialogs(tmp_path, ["hi", r"a\ud800b"], ["x", "y"])
    with pytest.raises(Gpt1Error) as refused:
        read_conversations(str(path))
    assert str(refused.value) == (rf"{path}: conversations[0][1]: a lone surrogate escape (\ud800) in a string: "
                                  "not valid Unicode text (pass --skip-invalid to skip bad dialogs)")
    stats = ChatStats()
    kept = read_conversations(str(path), skip_invalid=True, stats=stats)
    assert [c.messages[1]["content"] for c in kept] == ["y"] and stats.skipped == {"malformed dialogs": 1}


def test_a_surrogate_pair_escape_in_a_chatterbot_dialog_is_its_character(tmp_path):
    """PyYAML reads "\\ud83d\\ude00" (how JSON writers spell an emoji) as two lone surrogates;
    JSON reads it as the one character, which the writer meant."""
    path = _dialogs(tmp_path, ["smile", r"\ud83d\ude00 ok"], ["backwards", r"\ude00\ud83d"])
    with pytest.raises(Gpt1Error, match=r"conversations\[1\]\[1\]: a lone surrogate escape \(\\ude00\)"):
        read_conversations(str(path))
    kept = read_conversations(str(path), skip_invalid=True)
    assert [c.messages for c in kept] == [[{"role": "user", "content": "smile"}, {"role": "assistant", "content": "😀 ok"}]]


# OpenAI records read back from columnar formats (a null key is an absent one), empty files in
# a folder, and a chatterbot `.yml` with invalid UTF-8 under --skip-invalid.

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


def read(spec: str, **kwargs) -> tuple[list, ChatStats]:
    stats = ChatStats()
    return read_conversations(spec, stats=stats, **kwargs), stats


# ---- a null key from parquet / datasets is an absent key ---------------------------------

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


# ---- an empty file in a folder is passed over and counted -------------------------------

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


# ---- a chatterbot .yml with invalid UTF-8 is a bad file, as a text file is --------------

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


def test_a_control_character_in_a_yml_file_is_named_with_its_line_and_column(tmp_path):
    """PyYAML's ReaderError (a NUL or other control character) carries no problem mark: the error
    said "not valid YAML (ReaderError)", naming neither the place nor the character (hunt 1)."""
    path = tmp_path / "nul.yml"
    path.write_text("conversations:\n- - hi\n  - a\x00b\n", encoding="utf-8")
    with pytest.raises(Gpt1Error, match=r"nul\.yml: not valid YAML at line 3, column 6 \(the character U\+0000, which "
                                        r"YAML does not allow\)$"):
        read_conversations(str(path))


@pytest.mark.parametrize("name", ["one.json", "one.jsonl"])
def test_a_pretty_printed_json_file_is_named_as_such(tmp_path, name):
    """One record (or records under a key) written by json.dump(..., indent=2): the error said "line 1:
    invalid JSON (Expecting property name enclosed in double quotes ...)", and, with --skip-invalid,
    that every line was skipped for it (hunt 1)."""
    path = tmp_path / name
    path.write_text(json.dumps({"data": CHATS}, indent=2) + "\n", encoding="utf-8")
    pretty = r"line 1: one JSON object written over several lines \(pretty-printed\); JSON Lines holds one record a line: "
    with pytest.raises(Gpt1Error, match=rf"{name}, {pretty}.*jq -c '\.KEY\[\]' .*\(pass --skip-invalid to skip bad lines\)$"):
        read_conversations(str(path))
    with pytest.raises(Gpt1Error, match=rf"{name}: no conversations found: every line was skipped \(malformed lines: "
                                        rf"\d+; the first: {pretty}"):
        read_conversations(str(path), skip_invalid=True)


def test_a_dangling_link_in_a_chat_folder_is_named_as_one_and_counted(tmp_path, caplog):
    """A .jsonl link whose target is gone (a Hugging Face cache snapshot downloaded in part) was
    left out as a file "that is not chat data", and not counted (hunt 1)."""
    folder = tmp_path / "links"
    write_jsonl(folder / "a.jsonl", chats("a", 3))
    (folder / "b.jsonl").symlink_to(tmp_path / "gone.jsonl")
    (folder / "notes.txt").write_text("made by hand\n")
    stats = ChatStats()
    with caplog.at_level("WARNING", logger="gpt1"):
        got = read_conversations(str(folder), stats=stats)
    assert len(got) == 3 and stats.skipped == {"entries that are not regular files": 1}
    assert "links: left out 1 file that is not chat data (.jsonl" in caplog.text and "): notes.txt" in caplog.text
    assert ("links: left out 1 entry that is not a regular file (a dangling link, a pipe, a socket or a device): "
            "b.jsonl") in caplog.text


def test_hf_prefix_on_a_local_file_says_to_drop_it(tmp_path):
    """`hf:FILE` reached `datasets`, whose error said it "Couldn't find any data file at" the file
    that was there (hunt 1)."""
    path = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    with pytest.raises(Gpt1Error, match=rf"^hf:{path}:train: a local file, which `datasets` does not read by its path "
                                        rf"alone: pass it without hf: \({path}\)"):
        read_conversations(f"hf:{path}")


@pytest.mark.parametrize("language", ["../english", "english/..", "english/ai"])
def test_a_chatterbot_language_is_one_of_its_folders_by_name(language):
    """`chatterbot:../english` listed the package's own folders as the known languages
    ("__pycache__, data"), and `chatterbot:english/..` read every language (hunt 1)."""
    pytest.importorskip("chatterbot_corpus")
    with pytest.raises(Gpt1Error, match=rf"^chatterbot:{re.escape(language)}: chatterbot-corpus has no language "
                                        r"'[^']*' \(known: bengali, .*english, .*\)$"):
        read_conversations(f"chatterbot:{language}")



def test_a_chatterbot_spec_has_no_splits_to_look_up_on_the_hub():
    """`hf_split_names("chatterbot:english/..")`, which finetune asks first, took the spec for a
    hub name (one "/", no such file) and went to the network (hunt 1)."""
    assert hf_split_names("chatterbot:english/..") is None
