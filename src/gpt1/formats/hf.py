"""Hugging Face interop: export a model dir as a `transformers` folder (plus a PEFT adapter),
import a `transformers` GPT-2-architecture folder as a gpt1 `GPT` (a local one, or a model on the
Hugging Face Hub, fetched into huggingface_hub's cache: `hub_folder`), to train from or, with
gpt1's tokenizer, to run (`load_with_tokenizer`).

gpt1's `GPT` is GPT-2 (see `gpt1.core.model`): the parameter names are transformers' own, and the
only layout difference is that transformers' GPT-2 uses `Conv1D`, which stores a linear
weight as (in, out) where `nn.Linear` stores (out, in) — those four matrices per block are
transposed on the way across. An exported folder holds:

    config.json                GPT2Config (architectures GPT2LMHeadModel)
    model.safetensors          the weights under transformers' names
    generation_config.json     sampling defaults (temperature 0.7, top-k 50, up to the context)
    tokenizer.json             gpt1's tokenizer, unchanged
    tokenizer_config.json      special tokens (+ the chat template of a chat model)
    special_tokens_map.json
    adapter/                   a fine-tuned model's LoRA adapter in PEFT's layout (not with merge)

Every exported file is written as plain JSON (or safetensors) by gpt1 itself, never by a
transformers `save_pretrained`, whose output depends on the installed version (4.x leaves out
the values equal to *its* defaults: top_k 50, tie_word_embeddings). So export needs no
transformers; import does (`pip install 'gpt1[hf]'`), imported where it is used so that the rest
of gpt1 works without it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from gpt1.core.atomic import atomic_dir, write_json, write_text
from gpt1.core.chat_template import HF_JINJA_TEMPLATE, TEMPLATE_FILE
from gpt1.core.config import ModelConfig
from gpt1.core.errors import Gpt1Error
from gpt1.core.imports import require
from gpt1.core.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LORA_PARTS,
    PEFT_MERGE,
    PEFT_PREFIX,
    TOKEN_KEY,
    adapter_weights_file,
    load_adapter,
    peft_scale,
    peft_token_ids,
    read_peft_config,
    save_adapter,
)
from gpt1.core.model import GPT
from gpt1.core.paths import json_path
from gpt1.core.progress import env_flag, info, warn
from gpt1.core.reading import read_json
from gpt1.core.sampling_params import preset
from gpt1.core.tokenizer import EOS, PAD, SPECIAL_TOKENS, UNK, Tokenizer
from gpt1.core.weights import check_weight_values, save_safetensors
from gpt1.formats.gpt2_layout import check_gpt2_layout
from gpt1.formats.modeldir import (
    ADAPTER_DIR,
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_layer_count,
    check_replaceable,
    hf_weight_files,
    is_hf_model_dir,
    load_model,
    read_hf_config,
    read_shapes,
    read_tensors,
    stored_tensors,
)

GENERATION_CONFIG_FILE = "generation_config.json"
# transformers' GPT-2 stores these as Conv1D weights: (in, out), the transpose of nn.Linear's.
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Activations that are exactly our tanh-approximated GELU.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
# Causal-mask buffers that older GPT-2 checkpoints (OpenAI's own among them) hold: not weights.
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")
# The architectures whose checkpoint is a GPT2LMHeadModel's weights (GPT2Model: without a head of its own).
HF_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
# config.json fields gpt1 reads, checked before transformers sees them (transformers 5 raises a
# validation traceback for a wrong type, 4 lets it through).
HF_SIZES = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
HF_FLAGS = ("tie_word_embeddings", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "add_cross_attention")


def _require_transformers():
    return require("transformers", "Hugging Face interop", "pip install 'gpt1[hf]'")


# ---- weights and configs: gpt1 <-> transformers ----------------------------------------------
def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under `GPT2LMHeadModel`'s names and layouts (a tied head is stored
    once, as transformers does). A model without biases gets zero biases: the same function."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        state[name] = tensor.t() if name.endswith(HF_CONV1D) else tensor
    if not model.config.bias:
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)) and not name.startswith("lm_head"):
                state[f"{name}.bias"] = torch.zeros(module.weight.shape[0], dtype=module.weight.dtype)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def hf_config_dict(config: ModelConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """GPT2Config keyword arguments describing `config`: every field that decides what the model
    computes, also where it is GPT-2's default (an export's config.json must not depend on the
    defaults of the transformers version that reads it)."""
    return dict(
        architectures=["GPT2LMHeadModel"],
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_ctx=config.block_size,  # older GPT-2 tooling (llama.cpp's converter among it) reads this name
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=config.mlp_hidden,
        # transformers' one fused kernel, bit for bit gpt1's nn.GELU("tanh"); "gelu_new" is the same
        # function in eight Python-level ops (up to 2.4e-7 off, slower, and three more tensors kept for backward)
        activation_function="gelu_pytorch_tanh",
        layer_norm_epsilon=config.norm_eps,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        tie_word_embeddings=config.tie_embeddings,
        scale_attn_weights=True,  # scores / sqrt(head size), as gpt1's attention
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
        add_cross_attention=False,
        # gpt1 has no BOS token: [EOS] separates documents, as <|endoftext|> does in GPT-2.
        bos_token_id=tokenizer.eos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
    )


def config_from_hf(hf, source: str) -> ModelConfig:
    """Our ModelConfig for a transformers `GPT2Config`, with a clear error for GPT-2 options
    that gpt1's model does not implement."""
    unsupported = []
    if hf.activation_function not in TANH_GELU:
        unsupported.append(f"activation_function={hf.activation_function!r} (gpt1 implements {' / '.join(TANH_GELU)})")
    if not hf.scale_attn_weights:
        unsupported.append("scale_attn_weights=false")
    if hf.scale_attn_by_inverse_layer_idx:
        unsupported.append("scale_attn_by_inverse_layer_idx=true")
    if hf.add_cross_attention:
        unsupported.append("add_cross_attention=true")
    n_embd = hf.n_embd
    n_inner = 4 * n_embd if hf.n_inner is None else hf.n_inner  # GPT-2's default MLP width
    if n_inner % n_embd:
        unsupported.append(f"n_inner={n_inner} (gpt1 needs a multiple of n_embd={n_embd})")
    if unsupported:
        raise Gpt1Error(f"{source}: GPT-2 options gpt1 does not implement: {'; '.join(unsupported)}")
    rates = {name: getattr(hf, name, None) for name in ("resid_pdrop", "attn_pdrop", "embd_pdrop")}
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rates.values())
    if numbers and len(set(map(float, rates.values()))) > 1:  # training it would use another dropout than it says
        warn(f"{source}: GPT-2's dropout rates differ ({', '.join(f'{k} {v:g}' for k, v in rates.items())}); "
             f"gpt1 has one rate for all three and keeps resid_pdrop, {rates['resid_pdrop']:g}")
    try:
        return ModelConfig(
            vocab_size=hf.vocab_size,
            block_size=hf.n_positions,
            n_layer=hf.n_layer,
            n_head=hf.n_head,
            n_embd=n_embd,
            mlp_ratio=n_inner // n_embd,
            bias=True,
            tie_embeddings=bool(hf.tie_word_embeddings),
            # One dropout rate in gpt1: the residual one, which GPT-2 applies most often.
            dropout=float(hf.resid_pdrop),
            norm_eps=float(hf.layer_norm_epsilon),
        )
    except Gpt1Error as e:  # "model config: dropout must be ...": say which file
        raise Gpt1Error(f"{source}: {e}") from None


