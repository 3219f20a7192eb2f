"""The nineteenth pass's library findings: what gpt1.load imports, the progress bar in Jupyter,
the notebook on a model of a short context, the lock's message to another thread, and a run
dir from elsewhere whose files are links out of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from gpt1.core.config import ModelConfig
from gpt1.core.errors import Gpt1Error
from gpt1.core.io import atomic_dir, check_within, exclusive, save_safetensors, write_json, write_text
from gpt1.core.model import GPT
from gpt1.formats.modeldir import save_model
from tests.model_factories import finetuned_dir
from tests.test_battery import assert_one_clear_line, run_main

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"


def _run_notebook(notebook, cwd: Path) -> list[dict]:
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]


# ---- gpt1.load does not import torch._dynamo ------------------------------------------------

def test_loading_a_model_does_not_import_torch_dynamo(tiny_model_dir, tiny_config, tokenizer, tmp_path):
    """nn.Embedding's own init ran normal_ on the meta device, where it imports torch._dynamo:
    1-2 s of every gpt1.load and `gpt1 info`, and TORCHINDUCTOR_CACHE_DIR set in the user's
    environment. A fine-tuned dir with trained token rows went through it again when merged."""
    chat = tmp_path / "chat"
    finetuned_dir(chat, tiny_config, tokenizer, seed=3)
    script = ("import os, sys, gpt1\n"
              "for d in sys.argv[1:]:\n"
              "    gpt1.load(d)\n"
              "    print('torch._dynamo' in sys.modules, 'TORCHINDUCTOR_CACHE_DIR' in os.environ)\n")
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    proc = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir), str(chat)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["False False", "False False"]


def test_a_seed_still_gives_the_weights_it_gave():
    """The embeddings skip their own init only on the meta device: elsewhere its draws from the
    RNG stay, so a seed gives the model it gave before (the numbers of gpt1 at afce909, torch's
    CPU generator) and leaves the RNG where it left it (a run's later draws: dropout, data order)."""
    config = ModelConfig.preset("tiny", vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(config)
    drawn = [model.transformer.wte.weight[0, 0], model.transformer.wpe.weight[0, 0],
             model.transformer.h[0].attn.c_attn.weight[0, 0], model.lm_head.weight[5, 5], torch.rand(1)[0]]
    assert [x.item() for x in drawn] == pytest.approx([0.002619, 0.029778, 0.017620, 0.036276, 0.702682], abs=1e-6)


# ---- Jupyter: the progress bar, the notebook on a short context -----------------------------

def test_a_progress_bar_in_jupyter_is_as_wide_as_the_cell(monkeypatch, tmp_path):
    """A kernel's stderr is no terminal, so the log file's settings applied: tqdm.auto's widget
    was 100 px wide (ncols=100) and updated every 10 s (mininterval)."""
    monkeypatch.delenv("GPT1_QUIET", raising=False)  # the kernel inherits the environment: bars on
    cell = ("from gpt1.core.progress import progress\n"
            "bar = progress(range(3), desc='steps')\n"
            "for _ in bar: pass\n"
            "print(bar.container.layout.width, bar.mininterval)")
    outputs = _run_notebook(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell)]), tmp_path)
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert printed.split() == ["100%", "0.1"]


@pytest.mark.slow
def test_the_notebook_runs_on_a_model_of_16_tokens_of_context(tokenizer, monkeypatch, tmp_path):
    """The max-tokens slider went from 1 to block_size - 16: ipywidgets refused a maximum below
    its minimum ("setting max < min"), and the notebook stopped at its second cell."""
    torch.manual_seed(0)
    model_dir = save_model(tmp_path / "ctx16", GPT(ModelConfig.preset(
        "tiny", vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32)), tokenizer)
    monkeypatch.setenv("GPT1_MODEL", str(model_dir))
    outputs = _run_notebook(nbformat.read(NOTEBOOK, as_version=4), tmp_path)
    assert not [o for o in outputs if o.output_type == "error"]
    knobs = next(o for o in outputs if o.output_type == "execute_result" and "max_new_tokens" in o["data"]["text/plain"])
    assert "'max_new_tokens': 1" in knobs["data"]["text/plain"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook did not reach its curves"


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
