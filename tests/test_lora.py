import dataclasses
import json

import pytest
import torch

from gpt1 import GPT, ModelConfig
from gpt1.core.errors import Gpt1Error
from gpt1.core.lora import (
    LoRAConfig,
    LoRALinear,
    TrainableTokens,
    base_state_dict,
    count_trainable,
    inject_lora,
    load_adapter,
    mark_only_lora_as_trainable,
    merge_and_unload,
    merge_lora,
    merged_state_dict,
    save_adapter,
    to_peft_state_dict,
    unmerge_lora,
)

SPECIAL = [0, 1, 2, 3, 4, 5]


def _trained(config: ModelConfig, lora: LoRAConfig, seed: int = 0) -> GPT:
    """A model with LoRA whose adapter weights are random (as after training), not zero."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    inject_lora(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
            elif name.endswith("trainable_tokens"):
                p.add_(torch.randn_like(p))
    return model


def test_fresh_adapter_is_the_identity_and_only_adapters_train(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config).eval()
    x = torch.randint(0, tiny_config.vocab_size, (2, 12))
    with torch.no_grad():
        before = model(x)
    inject_lora(model, LoRAConfig(r=4, alpha=8, token_ids=SPECIAL))
    mark_only_lora_as_trainable(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=0, rtol=0)  # B = 0: exactly the base model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A" in n or ".lora_B" in n or n.endswith("trainable_tokens") for n in trainable)
    c = tiny_config
    per_layer = 3 * 4 * (c.n_embd + c.n_embd) + 4 * (c.n_embd + c.n_embd) + 2 * 4 * (c.n_embd + c.mlp_hidden)
    assert count_trainable(model) == c.n_layer * per_layer + len(SPECIAL) * c.n_embd
    attn = model.transformer.h[0].attn.c_attn
    assert isinstance(attn, LoRALinear) and list(attn.slices) == ["q", "k", "v"]
    assert attn.lora_A.shape == (3, 4, c.n_embd) and attn.lora_B.shape == (3, c.n_embd, 4)
    assert attn.scaling == 2.0


def test_reference_model_trainable_count():
    """r=8 on Q, K, V, O, up, down of the `gpt1` preset, plus the six special-token rows."""
    with torch.device("meta"):
        model = GPT(ModelConfig.preset("gpt1"))
    inject_lora(model, LoRAConfig(r=8, alpha=8, token_ids=SPECIAL))
    mark_only_lora_as_trainable(model)
    # per layer: 4 square (1024x1024) targets x 8 x 2048 + up and down x 8 x (1024 + 4096)
    assert count_trainable(model) == 12 * (4 * 8 * 2048 + 2 * 8 * 5120) + 6 * 1024 == 1_775_616


def test_each_of_q_k_v_has_its_own_pair(tiny_config):
    """Adapting only Q and V leaves the K slice of c_attn's output untouched."""
    model = _trained(tiny_config, LoRAConfig(r=2, alpha=2, targets=("q", "v")))
    layer = model.transformer.h[0].attn.c_attn
    x = torch.randn(3, 5, tiny_config.n_embd)
    C = tiny_config.n_embd
    with torch.no_grad():
        plain = torch.nn.functional.linear(x, layer.weight, layer.bias)
        out = layer(x)
        assert torch.equal(out[..., C:2 * C], plain[..., C:2 * C])
        assert not torch.allclose(out[..., :C], plain[..., :C]) and not torch.allclose(out[..., 2 * C:], plain[..., 2 * C:])
        expected = plain.clone()
        expected[..., :C] += (x @ layer.lora_A[0].T @ layer.lora_B[0].T) * layer.scaling
        expected[..., 2 * C:] += (x @ layer.lora_A[1].T @ layer.lora_B[1].T) * layer.scaling
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("tie", [False, True])
def test_merged_equals_unmerged(tiny_config, tie):
    config = dataclasses.replace(tiny_config, tie_embeddings=tie)
    model = _trained(config, LoRAConfig(r=4, alpha=16, token_ids=SPECIAL))
    x = torch.randint(0, config.vocab_size, (2, 20))
    x[:, ::3] = 4  # role markers in the input: their trained rows are used
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-4, rtol=0)
        unmerge_lora(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-4, rtol=0)
        plain = GPT(config).eval()
        plain.load_state_dict(merged_state_dict(model), strict=not tie)
        torch.testing.assert_close(plain(x), unmerged, atol=1e-4, rtol=0)
        merge_and_unload(model)
        assert not any(isinstance(m, (LoRALinear, TrainableTokens)) for m in model.modules())
        torch.testing.assert_close(model(x), unmerged, atol=1e-4, rtol=0)


