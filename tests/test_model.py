
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt1 import GPT, KVCache, ModelConfig, load
from gpt1.core.constants import IGNORE_INDEX
from gpt1.core.errors import Gpt1Error
from gpt1.core.lora import LoRAConfig, inject_lora, mark_only_lora_as_trainable
from gpt1.core.loss import default_loss_chunk, linear_cross_entropy

HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def test_reference_preset_size_and_shapes():
    config = ModelConfig.preset("gpt1")
    assert (config.n_layer, config.n_embd, config.n_head, config.block_size, config.vocab_size) == (12, 1024, 16, 512, 51_682)
    assert config.mlp_hidden == 4096 and not config.tie_embeddings and config.dropout == 0.0
    with torch.device("meta"):
        model = GPT(config)
    assert 250e6 <= model.num_params() <= 262e6
    logits = model(torch.zeros(2, 7, dtype=torch.long, device="meta"))
    assert logits.shape == (2, 7, 51_682)


def test_unknown_preset_and_bad_config():
    with pytest.raises(Gpt1Error, match="unknown model preset 'huge'.*tiny"):
        ModelConfig.preset("huge")
    with pytest.raises(Gpt1Error, match="divisible"):
        ModelConfig(n_embd=100, n_head=3)


def test_config_json_round_trip(tmp_path, tiny_config):
    tiny_config.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == tiny_config
    (tmp_path / "bad.json").write_text('{"n_layer": 2, "n_layers": 3}')
    with pytest.raises(Gpt1Error, match="unknown model config field.*n_layers"):
        ModelConfig.load(tmp_path / "bad.json")


def test_loss_ignores_masked_targets(tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    x = torch.randint(0, tiny_config.vocab_size, (2, 16))
    y = torch.randint(0, tiny_config.vocab_size, (2, 16))
    logits = model(x)
    no_logits, loss = model(x, y)
    assert logits.shape == (2, 16, tiny_config.vocab_size) and no_logits is None
    # the loss of an untrained model is close to ln(vocab)
    assert abs(loss.item() - torch.log(torch.tensor(float(tiny_config.vocab_size))).item()) < 0.5
    y_masked = y.clone()
    y_masked[:, 8:] = IGNORE_INDEX
    _, masked = model(x, y_masked)
    expected = F.cross_entropy(logits[:, :8].reshape(-1, logits.size(-1)), y[:, :8].reshape(-1))
    torch.testing.assert_close(masked, expected)


def _full_logits_loss(model: GPT, x, y):
    """The output layer + loss as gpt1 computed them before the chunked loss: all logits at once."""
    logits = model(x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=IGNORE_INDEX)


def _loss_and_grads(model: GPT, loss_fn, x, y, precision_dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=precision_dtype or torch.bfloat16, enabled=precision_dtype is not None):
        loss = loss_fn(model, x, y)
    (loss * 3.0).backward()  # a non-unit upstream gradient, as a GradScaler or grad_accum gives
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk", [5, 1000])  # several chunks with a remainder; one chunk
def test_chunked_loss_has_the_full_logits_loss_and_gradients(tiny_config, tie, chunk):
    torch.manual_seed(5)
    model = GPT(dataclasses.replace(tiny_config, tie_embeddings=tie))
    model.loss_chunk = chunk
    x = torch.randint(0, tiny_config.vocab_size, (3, 17))
    y = torch.randint(0, tiny_config.vocab_size, (3, 17))
    y[0, :6] = IGNORE_INDEX  # a prompt excluded from the loss
    y[2, 9:] = IGNORE_INDEX  # padding
    expected, expected_grads = _loss_and_grads(model, _full_logits_loss, x, y)
    loss, grads = _loss_and_grads(model, lambda m, a, b: m(a, b)[1], x, y)
    torch.testing.assert_close(loss, expected)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_default_loss_chunk_is_small_on_cpu_and_large_on_gpus():
    # The reference vocabulary: ~320 tokens of logits per chunk on a CPU, ~5,200 on a GPU (1 GiB).
    assert default_loss_chunk(51_682, "cpu") == 324
    assert default_loss_chunk(51_682, "cuda") == 5_193
    assert default_loss_chunk(10**9, "cuda") == 1  # never zero rows


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_loss_under_autocast_matches_to_half_precision(tiny_config, dtype):
    torch.manual_seed(6)
    model = GPT(tiny_config)
    model.loss_chunk = 7
    x = torch.randint(0, tiny_config.vocab_size, (2, 20))
    y = torch.randint(0, tiny_config.vocab_size, (2, 20))
    y[1, :5] = IGNORE_INDEX
    expected, expected_grads = _loss_and_grads(model, _full_logits_loss, x, y, dtype)
    loss, grads = _loss_and_grads(model, lambda m, a, b: m(a, b)[1], x, y, dtype)
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-3)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32  # the master weights' gradients stay fp32
        scale = expected_grads[name].abs().max().item()
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=0.02 * scale + 1e-7, msg=name)


