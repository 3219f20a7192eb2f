"""A run's best model and early stop (`keep_best`, `early_stop`), the checkpoints it keeps
(`keep_checkpoints`), the model's dropout (`dropout`), and what `gpt1 pretrain` says of its
`init_from` (a GPT-2 import without a gpt1 tokenizer, its shape keys) and when it says it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: everything here is local

import pytest
import torch
from safetensors.torch import load_file

import gpt1
from gpt1.cli import main
from gpt1.core.errors import Gpt1Error
from gpt1.data.shards import fixed_windows, load_meta
from gpt1.train import checkpoint
from gpt1.train.config import TrainConfig, load_config
from gpt1.train.evaluate import evaluate_chat, evaluate_loss
from gpt1.train.finetune import FinetuneConfig, finetune
from gpt1.train.pretrain import init_model, pretrain
from tests.conftest import TEST_VOCAB
from tests.test_finetune import RUN as FT_RUN
from tests.test_finetune import _oasst_file

TINY = ["model=tiny", "block_size=32", "batch_size=4", "eval_batches=2", "device=cpu"]
# lr 0.1 without warmup or decay: the validation loss is lowest after the first step and far
# above it (by 4 nats and more) at every later one, so the run overfits at once, as a 60-epoch
# fine-tune of 46 chats did at step 25 of 360.
OVERFIT = [*TINY, "max_steps=12", "eval_every=1", "save_every=1", "lr=0.1", "min_lr=0.1", "warmup=0",
           "keep_best=true", "early_stop=3", "keep_checkpoints=2"]


def _cfg(overrides: list[str]) -> TrainConfig:
    return load_config(TrainConfig, None, overrides)


def _validations(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["val_loss"] for m in lines if "val_loss" in m}


def _val_loss(model_dir: Path, data_dir: Path) -> float:
    """The loss of the model in `model_dir` on the windows the run validates on."""
    val = fixed_windows(data_dir / load_meta(data_dir)["val"]["file"], 32, 4, 2, vocab_size=TEST_VOCAB)
    loss, _ = evaluate_loss(gpt1.load(model_dir, device="cpu").model, val, torch.device("cpu"))
    return loss


@pytest.fixture(scope="module")
def overfit_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("overfit") / "run"
    return out, pretrain(_cfg(OVERFIT), data_dir, out)


def test_an_overfitting_run_keeps_its_best_model_and_stops_early(overfit_run, data_dir):
    out, result = overfit_run
    vals = _validations(out)
    best_step = min(vals, key=vals.get)
    assert result.steps < 12, vals  # stopped early
    # The run ended after early_stop=3 validations in a row without a new lowest loss.
    assert (result.best_step, result.best_val_loss) == (best_step, vals[best_step])
    assert result.steps == best_step + 3 and all(vals[s] > vals[best_step] for s in vals if s > best_step)
    # best/ is a model dir holding the model of that validation; the run dir's own is the last step's.
    assert _val_loss(out / "best", data_dir) == pytest.approx(result.best_val_loss, abs=1e-6)
    assert _val_loss(out, data_dir) == pytest.approx(result.val_loss, abs=1e-6)
    assert result.val_loss > result.best_val_loss + 1
    # The metrics say where the best is at every validation; the two newest checkpoints are kept.
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert (last["best_step"], last["best_val_loss"]) == (best_step, vals[best_step])
    assert [checkpoint.checkpoint_step(c) for c in checkpoint.list_checkpoints(out)] == [result.steps - 1, result.steps]


def test_a_rerun_of_an_early_stopped_run_is_that_of_a_finished_run(overfit_run, data_dir, caplog):
    out, result = overfit_run
    assert result.steps < 12
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    with caplog.at_level("INFO", logger="gpt1"):
        again = pretrain(_cfg(OVERFIT), data_dir, out)
    assert (again.steps, again.resumed_from, again.best_step, again.best_val_loss) == (
        result.steps, result.steps, result.best_step, result.best_val_loss)
    assert f"already finished its {result.steps} steps; nothing to do" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_a_run_killed_before_its_early_stop_resumes_to_the_same_best_and_stop(overfit_run, data_dir, tmp_path,
                                                                              stop_training_at, monkeypatch):
    """The lowest loss, its step and the validations since are in the checkpoint: a resumed run
    does not take its first validation for a new best (and overwrite best/ with a worse model)."""
    reference, result = overfit_run
    out = tmp_path / "run"
    stop_training_at(3, KeyboardInterrupt)  # in step 3, after the step-2 checkpoint
    with pytest.raises(KeyboardInterrupt):
        pretrain(_cfg(OVERFIT), data_dir, out)
    monkeypatch.undo()
    resumed = pretrain(_cfg(OVERFIT), data_dir, out)
    assert resumed.resumed_from == 2
    assert (resumed.steps, resumed.best_step, resumed.best_val_loss) == (result.steps, result.best_step,
                                                                          result.best_val_loss)
    assert _validations(out) == _validations(reference)
    best, expected = (load_file(run / "best" / "model.safetensors") for run in (out, reference))
    assert best.keys() == expected.keys() and all(torch.equal(best[k], expected[k]) for k in best)


def test_a_fresh_start_drops_the_best_of_an_attempt_that_saved_no_checkpoint(data_dir, tmp_path, stop_training_at,
                                                                             monkeypatch):
    out = tmp_path / "run"
    stop_training_at(2, KeyboardInterrupt)  # after step 1's validation wrote best/, before the first checkpoint
    with pytest.raises(KeyboardInterrupt):
        pretrain(_cfg([*TINY, "max_steps=3", "eval_every=1", "save_every=3", "keep_best=true"]), data_dir, out)
    monkeypatch.undo()
    assert (out / "best" / "model.safetensors").is_file() and checkpoint.latest_checkpoint(out) is None
    pretrain(_cfg([*TINY, "max_steps=3", "eval_every=3"]), data_dir, out)  # another recipe starts over
    assert not (out / "best").exists()


def test_a_finetunes_best_is_a_chat_model_dir_that_scores_its_validation(tiny_model_dir, tmp_path):
    """RUN/best holds what a fine-tune's model dir holds (adapter, base.json, chat template, the
    run's train_config.json): `gpt1 generate --model RUN/best --chat` and `eval --chat` take it."""
    data, out = _oasst_file(tmp_path / "oasst.jsonl"), tmp_path / "ft"
    cfg = load_config(FinetuneConfig, None, [*FT_RUN, "max_steps=4", "eval_every=1", "save_every=2", "lr=3",
                                             "keep_best=true"], data=str(data))
    result = finetune(cfg, tiny_model_dir, out)
    llm = gpt1.load(out / "best", device="cpu")
    assert llm.is_chat_model and (out / "best" / "adapter").is_dir()
    # The run's held-out conversations, as the run's validation batched them: the best loss exactly.
    scored = evaluate_chat(llm, str(data), batch_size=4, max_batches=2, show_progress=False)
    assert "held-out" in scored.source and scored.loss == pytest.approx(result.best_val_loss, abs=1e-6)
    assert result.best_val_loss == min(_validations(out).values())
    assert main(["generate", "--model", str(out / "best"), "--chat", "--prompt", "Hi", "--max-new-tokens", "2",
                 "--device", "cpu"]) == 0


