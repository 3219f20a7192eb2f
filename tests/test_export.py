"""Hugging Face interop, checked with the real transformers and peft: exports load offline with
AutoModelForCausalLM / AutoTokenizer / PeftModel and give our logits, greedy text and chat ids."""

import dataclasses
import json
import os
import shutil
import stat

from gpt1.cli import main
from gpt1.core.sampling_params import SamplingParams
from gpt1.formats.modeldir import load_model
from gpt1.inference.generate import generate
from tests.model_factories import finetuned_dir, model_without_stops, random_model

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: everything here is local

import pytest
import torch

from gpt1 import GPT
from gpt1.core.chat_template import HF_JINJA_TEMPLATE, JINJA_TEMPLATE, TEMPLATE_FILE, encode_chat
from gpt1.core.errors import Gpt1Error
from gpt1.formats.hf import export_model, import_hf_model, is_hf_model_dir
from gpt1.formats.modeldir import save_model

CHAT = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": " What is a dict?\n"},
    {"role": "assistant", "content": "A mapping from keys to values."},
    {"role": "user", "content": "And  a list? 🌍"},
]
TEXT = "def encode(obj):\n    return json.dumps(obj, indent=2)  # héllo"




def _model_dir(path, model, tokenizer, chat=False):
    save_model(path, model, tokenizer)
    if chat:
        (path / TEMPLATE_FILE).write_text(JINJA_TEMPLATE)
    return path


def _greedy(model: GPT, tokenizer, ids: list[int], n: int) -> list[int]:
    """gpt1's greedy continuation (without the special token that stopped it, if any)."""
    assert len(ids) + n <= model.config.block_size
    return generate(model, tokenizer, ids, SamplingParams(temperature=0, max_new_tokens=n)).token_ids


def _hf_greedy(hf, ids: list[int], n: int, tokenizer) -> list[int]:
    """transformers' greedy continuation, stopping where the exported generation_config says."""
    with torch.no_grad():
        new = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n)[0, len(ids):].tolist()
    return new[:-1] if new and new[-1] in tokenizer.special_ids else new


def _ids(encoded) -> list[int]:
    """apply_chat_template's ids (transformers 5 returns a BatchEncoding, 4 a list)."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@pytest.mark.parametrize("tie", [False, True])
def test_export_loads_in_transformers_with_equal_logits_and_text(tmp_path, tiny_config, tokenizer, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = dataclasses.replace(tiny_config, tie_embeddings=tie)
    model = random_model(config, seed=1)
    out = export_model(_model_dir(tmp_path / "model", model, tokenizer), tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json"]

    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["GPT2LMHeadModel"] and hf_config["model_type"] == "gpt2"
    assert hf_config["tie_word_embeddings"] is tie and hf_config["n_inner"] == config.mlp_hidden
    assert (hf_config["eos_token_id"], hf_config["pad_token_id"]) == (2, 0)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["do_sample"] is True and generation["temperature"] == 0.7 and generation["top_k"] == 50
    assert generation["eos_token_id"][0] == 2 and sorted(generation["eos_token_id"]) == tokenizer.special_ids
    assert generation["pad_token_id"] == 0

    hf, loading = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    hf.eval()
    x = torch.randint(0, config.vocab_size, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=0)

    hf_tok = AutoTokenizer.from_pretrained(out)
    for text in (TEXT, "  leading spaces\ttabs\r\n", "日本語 and emoji 🌍🚀", ""):
        ids = tokenizer.encode(text)
        assert hf_tok(text)["input_ids"] == ids
        assert hf_tok.decode(ids) == tokenizer.decode(ids) == text
    prompt = tokenizer.encode(TEXT)
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.unk_token_id) == (2, 0, 1)
    assert hf_tok.chat_template is None  # a base model: no chat template
    prompt = prompt[:12]
    continuation = _greedy(model, tokenizer, prompt, 24)
    assert _hf_greedy(hf, prompt, 24, tokenizer) == continuation
    # (a random tied model mostly repeats one token: its own embedding is its best match)
    assert tie or len(set(continuation)) > 5


def test_chat_template_gives_gpt1_ids(tmp_path, tiny_config, tokenizer):
    from transformers import AutoTokenizer

    chat_dir = _model_dir(tmp_path / "chat", random_model(tiny_config, seed=5), tokenizer, chat=True)
    out = export_model(chat_dir, tmp_path / "hf")
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == HF_JINJA_TEMPLATE
    hf_tok = AutoTokenizer.from_pretrained(out)
    for messages in (CHAT, CHAT[1:2], CHAT[:3]):
        got = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        assert _ids(got) == encode_chat(tokenizer, messages)
    got = hf_tok.apply_chat_template(CHAT[:3], tokenize=True, add_generation_prompt=False)
    assert _ids(got) == encode_chat(tokenizer, CHAT[:3], add_generation_prompt=False)
    assert {"<|system|>", "<|user|>", "<|assistant|>"} <= set(hf_tok.all_special_tokens)


@pytest.mark.parametrize("tie,bias", [(False, True), (True, False)])
def test_round_trip_gpt1_export_import(tmp_path, tiny_config, tokenizer, tie, bias):
    config = dataclasses.replace(tiny_config, tie_embeddings=tie, bias=bias)
    model = random_model(config, seed=2)
    model_dir = _model_dir(tmp_path / "model", model, tokenizer)
    out = export_model(model_dir, tmp_path / "hf")
    assert is_hf_model_dir(out) and not is_hf_model_dir(model_dir) and not is_hf_model_dir(tmp_path / "nope")
    imported, imported_tok = import_hf_model(out)
    # GPT-2 always has biases: a bias-free model comes back with zero biases, the same function.
    assert imported.config == dataclasses.replace(config, bias=True)
    assert imported_tok is not None and imported_tok.fingerprint == tokenizer.fingerprint
    assert not imported.training
    if tie:
        assert imported.lm_head.weight is imported.transformer.wte.weight
    x = torch.randint(0, config.vocab_size, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(imported(x), model(x), atol=1e-5, rtol=0)


def test_import_a_transformers_gpt2_checkpoint(tmp_path):
    """A GPT-2 saved by transformers itself, with a GPT-2-style tokenizer (only <|endoftext|>):
    the weights import, the tokenizer is not gpt1's and comes back as None."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    hf.save_pretrained(tmp_path / "gpt2")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator([TEXT] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    backend.save(str(tmp_path / "gpt2" / "tokenizer.json"))

    model, tok = import_hf_model(tmp_path / "gpt2")
    assert tok is None
    assert model.config.tie_embeddings and model.config.dropout == 0.1 and model.config.mlp_ratio == 4
    x = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=0)