def _loads_as(model, adapter, config):
    """The adapter loaded on `model`'s base: a model with `model`'s logits (returned)."""
    other = GPT(config).eval()
    other.load_state_dict(base_state_dict(model))
    load_adapter(other, adapter)
    x = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), atol=1e-6, rtol=0)
    return other


def test_save_load_round_trip_and_errors(tiny_config, tmp_path):
    model = _trained(tiny_config, LoRAConfig(r=4, alpha=8, dropout=0.1, targets=("q", "v", "down"), token_ids=SPECIAL))
    model.eval()
    save_adapter(model, tmp_path / "adapter", "base-dir")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["fan_in_fan_out"] is True
    assert config["target_modules"] == ["attn.c_attn", "mlp.c_proj"] and config["base_model_name_or_path"] == "base-dir"
    assert config["rank_pattern"] == {"attn.c_attn": 8} and config["alpha_pattern"] == {"attn.c_attn": 16}
    other = _loads_as(model, tmp_path / "adapter", tiny_config)
    with pytest.raises(Gpt1Error, match="already has LoRA"):
        load_adapter(other, tmp_path / "adapter")
    bigger = GPT(dataclasses.replace(tiny_config, n_embd=32, n_head=2))
    with pytest.raises(Gpt1Error, match="has shape"):
        load_adapter(bigger, tmp_path / "adapter")
    with pytest.raises(Gpt1Error, match="unknown.*choose from q, k, v, o, up, down"):
        LoRAConfig(targets=("q", "gate"))
    for alpha in (0, -8.0):  # scale alpha / r: 0 would train an adapter that does nothing
        with pytest.raises(Gpt1Error, match=f"LoRA alpha must be a number > 0, got {alpha}"):
            LoRAConfig(alpha=alpha)


def _hf_gpt2(model: GPT, state: dict):
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        n_inner=c.mlp_hidden, activation_function="gelu_new", layer_norm_epsilon=c.norm_eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=c.tie_embeddings,
        bos_token_id=2, eos_token_id=2, pad_token_id=0)).eval()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    hf.load_state_dict({k: (v.t() if k.endswith(conv1d) else v) for k, v in state.items()}, strict=False)
    return hf


