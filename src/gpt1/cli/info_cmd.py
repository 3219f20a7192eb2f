"""`gpt1 info`: the config and parameter count of a preset or a model dir."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from gpt1.core.config import ModelConfig
from gpt1.core.model import GPT
from gpt1.formats.modeldir import load_model


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "info", help="show a model preset's or model dir's config and parameter count",
        description="Print the config and parameter count of a preset name (e.g. gpt1, tiny) or a model dir. "
                    "Builds the model on the meta device: instant even for the 250M reference model.")
    parser.add_argument("model", help="a preset name or a model dir")
    parser.set_defaults(func=info_command)


def info_command(args: argparse.Namespace) -> int:
    if Path(args.model).is_dir():
        # A model dir's own checks (a Hugging Face folder, weights that do not match), no weights read.
        model = load_model(args.model, device="meta")
        config = model.config
    else:
        config = ModelConfig.preset(args.model)  # unknown names raise a Gpt1Error listing the presets
        with torch.device("meta"):
            model = GPT(config)
    n = model.num_params()
    print(json.dumps(config.to_dict(), indent=2))
    print(f"parameters: {n:,} ({n / 1e6:.1f}M); without position embeddings: {model.num_params(True):,}")
    print(f"training FLOPs per token at context {config.block_size}: {model.flops_per_token():.3e}")
    return 0
