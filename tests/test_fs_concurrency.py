"""Two commands on one folder: what one writes whole (an export) never replaces what another
process made there meanwhile, and a reader of a folder being written is told so, not that it
was left broken."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gpt1.formats.gguf as gguf_format
import gpt1.formats.hf as hf
from gpt1.core.errors import Gpt1Error
from gpt1.formats.hf import export_model

# A training run as far as any other command can tell: its checkpoints/.lock held by a live
# process, and a file of its own; it ends when the test closes its stdin.
HOLD_A_RUN = """
import sys
from pathlib import Path
from gpt1.core.io import exclusive
run = Path(sys.argv[1])
with exclusive(run / "checkpoints", "training"):
    (run / "metrics.jsonl").write_text("{}\\n")
    print("ready", flush=True)
    sys.stdin.read()
"""


def _temps(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".old"))]


def _during(monkeypatch, module, name: str, action) -> None:
    """Run `action` once, inside the write: after `module.name` (a step of the export) returns."""
    real, done = getattr(module, name), []

    def step(*args, **kwargs):
        result = real(*args, **kwargs)
        if not done:
            done.append(1)
            action()
        return result

    monkeypatch.setattr(module, name, step)


def test_an_export_leaves_a_training_run_that_started_in_its_out_meanwhile(tmp_path, tiny_model_dir, monkeypatch):
    """Pass 10, finding 1: `atomic_dir` looked at --out only before the work, and at the end moved
    aside and deleted whatever was there: a run started there while the export wrote lost its
    checkpoints and metrics (and died with a traceback), and the export said it succeeded."""
    out = tmp_path / "out"
    runs = []

    def start_a_run(folder: Path = out) -> None:
        run = subprocess.Popen([sys.executable, "-c", HOLD_A_RUN, str(folder)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
        runs.append(run)
        assert run.stdout.readline() == "ready\n"

    _during(monkeypatch, hf, "_write_base", start_a_run)
    try:
        with pytest.raises(Gpt1Error, match=r"out/checkpoints: process \d+ is using it; cannot replace it while it runs") as e:
            export_model(tiny_model_dir, out)
        assert f"process {runs[0].pid} " in str(e.value)
        assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl"]
    finally:
        for run in runs:
            run.stdin.close()
            run.wait(timeout=30)
    assert _temps(tmp_path) == []

    # A run that started and ended while the export wrote (its lock free, its files there) stays too.
    def run_and_end() -> None:
        start_a_run(tmp_path / "out2")
        runs[-1].stdin.close()
        runs[-1].wait(timeout=30)

    _during(monkeypatch, hf, "_write_base", run_and_end)
    with pytest.raises(Gpt1Error, match="another process wrote there while this command was writing it"):
        export_model(tiny_model_dir, tmp_path / "out2")
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert _temps(tmp_path) == []


@pytest.mark.parametrize("step, said", [
    ("load_model", "out: exists and is not empty"),
    ("_write_base", "out: another process wrote there while this command was writing it; left it as it is")])
def test_two_exports_into_one_new_out_do_not_both_succeed(step, said, tmp_path, tiny_model_dir, chat_dir, monkeypatch):
    """Both `gpt1 export --out X` of two models printed "exported" and exited 0; X held one of
    them. The one that finishes second now fails, and leaves the first one's folder as it is,
    whether the first finished while the second loaded its model or while it wrote."""
    out = tmp_path / "out"
    _during(monkeypatch, hf, step, lambda: export_model(chat_dir, out))
    with pytest.raises(Gpt1Error, match=said):
        export_model(tiny_model_dir, out)
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())  # the chat model's export
    assert _temps(tmp_path) == []
    # --force on an earlier export replaces it, as before, also an empty folder made beforehand.
    monkeypatch.undo()
    export_model(tiny_model_dir, out, overwrite=True)
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    (tmp_path / "empty").mkdir()
    export_model(tiny_model_dir, tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").is_file() and _temps(tmp_path) == []


def test_a_folder_that_gets_new_files_while_it_is_replaced_is_kept(tmp_path, tiny_model_dir, monkeypatch):
    """--force replaces the folder it checked, not files that another process added to it meanwhile."""
    out = tmp_path / "out"
    export_model(tiny_model_dir, out)
    _during(monkeypatch, hf, "_write_base", lambda: (out / "train_config.json").write_text("{}"))
    with pytest.raises(Gpt1Error, match="another process wrote there"):
        export_model(tiny_model_dir, out, overwrite=True)
    assert (out / "train_config.json").is_file() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("step", ["load_model", "_add_sampling_defaults"])
def test_two_gguf_exports_into_one_new_file_do_not_both_succeed(step, tmp_path, tiny_model_dir, chat_dir, monkeypatch):
    """The same for `--format gguf`: the file the first export wrote stays, the second fails."""
    pytest.importorskip("gguf")
    out = tmp_path / "model.gguf"
    _during(monkeypatch, gguf_format, step, lambda: gguf_format.export_gguf(chat_dir, out, "f32"))
    with pytest.raises(Gpt1Error, match="model.gguf: another process wrote there"):
        gguf_format.export_gguf(tiny_model_dir, out, "f32")
    first = out.read_bytes()
    monkeypatch.undo()
    assert first == gguf_format.export_gguf(chat_dir, tmp_path / "alone.gguf", "f32").read_bytes()
    assert _temps(tmp_path) == []
    gguf_format.export_gguf(tiny_model_dir, out, "f32", overwrite=True)  # --force: replaced
    assert out.read_bytes() != first


# ---- readers of a folder being written ---------------------------------------------------------
def test_a_fine_tune_saving_its_first_model_is_said_to_be_saving(tmp_path, tiny_model_dir):
    """Pass 10, finding 5: a reader of a fine-tune's run dir during its first save (base.json
    written, adapter/ not yet) was told to restore adapter/, as if the run had crashed."""
    from gpt1.core.io import exclusive
    from gpt1.formats.modeldir import load_model

    run = tmp_path / "ft"
    shutil.copytree(tiny_model_dir, run)
    (run / "base.json").write_text(json.dumps({"path": str(tiny_model_dir)}))
    with exclusive(run / "checkpoints", "training"):
        with pytest.raises(Gpt1Error, match=rf"ft: a fine-tuning run \(process {os.getpid()}\) is saving its first "
                                            r"model there \(no adapter/ yet\); try again after its first save"):
            load_model(run)
    with pytest.raises(Gpt1Error, match=r"without its adapter/ folder; restore adapter/"):  # killed in that save
        load_model(run)


def test_a_data_dir_that_prepare_is_writing_is_said_to_be_written(tmp_path):
    """Pass 10, finding 6: `pretrain --data DIR` while `gpt1 prepare` wrote DIR said "rerun it to
    resume", and the rerun was refused because a prepare was running."""
    from gpt1.core.io import exclusive
    from gpt1.data.shards import load_meta

    out = tmp_path / "data"
    with exclusive(out, "preparing data"):
        (out / "train.bin.partial").write_bytes(b"")
        with pytest.raises(Gpt1Error, match=rf"data: `gpt1 prepare` \(process {os.getpid()}\) is writing it "
                                            r"\(no meta.json yet\); wait for it to end"):
            load_meta(out)
    with pytest.raises(Gpt1Error, match=r"no meta.json: .*\(rerun it to resume\)"):  # killed: a rerun resumes
        load_meta(out)


