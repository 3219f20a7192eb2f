"""Bad input, fifth round: weights that load but compute garbage (NaN in a LoRA adapter, integer
tensors), byte order marks at the start of source files, and the tokenizer's empty-corpus error
after --skip-invalid skipped everything. Same style as tests/test_battery.py: `gpt1.cli.main`
in-process, one clear line on stderr."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gpt1.data.chat_sources import read_conversations
from gpt1.data.readers import BadRecord, read_text
from gpt1.data.sources import iter_documents
from gpt1.formats.modeldir import load_model
from tests.test_battery import _with_adapter, assert_one_clear_line, run_main

BOM = b"\xef\xbb\xbf"


def _edit_weights(file: Path, edit) -> None:
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()  # an adapter's gpt1_lora settings
    weights = load_file(str(file))
    edit(weights)
    save_file(weights, str(file), metadata=metadata)


# ---- weights that load but compute garbage -------------------------------------------------

def test_an_adapter_with_nan_or_inf_is_refused(tiny_model_dir, tmp_path, capsys):
    """A NaN in adapter_model.safetensors loaded: generate printed empty text, export wrote NaN weights."""
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    model = _with_adapter(tiny_model_dir, tmp_path, "nan")
    _edit_weights(model / "adapter" / "adapter_model.safetensors", lambda w: w[key].__setitem__((0, 0), float("nan")))
    pattern = rf"nan/adapter/adapter_model.safetensors: {re.escape(key)} holds NaN or infinite values: the adapter is broken"
    assert_one_clear_line(*run_main(capsys, "generate", "--model", model, "--prompt", "hi", "--max-new-tokens", "2"), pattern)
    assert_one_clear_line(*run_main(capsys, "export", "--model", model, "--out", tmp_path / "hf"), pattern)
    assert not (tmp_path / "hf").exists()
    # the trained token rows too
    model = _with_adapter(tiny_model_dir, tmp_path, "inf")
    key = "base_model.model.transformer.wte.token_adapter.trainable_tokens_delta"
    _edit_weights(model / "adapter" / "adapter_model.safetensors", lambda w: w[key].__setitem__((1, 2), float("inf")))
    assert_one_clear_line(*run_main(capsys, "generate", "--model", model, "--prompt", "hi", "--max-new-tokens", "2"),
                          rf"{re.escape(key)} holds NaN or infinite values")


def test_integer_weights_are_refused_and_other_float_dtypes_load(tiny_model_dir, tmp_path, capsys):
    """int32 tensors in model.safetensors were converted silently on load: gibberish output."""
    model = tmp_path / "int"
    shutil.copytree(tiny_model_dir, model)
    _edit_weights(model / "model.safetensors", lambda w: w.update({k: (v * 100).to(torch.int32) for k, v in w.items()}))
    assert_one_clear_line(*run_main(capsys, "generate", "--model", model, "--prompt", "hi", "--max-new-tokens", "2"),
                          r"int/model.safetensors: [\w.]+ holds int32 numbers, expected floating-point weights")
    # one integer tensor in an adapter
    model = _with_adapter(tiny_model_dir, tmp_path, "int-adapter")
    key = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"
    _edit_weights(model / "adapter" / "adapter_model.safetensors", lambda w: w.update({key: w[key].to(torch.int64)}))
    assert_one_clear_line(*run_main(capsys, "export", "--model", model, "--out", tmp_path / "hf"),
                          rf"adapter_model.safetensors: {re.escape(key)} holds int64 numbers")
    # fp16, bf16 and f64 files stay accepted (converted on load)
    expected = load_model(tiny_model_dir).state_dict()
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        model = tmp_path / str(dtype)
        shutil.copytree(tiny_model_dir, model)
        _edit_weights(model / "model.safetensors", lambda w: w.update({k: v.to(dtype) for k, v in w.items()}))
        got = load_model(model).state_dict()
        assert all(torch.equal(got[k], v.to(dtype).float()) for k, v in expected.items())


# ---- byte order marks ----------------------------------------------------------------------

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


# ---- the tokenizer's empty corpus ----------------------------------------------------------

def test_tokenizer_train_names_what_skip_invalid_skipped(tmp_path, capsys):
    """Every file skipped for invalid UTF-8 gave 'the sources held no documents', not saying why."""
    (tmp_path / "bin.dat").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_bytes(b"")
    assert_one_clear_line(*run_main(capsys, "tokenizer", "train", "--vocab-size", "300", "--out", tmp_path / "t",
                                    "--skip-invalid", tmp_path / "bin.dat", tmp_path / "empty.txt"),
                          r"no text to train the tokenizer on: the sources held no documents "
                          r"\(skipped: 1 empty documents, 1 files with invalid UTF-8\)$")
    assert not (tmp_path / "t").exists()


# ---- odd entries in a source folder ----------------------------------------------------------

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


# ---- an unreadable weights file --------------------------------------------------------------

def test_an_unreadable_weights_file_says_permission_denied(tiny_model_dir, tmp_path):
    """safetensors reported a file it may not open as 'No such file or directory'; an unreadable
    config.json was worded as a failed write ("cannot write (Permission denied)")."""
    model = tmp_path / "unread"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").chmod(0)
    # root reads any file: run the command as root without the capabilities that bypass permissions
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot make a file unreadable")
        caps = "-dac_override,-dac_read_search,-fowner"
        prefix = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"]
    run = subprocess.run([*prefix, sys.executable, "-m", "gpt1", "info", str(model)], capture_output=True, text=True,
                         timeout=300)
    assert_one_clear_line(run.returncode, run.stderr, r"unread/model.safetensors: cannot read \(Permission denied\)$")

    (model / "model.safetensors").chmod(0o644)
    (model / "config.json").chmod(0)
    run = subprocess.run([*prefix, sys.executable, "-m", "gpt1", "info", str(model)], capture_output=True, text=True,
                         timeout=300)
    assert_one_clear_line(run.returncode, run.stderr, r"unread/config.json: cannot read \(Permission denied\)$")