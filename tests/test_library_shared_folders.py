"""gpt1 processes side by side on one folder: a model folder replaced whole while another process
reads it (the process engine's two loads, a run's best/ saved while a reader loads it, an
evaluation writing into best/), and readers of a run that is still training."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gpt1
import gpt1.formats.modeldir as modeldir
from gpt1.core.config import ModelConfig
from gpt1.core.errors import Gpt1Error
from gpt1.core.io import atomic_dir
from gpt1.core.model import GPT
from gpt1.core.tokenizer import train_tokenizer
from gpt1.data.sources import iter_documents
from gpt1.formats.modeldir import load_model, save_model
from gpt1.inference.engine_process import EngineProcess
from gpt1.inference.llm import LLM
from tests.conftest import STDLIB, TEST_VOCAB
from tests.model_factories import finetuned_dir


def _gpt1(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt1", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "GPT1_QUIET": "1"})


# ---- the process engine loads the folder again: replaced in between ----------------------------

@pytest.fixture(scope="module")
def other_tokenizer():
    """A tokenizer of the test vocabulary's size trained on other text: another fingerprint."""
    tok, _ = train_tokenizer(iter_documents([str(STDLIB / "http"), str(STDLIB / "urllib")]), TEST_VOCAB,
                             show_progress=False)
    return tok


@pytest.mark.parametrize("differs", ["tokenizer", "config"])
def test_a_folder_replaced_before_the_engine_process_loads_it_is_an_error(differs, tiny_model_dir, tiny_config,
                                                                          tokenizer, other_tokenizer, tmp_path):
    """`gpt1 serve --engine process` read the tokenizer and config, then its engine process loaded
    the folder again: replaced whole in between (export --force), the server ran model B on the
    prompts of A's tokenizer and decoded them with it, without a word. Now the start fails."""
    live = tmp_path / "live"
    shutil.copytree(tiny_model_dir, live)
    llm = LLM.without_weights(live)  # what the server's process reads first
    replacement = tmp_path / "b"
    if differs == "tokenizer":
        save_model(replacement, GPT(tiny_config), other_tokenizer)
    else:
        save_model(replacement, GPT(ModelConfig.from_dict({**tiny_config.to_dict(), "n_layer": 1})), tokenizer)
    shutil.rmtree(live)
    replacement.rename(live)
    engine = EngineProcess(llm.path, llm.tokenizer, llm.config, device="cpu", max_batch=1)
    with pytest.raises(Gpt1Error, match=rf"live: replaced while the server started: the engine process loaded "
                                        rf"another model \(its {differs} differ.*\); start the server again$"):
        engine.start()
    assert engine._process.poll() is not None  # not left running
    # Unreplaced, it starts (the same folder read twice agrees).
    fresh = LLM.without_weights(live)
    with EngineProcess(fresh.path, fresh.tokenizer, fresh.config, device="cpu", max_batch=1) as started:
        assert started.alive


# ---- atomic_dir: a swap without a gap; a folder the writer owns ---------------------------------

# Another process looking at a folder as fast as it can, until the file `stop` appears: "misses looks".
LOOK_AT_A_FOLDER = """
import os, sys
folder, stop = sys.argv[1:]
looks = misses = 0
print("ready", flush=True)
while not os.path.exists(stop):
    for _ in range(1000):
        looks += 1
        misses += not os.path.isdir(folder)
print(misses, looks)
"""


def test_atomic_dir_swaps_a_folder_in_without_a_moment_with_none(tmp_path):
    """Two renames (the old folder aside, the new one in) left an instant without a folder: a
    reader of a fine-tune's best/ found none 6,637 times in 4.46M looks, and `gpt1.load` said
    "model directory not found" (or ran the base model without its adapter). One swap now."""
    target, stop = tmp_path / "best", tmp_path / "stop"
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("0")
    reader = subprocess.Popen([sys.executable, "-c", LOOK_AT_A_FOLDER, str(target), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline() == "ready\n"
        for i in range(200):
            with atomic_dir(target) as tmp:
                (tmp / "config.json").write_text(str(i))
    finally:
        stop.touch()
        misses, looks = map(int, reader.communicate(timeout=60)[0].split())
    assert misses == 0, f"{misses} of {looks:,} looks found no folder"
    assert (target / "config.json").read_text() == "199"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "stop"]  # the folders replaced are gone


def _write_report(folder: Path) -> None:
    """`gpt1 eval --suite FOLDER`'s report.md, written by another process as eval writes it."""
    subprocess.run([sys.executable, "-c", "import sys; from gpt1.core.io import write_text; "
                    "write_text(sys.argv[1], '| task |\\n')", str(folder / "report.md")], check=True, timeout=60)


def test_an_owned_folder_is_replaced_whatever_another_process_wrote_into_it(tmp_path, caplog):
    """A keep_best=true run died at its next best ("RUN/best: another process wrote there while
    this command was writing it", exit 2, no checkpoint of that step) because `gpt1 eval --suite
    RUN/best` had written report.md there. A folder its writer owns is replaced all the same; a
    warning names what went with the earlier folder."""
    best = tmp_path / "run" / "best"
    _write_report(best)  # before the first best/ too: the eval made the folder
    with caplog.at_level(logging.WARNING, logger="gpt1"):
        with atomic_dir(best, owned=True) as tmp:
            (tmp / "config.json").write_text("1")
        with atomic_dir(best, owned=True) as tmp:
            (tmp / "config.json").write_text("2")
            _write_report(best)  # while the new best is written
            (best / "notes").mkdir()
    assert sorted(p.name for p in best.iterdir()) == ["config.json"] and (best / "config.json").read_text() == "2"
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"{best}: replaced whole, without report.md, which another process put in the earlier folder "
                    "(this command does not write it)",
                    f"{best}: replaced whole, without notes, report.md, which another process put in the earlier "
                    "folder (this command does not write them)"]
    assert sorted(p.name for p in best.parent.iterdir()) == ["best"]
    # An export's --out (not owned) is still left as it is when another process wrote into it.
    with pytest.raises(Gpt1Error, match="another process wrote there while this command was writing it"):
        with atomic_dir(best) as tmp:
            _write_report(best)
    assert (best / "report.md").is_file()