# ---- a prepare stopped at its last step ----------------------------------------------------------
PREPARE = ("import sys; from gpt1.core.tokenizer import Tokenizer; from gpt1.data.shards import prepare; "
           "prepare([sys.argv[1]], Tokenizer.load(sys.argv[2]), sys.argv[3], val=float(sys.argv[4]), batch_docs=4)")


def _stop_prepare_at_its_end(how: str, corpus: Path, tokenizer, tokenizer_dir: Path, out: Path, val: float,
                             monkeypatch) -> None:
    """Run a prepare into `out` that stops after tokenizing everything: killed once its shards
    have their final names, a full disk at meta.json, or a tokenizer.json it cannot write."""
    from gpt1.data import shards

    if how == "killed":
        killed = subprocess.run([sys.executable, "-c", PREPARE, str(corpus), str(tokenizer_dir), str(out), str(val)],
                                env={**os.environ, "GPT1_CRASH_AT": "prepare-finish"}, capture_output=True, text=True,
                                timeout=120)
        assert killed.returncode == 137, killed.stderr
        return
    if how == "full disk at meta.json":
        real = shards.write_json

        def full_disk(path, obj):
            if Path(path).name == "meta.json":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            real(path, obj)

        monkeypatch.setattr(shards, "write_json", full_disk)
        with pytest.raises(OSError, match="No space left"):
            shards.prepare([str(corpus)], tokenizer, out, val=val, batch_docs=4)
        monkeypatch.undo()
        return
    (out / "tokenizer.json").mkdir(parents=True)  # in the way of the write: a real failure
    with pytest.raises(Gpt1Error, match="tokenizer.json: is a folder"):
        shards.prepare([str(corpus)], tokenizer, out, val=val, batch_docs=4)
    (out / "tokenizer.json").rmdir()