# ---- import -------------------------------------------------------------------------------

# A Hub model id (NAME or OWNER/NAME, as huggingface_hub validates them) with an optional @REVISION.
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?)(?:@(?P<revision>[\w./-]+))?")
# What an import reads from a Hub model: config, weights (one file or shards and their index),
# tokenizer, a PEFT adapter in adapter/, a chat template; never a pickle (pytorch_model.bin), ONNX, TF
# or Flax weights, which are often most of a repository's size.
# The repository's top level only (huggingface_hub's `*` also matches `/`: "*.safetensors" would fetch
# every checkpoint-500/ a Trainer pushed).
HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors",
             "chat_template.jinja", "adapter/*"]


def hub_folder(spec: str | os.PathLike) -> Path:
    """The folder `spec` names: itself when it exists (or cannot be a Hub model id); else the
    Hugging Face Hub model `NAME`, `OWNER/NAME` or `OWNER/NAME@REVISION`, its files that gpt1 reads
    fetched into huggingface_hub's cache (HF_HOME / HF_HUB_CACHE; with HF_HUB_OFFLINE=1, read
    from the cache alone), as transformers' `from_pretrained` fetches them."""
    path = Path(spec)
    match = HUB_ID.fullmatch(str(spec))
    if path.exists() or match is None or str(spec).startswith((".", "~")):
        return path
    require("huggingface_hub", f"{spec} (no such folder; as a Hugging Face Hub model id)",
            "pip install 'gpt1[hf]'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (  # here, not in huggingface_hub.errors, before 0.25 (transformers 4.45's floor)
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, revision = match["repo"], match["revision"]
    where = f"{spec}: no such folder, and as a Hugging Face Hub model id"
    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES)
    except GatedRepoError:
        raise Gpt1Error(f"{where}: {repo} is gated; accept its terms on huggingface.co and log in "
                        "(`hf auth login`, or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise Gpt1Error(f"{where}: the Hub has no model {repo} (or it is private: `hf auth login`, or set "
                        "HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise Gpt1Error(f"{where}: {repo} has no revision {revision!r} (a branch, tag or commit)") from None
    except LocalEntryNotFoundError as e:  # offline, or the Hub unreachable, and not in the cache
        cause = "HF_HUB_OFFLINE is set" if env_flag("HF_HUB_OFFLINE") \
            else f"the Hub could not be reached ({str(e.__cause__ or e).splitlines()[0][:200]})"
        raise Gpt1Error(f"{where}: not in the local cache, and {cause}; download it where the Hub can be "
                        f"reached (`hf download {repo} --local-dir DIR`) and pass DIR") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise Gpt1Error(f"{where}: cannot fetch it ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    info(f"{spec}: the Hugging Face Hub model, from {folder}")
    return Path(folder)



def import_hf_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer | None]:
    """Load a `transformers` GPT-2-architecture folder (or a Hub model id: `hub_folder`) as a
    gpt1 `GPT` (eval mode) and its tokenizer. A PEFT LoRA adapter in `adapter/` (an unmerged export's, or one PEFT trained on
    the export) is merged into the weights, as PEFT's merge_and_unload does.

    The weights are read as transformers' `GPT2LMHeadModel.from_pretrained` reads them
    (model.safetensors or its shards, float32), and must be exactly what config.json describes:
    a missing, unused or misshapen tensor, or a NaN, is an error, never dropped or
    re-initialised. The head is tied to the token embeddings as transformers ties it: when
    config.json says so and the checkpoint holds no other lm_head.weight.

    The tokenizer is returned when the folder's tokenizer.json is gpt1-compatible (`[PAD]`=0,
    `[UNK]`=1, `[EOS]`=2, as in every gpt1 export); otherwise (e.g. OpenAI GPT-2's own
    tokenizer, whose only special token is <|endoftext|>=50256) it is None: the weights are
    usable, but gpt1 commands that need a gpt1 tokenizer report that. Another architecture
    raises Gpt1Error naming its model_type.
    """
    path = hub_folder(path)
    hf, raw, config = _folder_config(path)
    weights = _read_weights(path, hf, raw, config)
    # As transformers: a checkpoint's own lm_head.weight is kept even where config.json says the
    # head is tied (it warns "we will NOT tie them"); tied only where there is none, or the same.
    head = weights.pop("lm_head.weight", None)
    tied = hf.tie_word_embeddings and (head is None or torch.equal(head, weights["transformer.wte.weight"]))
    if not tied:
        weights["lm_head.weight"] = head
        if hf.tie_word_embeddings:
            info(f"{path / CONFIG_FILE}: says tie_word_embeddings, but the checkpoint holds a separate "
                 "lm_head.weight: imported with that head, as transformers loads it")
    config = dataclasses.replace(config, tie_embeddings=tied)

    with torch.device("meta"):
        model = GPT(config).float()  # float32 whatever torch's default dtype, as load_model
    model.load_state_dict(weights, strict=not tied, assign=True)  # the tensors read, not copies of them
    if tied:
        model.lm_head.weight = model.transformer.wte.weight
    model = model.to(device)
    if (path / ADAPTER_DIR).is_dir():
        _merge_adapter(model, path)
    return model.eval(), _compatible_tokenizer(path, config)


def _folder_config(path: Path) -> tuple[Any, dict[str, Any], ModelConfig]:
    """A transformers folder's GPT2Config, its raw config.json and the gpt1 ModelConfig it
    describes (tie_embeddings as config.json says: a checkpoint may still hold its own head)."""
    if not path.is_dir():
        raise Gpt1Error(f"{path}: model directory not found")
    raw = read_hf_config(path)
    if raw is None:
        raise Gpt1Error(f"{path / CONFIG_FILE}: not found; expected a transformers model folder")
    if not is_hf_model_dir(path):
        raise Gpt1Error(f"{path}: a gpt1 model dir, not a transformers folder; use it directly (no hf: prefix)")
    _check_architecture(path, raw)
    hf = _gpt2_config(path / CONFIG_FILE, raw)
    return hf, raw, config_from_hf(hf, str(path / CONFIG_FILE))


def _check_architecture(path: Path, raw: dict[str, Any]) -> None:
    """GPT-2 language models only: another model_type, or another head on GPT-2 (a classifier's
    score.weight, say), is refused by name rather than imported without it."""
    model_type = raw.get("model_type", "gpt2")  # GPT-2's keys without a model_type: GPT-2's classes load it
    architectures = raw.get("architectures") or []
    architectures = architectures if isinstance(architectures, list) else [architectures]
    named = f" ({', '.join(map(str, architectures))})" if architectures else ""
    if model_type != "gpt2":
        raise Gpt1Error(f"{path}: model_type {model_type!r}{named} is not supported; "
                        "gpt1 imports only the GPT-2 architecture (model_type 'gpt2')")
    other = [a for a in architectures if a not in HF_ARCHITECTURES]
    if other:
        raise Gpt1Error(f"{path / CONFIG_FILE}: architectures {', '.join(map(str, other))} is not supported; "
                        f"gpt1 imports a GPT-2 language model ({' or '.join(HF_ARCHITECTURES)})")


def _gpt2_config(file: Path, raw: dict[str, Any]):
    """transformers' GPT2Config for config.json (its defaults for what the file leaves out), once
    the fields gpt1 reads, under their names or transformers' aliases (hidden_size), have the
    right types and ranges: transformers 5 checks most with a traceback, 4 none."""
    transformers = _require_transformers()
    from huggingface_hub import errors  # transformers' own dependency

    names = transformers.GPT2Config.attribute_map  # hidden_size is n_embd, ...
    for key, value in raw.items():
        name = names.get(key, key)
        if name in HF_SIZES and not (name == "n_inner" and value is None) and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise Gpt1Error(f"{file}: {key} must be a whole number >= 1{' or null' if name == 'n_inner' else ''}, "
                            f"got {json.dumps(value)}")
        if name in HF_FLAGS and not isinstance(value, bool):
            raise Gpt1Error(f"{file}: {key} must be true or false, got {json.dumps(value)}")
        if name == "layer_norm_epsilon" and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                             or not 0 < value < float("inf")):
            raise Gpt1Error(f"{file}: {key} must be a number > 0, got {json.dumps(value)}")
    # An epsilon of 1 is 1.0 (transformers 5 accepts only a float there).
    raw = {k: float(v) if k == "layer_norm_epsilon" else v for k, v in raw.items()}
    # transformers 5 validates every field with huggingface_hub's strict dataclasses, 4 a few.
    invalid = (TypeError, ValueError, getattr(errors, "StrictDataclassError", ValueError))
    try:
        return transformers.GPT2Config.from_dict(raw)
    except invalid as e:
        raise Gpt1Error(f"{file}: transformers cannot read it: {' '.join(str(e).split())}") from None


def _read_weights(path: Path, hf, raw: dict[str, Any], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under GPT2LMHeadModel's names (a GPT2Model's, OpenAI's
    unprefixed ones, are the same under transformer.) in gpt1's layout, float32 — once their
    names and shapes, read from the safetensors headers before any data, are exactly those
    config.json describes (lm_head.weight optional where it says tied)."""
    files = hf_weight_files(path)
    found: dict[str, tuple[str, tuple[int, ...], Path]] = {}  # GPT2LMHeadModel's name: the file's name, shape, file
    for file in files:
        for name, shape in read_shapes(file).items():
            if name.endswith(HF_BUFFERS):
                continue
            if _gpt2_name(name) in found:
                raise Gpt1Error(f"{file}: {name} is in {found[_gpt2_name(name)][2].name} too")
            found[_gpt2_name(name)] = name, shape, file
    # Before a GPT of config.json's n_layer is built to compare the rest (20,000 layers: 30 s, 1.2 GB).
    check_layer_count(config, path, {name: shape for name, (_, shape, _) in found.items()})
    with torch.device("meta"):
        model = GPT(dataclasses.replace(config, tie_embeddings=False))
    expected = {name: tuple(t.shape[::-1] if name.endswith(HF_CONV1D) else t.shape)
                for name, t in model.state_dict().items()}

    described = f"config.json's GPT-2 (n_layer={hf.n_layer}, tie_word_embeddings={json.dumps(hf.tie_word_embeddings)})"
    missing = sorted(set(expected) - set(found) - ({"lm_head.weight"} if hf.tie_word_embeddings else set()))
    if missing:
        raise Gpt1Error(f"{path}: weights missing from the checkpoint for {described}: {', '.join(missing[:5])}"
                        + (f" ({len(missing)} in all)" if len(missing) > 5 else ""))
    unused = sorted(found[name][0] for name in set(found) - set(expected))
    if unused:
        raise Gpt1Error(f"{path}: the checkpoint holds weights that {described} has no place for: "
                        f"{', '.join(unused[:5])}" + (f" ({len(unused)} in all)" if len(unused) > 5 else ""))
    for name, shape in expected.items():
        if name in found and found[name][1] != shape:
            fields = (("vocab_size",) if name.endswith("wte.weight") or name == "lm_head.weight" else
                      ("n_positions",) if name.endswith("wpe.weight") else ("n_inner",) if ".mlp." in name else ())
            sizes = ", ".join(f"{k}={json.dumps(getattr(hf, k))}" + ("" if k in raw else " (GPT-2's default)")
                              for k in (*fields, "n_embd"))
            stored, actual, file = found[name]
            raise Gpt1Error(f"{path / CONFIG_FILE}: {sizes} give {stored} the shape {shape}, but {file.name} holds {actual}")

    # One tensor at a time, each in gpt1's layout (Conv1D's transposed, contiguous): the import's
    # model takes them as its own (load_state_dict(assign=True)), no second copy.
    weights = {}
    for file in files:
        for name, tensor in stored_tensors(file):
            if name.endswith(HF_BUFFERS):
                continue
            check_weight_values(file, {name: tensor})  # NaN, infinities, integer weights: named, never trained on
            name = _gpt2_name(name)
            weights[name] = (tensor.t().contiguous() if name.endswith(HF_CONV1D) else tensor).float()
    return weights


def _gpt2_name(name: str) -> str:
    """GPT2LMHeadModel's name for a checkpoint tensor: a GPT2Model's (OpenAI's GPT-2's) lack the
    transformer. prefix."""
    return name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"


@torch.no_grad()
def _merge_adapter(model: GPT, path: Path) -> None:
    """Merge the PEFT LoRA adapter of an unmerged export (`path/adapter`) into the imported
    weights, as PEFT's `merge_and_unload` does: without it the import would silently be the base.

    Import always merges, so every LoRA pair merges exactly, whoever made it (gpt1's export, PEFT's
    default pair on the fused c_attn, a gpt1 adapter trained on in PEFT): W += scale·B·A, with
    PEFT's scale per module, alpha / r (alpha / sqrt(r) with use_rslora), r and alpha from
    rank_pattern / alpha_pattern where a key matches the module. B·A is (out, in), nn.Linear's
    layout and so gpt1's: PEFT transposes it (fan_in_fan_out) only to fit Conv1D's (in, out)
    weight, which the import has transposed already. Trained token rows (trainable_token_indices)
    replace their rows. Anything else (DoRA and the other variants, an init that rewrote the base
    such as PiSSA's, modules_to_save, the base's own biases of bias "all") is refused by name
    (`read_peft_config`), never merged as plain LoRA."""
    directory = path / ADAPTER_DIR
    peft = read_peft_config(directory)
    weights = adapter_weights_file(directory)
    read_shapes(weights)  # a missing or unreadable file, named
    state = read_tensors(weights)
    check_weight_values(weights, state, "adapter")
    pairs: dict[str, dict[str, torch.Tensor]] = {}  # module -> {"A.weight": ..., "B.weight": ..., "B.bias": ...}
    for key, tensor in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        if name == key or not name.endswith(LORA_PARTS):
            raise Gpt1Error(f"{weights}: {key} is not a LoRA pair or trained token rows, the parts gpt1 merges; "
                            f"{PEFT_MERGE}")
        if name.endswith(TOKEN_KEY):
            _merge_token_rows(model, name.removesuffix("." + TOKEN_KEY), tensor, peft, weights)
        else:
            module, _, part = name.rpartition(".lora_")
            pairs.setdefault(module, {})[part] = tensor
    for module, pair in sorted(pairs.items()):
        _merge_pair(model, module, pair, peft, weights)
    info(f"{path}: merged its LoRA adapter ({ADAPTER_DIR}/) into the imported weights")


def _module(model: GPT, name: str) -> torch.nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _merge_pair(model: GPT, module: str, pair: dict[str, torch.Tensor], peft: dict[str, Any], weights: Path) -> None:
    """W += scale·B·A (and bias += scale·B's bias, PEFT's lora_bias) for one module's pair."""
    layer = _module(model, module)
    if not isinstance(layer, torch.nn.Linear):
        raise Gpt1Error(f"{weights}: a LoRA pair on {module!r}, which is not a linear layer of this GPT-2; {PEFT_MERGE}")
    A, B = pair.get("A.weight"), pair.get("B.weight")
    if A is None or B is None:
        raise Gpt1Error(f"{weights}: {module} has lora_{'A' if B is None else 'B'}.weight without its "
                        f"lora_{'B' if B is None else 'A'}.weight")
    out_features, in_features = layer.weight.shape
    rank = A.shape[0] if A.ndim == 2 else 0
    bias = pair.get("B.bias")
    if A.shape != (rank, in_features) or B.shape != (out_features, rank) or (bias is not None and bias.shape != (out_features,)):
        raise Gpt1Error(f"{weights}: {module}'s LoRA pair has lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}; "
                        f"this model's {module} takes lora_A (r, {in_features}) and lora_B ({out_features}, r)")
    r, scale = peft_scale(peft, module, weights.parent / ADAPTER_CONFIG)
    if r != rank:
        raise Gpt1Error(f"{weights.parent / ADAPTER_CONFIG}: r for {module} is {r}, but its lora_A in "
                        f"{ADAPTER_WEIGHTS} has rank {rank}")
    layer.weight += (scale * (B.float() @ A.float())).to(layer.weight)
    if bias is not None:
        layer.bias += (scale * bias.float()).to(layer.bias)


def _merge_token_rows(model: GPT, module: str, rows: torch.Tensor, peft: dict[str, Any], weights: Path) -> None:
    """PEFT's trainable_token_indices (`peft_token_ids`): the stored rows replace those of the
    embedding. A tied head shares them."""
    ids = peft_token_ids(peft, module)
    layer = _module(model, module)
    if not isinstance(layer, torch.nn.Embedding):
        raise Gpt1Error(f"{weights}: trained token rows for {module!r}, which is not this GPT-2's token embedding; "
                        f"{PEFT_MERGE}")
    vocab_size, width = layer.weight.shape
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size
                                            for i in ids):
        raise Gpt1Error(f"{weights.parent / ADAPTER_CONFIG}: trainable_token_indices must give {module} a list of "
                        f"token ids below {vocab_size}, got {json.dumps(ids)}")
    if rows.shape != (len(ids), width):
        raise Gpt1Error(f"{weights}: {module}'s trained token rows have shape {tuple(rows.shape)}, expected "
                        f"({len(ids)}, {width}) for its {len(ids)} trainable_token_indices")
    layer.weight.index_copy_(0, torch.tensor(ids, device=layer.weight.device), rows.to(layer.weight))