def test_keys_of_keeping_and_stopping_are_checked():
    cfg = TrainConfig()
    assert (cfg.keep_best, cfg.early_stop, cfg.keep_checkpoints, cfg.dropout) == (False, 0, 1, -1.0)
    for override, pattern in [("keep_checkpoints=0", "keep_checkpoints must be at least 1"),
                              ("early_stop=-1", "early_stop must be >= 0"),
                              ("dropout=1", r"dropout is a rate in \[0, 1\)"),
                              ("dropout=-0.5", r"dropout is a rate in \[0, 1\)")]:
        with pytest.raises(Gpt1Error, match=pattern):
            _cfg([override])


# ---- dropout ----------------------------------------------------------------------------------

def _gpt2_folder(path: Path, tokenizer=None) -> Path:
    """A random GPT-2 saved by transformers, at its default dropout (0.1), with `tokenizer` or none."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=TEST_VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save(path)
    return path


def _drops(model) -> bool:
    """Whether two forwards in training mode differ: the model drops activations."""
    x = torch.randint(0, TEST_VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.no_grad():
        return not torch.equal(model(x), model(x))


def test_dropout_of_a_gpt2_import_is_its_own_unless_the_key_sets_it(tmp_path, tokenizer):
    folder = _gpt2_folder(tmp_path / "gpt2", tokenizer)
    own = init_model(_cfg([f"init_from=hf:{folder}"]), tokenizer)
    assert own.config.dropout == pytest.approx(0.1) and _drops(own)
    off = init_model(_cfg([f"init_from=hf:{folder}", "dropout=0"]), tokenizer)
    assert off.config.dropout == 0.0 and not _drops(off)
    assert all(m.p == 0.0 for m in off.modules() if isinstance(m, torch.nn.Dropout))
    on = init_model(_cfg(["dropout=0.2"]), tokenizer)  # from scratch
    assert on.config.dropout == pytest.approx(0.2) and _drops(on)


def test_a_run_with_dropout_records_it_and_says_it(data_dir, tmp_path, caplog):
    with caplog.at_level("INFO", logger="gpt1"):
        pretrain(_cfg([*TINY, "max_steps=1", "dropout=0.1"]), data_dir, tmp_path / "run")
    assert gpt1.load(tmp_path / "run", device="cpu").config.dropout == pytest.approx(0.1)
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["config"]["dropout"] == 0.1
    (line,) = [r.message for r in caplog.records if r.message.startswith("model: ")]
    assert "(tiny, dropout 0.1); " in line


def test_a_gpt2_import_without_a_gpt1_tokenizer_is_said(tmp_path, tokenizer, caplog):
    with caplog.at_level("WARNING", logger="gpt1"):
        init_model(_cfg([f"init_from=hf:{_gpt2_folder(tmp_path / 'with', tokenizer)}"]), tokenizer)
    assert "no gpt1 tokenizer" not in caplog.text
    folder = _gpt2_folder(tmp_path / "without")
    with caplog.at_level("WARNING", logger="gpt1"):
        init_model(_cfg([f"init_from=hf:{folder}"]), tokenizer)
    (warning,) = [r.message for r in caplog.records if "no gpt1 tokenizer" in r.message]
    assert warning == (f"init_from=hf:{folder} has no gpt1 tokenizer: the data's token ids name other strings than "
                       "its embeddings and head learned; only the blocks carry over (docs/interop.md)")


# ---- init_from and the run's announcement --------------------------------------------------------

def test_shape_keys_equal_to_init_froms_are_accepted_and_others_named(tiny_model_dir, tokenizer):
    model = init_model(_cfg([f"init_from={tiny_model_dir}", "n_layer=2", "n_head=4", "n_embd=64"]), tokenizer)
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (2, 4, 64)
    with pytest.raises(Gpt1Error, match=r"^n_layer=3, n_embd=96: init_from=.* is 2 layers x 64 wide, 4 heads, and "
                                        r"init_from decides the model; leave n_layer and n_embd out, or set "
                                        r"n_layer=2, n_embd=64$"):
        init_model(_cfg([f"init_from={tiny_model_dir}", "n_layer=3", "n_head=4", "n_embd=96"]), tokenizer)


def test_a_refused_resume_does_not_announce_the_run(data_dir, tmp_path, caplog):
    with caplog.at_level("INFO", logger="gpt1"):
        pretrain(_cfg([*TINY, "max_steps=1"]), data_dir, tmp_path / "run")
    assert [r for r in caplog.records if r.message.startswith("model: ")]
    caplog.clear()
    with caplog.at_level("INFO", logger="gpt1"), pytest.raises(Gpt1Error, match="holds a run with a different config"):
        pretrain(_cfg([*TINY, "max_steps=1", "lr=1e-3"]), data_dir, tmp_path / "run")
    assert not [r for r in caplog.records if r.message.startswith("model: ")]


def test_another_tools_name_for_a_key_says_gpt1s_and_r_0_says_there_is_no_full_fine_tuning():
    """`max_iters=` (nanoGPT), `learning_rate=` (Hugging Face), `early_stopping_patience=` got only the
    list of known keys; `lora_r=0`, how some tools ask for full fine-tuning, only "a positive integer"."""
    from gpt1.train.config import TrainConfig, load_config
    from gpt1.train.finetune import FinetuneConfig

    for key, ours in (("max_iters", "max_steps"), ("learning_rate", "lr"),
                      ("early_stopping_patience", "early_stop: validations, not steps"),
                      ("warmup_iters", "warmup: a fraction of the run's steps, e.g. warmup=0.05")):
        with pytest.raises(Gpt1Error, match=rf"unknown key '{key}' \(gpt1's is {re.escape(ours)}\); known keys: "):
            load_config(TrainConfig, None, [f"{key}=3"])
    with pytest.raises(Gpt1Error, match=r"unknown key 'r'; known keys"):  # a pretraining run has no lora_r
        load_config(TrainConfig, None, ["r=8"])
    with pytest.raises(Gpt1Error, match=r"unknown key 'r' \(gpt1's is lora_r\)"):
        load_config(FinetuneConfig, None, ["r=8"])
    with pytest.raises(Gpt1Error, match=r"^LoRA rank r must be a positive integer, got 0 \(for full fine-tuning, "
                                        r"which trains every weight: full=true\)$"):
        load_config(FinetuneConfig, None, ["lora_r=0"]).lora_config([])
