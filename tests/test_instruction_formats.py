"""The chat formats instruction sets ship in: ShareGPT, Alpaca (also as one JSON array, as
alpaca_data.json is), TRL's prompt/completion, each read as the same chats written as `messages`;
and the error for a file in none of them, which named no format and proposed --skip-invalid."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from gpt1.cli import main
from gpt1.core.errors import Gpt1Error
from gpt1.data.chat import encode_conversations
from gpt1.data.chat_sources import TOOL_CALLS, ChatStats, read_conversations
from gpt1.data.readers import read_json_array

SYSTEM = "You answer in one word."
# The chats of the tests, as {"messages"} records: what every other format must read as.
ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Greet me.", "input": "", "output": "Hello there"},
    {"instruction": "Name a colour.", "output": "Red", "system": SYSTEM},  # no input; a system field
    {"instruction": "Say yes.", "input": "  \n", "output": "Yes"},  # a blank input is none
]
ALPACA_AS_MESSAGES = [
    [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}],
    [{"role": "user", "content": "Greet me."}, {"role": "assistant", "content": "Hello there"}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Red"}],
    [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes"}],
]
DIALOGS = [  # several turns, a system message
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue"},
     {"role": "user", "content": "Grass?"}, {"role": "assistant", "content": "Green"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
]
SHAREGPT_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}


def write_jsonl(path: Path, records: list) -> Path:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def as_messages(path: Path, chats: list[list[dict]]) -> Path:
    return write_jsonl(path, [{"messages": chat} for chat in chats])


def read(spec: Path | str, **kwargs) -> tuple[list, ChatStats]:
    stats = ChatStats()
    return read_conversations(str(spec), stats=stats, **kwargs), stats


def assert_read_as(spec: Path | str, expected: Path, tokenizer) -> None:
    """The conversations (messages and split group) and the training sequences of `spec` are those
    of `expected`, the same chats as {"messages"} records."""
    (got, got_stats), (want, want_stats) = read(spec), read(expected)
    assert [(c.messages, c.group) for c in got] == [(c.messages, c.group) for c in want], spec
    assert (got_stats.skipped, got_stats.trimmed) == (want_stats.skipped, want_stats.trimmed)
    assert encode_conversations(tokenizer, got, 65).fingerprint() == encode_conversations(tokenizer, want, 65).fingerprint()


# ---- each format reads as the same chats written as `messages` ---------------------------------

def test_sharegpt_reads_as_the_same_messages(tmp_path, tokenizer):
    from_value = [{"conversations": [{"from": SHAREGPT_NAMES[m["role"]], "value": m["content"]} for m in chat]}
                  for chat in DIALOGS]
    assert_read_as(write_jsonl(tmp_path / "sharegpt.jsonl", from_value), as_messages(tmp_path / "m.jsonl", DIALOGS), tokenizer)
    # role/content turns, `user`/`assistant` speakers, and LLaMA-Factory's `system` field
    roles = [{"conversations": DIALOGS[0]}]
    speakers = [{"system": SYSTEM, "conversations": [{"from": m["role"], "value": m["content"]} for m in DIALOGS[0][1:]]}]
    for name, records in (("roles", roles), ("speakers", speakers)):
        assert_read_as(write_jsonl(tmp_path / f"{name}.jsonl", records), as_messages(tmp_path / "m0.jsonl", DIALOGS[:1]),
                       tokenizer)
    # A turn's weight 0 (axolotl's) keeps that reply out of the loss, as on a {"messages"} record.
    weighted = [{**m, "weight": 0} if m["content"] == "Blue" else m for m in DIALOGS[0]]
    turns = [{"from": SHAREGPT_NAMES[m["role"]], "value": m["content"], **({"weight": 0} if "weight" in m else {})}
             for m in weighted]
    assert_read_as(write_jsonl(tmp_path / "w.jsonl", [{"conversations": turns}]),
                   as_messages(tmp_path / "mw.jsonl", [weighted]), tokenizer)


def test_alpaca_reads_as_a_user_turn_and_its_reply(tmp_path, tokenizer):
    assert_read_as(write_jsonl(tmp_path / "alpaca.jsonl", ALPACA), as_messages(tmp_path / "m.jsonl", ALPACA_AS_MESSAGES),
                   tokenizer)


def test_trl_prompt_completion_reads_as_the_same_messages(tmp_path, tokenizer):
    standard = [{"prompt": chat[0]["content"], "completion": chat[1]["content"]} for chat in ALPACA_AS_MESSAGES[:2]]
    assert_read_as(write_jsonl(tmp_path / "pc.jsonl", standard), as_messages(tmp_path / "m.jsonl", ALPACA_AS_MESSAGES[:2]),
                   tokenizer)
    # The conversational form: TRL trains on the completion, so the prompt's replies are context (weight 0).
    conversational = [{"prompt": chat[:-1], "completion": chat[-1:]} for chat in DIALOGS]
    context = [[{**m, "weight": 0} if m["role"] == "assistant" else m for m in chat[:-1]] + chat[-1:] for chat in DIALOGS]
    assert_read_as(write_jsonl(tmp_path / "pcc.jsonl", conversational), as_messages(tmp_path / "mc.jsonl", context),
                   tokenizer)
    ids, mask = encode_conversations(tokenizer, read(tmp_path / "pcc.jsonl")[0], 65).sequence(0)
    assert tokenizer.decode([int(i) for i, m in zip(ids, mask) if m]) == "Green[EOS]"


def test_the_formats_read_the_same_from_datasets_folders_and_parquet(tmp_path):
    """hf: sources and save_to_disk folders go through the same record code; Arrow gives every row
    every column and every turn every key, the absent ones null."""
    datasets = pytest.importorskip("datasets")
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    want, _ = read(as_messages(tmp_path / "m.jsonl", ALPACA_AS_MESSAGES))
    columns = pa.Table.from_pylist([{"input": None, "system": None, **r} for r in ALPACA])  # (keys of the first row)
    assert columns.column("system").null_count == 3
    datasets.Dataset(columns).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "hub").mkdir()
    pq.write_table(columns, tmp_path / "hub" / "train.parquet")
    mixed_turns = [{"conversations": [{"from": "human", "value": "Hi", "role": None, "content": None},
                                      {"role": "assistant", "content": "Hello"}]}]
    pq.write_table(pa.Table.from_pylist(mixed_turns), tmp_path / "sharegpt.parquet")
    for spec in (tmp_path / "saved", f"hf:{tmp_path / 'hub'}"):
        assert [(c.messages, c.group) for c in read(spec)[0]] == [(c.messages, c.group) for c in want], spec
    assert [c.messages for c in read(tmp_path / "sharegpt.parquet")[0]] == [DIALOGS[1]]


# ---- one JSON array in a .json file ---------------------------------------------------------------

def test_a_json_file_holding_one_array_is_read(tmp_path, tokenizer):
    """alpaca_data.json (litgpt's default download) is one indented array: "expected a JSON object,
    got an array (chat files are JSON Lines ...)"."""
    messages = as_messages(tmp_path / "m.jsonl", ALPACA_AS_MESSAGES)
    array = tmp_path / "alpaca_data.json"
    array.write_text("\ufeff\n" + json.dumps(ALPACA, indent=4), encoding="utf-8")  # a byte order mark and a blank line
    assert_read_as(array, messages, tokenizer)
    with gzip.open(tmp_path / "alpaca_data.json.gz", "wt", encoding="utf-8") as f:
        json.dump(ALPACA, f)
    assert_read_as(tmp_path / "alpaca_data.json.gz", messages, tokenizer)
    assert_read_as(write_jsonl(tmp_path / "lines.json", ALPACA), messages, tokenizer)  # JSON Lines named .json: as before
    # A folder reads its .json arrays too.
    (tmp_path / "folder").mkdir()
    array.rename(tmp_path / "folder" / "a.json")
    assert len(read(tmp_path / "folder")[0]) == 4

    # Records are numbered by their index in the array, as jq '.[1]' finds them.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([ALPACA[0], {"instruction": "x", "output": 3}, ALPACA[1], "\ud800"]))
    with pytest.raises(Gpt1Error, match=r"bad\.json, record 1: field 'output': expected a string, got int "
                                        r"\(pass --skip-invalid to skip bad records\)$"):
        read(bad)
    got, stats = read(bad, skip_invalid=True)
    assert len(got) == 2 and stats.skipped == {"malformed records": 2}  # record 3: a lone surrogate
    bad.write_text("[" + json.dumps(ALPACA[0]) + ",\n{\"instruction\": }]")
    with pytest.raises(Gpt1Error, match=r"bad\.json: not one valid JSON array \(Expecting value: line 2 column 17"):
        read(bad, skip_invalid=True)
    # A .jsonl holding an array says how it is read.
    (tmp_path / "array.jsonl").write_text(json.dumps(ALPACA))
    with pytest.raises(Gpt1Error, match=r"array\.jsonl, line 1: expected a JSON object, got an array \(a file holding one "
                                        r"JSON array of records is read as such when its name ends in \.json; .*\)$"):
        read(tmp_path / "array.jsonl")


def test_a_json_array_larger_than_the_bound_is_refused_with_the_command_that_converts_it(tmp_path):
    array = tmp_path / "big data.json"
    array.write_text(json.dumps(ALPACA))
    assert len(list(read_json_array(array, max_bytes=array.stat().st_size))) == 4
    with pytest.raises(Gpt1Error, match=r"big data\.json: one JSON array of more than 100 bytes, which gpt1 would hold "
                                        r"in memory whole; write it as JSON Lines, which is read a line at a time: "
                                        r"jq -c '\.\[\]' '.*big data\.json' > '.*big data\.jsonl'$"):
        list(read_json_array(array, max_bytes=100))
    packed = tmp_path / "a.json.gz"
    packed.write_bytes(gzip.compress(array.read_bytes()))
    with pytest.raises(Gpt1Error, match=r"a\.json\.gz: one JSON array of more than 100 bytes, .*: gzip -dc \S+a\.json\.gz "
                                        r"\| jq -c '\.\[\]' > \S+a\.jsonl$"):
        list(read_json_array(packed, max_bytes=100))  # its text is larger than the bound, its file is not


# ---- refusals ---------------------------------------------------------------------------------------

def test_a_file_in_no_known_format_names_what_it_found_and_the_formats(tmp_path):
    dolly = write_jsonl(tmp_path / "dolly.jsonl", [{"instruction": "q", "context": "", "response": "a"}] * 3)
    with pytest.raises(Gpt1Error) as refused:
        read(dolly)
    message = str(refused.value)
    assert message.startswith(f"{dolly}, line 1: not a chat record that gpt1 reads: expected an OASST message"), message
    for known in ("ShareGPT record", "Alpaca record (instruction, input, output)", "prompt/completion record",
                  '{"messages": [{role, content}, ...]}'):
        assert known in message
    assert message.endswith("; found fields: context, instruction, response")  # no --skip-invalid: every line would fail
    # With --skip-invalid the first records are skipped until one decides the format, as before.
    with pytest.raises(Gpt1Error, match=r"every line was skipped \(malformed lines: 3; the first: line 1: not a chat "
                                        r"record that gpt1 reads: .*found fields: context, instruction, response\)$"):
        read(dolly, skip_invalid=True)
    write_jsonl(dolly, [{"id": 1}, *ALPACA])
    assert len(read(dolly, skip_invalid=True)[0]) == 4
    # The first record not an object: the same, without the hint
    (tmp_path / "strings.jsonl").write_text('"hello"\n"again"\n')
    with pytest.raises(Gpt1Error, match=r"strings\.jsonl, line 1: expected a JSON object, got str$"):
        read(tmp_path / "strings.jsonl")


def test_one_format_per_file_and_a_later_bad_record_keeps_the_hint(tmp_path):
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [ALPACA[0], sharegpt, ALPACA[1]])
    with pytest.raises(Gpt1Error, match=r"mixed\.jsonl, line 2: a ShareGPT record .*, in a file whose first record is an "
                                        r"Alpaca record \(instruction, input, output\): one format per file .*"
                                        r"\(pass --skip-invalid to skip bad lines\)$"):
        read(mixed)
    got, stats = read(mixed, skip_invalid=True)
    assert len(got) == 2 and stats.skipped == {"malformed lines": 1}
    write_jsonl(mixed, [ALPACA[0], {"instruction": "q", "outptu": "a"}])  # a typo: its own format's error
    with pytest.raises(Gpt1Error, match=r"line 2: missing required field 'output' \(pass --skip-invalid"):
        read(mixed)