def _compatible_tokenizer(path: Path, config: ModelConfig) -> Tokenizer | None:
    file = path / "tokenizer.json"
    if not file.is_file():
        info(f"{path}: no tokenizer.json; imported the weights without a tokenizer")
        return None
    try:
        tokenizer = Tokenizer.load(file)
    except Gpt1Error as e:
        info(f"{e}; imported the weights without a tokenizer")  # the error names the file
        return None
    if tokenizer.vocab_size > config.vocab_size:
        raise Gpt1Error(f"{file}: {tokenizer.vocab_size} tokens, more than the model's vocab_size {config.vocab_size}")
    return tokenizer


def model_folder(spec: str | os.PathLike) -> Path:
    """The folder a command's --model names: itself; or, for `hf:FOLDER` and `hf:OWNER/NAME[@REVISION]`
    (as init_from and finetune --base take them), that folder or the Hub model's snapshot (`hub_folder`)."""
    named = str(spec)
    if named.startswith("hf:") and not Path(named).exists():
        return hub_folder(named[3:])
    return Path(spec)


def load_with_tokenizer(path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer]:
    """A model to run and its tokenizer (what `gpt1.load` reads for generate, chat, serve and eval):
    a gpt1 model dir (`load_model`), or a transformers GPT-2 folder with gpt1's tokenizer (an
    export, also once PEFT or transformers has changed and saved it), imported by `import_hf_model`
    (its weights checked, its adapter/ merged). In `dtype` when given; device "meta": the
    architecture without weights (a transformers folder's are read, to check them, and dropped)."""
    path = Path(path)
    if not is_hf_model_dir(path):
        return load_model(path, device=device, dtype=dtype), Tokenizer.load(path)
    try:  # before the weights are read: gpt1 runs a model with its own tokenizer only, which an import only notes
        Tokenizer.load(path / "tokenizer.json")
    except Gpt1Error as e:
        raise Gpt1Error(f"{e}; gpt1 runs a transformers folder with gpt1's tokenizer only ([PAD], [UNK], [EOS] at "
                        f"ids 0-2: a gpt1 export's, not OpenAI GPT-2's); its weights can start a training run: "
                        f"`gpt1 pretrain init_from=hf:{path}`") from None
    if torch.device(device).type == "meta":
        # The architecture alone (a server's HTTP side, whose engine process imports the weights
        # and reports what is wrong with them): importing them here too held a second float32
        # copy of the model in the parent for its whole life (~1 GB for the 257M model).
        _, _, config = _folder_config(path)
        with torch.device("meta"):
            return GPT(config).float().eval(), _compatible_tokenizer(path, config)
    model, tokenizer = import_hf_model(path, device)
    info(f"{path}: a transformers folder, imported as gpt1 imports one (docs/interop.md)")
    return (model if dtype is None else model.to(dtype)), tokenizer


