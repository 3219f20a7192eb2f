
from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
import torch

from gpt1.core.chat_template import encode_chat_with_labels
from gpt1.core.constants import IGNORE_INDEX
from gpt1.core.errors import Gpt1Error
from gpt1.data.chat import ChatBatches, encode_conversations, iter_batches, pad_batch
from gpt1.data.chat_sources import ChatStats, Conversation, hf_split_names, read_conversations, split_conversations
from tests.test_battery import assert_one_clear_line, run_main


def msg(mid, parent, role, text, tree, lang="en", rank=None, deleted=False, review=True):
    return {"message_id": mid, "parent_id": parent, "message_tree_id": tree, "role": role, "text": text,
            "lang": lang, "rank": rank, "deleted": deleted, "review_result": review, "synthetic": False}


LONG = "a long question about tokens " * 30

# Six trees that exercise every rule, plus an orphan.
MESSAGES = [
    msg("p1", None, "prompter", "What is 2+2?", "t1"),
    msg("a1", "p1", "assistant", "Five.", "t1", rank=1),
    msg("a2", "p1", "assistant", "Four.", "t1", rank=0),
    msg("p2", "a2", "prompter", "And 3+3?", "t1"),
    msg("a3", "p2", "assistant", "Six.", "t1", rank=0),
    msg("a4", "p2", "assistant", "Seven.", "t1", rank=1, deleted=True),
    msg("a5", "p1", "assistant", "Rude answer.", "t1", review=False),
    msg("a6", "p1", "assistant", "Unranked answer.", "t1"),
    msg("o1", "gone", "assistant", "An orphan.", "t1"),
    msg("p3", None, "prompter", "Hallo!", "t2", lang="de"),
    msg("a7", "p3", "assistant", "Guten Tag.", "t2", lang="de", rank=0),
    msg("p4", None, "prompter", "Deleted prompt.", "t3", deleted=True),
    msg("a8", "p4", "assistant", "Reply to a deleted prompt.", "t3", rank=0),
    msg("p5", None, "prompter", "Unanswered?", "t4"),
    msg("p6", None, "prompter", "Hi", "t5"),
    msg("a9", "p6", "assistant", "   ", "t5", rank=0),
    msg("a10", "p6", "assistant", "Hello!", "t5", rank=1),
    msg("p7", None, "prompter", LONG, "t6"),
    msg("a11", "p7", "assistant", "A long answer. " * 30, "t6", rank=0),
]


def convo(*texts):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


BEST = [convo("What is 2+2?", "Four.", "And 3+3?", "Six."), convo("Hallo!", "Guten Tag."), convo("Hi", "Hello!"),
        convo(LONG, "A long answer. " * 30)]
ALL = [convo("What is 2+2?", "Five."), convo("What is 2+2?", "Four.", "And 3+3?", "Six."),
       convo("What is 2+2?", "Unranked answer."), *BEST[1:]]


def write_messages(path, messages=MESSAGES):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(m) + "\n" for m in messages)
    return path


def write_trees(path, messages=MESSAGES):
    """The nested export: one tree per line, replies inside their parent."""
    nodes = {m["message_id"]: {k: v for k, v in m.items() if k not in ("message_tree_id", "parent_id")} | {"replies": []}
             for m in messages}
    trees = []
    for m in messages:
        if m["parent_id"] is None:
            trees.append({"message_tree_id": m["message_tree_id"], "tree_state": "ready_for_export",
                          "prompt": nodes[m["message_id"]]})
        elif m["parent_id"] in nodes:
            nodes[m["parent_id"]]["replies"].append(nodes[m["message_id"]])
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(t) + "\n" for t in trees)
    return path


def texts(conversations):
    return [c.messages for c in conversations]


@pytest.mark.parametrize("fmt", ["messages.jsonl.gz", "trees.jsonl.gz", "parquet"])
def test_oasst_exports_give_the_best_ranked_conversations(tmp_path, fmt):
    path = tmp_path / f"oasst.{fmt}"
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(MESSAGES), path)
    elif fmt.startswith("trees"):
        write_trees(path)
    else:
        write_messages(path)
    stats = ChatStats()
    conversations = read_conversations(str(path), stats=stats)
    assert texts(conversations) == BEST
    assert [c.group for c in conversations] == ["t1", "t2", "t5", "t6"]
    assert stats.conversations == 4
    skipped = stats.skipped
    assert skipped["deleted messages, with their replies"] == 2  # a4 and the prompt p4
    assert skipped["messages that failed review, with their replies"] == 1
    assert skipped["empty messages, with their replies"] == 1
    assert not stats.trimmed and skipped["conversations without an assistant reply"] == 1  # a lone prompt: not "cut"
    assert skipped["orphan messages (parent not found), with their replies"] == (0 if fmt.startswith("trees") else 1)


