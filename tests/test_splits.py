"""Held-out sets that keep copies and the conversations of one tree on one side.

Chat records (every format) and chatterbot dialogs are split by their root, the system message
and the first user turn: chatterbot's dialogs by their place in the file put copies of one dialog
on both sides (52 of the quickstart's 101 held-out dialogs were training dialogs), and records by
their whole text split the paths of one tree apart. `gpt1 prepare` splits by the text of each
document's first piece, not by its index, so copies of a document fall on one side.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from gpt1.core.errors import Gpt1Error
from gpt1.data.chat_sources import read_conversations, split_conversations
from gpt1.data.shards import ShardWriter, load_meta, prepare
from tests.test_prepare import _docs


def _text(conversation) -> str:
    return json.dumps(conversation.messages, sort_keys=True)


def _first_turn(conversation) -> str:
    return next(m["content"] for m in conversation.messages if m["role"] == "user")


# ---- chat ---------------------------------------------------------------------------------

def test_the_quickstart_holds_out_no_copy_of_a_training_dialog():
    """chatterbot-corpus's tech_support.yml repeats ten dialogs about 100 times each: split by
    their place in the file, half the quickstart's held-out dialogs were training dialogs."""
    from gpt1.quickstart import FINETUNE_RECIPE, QuickstartConfig
    from gpt1.train.config import load_config
    from gpt1.train.finetune import FinetuneConfig, load_chat_splits

    qs = QuickstartConfig()
    cfg = load_config(FinetuneConfig, FINETUNE_RECIPE, [], data=qs.chat_data, seed=qs.seed)
    train, val, *_ = load_chat_splits(cfg)
    trained = {_text(c) for c in train}
    assert val and [c for c in val if _text(c) in trained] == []
    assert not {_first_turn(c) for c in train} & {_first_turn(c) for c in val}


def test_copies_of_a_dialog_and_its_other_replies_are_held_out_together(tmp_path):
    """Copies of a chatterbot dialog in one file, and records of another format that start the
    same way (pooled, as `--data a.yml --data b.jsonl` pools them), land on the same side."""
    rng = random.Random(0)
    dialogs = [[f"question {i}?", f"answer {i}."] for i in range(60)]
    entries = dialogs + [dialogs[i % 10] for i in range(200)]  # ten dialogs, 20 more copies each
    rng.shuffle(entries)
    yml = tmp_path / "dialogs.yml"
    yml.write_text("conversations:\n" + "".join(f"- - {json.dumps(q)}\n  - {json.dumps(a)}\n" for q, a in entries))
    records = tmp_path / "more.jsonl"
    records.write_text("".join(json.dumps({"prompt": q, "completion": f"another {a}"}) + "\n" for q, a in dialogs))
    pooled = read_conversations(str(yml)) + read_conversations(str(records))
    assert len(pooled) == 320
    train, val = split_conversations(pooled, 0.2, 1337)
    assert val and not {_first_turn(c) for c in train} & {_first_turn(c) for c in val}
    assert not {_text(c) for c in train} & {_text(c) for c in val}


