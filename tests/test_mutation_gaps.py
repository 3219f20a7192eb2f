"""Behaviours the docs promise that no test held (pass 16's mutation testing: each test here
fails on a mutant that survived the suite, named in its comment), and two bugs found with them:
`--skip-invalid` let a compressed or mid-sized text file with invalid UTF-8 at its end stop the
run, and a chat file whose path names two splits was said to name none."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpt1.cli import main
from gpt1.core.errors import Gpt1Error
from gpt1.core.lora import LoRAConfig, inject_lora, read_adapter_config, save_adapter
from gpt1.core.model import GPT
from gpt1.core.sampling_params import SamplingParams
from gpt1.data.chat_sources import ChatStats, hf_split_names, read_conversations
from gpt1.data.readers import PIECE_CHARS, READ_BYTES, BadRecord
from gpt1.data.shards import prepare
from gpt1.data.sources import SourceStats, iter_documents
from gpt1.formats.gguf import export_gguf
from gpt1.inference.decoding import TextState, chat_prompt_ids
from gpt1.serve import background_server, create_app

INVALID_UTF8 = "files with invalid UTF-8"


# ---- --skip-invalid skips a text file whole, wherever its bad byte lies (S04, S05) ------------------

# More than the first read (READ_BYTES) of text before the bad byte: pieces went on before it was met.
LONG_THEN_BAD = b"word " * (READ_BYTES // 5 + 20_000) + b"\xe9 bad\n"


@pytest.mark.parametrize("suffix, opener", [(".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open)])
def test_skip_invalid_skips_a_compressed_file_whose_bad_byte_lies_past_the_first_piece(tmp_path, suffix, opener):
    # A few hundred bytes of .bz2 or .xz hold megabytes of text: the file's size on disk says nothing.
    path = tmp_path / f"doc.txt{suffix}"
    with opener(path, "wb") as f:
        f.write(LONG_THEN_BAD)
    (tmp_path / "good.txt").write_text("fine text")
    stats = SourceStats()
    assert list(iter_documents([str(tmp_path)], skip_invalid=True, stats=stats)) == ["fine text"]
    assert stats.skipped == {INVALID_UTF8: 1} and stats.documents == 1
    with pytest.raises(BadRecord, match=rf"doc\.txt\{suffix}: invalid UTF-8 at byte offset {len(LONG_THEN_BAD) - 6} "
                                        r"\(convert the file to UTF-8, or pass --skip-invalid"):
        list(iter_documents([str(path)]))


def write_truncated_corpus(folder):
    """A folder of two good files and a text file of more than one piece (but under READ_BYTES)
    whose last character was cut off (`head -c`, an interrupted download): its last byte starts
    a character that never ends, which only the decoder's final flush finds."""
    folder.mkdir()
    (folder / "good.txt").write_text("fine text " * 100)
    (folder / "more.txt").write_text("more fine text " * 100)
    (folder / "bad.txt").write_bytes(b"word " * (PIECE_CHARS // 5 + 1000) + b"\xe2")
    return folder


def test_skip_invalid_skips_a_text_file_whose_last_character_is_cut(tmp_path):
    corpus = write_truncated_corpus(tmp_path / "corpus")
    stats = SourceStats()
    docs = list(iter_documents([str(corpus)], skip_invalid=True, stats=stats))
    assert docs == ["fine text " * 100, "more fine text " * 100] and stats.skipped == {INVALID_UTF8: 1}
    with pytest.raises(BadRecord, match=rf"bad\.txt: invalid UTF-8 at byte offset {(PIECE_CHARS // 5 + 1000) * 5} "
                                        r"\(convert the file to UTF-8"):
        list(iter_documents([str(corpus)]))


def test_prepare_and_tokenizer_train_skip_a_cut_text_file_with_skip_invalid(tmp_path, tokenizer_dir, capsys):
    corpus = write_truncated_corpus(tmp_path / "corpus")
    assert main(["prepare", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "d"),
                 "--skip-invalid", "--val", "1"]) == 0
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["skipped"] == {INVALID_UTF8: 1} and meta["train"]["documents"] + meta["val"]["documents"] == 2
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "270", "--out", str(tmp_path / "tok"),
                 "--skip-invalid"]) == 0
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["prepare", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "e"),
                 "--val", "1"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("gpt1 prepare: error: ") and "bad.txt: invalid UTF-8 at byte offset" in error


# ---- parquet and hf: columns (S13, R23, R20) --------------------------------------------------------

def test_a_dataset_without_the_text_field_is_one_error_not_null_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"content": ["a", "b", "c"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(Gpt1Error, match=r"field 'text' is missing: .* --text-field \(fields: content\)"):
        list(iter_documents([f"hf:{tmp_path / 'ds'}"]))


def test_a_parquet_file_without_the_text_column_is_one_line(tmp_path):
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "nocol.parquet")
    with pytest.raises(Gpt1Error, match=r"nocol\.parquet: no column 'text' \(columns: content\): name the column of text with --text-field$"):
        list(iter_documents([str(tmp_path / "nocol.parquet")]))


