"""A run dir's lock and its links, as the library writes them: the lock's message to another
thread, a lock file that is a link, and a run dir from elsewhere whose files are links out of it
(plotted, written, resumed: refused, and what they name kept)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from gpt1.core.errors import Gpt1Error
from gpt1.core.io import atomic_dir, check_within, exclusive, save_safetensors, write_json, write_text
from tests.test_battery import assert_one_clear_line, run_main

# ---- a run's lock, held by another thread of this process -----------------------------------

def test_a_lock_held_by_another_thread_says_so(tmp_path):
    """A notebook trains in a background thread and starts a second run on the same dir: the
    refusal named this very process ("process N is training there ... stop it")."""
    holding, release = threading.Event(), threading.Event()

    def train() -> None:
        with exclusive(tmp_path, "training"):
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=train)
    thread.start()
    try:
        assert holding.wait(30)
        with pytest.raises(Gpt1Error) as e:
            with exclusive(tmp_path, "training"):
                pass
    finally:
        release.set()
        thread.join()
    assert str(e.value) == f"{tmp_path}: another thread of this process is training there already; wait for it to end"


def test_a_lock_file_that_is_a_link_is_refused_and_what_it_names_kept(tmp_path):
    """A downloaded run whose checkpoints/.lock linked to ~/.bashrc: resuming it took the lock,
    which empties the file and writes the pid in it, through the link."""
    precious = tmp_path / "bashrc"
    precious.write_text("export PATH=...\n")
    folder = tmp_path / "dl-run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / ".lock").symlink_to(precious)
    with pytest.raises(Gpt1Error) as e:
        with exclusive(folder, "training"):
            pass
    assert str(e.value) == (f"{folder / '.lock'}: a link to {precious}, where gpt1 keeps its lock file (taking the "
                            "lock would empty it); remove it and run the command again")
    assert precious.read_text() == "export PATH=...\n"


# ---- a run dir from elsewhere whose files are links out of it -------------------------------

def _run_dir_with_a_link(tmp_path: Path, name: str, target: Path) -> Path:
    run = tmp_path / "dl-run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.5, "val_loss": 4.7})))
    (run / name).symlink_to(target)
    return run


def test_plot_does_not_write_through_a_run_dirs_link_out_of_it(tmp_path, capsys):
    """A downloaded run dir whose loss.png linked to ~/.bashrc: `gpt1 plot RUN` wrote the PNG
    into it. A link within the run dir is still written through, and so is an --out the user
    names (the documented `--out LINK`)."""
    precious = tmp_path / "bashrc"
    precious.write_text("export PATH=...\n")
    run = _run_dir_with_a_link(tmp_path, "loss.png", Path("..") / "bashrc")
    rc, err = run_main(capsys, "plot", run)
    assert_one_clear_line(rc, err, rf"dl-run/loss.png: a link to {precious}, outside {run}; remove the link \(gpt1 "
                                   r"does not write through links out of a folder it writes into\)$")
    assert precious.read_text() == "export PATH=...\n"

    (run / "loss.png").unlink()
    (run / "loss.png").symlink_to("curves.png")
    (run / "curves.png").write_bytes(b"")
    assert run_main(capsys, "plot", run)[0] == 0
    assert (run / "loss.png").is_symlink() and (run / "curves.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("writer", ["write_text", "write_json", "save_safetensors", "atomic_dir"])
def test_a_writer_given_its_folder_refuses_a_link_out_of_it(writer, tmp_path):
    """`within=RUN`: what a resumed run writes in its dir (model.safetensors, train_config.json,
    best/) may not lead out of it: a dangling link too, which would make the file it names."""
    outside = tmp_path / "mine"
    outside.write_text("my file\n")
    for case, target in (("a-file", outside), ("dangling", tmp_path / "nothing-yet")):
        (tmp_path / case).mkdir()
        run = _run_dir_with_a_link(tmp_path / case, "out", target)
        with pytest.raises(Gpt1Error, match=rf"out: a link to {target}, outside {run}; remove the link"):
            if writer == "atomic_dir":
                with atomic_dir(run / "out", within=run):
                    pass
            elif writer == "save_safetensors":
                save_safetensors(run / "out", {"w": torch.zeros(2)}, within=run)
            else:
                {"write_text": write_text, "write_json": write_json}[writer](run / "out", "x", within=run)
        assert outside.read_text() == "my file\n" and not (tmp_path / "nothing-yet").exists()


def test_a_link_within_the_folder_or_a_linked_folder_is_written_through(tmp_path):
    real = tmp_path / "runs" / "2026-12-07"
    real.mkdir(parents=True)
    (real / "old.json").write_text("{}")
    (real / "train_config.json").symlink_to("old.json")
    latest = tmp_path / "latest"
    latest.symlink_to(real)  # the run dir itself a link: its files are inside it
    write_json(latest / "train_config.json", {"a": 1}, within=latest)
    check_within(latest / "model.safetensors", latest)  # nothing there: nothing to refuse
    assert json.loads((real / "old.json").read_text()) == {"a": 1}
    assert (real / "train_config.json").is_symlink()


def test_a_resumed_run_dir_whose_files_link_out_of_it_is_refused_and_they_are_kept(data_dir, tmp_path, capsys):
    """A downloaded run dir: a resume replaced, appended to or truncated what its links named."""
    from tests.test_battery import run_main
    from tests.test_train import TINY

    run = tmp_path / "run"
    args = ["pretrain", "--data", data_dir, "--out", run, *TINY, "max_steps=4", "save_every=2", "eval_every=2"]
    assert run_main(capsys, *args, "max_steps=2")[0] == 0  # (a finished 2-step run; 4 steps resume it)
    outside = tmp_path / "victim.txt"
    outside.write_bytes((run / "metrics.jsonl").read_bytes())
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(outside)
    before = outside.read_bytes()
    code, err = run_main(capsys, *args)
    assert code == 2 and f"{run / 'metrics.jsonl'}: a link to {outside}, outside {run}; remove the link" in err
    assert outside.read_bytes() == before