def test_peft_loads_our_adapter_with_equal_logits(tiny_config, tmp_path):
    from peft import PeftModel

    model = _trained(tiny_config, LoRAConfig(r=4, alpha=8, token_ids=SPECIAL), seed=3)
    with torch.no_grad():  # non-trivial biases, so that a mix-up in the mapping would show
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.2)
    save_adapter(model, tmp_path / "adapter")
    state = {k: v for k, v in to_peft_state_dict(model).items()}
    assert state["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (12, tiny_config.n_embd)
    assert state["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (3 * tiny_config.n_embd, 12)
    x = torch.randint(0, tiny_config.vocab_size, (2, 24))
    x[:, ::4] = 5
    # On the original base (special rows untrained): PEFT's trainable_token_indices bring them in.
    with torch.no_grad():
        original = base_state_dict(model)
        original["transformer.wte.weight"] = model.transformer.wte.weight.clone()
        peft_model = PeftModel.from_pretrained(_hf_gpt2(model, original), tmp_path / "adapter").eval()
        torch.testing.assert_close(peft_model(x).logits, model(x), atol=1e-4, rtol=0)
        # On the base with the trained rows written in (the model.safetensors of a fine-tuned dir).
        peft_model = PeftModel.from_pretrained(_hf_gpt2(model, base_state_dict(model)), tmp_path / "adapter").eval()
        torch.testing.assert_close(peft_model(x).logits, model(x), atol=1e-4, rtol=0)
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(x).logits, model(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_a_peft_made_adapter_loads_with_peft_s_scale_and_dora_is_refused(tiny_config, tmp_path, rslora):
    """An adapter PEFT made on the exported GPT-2 (no gpt1 metadata): use_rslora (scale alpha /
    sqrt(r)) was read as plain LoRA (alpha / r), silently another model; DoRA is refused."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    model = GPT(tiny_config).eval()
    hf = _hf_gpt2(model, model.state_dict())
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["c_fc", "c_proj"],
                                               use_rslora=rslora, init_lora_weights=False, fan_in_fan_out=True))
    peft_model.save_pretrained(tmp_path / "adapter")
    x = torch.randint(0, tiny_config.vocab_size, (2, 24))
    with torch.no_grad():
        expected = peft_model.eval()(x).logits
        ours = GPT(tiny_config).eval()
        ours.load_state_dict(model.state_dict())
        load_adapter(ours, tmp_path / "adapter")
        torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=0)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(Gpt1Error, match=r"adapter_config.json: use_dora: a LoRA variant whose update is not scale·B·A"):
        load_adapter(GPT(tiny_config), tmp_path / "adapter")


def test_a_gpt1_adapter_that_peft_saved_again_loads_the_same(tiny_config, tmp_path):
    """Trained on in PEFT and saved by it, a gpt1 adapter loses gpt1's metadata: its
    alpha_pattern (3·alpha for c_attn's rank-3r pair) gives the same scale, so it loads as it was."""
    from safetensors.torch import load_file, save_file

    model = _trained(tiny_config, LoRAConfig(r=4, alpha=8), seed=2).eval()
    save_adapter(model, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file(load_file(weights), weights)  # no metadata now, as PEFT writes it
    _loads_as(model, tmp_path / "adapter", tiny_config)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "alpha_pattern": {}}))
    with pytest.raises(Gpt1Error, match=r"the modules' LoRA scales differ \(transformer.h.0.attn.c_attn: 0.667, "):
        load_adapter(GPT(tiny_config), tmp_path / "adapter")


def test_rank_and_alpha_pattern_keys_match_as_peft_matches_them(tiny_config, tmp_path):
    """PEFT reads a rank_pattern / alpha_pattern key as a regular expression for the end of a
    module's full name (get_pattern_key); an exact lookup of the key missed these, read c_attn's
    rank-3r pair as rank r and refused the adapter."""
    from safetensors.torch import load_file, save_file

    model = _trained(tiny_config, LoRAConfig(r=4, alpha=8), seed=2).eval()
    save_adapter(model, tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file(load_file(weights), weights)  # no gpt1 metadata, as PEFT writes it
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config.update(target_modules=["c_attn", "c_proj", "c_fc"], rank_pattern={r"h\.\d+\.attn\.c_attn": 12},
                  alpha_pattern={r"attn\.c_att.": 24})
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    _loads_as(model, tmp_path / "adapter", tiny_config)
    config["alpha_pattern"] = {"h.1.attn.c_attn": 24}  # layer 1 only: layer 0's scale differs
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(Gpt1Error, match=r"LoRA scales differ \(transformer.h.0.attn.c_attn: 0.667, "
                                        r"transformer.h.0.attn.c_proj: 2, from alpha_pattern"):
        load_adapter(GPT(tiny_config), tmp_path / "adapter")


@pytest.mark.parametrize("metadata", ['{"r": ' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000])
def test_adapter_metadata_past_json_s_limits_is_one_line(tiny_config, tmp_path, metadata):
    """docs/reliability.md names these two inputs; read_json handled them, the adapter's
    metadata reader did not: a ValueError or RecursionError traceback in every command that
    loads a fine-tuned folder."""
    from safetensors.torch import load_file, save_file

    save_adapter(_trained(tiny_config, LoRAConfig(r=4, alpha=8)), tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file(load_file(weights), weights, metadata={"gpt1_lora": metadata})
    with pytest.raises(Gpt1Error, match=r"\(metadata gpt1_lora\): invalid JSON for gpt1: a number of over 4,300 digits"):
        load_adapter(GPT(tiny_config), tmp_path / "adapter")


@pytest.mark.parametrize("tie", [False, True])
def test_the_training_loss_uses_the_trained_token_rows_of_a_tied_head(tiny_config, tie):
    """A tied model's head reads the trained special-token rows from the embedding's table (as
    PEFT's trainable_token_indices on a tied model does). The loss path (`model(x, y)`, which
    training and validation take) used the frozen table instead: the rows got only their input
    share of the gradient (norm 0.29 for 2.26), and the run validated a model it never saved."""
    config = dataclasses.replace(tiny_config, tie_embeddings=tie)
    model = _trained(config, LoRAConfig(r=4, alpha=16, token_ids=SPECIAL))  # eval: no dropout
    x = torch.randint(0, config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    x[:, ::3] = 4
    y = torch.roll(x, -1, 1)
    y[:, ::4] = 2  # [EOS] targets: its head row is a trained one
    _, loss = model(x, y)
    from_logits = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    torch.testing.assert_close(loss, from_logits, atol=1e-5, rtol=0)
    tokens = next(p for n, p in model.named_parameters() if n.endswith("trainable_tokens"))
    (grad,) = torch.autograd.grad(loss, tokens)
    (expected,) = torch.autograd.grad(from_logits, tokens)
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)
