"""Adapters and models that PEFT or transformers made, back into gpt1: an adapter PEFT trained on
the export imports with PEFT's logits, an adapter whose init rewrote the base (PiSSA) and PEFT's
variants are refused on both paths (an import, a model dir's adapter/), a list of
trainable_token_indices loads in a model dir with PEFT's rows, the refusals say what works, and a
transformers folder runs as it is."""

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: everything here is local

import pytest
import torch

from gpt1.core.errors import Gpt1Error
from gpt1.core.lora import LoRAConfig, inject_lora, save_adapter
from gpt1.core.model import GPT
from gpt1.formats.hf import export_model, has_chat_template, import_hf_model, load_with_tokenizer
from gpt1.formats.modeldir import load_model
from tests.model_factories import random_model, save_gpt2_like_tokenizer
from tests.test_battery import assert_one_clear_line, run_main

# An adapter from elsewhere that gpt1's own layout cannot hold: the refusal names what reads it.
READS_IT = r"; a transformers folder with this adapter in its adapter/ \(the base model's `gpt1 export`\) reads any plain LoRA exactly"


@pytest.fixture(scope="module")
def base(tiny_config, tokenizer, tmp_path_factory):
    """A gpt1 model dir (weights that give logits far from uniform) and its export."""
    root = tmp_path_factory.mktemp("base")
    from gpt1.formats.modeldir import save_model

    save_model(root / "model", random_model(tiny_config, seed=1, final_norm_scale=15), tokenizer)
    return root / "model", export_model(root / "model", root / "hf")


