"""Random-weight models with the properties several test modules rely on, and a tokenizer of OpenAI GPT-2's kind."""

import torch

from gpt1.core.lora import LoRAConfig, inject_lora
from gpt1.core.model import GPT
from gpt1.train.finetune import save_finetuned


def random_model(config, seed: int, final_norm_scale: float = 1.0) -> GPT:
    """Random weights with non-trivial LayerNorms and biases, so that a mix-up of tensors in an
    export would show. `final_norm_scale` widens the logits' spread (15 gives std ~2.5, a
    trained tiny model's; a freshly initialised one has ~0.2)."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
        model.transformer.ln_f.weight.mul_(final_norm_scale)
    return model


def model_without_stops(config, tokenizer, seed: int) -> GPT:
    """Random weights, except that special tokens never win (so that every run lasts its
    max_new_tokens): feature 0 of the final LayerNorm is a constant 1, which only the special
    tokens' output rows read."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight[0], model.transformer.ln_f.bias[0] = 0.0, 1.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tokenizer.special_ids] = 0.0
        model.lm_head.weight[tokenizer.special_ids, 0] = -100.0
    return model


def finetuned_dir(path, config, tokenizer, seed: int, final_norm_scale: float = 1.0) -> GPT:
    """A LoRA fine-tuned model dir as `gpt1 finetune` writes it: the base with the trained
    special-token rows in model.safetensors, the chat template, and adapter/ in PEFT's layout.
    Returns the model (LoRA layers unmerged)."""
    model = random_model(config, seed, final_norm_scale)
    inject_lora(model, LoRAConfig(r=4, alpha=8, token_ids=[2, 3, 4, 5]))
    with torch.no_grad():  # as after training: non-zero updates and moved token rows
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
            elif name.endswith("trainable_tokens"):
                p.add_(0.01 * torch.randn_like(p))
    save_finetuned(path, model, tokenizer, {"path": "base"})
    return model


def save_gpt2_like_tokenizer(path) -> None:
    """A tokenizer.json of OpenAI GPT-2's kind at `path`: byte-level BPE whose only special token
    is <|endoftext|> (none of gpt1's)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["some text to learn a few merges from"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.save(str(path))
