"""Pass 22, the owner's fixes: keep_best turned on by a resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_config_pass21 import _stopped
from tests.test_train import _metrics, _run


def test_keep_best_turned_on_by_a_resume_writes_best_from_there(data_dir, tmp_path, stop_training_at, monkeypatch,
                                                                 caplog):
    """The lowest validation before the resume (keep_best off, its model gone) stayed the lowest: a
    run whose later losses were higher never wrote RUN/best, and its last line named it anyway."""
    # A rate this high makes the loss climb after its first steps: the lowest is before the resume.
    args = ["max_steps=6", "eval_every=1", "save_every=2", "eval_batches=1", "lr=0.5", "min_lr=0.5", "warmup=0"]
    run = tmp_path / "run"
    _stopped(data_dir, run, stop_training_at, monkeypatch, args, at=3)  # checkpoint 2, no best/
    before = _metrics(run)
    with caplog.at_level("INFO", logger="gpt1"):
        result = _run(data_dir, run, [*args, "keep_best=true"])
    after = [m for m in _metrics(run) if m["step"] > 2 and "val_loss" in m]
    warnings = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"keep_best=true from step 2: step {before[-1]['best_step']}'s val loss "
                        f"({before[-1]['best_val_loss']:.4f}) was the lowest while keep_best was off, and its "
                        f"model was not kept; {run / 'best'} will hold the lowest validation from here on"]
    assert (run / "best").is_dir()
    lowest = min(after, key=lambda m: m["val_loss"])
    assert after[-1]["best_step"] == lowest["step"] and after[-1]["best_val_loss"] == lowest["val_loss"]
    assert result.best_step == lowest["step"]


# ---- the engine's prefill: its cost bounded with the padding, first come first served -----------

def _forward_shapes(model) -> tuple[list[tuple[int, int]], object]:
    """The (rows, columns) of every forward the model runs (a hook: the real model runs)."""
    shapes: list[tuple[int, int]] = []
    handle = model.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    return shapes, handle


def test_a_prefill_forward_costs_at_most_the_chunk_padding_included(tiny_config, tokenizer):
    """Three 2-token prompts, then a 40-token one, with prefill_chunk 16: the budget counted prompt
    tokens (6 + 10), but shorter chunks are padded to the longest, so the forward was 4 x 10 = 40
    positions (8 x 200 with the server's 256: a stall longer than prefilling the long prompt whole)."""
    from gpt1.core.sampling_params import SamplingParams
    from gpt1.inference.engine import Engine
    from gpt1.inference.generate import generate
    from tests.model_factories import model_without_stops
    from tests.test_engine import TEXT, Collector, run_until_idle, submit

    model = model_without_stops(tiny_config, tokenizer, seed=11)
    ids = tokenizer.encode(TEXT)
    prompts = [ids[i:i + 2] for i in range(3)] + [ids[:40]]
    engine = Engine(model, tokenizer, max_batch=8, max_queue=8, prefill_chunk=16, cuda_graphs=False,
                    tune_threads=False)
    greedy = SamplingParams(temperature=0, max_new_tokens=4)
    collector = Collector()
    shapes, handle = _forward_shapes(model)
    try:
        for key, prompt in enumerate(prompts):
            submit(engine, collector, key, prompt, greedy)
        run_until_idle(engine)
    finally:
        handle.remove()
    prefills = [(rows, cols) for rows, cols in shapes if cols > 1]
    assert prefills and all(rows * cols <= 16 for rows, cols in prefills), prefills
    assert sum(rows for rows, _ in prefills) >= 4  # every prompt was prefilled
    for key, prompt in enumerate(prompts):  # and each reply is its own alone
        assert collector.text(key) == generate(model, tokenizer, prompt, greedy).text


def test_prompts_are_prefilled_in_the_order_they_came(tiny_config, tokenizer):
    """A, then B, two long prompts behind a short request: when the short one ended, the newest
    row (B) moved into its slot, and slot order gave B every step's budget while A waited."""
    from gpt1.core.sampling_params import SamplingParams
    from gpt1.inference.engine import Engine
    from tests.model_factories import model_without_stops
    from tests.test_engine import TEXT, Collector

    model = model_without_stops(tiny_config, tokenizer, seed=11)
    ids = tokenizer.encode(TEXT)
    engine = Engine(model, tokenizer, max_batch=4, max_queue=4, prefill_chunk=8, cuda_graphs=False,
                    tune_threads=False)
    collector, first_at = Collector(), {}
    greedy = SamplingParams(temperature=0, max_new_tokens=3)
    for key, prompt in enumerate([ids[:3], ids[:40], ids[5:45]]):  # short, A, B
        engine.submit([prompt], SamplingParams(temperature=0, max_new_tokens=1) if key == 0 else greedy,
                      lambda _, key=key: collector.sink_for(key))
    for step in range(100):
        if not engine.busy:
            break
        engine.step()
        for key in collector.chunks:
            first_at.setdefault(key, step)
    assert first_at[0] < first_at[1] < first_at[2], first_at


def test_the_choices_of_one_prompt_share_its_prefill(tiny_config, tokenizer):
    """n = 4 choices of one 40-token prompt were prefilled four times (4 x 5 chunks of 8). Now once,
    copied into the other slots; each seeded choice still gives what it gives alone, and a leader
    cancelled mid-prefill leaves its twins to prefill themselves."""
    from gpt1.core.sampling_params import SamplingParams
    from gpt1.inference.engine import Engine
    from gpt1.inference.generate import generate
    from tests.model_factories import model_without_stops
    from tests.test_engine import TEXT, Collector, run_until_idle

    model = model_without_stops(tiny_config, tokenizer, seed=11)
    prompt = tokenizer.encode(TEXT)[:40]
    knobs = [SamplingParams(temperature=0.9, seed=seed, max_new_tokens=5) for seed in (1, 2, 3, 4)]
    alone = [generate(model, tokenizer, prompt, k).text for k in knobs]
    for cancel_first in (False, True):
        engine = Engine(model, tokenizer, max_batch=4, max_queue=4, prefill_chunk=8, cuda_graphs=False,
                        tune_threads=False)
        collector = Collector()
        shapes, handle = _forward_shapes(model)
        try:
            requests = engine.submit([prompt] * 4, knobs, collector.sink_for)
            if cancel_first:
                engine.step()  # the first chunk of the leader's prefill
                requests[0].cancel()
            run_until_idle(engine)
        finally:
            handle.remove()
        prefilled = sum(rows * cols for rows, cols in shapes if cols > 1)
        if cancel_first:
            assert collector.finish(0) == "cancelled"
            assert [collector.text(k) for k in (1, 2, 3)] == alone[1:]
            assert prefilled <= 8 + 40  # the leader's one chunk, then one twin's prefill for the other two
        else:
            assert [collector.text(k) for k in range(4)] == alone
            assert prefilled == 40, shapes
        assert engine.free_slots == 4


def test_weights_swapped_in_again_add_no_state_dict_hooks(tiny_config, tokenizer):
    """A notebook loading checkpoints into one model (load_state_dict(assign=True)) and generating
    after each: every generate added one state_dict hook per Linear (2,709 after 300 swaps)."""
    from gpt1.inference.engine import store_weights_column_major
    from tests.model_factories import model_without_stops

    model = model_without_stops(tiny_config, tokenizer, seed=11)
    fresh = {k: v.clone().contiguous() for k, v in model.state_dict().items()}

    def hooks() -> int:
        return sum(len(m._state_dict_hooks) for m in model.modules())

    store_weights_column_major(model)
    once = hooks()
    for _ in range(3):
        model.load_state_dict({k: v.clone() for k, v in fresh.items()}, assign=True)
        store_weights_column_major(model)
    assert hooks() == once
    assert all(v.is_contiguous() for v in model.state_dict().values())


def test_annotations_accept_what_the_docs_do_with_streams_paths_and_sequences():
    """A stream annotated Iterator made the documented `s.close()` (and contextlib.closing) a type
    error; ModelConfig.save/load refused an os.PathLike, encode_batch a tuple: all run."""
    import collections.abc
    import typing

    import gpt1.inference.generate as gen
    from gpt1.core.config import ModelConfig
    from gpt1.core.tokenizer import Tokenizer
    from gpt1.inference.llm import LLM
    from tests.test_api_pass14 import _fits, _PathLike

    for function in (gen.stream, gen.stream_batch, LLM.stream, LLM.chat_stream):
        assert typing.get_origin(typing.get_type_hints(function)["return"]) is collections.abc.Generator
    for function in (ModelConfig.save, ModelConfig.load):
        assert _fits(function, "path", _PathLike())
    assert _fits(Tokenizer.encode_batch, "texts", ("a", "b"))


def test_a_suite_report_is_not_written_into_the_best_of_a_run_still_training(tiny_model_dir, tmp_path, capsys):
    """`gpt1 eval --suite RUN/best` wrote report.md into best/, which the training run replaces at
    each new lowest loss: the report was deleted (5 times in 6), or its write ended the run."""
    import shutil
    import subprocess
    import sys

    from tests.test_battery import assert_one_clear_line, run_main
    from tests.test_fs_train import HOLD_LOCK

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


def test_eval_on_another_preparation_of_the_corpus_says_it_is_not_held_out(data_dir, corpus_dir, tokenizer, tmp_path,
                                                                          caplog):
    """`gpt1 eval --data DIR` called any val.bin held out: the corpus prepared with another seed held
    out 16 documents, all 16 in the model's training data, and nothing said so."""
    import gpt1
    from gpt1.data.shards import prepare
    from gpt1.train.evaluate import evaluate_data
    from tests.test_train import _run

    _run(data_dir, tmp_path / "run", ["max_steps=1", "eval_batches=1"])
    other = tmp_path / "other"
    prepare([str(corpus_dir)], tokenizer, other, val=8, seed=7)
    llm = gpt1.load(tmp_path / "run", device="cpu")
    with caplog.at_level("INFO", logger="gpt1"):
        evaluate_data(llm, data_dir, show_progress=False, max_batches=1)  # the warning comes before the scoring
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    with caplog.at_level("INFO", logger="gpt1"):
        evaluate_data(llm, other, show_progress=False, max_batches=1)
    assert [r.message for r in caplog.records if r.levelname == "WARNING"] == [
        f"{other / 'val.bin'} is not the validation split {llm.path} was trained beside (its train_config.json "
        "records another one): its documents may be in the model's training data, so this is not a held-out score"]


# ---- the engine process: started again after a stop or a failed start; its pipes closed -----

def _open_fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")
def test_an_engine_process_starts_again_after_a_stop_or_a_failed_start(tiny_model_dir):
    """A process-engine app served a second time (or after a failed start) answered every request
    503 ("the server is shutting down"), having started without a word; and each stopped engine
    kept its two pipe descriptors until garbage-collected."""
    import gpt1
    from gpt1.core.errors import Gpt1Error
    from gpt1.core.sampling_params import SamplingParams
    from gpt1.inference.engine_process import EngineProcess
    from tests.test_engine_process import Outputs

    llm = gpt1.load(tiny_model_dir, device="cpu")
    engine = EngineProcess(llm.path, llm.tokenizer, llm.config, device="cpu", max_batch=2, max_queue=2)
    before = _open_fds()
    for _ in range(2):
        with engine:
            outputs = Outputs(1)
            engine.submit([llm.tokenizer.encode("def")], SamplingParams(temperature=0, max_new_tokens=2),
                          outputs.sink_for())
            outputs.wait()
            assert outputs.items[0][-1].finish_reason == "length"
        assert _open_fds() == before  # the pipes closed with the stop, not at garbage collection
    failing = EngineProcess(llm.path, llm.tokenizer, llm.config, device="cpu", max_batch=10**9, max_queue=0)
    for _ in range(2):  # the same reason each time, not a server that answers 503
        with pytest.raises(Gpt1Error):
            failing.start()
        assert _open_fds() == before


def test_serve_closes_its_port_when_the_engine_does_not_start(tiny_model_dir, monkeypatch, capsys):
    """The port is bound before the engine starts (a taken port is said at once): an engine whose
    start failed, or a signal during it, left the socket to the garbage collector (a
    ResourceWarning in dev mode, the port held until then)."""
    import gc
    import warnings

    from gpt1.cli import main
    from gpt1.core.errors import Gpt1Error
    from gpt1.inference.engine_process import EngineProcess

    def fails(self):
        raise Gpt1Error("the engine could not start")

    monkeypatch.setattr(EngineProcess, "start", fails)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        rc = main(["serve", "--model", str(tiny_model_dir), "--engine", "process", "--port", "0", "--device", "cpu"])
        gc.collect()
    assert rc == 2 and "the engine could not start" in capsys.readouterr().err
    assert not [w for w in caught if issubclass(w.category, ResourceWarning) and "socket" in str(w.message)]


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


def test_a_prefill_forward_reads_a_bounded_number_of_keys(tiny_config, tokenizer, monkeypatch):
    """Short prompts beside a long prompt's last chunk: each row read (and the gather copied) the
    keys up to the long one's context; 16 x 8 positions over 1,800 keys took 3.5x a full chunk.
    rows x the longest context stays under PREFILL_KEYS chunks unless one row alone reads more."""
    import torch

    from gpt1.core.model import SlotCache
    from gpt1.core.sampling_params import SamplingParams
    from gpt1.inference.engine import PREFILL_KEYS, Engine
    from gpt1.inference.generate import generate
    from tests.model_factories import model_without_stops
    from tests.test_engine import TEXT, Collector, run_until_idle, submit

    model = model_without_stops(tiny_config, tokenizer, seed=11)
    ids = tokenizer.encode(TEXT)
    chunk = 16
    engine = Engine(model, tokenizer, max_batch=12, max_queue=12, prefill_chunk=chunk, cuda_graphs=False,
                    tune_threads=False)
    reads: list[tuple[int, int, int]] = []  # (rows, columns, key_len) of each prefill forward
    prepare = SlotCache.prepare

    def spy(self, rows, positions, key_len):
        if isinstance(rows, torch.Tensor):  # a prefill's rows (a decode step reads a slice of the pool)
            reads.append((len(rows), positions.shape[1], key_len))
        return prepare(self, rows, positions, key_len)

    monkeypatch.setattr(SlotCache, "prepare", spy)
    greedy = SamplingParams(temperature=0, max_new_tokens=2)
    collector = Collector()
    prompts = [ids[:49]] + [ids[i:i + 1] for i in range(10)]  # a long prompt, then ten of one token
    submit(engine, collector, 0, prompts[0], greedy)
    for _ in range(3):  # the long prompt up to its last chunk (of one token), in chunks of 16
        engine.step()
    for key, prompt in enumerate(prompts[1:], start=1):
        submit(engine, collector, key, prompt, greedy)
    run_until_idle(engine)
    prefills = [(rows, key_len) for rows, _, key_len in reads if rows > 1]
    assert prefills and all(rows * key_len <= PREFILL_KEYS * chunk for rows, key_len in prefills), prefills
    for key, prompt in enumerate(prompts):
        assert collector.text(key) == generate(model, tokenizer, prompt, greedy).text


def test_a_keep_best_run_goes_on_when_another_process_writes_into_best(data_dir, tmp_path, monkeypatch, caplog):
    """`gpt1 eval --suite RUN/best` wrote report.md into best/ while the run replaced it: the run
    stopped ("another process wrote there while this command was writing it"), before its first
    checkpoint. best/ is the run's own now: replaced whole, the foreign file dropped with a warning."""
    import shutil

    from tests.test_train import _run

    run = tmp_path / "run"
    copy = shutil.copyfile

    def copy_while_another_writes(src, dst, *args, **kwargs):  # best/'s last file, as eval writes its report
        result = copy(src, dst, *args, **kwargs)
        if (run / "best").is_dir() and str(dst).endswith("train_config.json") and "best" in str(dst):
            (run / "best" / "report.md").write_text("# Evaluation of run/best\n")
        return result

    monkeypatch.setattr(shutil, "copyfile", copy_while_another_writes)
    with caplog.at_level("INFO", logger="gpt1"):
        result = _run(data_dir, run, ["max_steps=3", "eval_every=1", "eval_batches=1", "keep_best=true",
                                      "lr=3e-3"])
    assert result.steps == 3 and (run / "best" / "model.safetensors").is_file()
    assert any("report.md" in r.message for r in caplog.records if r.levelname == "WARNING")


def test_keep_best_back_on_keeps_the_best_that_best_holds(data_dir, tmp_path, stop_training_at, monkeypatch, caplog):
    """on to step 2 (best/ written), off from 2 to 4, on again from 4: the resume that turned it
    back on took the lowest (step 2's, in best/) for one reached while it was off, started over,
    and a worse model replaced the one best/ held."""
    from tests.test_config_pass21 import _stopped
    from tests.test_train import _metrics, _run

    args = ["max_steps=6", "eval_every=1", "save_every=2", "eval_batches=1", "lr=0.5", "min_lr=0.5", "warmup=0"]
    run = tmp_path / "run"
    _stopped(data_dir, run, stop_training_at, monkeypatch, [*args, "keep_best=true"], at=3)  # checkpoint 2
    kept = {p.name: p.read_bytes() for p in (run / "best").iterdir()}
    lowest = _metrics(run)[-1]
    stop_training_at(3, KeyboardInterrupt)  # the resume (from 2) killed in its step 5: checkpoint 4
    with pytest.raises(KeyboardInterrupt):
        _run(data_dir, run, [*args, "keep_best=false"])
    monkeypatch.undo()
    with caplog.at_level("INFO", logger="gpt1"):
        result = _run(data_dir, run, [*args, "keep_best=true"])
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "keep_best=true from" in r.message]
    later = [m["val_loss"] for m in _metrics(run) if m["step"] > 2 and "val_loss" in m]
    if min(later) >= lowest["best_val_loss"]:  # the rate this high makes the loss climb: best/ stays
        assert {p.name: p.read_bytes() for p in (run / "best").iterdir()} == kept
        assert result.best_step == lowest["best_step"]
