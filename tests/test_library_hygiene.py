"""gpt1 used as a library inside another program leaves that program's process as it found it:
its matplotlib backend and figures, its RNG states, its thread count, its working directory's
meaning; and it works without a stderr (pythonw, `2>&-`, daemons)."""

from __future__ import annotations

import json
import random
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import gpt1
from gpt1.core.errors import Gpt1Error
from gpt1.core.sampling_params import SamplingParams
from gpt1.inference.engine import Engine
from gpt1.inference.llm import LLM
from gpt1.train import checkpoint
from gpt1.train import finetune as ft
from gpt1.train.config import TrainConfig, load_config
from gpt1.train.evaluate import evaluate_data
from gpt1.train.plot import plot_runs
from gpt1.train.pretrain import pretrain

TINY = ["model=tiny", "block_size=32", "batch_size=4", "eval_batches=1", "device=cpu"]
FT = ["batch_size=4", "block_size=48", "eval_batches=1", "device=cpu", "lora_r=2", "val_fraction=0", "max_steps=1"]


def _chat_file(path: Path) -> Path:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                                                     {"role": "assistant", "content": str(2 * i)}]}) + "\n"
                            for i in range(12)))
    return path


def _finetune(base: Path, out: Path, chat: Path):
    return ft.finetune(load_config(ft.FinetuneConfig, None, FT, data=str(chat)), base, out)


@pytest.fixture(scope="module")
def finetuned_dir(tiny_model_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("hygiene")
    _finetune(tiny_model_dir, tmp / "ft", _chat_file(tmp / "chat.jsonl"))
    return tmp / "ft"


# ---- matplotlib --------------------------------------------------------------------------------

def test_plotting_keeps_the_hosts_matplotlib_backend_and_figures(tiny_model_dir, tmp_path):
    """A notebook's plots stopped showing after a training run: plotting switched the process's
    backend to Agg, which also closed the host's open pyplot figures."""
    import matplotlib
    import matplotlib.pyplot as plt

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 5.0 - s, "val_loss": 5.5 - s}) + "\n" for s in range(4)))
    backend = matplotlib.get_backend()
    plt.switch_backend("svg")  # any backend but Agg, as a notebook's inline one
    try:
        host_figure = plt.figure()
        figures = plt.get_fignums()
        magic = {".png": b"\x89PNG", ".svg": b"<?xml", ".pdf": b"%PDF", ".jpg": b"\xff\xd8\xff"}
        for suffix, start in magic.items():
            out = plot_runs({"run": metrics}, tmp_path / f"plot{suffix}")
            assert out.read_bytes().startswith(start), suffix
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == figures and plt.gcf() is host_figure
    finally:
        plt.close("all")
        plt.switch_backend(backend)


# ---- the model dir's path ----------------------------------------------------------------------

def test_a_loaded_model_keeps_its_dir_after_the_host_changes_directory(finetuned_dir, tmp_path, monkeypatch):
    """gpt1.load("runs/f5") kept the relative path: after os.chdir the model was no longer a chat
    model, evaluate_chat scored another split, and a process engine's child found no model."""
    monkeypatch.chdir(finetuned_dir.parent)
    llm, weightless = gpt1.load(finetuned_dir.name), LLM.without_weights(finetuned_dir.name)
    monkeypatch.chdir(tmp_path)
    for loaded in (llm, weightless):
        assert loaded.path == finetuned_dir.resolve()
        assert loaded.is_chat_model


# ---- RNG states --------------------------------------------------------------------------------

def _rng_states():
    np_state = np.random.get_state()
    return torch.get_rng_state().tolist(), random.getstate(), (np_state[0], np_state[1].tolist(), *np_state[2:])


def _seed_host():
    torch.manual_seed(1234)
    random.seed(5)
    np.random.seed(6)
    return _rng_states()