# ---- load_model: a folder replaced or written while it loads ------------------------------------

def test_a_fine_tuned_dir_whose_adapter_goes_missing_while_it_loads_is_not_loaded_as_its_base(
        tiny_config, tokenizer, tmp_path, monkeypatch):
    """base.json was looked at first, adapter/ after the weights: best/ replaced in between (two
    renames, an instant with no folder) loaded the base model without its adapter, silently."""
    best = tmp_path / "best"
    finetuned_dir(best, tiny_config, tokenizer, seed=3)
    real = modeldir.load_weights

    def load_then_lose_the_adapter(model, file):  # the folder replaced in that instant
        real(model, file)
        (best / "adapter").rename(tmp_path / "adapter-aside")

    monkeypatch.setattr(modeldir, "load_weights", load_then_lose_the_adapter)
    for mode in ("merge", "keep"):
        with pytest.raises(Gpt1Error, match=r"best: was replaced while it loaded \(its adapter/ went missing after "
                                            r"base.json said it is a fine-tuned model dir.*\); try again$"):
            load_model(best, adapter=mode)
        (tmp_path / "adapter-aside").rename(best / "adapter")
    monkeypatch.undo()
    assert any("lora" in name for name, _ in load_model(best, adapter="keep").named_parameters())


def test_a_folder_being_written_is_said_so_and_a_fifo_is_not_a_file(tiny_config, tokenizer, tmp_path):
    """A reader of a folder that `atomic_dir` is writing (an export's new --out, or in the instant
    of a replacement where the system cannot swap) was told "model directory not found", or
    "restore adapter/" for a fine-tuned best/ caught between its two renames."""
    out = tmp_path / "export"
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
        with pytest.raises(Gpt1Error, match=rf"export: model directory not found: process {os.getpid()} is writing "
                                            r"it now \(or replacing it\); try again once it is done$"):
            load_model(out)
    best = tmp_path / "best"
    finetuned_dir(best, tiny_config, tokenizer, seed=3)
    shutil.rmtree(best / "adapter")  # as a reader finds it in that instant
    with atomic_dir(best, owned=True):
        with pytest.raises(Gpt1Error, match=rf"best: process {os.getpid()} is replacing it now \(no adapter/ in that "
                                            r"instant\); try again once it is done$"):
            load_model(best)
    with pytest.raises(Gpt1Error, match=r"missing: model directory not found$"):
        load_model(tmp_path / "missing")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(Gpt1Error, match=r"fifo: not a folder, not a model directory$"):
        load_model(tmp_path / "fifo")


# ---- a run that is still training --------------------------------------------------------------

HOLD_THE_LOCK = """
import sys
from pathlib import Path
from gpt1.core.io import exclusive
with exclusive(Path(sys.argv[1]) / "checkpoints", "training"):
    print("ready", flush=True)
    sys.stdin.read()
"""


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("training") / "run"
    done = _gpt1("pretrain", "--data", data_dir, "--out", run, "model=tiny", "block_size=32", "batch_size=4",
                 "eval_batches=2", "device=cpu", "max_steps=4", "save_every=2", "eval_every=2")
    assert done.returncode == 0, done.stderr
    return run


def test_a_run_still_training_is_loaded_with_one_line_saying_so(finished_run, caplog):
    """`gpt1 generate / info / serve / export` and `gpt1.load` of a run dir whose process is
    still training loaded its latest save without a word (`finetune --base` refuses it)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(finished_run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "ready\n"
        line = (f"{finished_run}: process {holder.pid} is still training it; loaded its save of step 4 "
                "(it changes at every save)")
        with caplog.at_level(logging.INFO, logger="gpt1"):
            gpt1.load(finished_run, device="cpu")
        assert [r.getMessage() for r in caplog.records] == [line]
        for command in (["info", finished_run], ["generate", "--model", finished_run, "--prompt", "def",
                                                 "--max-new-tokens", "2", "--device", "cpu"]):
            done = _gpt1(*command)
            assert done.returncode == 0, done.stderr
            assert done.stderr.count("still training") == 1 and line in done.stderr, done.stderr
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gpt1"):
        gpt1.load(finished_run, device="cpu")
    assert not [r for r in caplog.records if "training" in r.getMessage()]  # once it has ended



def test_a_save_not_yet_written_out_is_not_named(finished_run, tmp_path, caplog):
    """Saved (checkpoint 6) but its model files not yet written from it (no outputs.done), the
    step before pruned: the line named step 6 while the weights read were step 4's."""
    run = shutil.copytree(finished_run, tmp_path / "run")
    checkpoints = run / "checkpoints"
    for entry in checkpoints.iterdir():
        if entry.name.startswith("step-"):
            shutil.rmtree(entry)
    shutil.copytree(finished_run / "checkpoints" / "step-00000004", checkpoints / "step-00000006")
    (checkpoints / "step-00000006" / "outputs.done").unlink(missing_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "ready\n"
        with caplog.at_level(logging.INFO, logger="gpt1"):
            gpt1.load(run, device="cpu")
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert [r.getMessage() for r in caplog.records] == [
        f"{run}: process {holder.pid} is still training it; loaded its latest save (it changes at every save)"]
