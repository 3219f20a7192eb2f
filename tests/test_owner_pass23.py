"""Pass 23, the owner's fixes: folders written whole in a group's shared folder."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest

from gpt1.core.io import atomic_dir


def test_a_folder_written_whole_in_a_setgid_folder_keeps_the_bit(tmp_path):
    """chmod of mkdtemp's folder cleared the setgid bit it inherited: an export or best/ in a shared
    group folder had its files in the writer's own group, unreadable by the rest of the group."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o2770)
    with atomic_dir(shared / "export") as tmp:
        (tmp / "config.json").write_text("{}")
    assert os.stat(shared / "export").st_mode & stat.S_ISGID
    # And a folder that had the bit keeps it when replaced, outside a setgid folder too.
    plain = tmp_path / "plain"
    plain.mkdir()
    os.chmod(plain, 0o2755)
    with atomic_dir(plain) as tmp:
        (tmp / "config.json").write_text("{}")
    assert os.stat(plain).st_mode & stat.S_ISGID
    assert stat.S_IMODE(os.stat(plain).st_mode) & 0o777 == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _undeletable(file) -> None:
    """A file its folder cannot lose: immutable for root (permissions do not stop it), else its
    folder read-only."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(file)]).returncode != 0:
            pytest.skip("no chattr +i here")
    else:
        os.chmod(file.parent, 0o500)


def _deletable(file) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(file)], check=True)
    else:
        os.chmod(file.parent, 0o700)


def test_a_replaced_folder_that_cannot_be_deleted_whole_is_a_warning(tmp_path, caplog):
    """Another user's files in the replaced folder (a group member's best/ at a resume): the new
    folder was in place, yet the write failed with 'adapter: cannot write (Permission denied)' and a
    copy of the old folder stayed beside it for good."""
    best = tmp_path / "best"
    (best / "adapter").mkdir(parents=True)
    stuck = best / "adapter" / "adapter_model.safetensors"
    stuck.write_text("old")
    _undeletable(stuck)
    try:
        with caplog.at_level("WARNING", logger="gpt1"), atomic_dir(best) as tmp:
            (tmp / "config.json").write_text("new")
        assert (best / "config.json").read_text() == "new"
        warnings = [r.message for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and warnings[0].startswith(f"{best}: written; the folder it replaced could not be "
                                                             "deleted whole"), warnings
        assert warnings[0].endswith("by hand") and "adapter/adapter_model.safetensors)" in warnings[0]
        [left] = tmp_path.glob(".best.*")
        assert f"delete {left} by hand" in warnings[0]
        # Said once: the next write (the next best/ of the run, another process's) leaves it alone, and
        # does not take it for a killed writer's temp (it warned at every write after, "left by a killed writer").
        caplog.clear()
        with caplog.at_level("WARNING", logger="gpt1"), atomic_dir(best) as tmp:
            (tmp / "config.json").write_text("newer")
        assert [r.message for r in caplog.records if r.levelname == "WARNING"] == []
        assert [*tmp_path.glob(".best.*")] == [left]
    finally:
        for left in tmp_path.glob(".best.*"):
            _deletable(left / "adapter" / "adapter_model.safetensors")
            shutil.rmtree(left)


def test_a_plot_where_home_cannot_be_written_says_nothing_of_matplotlib(tmp_path):
    """matplotlib's import warned in two lines (`mkdir -p failed for path ...`, `Matplotlib created a
    temporary cache directory ...`) at every pretrain, finetune and plot of a user without a
    writable HOME."""
    from tests.test_battery6 import METRICS
    from tests.test_env_findings import gpt1

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(METRICS)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "MPLCONFIGDIR"))}
    result = gpt1("plot", tmp_path / "run", "--out", tmp_path / "p.png", env={**env, "HOME": "/proc/gpt1-no-home"})
    assert result.returncode == 0 and (tmp_path / "p.png").stat().st_size > 0, result.stderr.decode()
    assert "matplotlib" not in result.stderr.decode().lower(), result.stderr.decode()
    # Its other warnings still come through: a bad line in the user's own matplotlibrc.
    (tmp_path / "mpl").mkdir()
    (tmp_path / "mpl" / "matplotlibrc").write_text("bogus.key: 3\n")
    result = gpt1("plot", tmp_path / "run", "--out", tmp_path / "p.png", env={**env, "MPLCONFIGDIR": str(tmp_path / "mpl")})
    assert result.returncode == 0 and "Bad key bogus.key in file" in result.stderr.decode(), result.stderr.decode()


def test_a_quickstart_where_its_folder_cannot_be_made_says_what_to_do(capsys):
    """`gpt1-quickstart: cannot create the folder (Permission denied)` from a read-only current
    folder, without the way out that `tokenizer train` gives for the same case."""
    from tests.test_battery import run_main

    code, err = run_main(capsys, "quickstart", "--out", "/proc/gpt1-quickstart")
    assert code == 2 and err.strip().endswith("choose a writable --out"), err
    assert "cannot create the folder: /proc is not writable" in err


def test_the_chats_set_lists_and_takes_only_the_knobs_a_terminal_chat_uses(capsys, monkeypatch, tiny_model_dir):
    """`/set` listed `logprobs random, prompt_logprobs random`, and `/set logprobs 3` failed on
    "got 3.0": the terminal chat prints text only."""
    import io
    import sys

    from tests.test_battery import run_main

    monkeypatch.setattr(sys, "stdin", io.StringIO("/set\n/set logprobs 3\n/quit\n"))
    code, err = run_main(capsys, "chat", "--model", str(tiny_model_dir), "--device", "cpu")
    [listing] = [line for line in err.splitlines() if line.startswith("(temperature")]
    assert "logprobs" not in listing and listing.endswith("truncate_prompt on)")
    assert "logprobs: the terminal chat shows no log-probabilities; the Python API's `logprobs=` and the server's " \
           "`logprobs` do" in err and "got 3.0" not in err


def test_the_engines_bookkeeping_per_step_stays_in_proportion_to_its_batch(tokenizer, monkeypatch):
    """Every step looked at every waiting request (`cancelled`, then a deque.remove each): 8,000
    prompts through generate_batch spent a third of the run there, twice the share of 4,000. Now a
    step reads a bounded number of them per row of the batch, however long the queue."""
    from gpt1.core.config import ModelConfig
    from gpt1.core.sampling_params import SamplingParams
    from gpt1.inference import generate
    from gpt1.inference.engine import Engine, Request
    from tests.model_factories import model_without_stops

    reads, steps = [0], [0]
    real_cancelled, real_step = Request.cancelled.fget, Engine.step
    monkeypatch.setattr(Request, "cancelled", property(lambda self: reads.__setitem__(0, reads[0] + 1) or real_cancelled(self)))
    monkeypatch.setattr(Engine, "step", lambda self: steps.__setitem__(0, steps[0] + 1) or real_step(self))
    monkeypatch.setattr(generate, "MAX_BATCH", 4)  # a queue of ~75 batches
    config = ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)
    replies = generate.generate_batch(model_without_stops(config, tokenizer, 0), tokenizer,
                                      [tokenizer.encode(f"prompt {i}") for i in range(300)],
                                      SamplingParams(max_new_tokens=4, temperature=0.0))
    assert [r.completion_tokens for r in replies] == [4] * 300
    assert reads[0] <= 8 * 4 * steps[0], (reads[0], steps[0])  # was ~40 per row of the batch per step


def test_a_prepare_whose_folder_cannot_be_made_says_what_to_do(corpus_dir, tokenizer_dir, capsys):
    """`../chat/newdata: cannot create the folder (Permission denied)`, without the way out."""
    from tests.test_battery import run_main

    code, err = run_main(capsys, "prepare", corpus_dir, "--tokenizer", tokenizer_dir, "--out", "/proc/gpt1-data")
    assert code == 2 and err.strip().endswith("; choose a writable --out"), err
    assert "/proc/gpt1-data: cannot create the folder: /proc is not writable (" in err