def test_a_bad_parquet_row_after_the_first_batch_is_named_by_its_row(tmp_path):
    # Writers other than pyarrow do not check UTF-8: such a string is built from its bytes here.
    values = [f"doc {i}".encode() for i in range(5000)]
    values[4500] = b"bad caf\xe9"
    strings = pa.Array.from_buffers(pa.string(), len(values), pa.array(values, type=pa.binary()).buffers())
    pq.write_table(pa.table({"text": strings}), tmp_path / "rows.parquet")
    with pytest.raises(BadRecord, match=r"rows\.parquet, row 4,500: invalid UTF-8 in column 'text'"):
        list(iter_documents([str(tmp_path / "rows.parquet")]))


# ---- JSON, YAML and file types (R19, R32, R28) ------------------------------------------------------

def test_a_lone_low_surrogate_escape_is_refused_with_file_and_line(tmp_path):
    (tmp_path / "low.jsonl").write_text('{"text": "fine"}\n{"text": "a\\udc00b"}\n')
    with pytest.raises(BadRecord, match=r"low\.jsonl, line 2: a lone surrogate escape \(\\udc00\)"):
        list(iter_documents([str(tmp_path / "low.jsonl")]))


def test_a_yaml_error_names_its_line(tmp_path):
    (tmp_path / "bad.yml").write_text("conversations:\n- - hi\n  - a: b: c\n- - ok\n")
    with pytest.raises(Gpt1Error, match=r"bad\.yml: not valid YAML at line 3, column 9"):
        read_conversations(str(tmp_path / "bad.yml"))


def test_a_text_file_starting_with_bzip2s_magic_is_text(tmp_path):
    (tmp_path / "notes.txt").write_text("BZh is how the notes begin.\n")
    assert list(iter_documents([str(tmp_path / "notes.txt")])) == ["BZh is how the notes begin.\n"]


# ---- prepare's validation split (SH01, SH07) --------------------------------------------------------

def test_no_token_is_lost_when_the_smallest_document_moves_to_validation(tmp_path, tokenizer):
    # --val so small that no document falls under it: the one with the smallest hash is moved out
    # of train.bin, which is copied around it.
    docs = [f"document number {k} says hello" for k in range(8)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    meta = prepare([str(tmp_path / "c.jsonl")], tokenizer, tmp_path / "out", val=1e-9)

    def documents(split: str) -> list[str]:
        ids = np.fromfile(tmp_path / "out" / f"{split}.bin", dtype=meta["dtype"])
        assert len(ids) == meta[split]["tokens"]
        cuts = np.flatnonzero(ids == tokenizer.eos_id)
        return [tokenizer.decode(part.tolist()) for part in np.split(ids, cuts + 1) if len(part)]

    train, val = documents("train"), documents("val")
    assert len(val) == 1 and sorted(d.removesuffix(tokenizer.decode([tokenizer.eos_id])) for d in train + val) \
        == sorted(docs)


def test_as_many_text_files_as_val_holds_out_are_refused_before_reading(tmp_path, tokenizer):
    (tmp_path / "c").mkdir()
    for k in range(3):
        (tmp_path / "c" / f"{k}.txt").write_text(f"text {k}")
    with pytest.raises(Gpt1Error, match=r"every one of the 3 documents would go to validation \(--val 3\).*"
                                        r"a text file is one document"):
        prepare([str(tmp_path / "c")], tokenizer, tmp_path / "out", val=3)


# ---- chat folders: split names (C12, C11) -----------------------------------------------------------

def chat_record(i: int) -> str:
    return json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                    {"role": "assistant", "content": f"a{i}"}]}) + "\n"


def write_chat_folder(folder, names: list[str]):
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(chat_record(i))
    return str(folder)


def test_digits_in_chat_file_names_separate_words_as_in_datasets(tmp_path):
    folder = write_chat_folder(tmp_path, ["train01.jsonl", "valid01.jsonl"])
    assert hf_split_names(folder) == ["train", "validation"]
    assert [c.messages[0]["content"] for c in read_conversations(folder, "train")] == ["q0"]
    assert [c.messages[0]["content"] for c in read_conversations(folder, "validation")] == ["q1"]


def test_a_chat_file_whose_path_names_two_splits_is_said_to(tmp_path):
    folder = write_chat_folder(tmp_path, ["train/test_part.jsonl", "validation/x.jsonl"])
    with pytest.raises(Gpt1Error, match=r"a file names more than one split \(train/test_part\.jsonl: train and test\); "
                                        r"name each file for one split"):
        read_conversations(folder, "train")


