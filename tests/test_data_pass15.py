"""Pass 15, data: `gpt1 prepare` loads no torch; chatterbot dialogs with surrogate escapes; the
`tokenizer train` bar against the files' bytes; a parquet text column that is not a string."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpt1.core.errors import Gpt1Error
from gpt1.data.chat_sources import ChatStats, read_conversations
from gpt1.data.shards import ShardWindows, sequential_windows
from gpt1.data.sources import SourceStats, iter_documents
from tests.test_battery import run_main

# ---- 1. `gpt1 prepare` loads no torch -------------------------------------------------------------

# The command as `gpt1` runs it (`main`, its LIBRARIES, the prepare), then what it loaded.
PREPARE_THEN_MODULES = "import sys\nfrom gpt1.cli import main\nrc = main(sys.argv[1:])\nprint(rc, 'torch' in sys.modules)"


def test_prepare_runs_without_loading_torch(corpus_dir, tokenizer_dir, data_dir, tmp_path):
    """Loading torch, which prepare never uses, was 2-5 s: 40-55% of preparing a 5 MB corpus."""
    out = tmp_path / "data"
    ran = subprocess.run([sys.executable, "-c", PREPARE_THEN_MODULES, "prepare", str(corpus_dir / "json"),
                          "--tokenizer", str(tokenizer_dir), "--out", str(out), "--val", "2"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "GPT1_QUIET": "1"})
    assert ran.returncode == 0 and ran.stdout.split() == ["0", "False"], ran.stderr
    # The readers that training and evaluation use import torch themselves, and give what they gave.
    x, y = ShardWindows(data_dir / "train.bin", 16, 2, seed=0).next_batch()
    assert x.dtype == y.dtype and str(x.dtype) == "torch.int64" and bool((x[:, 1:] == y[:, :-1]).all())
    tokens = np.arange(40, dtype=np.uint16)
    (x, y), = sequential_windows(tokens[:21], 16, 4)  # two windows; the second scores only its last 4
    assert y[1, :12].tolist() == [-100] * 12 and y[1, 12:].tolist() == [17, 18, 19, 20] and x[1, 0] == 4


# ---- 2. surrogate escapes in chatterbot dialogs -----------------------------------------------------

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


# ---- 3. the `tokenizer train` bar counts the files' bytes -------------------------------------------

@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_the_tokenizer_bar_ends_at_its_total_for_escaped_jsonl(suffix, tmp_path, capsys, monkeypatch):
    """Its total was the file's size, its count the text's UTF-8 bytes: a .jsonl written with
    ensure_ascii (6 bytes a character as \\uXXXX, 2-3 in UTF-8) ended at 48%; a .gz had no total."""
    lines = "".join(json.dumps({"text": f"Привет, мир {i}. 你好，世界。 Γειά σου κόσμε."}) + "\n" for i in range(300))
    path = tmp_path / f"escaped{suffix}"
    path.write_bytes(gzip.compress(lines.encode()) if suffix.endswith(".gz") else lines.encode())
    monkeypatch.setenv("GPT1_QUIET", "0")
    rc, err = run_main(capsys, "tokenizer", "train", "--vocab-size", 280, "--out", tmp_path / "tok", path)
    bar = [line for line in err.splitlines() if line.startswith("tokenizer:")]
    assert rc == 0 and bar, err
    done, total = re.search(r"\| *([\d.]+k?)/([\d.]+k?) ", bar[-1]).groups()
    assert bar[-1].startswith("tokenizer: 100%") and done == total, bar[-1]


# ---- 4. a parquet text column that is not a string --------------------------------------------------

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
