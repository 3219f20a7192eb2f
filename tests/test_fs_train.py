"""File-system surroundings of fine-tuning and evaluation (pass 10): a base that another process is
still training, and an `eval --json PATH` whose write fails after the scoring. Real processes:
a child holds the run lock as a training run does; a file-size limit fails the write as a full
disk does."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpt1.cli import main
from gpt1.core.errors import Gpt1Error
from gpt1.formats.modeldir import weights_fingerprint
from gpt1.train.config import TrainConfig, load_config
from gpt1.train.pretrain import pretrain
from tests.test_battery import assert_one_clear_line, run_main
from tests.test_resource_limits import gpt1, linux_only

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


# A run dir whose `tensorboard` is a file.

TINY = ["model=tiny", "block_size=32", "batch_size=2", "eval_batches=1", "eval_every=2", "device=cpu"]


def open_paths() -> list[str]:
    """What this process's open file descriptors point at (files, "pipe:[...]", sockets), sorted."""
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return sorted(paths)


def _metrics_descriptors() -> list[str]:
    """The files named metrics.jsonl this process holds open."""
    return [p for p in open_paths() if p.endswith("metrics.jsonl")]


@linux_only
def test_a_file_named_tensorboard_in_the_run_dir_is_one_error_and_leaves_no_file_open(data_dir, tmp_path):
    """A resumed run with tensorboard=true whose run dir holds a FILE named tensorboard: a
    FileExistsError traceback from SummaryWriter, and metrics.jsonl (opened before it) was left
    open, held by the traceback's frame."""
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    pretrain(load_config(TrainConfig, None, [*TINY, "max_steps=2", "save_every=1"]), data_dir, run)
    shutil.rmtree(run / "checkpoints" / "step-00000002")  # killed before its last save (the only one kept)
    (run / "tensorboard").write_text("not a folder")
    cfg = load_config(TrainConfig, None, [*TINY, "max_steps=2", "save_every=1", "tensorboard=true"])
    with pytest.raises(Gpt1Error, match=r"tensorboard: exists and is not a folder; tensorboard=true writes") as e:
        pretrain(cfg, data_dir, run)
    assert "\n" not in str(e.value)
    assert _metrics_descriptors() == []  # closed already, with the frame still alive in e's traceback
    # Moved away, the run resumes and logs to the folder.
    (run / "tensorboard").unlink()
    assert pretrain(cfg, data_dir, run).steps == 2
    assert any(Path(run, "tensorboard").iterdir())


# `gpt1 eval --suite RUN/best` while the run still trains.

def test_a_suite_report_is_not_written_into_the_best_of_a_run_still_training(tiny_model_dir, tmp_path, capsys):
    """`gpt1 eval --suite RUN/best` wrote report.md into best/, which the training run replaces at
    each new lowest loss: the report was deleted (5 times in 6), or its write ended the run."""
    import shutil
    import subprocess
    import sys

    from tests.test_battery import assert_one_clear_line, run_main

    run = tmp_path / "run"
    best = shutil.copytree(tiny_model_dir, run / "best")
    trainer = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run / "checkpoints")],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout.readline() == "held\n"
        rc, err = run_main(capsys, "eval", "--model", best, "--suite", "quick", "--data", tmp_path)
    finally:
        trainer.stdin.close()
        trainer.wait(timeout=60)
    assert_one_clear_line(rc, err, rf"{best}: process {trainer.pid} is training {run}, and replaces {best} at each "
                                   r"new lowest validation loss, a report.md in it with it; pass --report PATH")
    assert not (best / "report.md").exists()
