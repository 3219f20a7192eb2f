"""A gpt1 adapter that PEFT loaded and saved again (losing gpt1's `gpt1_lora` metadata) imports
with PEFT's logits, also when it adapts only some of Q, K and V; a true PEFT pair on the fused
c_attn is refused with one clear line."""

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: everything here is local

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gpt1 import GPT
from gpt1.core.errors import Gpt1Error
from gpt1.core.lora import LoRAConfig, base_state_dict, inject_lora, load_adapter, save_adapter
from gpt1.formats.hf import export_model, import_hf_model
from gpt1.train.finetune import save_finetuned
from tests.model_factories import random_model


def _finetuned_dir(path, config, tokenizer, lora: LoRAConfig) -> GPT:
    """A fine-tuned model dir as `gpt1 finetune` writes it, with non-zero (as trained) LoRA updates."""
    model = random_model(config, seed=6)
    inject_lora(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    save_finetuned(path, model, tokenizer, {"path": "base"})
    return model


@pytest.mark.parametrize("targets, r", [(("q", "v"), 2), (("q",), 1), (("k", "v", "o"), 2)])
def test_an_export_on_some_of_q_k_v_that_peft_saved_again_imports_as_peft_runs_it(
        tmp_path, tiny_config, tokenizer, targets, r):
    """PEFT's save drops gpt1's metadata; the c_attn pair of rank n*r was read as q, k and v
    ("a c_attn adapter of rank 4 is not three per-projection pairs of rank 2")."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _finetuned_dir(tmp_path / "chat", tiny_config, tokenizer, LoRAConfig(r=r, alpha=2 * r, targets=targets))
    hf = export_model(tmp_path / "chat", tmp_path / "hf")
    resaved = tmp_path / "resaved"
    shutil.copytree(hf, resaved, ignore=shutil.ignore_patterns("adapter"))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf), hf / "adapter").eval()
    peft_model.save_pretrained(resaved / "adapter")
    with safe_open(resaved / "adapter" / "adapter_model.safetensors", "pt") as f:
        assert "gpt1_lora" not in (f.metadata() or {})  # so gpt1 reads PEFT's fields, not its own
    imported, _ = import_hf_model(resaved)
    x = torch.randint(0, tiny_config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(imported(x), peft_model(x).logits, atol=1e-5, rtol=0)


def test_a_projection_whose_update_is_zero_everywhere_still_loads(tiny_config, tmp_path):
    """k and v adapted, k's lora_B still zero in every layer: the rank says two projections, only
    v's rows are non-zero, and the first pair that fits (q, v) is the same model (k's update is 0)."""
    torch.manual_seed(1)
    model = GPT(tiny_config).eval()
    inject_lora(model, LoRAConfig(r=2, alpha=4, targets=("k", "v")))
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.lora_B[1].normal_(0.0, 0.05)  # v; k stays zero
    save_adapter(model, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file(load_file(weights), weights)  # no metadata now, as PEFT writes it
    other = GPT(tiny_config).eval()
    other.load_state_dict(base_state_dict(model))
    load_adapter(other, tmp_path / "adapter")
    x = torch.randint(0, tiny_config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), atol=1e-6, rtol=0)


def test_a_peft_pair_on_the_fused_c_attn_is_refused_in_one_line(tiny_config, tmp_path):
    from peft import LoraConfig, get_peft_model

    from tests.test_lora import _hf_gpt2

    model = GPT(tiny_config).eval()
    peft_model = get_peft_model(_hf_gpt2(model, model.state_dict()), LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False, fan_in_fan_out=True))
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(Gpt1Error, match=r"adapter: the c_attn adapter of rank 4 is not one per-projection pair of "
                                        r"rank 4: its lora_B is not block-diagonal over any one of q, k and v \("):
        load_adapter(GPT(tiny_config), tmp_path / "adapter")
    # A rank that no count of gpt1's pairs makes.
    file = tmp_path / "adapter" / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "rank_pattern": {"c_attn": 6}}))
    with pytest.raises(Gpt1Error, match=r"a c_attn adapter of rank 6 is not one to three per-projection pairs "
                                        r"of rank 4 \(only adapters written by gpt1"):
        load_adapter(GPT(tiny_config), tmp_path / "adapter")
    file.write_text(json.dumps({**json.loads(file.read_text()), "r": 0}))  # was a ZeroDivisionError
    with pytest.raises(Gpt1Error, match=r"adapter_config.json: r must be a positive integer, got 0$"):
        load_adapter(GPT(tiny_config), tmp_path / "adapter")