def test_sharegpt_refusals_and_counts_are_those_of_messages(tmp_path):
    def refused(turns: list, pattern: str) -> None:
        path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "hi"}, *turns]}])
        with pytest.raises(Gpt1Error, match=r"s\.jsonl, line 1: " + pattern):
            read(path)

    refused([{"from": "bot", "value": "x"}], r"field 'conversations'\[1\]\.from: expected one of human, user, gpt, "
                                              r"assistant, system, got 'bot' \(pass --skip-invalid")
    refused([{"role": "bot", "content": "x"}], r"field 'conversations'\[1\]\.role: expected one of system, developer, "
                                               r"user, assistant, got 'bot'")
    refused([{"from": "gpt", "value": None}], r"field 'conversations'\[1\]\.value: expected a string, got NoneType")
    refused([{"from": "function_call", "value": "{}"}], r"field 'conversations'\[1\]: tool calls and tool results "
                                                        r"\('function_call'\) are not supported")
    records = [{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},  # out of turn order
               {"conversations": [{"from": "human", "value": " "}, {"from": "gpt", "value": "a"}]},  # an empty message
               {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                                  {"from": "human", "value": "unanswered"}]},  # a trailing user turn, cut
               {"conversations": [{"from": "human", "value": "q"}, {"from": "observation", "value": "{}"}]}]
    roles = {"human": "user", "gpt": "assistant"}
    as_chats = [[{"role": roles[m["from"]], "content": m["value"]} for m in r["conversations"]] for r in records[:3]]
    want, want_stats = read(as_messages(tmp_path / "m.jsonl", as_chats))
    got, stats = read(write_jsonl(tmp_path / "s.jsonl", records), skip_invalid=True)
    assert [c.messages for c in got] == [c.messages for c in want] == [as_chats[2][:2]]
    assert stats.skipped == {**want_stats.skipped, TOOL_CALLS: 1} and stats.trimmed == want_stats.trimmed
    assert len(want_stats.skipped) == 2 and sum(want_stats.trimmed.values()) == 1


