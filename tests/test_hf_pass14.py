"""Using the Hugging Face export as the HF ecosystem does (pass 14): an adapter PEFT trained on the
export imports into gpt1 with PEFT's logits, and the exported chat template works with
transformers' assistant mask and refuses tools it cannot show the model."""

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: everything here is local

import pytest
import torch

from gpt1.formats.hf import export_model, import_hf_model
from tests.test_battery import assert_one_clear_line, run_main

CHAT = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is a dict?"},
    {"role": "assistant", "content": "A mapping from keys to values."},
    {"role": "user", "content": "And a list?"},
    {"role": "assistant", "content": "A sequence."},
]


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


def test_the_exported_chat_template_marks_the_assistant_replies(tmp_path, chat_dir, tokenizer):
    """return_assistant_tokens_mask (TRL's assistant_only_loss) gave all zeros: the template had no
    {% generation %}. The mask is now gpt1's own training labels (reply text and its [EOS]), and
    the ids are unchanged."""
    from transformers import AutoTokenizer

    from gpt1.core.chat_template import encode_chat_with_labels
    from gpt1.core.constants import IGNORE_INDEX

    hf_tok = AutoTokenizer.from_pretrained(export_model(chat_dir, tmp_path / "hf"))
    ids, labels = encode_chat_with_labels(tokenizer, CHAT)
    got = hf_tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert list(got["input_ids"]) == ids
    assert list(got["assistant_masks"]) == [int(label != IGNORE_INDEX) for label in labels]
    assert sum(got["assistant_masks"]) == len(tokenizer.encode("A mapping from keys to values.")) + len(
        tokenizer.encode("A sequence.")) + 2  # the replies and their [EOS], never a role marker


TOOLS = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}]


def test_the_exported_chat_template_refuses_tools(tmp_path, chat_dir, tokenizer):
    """`tools=` was dropped without a word ('<|user|>hi<|assistant|>'): the model never saw them.
    The template refuses them, as `gpt1 serve` does; no tools, or an empty list, render as before."""
    import jinja2
    from transformers import AutoTokenizer

    from gpt1.core.chat_template import encode_chat

    hf_tok = AutoTokenizer.from_pretrained(export_model(chat_dir, tmp_path / "hf"))
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(jinja2.TemplateError, match=r"^tools: gpt1 models cannot call tools"):
        hf_tok.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    for tools in (None, []):
        got = hf_tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
        assert list(got["input_ids"] if hasattr(got, "keys") else got) == encode_chat(tokenizer, messages)


def test_llama_cpp_renders_the_gguf_template_and_refuses_tools(tmp_path, chat_dir, tokenizer, tiny_config):
    """The GGUF copy of the template (no {% generation %}: older llama-cpp-python cannot parse it)
    renders gpt1's ids in llama-cpp-python, with tools=None as it passes them, and refuses tools."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from gpt1.benchmarks.llamacpp import open_llama
    from gpt1.core.chat_template import encode_chat
    from gpt1.formats.gguf import export_gguf

    llm = open_llama(llama_cpp, export_gguf(chat_dir, tmp_path / "chat.gguf", "f32"), n_ctx=tiny_config.block_size,
                     n_threads=1, verbose=False, seed=0)
    assert "{% generation %}" not in llm.metadata["tokenizer.chat_template"]
    with pytest.raises(ValueError, match=r"^tools: gpt1 models cannot call tools"):  # its raise_exception
        llm.create_chat_completion(messages=CHAT[:2], tools=TOOLS, max_tokens=1)
    llm.create_chat_completion(messages=CHAT[:2], max_tokens=1, temperature=0.0)
    expected = encode_chat(tokenizer, CHAT[:2])
    assert llm.input_ids[: len(expected)].tolist() == expected


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