def test_pretraining_and_its_resume_leave_the_hosts_rng_states_alone(data_dir, tmp_path, monkeypatch):
    """Each run reseeded torch's global RNG (the model's initialisation), and a resume set
    Python's and NumPy's global states from its checkpoint; an interrupted run's too."""
    cfg = load_config(TrainConfig, None, [*TINY, "max_steps=2", "save_every=1"])
    real_save = checkpoint.save_safetensors
    saves = []

    def save_then_stop(path, *args):  # Ctrl-C in the second checkpoint's save
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt
        return real_save(path, *args)

    before = _seed_host()
    monkeypatch.setattr(checkpoint, "save_safetensors", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, data_dir, tmp_path / "run")
    monkeypatch.undo()
    assert _rng_states() == before
    assert pretrain(cfg, data_dir, tmp_path / "run").resumed_from == 1
    assert _rng_states() == before


def test_finetuning_and_loading_a_finetuned_model_leave_the_hosts_rng_states_alone(finetuned_dir, tiny_model_dir,
                                                                                   tmp_path):
    """Fine-tuning seeded torch's RNG; loading a fine-tuned dir drew the adapter's random init
    (overwritten at once by its saved weights)."""
    before = _seed_host()
    _finetune(tiny_model_dir, tmp_path / "ft", _chat_file(tmp_path / "chat.jsonl"))
    assert _rng_states() == before
    gpt1.load(finetuned_dir)
    assert _rng_states() == before


# ---- CPU threads -------------------------------------------------------------------------------

def _new_thread_count() -> int:
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_a_stopped_engine_leaves_new_threads_on_the_hosts_thread_count(tiny_model_dir):
    """The engine thread's tuner lowered torch's thread count for a probe; set on that thread,
    it became the count of every thread the host started afterwards."""
    threads = _new_thread_count()
    if threads < 2:
        pytest.skip("needs 2 CPU threads")
    llm = gpt1.load(tiny_model_dir)
    done = threading.Event()

    def sink(chunk):  # runs on the engine's thread, and lowers its count as the tuner's probe does
        torch.set_num_threads(1)
        if not hasattr(chunk, "finish_reason") or chunk.finish_reason:
            done.set()

    engine = Engine(llm.model, llm.tokenizer, max_batch=2).start()
    engine.submit([llm.tokenizer.encode("def")], SamplingParams(max_new_tokens=3, seed=1), lambda i: sink)
    assert done.wait(60)
    engine.stop()
    assert _new_thread_count() == threads


# ---- a server that cannot start ----------------------------------------------------------------

def test_a_process_engine_that_cannot_start_says_why_from_background_server(tiny_model_dir, capfd):
    """The thread engine raised the reason (the KV cache does not fit); the process engine gave
    "the server did not start" and a uvicorn traceback on stderr."""
    from gpt1.serve import background_server, create_app

    app = create_app(gpt1.load(tiny_model_dir), engine="process", max_batch=10**12)
    with pytest.raises(Gpt1Error, match=r"^max_batch 1000000000000: .*lower max_batch$"):
        with background_server(app):
            pass
    assert "Traceback" not in capfd.readouterr().err


# ---- no stderr ---------------------------------------------------------------------------------

@pytest.mark.parametrize("quiet", ["1", "0"])
def test_the_library_runs_without_a_stderr(tiny_model_dir, data_dir, tmp_path, monkeypatch, quiet):
    """pythonw, `python app.py 2>&-` and some daemons have sys.stderr None: the progress bars
    asked it isatty() and crashed evaluate_data and pretrain."""
    monkeypatch.setenv("GPT1_QUIET", quiet)
    monkeypatch.setattr(sys, "stderr", None)
    assert evaluate_data(gpt1.load(tiny_model_dir), str(data_dir), max_batches=1, batch_size=2).tokens > 0
    assert pretrain(load_config(TrainConfig, None, [*TINY, "max_steps=1"]), data_dir, tmp_path / "run").steps == 1