def _tree_paths(fmt: str, tree: int, path: int) -> dict:
    """Path `path` of tree `tree`, as a record of `fmt`: a system message, the tree's prompt and
    first reply, a follow-up, and one of three replies to it."""
    system, prompt, reply = "Answer briefly.", f"prompt {tree}?", f"reply {tree}."
    follow, last = f"follow-up {tree}?", f"sibling {tree}-{path}."
    turns = [("user", prompt), ("assistant", reply), ("user", follow), ("assistant", last)]
    if fmt == "messages":
        return {"messages": [{"role": "system", "content": system}] + [{"role": r, "content": t} for r, t in turns]}
    if fmt == "sharegpt":
        return {"conversations": [{"from": "system", "value": system}]
                + [{"from": "human" if r == "user" else "gpt", "value": t} for r, t in turns]}
    if fmt == "alpaca":
        return {"system": system, "history": [[prompt, reply]], "instruction": follow, "input": "", "output": last}
    return {"prompt": [{"role": "system", "content": system}] + [{"role": r, "content": t} for r, t in turns[:3]],
            "completion": [{"role": "assistant", "content": last}]}


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca", "prompt/completion"])
def test_the_paths_of_one_tree_are_held_out_together(tmp_path, fmt):
    """Every root-to-leaf path of a tree written as a record (the same system message, prompt and
    first reply, other later turns): split by their whole text, 60 of 400 trees were on both
    sides, and the held-out paths were scored on a first reply that training had learned."""
    data = tmp_path / "paths.jsonl"
    data.write_text("".join(json.dumps(_tree_paths(fmt, tree, path)) + "\n" for tree in range(300) for path in range(3)))
    conversations = read_conversations(str(data))
    assert len(conversations) == 900
    train, val = split_conversations(conversations, 0.1, 1337)
    first_reply = {c.messages[2]["content"] for c in train}  # after the system message
    assert val and not [c for c in val if c.messages[2]["content"] in first_reply]
    assert 15 <= len(val) // 3 <= 45 and len(val) % 3 == 0  # a tenth of the 300 trees, roughly; whole trees


def test_a_small_chat_set_holds_out_a_tree_and_never_splits_one(tmp_path):
    """Two prompts: one is held out, as before. Three replies to one prompt are one tree, which
    training keeps whole (before, one of them was held out and scored on its sibling's prompt)."""
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": "sure"}) + "\n" for p in ("hi", "bye")))
    train, val = split_conversations(read_conversations(str(data)), 0.05, 1337)
    assert (len(train), len(val)) == (1, 1)
    data.write_text("".join(json.dumps({"prompt": "hi", "completion": c}) + "\n" for c in ("hello", "hey", "yo")))
    train, val = split_conversations(read_conversations(str(data)), 0.05, 1337)
    assert (len(train), len(val)) == (3, 0)


# ---- gpt1 prepare -------------------------------------------------------------------------

def _corpus(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "epsilon"]) for _ in range(n))


def _sides(out: Path, eos: int) -> tuple[list, list]:
    return (_docs(np.fromfile(out / "train.bin", dtype=np.uint16), eos),
            _docs(np.fromfile(out / "val.bin", dtype=np.uint16), eos))


def test_copies_of_a_document_fall_on_one_side(tokenizer, tmp_path):
    """dupsplit.py's corpus, smaller: split by index, 17 of 100 held-out documents were in
    train.bin too."""
    rng = random.Random(0)
    docs = [f"doc {i} " + _words(rng, 20) for i in range(400)]
    texts = docs + rng.sample(docs, 100)
    rng.shuffle(texts)
    meta = prepare([str(_corpus(tmp_path / "a.jsonl", texts))], tokenizer, tmp_path / "out", val=0.1, seed=1337)
    train, val = _sides(tmp_path / "out", tokenizer.eos_id)
    assert 20 <= meta["val"]["documents"] == len(val) <= 80
    assert not set(val) & set(train)


def test_a_count_holds_out_copies_together_wherever_they_come(tokenizer, tmp_path):
    """`--val N` holds out the documents of the N smallest hashes, copies of one counted once;
    which ones does not depend on their order in the corpus."""
    rng = random.Random(1)
    docs = [f"doc {i} " + _words(rng, 20) for i in range(100)]
    texts = docs + docs[::-1]  # each twice
    meta = prepare([str(_corpus(tmp_path / "a.jsonl", texts))], tokenizer, tmp_path / "a", val=10, batch_docs=3)
    train, val = _sides(tmp_path / "a", tokenizer.eos_id)
    assert meta["val"]["documents"] == len(val) == 20 and len(set(val)) == 10 and not set(val) & set(train)
    rng.shuffle(texts)
    prepare([str(_corpus(tmp_path / "b.jsonl", texts))], tokenizer, tmp_path / "b", val=10, batch_docs=7)
    assert sorted(_sides(tmp_path / "b", tokenizer.eos_id)[1]) == sorted(val)


