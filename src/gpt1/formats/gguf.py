"""GGUF export: a model dir as one file that llama.cpp, Ollama, LM Studio and llama-cpp-python run.

gpt1's model as shipped is GPT-2 (see `gpt1.core.model`), an architecture llama.cpp implements,
so the file describes it as llama.cpp's own converter (`convert_hf_to_gguf.py`, class GPT2Model)
would describe OpenAI's GPT-2, written with the `gguf` package that llama.cpp maintains (a model
changed beyond GPT-2 is refused before anything is written: `gpt1.formats.gpt2_layout`):

    general.architecture     gpt2 (context length, widths, heads, LayerNorm epsilon)
    tensors                  llama.cpp's names (token_embd, position_embd, blk.N.attn_qkv, ...),
                             each weight (out, in) as nn.Linear stores it; an untied output
                             head as `output.weight`; a model without biases gets zero biases
    tokenizer.ggml.*         model "gpt2" (byte-level BPE: tokens, token types, merges) with
                             pre-tokenizer "gpt-2", whose regex is the one gpt1's ByteLevel
                             pre-tokenizer uses; [PAD], [UNK], [EOS] and the role markers are
                             CONTROL tokens; [EOS] is eos (and bos: gpt1 has none, and adds
                             none), <|user|> is end-of-turn; the chat template of a chat model
    general.sampling.*       the "qa" sampling preset, as generation_config.json in the HF export

Types: f32 (exact), f16 (the default, as llama.cpp's converter), bf16, q8_0 (8-bit blocks of
32; a matrix whose rows do not split into blocks falls back to f16). 1-D tensors and position
embeddings stay f32 in every type, as the converter keeps them. A fine-tuned model's LoRA
adapter is merged first. The file is written under a temporary name and renamed into place.

`gguf` is needed only here (`pip install 'gpt1[gguf]'`); it is imported inside `export_gguf`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt1.core.atomic import atomic_path
from gpt1.core.chat_template import JINJA_TEMPLATE, TEMPLATE_FILE
from gpt1.core.config import ModelConfig
from gpt1.core.errors import Gpt1Error
from gpt1.core.imports import require
from gpt1.core.model import GPT
from gpt1.core.progress import info, warn
from gpt1.core.sampling_params import preset
from gpt1.core.tokenizer import MAX_TOKEN_BYTES, SPECIAL_TOKENS, USER, Tokenizer
from gpt1.formats.gpt2_layout import check_gpt2_layout
from gpt1.formats.hf import HF_CONV1D, to_hf_state_dict
from gpt1.formats.modeldir import load_model

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
ARCH = "gpt2"
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for GPT-2's byte-level regex split


def _require_gguf():
    return require("gguf", "GGUF export", "pip install 'gpt1[gguf]'")


def _is_gguf(path: Path) -> bool:
    if not path.is_file():  # a FIFO's open would wait for a writer
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


LLAMA_CONTEXT_PAD = 256  # llama.cpp's n_ctx granularity


def export_gguf(model_dir: str | os.PathLike, out_file: str | os.PathLike, out_type: str = "f16",
                *, overwrite: bool = False) -> Path:
    """Write `model_dir` (a base or LoRA fine-tuned gpt1 model dir) as a GGUF file; returns its path.

    Raises Gpt1Error for an unknown `out_type`, an existing `out_file` (unless `overwrite`),
    or a model that llama.cpp's gpt2 architecture cannot represent (saying why: a model changed
    beyond GPT-2's layout, `gpt2_layout.check_gpt2_layout`, or its tokenizer, `check_representable`).
    """
    if out_type not in GGUF_TYPES:
        raise Gpt1Error(f"unknown GGUF type {out_type!r}; known types: {', '.join(GGUF_TYPES)}")
    model_dir, out = Path(model_dir), Path(out_file)
    if out.is_dir() or str(out_file).endswith(("/", os.sep)):  # Path() drops the slash that says "a folder"
        raise Gpt1Error(f"{out_file}: names a folder; --out names the .gguf file to write (e.g. {out / 'model.gguf'})")
    if out.exists() and not overwrite:
        raise Gpt1Error(f"{out}: exists; choose another --out or pass --force (overwrite=True in Python) to replace it")
    if out.exists() and not _is_gguf(out):  # --force replaced model.safetensors, train.bin, anything
        raise Gpt1Error(f"{out}: exists and is not a GGUF file; --force replaces only an earlier export, "
                        "so choose another --out")
    replace = out.exists()  # an earlier export, checked above; nothing there: nothing may be replaced
    gguf = _require_gguf()
    model = load_model(model_dir, device="cpu", adapter="merge")
    # Before anything is written: a model changed beyond GPT-2 (RMSNorm, rotary positions, a head
    # bias) would be a file llama.cpp refuses, or one it runs as another model.
    check_gpt2_layout(model, model_dir, "GGUF (llama.cpp's gpt2)")
    tokenizer = Tokenizer.load(model_dir)
    check_representable(model.config, tokenizer, model_dir)
    warn_long_tokens(tokenizer, model_dir)
    warn_short_context(model.config.block_size, model_dir)

    # A file that another process wrote at `out` since the checks (the same export started twice)
    # is left as it is: only the earlier export found then is replaced (--force).
    with atomic_path(out, replace=replace) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_name(model_dir.resolve().name)
        writer.add_file_type(_file_type(gguf, out_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hparams(writer, model.config)
        _add_tokenizer(writer, gguf, tokenizer, model.config.vocab_size, chat=(model_dir / TEMPLATE_FILE).is_file())
        _add_sampling_defaults(writer)
        for name, array, qtype in gguf_tensors(model, out_type, gguf):
            writer.add_tensor(name, array, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    info(f"exported {model_dir} to {out} ({out_type}, {out.stat().st_size / 1e6:.1f} MB)")
    return out


def check_representable(config: ModelConfig, tokenizer: Tokenizer, source: Path) -> None:
    """Raise Gpt1Error naming every property of the model that llama.cpp's gpt2 architecture
    and gpt2 vocabulary cannot express (a file that loads but computes or tokenizes
    differently would be worse than no file)."""
    problems = []
    if config.n_embd // config.n_head == 1:  # llama.cpp aborts the process on load (GGML_ASSERT in mul_mat)
        problems.append(f"head size 1 (n_embd {config.n_embd} / n_head {config.n_head}): llama.cpp's attention "
                        "needs heads of at least 2 dimensions")
    if tokenizer.vocab_size > config.vocab_size:
        problems.append(f"the tokenizer has {tokenizer.vocab_size} tokens, the model's embedding only {config.vocab_size}")
    spec = json.loads(tokenizer.to_json())
    bpe = spec.get("model") or {}
    if bpe.get("type") != "BPE":
        problems.append(f"tokenizer model {bpe.get('type')!r}: llama.cpp's gpt2 vocabulary is BPE")
    for option in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if bpe.get(option):
            problems.append(f"BPE option {option}={bpe[option]!r}: llama.cpp has no such option")
    if not bpe.get("merges"):
        problems.append("a BPE vocabulary without merges: llama.cpp's gpt2 vocabulary builds tokens from merges")
    if bpe.get("byte_fallback") or bpe.get("ignore_merges"):
        problems.append("BPE byte_fallback / ignore_merges: llama.cpp's gpt2 vocabulary merges byte-level tokens only")
    if spec.get("normalizer"):
        problems.append(f"a normalizer ({spec['normalizer'].get('type')}): llama.cpp's gpt2 vocabulary normalizes nothing")
    pre = spec.get("pre_tokenizer") or {}
    if not (pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space") and pre.get("use_regex", True)):
        problems.append(f"pre-tokenizer {json.dumps(pre)}: llama.cpp's {PRE_TOKENIZER!r} pre-tokenizer is ByteLevel "
                        "with GPT-2's regex and no prefix space (what `gpt1 tokenizer train` writes)")
    if problems:
        raise Gpt1Error(f"{source}: llama.cpp cannot represent this model: {'; '.join(problems)}")


def warn_short_context(block_size: int, source: Path) -> None:
    """llama.cpp rounds its context up to a multiple of LLAMA_CONTEXT_PAD whatever n_ctx asks for
    (llama-cpp-python 0.3.36: n_ctx=128 gives 256), so nothing there stops a reply at this
    model's last position: the next one reads past the position table and the process aborts
    (GGML_ASSERT, seen with the quickstart's 128-token chat model)."""
    if block_size % LLAMA_CONTEXT_PAD:
        warn(f"{source}: a context of {block_size} tokens, which llama.cpp rounds up to "
             f"{-(-block_size // LLAMA_CONTEXT_PAD) * LLAMA_CONTEXT_PAD}: keep the prompt plus max_tokens within "
             f"{block_size} there, or llama.cpp aborts when a reply runs past position {block_size}")


def warn_long_tokens(tokenizer: Tokenizer, source: Path) -> None:
    """Warn about tokens longer than llama-cpp-python's detokenize buffer: it returns them as
    empty text. `gpt1 tokenizer train` caps tokens at that length; older tokenizers are not."""
    long = sum(len(b) > MAX_TOKEN_BYTES for b in tokenizer.bytes_table)
    if long:
        warn(f"{source}: the tokenizer has {long} token(s) longer than {MAX_TOKEN_BYTES} bytes, which llama-cpp-python's "
             f"detokenize ({MAX_TOKEN_BYTES} bytes per token) drops from generated text; llama.cpp's own programs do not")


# ---- tensors ------------------------------------------------------------------------------
def gguf_tensors(model: GPT, out_type: str, gguf) -> list[tuple[str, np.ndarray, Any]]:
    """(llama.cpp name, array, GGML type) for every tensor of `model`, converted to `out_type`.

    Starts from the Hugging Face export's state dict, as llama.cpp's converter does: its names
    are gpt1's own and gguf's TensorNameMap knows them; the Conv1D weights go back to nn.Linear's
    (out, in), which llama.cpp reads as (in, out) in its own dimension order.
    """
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, model.config.n_layer)
    tensors = []
    for hf_name, tensor in to_hf_state_dict(model).items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise Gpt1Error(f"no llama.cpp tensor name for {hf_name}")
        if hf_name.endswith(HF_CONV1D):
            tensor = tensor.t()
        array = tensor.to(torch.float32).contiguous().numpy()
        array, qtype = _convert(array, name, out_type, gguf)
        tensors.append((name, array, qtype))
    return tensors