def test_import_rejects_other_architectures_and_options(tmp_path):
    from transformers import BertConfig, GPT2Config, LlamaConfig

    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(tmp_path / "llama")
    BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(tmp_path / "bert")
    GPT2Config(n_embd=16, n_layer=1, n_head=2, activation_function="relu").save_pretrained(tmp_path / "relu")
    assert is_hf_model_dir(tmp_path / "llama")
    with pytest.raises(Gpt1Error, match="model_type 'llama'.*only the GPT-2 architecture"):
        import_hf_model(tmp_path / "llama")
    with pytest.raises(Gpt1Error, match="model_type 'bert' is not supported"):
        import_hf_model(tmp_path / "bert")
    with pytest.raises(Gpt1Error, match="activation_function='relu'"):
        import_hf_model(tmp_path / "relu")
    with pytest.raises(Gpt1Error, match="model directory not found"):
        import_hf_model(tmp_path / "missing")
    # Weights only as a pickle (pytorch_model.bin): refused by name, never unpickled.
    GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2).save_pretrained(tmp_path / "pickled")
    torch.save({"transformer.wte.weight": torch.zeros(64, 16)}, tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(Gpt1Error, match=r"no .safetensors weights \(found: pytorch_model.bin\); gpt1 reads .* never "
                                        r"from pickles"):
        import_hf_model(tmp_path / "pickled")


def test_import_of_a_gpt1_model_dir_says_so(tiny_model_dir):
    with pytest.raises(Gpt1Error, match="a gpt1 model dir, not a transformers folder"):
        import_hf_model(tiny_model_dir)


@pytest.mark.parametrize("tie", [False, True])
def test_finetuned_export_loads_in_peft_and_merged(tmp_path, tiny_config, tokenizer, tie):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = dataclasses.replace(tiny_config, tie_embeddings=tie)
    model = finetuned_dir(tmp_path / "chat", config, tokenizer, seed=4)
    out = export_model(tmp_path / "chat", tmp_path / "hf")
    assert (out / "adapter" / "adapter_config.json").is_file()
    x = torch.randint(0, config.vocab_size, (2, 30))
    x[:, ::5] = 4  # role markers: their trained rows matter
    messages = CHAT[:2]
    prompt = encode_chat(tokenizer, messages)
    assert _ids(AutoTokenizer.from_pretrained(out).apply_chat_template(messages, add_generation_prompt=True)) == prompt

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapter").eval()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(peft_model(x).logits, expected, atol=1e-4, rtol=0)
    continuation = _greedy(model, tokenizer, prompt, 16)
    assert _hf_greedy(peft_model, prompt, 16, tokenizer) == continuation
    assert tie or len(set(continuation)) > 5
    # base_model_name_or_path points at the exported base, so PEFT's auto class finds it alone.
    auto = AutoPeftModelForCausalLM.from_pretrained(out / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(auto(x).logits, expected, atol=1e-4, rtol=0)

    merged = export_model(tmp_path / "chat", tmp_path / "merged", merge=True)
    assert not (merged / "adapter").exists()
    hf = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, expected, atol=1e-4, rtol=0)
    assert _hf_greedy(hf, prompt, 16, tokenizer) == continuation


def test_out_dir_rules(tmp_path, tiny_model_dir):
    out = tmp_path / "hf"
    out.mkdir()
    export_model(tiny_model_dir, out)  # an empty folder is fine
    (out / "stale.txt").write_text("from an older export")
    with pytest.raises(Gpt1Error, match="exists and is not empty.*--force"):
        export_model(tiny_model_dir, out)
    export_model(tiny_model_dir, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folders left behind
    with pytest.raises(Gpt1Error, match="would replace the model dir"):
        export_model(tiny_model_dir, tiny_model_dir, overwrite=True)
    with pytest.raises(Gpt1Error, match="nothing to merge"):
        export_model(tiny_model_dir, tmp_path / "merged", merge=True)
    with pytest.raises(Gpt1Error, match="already a transformers folder"):
        export_model(out, tmp_path / "again")


def test_force_replaces_only_an_earlier_export_never_a_folder_it_did_not_write(tmp_path, tiny_model_dir, data_dir):
    """`--force` deleted whatever --out named: the model's own adapter/ or checkpoints/, a run, a
    prepared data dir, a folder of the user's files. Now it replaces only an earlier export."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "checkpoints").mkdir()
    (model / "checkpoints" / "step-1").write_text("a checkpoint")
    own = tmp_path / "own"
    own.mkdir()
    (own / "notes.txt").write_text("mine")
    for out, said in [(model / "checkpoints", "holds other files"), (own, "holds other files"),
                      (data_dir, "is a prepared data dir"), (model, "would replace the model dir"),
                      (tmp_path, "would replace the model dir")]:
        with pytest.raises(Gpt1Error, match=f"{said}.*choose another --out"):
            export_model(model, out, overwrite=True)
    assert (model / "checkpoints" / "step-1").read_text() == "a checkpoint" and (own / "notes.txt").read_text() == "mine"
    assert (data_dir / "train.bin").is_file()
    export_model(model, model / "hf")  # a new folder inside the model dir is fine, and so is replacing it
    export_model(model, model / "hf", overwrite=True)
    assert (model / "hf" / "config.json").is_file() and (model / "checkpoints" / "step-1").is_file()


def test_merge_model_dir_replaces_only_an_earlier_merge(tmp_path, tiny_config, tokenizer, data_dir):
    """The Python API's merge replaced any dest it was given, a run or a data dir among them."""
    from gpt1.train.finetune import merge_model_dir

    chat = tmp_path / "chat"
    finetuned_dir(chat, tiny_config, tokenizer, seed=0)
    shutil.copytree(chat, tmp_path / "another_chat")
    with pytest.raises(Gpt1Error, match="is a prepared data dir, not an earlier merged model"):
        merge_model_dir(chat, data_dir)
    with pytest.raises(Gpt1Error, match="is a model dir, not an earlier merged model"):
        merge_model_dir(chat, tmp_path / "another_chat")  # a fine-tuned model: its adapter would go
    merge_model_dir(chat, tmp_path / "merged")
    merge_model_dir(chat, tmp_path / "merged")  # again: an earlier merge is replaced
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (data_dir / "train.bin").is_file()


def test_export_folder_has_the_permissions_of_a_plain_mkdir(tmp_path, tiny_model_dir):
    """The folder is built under a temporary name (mkdtemp: 0700) and renamed into place: it
    must still get 0777 & ~umask, also when it replaces an existing empty 0755 folder."""
    replaced = tmp_path / "replaced"
    replaced.mkdir(mode=0o755)
    old = os.umask(0o022)
    try:
        for out in (tmp_path / "new", replaced):
            export_model(tiny_model_dir, out)
            assert stat.S_IMODE(out.stat().st_mode) == 0o755, out
    finally:
        os.umask(old)


def test_cli_export_and_bad_input(tmp_path, tiny_model_dir, capsys):
    """`main` is what the `gpt1` script runs; called in-process to save interpreter start-ups."""
    assert main(["export", "--model", str(tiny_model_dir), "--out", str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "hf") and (tmp_path / "hf" / "config.json").is_file()
    for args, message in [
        (["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x")], "missing: model directory not found"),
        (["--model", str(tiny_model_dir), "--out", str(tmp_path / "hf")], "hf: exists and is not empty"),
        # a file where the output's parent folder should be, and a folder where nothing can be created
        (["--model", str(tiny_model_dir), "--out", str(tmp_path / "hf" / "config.json" / "x")],
         "config.json: exists and is not a folder"),
        *([(["--model", str(tiny_model_dir), "--out", "/proc/gpt1x"], "/proc: cannot write gpt1x there")]
          if os.path.isdir("/proc/self") else []),
    ]:
        assert main(["export", *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gpt1 export: error: ") and message in lines[0], lines


def test_finetune_starts_from_an_exported_folder(tmp_path, tiny_config, tokenizer):
    """`gpt1 finetune --base` takes a transformers folder: the fine-tune starts from exactly its weights."""
    model = random_model(tiny_config, seed=4)
    hf_dir = export_model(_model_dir(tmp_path / "model", model, tokenizer), tmp_path / "hf")
    with pytest.raises(Gpt1Error, match="transformers folder, not a gpt1 model dir.*--base"):
        load_model(hf_dir)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": CHAT[1:3]}) + "\n" for _ in range(8)))
    out = tmp_path / "ft"
    assert main(["finetune", "--base", f"hf:{hf_dir}", "--data", str(chats), "--out", str(out),
                 "max_steps=1", "batch_size=4", "device=cpu"]) == 0
    tuned = load_model(out, adapter="ignore")  # the base the adapter applies to: the export's weights
    for name, tensor in model.state_dict().items():
        if name != "transformer.wte.weight":  # special-token rows are trained
            torch.testing.assert_close(tuned.state_dict()[name], tensor, msg=name)


def test_finetune_refuses_a_gpt2_without_a_gpt1_tokenizer(tmp_path, capsys):
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "gpt2")
    Tokenizer(models.BPE()).save(str(tmp_path / "gpt2" / "tokenizer.json"))
    (tmp_path / "chats.jsonl").write_text(json.dumps({"messages": CHAT[1:3]}) + "\n")
    assert main(["finetune", "--base", str(tmp_path / "gpt2"), "--data", str(tmp_path / "chats.jsonl"),
                 "--out", str(tmp_path / "ft")]) == 2
    err = capsys.readouterr().err  # the reason, not "[PAD]=0, [UNK]=1, [EOS]=2 are needed" of a tokenizer that had them
    assert "tokenizer.json: not a gpt1 tokenizer (a None pre-tokenizer)" in err
    assert "chat fine-tuning needs gpt1's tokenizer" in err
    # Without any tokenizer.json it said the same, of a tokenizer that is not there.
    (tmp_path / "gpt2" / "tokenizer.json").unlink()
    assert main(["finetune", "--base", str(tmp_path / "gpt2"), "--data", str(tmp_path / "chats.jsonl"),
                 "--out", str(tmp_path / "ft")]) == 2
    err = capsys.readouterr().err
    assert "gpt2: no tokenizer.json; put the gpt1 tokenizer.json the model was trained with in the folder" in err
    assert "not gpt1-compatible" not in err


@pytest.mark.parametrize("tie", [False, True])
def test_import_of_an_unmerged_finetuned_export_merges_its_adapter(tmp_path, tiny_config, tokenizer, tie):
    """`import_hf_model` of base + adapter/ (the default export of a fine-tuned model) gave the
    base alone: `gpt1 finetune --base` and init_from=hf: continued from the wrong model, silently."""
    config = dataclasses.replace(tiny_config, tie_embeddings=tie)
    finetuned_dir(tmp_path / "chat", config, tokenizer, seed=4)
    export_model(tmp_path / "chat", tmp_path / "hf")
    imported, imported_tokenizer = import_hf_model(tmp_path / "hf")
    chat = load_model(tmp_path / "chat")
    x = torch.randint(0, config.vocab_size, (2, 30))
    x[:, ::5] = 4  # role markers: their trained rows matter
    with torch.no_grad():
        torch.testing.assert_close(imported(x), chat(x), atol=1e-5, rtol=0)
    assert imported_tokenizer.fingerprint == tokenizer.fingerprint


def test_generation_config_defaults_stop_at_the_context(tmp_path, tiny_config, tokenizer):
    """The export asked for qa's 256 new tokens on a model of 64 positions: transformers' generate
    ran past the position embeddings (IndexError). gpt1 stops at the context; so does the export."""
    from transformers import AutoModelForCausalLM

    model = model_without_stops(tiny_config, tokenizer, seed=2)  # no special token ends it early
    hf = AutoModelForCausalLM.from_pretrained(export_model(_model_dir(tmp_path / "m", model, tokenizer),
                                                           tmp_path / "hf")).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        out = hf.generate(torch.tensor([tokenizer.encode(TEXT)[:10]]))  # the export's defaults: sampling, length
    assert out.shape == (1, tiny_config.block_size) == (1, hf.config.n_positions)


def test_a_tokenizer_saved_again_by_transformers_is_still_gpt1s(tmp_path, tiny_model_dir):
    """transformers 5 writes a TemplateProcessing post-processor that adds nothing when it saves a
    tokenizer (`"single": [A]`): the merge_and_unload + save_pretrained folder that gpt1's own
    import error suggests was refused as "not a gpt1 tokenizer", and finetune --base said its
    [PAD]/[UNK]/[EOS] were missing. One that adds a token stays refused."""
    from transformers import AutoTokenizer

    from gpt1.core.tokenizer import Tokenizer

    export_model(tiny_model_dir, tmp_path / "hf")
    AutoTokenizer.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "again")
    file = tmp_path / "again" / "tokenizer.json"
    saved = json.loads(file.read_text())
    text = "Hello [EOS] world\r\n  \u00e9t\u00e9 \U0001f469\u200d\U0001f4bb 12345"
    assert Tokenizer.load(file).encode(text) == Tokenizer.load(tiny_model_dir).encode(text)
    saved["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "[EOS]", "type_id": 0}},
                                                                       {"Sequence": {"id": "A", "type_id": 0}}],
                               "pair": [], "special_tokens": {"[EOS]": {"id": "[EOS]", "ids": [2], "tokens": ["[EOS]"]}}}
    file.write_text(json.dumps(saved))
    with pytest.raises(Gpt1Error, match="not a gpt1 tokenizer .a TemplateProcessing post-processor that adds tokens"):
        Tokenizer.load(file)


# ---- the quickstart's printed export line ------------------------------------------------------
def test_the_quickstart_s_export_line_gives_a_folder_transformers_loads_with_the_fine_tune(
        tmp_path, tiny_config, tokenizer):
    """The printed `gpt1 export` (no --merge) gave base + adapter/, which pipeline(...) and
    AutoModelForCausalLM load as the base, silently, with the chat template: the fine-tune was
    gone (logits off by up to 10). The line it prints now is run here as typed."""
    import shlex

    from transformers import AutoModelForCausalLM

    from gpt1.cli import main
    from gpt1.cli.quickstart_cmd import report
    from gpt1.formats.modeldir import load_model
    from gpt1.quickstart import QuickstartResult
    from tests.model_factories import finetuned_dir

    out = tmp_path / "qs"
    finetuned_dir(out / "chat", tiny_config, tokenizer, seed=4)
    result = QuickstartResult(out=out, tokenizer=out / "tokenizer", data=out / "data", base=out / "base",
                              chat=out / "chat", plot=out / "loss.png", train_tokens=1, base_steps=1,
                              base_parameters=1, base_val_perplexity=None, base_val_bits_per_byte=None, chat_steps=1,
                              chat_val_perplexity=None, chat_val_bits_per_byte=None, samples=[])
    [line] = [line for line in report(result).splitlines() if line.strip().startswith("gpt1 export")]
    argv = shlex.split(line.split("#")[0])
    assert main(argv[1:]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out / "hf").eval()  # as pipeline("text-generation", ...) loads it
    x = torch.randint(0, tiny_config.vocab_size, (2, 30))
    x[:, ::5] = 4  # role markers: their trained rows matter
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, load_model(out / "chat")(x), atol=1e-4, rtol=0)