def test_a_small_corpus_holds_out_a_document_with_its_copies(tokenizer, tmp_path):
    """No document under the fraction: the smallest-hash one is held out, and its copies with it
    (they stayed in train.bin); a corpus of copies of one document has nothing to hold out."""
    texts = ["one document", "another document", "a third one"] * 2
    meta = prepare([str(_corpus(tmp_path / "a.jsonl", texts))], tokenizer, tmp_path / "a", val=1e-6)
    train, val = _sides(tmp_path / "a", tokenizer.eos_id)
    assert meta["val"]["documents"] == len(val) == 2 and len(set(val)) == 1 and not set(val) & set(train)
    assert meta["train"]["documents"] == len(train) == 4 and meta["val"]["tokens"] == sum(len(d) + 1 for d in val)
    with pytest.raises(Gpt1Error, match=r"the corpus's 3 documents are copies of one: a validation split needs two "
                                        r"different ones"):
        prepare([str(_corpus(tmp_path / "b.jsonl", ["the same"] * 3))], tokenizer, tmp_path / "b", val=1e-6)
    assert not (tmp_path / "b" / "meta.json").exists()


class Killed(Exception):
    pass


@pytest.mark.parametrize("val", [0.2, 5])
def test_a_prepare_of_copies_resumes_to_the_same_bytes(tokenizer, tmp_path, monkeypatch, val):
    """Killed after some commits (the count mode's candidates and their hashes in the state), the
    rerun ends with the bytes of an uninterrupted run."""
    rng = random.Random(2)
    docs = [f"doc {i} " + _words(rng, 30) for i in range(40)]
    texts = docs + rng.sample(docs, 20)
    rng.shuffle(texts)
    corpus = str(_corpus(tmp_path / "a.jsonl", texts))
    clean = prepare([corpus], tokenizer, tmp_path / "clean", val=val, batch_docs=2)
    real_add = ShardWriter.add

    def add(self, piece, ids):
        if self.state["documents"] >= 35:
            raise Killed
        real_add(self, piece, ids)

    monkeypatch.setattr(ShardWriter, "add", add)
    with pytest.raises(Killed):
        prepare([corpus], tokenizer, tmp_path / "out", val=val, batch_docs=2, commit_bytes=300)
    monkeypatch.setattr(ShardWriter, "add", real_add)
    assert json.loads((tmp_path / "out" / "prepare-state.json").read_text())["documents"] > 0
    resumed = prepare([corpus], tokenizer, tmp_path / "out", val=val, batch_docs=2, commit_bytes=300)
    assert resumed["train"] == clean["train"] and resumed["val"] == clean["val"]
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


def test_an_older_gpt1s_interrupted_prepare_starts_over(tokenizer, tmp_path, caplog):
    """Its state's key has no "split" (it split by index): resumed, its committed documents kept
    the old sides and the rest took the new ones."""
    rng = random.Random(3)
    corpus = str(_corpus(tmp_path / "a.jsonl", [f"doc {i} " + _words(rng, 30) for i in range(40)]))
    real_add = ShardWriter.add

    def add(self, piece, ids):
        if self.state["documents"] >= 20:
            raise Killed
        real_add(self, piece, ids)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ShardWriter, "add", add)
        with pytest.raises(Killed):
            prepare([corpus], tokenizer, tmp_path / "out", val=0.2, batch_docs=2, commit_bytes=300)
    state_file = tmp_path / "out" / "prepare-state.json"
    state = json.loads(state_file.read_text())
    state["key"].pop("split", None)  # as gpt1 before 2026-12-07 wrote it
    state_file.write_text(json.dumps(state))
    with caplog.at_level("INFO", logger="gpt1"):
        meta = prepare([corpus], tokenizer, tmp_path / "out", val=0.2, batch_docs=2, commit_bytes=300)
    assert "holds an interrupted prepare with other settings; starting over" in caplog.text
    clean = prepare([corpus], tokenizer, tmp_path / "clean", val=0.2, batch_docs=2)
    assert meta["val"] == clean["val"]
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


