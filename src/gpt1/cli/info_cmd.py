"""`gpt1 info`: the config and parameter count of a preset or a model dir."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from gpt1.cli.args import text
from gpt1.core.config import PRESETS, ModelConfig
from gpt1.core.errors import Gpt1Error
from gpt1.core.paths import owner_of

# torch and the model are imported by the functions that use them: `gpt1 --help` imports this module.


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "info", help="show a model preset's or model dir's config and parameter count",
        description="Print the config and parameter count of a preset name (e.g. gpt1, tiny) or a model dir. "
                    "Builds the model on the meta device: instant even for the 250M reference model.")
    parser.add_argument("model", help="a preset name or a model dir")
    parser.set_defaults(func=info_command, stdout_product=lambda args: "the model's config")


def info_command(args: argparse.Namespace) -> int:
    import torch

    from gpt1.core.model import GPT
    from gpt1.formats.modeldir import CONFIG_FILE, load_model

    if not args.model:  # Path("") is the current folder: "config.json: file not found"
        raise Gpt1Error("MODEL is empty; expected a preset name (e.g. tiny, gpt1) or a model dir")
    path_like = Path(args.model).exists() or "/" in args.model or os.sep in args.model
    if Path(args.model).is_dir() and not (Path(args.model) / CONFIG_FILE).is_file():
        raise Gpt1Error(_not_a_model_dir(Path(args.model)))
    if Path(args.model).is_dir() or (path_like and args.model not in PRESETS):
        # A model dir's own checks (a file, a missing folder, a Hugging Face folder, weights that
        # do not match), no weights read. Only a bare word (or a preset's name) is a preset.
        model = load_model(args.model, device="meta")
        config = model.config
    else:
        config = ModelConfig.preset(text(args.model))  # text: "fté" under LANG=C, not 'ft\udcc3\udca9'; unknown names raise a Gpt1Error listing the presets
        with torch.device("meta"):
            model = GPT(config)
    n = model.num_params()
    # stdout: the config alone, so that `gpt1 info DIR | jq` reads it (flushed: a reader gone is found first)
    print(json.dumps(config.to_dict(), indent=2), flush=True)
    print(f"parameters: {n:,} ({n / 1e6:.1f}M); without position embeddings: {model.num_params(True):,}", file=sys.stderr)
    print(f"training FLOPs per token at context {config.block_size}: {model.flops_per_token():.3e}", file=sys.stderr)
    if Path(args.model).is_dir():
        print(_kind(Path(args.model), config, n), file=sys.stderr)
    return 0


def _kind(directory: Path, config: ModelConfig, n_model: int) -> str:
    """What the dir's model is: a base, a LoRA fine-tune (its adapter, merged in at load: the
    numbers above are the merged model's; the adapter's own size beside them), or a chat model
    of its own weights (a full fine-tune)."""
    import torch

    from gpt1.core.chat_template import TEMPLATE_FILE
    from gpt1.core.lora import TARGETS, read_adapter_config
    from gpt1.core.model import GPT
    from gpt1.formats.modeldir import ADAPTER_DIR

    if not (directory / TEMPLATE_FILE).is_file():
        return "a base model (no chat template)"
    if not (directory / ADAPTER_DIR).is_dir():
        return "a chat model: its chat template and its own weights (a full fine-tune, or a merged one)"
    lora = read_adapter_config(directory / ADAPTER_DIR)
    rows = f" and {len(lora.token_ids)} special-token embedding rows" if lora.token_ids else ""
    with torch.device("meta"):
        block = GPT(config).transformer.h[0]
    n_adapter = len(lora.token_ids) * config.n_embd
    for target in lora.targets:  # r x (in + out) each; a Q, K or V slice is n_embd of the fused matrix's outputs
        path, index = TARGETS[target]
        linear = getattr(getattr(block, path.split(".")[0]), path.split(".")[1])
        n_adapter += config.n_layer * lora.r * (linear.in_features + (config.n_embd if index is not None else linear.out_features))
    return (f"a chat model: a LoRA adapter (r={lora.r}, alpha={lora.alpha:g}, on {', '.join(lora.targets)}{rows}; "
            # finetune's line's numbers ("N trainable parameters of M"): the share of the model with its adapter
            f"{n_adapter:,} trained parameters of {n_model + n_adapter:,}, {100 * n_adapter / (n_model + n_adapter):.2f}%), "
            "merged into the weights at load")


def _not_a_model_dir(folder: Path) -> str:
    """`load_model`'s account of a folder without config.json, with a prepared data dir's size."""
    from gpt1.data.shards import load_meta
    from gpt1.formats.modeldir import not_a_model_dir

    if owner_of(folder) == "a prepared data dir":
        meta = load_meta(folder)  # a damaged one says how
        return (f"{folder}: a prepared data dir ({meta['train']['tokens']:,} train tokens, {meta['val']['tokens']:,} "
                f"validation), not a model dir; `gpt1 pretrain --data {folder} --out RUN` trains one")
    return not_a_model_dir(folder)