def has_chat_template(path: str | os.PathLike) -> bool:
    """Whether a model folder is a chat model: chat_template.jinja (a fine-tuned gpt1 dir, or a
    folder transformers 5 saved), or a transformers folder's tokenizer_config.json chat_template
    (gpt1's export writes it there). gpt1 formats a conversation with its one template either way."""
    path = Path(path)
    if (path / TEMPLATE_FILE).is_file():
        return True
    config = path / "tokenizer_config.json"
    if not is_hf_model_dir(path) or not config.is_file():
        return False
    try:
        data = read_json(config)
    except Gpt1Error:  # a damaged file holds no template
        return False
    return isinstance(data, dict) and bool(data.get("chat_template"))


# ---- export -------------------------------------------------------------------------------
def export_model(model_dir: str | os.PathLike, out_dir: str | os.PathLike, merge: bool = False,
                 *, overwrite: bool = False) -> Path:
    """Write `model_dir` as a folder that `transformers.AutoModelForCausalLM.from_pretrained`
    and `AutoTokenizer.from_pretrained` load offline; returns the output path.

    A fine-tuned model dir (one with an `adapter/` folder) is exported as its base plus the
    adapter in PEFT's layout under `out_dir/adapter`, or with `merge=True` as one plain
    model with the adapter merged in. The folder is built next to `out_dir` and renamed into
    place at the end, so `out_dir` is either complete or untouched. An existing non-empty
    `out_dir` is an error unless `overwrite`. Needs no transformers: gpt1 writes every file.
    """
    model_dir, out = Path(model_dir), Path(out_dir)
    if not model_dir.is_dir():
        raise Gpt1Error(f"{model_dir}: model directory not found")
    if not (model_dir / CONFIG_FILE).is_file():
        raise Gpt1Error(f"{model_dir}: not a gpt1 model dir (no {CONFIG_FILE})")
    if is_hf_model_dir(model_dir):
        raise Gpt1Error(f"{model_dir}: already a transformers folder, not a gpt1 model dir")
    _check_out_dir(model_dir, out, overwrite)

    has_adapter = (model_dir / ADAPTER_DIR).is_dir()
    if merge and not has_adapter:
        raise Gpt1Error(f"{model_dir}: nothing to merge (no {ADAPTER_DIR}/ folder: not a LoRA fine-tuned model)")
    # merge: the adapter merged into a plain GPT; otherwise the base it applies to.
    model = load_model(model_dir, device="cpu", adapter="merge" if merge else "ignore")
    # Weights are copied by name into a GPT2LMHeadModel: a model changed beyond GPT-2 (a SwiGLU gate,
    # RMSNorm, rotary positions, a new config field) would load there and compute another model.
    check_gpt2_layout(model, model_dir, "Hugging Face (GPT-2)")
    tokenizer = Tokenizer.load(model_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise Gpt1Error(f"{model_dir}: the tokenizer has {tokenizer.vocab_size} tokens, the model only {model.config.vocab_size}")
    chat = (model_dir / TEMPLATE_FILE).is_file()
    # PEFT reads base_model_name_or_path only in AutoPeftModelForCausalLM: the exported base, where
    # the folder will be after the rename (checked now: JSON records only a UTF-8 path).
    adapter_base = json_path(out.resolve()) if has_adapter and not merge else None

    # Again, now that the model is loaded (minutes, for a large one): `atomic_dir` replaces only
    # the folder there as it starts, so what another command wrote at --out meanwhile is refused
    # here (and what it writes during the export, by `atomic_dir`).
    _check_out_dir(model_dir, out, overwrite)
    with atomic_dir(out) as tmp:
        # A fine-tuned dir's model.safetensors already holds the trained special-token rows,
        # so the exported base has them too; the adapter carries them once more as PEFT's
        # trainable_token_indices, which makes it correct on the original base as well.
        _write_base(model, tokenizer, chat, tmp)
        if adapter_base is not None:
            save_adapter(load_adapter(model, model_dir / ADAPTER_DIR), tmp / ADAPTER_DIR, base_model_name_or_path=adapter_base)
    info(f"exported {model_dir} to {out}" + (" (adapter merged)" if merge else " (+ PEFT adapter)" if has_adapter else ""))
    return out


def _check_out_dir(model_dir: Path, out: Path, overwrite: bool) -> None:
    check_replaceable(out, model_dir, "an earlier export (a transformers config.json)", is_hf_model_dir)
    if out.exists() and not out.is_dir():
        raise Gpt1Error(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise Gpt1Error(f"{out}: exists and is not empty; choose another --out or pass --force (overwrite=True in Python) to replace it")


def _write_base(model: GPT, tokenizer: Tokenizer, chat: bool, out: Path) -> None:
    # Plain JSON with every key, not save_pretrained (see the module docstring): transformers 4.x
    # left out top_k 50, its default, and transformers 5 or vLLM then sampled without top-k.
    _store_conv1d_layout(model)
    save_safetensors(out / WEIGHTS_FILE, to_hf_state_dict(model), metadata={"format": "pt"})
    write_json(out / CONFIG_FILE, {"model_type": "gpt2", **hf_config_dict(model.config, tokenizer)})
    write_json(out / GENERATION_CONFIG_FILE, generation_config_dict(tokenizer, model.config.block_size))
    write_tokenizer_files(tokenizer, out, model_max_length=model.config.block_size, chat=chat)


def _store_conv1d_layout(model: GPT) -> None:
    """Store the export's weights that GPT-2 keeps transposed (Conv1D's (in, out)) column-major, in
    place and one at a time: the same tensors and values, whose transposes, which to_hf_state_dict
    takes, are then views, not copies. safetensors writes a file from every tensor at once (its
    header, each tensor's offset in it, comes first), so an export cannot write one at a time; the
    copies held a second copy of nearly all the weights (a 672 MB file: 1.62 GB at the peak, now
    1.3 GB, of which glibc's heap keeps ~0.25 GB of the originals freed here)."""
    for name, param in model.named_parameters():
        if name.endswith(HF_CONV1D) and param.is_contiguous():
            param.data = param.data.t().contiguous().t()


def generation_config_dict(tokenizer: Tokenizer, block_size: int) -> dict[str, Any]:
    """generation_config.json for the model card's Q&A preset (`gpt1.core.sampling_params`' "qa"),
    so that `model.generate(...)` samples as `gpt1 generate --preset qa` does (up to the context)."""
    qa = preset("qa")
    # The length is max_length = the context (prompt + generated tokens), not qa's 256 new tokens:
    # with max_new_tokens transformers runs past the position embeddings of a shorter context (an
    # IndexError) where gpt1 stops at the context (finish "length").
    knobs = dict(do_sample=True, temperature=qa.temperature, top_k=qa.top_k, top_p=qa.top_p,
                 repetition_penalty=qa.repeat_penalty, max_length=block_size)
    if qa.min_p > 0:
        knobs["min_p"] = qa.min_p
    # gpt1 ends a generation at any special token (a chat model's next role marker, too):
    # [EOS] first, as transformers reports the first id as *the* EOS.
    stop = [tokenizer.eos_id] + [i for i in tokenizer.special_ids if i != tokenizer.eos_id]
    return dict(**knobs, bos_token_id=tokenizer.eos_id, eos_token_id=stop, pad_token_id=tokenizer.pad_id)


def write_tokenizer_files(tokenizer: Tokenizer, out: str | os.PathLike, model_max_length: int, chat: bool) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json for `AutoTokenizer`.

    Written as plain JSON rather than with a transformers tokenizer's `save_pretrained`: its
    output depends on the installed transformers version (5.x writes a tokenizer class that
    4.x cannot load), while these fields are read the same by both, by vLLM and by
    llama.cpp's converter. The chat template is a `chat_template` string in
    tokenizer_config.json, the place every reader looks.
    """
    out = Path(out)
    roles = [t for t in SPECIAL_TOKENS[3:] if tokenizer.token_to_id(t) is not None]
    special = {"bos_token": EOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD, "additional_special_tokens": roles}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": model_max_length,
        # gpt1 adds no special tokens around text, and decodes exactly what was encoded.
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if chat:
        config["chat_template"] = HF_JINJA_TEMPLATE  # gpt1's, its replies marked for return_assistant_tokens_mask
    write_text(out / "tokenizer.json", tokenizer.to_json())
    write_json(out / "tokenizer_config.json", config)
    write_json(out / "special_tokens_map.json", special)