def _convert(array: np.ndarray, name: str, out_type: str, gguf) -> tuple[np.ndarray, Any]:
    types = gguf.GGMLQuantizationType
    keep_f32 = array.ndim == 1 or name.startswith(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD])
    if out_type == "f32" or keep_f32:
        return array, types.F32
    qtype = {"f16": types.F16, "bf16": types.BF16, "q8_0": types.Q8_0}[out_type]
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block_size:
        qtype = types.F16  # the converter's fallback for rows that do not split into blocks
    return gguf.quants.quantize(array, qtype), qtype


def _file_type(gguf, out_type: str) -> int:
    names = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
    return int(gguf.LlamaFileType[names[out_type]])


# ---- metadata ---------------------------------------------------------------------------
def _add_hparams(writer, config: ModelConfig) -> None:
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.mlp_hidden)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.norm_eps)


def _add_tokenizer(writer, gguf, tokenizer: Tokenizer, n_vocab: int, chat: bool) -> None:
    tokens, types = vocab_entries(tokenizer, n_vocab, gguf.TokenType)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges(tokenizer))
    # gpt1 has no BOS token: [EOS] separates documents (as <|endoftext|> in GPT-2), and
    # nothing is added around text. Without an explicit bos id llama.cpp would assume 11.
    writer.add_bos_token_id(tokenizer.eos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_unk_token_id(tokenizer.unk_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    user = tokenizer.token_to_id(USER)
    if user is not None:
        # gpt1 ends a reply at any special token; in llama.cpp a next user turn ends it too.
        writer.add_eot_token_id(user)
    if chat:
        writer.add_chat_template(JINJA_TEMPLATE)


def vocab_entries(tokenizer: Tokenizer, n_vocab: int, token_type) -> tuple[list[str], list[int]]:
    """The token strings (byte-level, as in tokenizer.json) and llama.cpp token types of ids
    0..n_vocab-1: the special tokens CONTROL, other added tokens USER_DEFINED, embedding rows
    beyond the tokenizer UNUSED placeholders (llama.cpp needs one token per row)."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    added = {t.content: t.special for t in tokenizer.backend.get_added_tokens_decoder().values()}
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(token_type.UNUSED)
        elif token in SPECIAL_TOKENS or added.get(token):
            tokens.append(token)
            types.append(token_type.CONTROL)
        else:
            tokens.append(token)
            types.append(token_type.USER_DEFINED if token in added else token_type.NORMAL)
    return tokens, [int(t) for t in types]


def merges(tokenizer: Tokenizer) -> list[str]:
    """BPE merges as "left right" strings (tokenizers >= 0.20 saves them as pairs). Byte-level
    tokens never contain a space, so the separator is unambiguous."""
    saved = json.loads(tokenizer.to_json())["model"]["merges"]
    return [m if isinstance(m, str) else " ".join(m) for m in saved]


def _add_sampling_defaults(writer) -> None:
    qa = preset("qa")
    writer.add_sampling_temp(qa.temperature)
    writer.add_sampling_top_k(qa.top_k)
    writer.add_sampling_top_p(qa.top_p)
    writer.add_sampling_penalty_repeat(qa.repeat_penalty)
    writer.add_sampling_min_p(qa.min_p)  # 0 too: where the key is missing llama.cpp applies its own 0.05