def test_chunked_loss_in_lora_finetuning_masks_non_assistant_tokens(tiny_config):
    """The fine-tuning setup: LoRA injected, the output head frozen, labels on assistant tokens only."""
    torch.manual_seed(7)
    model = GPT(tiny_config)
    inject_lora(model, LoRAConfig(r=4, alpha=8.0, token_ids=[0, 1, 2]))
    mark_only_lora_as_trainable(model)
    with torch.no_grad():  # B starts at zero: give A's gradient something to flow through
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.02)
    assert not model.lm_head.weight.requires_grad
    model.loss_chunk = 6
    x = torch.randint(3, tiny_config.vocab_size, (2, 24))
    y = torch.full_like(x, IGNORE_INDEX)
    y[0, 10:18] = x[0, 11:19]  # two assistant replies; the user turns and padding are masked
    y[1, 3:9] = x[1, 4:10]
    expected, expected_grads = _loss_and_grads(model, _full_logits_loss, x, y)
    loss, grads = _loss_and_grads(model, lambda m, a, b: m(a, b)[1], x, y)
    torch.testing.assert_close(loss, expected)
    assert grads.keys() == expected_grads.keys() and any("lora_A" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-7, msg=name)



def test_the_fp16_output_layer_gradient_does_not_overflow_on_a_frequent_target():
    """fp16-mixed pretraining skipped every step after its first (`tiny-cpu` on code): the weight
    gradient of a chunk, a sum over its rows of 1024 x (softmax - one_hot) x h, passed fp16's 65,504
    where one target (a line end, an indent) filled much of the chunk and its hidden states agreed.
    Here 2,048 rows, half of them target 7 with like hidden states, in one chunk as on a CPU."""
    torch.manual_seed(3)
    vocab, d, rows = 4096, 64, 2048
    hidden = torch.randn(rows, d) + torch.where(torch.arange(rows) % 2 == 0, 3.0, 0.0).unsqueeze(1)
    targets = torch.where(torch.arange(rows) % 2 == 0, 7, torch.randint(0, vocab, (rows,)))
    weight = torch.randn(vocab, d) * 0.02
    grads = []
    for loss_of in (lambda h, w: F.cross_entropy(F.linear(h, w).float(), targets),
                    lambda h, w: linear_cross_entropy(h, w, targets)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16):
            loss_of(h, w).backward()
        grads.append((h.grad, w.grad))
    (expected_h, expected_w), (got_h, got_w) = grads
    assert got_w.isfinite().all() and got_h.isfinite().all()
    torch.testing.assert_close(got_w, expected_w, rtol=0, atol=0.01 * expected_w.abs().max().item())
    torch.testing.assert_close(got_h, expected_h, rtol=0, atol=0.01 * expected_h.abs().max().item())

def test_chunked_loss_without_gradients_and_without_targets():
    torch.manual_seed(8)
    hidden, weight = torch.randn(10, 8), torch.randn(30, 8)
    targets = torch.randint(0, 30, (10,))
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(hidden, weight, targets, chunk=3),
                              F.cross_entropy(hidden @ weight.t(), targets))
    assert linear_cross_entropy(hidden, weight, torch.full_like(targets, IGNORE_INDEX)).isnan()  # as F.cross_entropy