def test_all_paths_and_language_filter(tmp_path):
    path = write_messages(tmp_path / "x.messages.jsonl")
    assert texts(read_conversations(str(path), all_paths=True)) == ALL
    stats = ChatStats()
    english = read_conversations(str(path), languages=["en"], stats=stats)
    assert texts(english) == [BEST[0], BEST[2], BEST[3]]
    assert stats.skipped["messages in other languages, with their replies"] == 1


def test_trailing_user_turn_is_dropped_and_counted(tmp_path):
    messages = [msg("p", None, "prompter", "Q1", "t"), msg("a", "p", "assistant", "A1", "t", rank=0),
                msg("q", "a", "prompter", "Q2 with no answer", "t")]
    stats = ChatStats()
    got = read_conversations(str(write_messages(tmp_path / "m.jsonl", messages)), stats=stats)
    assert texts(got) == [convo("Q1", "A1")] and stats.trimmed["trailing user turns (no reply)"] == 1 and not stats.skipped


def test_malformed_lines_name_file_and_line_or_are_skipped(tmp_path):
    path = tmp_path / "bad.messages.jsonl"
    lines = [json.dumps(m) for m in MESSAGES[:3]]
    lines.insert(1, "{not json")
    lines.insert(3, json.dumps({k: v for k, v in MESSAGES[3].items() if k != "text"}))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(Gpt1Error, match=r"bad.messages.jsonl, line 2: invalid JSON"):
        read_conversations(str(path))
    path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    with pytest.raises(Gpt1Error, match=r"bad.messages.jsonl, line 3: missing required field 'text'"):
        read_conversations(str(path))
    path.write_text("\n".join(lines) + "\n")
    stats = ChatStats()
    got = read_conversations(str(path), skip_invalid=True, stats=stats)
    assert texts(got) == [convo("What is 2+2?", "Four.")]
    assert stats.skipped["malformed lines"] == 2
    tree = tmp_path / "bad.trees.jsonl.gz"
    with gzip.open(tree, "wt") as f:
        f.write(json.dumps({"message_tree_id": "t", "prompt": {"message_id": "p", "role": "robot", "text": "x"}}) + "\n")
    with pytest.raises(Gpt1Error, match=r"bad.trees.jsonl.gz, line 1: field 'role' must be 'prompter' or 'assistant'"):
        read_conversations(str(tree))


def test_hf_dataset_folder_with_splits(tmp_path):
    folder = tmp_path / "oasst-like"
    folder.mkdir()
    write_messages(folder / "train.jsonl", MESSAGES[:9])
    write_messages(folder / "validation.jsonl", MESSAGES[9:11])
    assert sorted(hf_split_names(str(folder))) == ["train", "validation"]
    assert texts(read_conversations(str(folder))) == [BEST[0]]
    assert texts(read_conversations(f"hf:{folder}", split="validation")) == [BEST[1]]
    assert texts(read_conversations(f"hf:{folder}:validation")) == [BEST[1]]
    with pytest.raises(Gpt1Error, match="cannot open the dataset"):
        read_conversations(f"hf:{tmp_path / 'missing'}")


def test_generic_chat_jsonl_and_chatterbot(tmp_path):
    path = tmp_path / "chats.jsonl"
    records = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hey"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
                      {"role": "user", "content": "Bye"}]},
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "?"}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + json.dumps({"messages": [{"role": "bot"}]}) + "\n")
    with pytest.raises(Gpt1Error, match=r"chats.jsonl, line 4: field 'messages'\[0\].role"):
        read_conversations(str(path))
    stats = ChatStats()
    got = read_conversations(str(path), skip_invalid=True, stats=stats)
    # A trailing user turn is cut (as OASST's and chatterbot's are), not the whole conversation.
    assert texts(got) == [records[0]["messages"], records[1]["messages"][:2]]
    assert stats.trimmed["trailing user turns (no reply)"] == 1
    assert stats.skipped["conversations with an empty message"] == 1


