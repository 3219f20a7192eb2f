"""Importing transformers GPT-2 folders that gpt1 did not write: the weights load as transformers
loads them (same logits) or are refused in one line naming the file and the field or tensor —
never trained on with a dropped head, dropped tensors or NaNs."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: everything here is local

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt1.core.errors import Gpt1Error
from gpt1.formats.hf import import_hf_model
from gpt1.formats.modeldir import is_hf_model_dir, load_model, weights_fingerprint
from tests.conftest import TEST_VOCAB
from tests.test_battery import assert_one_clear_line, run_main

SIZES = dict(vocab_size=TEST_VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=2,
             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _gpt2(path, tokenizer, save_kw=None, model_class="GPT2LMHeadModel", **config):
    """A random GPT-2 saved by transformers itself (with the test tokenizer, a gpt1 one)."""
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, model_class)(transformers.GPT2Config(**{**SIZES, **config}))
    with torch.no_grad():  # not transformers' init (LayerNorms at 1, zero biases): every tensor counts
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(path, **(save_kw or {}))
    tokenizer.save(path)
    return path


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))
    return path


def _edit_weights(path, edit):
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _assert_logits_as_transformers(path):
    from transformers import GPT2LMHeadModel

    model, _ = import_hf_model(path)
    reference = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()
    x = torch.randint(0, TEST_VOCAB, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x).logits, atol=1e-4, rtol=0)
    return model


def _chat_file(path):
    lines = [{"messages": [{"role": "user", "content": f"What is {i}+1?"},
                           {"role": "assistant", "content": f"It is {i + 1}."}]} for i in range(20)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.mark.parametrize("tie", [True, ...], ids=["tie_true", "tie_missing"])
def test_a_checkpoints_own_head_is_kept_where_config_says_tied(tmp_path, tokenizer, tie):
    """An untied checkpoint whose config.json says tied (or leaves it to GPT-2's default, true):
    transformers keeps the separate lm_head.weight; gpt1 tied the head to wte, dropping it."""
    path = _edit_config(_gpt2(tmp_path / "hf", tokenizer, tie_word_embeddings=False), tie_word_embeddings=tie)
    model = _assert_logits_as_transformers(path)
    assert not model.config.tie_embeddings
    assert model.lm_head.weight is not model.transformer.wte.weight


def test_a_head_equal_to_wte_is_tied(tmp_path, tokenizer):
    path = _gpt2(tmp_path / "hf", tokenizer, tie_word_embeddings=False)
    _edit_weights(_edit_config(path, tie_word_embeddings=True),
                  lambda s: s.update({"lm_head.weight": s["transformer.wte.weight"].clone()}))
    model = _assert_logits_as_transformers(path)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_a_sharded_folder_imports_and_fine_tunes(tmp_path, tokenizer, capsys):
    path = _gpt2(tmp_path / "hf", tokenizer, save_kw=dict(max_shard_size="40KB"), tie_word_embeddings=False)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (path / "model.safetensors").exists()
    _assert_logits_as_transformers(path)

    out = tmp_path / "chat"
    rc, err = run_main(capsys, "finetune", "--base", path, "--data", _chat_file(tmp_path / "chat.jsonl"),
                       "--out", out, "max_steps=1", "batch_size=2", "block_size=32", "eval_batches=1")
    assert rc == 0, err
    load_model(out)
    # The base's identity (base.json, resume) covers every shard.
    recorded = json.loads((out / "base.json").read_text())["sha256"]
    assert recorded == weights_fingerprint(path)
    shard = load_file(shards[-1])
    save_file({k: v + 1 for k, v in shard.items()}, shards[-1], metadata={"format": "pt"})
    assert weights_fingerprint(path) != recorded


def test_a_shard_index_naming_a_missing_shard_is_one_line(tmp_path, tokenizer):
    path = _gpt2(tmp_path / "hf", tokenizer, save_kw=dict(max_shard_size="40KB"))
    sorted(path.glob("model-*.safetensors"))[0].unlink()
    with pytest.raises(Gpt1Error, match=r"model.safetensors.index.json: names shard files that are not in .*: "
                                        r"model-00001-of-"):
        import_hf_model(path)


def test_a_pickle_only_folder_is_named_by_finetune(tmp_path, tokenizer, capsys):
    path = _gpt2(tmp_path / "hf", tokenizer)
    torch.save({}, path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    rc, err = run_main(capsys, "finetune", "--base", path, "--data", _chat_file(tmp_path / "chat.jsonl"),
                       "--out", tmp_path / "chat", "max_steps=1")
    assert_one_clear_line(rc, err, r"no .safetensors weights \(found: pytorch_model.bin\).* never from pickles")


@pytest.mark.parametrize("changes,message", [
    (dict(n_embd="64"), r'config.json: n_embd must be a whole number >= 1, got "64"'),
    (dict(layer_norm_epsilon=None), r"config.json: layer_norm_epsilon must be a number > 0, got null"),
    (dict(layer_norm_epsilon=0), r"config.json: layer_norm_epsilon must be a number > 0, got 0"),
    (dict(tie_word_embeddings="false"), r'config.json: tie_word_embeddings must be true or false, got "false"'),
    (dict(n_inner=0), r"config.json: n_inner must be a whole number >= 1 or null, got 0"),
    (dict(hidden_size="32"), r'config.json: hidden_size must be a whole number >= 1, got "32"'),
    (dict(embd_pdrop="x"), r"config.json: transformers cannot read it: .*'embd_pdrop'"),
    (dict(resid_pdrop=1.0), r"config.json: model config: dropout must be in \[0, 1\)"),
    (dict(n_positions=64), r"config.json: n_positions=64, n_embd=32 give transformer.wpe.weight the shape "
                           r"\(64, 32\), but model.safetensors holds \(32, 32\)"),
    (dict(n_positions=...), r"config.json: n_positions=1024 \(GPT-2's default\), n_embd=32 give "
                            r"transformer.wpe.weight the shape \(1024, 32\)"),
    (dict(vocab_size=...), r"config.json: vocab_size=50257 \(GPT-2's default\), n_embd=32 give "
                           r"transformer.wte.weight the shape \(50257, 32\)"),
])
def test_a_config_json_that_does_not_fit_is_one_line(tmp_path, tokenizer, capsys, changes, message):
    path = _edit_config(_gpt2(tmp_path / "hf", tokenizer), **changes)
    rc, err = run_main(capsys, "finetune", "--base", path, "--data", _chat_file(tmp_path / "chat.jsonl"),
                       "--out", tmp_path / "chat", "max_steps=1")
    assert_one_clear_line(rc, err, message)


def test_an_integer_epsilon_is_that_epsilon(tmp_path, tokenizer):
    model, _ = import_hf_model(_edit_config(_gpt2(tmp_path / "hf", tokenizer), layer_norm_epsilon=1))
    assert model.config.norm_eps == 1.0


def test_nan_weights_are_refused_by_name(tmp_path, tokenizer):
    path = _gpt2(tmp_path / "hf", tokenizer)
    _edit_weights(path, lambda s: s["transformer.h.0.mlp.c_fc.weight"].__setitem__((3, 5), float("nan")))
    with pytest.raises(Gpt1Error, match=r"model.safetensors: transformer.h.0.mlp.c_fc.weight holds NaN"):
        import_hf_model(path)


def test_tensors_the_config_does_not_use_are_refused(tmp_path, tokenizer):
    path = _edit_config(_gpt2(tmp_path / "layers", tokenizer), n_layer=1)
    with pytest.raises(Gpt1Error, match=r"holds weights that config.json's GPT-2 \(n_layer=1, .*\) has no place for: "
                                        r"transformer.h.1.attn.c_attn.bias, .*\(12 in all\)"):
        import_hf_model(path)
    # A classifier: its head is not a language model's, and without the architecture named, its tensor.
    path = _gpt2(tmp_path / "cls", tokenizer, model_class="GPT2ForSequenceClassification", num_labels=3, pad_token_id=0)
    with pytest.raises(Gpt1Error, match=r"config.json: architectures GPT2ForSequenceClassification is not supported"):
        import_hf_model(path)
    with pytest.raises(Gpt1Error, match=r"has no place for: score.weight"):
        import_hf_model(_edit_config(path, architectures=...))


def test_openai_style_checkpoint_still_imports(tmp_path, tokenizer):
    """GPT2Model names (no transformer. prefix), no lm_head, the old causal-mask buffers."""
    path = _gpt2(tmp_path / "hf", tokenizer, model_class="GPT2Model")
    def edit(state):
        for i in range(SIZES["n_layer"]):
            state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    _edit_weights(path, edit)
    assert not any(k.startswith(("transformer.", "lm_head")) for k in load_file(path / "model.safetensors"))
    _assert_logits_as_transformers(path)


def test_a_gpt2_config_without_model_type_is_a_transformers_folder(tmp_path, tokenizer):
    path = _edit_config(_gpt2(tmp_path / "hf", tokenizer), model_type=..., architectures=...)
    assert is_hf_model_dir(path)
    _assert_logits_as_transformers(path)