def _peft(hf, **options):
    """A PEFT model on the export, its adapter weights moved off their init as training moves them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(hf), LoraConfig(r=4, lora_alpha=8, **options))
    return model.eval()


def _train(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _placed(model, source, out, **save):
    """`source` (the gpt1 model dir or the export) copied to `out`, the PEFT adapter in its adapter/."""
    folder = shutil.copytree(source, out)
    model.save_pretrained(folder / "adapter", **save)
    return folder


def _ids(vocab_size):
    """Two sequences with the special tokens (ids 2-6, the trained rows) among other tokens."""
    x = torch.randint(7, vocab_size, (2, 24))
    x[:, 3:8] = torch.tensor([2, 3, 4, 5, 6])
    x[:, 15:18] = torch.tensor([4, 3, 2])
    return x


# ---- 1. an init that rewrote the base weights ------------------------------------------------

def test_a_pissa_adapter_is_refused_on_both_paths_and_peft_s_conversion_reads_exactly(base, tmp_path):
    """PEFT's PiSSA init sets W to W - scale·B0·A0 as it makes the adapter; saved as PEFT saves it
    the adapter applies to that changed base. Both paths merged it onto the saved base as plain
    LoRA (0.92 off PEFT's logits), `finetune --base` trained from it without a word."""
    model_dir, hf = base
    peft_model = _peft(hf, target_modules=["c_fc"], init_lora_weights="pissa")
    peft_model.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the adapter before training
    peft_model.save_pretrained(tmp_path / "initial")
    peft_model.peft_config["default"].init_lora_weights = "pissa"
    _train(peft_model)
    refused = (r"adapter/adapter_config.json: init_lora_weights 'pissa' changed the base weights when the adapter "
               r"was made .* save_pretrained\(DIR, path_initial_model_for_weight_conversion=INITIAL\).*merge_and_unload")
    with pytest.raises(Gpt1Error, match=refused):
        import_hf_model(_placed(peft_model, hf, tmp_path / "folder"))
    with pytest.raises(Gpt1Error, match=refused):
        load_model(_placed(peft_model, model_dir, tmp_path / "md"))
    # The way the message names: a plain LoRA of rank 2r, which imports with PEFT's logits.
    converted = _placed(peft_model, hf, tmp_path / "converted",
                        path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    x = _ids(peft_model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(import_hf_model(converted)[0](x), peft_model(x).logits, atol=1e-4, rtol=0)
    # The other inits that rewrite the base, by name; those that leave it as it is load.
    config_file = tmp_path / "md" / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    for init in ("pissa_niter_4", "olora", "corda", "lora_ga", "loftq"):
        config_file.write_text(json.dumps({**config, "init_lora_weights": init}))
        with pytest.raises(Gpt1Error, match=f"init_lora_weights '{init}' changed the base weights"):
            load_model(tmp_path / "md")
    for init in (True, False, "gaussian", "orthogonal", "eva", "mica"):
        config_file.write_text(json.dumps({**config, "init_lora_weights": init}))
        load_model(tmp_path / "md")


# ---- 2. PEFT's variants: one list, both paths -------------------------------------------------

@pytest.mark.parametrize("options, field", [
    (dict(target_modules=["c_fc"], alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM"), "alora_invocation_tokens"),
    (dict(target_modules=[], target_parameters=["mlp.c_fc.weight"]), "target_parameters"),
], ids=["alora", "target_parameters"])
def test_a_peft_variant_in_a_model_dir_is_refused_as_the_import_refuses_it(base, tmp_path, options, field):
    """An aLoRA adapter in a model dir's adapter/ was applied to every token as plain LoRA (10.2 off
    PEFT's logits before the invocation tokens), `gpt1 generate` silent; target_parameters gave
    "LoRA targets: none given". The import refused both; now the model dir does, in the same words."""
    model_dir, hf = base
    peft_model = _train(_peft(hf, **options))
    errors = []
    for load, source in ((lambda d: import_hf_model(d), hf), (load_model, model_dir)):
        with pytest.raises(Gpt1Error) as e:
            load(_placed(peft_model, source, tmp_path / f"{len(errors)}"))
        errors.append(str(e.value).replace(str(tmp_path / f"{len(errors)}"), "DIR"))
    assert errors[0] == errors[1]
    assert errors[1].startswith(f"DIR/adapter/adapter_config.json: {field}: a LoRA variant whose update is not "
                                "scale·B·A, which gpt1 does not merge; merge it with PEFT instead")


# ---- 3. trainable_token_indices as PEFT lists them ----------------------------------------------

@pytest.mark.parametrize("indices", [[4, 2, 3], {"wte": [4, 2, 3]}], ids=["list", "object"])
def test_trained_token_rows_load_in_a_model_dir_as_peft_lists_them(base, tmp_path, indices):
    """A list (PEFT: the input embedding's) was refused in a model dir ("must be an object") while
    the import read it; an object read the rows sorted where PEFT stores them as listed (4, 2, 3:
    10.0 off PEFT's logits at those tokens)."""
    model_dir, hf = base
    peft_model = _train(_peft(hf, target_modules=["c_fc"], trainable_token_indices=indices))
    x = _ids(peft_model.config.vocab_size)
    with torch.no_grad():
        expected = peft_model(x).logits
        torch.testing.assert_close(load_model(_placed(peft_model, model_dir, tmp_path / "md"))(x), expected,
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(import_hf_model(_placed(peft_model, hf, tmp_path / "hf"))[0](x), expected,
                                   atol=1e-4, rtol=0)


def test_an_adapter_gpt1_saves_lists_its_token_rows_in_their_stored_order(tiny_config, tmp_path):
    """gpt1 holds the trained rows sorted by id but wrote trainable_token_indices as the config gave
    them: token_ids [5, 3] put row 3's values on token 5 in PEFT."""
    from peft import PeftModel

    from tests.test_lora import _hf_gpt2

    plain = random_model(tiny_config, seed=2, final_norm_scale=15).eval()
    base_state = {k: v.clone() for k, v in plain.state_dict().items()}
    model = inject_lora(plain, LoRAConfig(r=4, alpha=8, token_ids=[5, 3]))
    with torch.no_grad():
        model.transformer.wte.trainable_tokens.normal_()
    save_adapter(model, tmp_path / "adapter")
    x = _ids(tiny_config.vocab_size)
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(_hf_gpt2(GPT(tiny_config), base_state), tmp_path / "adapter").eval()
        torch.testing.assert_close(peft_model(x).logits, model(x), atol=1e-4, rtol=0)


# ---- 4. the refusals say what works -----------------------------------------------------------

@pytest.mark.parametrize("options, refused", [
    ({}, r"its lora_B is not block-diagonal over any one of q, k and v .*only adapters written by gpt1 are supported\)"),
    (dict(target_modules=["c_fc", "c_proj"], rank_pattern={"c_fc": 2}, alpha_pattern={"c_fc": 4}),
     r"adapter_model.safetensors: base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight has shape \(2, 64\), "
     r"the model expects \(4, 64\)"),
    (dict(target_modules=["c_fc"], layers_to_transform=[1]), r"adapter does not fit the model \(missing: \["),
], ids=["c_attn-pair", "rank_pattern", "layers_to_transform"])
def test_a_model_dir_adapter_gpt1_cannot_hold_names_the_import_that_reads_it(base, tmp_path, options, refused):
    """PEFT's default pair on the fused c_attn, a rank_pattern, some layers only: the refusal
    ended at the shape, with nothing that works; the import reads each with PEFT's logits."""
    model_dir, hf = base
    peft_model = _train(_peft(hf, **options))
    with pytest.raises(Gpt1Error, match=refused + ".*" + READS_IT + r".*`gpt1 finetune --base FOLDER`, "
                                                                       r"`init_from=hf:FOLDER`"):
        load_model(_placed(peft_model, model_dir, tmp_path / "md"))
    x = _ids(peft_model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(import_hf_model(_placed(peft_model, hf, tmp_path / "hf"))[0](x),
                                   peft_model(x).logits, atol=1e-4, rtol=0)


def test_other_tensors_in_a_model_dir_adapter_name_peft_s_merge(base, tmp_path):
    """modules_to_save: no import reads it either, so the refusal names PEFT's merge instead."""
    model_dir, hf = base
    peft_model = _train(_peft(hf, target_modules=["c_fc"], modules_to_save=["ln_f"]))
    with pytest.raises(Gpt1Error, match=r"unexpected: \[.*ln_f.*\]\); merge it with PEFT instead "
                                        r"\(merge_and_unload\(\)") as e:
        load_model(_placed(peft_model, model_dir, tmp_path / "md"))
    assert "reads any plain LoRA" not in str(e.value)


def test_an_adapter_saved_as_a_pickle_is_named_with_its_fix(base, tmp_path):
    """adapter_model.bin (safe_serialization=False) gave "adapter_model.safetensors: weights file not
    found" (import) or "not a readable safetensors file" (model dir)."""
    model_dir, hf = base
    peft_model = _train(_peft(hf, target_modules=["c_fc"]))
    named = (r"adapter/adapter_model.bin: a pickle \(PEFT's save_pretrained with safe_serialization=False\), which "
             r"gpt1 never loads; save the adapter again .*save_pretrained\(DIR, safe_serialization=True\)")
    with pytest.raises(Gpt1Error, match=named):
        import_hf_model(_placed(peft_model, hf, tmp_path / "hf", safe_serialization=False))
    with pytest.raises(Gpt1Error, match=named):
        load_model(_placed(peft_model, model_dir, tmp_path / "md", safe_serialization=False))


# ---- 5. a transformers folder runs as it is ----------------------------------------------------

def test_a_transformers_folder_loads_to_run_with_its_adapter_merged(base, tokenizer, tmp_path, caplog):
    """generate/chat/serve/eval (gpt1.load) refused a transformers folder, suggesting two commands
    that train. `load_with_tokenizer` imports it: PEFT's logits, gpt1's tokenizer, the dtype and
    the meta device asked for; a gpt1 model dir loads as before."""
    model_dir, hf = base
    peft_model = _train(_peft(hf))  # PEFT's default pair on the fused c_attn, which a model dir cannot hold
    folder = _placed(peft_model, hf, tmp_path / "folder")
    x = _ids(peft_model.config.vocab_size)
    with caplog.at_level("INFO", logger="gpt1"):
        model, tok = load_with_tokenizer(folder)
    assert f"{folder}: a transformers folder, imported as gpt1 imports one" in caplog.text
    assert tok.fingerprint == tokenizer.fingerprint
    with torch.no_grad():
        torch.testing.assert_close(model(x), peft_model(x).logits, atol=1e-4, rtol=0)
    model, _ = load_with_tokenizer(folder, dtype=torch.bfloat16)
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    model, _ = load_with_tokenizer(folder, device="meta")
    assert model.transformer.wte.weight.is_meta and model.config == load_with_tokenizer(folder)[0].config
    model, tok = load_with_tokenizer(model_dir)
    with torch.no_grad():
        torch.testing.assert_close(model(x), load_model(model_dir)(x), atol=0, rtol=0)


def test_a_transformers_folder_without_gpt1_s_tokenizer_is_refused_saying_why(base, tmp_path):
    _, hf = base
    folder = shutil.copytree(hf, tmp_path / "gpt2-like")
    save_gpt2_like_tokenizer(folder / "tokenizer.json")
    with pytest.raises(Gpt1Error, match=r"gpt2-like/tokenizer.json: .*; gpt1 runs a transformers folder with "
                                        r"gpt1's tokenizer only .*`gpt1 pretrain init_from=hf:"):
        load_with_tokenizer(folder)


def test_a_chat_model_s_export_is_a_chat_model(base, chat_dir, tmp_path):
    """gpt1's export holds the template in tokenizer_config.json (transformers 5 saves it again as
    chat_template.jinja): both are chat models, a base model's export is not."""
    assert has_chat_template(chat_dir) and not has_chat_template(base[1]) and not has_chat_template(base[0])
    assert has_chat_template(export_model(chat_dir, tmp_path / "chat"))


def test_generate_runs_a_transformers_folder(base, chat_dir, tmp_path, capsys):
    """The command line: `gpt1 generate --model FOLDER` (through gpt1.load) gives the import's text;
    a chat model's export is a chat model there (no "has no chat template: it is a base model")."""
    import gpt1
    from gpt1.cli import main

    _, hf = base
    assert gpt1.load(export_model(chat_dir, tmp_path / "chat"), device="cpu").is_chat_model
    assert main(["generate", "--model", str(hf), "--prompt", "import os", "--temperature", "0",
                 "--max-new-tokens", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    llm = gpt1.load(hf, device="cpu")
    assert llm.generate("import os", temperature=0, max_new_tokens=8) in out


def test_a_transformers_folder_is_not_imported_for_its_shapes_alone(base, tmp_path):
    """A server's HTTP side (`--engine process`, the CUDA default) loads the architecture alone;
    for a transformers folder it imported every weight as well, and held a second float32 copy
    for the server's life. A NaN weight, which the import refuses, shows that none is read."""
    from safetensors.torch import load_file, save_file

    _, hf = base
    folder = shutil.copytree(hf, tmp_path / "nan")
    weights = load_file(folder / "model.safetensors")
    weights[next(n for n in weights if n.endswith("mlp.c_fc.weight"))][0, 0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Gpt1Error):
        load_with_tokenizer(folder)
    model, tok = load_with_tokenizer(folder, device="meta")
    assert model.transformer.wte.weight.is_meta and tok is not None
    assert model.config == load_with_tokenizer(hf)[0].config


def test_hf_prefix_names_the_folder_to_run_as_training_takes_it(base, tmp_path, monkeypatch):
    """`--model hf:FOLDER` (as init_from=hf:FOLDER and --base hf:FOLDER take it) was refused as
    "a gpt1 model dir ... to train from" while the folder without hf: ran."""
    import gpt1

    _, hf = base
    monkeypatch.chdir(hf.parent)
    llm = gpt1.load(f"hf:{hf.name}")
    assert llm.path == hf.resolve() and llm.model.config.vocab_size > 0


# ---- 6. an adapter PEFT trained on the export ------------------------------------------------
def _peft_trained(tmp_path, model_dir, lora_config):
    """`model_dir` exported, then fine-tuned in PEFT for two steps and saved as PEFT saves it (the
    export with the adapter in adapter/). Returns the folder and the PEFT model (eval mode)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    hf = export_model(model_dir, tmp_path / "hf")
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(hf), lora_config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(0, peft_model.config.vocab_size, (2, 32))
    for _ in range(2):  # a few steps: every lora_B non-zero, as after training
        peft_model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = shutil.copytree(hf, tmp_path / "peft_ft")
    peft_model.save_pretrained(folder / "adapter")
    return folder, peft_model.eval()


@pytest.mark.parametrize("options", [
    {},  # PEFT's default for GPT-2: one pair of rank 8 on the fused c_attn
    # Every module, its own scales (rsLoRA, patterns), trained biases of lora_B, trained token rows.
    dict(target_modules=["c_attn", "c_proj", "c_fc"], use_rslora=True, rank_pattern={"c_fc": 4},
         alpha_pattern={"attn.c_proj": 4}, lora_bias=True, trainable_token_indices=[2, 3, 4]),
], ids=["default", "rslora-patterns-bias-tokens"])
def test_an_adapter_peft_trained_on_the_fused_c_attn_imports_with_peft_s_logits(tmp_path, tiny_model_dir, options):
    """`import_hf_model` (so `finetune --base`, `init_from=hf:`) refused every PEFT pair on c_attn,
    PEFT's default LoraConfig for GPT-2 among them: "not one per-projection pair ... only adapters
    written by gpt1 are supported". Import always merges, and W += scale·B·A is exact for any pair."""
    from peft import LoraConfig

    folder, peft_model = _peft_trained(tmp_path, tiny_model_dir,
                                       LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM", **options))
    if not options:
        assert json.loads((folder / "adapter" / "adapter_config.json").read_text())["target_modules"] == ["c_attn"]
    imported, tokenizer = import_hf_model(folder)
    assert tokenizer is not None
    x = torch.randint(0, imported.config.vocab_size, (2, 40))
    x[:, ::7] = 3  # a trained token row, where there are
    with torch.no_grad():
        expected = peft_model(x).logits
        with peft_model.disable_adapter():  # the adapter matters
            assert (expected - peft_model(x).logits).abs().max() > 1e-2
        torch.testing.assert_close(imported(x), expected, atol=1e-5, rtol=0)


def test_an_adapter_import_cannot_merge_says_how_to_merge_it_in_peft(tmp_path, tiny_model_dir, capsys):
    """The refusal suggested `gpt1 export --merge`, which refuses a transformers folder ("already a
    transformers folder, not a gpt1 model dir"). DoRA stays refused, naming PEFT's merge."""
    from peft import LoraConfig

    folder, _ = _peft_trained(tmp_path, tiny_model_dir, LoraConfig(r=4, lora_alpha=8, use_dora=True))
    line = assert_one_clear_line(*run_main(capsys, "finetune", "--base", folder, "--data", "unused.jsonl",
                                           "--out", tmp_path / "ft"),
                                 r"peft_ft/adapter/adapter_config.json: use_dora: a LoRA variant whose update is not "
                                 r"scale·B·A, which gpt1 does not merge; merge it with PEFT instead \(.*merge_and_unload")
    assert "gpt1 export" not in line