def test_alpaca_and_prompt_completion_refusals(tmp_path):
    def refused(record: dict, pattern: str) -> None:
        path = write_jsonl(tmp_path / "r.jsonl", [record])
        with pytest.raises(Gpt1Error, match=r"r\.jsonl, line 1: " + pattern):
            read(path)

    refused({"instruction": "q", "input": 3, "output": "a"}, r"field 'input': expected a string, got int")
    refused({"instruction": "q", "output": "a", "system": ["x"]}, r"field 'system': expected a string, got list")
    refused({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]},
            r"fields 'prompt' and 'completion': expected two strings \(TRL's standard form\) or two lists of messages "
            r"\(its conversational form\), got str and list")
    refused({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "bot", "content": "a"}]},
            r"field 'completion'\[0\]\.role: expected one of")
    _, stats = read(write_jsonl(tmp_path / "e.jsonl", [{"instruction": "q", "output": ""}, ALPACA[0]]))
    assert stats.skipped == {"conversations with an empty message": 1}


# ---- gpt1 finetune on an Alpaca file ------------------------------------------------------------------

def test_finetune_trains_on_an_alpaca_json_file(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "alpaca_data.json"
    data.write_text(json.dumps(ALPACA * 3, indent=4))
    tiny = ["max_steps=2", "batch_size=2", "block_size=32", "eval_batches=1", "device=cpu", "lora_r=2"]
    rc = main(["finetune", "--base", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "ft"), *tiny])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"chat data {data}: 12 conversations" in err
    metrics = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m][-1] == 2
    # A file in no format gpt1 reads: one line naming the formats, without the --skip-invalid hint.
    other = write_jsonl(tmp_path / "dolly.jsonl", [{"instruction": "q", "context": "", "response": "a"}])
    rc = main(["finetune", "--base", str(tiny_model_dir), "--data", str(other), "--out", str(tmp_path / "x"), *tiny])
    err = capsys.readouterr().err
    assert rc == 2 and "line 1: not a chat record that gpt1 reads" in err and "skip-invalid" not in err, err