def test_flops_per_token_counts_the_matmuls_that_run():
    """6 x (transformer matrices + output head) + 12 x n_layer x T x d; embeddings are lookups."""
    config = ModelConfig.preset("gpt1")
    with torch.device("meta"):
        model = GPT(config)
    L, d, V, T = config.n_layer, config.n_embd, config.vocab_size, 512
    matrices = L * (4 * d * d + 2 * d * config.mlp_hidden)
    assert model.flops_per_token(T) == 6 * (matrices + V * d) + 12 * L * T * d
    assert model.flops_per_token(T) / (6 * model.num_params(exclude_positions=True) + 12 * L * T * d) < 0.81
    with torch.device("meta"):
        tied = GPT(dataclasses.replace(config, tie_embeddings=True))
    assert tied.flops_per_token(T) == model.flops_per_token(T)  # the tied table is the head, counted once
    model.requires_grad_(False)  # frozen weights: no weight gradients, 2 FLOPs per parameter less
    assert model.flops_per_token(T) == 4 * (matrices + V * d) + 12 * L * T * d


def _to_hf(model: GPT):
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf_config = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        n_inner=c.mlp_hidden, activation_function="gelu_new", layer_norm_epsilon=c.norm_eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=c.tie_embeddings,
        bos_token_id=2, eos_token_id=2, pad_token_id=0,
    )
    hf = GPT2LMHeadModel(hf_config).eval()
    state = {k: (v.t() if k.endswith(HF_CONV1D) else v) for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return hf


@pytest.mark.parametrize("tie", [False, True])
def test_logits_equal_transformers_gpt2(tiny_config, tie):
    torch.manual_seed(1)
    model = GPT(dataclasses.replace(tiny_config, tie_embeddings=tie)).eval()
    # non-trivial LayerNorm and bias values, so that a mix-up there would show
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.normal_(0.0, 0.5)
    hf = _to_hf(model)
    x = torch.randint(0, tiny_config.vocab_size, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=0)


def test_kv_cache_matches_full_forward(tiny_config):
    torch.manual_seed(2)
    model = GPT(tiny_config).eval()
    x = torch.randint(0, tiny_config.vocab_size, (2, 30))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(tiny_config, batch_size=2)
        pieces = [model(x[:, :11], cache=cache)]  # prefill, then one token at a time
        pieces += [model(x[:, t : t + 1], cache=cache) for t in range(11, 30)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)
    assert cache.length == 30
    with torch.no_grad():  # a prefill that only needs the next token's logits
        last = model(x[:, :11], cache=KVCache(tiny_config, batch_size=2), last_only=True)
    assert last.shape == (2, 1, tiny_config.vocab_size)
    torch.testing.assert_close(last, full[:, 10:11], atol=1e-5, rtol=0)


def test_left_padded_batch_matches_unpadded(tiny_config):
    """A padding mask plus explicit positions make a left-padded row equal to the row alone."""
    torch.manual_seed(3)
    model = GPT(tiny_config).eval()
    short = torch.randint(3, tiny_config.vocab_size, (1, 5))
    long = torch.randint(3, tiny_config.vocab_size, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :4] = False
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(batch, positions=positions, attention_mask=mask)
        torch.testing.assert_close(padded[0, 4:], model(short)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(padded[1], model(long)[0], atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_same_gradients(tiny_config):
    torch.manual_seed(4)
    model = GPT(tiny_config)
    x = torch.randint(0, tiny_config.vocab_size, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    _, loss2 = model(x, x)
    loss2.backward()
    for g, p in zip(expected, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_context_overflow_is_an_error(tiny_config):
    model = GPT(tiny_config)
    with pytest.raises(Gpt1Error, match="longer than the context"):
        model(torch.zeros(1, tiny_config.block_size + 1, dtype=torch.long))


def test_save_and_load_model_dir(tiny_model_dir, tiny_config):
    llm = load(tiny_model_dir, device="cpu")
    assert llm.config == tiny_config and llm.tokenizer.vocab_size == tiny_config.vocab_size
    assert not llm.model.training
    again = load(tiny_model_dir, device="cpu")
    x = torch.randint(0, tiny_config.vocab_size, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(llm.model(x), again.model(x))


def test_load_errors(tmp_path, tiny_model_dir):
    with pytest.raises(Gpt1Error, match="model directory not found"):
        load(tmp_path / "nope")
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(Gpt1Error, match="not a readable safetensors file"):
        load(broken)


def test_flops_per_token_equals_torchs_count_of_a_training_step_with_and_without_lora():
    """Checked against torch's own FLOP counter on a real step. A LoRA fine-tune's MFU left out the
    adapters' matmuls (28% low at r=32 on a tiny model): only nn.Linear weights were counted."""
    from torch.utils.flop_counter import FlopCounterMode

    from gpt1.core.lora import LoRAConfig, inject_lora, mark_only_lora_as_trainable

    config = ModelConfig.preset("tiny", vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32)
    model, (B, T) = GPT(config), (2, 32)
    attention = 12 * config.n_layer * T * config.n_embd  # PaLM's term; the counter's own sdpa formula differs

    def counted() -> float:
        x = torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
        with FlopCounterMode(display=False) as counter:
            model(x, x)[1].backward()
        matmuls = {str(op): n for op, n in counter.get_flop_counts()["Global"].items() if "attention" not in str(op)}
        return sum(matmuls.values()) / (B * T) + attention

    assert model.flops_per_token(T) == counted()
    inject_lora(model, LoRAConfig(r=8, alpha=8, targets=("q", "k", "v", "o", "up", "down")))
    mark_only_lora_as_trainable(model)
    # Autograd skips the input gradient of a first layer that nothing before it needs (frozen
    # embeddings), 2 FLOPs per parameter the formula counts; trained token rows (or a deeper model)
    # leave no such gap.
    model.transformer.wte.weight.requires_grad_(True)
    assert model.flops_per_token(T) == counted()


# The Python API: a ModelConfig changed by attribute after it was built is checked again, bad input
# to the model and its config is one Gpt1Error, and what type checkers and help() see.

def test_a_model_config_changed_after_it_was_built_is_refused_by_gpt(tiny_config):
    config = ModelConfig(**tiny_config.to_dict())
    config.n_head = 3  # 64 is not divisible by 3: construction refuses it
    with pytest.raises(Gpt1Error, match=r"n_embd \(64\) must be divisible by n_head \(3\)"):
        GPT(config)
    with pytest.raises(Gpt1Error, match="expected a ModelConfig"):
        GPT(tiny_config.to_dict())


# ---- bad input to ModelConfig and GPT.forward is a Gpt1Error ----------------------------------

def test_a_typo_in_preset_overrides_names_the_known_fields():
    with pytest.raises(Gpt1Error, match=r"unknown model config field\(s\) n_layers; known: .*n_layer"):
        ModelConfig.preset("tiny", n_layers=2)


def test_from_dict_wants_a_mapping():
    with pytest.raises(Gpt1Error, match="expected a mapping of field names to values.*got list"):
        ModelConfig.from_dict([1])


def test_forward_refuses_bad_ids_by_name(tiny_config):
    model = GPT(tiny_config).eval()
    with pytest.raises(Gpt1Error, match=r"a sequence of 65 tokens is longer than the context \(64"):
        model(torch.zeros(1, tiny_config.block_size + 1, dtype=torch.long))
    for bad in (10**6, -1, tiny_config.vocab_size):
        ids = torch.tensor([[1, 2, bad, 3]])
        with pytest.raises(Gpt1Error, match=rf"token id {bad} is outside the vocabulary \[0, {tiny_config.vocab_size}\)"):
            model(ids)
        with pytest.raises(Gpt1Error, match=rf"token id {bad} is outside"):  # the training path too
            model.train()(ids, ids.clamp(0, tiny_config.vocab_size - 1))
        model.eval()
    with pytest.raises(Gpt1Error, match=r"expected token ids of shape \(batch, time\), got shape \(4,\)"):
        model(torch.tensor([1, 2, 3, 4]))
    assert model(torch.tensor([[1, 2, tiny_config.vocab_size - 1]])).shape == (1, 3, tiny_config.vocab_size)


# ---- ModelConfig reads what it writes, NumPy integers, floats ----------------------------------

def test_from_dict_reads_what_save_writes(tiny_config, tmp_path):
    tiny_config.save(tmp_path / "config.json", tokenizer_fingerprint="abc123")
    assert ModelConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == tiny_config


def test_model_config_takes_numpy_integers_and_stores_floats_as_floats():
    config = ModelConfig.preset("tiny", n_layer=np.int64(2), dropout=0)
    assert type(config.n_layer) is int and config.n_layer == 2
    assert type(config.dropout) is float and type(config.to_dict()["dropout"]) is float