def test_oasst_only_options_on_other_data_are_said_to_be_ignored(tmp_path, caplog):
    """languages and all_paths shape OASST message trees; on {"messages"} records or chatterbot
    they did nothing, silently (languages=["fr"] kept every English dialog)."""
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]}) + "\n")
    with caplog.at_level("WARNING", logger="gpt1"):
        assert len(read_conversations(str(path), languages=["fr"], all_paths=True)) == 1
    assert "chats.jsonl: languages and all_paths apply to OASST message trees; this data has none, so they are ignored" \
        in caplog.text
    caplog.clear()
    write_messages(tmp_path / "oasst.jsonl")
    with caplog.at_level("WARNING", logger="gpt1"):
        read_conversations(str(tmp_path / "oasst.jsonl"), languages=["en"], all_paths=True)
        read_conversations(str(path))
    assert "ignored" not in caplog.text


def test_generic_chat_records_out_of_turn_order_are_skipped_and_the_split_follows_content(tmp_path):
    """Records [A, A, U, U, A] or [S, A] were trained on; the held-out split hashed the path as
    spelled (so `gpt1 eval --chat ./f.jsonl` scored other conversations than the run held out),
    and copies of a dialog landed on both sides of it."""
    def turn(role, text):
        return {"role": role, "content": text}

    odd = [[turn("assistant", "a"), turn("assistant", "b"), turn("user", "c"), turn("user", "d"), turn("assistant", "e")],
           [turn("system", "s"), turn("assistant", "a")], [turn("system", "s")], [turn("user", "u")]]
    path = tmp_path / "odd.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in odd))
    stats = ChatStats()
    assert read_conversations(str(path), stats=stats) == []
    assert stats.skipped["conversations out of turn order (after an optional system message: user, assistant, ...)"] == 2
    assert stats.skipped["conversations without an assistant reply"] == 2

    dialogs = [[turn("user", f"q{i}"), turn("assistant", f"a{i}")] for i in range(40)]
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": d}) + "\n" for d in dialogs * 3))  # each dialog three times
    splits = []
    for spelling in (str(chats), f"{tmp_path}/./chats.jsonl", os.path.relpath(chats)):
        train, val = split_conversations(read_conversations(spelling), 0.2, 1337)
        splits.append(texts(val))
        assert val and not {json.dumps(m) for m in texts(val)} & {json.dumps(m) for m in texts(train)}
    assert splits[0] == splits[1] == splits[2]

    yml = tmp_path / "dialogs.yml"
    yml.write_text("categories:\n- test\nconversations:\n- - Is it on?\n  - Yes\n- - One\n  - Two\n  - Three\n")
    stats = ChatStats()
    assert texts(read_conversations(str(yml), stats=stats)) == [convo("Is it on?", "Yes"), convo("One", "Two")]
    assert stats.trimmed["trailing user turns (no reply)"] == 1 and not stats.skipped
    shipped = read_conversations("chatterbot")
    assert len(shipped) > 500
    assert {"role": "user", "content": "Hello"} in [c.messages[0] for c in shipped]
    assert all(c.messages[-1]["role"] == "assistant" for c in shipped)
    with pytest.raises(Gpt1Error, match="no such file"):
        read_conversations(str(tmp_path / "nope.jsonl"))


def test_split_keeps_trees_together_and_is_deterministic():
    conversations = [Conversation(convo("q", "a"), group=f"tree-{i // 3}") for i in range(300)]
    train, val = split_conversations(conversations, 0.2)
    assert split_conversations(conversations, 0.2) == (train, val)
    assert 30 < len(val) < 90 and len(train) + len(val) == 300
    assert not {c.group for c in train} & {c.group for c in val}


def test_loss_mask_covers_exactly_the_assistant_tokens(tokenizer):
    conversation = Conversation(convo("What is 2+2?", "Four.", "And 3+3?", "Six."), "t")
    data = encode_conversations(tokenizer, [conversation], max_len=512)
    ids, mask = data.sequence(0)
    expected, _ = encode_chat_with_labels(tokenizer, conversation.messages)
    assert ids.tolist() == expected
    learned = ids[mask].tolist()
    assert learned == tokenizer.encode("Four.") + [tokenizer.eos_id] + tokenizer.encode("Six.") + [tokenizer.eos_id]
    x, y = pad_batch([data.sequence(0), (ids[:5], mask[:5])])
    assert x.shape == y.shape == (2, len(ids) - 1)
    assert torch.equal(x[0], torch.tensor(ids[:-1], dtype=torch.long))
    assert torch.equal(y[0], torch.where(torch.tensor(mask[1:]), torch.tensor(ids[1:], dtype=torch.long), IGNORE_INDEX))
    assert (x[1, 4:] == tokenizer.pad_id).all() and (y[1, 4:] == IGNORE_INDEX).all()
    assert data.num_loss_tokens == len(learned)


