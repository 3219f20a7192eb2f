"""Full fine-tuning (`full=true`): every weight trained, the run dir a plain chat model dir that
loads, chats, exports and resumes like a LoRA run's; LoRA's keys beside it refused."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gpt1
from gpt1.core.errors import Gpt1Error
from gpt1.core.lora import LoRALinear
from gpt1.train.config import load_config
from gpt1.train.evaluate import evaluate_chat
from gpt1.train.finetune import FinetuneConfig, finetune
from tests.test_finetune import RUN, STEPS, _oasst_file, interrupt_the_second_checkpoint

FULL = [*STEPS, "full=true", "lr=1e-3"]


def _cfg(data: Path, *overrides: str) -> FinetuneConfig:
    """test_finetune's run, less its LoRA keys."""
    return load_config(FinetuneConfig, None, [k for k in RUN if not k.startswith("lora_")] + list(overrides),
                       data=str(data))


@pytest.fixture(scope="module")
def oasst(tmp_path_factory) -> Path:
    return _oasst_file(tmp_path_factory.mktemp("oasst-full") / "oasst.messages.jsonl")


@pytest.fixture(scope="module")
def run(tiny_model_dir, oasst, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    return out, finetune(_cfg(oasst, *FULL), tiny_model_dir, out)


def test_every_weight_is_trained_and_the_dir_is_a_plain_chat_model(run, tiny_model_dir, oasst, capsys):
    out, result = run
    assert result.steps == 4 and math.isfinite(result.val_loss)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    tuned = load_file(str(out / "model.safetensors"))
    assert set(base) == set(tuned)
    changed = [name for name in base if not torch.equal(base[name], tuned[name])]
    assert set(changed) == set(base)  # every matrix, bias, norm and embedding moved (LoRA moves none of them)
    assert not (out / "adapter").exists() and not (out / "base.json").exists()
    assert (out / "chat_template.jinja").is_file()
    llm = gpt1.load(out, device="cpu")
    assert llm.is_chat_model and not any(isinstance(m, LoRALinear) for m in llm.model.modules())
    assert isinstance(llm.chat([{"role": "user", "content": "What is 3 plus 3?"}], max_new_tokens=6, seed=0), str)
    # Its held-out score is the loop's final validation loss, as for a LoRA run.
    evaluated = evaluate_chat(llm, str(oasst), batch_size=4, max_batches=2, show_progress=False)
    assert evaluated.loss == pytest.approx(result.val_loss, rel=1e-4)


def test_the_run_says_full_fine_tuning_and_counts_every_parameter(tiny_model_dir, oasst, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="gpt1"):
        finetune(_cfg(oasst, "max_steps=1", "full=true"), tiny_model_dir, tmp_path / "one")
    line = next(r.getMessage() for r in caplog.records if "trainable parameters" in r.getMessage())
    total = sum(t.numel() for t in load_file(str(tiny_model_dir / "model.safetensors")).values())
    assert line == f"full fine-tuning: {total:,} trainable parameters of {total:,} (100.00%)"


def test_resume_after_an_interruption_ends_where_a_straight_run_ends(run, tiny_model_dir, oasst, tmp_path, monkeypatch):
    straight_dir, straight = run
    interrupt_the_second_checkpoint(monkeypatch, lambda: finetune(_cfg(oasst, *FULL), tiny_model_dir, tmp_path / "cut"))
    resumed = finetune(_cfg(oasst, *FULL), tiny_model_dir, tmp_path / "cut")
    assert resumed.resumed_from == 2
    assert resumed.train_loss == straight.train_loss and resumed.val_loss == straight.val_loss
    a, b = load_file(str(straight_dir / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A LoRA rerun on the full run's dir is another recipe: refused, not mixed.
    with pytest.raises(Gpt1Error, match="different config"):
        finetune(_cfg(oasst, *STEPS, "full=false", "lr=1e-3"), tiny_model_dir, tmp_path / "cut")


def test_the_full_run_exports_to_transformers(run, tmp_path):
    from transformers import AutoModelForCausalLM

    from gpt1.formats.hf import export_model

    out, _ = run
    export_model(out, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ids = torch.tensor([[4, 40, 41, 42, 5, 50, 51, 2]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, gpt1.load(out, device="cpu").model(ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("key", ["lora_r=16", "lora_alpha=16", "lora_dropout=0.1", 'lora_targets=["q"]',
                                 "train_special_tokens=false"])
def test_lora_keys_beside_full_are_refused(oasst, key):
    with pytest.raises(Gpt1Error, match=rf"^{key.split('=')[0]}=.*: LoRA keys, and full=true trains every weight"):
        _cfg(oasst, "full=true", key)


def test_keep_best_and_early_stop_with_nothing_held_out_say_they_do_nothing(tiny_model_dir, oasst, tmp_path, caplog):
    """They acted on no validation, silently: the run looked guarded and was not."""
    import logging

    with caplog.at_level(logging.WARNING, logger="gpt1"):
        finetune(_cfg(oasst, "max_steps=1", "val_fraction=0", "keep_best=true", "early_stop=2", "lora_r=2"),
                 tiny_model_dir, tmp_path / "none")
    assert any(r.getMessage().endswith("val_fraction=0 holds nothing out: there is no validation, and keep_best=true "
                                       "and early_stop=2 do nothing") for r in caplog.records)


def test_merge_beside_full_is_refused_before_training(tiny_model_dir, oasst, tmp_path, capsys):
    """It trained the whole run, then failed: nothing to merge (and every rerun again)."""
    from tests.test_battery import run_main

    code, err = run_main(capsys, "finetune", "--base", tiny_model_dir, "--data", oasst, "--out", tmp_path / "run",
                         "--merge", "full=true", "max_steps=2", "device=cpu")
    assert code == 2 and "--merge merges a LoRA adapter into the weights; a full=true run dir holds every weight" in err
    assert not (tmp_path / "run").exists()


def test_info_says_which_kind_of_model_a_dir_holds(run, tiny_model_dir, tiny_config, tokenizer, tmp_path, capsys):
    """It printed the same numbers for a base, a LoRA fine-tune and a full one, and nothing else."""
    from tests.model_factories import finetuned_dir
    from tests.test_battery import run_main

    finetuned_dir(tmp_path / "lora", tiny_config, tokenizer, seed=1)
    kinds = {}
    for name, directory in (("base", tiny_model_dir), ("lora", tmp_path / "lora"), ("full", run[0])):
        code, err = run_main(capsys, "info", directory)
        assert code == 0
        kinds[name] = err.strip().splitlines()[-1]
    # The adapter's own size, as a LoRA training of it counts its trainable parameters (it said r and alpha only).
    import torch

    from gpt1.core.lora import count_trainable, inject_lora, mark_only_lora_as_trainable, read_adapter_config
    from gpt1.core.model import GPT

    torch.manual_seed(0)
    model = inject_lora(GPT(tiny_config), read_adapter_config(tmp_path / "lora" / "adapter"))
    mark_only_lora_as_trainable(model)
    # Its share as finetune's own line gives it: of the parameters with the adapter in place (it
    # said 27.59% where finetune said 21.62%).
    trained, whole = count_trainable(model), sum(p.numel() for p in model.parameters())
    assert kinds == {"base": "a base model (no chat template)",
                     "lora": "a chat model: a LoRA adapter (r=4, alpha=8, on q, k, v, o, up, down and 4 special-token "
                             f"embedding rows; {trained:,} trained parameters of {whole:,}, {100 * trained / whole:.2f}%), "
                             "merged into the weights at load",
                     "full": "a chat model: its chat template and its own weights (a full fine-tune, or a merged one)"}