# ---- OASST trees: nothing duplicated, nothing replaced silently (C02, C14) --------------------------

def write_messages(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps({"message_tree_id": "t", **row}) + "\n" for row in rows))
    return str(path)


def test_two_unanswered_follow_ups_give_one_conversation_with_all_paths(tmp_path):
    path = write_messages(tmp_path / "tree.messages.jsonl", [
        dict(message_id="p", parent_id=None, role="prompter", text="hi"),
        dict(message_id="a", parent_id="p", role="assistant", text="hello"),
        dict(message_id="u1", parent_id="a", role="prompter", text="more?"),
        dict(message_id="u2", parent_id="a", role="prompter", text="again?")])
    conversations = read_conversations(path, all_paths=True)
    assert [[m["content"] for m in c.messages] for c in conversations] == [["hi", "hello"]]


def test_a_duplicate_message_id_keeps_the_first_and_is_counted(tmp_path):
    path = write_messages(tmp_path / "dup.messages.jsonl", [
        dict(message_id="p", parent_id=None, role="prompter", text="hi"),
        dict(message_id="a", parent_id="p", role="assistant", text="first reply"),
        dict(message_id="a", parent_id="p", role="assistant", text="EDITED reply")])
    stats = ChatStats()
    assert [c.messages[-1]["content"] for c in read_conversations(path, stats=stats)] == ["first reply"]
    assert stats.skipped["duplicate message ids"] == 1


# ---- the server's request mapping at its edges (M02, M08, M05) --------------------------------------

@pytest.fixture(scope="module")
def server(llm):
    with background_server(create_app(llm)) as url:
        yield url


def complete(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": "x", **body}, timeout=60)


def test_a_prompt_of_exactly_the_context_is_context_length_exceeded(server, llm):
    # No room for one token: OpenAI's error (LiteLLM's fallback matches its sentence), not gpt1's field name.
    context = llm.config.block_size
    r = complete(server, {"prompt": [5] * context})
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "context_length_exceeded", error
    assert error["message"].startswith(f"This model's maximum context length is {context} tokens")


def test_usage_counts_every_prompt_of_a_request(server):
    r = complete(server, {"prompt": [[5] * 10, [6] * 20], "max_tokens": 1})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 30


def test_a_token_id_equal_to_the_vocabulary_size_is_named_by_its_prompt(server, llm):
    vocab = llm.config.vocab_size
    r = complete(server, {"prompt": [5, vocab], "max_tokens": 1})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "prompt", error
    assert error["message"].startswith("prompt[0]: ") and str(vocab) in error["message"]


# ---- decoding edges (D03, D07) ----------------------------------------------------------------------

def test_a_conversation_that_exactly_fills_the_budget_keeps_every_message(tokenizer):
    messages = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "how are you"}]
    whole = chat_prompt_ids(tokenizer, messages, 10_000, SamplingParams(max_new_tokens=16)).ids
    fitted = chat_prompt_ids(tokenizer, messages, len(whole) + 4,  # the budget, block_size - 4, is the prompt
                             SamplingParams(max_new_tokens=4, truncate_prompt=True))
    assert (fitted.ids, fitted.dropped) == (whole, 0)


def test_a_reply_finishes_a_character_the_prompt_left_half_done_over_two_tokens(tokenizer):
    byte_id = {b[0]: i for i, b in enumerate(tokenizer.bytes_table) if len(b) == 1}
    emoji = "😀".encode()  # F0 9F 98 80: the prompt ends in its first two bytes, the reply gives the rest
    state = TextState(tokenizer, (), [byte_id[ord("a")], byte_id[emoji[0]], byte_id[emoji[1]]], limit=10)
    assert state.add(byte_id[emoji[2]]) + state.add(byte_id[emoji[3]]) + state.finish("length") == "😀"


# ---- exports: GGUF metadata and tensor types, PEFT's lora_alpha (G01, G04, L08) --------------------

def test_gguf_keeps_position_embeddings_f32_and_names_the_end_of_turn_token(tmp_path, tiny_model_dir, tokenizer):
    reader_module = pytest.importorskip("gguf")
    out = export_gguf(tiny_model_dir, tmp_path / "m.gguf", "f16")
    reader = reader_module.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["position_embd.weight"] == "F32" and types["token_embd.weight"] == "F16"
    eot = reader.fields["tokenizer.ggml.eot_token_id"]
    assert int(eot.parts[-1][0]) == tokenizer.token_to_id("<|user|>")


def test_a_non_integer_lora_alpha_is_written_as_it_is(tmp_path, tiny_config):
    model = inject_lora(GPT(tiny_config), LoRAConfig(r=4, alpha=12.5))
    save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["lora_alpha"] == 12.5
    assert read_adapter_config(tmp_path / "adapter").alpha == 12.5
