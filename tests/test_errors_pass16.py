"""Pass 16 (errors): a trainer_state.pt that loads but is not gpt1's, metrics.jsonl lines that
`gpt1 plot` skips, and a prepared data dir with an empty split: each one line, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt1.cli import main
from gpt1.data.shards import load_meta, prepare
from tests.test_battery import assert_one_clear_line, run_main

TRAIN = ["model=tiny", "block_size=32", "batch_size=2", "device=cpu", "max_steps=3", "save_every=1", "eval_batches=1",
         "eval_every=100"]


@pytest.fixture(scope="module")
def stopped_run(corpus_dir, tokenizer, tmp_path_factory) -> tuple[Path, Path]:
    """A prepared data dir and a run of 3 steps interrupted in its third, after its checkpoint at step 2."""
    import gpt1.train.loop as loop

    root = tmp_path_factory.mktemp("stopped")
    prepare([str(corpus_dir / "json")], tokenizer, root / "data", val=4)
    real, calls = loop._loss_and_backward, []

    def stopping(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "_loss_and_backward", stopping)
        assert main([str(a) for a in ["pretrain", "--data", root / "data", "--out", root / "run", *TRAIN]]) == 130
    return root / "data", root / "run"


def resume(capsys, data: Path, run: Path) -> tuple[int, str]:
    return run_main(capsys, "pretrain", "--data", data, "--out", run, *TRAIN)


def copy_run(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy, copy / "checkpoints" / "step-00000002" / "trainer_state.pt"


def _drop_rng(s: dict) -> dict:
    del s["rng"]
    return s


@pytest.mark.parametrize("edit, problem", [
    (lambda s: {}, r"missing key 'step'"),
    (_drop_rng, r"missing key 'rng'"),
    (lambda s: {**s, "sampler": {}}, r"missing key 'sampler\.draws'"),
    (lambda s: {**s, "step": str(s["step"])}, r"'step' is str, expected int"),
    (lambda s: {**s, "last": {}}, r"missing key 'last\.loss'"),
    (lambda s: {**s, "end": "3"}, r"'end' is str, expected int"),  # a key older checkpoints lack, checked when there
    (lambda s: [s], r"the state is list, expected dict"),
], ids=["empty", "no-rng", "sampler-without-draws", "step-a-string", "last-empty", "end-a-string", "a-list"])
def test_a_trainer_state_with_missing_keys_or_wrong_types_is_one_line(stopped_run, tmp_path, capsys, edit, problem):
    data, run = stopped_run
    run, state_file = copy_run(run, tmp_path)
    torch.save(edit(torch.load(state_file, weights_only=True)), state_file)
    assert_one_clear_line(*resume(capsys, data, run),
                          rf"{state_file}: cannot read the checkpoint \({problem}\); it is not a trainer state gpt1 saved")


def test_metrics_lines_that_plot_skips_do_not_stop_a_resume(stopped_run, tmp_path, capsys):
    data, run = stopped_run
    run, _ = copy_run(run, tmp_path)
    metrics = run / "metrics.jsonl"
    kept = metrics.read_text()
    # A 5,000-digit number (int() refuses over 4,300 digits) and JSON nested 100,000 deep.
    metrics.write_text(kept + '{"step": ' + "1" * 5000 + "}\n" + "[" * 100_000 + "\n")
    rc, err = resume(capsys, data, run)
    assert rc == 0, err
    lines = metrics.read_text().splitlines()
    assert metrics.read_text().startswith(kept) and [json.loads(line)["step"] for line in lines][-1] == 3


def test_a_data_dir_with_an_empty_split_is_one_line(stopped_run, tiny_model_dir, tokenizer_dir, corpus_dir, tmp_path, capsys):
    source, _ = stopped_run
    data = tmp_path / "data"
    shutil.copytree(source, data)
    meta = json.loads((data / "meta.json").read_text())
    meta["val"]["tokens"] = 0  # meta.json and val.bin agree: nothing to validate on
    (data / "meta.json").write_text(json.dumps(meta))
    (data / "val.bin").write_bytes(b"")
    expected = rf"{data / 'val.bin'}: no validation tokens \(meta.json counts 0\); .* damaged: prepare it again"
    assert_one_clear_line(*run_main(capsys, "eval", "--model", tiny_model_dir, "--device", "cpu", "--data", data), expected)
    assert_one_clear_line(*run_main(capsys, "pretrain", "--data", data, "--out", tmp_path / "run", *TRAIN), expected)
    # The same `prepare` again no longer says "nothing to do" over the damage; --overwrite redoes it.
    redo = ["prepare", "--tokenizer", tokenizer_dir, "--out", data, "--val", "4", corpus_dir / "json"]
    assert_one_clear_line(*run_main(capsys, *redo), r"train.bin/val.bin do not match meta.json \(damaged\)")
    assert run_main(capsys, *redo, "--overwrite")[0] == 0
    assert load_meta(data)["val"]["tokens"] == len(np.fromfile(data / "val.bin", dtype=np.uint16)) > 0