def test_over_long_conversations_are_split_truncated_or_dropped_and_counted(tokenizer):
    exchange = convo("short question", "short answer")
    unit = len(encode_chat_with_labels(tokenizer, exchange)[0])
    max_len = unit * 2 + 1
    fits = Conversation(exchange * 2, "a")
    split = Conversation(exchange * 3, "b")
    long_reply = Conversation(convo("q", "word " * 200), "c")
    long_prompt = Conversation(convo("word " * 200, "answer"), "d")
    data = encode_conversations(tokenizer, [fits, split, long_reply, long_prompt], max_len=max_len)
    lengths = np.diff(data.offsets).tolist()
    assert lengths == [2 * unit, 2 * unit, unit, max_len]
    assert max(lengths) <= max_len
    assert data.skipped == {"conversations split at turn boundaries": 1, "exchanges truncated to the context": 1,
                            "exchanges dropped (the prompt alone fills the context)": 1}
    assert data.sequence(3)[1][1:].any()  # the truncated reply still has targets


def test_batches_are_deterministic_resumable_and_sharded(tokenizer):
    conversations = [Conversation(convo(f"question {i}", "answer " * (i % 7 + 1)), str(i)) for i in range(23)]
    data = encode_conversations(tokenizer, conversations, max_len=64)
    source = ChatBatches(data, micro_batch=4, seed=7)
    first = [source.next_batch() for _ in range(5)]
    state = json.loads(json.dumps(source.state_dict()))
    rest = [source.next_batch() for _ in range(6)]  # crosses into the second epoch
    assert source.state_dict()["epoch"] == 1
    again = ChatBatches(data, micro_batch=4, seed=7)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, [again.next_batch() for _ in range(5)]))
    resumed = ChatBatches(data, micro_batch=4, seed=7)
    resumed.load_state_dict(state)
    for (x, y), (x2, y2) in zip(rest, [resumed.next_batch() for _ in range(6)]):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(Gpt1Error, match="cannot resume"):
        ChatBatches(data, micro_batch=4, seed=8).load_state_dict(state)
    # Two ranks see disjoint halves of each step, and together one epoch covers every sequence.
    ranks = [ChatBatches(data, micro_batch=2, seed=7, rank=r, world_size=2) for r in range(2)]
    seen = []
    for _ in range(ranks[0].epoch_steps()):
        for r in ranks:
            x, _ = r.next_batch()
            seen += [row[row != 0].tolist() for row in x]
    everything = [row[row != 0].tolist() for x, _ in iter_batches(data, 5) for row in x]
    assert all(s in everything for s in seen) and all(e in seen for e in everything)


def test_corrupt_gzip_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"this is not gzip data\n")
    with pytest.raises(Gpt1Error, match="bad.jsonl.gz: not a gzip file"):
        read_conversations(str(bad))


def test_a_chat_folder_with_a_damaged_file_or_two_kinds_of_file_is_read_by_gpt1(tmp_path):
    """A folder is read by gpt1's own readers (it went to `datasets`: a damaged line was a pyarrow
    traceback, with --skip-invalid too; a folder of .yml dialogs and .jsonl files read one kind)."""
    good = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(5)]
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good) + '{"messages": [{"role": "user"\n')
    with pytest.raises(Gpt1Error, match=r"damaged/a.jsonl, line 6: invalid JSON .*\(pass --skip-invalid to skip bad lines\)"):
        read_conversations(str(damaged))
    assert len(read_conversations(str(damaged), skip_invalid=True)) == 5

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    (mixed / "b.yml").write_text("conversations:\n- - Is it on?\n  - Yes\n")
    assert len(read_conversations(str(mixed))) == 6  # both kinds: a.jsonl's 5, then b.yml's 1
    (mixed / "a.jsonl").unlink()
    assert texts(read_conversations(str(mixed))) == [[{"role": "user", "content": "Is it on?"},
                                                      {"role": "assistant", "content": "Yes"}]]


# Chat data whose prompts all fill the context.

def test_chat_data_whose_prompts_all_fill_the_context_says_so(tmp_path, tiny_model_dir, capsys):
    """It said "the chat data is empty after filtering" (pointing at languages or deleted
    messages), the counts that named the cause printed only after the check."""
    long = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    (tmp_path / "long.jsonl").write_text("\n".join(json.dumps(long) for _ in range(5)) + "\n")
    assert_one_clear_line(*run_main(capsys, "finetune", "--base", tiny_model_dir, "--data", tmp_path / "long.jsonl",
                                    "--out", tmp_path / "ft", "max_steps=1"),
                          r"no training sequences: exchanges dropped \(the prompt alone fills the context\): 5$")