@pytest.mark.parametrize("val", [0.3, 3])
@pytest.mark.parametrize("how", ["killed", "full disk at meta.json", "tokenizer.json in the way"])
def test_a_prepare_stopped_at_its_last_step_finishes_without_tokenizing_again(
        how, val, corpus_dir, tokenizer, tokenizer_dir, tmp_path, monkeypatch, caplog):
    """Pass 10, finding 3: a prepare that failed at tokenizer.json or meta.json (a full disk) had
    already renamed its partial shards; the rerun said "partial files are missing; starting over"
    and tokenized the whole corpus again (hours on a large one). It now finishes from there."""
    from gpt1.data.shards import prepare

    corpus, out = corpus_dir / "json", tmp_path / "out"
    _stop_prepare_at_its_end(how, corpus, tokenizer, tokenizer_dir, out, val, monkeypatch)
    assert not (out / "meta.json").exists() and (out / "prepare-state.json").is_file()
    encoded = []
    real_encode = tokenizer.encode_batch
    monkeypatch.setattr(tokenizer, "encode_batch", lambda texts: encoded.append(len(texts)) or real_encode(texts))
    with caplog.at_level("INFO", logger="gpt1"):
        resumed = prepare([str(corpus)], tokenizer, out, val=val, batch_docs=4)
    assert encoded == [] and "starting over" not in caplog.text, caplog.text
    monkeypatch.undo()
    clean = prepare([str(corpus)], tokenizer, tmp_path / "clean", val=val, batch_docs=4)
    assert resumed["train"] == clean["train"] and resumed["val"] == clean["val"]
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    assert sorted(p.name for p in out.iterdir()) == [".lock", "meta.json", "tokenizer.json", "train.bin", "val.bin"]


# ---- Hugging Face import ----------------------------------------------------------------------
def test_differing_gpt2_dropout_rates_are_said_to_become_one(caplog):
    """From pass 10's chain report, finding 2: gpt1 keeps resid_pdrop as its one dropout rate and
    dropped attn_pdrop / embd_pdrop silently."""
    import transformers

    from gpt1.formats.hf import config_from_hf

    sizes = dict(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    with caplog.at_level("WARNING", logger="gpt1"):
        config = config_from_hf(transformers.GPT2Config(**sizes, resid_pdrop=0.1, attn_pdrop=0.2, embd_pdrop=0.1),
                                "gpt2/config.json")
    assert config.dropout == 0.1
    # gpt1's records only: transformers' own warnings reach the root logger too, once a test before
    # this one made its logger propagate.
    assert [r.message for r in caplog.records if r.name.startswith("gpt1")] == [
        "gpt2/config.json: GPT-2's dropout rates differ (resid_pdrop 0.1, attn_pdrop 0.2, embd_pdrop 0.1); "
        "gpt1 has one rate for all three and keeps resid_pdrop, 0.1"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="gpt1"):
        config_from_hf(transformers.GPT2Config(**sizes), "gpt2/config.json")  # 0.1 everywhere, GPT-2's own
    assert [r for r in caplog.records if r.name.startswith("gpt1")] == []


def test_a_merge_leaves_a_folder_that_appeared_while_it_loaded(tmp_path, tiny_config, tokenizer, monkeypatch):
    """`finetune --merge` checked its destination before loading the model only: a folder made
    meanwhile counted as found at the start (an earlier merge) and was replaced."""
    import gpt1.train.finetune as finetune
    from tests.model_factories import finetuned_dir

    source = tmp_path / "chat"
    finetuned_dir(source, tiny_config, tokenizer, seed=4)
    dest = tmp_path / "merged"
    _during(monkeypatch, finetune, "load_model", lambda: (dest.mkdir(), (dest / "notes.txt").write_text("mine")))
    with pytest.raises(Gpt1Error, match="merged: holds other files, not an earlier merged model"):
        finetune.merge_model_dir(source, dest)
    assert [p.name for p in dest.iterdir()] == ["notes.txt"] and _temps(tmp_path) == []


# An adapter file replaced between load_adapter's two reads of it.

def test_an_adapter_file_gone_between_its_two_reads_is_one_clear_error(tiny_config, tokenizer, tmp_path, monkeypatch):
    """load_adapter reads the adapter's file twice (its names, then its tensors): a folder replaced
    in between (where the one-step exchange is not available) gave safetensors' raw traceback."""
    import gpt1.core.lora as lora
    from gpt1.core.errors import Gpt1Error
    from tests.model_factories import model_without_stops

    model = lora.inject_lora(model_without_stops(tiny_config, tokenizer, seed=1), lora.LoRAConfig(r=2))
    lora.save_adapter(model, tmp_path / "adapter")
    read = lora._read_adapter

    def read_then_lose(directory):
        found = read(directory)
        (directory / lora.ADAPTER_WEIGHTS).unlink()
        return found

    monkeypatch.setattr(lora, "_read_adapter", read_then_lose)
    with pytest.raises(Gpt1Error, match=r"adapter_model.safetensors: not a readable safetensors file .*; if its "
                                        r"folder was being replaced, try again"):
        lora.load_adapter(model_without_stops(tiny_config, tokenizer, seed=1), tmp_path / "adapter")