def test_a_data_dir_prepared_by_an_older_gpt1_still_trains_and_is_kept_with_a_warning(
        corpus_dir, tokenizer, tmp_path, caplog):
    """Its meta.json's key has no "split": pretraining reads it as before; a rerun of its prepare
    (a quickstart folder run again after an upgrade) keeps it, saying what its split may hold,
    and --overwrite prepares it again by text."""
    from gpt1.train.config import TrainConfig, load_config
    from gpt1.train.pretrain import pretrain

    corpus, out = str(corpus_dir / "json"), tmp_path / "data"
    prepare([corpus], tokenizer, out, val=2)
    meta = json.loads((out / "meta.json").read_text())
    meta["key"].pop("split", None)  # as gpt1 before 2026-12-07 wrote it
    (out / "meta.json").write_text(json.dumps(meta))
    assert load_meta(out)["val"]["documents"] == 2
    overrides = ["model=tiny", "n_layer=1", "block_size=32", "batch_size=2", "max_steps=1", "eval_every=1",
                 "eval_batches=1", "device=cpu"]
    assert pretrain(load_config(TrainConfig, None, overrides), out, tmp_path / "run").steps == 1
    with caplog.at_level("INFO", logger="gpt1"):
        assert "split" not in prepare([corpus], tokenizer, out, val=2)["key"]
    assert [r.message for r in caplog.records if r.levelname == "WARNING"] == [
        f"{out} was split by each document's place (gpt1 before 2026-12-07): a copy of a held-out document may be "
        "in its training share, so its validation loss may be low; prepare it again (--overwrite) to split it by "
        "text, which keeps copies on one side"]
    with pytest.raises(Gpt1Error, match=r"already holds data prepared with other settings \(val"):
        prepare([corpus], tokenizer, out, val=3)  # other settings still refused
    assert prepare([corpus], tokenizer, out, val=2, overwrite=True)["key"]["split"]
    assert prepare([corpus], tokenizer, out, val=2)["val"]["documents"] == 2  # now this preparation: nothing to do


def _opening_alike(path: Path, openings: dict[str, int]) -> Path:
    """Conversations that open alike ("Hi", a canned reply) and go on each their own way."""
    with open(path, "w", encoding="utf-8") as f:
        i = 0
        for opening, count in openings.items():
            for _ in range(count):
                f.write(json.dumps({"messages": [
                    {"role": "system", "content": "You take pizza orders."}, {"role": "user", "content": opening},
                    {"role": "assistant", "content": "Hello! What would you like?"},
                    {"role": "user", "content": f"order {i}"}, {"role": "assistant", "content": f"done {i}"}]}) + "\n")
                i += 1
    return path


@pytest.mark.parametrize("seed", [0, 1, 36, 1337])
def test_conversations_that_open_alike_never_take_half_the_data_for_validation(tmp_path, seed, caplog):
    """Grouped by their root, 500 conversations opening with "Hi" and 500 with "Hello" are two
    trees: one of them, half the data, was held out at val_fraction 0.05 (91% with a skewed mix),
    silently. A tree held out stays within twice the fraction; one too big stays in training,
    named in a warning."""
    for openings in ({"Hi": 500, "Hello": 500}, {"Hi": 900, **{f"question {i}": 1 for i in range(100)}}):
        conversations = read_conversations(str(_opening_alike(tmp_path / "chat.jsonl", openings)))
        with caplog.at_level("INFO", logger="gpt1"):
            caplog.clear()
            train, val = split_conversations(conversations, 0.05, seed)
        assert len(val) <= 2 * 0.05 * len(conversations) and len(train) + len(val) == len(conversations)
        warned = [r.message for r in caplog.records if r.levelname == "WARNING"]
        if len(openings) == 2:  # neither tree fits: nothing held out, and the largest named
            assert val == [] and len(warned) == 1
            assert warned[0].startswith("500 of the 1,000 conversations (50%) are one message tree (they open alike: ")
        else:  # the big tree in training, whatever its hash; the others split as before
            assert val and all(c.messages[1]["content"] != "Hi" for c in val)
            assert all(w.startswith("900 of the 1,000 conversations (90%) are one message tree (they open alike: "
                                    "'Hi')") for w in warned)
