"""Real-world dataset shapes for `gpt1 prepare` and `gpt1 finetune`: a hub download
folder (its card lists each split's files), configs of an `hf:` dataset, LLaMA-Factory's Alpaca
`history`, a `system` column beside `messages`, `tools`, SlimOrca's per-turn weights, JSON files
without the text field or holding one array, `load_dataset`'s cache folder, TinyStories' `.txt`
files with `<|endoftext|>` between stories, a folder of `.raw` files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpt1.core.errors import Gpt1Error
from gpt1.core.tokenizer import Tokenizer
from gpt1.data.chat import encode_conversations
from gpt1.data.chat_sources import ChatStats, hf_split_names, read_conversations
from gpt1.data.readers import PIECE_CHARS, HfSpec, parse_hf
from gpt1.data.sources import SourceStats, iter_documents, iter_pieces, resolve_sources
from tests.test_battery import run_main


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def texts(tag: str, n: int) -> list[dict]:
    return [{"text": f"{tag} paragraph {i}"} for i in range(n)]


def hub_repository(folder: Path, configs: dict[str, dict[str, list[dict]]]) -> Path:
    """A dataset repository as `huggingface-cli download` leaves it: one parquet file per split of
    each config, and a README.md whose YAML header lists them (`configs:`), with a card below it."""
    card = ["---", "configs:"]
    for config, splits in configs.items():
        card += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            (folder / config).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), folder / config / f"{split}-00000-of-00001.parquet")
            card += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    (folder / "README.md").write_text("\n".join(card) + "\n---\n\n# Dataset Card for the test\n", encoding="utf-8")
    return folder


def trained_text(tokenizer: Tokenizer, conversations, block_size: int = 256) -> list[str]:
    """The trained (loss-masked) text of each encoded conversation."""
    encoded = encode_conversations(tokenizer, conversations, block_size)
    out = []
    for i in range(len(encoded)):
        ids, mask = encoded.sequence(i)
        out.append(tokenizer.decode([int(t) for t, m in zip(ids, mask) if m]))
    return out


# ---- a hub download folder given to prepare: its train split, not every file and the card ----

def test_a_hub_download_folder_is_read_as_its_train_split(tmp_path, tokenizer_dir, capsys):
    repo = hub_repository(tmp_path / "wikitext", {"default": {
        "train": texts("TRAIN", 6), "validation": texts("VALIDATION", 3), "test": texts("TEST", 3)}})
    assert list(iter_documents([str(repo)])) == [f"TRAIN paragraph {i}" for i in range(6)]
    # prepare: the test split and the card were training text
    rc, err = run_main(capsys, "prepare", "--tokenizer", tokenizer_dir, "--out", tmp_path / "out", repo, "--val", "1")
    assert rc == 0, err
    assert f"{repo}: a dataset repository (its README.md lists the data files of each split): read as hf:{repo}:train" in err
    tokenizer = Tokenizer.load(tokenizer_dir)
    shards = "".join(tokenizer.decode(np.fromfile(tmp_path / "out" / name, dtype=np.uint16).tolist())
                     for name in ("train.bin", "val.bin"))
    assert shards.count("TRAIN paragraph") == 6 and "TEST" not in shards and "VALIDATION" not in shards
    assert "Dataset Card" not in shards
    # A newer download in its place is other data: a prepare that resumed or reused over it mixed the two.
    rc, err = run_main(capsys, "prepare", "--tokenizer", tokenizer_dir, "--out", tmp_path / "out", repo, "--val", "1")
    assert rc == 0, err  # the same files: prepared already
    hub_repository(repo, {"default": {"train": texts("NEWER", 7)}})
    rc, err = run_main(capsys, "prepare", "--tokenizer", tokenizer_dir, "--out", tmp_path / "out", repo, "--val", "1")
    assert rc == 2 and "already holds data prepared" in err, err


# ---- a config of an hf: dataset: hf:NAME[@REVISION]:CONFIG:SPLIT ----------------------------

def test_the_hf_grammar_names_a_config_with_two_parts_after_the_name(tmp_path, monkeypatch):
    assert parse_hf("hf:Salesforce/wikitext:wikitext-2-raw-v1:test") == HfSpec(
        "Salesforce/wikitext", None, "test", "wikitext-2-raw-v1")
    assert parse_hf("hf:a/b@refs/convert/parquet:cfg:train") == HfSpec("a/b", "refs/convert/parquet", "train", "cfg")
    assert parse_hf("hf:a/b:cfg:") == HfSpec("a/b", None, None, "cfg")  # the caller's split of cfg
    assert parse_hf("hf:a/b:validation") == HfSpec("a/b", None, "validation")  # one part: the split, as before
    assert str(HfSpec("a/b", "v1", None, "cfg")) == "hf:a/b@v1:cfg:train"
    with pytest.raises(Gpt1Error, match=r"expected hf:NAME\[@REVISION\]\[:SPLIT\] or hf:NAME\[@REVISION\]:CONFIG:SPLIT"):
        parse_hf("hf:a/b:c:d:e")
    # A local folder whose name holds ':' or '@' (a Windows drive, C:\data) is its whole path when it exists.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs:2026").mkdir()
    (tmp_path / "me@host").mkdir()
    assert parse_hf("hf:runs:2026:validation") == HfSpec("runs:2026", None, "validation")
    assert parse_hf("hf:me@host") == HfSpec("me@host")


def test_a_dataset_of_several_configs_names_them_and_reads_the_one_named(tmp_path, capsys, tokenizer_dir):
    rows = {"wikitext-2": {"train": texts("SMALL", 3), "validation": texts("SMALL-VAL", 2)},
            "wikitext-103": {"train": texts("LARGE", 4), "validation": texts("LARGE-VAL", 2)}}
    for records in (r for splits in rows.values() for r in splits.values()):  # text for prepare, chats for finetune
        for r in records:
            r["messages"] = [{"role": "user", "content": r["text"]}, {"role": "assistant", "content": "ok"}]
    repo = hub_repository(tmp_path / "wt", rows)
    configs = r"the dataset has several configs \(subsets\): wikitext-2, wikitext-103; name one as " \
              r"hf:NAME\[@REVISION\]:CONFIG:SPLIT, e\.g\. hf:\S*wt:wikitext-2:train"  # in the card's order
    for read in (lambda: list(iter_documents([f"hf:{repo}"])), lambda: list(iter_documents([str(repo)])),
                 lambda: read_conversations(f"hf:{repo}"), lambda: hf_split_names(f"hf:{repo}")):
        with pytest.raises(Gpt1Error, match=configs):
            read()
    with pytest.raises(Gpt1Error, match=r"has no config 'nope' \(configs: wikitext-2, wikitext-103\); name one"):
        list(iter_documents([f"hf:{repo}:nope:train"]))
    assert list(iter_documents([f"hf:{repo}:wikitext-2:train"])) == [f"SMALL paragraph {i}" for i in range(3)]
    assert list(iter_documents([f"hf:{repo}:wikitext-103:validation"])) == ["LARGE-VAL paragraph 0",
                                                                            "LARGE-VAL paragraph 1"]
    # finetune's reading: the config's splits, its validation split as the held-out one
    assert hf_split_names(f"hf:{repo}:wikitext-2:") == ["train", "validation"]
    conversations = read_conversations(f"hf:{repo}:wikitext-103:", "validation")
    assert [c.messages[0]["content"] for c in conversations] == ["LARGE-VAL paragraph 0", "LARGE-VAL paragraph 1"]
    rc, err = run_main(capsys, "prepare", "--tokenizer", tokenizer_dir, "--out", tmp_path / "o", f"hf:{repo}", "--val", "1")
    assert rc == 2 and "the dataset has several configs (subsets)" in err and "Traceback" not in err


# ---- chat records: history, a system column, tools, per-turn weights ------------------

def test_llama_factory_history_is_the_turns_before_the_instruction(tmp_path, tokenizer):
    record = {"instruction": "Thanks", "input": "", "output": "You're welcome!", "system": "Be kind.",
              "history": [["Write me a plan", "First, read the posting."], ["For Microsoft?", "Yes, their site."]]}
    path = write_jsonl(tmp_path / "lf.jsonl", [record, {**record, "history": None}])
    with_history, without = read_conversations(str(path))
    assert with_history.messages == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Write me a plan"}, {"role": "assistant", "content": "First, read the posting."},
        {"role": "user", "content": "For Microsoft?"}, {"role": "assistant", "content": "Yes, their site."},
        {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You're welcome!"}]
    assert len(without.messages) == 3
    # every reply is trained, as LLaMA-Factory trains them
    assert trained_text(tokenizer, [with_history]) == [
        "First, read the posting.[EOS]Yes, their site.[EOS]You're welcome![EOS]"]
    for history, error in (([["only a prompt"]], r"'history'\[0\]: expected a \[prompt, reply\] pair of strings, got a list of 1"),
                           ([["q", "a"], "q2"], r"'history'\[1\]: expected a \[prompt, reply\] pair of strings, got str"),
                           ([["q", 7]], r"'history'\[0\]\[1\]"),
                           ("q", r"field 'history': expected a list of \[prompt, reply\] pairs, got str")):
        bad = write_jsonl(tmp_path / "bad.jsonl", [{**record, "history": history}])
        with pytest.raises(Gpt1Error, match=r"bad.jsonl, line 1: field " + error.removeprefix("field ")):
            read_conversations(str(bad))


def test_a_system_column_beside_messages_is_the_system_message(tmp_path):
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr, hello!"}]
    pirate = {"role": "system", "content": "You are a pirate."}
    path = write_jsonl(tmp_path / "sys.jsonl", [
        {"system": "You are a pirate.", "messages": turns},
        {"system": "You are a pirate.", "messages": [pirate, *turns]},  # the same one twice: taken once
        {"system": None, "messages": turns},
        {"system": "", "messages": [pirate, *turns]}])
    assert [c.messages for c in read_conversations(str(path))] == [[pirate, *turns]] * 2 + [turns, [pirate, *turns]]
    # the same for ShareGPT's system field
    sharegpt = write_jsonl(tmp_path / "sg.jsonl", [{"system": "You are a pirate.", "conversations": [
        {"from": "system", "value": "You are a pirate."}, {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Arr, hello!"}]}])
    assert read_conversations(str(sharegpt))[0].messages == [pirate, *turns]
    differ = write_jsonl(tmp_path / "differ.jsonl", [
        {"system": "You are a pirate.", "messages": [{"role": "system", "content": "Be brief."}, *turns]},
        {"messages": turns}])
    with pytest.raises(Gpt1Error, match=r"differ.jsonl, line 1: a 'system' field and a different system message "
                                        r"\(field 'messages'\[0\]\): one system message per conversation"):
        read_conversations(str(differ))
    stats = ChatStats()
    assert len(read_conversations(str(differ), skip_invalid=True, stats=stats)) == 1
    assert stats.skipped["malformed lines"] == 1


def test_a_tools_field_without_tool_calls_is_ignored_counted_and_said(tmp_path, caplog):
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    tools = [{"type": "function", "function": {"name": "calc", "parameters": {}}}]
    path = write_jsonl(tmp_path / "tools.jsonl", [{"messages": turns, "tools": tools}, {"messages": turns, "tools": None},
                                                  {"messages": turns, "tools": tools}])
    stats = ChatStats()
    with caplog.at_level("WARNING", logger="gpt1"):
        conversations = read_conversations(str(path), stats=stats)
    assert [c.messages for c in conversations] == [turns] * 3
    assert sum(stats.trimmed.values()) == 2
    assert "tools.jsonl: 'tools' (the functions a model may call) on 2 records is ignored" in caplog.text
    caplog.clear()
    sharegpt = write_jsonl(tmp_path / "lf.jsonl", [{"conversations": [{"from": "human", "value": "Hi"}, {
        "from": "gpt", "value": "Hello"}], "system": "Sys.", "tools": '[{"name": "calc"}]'}])
    with caplog.at_level("WARNING", logger="gpt1"):
        assert read_conversations(str(sharegpt))[0].messages[0] == {"role": "system", "content": "Sys."}
    assert "on 1 record is ignored" in caplog.text


def test_slimorca_weights_on_every_turn_read_and_weight_0_replies_stay_untrained(tmp_path, tokenizer):
    slimorca = [{"conversations": [{"from": "system", "value": "You are an AI assistant.", "weight": None},
                                   {"from": "human", "value": "What is 2+2?", "weight": 0.0},
                                   {"from": "gpt", "value": "It is 4.", "weight": 1.0}]},
                {"conversations": [{"from": "human", "value": "Name a color.", "weight": 0},
                                   {"from": "gpt", "value": "Not learned.", "weight": 0.0},
                                   {"from": "human", "value": "Another?", "weight": 0.0},
                                   {"from": "gpt", "value": "Blue.", "weight": 1}]}]
    conversations = read_conversations(str(write_jsonl(tmp_path / "slimorca.jsonl", slimorca)))
    assert conversations[0].messages == [{"role": "system", "content": "You are an AI assistant."},
                                         {"role": "user", "content": "What is 2+2?"},
                                         {"role": "assistant", "content": "It is 4."}]
    assert trained_text(tokenizer, conversations) == ["It is 4.[EOS]", "Blue.[EOS]"]
    # the same from parquet (a struct column: every turn has every key)
    pq.write_table(pa.Table.from_pylist(slimorca), tmp_path / "slimorca.parquet")
    assert [c.messages for c in read_conversations(str(tmp_path / "slimorca.parquet"))] == [
        c.messages for c in conversations]
    # a weight other than 0 on a turn that is never trained is still refused
    trained_user = write_jsonl(tmp_path / "user1.jsonl", [{"conversations": [
        {"from": "human", "value": "q", "weight": 1.0}, {"from": "gpt", "value": "a", "weight": 1.0}]}])
    with pytest.raises(Gpt1Error, match=r"field 'conversations'\[0\]\.weight: applies to assistant messages only .*a "
                                        r"'user' message is never trained, so its weight can only be 0, got 1\.0"):
        read_conversations(str(trained_user))


# ---- text JSON files: a first record without the field, one array of records -------------

def test_a_first_record_without_the_text_field_names_its_fields_and_text_field(tmp_path, capsys, tokenizer_dir):
    code = write_jsonl(tmp_path / "starcoder.jsonl", [{"content": f"def f{i}(): pass", "lang": "Python"} for i in range(4)])
    message = r"starcoder.jsonl, line 1: no field 'text' \(fields: content, lang\): the first record says the file's " \
              r"layout, so --skip-invalid would skip every record; name the field of text with --text-field$"
    for skip_invalid in (False, True):
        with pytest.raises(Gpt1Error, match=message):
            list(iter_documents([str(code)], skip_invalid=skip_invalid))
    assert list(iter_documents([str(code)], text_field="content"))[0] == "def f0(): pass"
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(Gpt1Error, match=r"fields: messages\).*--text-field; it holds chat records: gpt1 finetune --data"):
        list(iter_documents([str(chat)]))
    # a later record without it is a malformed line, as before
    later = write_jsonl(tmp_path / "later.jsonl", [{"text": "a"}, {"content": "b"}, {"text": "c"}])
    with pytest.raises(Gpt1Error, match=r"later.jsonl, line 2: missing field 'text' \(pass --skip-invalid"):
        list(iter_documents([str(later)]))
    assert list(iter_documents([str(later)], skip_invalid=True)) == ["a", "c"]
    pq.write_table(pa.table({"content": ["x", "y"], "lang": ["Python"] * 2}), tmp_path / "the-stack.parquet")
    rc, err = run_main(capsys, "prepare", "--tokenizer", tokenizer_dir, "--out", tmp_path / "o", tmp_path / "the-stack.parquet")
    assert rc == 2 and err.strip().endswith(
        "the-stack.parquet: no column 'text' (columns: content, lang): name the column of text with --text-field")


def test_a_json_file_holding_one_array_of_records_is_read_as_datasets_reads_it(tmp_path, capsys, tokenizer_dir):
    records = [{"text": f"document {i}", "id": i} for i in range(5)]
    array = tmp_path / "array.json"
    array.write_text(json.dumps(records, indent=2), encoding="utf-8")
    assert list(iter_documents([str(array)])) == [f"document {i}" for i in range(5)]
    datasets = pytest.importorskip("datasets")
    assert [r["text"] for r in datasets.load_dataset("json", data_files=str(array), split="train",
                                                     streaming=True)] == list(iter_documents([str(array)]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"text": "a"}, {"text": 3}, {"text": "c"}]), encoding="utf-8")
    with pytest.raises(Gpt1Error, match=r"bad.json, record 1: field 'text' must be a string, got int \(pass --skip-invalid"):
        list(iter_documents([str(bad)]))
    stats = SourceStats()
    assert list(iter_documents([str(bad)], skip_invalid=True, stats=stats)) == ["a", "c"]
    assert stats.skipped == {"malformed records": 1}
    rc, err = run_main(capsys, "prepare", "--tokenizer", tokenizer_dir, "--out", tmp_path / "o", array)
    assert rc == 0 and "prepared 5 documents" in err, err


# ---- load_dataset's cache folder -----------------------------------------------------------

def test_a_load_dataset_cache_folder_is_named_as_such_with_its_hf_spec(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = write_jsonl(tmp_path / "corpus.jsonl", texts("CACHED", 4))
    datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(tmp_path / "cache"))
    info = next((tmp_path / "cache").rglob("dataset_info.json"))
    assert list(info.parent.glob("*.arrow"))
    for folder in (tmp_path / "cache", info.parent):
        with pytest.raises(Gpt1Error, match=r"a folder of `datasets`' own files \(.arrow files beside dataset_info.json: "
                                            rf"load_dataset's cache, or save_to_disk's\), not text files: read it as "
                                            rf"hf:{info.parent}$"):
            resolve_sources([str(folder)])
    assert list(iter_documents([f"hf:{info.parent}"])) == [f"CACHED paragraph {i}" for i in range(4)]
    # and as chat data: its dataset_info.json was read as a chat file
    with pytest.raises(Gpt1Error, match=rf"holds a folder of `datasets`' own files .*, not chat files: read it as "
                                        rf"hf:{info.parent}$"):
        read_conversations(str(tmp_path / "cache"))


# ---- <|endoftext|> between the documents of a .txt file -----------------------------------

def test_endoftext_ends_a_document_in_a_txt_file(tmp_path, caplog, capsys, tokenizer_dir):
    stories = [f"Once upon a time there was a cat number {i}.\n\nThe cat was happy." for i in range(4)]
    train = tmp_path / "TinyStoriesV2-GPT4-train.txt"
    train.write_text("\n<|endoftext|>\n".join(stories) + "\n<|endoftext|>\n", encoding="utf-8")
    with caplog.at_level("INFO", logger="gpt1"):
        assert list(iter_documents([str(train)])) == stories
    assert "<|endoftext|> (GPT-2's end of text, as TinyStories' .txt files separate their stories) ends a document" \
        in caplog.text
    # inline, at the start, twice in a row: the text between two is a document, none without text
    inline = tmp_path / "inline.txt"
    inline.write_text("<|endoftext|>one<|endoftext|><|endoftext|>\n<|endoftext|>two\n\n<|endoftext|>three", encoding="utf-8")
    assert list(iter_documents([str(inline)])) == ["one", "two\n", "three"]
    # another kind of text file (code, docs about GPT-2's tokens) keeps it as text
    doc = tmp_path / "tokens.md"
    doc.write_text("GPT-2 ends a text with <|endoftext|>.\n", encoding="utf-8")
    assert list(iter_documents([str(doc)])) == ["GPT-2 ends a text with <|endoftext|>.\n"]
    # prepare: no literal separator in the shards, an [EOS] after each story
    valid = tmp_path / "valid.txt"
    valid.write_text("A short story.\n<|endoftext|>\nAnother one.\n", encoding="utf-8")
    rc, err = run_main(capsys, "prepare", "--tokenizer", tokenizer_dir, "--out", tmp_path / "o", train, valid, "--val", "1")
    assert rc == 0 and "prepared 6 documents" in err, err
    tokenizer = Tokenizer.load(tokenizer_dir)
    ids = np.concatenate([np.fromfile(tmp_path / "o" / n, dtype=np.uint16) for n in ("train.bin", "val.bin")])
    assert "<|endoftext|>" not in tokenizer.decode(ids.tolist()) and int((ids == tokenizer.eos_id).sum()) == 6


def test_a_separator_across_two_pieces_of_a_long_txt_file_is_found(tmp_path, tokenizer):
    # No place to cut before PIECE_CHARS ("\n\n" is no boundary), so the first piece ends inside the separator.
    first = "x" * (PIECE_CHARS - 10) + "\n"
    path = tmp_path / "long.txt"
    path.write_text(first + "\n<|endoftext|>\n" + "y" * 100, encoding="utf-8")
    pieces = list(iter_pieces([str(path)]))
    assert "".join(p.text for p in pieces) == first + "y" * 100
    assert [p.ends_document for p in pieces][-1] and list(iter_documents([str(path)])) == [first, "y" * 100]
    # a long document's pieces still tokenize as the whole does
    story = " ".join(f"word{i}" for i in range(PIECE_CHARS // 5))
    path.write_text(story + "\n<|endoftext|>\nThe end.", encoding="utf-8")
    pieces = list(iter_pieces([str(path)]))
    assert len(pieces) > 2 and [p.ends_document for p in pieces].count(True) == 2
    joined = [i for p in pieces[:-1] for i in tokenizer.encode(p.text)]
    assert joined == tokenizer.encode(story)


# ---- a folder of files of an unknown suffix ---------------------------------------------

def test_a_folder_of_raw_files_says_that_naming_them_reads_them(tmp_path):
    folder = tmp_path / "wikitext-2-raw"
    folder.mkdir()
    for split in ("test", "train", "valid"):
        (folder / f"wiki.{split}.raw").write_text(" = Valkyria = \n", encoding="utf-8")
    with pytest.raises(Gpt1Error, match=r"directory has no text files \(looked for .*\); a file named on its own is "
                                        r"read as text whatever its suffix \(\S+wiki.test.raw\), and so are the files "
                                        r"of a pattern that ends in theirs \(\S+wikitext-2-raw/\*.raw\)"):
        resolve_sources([str(folder)])
    assert [s.kind for s in resolve_sources([str(folder / "wiki.train.raw"), str(folder / "*.raw")])] == ["text"] * 4


def test_one_tinystories_txt_file_is_a_corpus(tmp_path, tokenizer_dir, capsys):
    """One .txt file of stories separated by <|endoftext|> is several documents: it was refused
    before it was read, as a corpus of 1 document."""
    from tests.test_battery import run_main

    story_file = tmp_path / "TinyStoriesV2-GPT4-train.txt"
    story_file.write_text("\n<|endoftext|>\n".join(f"Story {i}: once upon a time." for i in range(5)), encoding="utf-8")
    code, err = run_main(capsys, "prepare", "--tokenizer", tokenizer_dir, "--out", tmp_path / "o", story_file)
    assert code == 0 and "prepared 5 documents" in err, err
