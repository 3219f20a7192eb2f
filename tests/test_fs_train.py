"""File-system surroundings of fine-tuning and evaluation (pass 10): a base that another process is
still training, and an `eval --json PATH` whose write fails after the scoring. Real processes:
a child holds the run lock as a training run does; a file-size limit fails the write as a full
disk does."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpt1.cli import main
from gpt1.formats.modeldir import weights_fingerprint
from tests.test_battery import assert_one_clear_line, run_main
from tests.test_battery_env import gpt1

# A child that holds FOLDER's lock (`exclusive`, as a training run holds RUN/checkpoints) until its stdin closes.
HOLD_LOCK = ("import sys\nfrom gpt1.core.io import exclusive\n"
             "with exclusive(sys.argv[1], 'training'):\n    print('held', flush=True)\n    sys.stdin.read()\n")


def write_chat(path: Path, n: int = 12) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                                             {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}) + "\n")
    return path


def test_finetune_refuses_a_base_that_is_still_training(tiny_model_dir, tmp_path, capsys):
    """finetune hashed the base's weights for base.json, then read them again to train: a save of
    the run still training the base in between made base.json describe other weights, silently."""
    base, out = tmp_path / "base", tmp_path / "ft"
    shutil.copytree(tiny_model_dir, base)
    chat = write_chat(tmp_path / "chat.jsonl")
    argv = ["finetune", "--base", base, "--data", chat, "--out", out, "max_steps=1", "batch_size=2",
            "block_size=32", "eval_batches=1", "device=cpu", "train_special_tokens=false"]
    trainer = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(base / "checkpoints")],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout.readline() == "held\n"
        rc, err = run_main(capsys, *argv)
    finally:
        trainer.stdin.close()
        trainer.wait(timeout=60)
    assert_one_clear_line(rc, err, rf"base: process {trainer.pid} is still training it, and its weights change at "
                                   r"every save; wait for it to end \(or stop it\) and run the command again$")
    assert not out.exists()  # refused before anything was made
    # Its lock file stays behind, released: the base fine-tunes, and base.json fingerprints what was trained on.
    assert (base / "checkpoints" / ".lock").is_file()
    assert main([str(a) for a in argv]) == 0
    assert json.loads((out / "base.json").read_text())["sha256"] == weights_fingerprint(base)


@pytest.mark.slow
def test_eval_json_that_cannot_be_written_keeps_the_scores(tiny_model_dir, chat_dir, data_dir, tmp_path):
    """Perplexity and --chat mode printed nothing with --json PATH: a write that failed after the
    scoring (a full disk) lost the scores. The hint said "choose another --out", a flag eval lacks."""
    chat = write_chat(tmp_path / "chat.jsonl")
    modes = [(["--model", tiny_model_dir, "--data", data_dir], r"^loss [\d.]+  perplexity [\d.]+  bits/byte"),
             (["--model", chat_dir, "--chat", "--data", chat], r"^assistant-token loss [\d.]+  perplexity [\d.]+")]
    for args, scores in modes:
        result = gpt1("eval", *args, "--max-batches", "1", "--json", tmp_path / "e.json", file_size=16)
        assert_one_clear_line(result.returncode, result.stderr.decode(),
                              r"e\.json: cannot write \(File too large\); raise the file-size limit \(ulimit -f\) "
                              r"or choose another --json$")
        assert len(result.stdout.decode().splitlines()) == 1, result.stdout
        assert re.search(scores, result.stdout.decode()), result.stdout
        assert not (tmp_path / "e.json").exists()
