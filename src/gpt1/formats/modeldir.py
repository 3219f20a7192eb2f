"""The model folder: one format for every stage.

    config.json          the ModelConfig
    model.safetensors    the weights (names as in `gpt1.core.model`)
    tokenizer.json       the tokenizer

A training run dir is also a model dir (it adds its checkpoint state and metrics.jsonl);
a fine-tuned model dir adds the chat template (chat_template.jinja), an `adapter/` folder
(PEFT layout) applied on load, and base.json (see `gpt1.train.finetune`), or has merged weights.
Weights are only ever read with safetensors: never pickle.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from gpt1.core.config import ModelConfig
from gpt1.core.constants import DATA_META_FILE as DATA_META_FILE  # its home, torch-free
from gpt1.core.errors import Gpt1Error
from gpt1.core.fingerprints import file_fingerprint
from gpt1.core.locks import lock_holder
from gpt1.core.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, merge_and_unload
from gpt1.core.model import GPT, model_state_dict
from gpt1.core.paths import owner_of
from gpt1.core.progress import info
from gpt1.core.reading import read_json
from gpt1.core.temp_files import writer_of
from gpt1.core.tokenizer import TOKENIZER_FILE, Tokenizer
from gpt1.core.weights import check_weight_values, save_safetensors

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTER_DIR = "adapter"  # a fine-tuned dir's LoRA adapter (PEFT layout), applied on load
BASE_FILE = "base.json"  # a fine-tuned dir's record of the base its adapter was trained on
RUN_LOCK_DIR = "checkpoints"  # a training run's folder whose .lock its process holds (gpt1.train.checkpoint)
# A checkpoint's folder in it, and its mark that the run dir's model was written from it (gpt1.train.checkpoint).
RUN_CHECKPOINT = re.compile(r"step-(\d+)")
RUN_OUTPUTS_MARK = "outputs.done"
HF_SHARD_INDEX = "model.safetensors.index.json"  # a transformers folder saved in shards
# config.json keys of transformers' GPT-2 that gpt1's config.json never has (it says block_size, norm_eps).
GPT2_KEYS = frozenset({"n_positions", "n_ctx", "n_inner", "layer_norm_epsilon", "activation_function",
                       "resid_pdrop", "tie_word_embeddings", "transformers_version"})


def check_replaceable(out: Path, source: Path, earlier: str, is_earlier: Callable[[Path], bool]) -> None:
    """Refuse an output folder that would replace `source` (or a folder holding it), or a folder
    with files in it that is not `earlier` output of the same command (`is_earlier`). Replacing
    deletes the whole folder, so --force replaces only what the command wrote before, never a
    model dir it is exporting, a run, prepared data or a folder of the user's own files."""
    if out.resolve() == source.resolve() or out.resolve() in source.resolve().parents:
        raise Gpt1Error(f"{out}: the output folder would replace the model dir {source}; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not is_earlier(out):
        owner = owner_of(out)
        raise Gpt1Error(f"{out}: {'is ' + owner if owner else 'holds other files'}, not {earlier}; writing there "
                        "would delete it, so choose another --out (a new or empty folder)")


def read_hf_config(path: Path) -> dict[str, Any] | None:
    file = path / CONFIG_FILE
    if not file.is_file():
        return None
    data = read_json(file)
    return data if isinstance(data, dict) else None


def is_hf_model_dir(path: str | os.PathLike) -> bool:
    """True for a `transformers` model folder: a config.json naming a transformers
    `model_type` or `architectures`, or without either but with GPT-2's own keys, which
    transformers' GPT-2 classes load (gpt1's own config.json says model_type "gpt1")."""
    path = Path(path)
    if not path.is_dir():
        return False
    try:
        config = read_hf_config(path)
    except Gpt1Error:
        return False
    if config is None:
        return False
    if "model_type" not in config and not GPT2_KEYS.isdisjoint(config):
        return True
    return config.get("model_type", "gpt1") != "gpt1" or "architectures" in config


def hf_weight_files(path: Path) -> list[Path]:
    """The safetensors files of a transformers folder, as transformers reads them:
    model.safetensors, or else the shards its model.safetensors.index.json names."""
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    index = path / HF_SHARD_INDEX
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        names = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        if not names or not all(isinstance(n, str) and n and Path(n).name == n for n in names):
            raise Gpt1Error(f"{index}: expected a \"weight_map\" from tensor names to shard files in {path}")
        absent = [n for n in names if not (path / n).is_file()]
        if absent:
            raise Gpt1Error(f"{index}: names shard files that are not in {path}: {', '.join(absent[:3])}")
        return [path / n for n in names]
    # A pytorch_model.bin is a pickle: gpt1 never unpickles a file it did not write.
    found = ", ".join(sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))) or "none"
    raise Gpt1Error(f"{path}: no .safetensors weights (found: {found}); gpt1 reads transformers weights from "
                    "safetensors only, never from pickles: convert them with transformers' "
                    "`model.save_pretrained(folder, safe_serialization=True)` where you trust the file")


def weights_fingerprint(directory: str | Path) -> str:
    """sha256 of what loading `directory` applies to its weights: model.safetensors (a sharded
    transformers folder: all its shards) and, for a fine-tuned dir or an unmerged export, its
    adapter/ (config and weights). A fine-tuned dir trained without special tokens has its base's
    model.safetensors byte for byte: the adapter is what tells them apart. A plain model's
    fingerprint is its weights file's own sha256 (as base.json recorded it before adapters
    counted, so those runs still resume; a fine-tuned base recorded then is matched by
    `gpt1.train.finetune`, on its weights file and its path)."""
    directory = Path(directory)
    files = hf_weight_files(directory) if is_hf_model_dir(directory) else [directory / WEIGHTS_FILE]
    digests = [file_fingerprint(file) for file in files]
    digest = digests[0] if len(digests) == 1 else hashlib.sha256(" ".join(digests).encode()).hexdigest()
    adapter = directory / ADAPTER_DIR
    if not adapter.is_dir():
        return digest
    parts = [digest]
    if (adapter / ADAPTER_WEIGHTS).is_file():  # a missing file is not named here: loading the dir does
        parts.append(file_fingerprint(adapter / ADAPTER_WEIGHTS))
    if (adapter / ADAPTER_CONFIG).is_file():
        # Without the path of the base it was trained on: where that lay does not change the load.
        config = read_json(adapter / ADAPTER_CONFIG)
        if isinstance(config, dict):
            config.pop("base_model_name_or_path", None)
        parts.append(hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest())
    return hashlib.sha256(" ".join(parts).encode()).hexdigest()


def save_model(directory: str | Path, model: GPT, tokenizer: Tokenizer | None = None) -> Path:
    """Write config.json, model.safetensors (and tokenizer.json) atomically into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(directory / WEIGHTS_FILE, model_state_dict(model), metadata={"format": "pt"})
    model.config.save(directory / CONFIG_FILE, tokenizer.fingerprint if tokenizer is not None else None)
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def load_weights(model: GPT, file: str | Path) -> None:
    """Load safetensors weights into `model`, with a clear error when they do not fit. A model built
    on the meta device (as `load_model` builds it) takes the file's tensors as its parameters
    (float32, on the CPU; a tied head is the caller's to tie again), read one at a time where
    safetensors reads them into memory of their own (0.8 and later: pread). Copying them into an
    allocated model held the weights twice at the peak, the model's and the file's read whole (a
    672 MB file: 1.62 GB at the peak, so 1.04 GB, 0.23 GB of it torch's own). Any other model gets
    them copied in, as before: its ties, its device and the parameters an optimizer holds are kept;
    so does a meta one with an older safetensors, whose mapped file would be a third copy."""
    check_weight_shapes(model, file)
    on_meta = next(model.parameters()).device.type == "meta"
    if on_meta and _reads_by_pread():
        state = {}
        for name, tensor in stored_tensors(file):
            check_weight_values(file, {name: tensor})  # as stored: an integer tensor is refused, not converted
            state[name] = tensor.float()  # fp16, bf16 and f64 converted, as copying them into the model did
        model.load_state_dict(state, strict=not model.config.tie_embeddings, assign=True)
        return
    if on_meta:
        model.to_empty(device="cpu")
    state = read_tensors(file)
    check_weight_values(file, state)
    model.load_state_dict(state, strict=not model.config.tie_embeddings)


@functools.cache
def _reads_by_pread() -> bool:
    """Whether safetensors reads a tensor into memory of its own (`safe_open(..., backend="pread")`, 0.8)."""
    import safetensors

    try:
        return tuple(int(part) for part in safetensors.__version__.split(".")[:2]) >= (0, 8)
    except ValueError:  # a version string of another form: try it (stored_tensors falls back if it fails)
        return True


def check_weight_shapes(model: GPT, file: Path, shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """Compare the file's tensor names and shapes (its header only, or `shapes` read from it) with
    the model's, so that a config.json that does not fit the weights is an error before anything
    is allocated."""
    shapes = read_shapes(file) if shapes is None else shapes
    expected = {name: tuple(t.shape) for name, t in model_state_dict(model).items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise Gpt1Error(f"{file}: weights do not match the config (missing: {missing[:5]}, unexpected: {unexpected[:5]})")
    for name, shape in shapes.items():
        if shape != expected[name]:
            raise Gpt1Error(f"{file}: {name} has shape {shape}, the config expects {expected[name]}")


def check_layer_count(config: ModelConfig, file: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a config.json whose n_layer is more than the blocks of `file` (its header's names
    and shapes, as `read_shapes` gives them: the `transformer.h.{i}.` names) before a GPT of that
    many blocks is built to compare the rest: n_layer 20,000 beside a 2-layer file built 20,000
    blocks first (on the meta device, with no weights, but each block's modules: 30 s and 1.2 GB;
    minutes at ModelConfig's cap). Fewer cost nothing to build: that comparison names the extra
    tensors."""
    layers = {name.split(".")[2] for name in shapes if name.startswith("transformer.h.")}
    if config.n_layer > len(layers):
        raise Gpt1Error(f"{file}: weights do not match the config ({CONFIG_FILE} says n_layer {config.n_layer:,}, "
                        f"the weights hold {len(layers):,} layer{'s' * (len(layers) != 1)})")


def read_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """A safetensors file's tensor names and shapes, from its header only (no data is read)."""
    if not Path(file).is_file():
        raise Gpt1Error(f"{file}: weights file not found")
    try:  # safetensors reports a file it may not open as "No such file or directory": ask the OS first
        open(file, "rb").close()
    except OSError as e:
        raise Gpt1Error(f"{file}: cannot read ({e.strerror})") from None
    try:
        with safe_open(str(file), "pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error type for corrupt files
        raise Gpt1Error(f"{file}: not a readable safetensors file ({e})") from None


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (on CPU, as stored)."""
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error type for corrupt files
        raise Gpt1Error(f"{file}: not a readable safetensors file ({e})") from None


def stored_tensors(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """A safetensors file's tensors one at a time (on CPU, as stored), each in memory of its own.
    safetensors 0.8 reads each with pread(2); an older one maps the file, and its tensors are
    copied out of the mapping: a view of it would follow the file if it were rewritten in place
    (and kill the process if it were truncated). The mapped pages then count in the process's
    memory until the file is closed, a peak of two copies of the weights, as read_tensors'."""
    try:
        try:
            handle, own = safe_open(str(file), "pt", backend="pread"), False
        except TypeError:  # safetensors before 0.8: no backend argument
            handle, own = safe_open(str(file), "pt"), True
        with handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                yield name, tensor.clone() if own else tensor
    except Exception as e:  # safetensors raises its own error type for corrupt files
        raise Gpt1Error(f"{file}: not a readable safetensors file ({e})") from None


def not_a_model_dir(folder: Path) -> str:
    """What a folder without config.json is, instead of "config.json: file not found": the
    folders gpt1 makes that a user may take for a model (prepared data, a quickstart's or a
    runs/ folder of models, a run before its first save, a tokenizer)."""
    kind = owner_of(folder)
    if kind == "a prepared data dir":
        return f"{folder}: a prepared data dir, not a model dir; `gpt1 pretrain --data {folder} --out RUN` trains one"
    if kind == "a training run dir":
        return f"{folder}: a training run dir that has not saved its model yet (no {CONFIG_FILE}); try again after its first save"
    try:
        models = sorted(d.name for d in folder.iterdir() if (d / CONFIG_FILE).is_file())[:5]
    except OSError:  # unreadable: say what is missing
        models = []
    if models:
        return f"{folder}: not a model dir; it holds the model dirs {', '.join(m + '/' for m in models)}: try {folder / models[-1]}"
    if (folder / TOKENIZER_FILE).is_file():
        return f"{folder}: a tokenizer dir ({TOKENIZER_FILE}), not a model dir"
    return f"{folder}: not a model dir (no {CONFIG_FILE})"


def load_model(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               adapter: str = "merge") -> GPT:
    """Build a GPT from a model dir's config.json and model.safetensors, in eval mode
    (device "meta": without its weights, which are not read; the adapter is not applied).

    A fine-tuned dir's LoRA adapter (`adapter/`, see `gpt1.core.lora`) is applied: with
    adapter="merge" (default) merged into the weights, giving a plain GPT as fast as the base;
    "keep" leaves the LoRA layers in place (unmerged); "ignore" returns the base it applies to.
    A training run dir that a process is still training is loaded as its latest save is, and
    an info line says so (`_say_if_training`).
    """
    named = str(directory)
    directory = Path(directory)
    _check_is_folder(directory, named)
    if is_hf_model_dir(directory):
        raise Gpt1Error(f"{directory}: a Hugging Face transformers folder, not a gpt1 model dir; import it with "
                        f"`gpt1 pretrain init_from=hf:{directory}` or `gpt1 finetune --base {directory}` (`gpt1 "
                        "generate`, `chat`, `serve` and `eval` run it as it is)")
    # Decided once, here: a fine-tuned dir's weights are the base's, so an adapter/ missing later
    # (the folder replaced whole meanwhile) must not load as the base model.
    fine_tuned = (directory / BASE_FILE).is_file()
    saved = _saved_step(directory)  # a live run's save as the load begins: named only if it is so at the end
    if fine_tuned and not (directory / ADAPTER_DIR).is_dir():
        # A fine-tune writes base.json first at its first save, then adapter/: a live one is saving.
        if holder := lock_holder(directory / RUN_LOCK_DIR):
            raise Gpt1Error(f"{directory}: a fine-tuning run ({holder}) is saving its first model there (no "
                            f"{ADAPTER_DIR}/ yet); try again after its first save")
        if (pid := writer_of(directory)) is not None:  # replaced whole by two renames: no folder for an instant
            raise Gpt1Error(f"{directory}: process {pid} is replacing it now (no {ADAPTER_DIR}/ in that instant); "
                            "try again once it is done")
        # Its weights are the base's: without the adapter it would run as the base model, silently.
        raise Gpt1Error(f"{directory}: a fine-tuned model dir ({BASE_FILE}) without its {ADAPTER_DIR}/ folder; "
                        f"restore {ADAPTER_DIR}/ (a fine-tune killed in its first save writes it when rerun), "
                        "or load the base model it names")
    if not (directory / CONFIG_FILE).is_file():
        raise Gpt1Error(not_a_model_dir(directory))
    config = ModelConfig.load(directory / CONFIG_FILE)
    # Checked before allocating what config.json asks for, and its layer count before building it.
    shapes = read_shapes(directory / WEIGHTS_FILE)
    check_layer_count(config, directory / WEIGHTS_FILE, shapes)
    with torch.device("meta"):
        # float32, the weights' dtype, whatever torch's default (a caller's set_default_dtype(torch.float64)
        # loaded a float64 model); on the meta device, nothing to convert.
        model = GPT(config).float()
    check_weight_shapes(model, directory / WEIGHTS_FILE, shapes)
    if torch.device(device).type == "meta":  # the architecture and checked shapes, no weights read
        _say_if_training(directory, saved)
        return model.eval()
    load_weights(model, directory / WEIGHTS_FILE)
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    model = model.to(device)  # a parameter at a time: the CPU holds one copy of the weights at most
    if adapter not in ("merge", "keep", "ignore"):
        raise Gpt1Error(f"adapter must be 'merge', 'keep' or 'ignore', got {adapter!r}")
    if adapter != "ignore" and (fine_tuned or (directory / ADAPTER_DIR).is_dir()):
        if not (directory / ADAPTER_DIR).is_dir():
            raise Gpt1Error(f"{directory}: was replaced while it loaded (its {ADAPTER_DIR}/ went missing after "
                            f"{BASE_FILE} said it is a fine-tuned model dir, e.g. a run saving its best/ there); "
                            "try again")
        load_adapter(model, directory / ADAPTER_DIR)
        if adapter == "merge":
            merge_and_unload(model)
    if dtype is not None:
        model = model.to(dtype)
    _say_if_training(directory, saved)
    return model.eval()


def _check_is_folder(directory: Path, named: str) -> None:
    """A Gpt1Error unless `directory` is a folder: one look (a folder replaced in the instant
    between two looks was "a file, not a model directory"), and a live writer's temporary folder
    beside a missing one says that it is being written (`atomic_dir`)."""
    try:
        mode = os.stat(directory).st_mode
    except OSError:
        mode = None
    if mode is not None and stat.S_ISDIR(mode):
        return
    if mode is not None:
        raise Gpt1Error(f"{directory}: {'a file' if stat.S_ISREG(mode) else 'not a folder'}, not a model directory")
    if named.startswith("hf:"):  # a transformers folder or Hub id, as init_from takes
        raise Gpt1Error(f"{named}: model directory not found; this takes a gpt1 model dir (hf: names a "
                        f"transformers folder or Hub model to train from: `gpt1 pretrain init_from={named}` or "
                        f"`gpt1 finetune --base {named}`)")
    if (pid := writer_of(directory)) is not None:
        raise Gpt1Error(f"{directory}: model directory not found: process {pid} is writing it now (or replacing it); "
                        "try again once it is done")
    raise Gpt1Error(f"{directory}: model directory not found")


def _say_if_training(directory: Path, saved_before: int | None) -> None:
    """One info line when another process is training the run dir `directory` (it holds its
    checkpoints/ lock): what was loaded is its latest save, which the next one replaces; its step
    where the save marked as written was the same as the load began and ended."""
    holder = lock_holder(directory / RUN_LOCK_DIR)
    if holder is None or holder == f"process {os.getpid()}":  # this process's own run (a notebook's thread)
        return
    step = saved_before if _saved_step(directory) == saved_before else None
    info(f"{directory}: {holder} is still training it; loaded its "
         f"{f'save of step {step:,}' if step is not None else 'latest save'} (it changes at every save)")


def _saved_step(run_dir: Path) -> int | None:
    """The step of the checkpoint the run dir's model was last written from (marked so); None
    where none is marked: the one before is deleted as the new one is saved, a moment before the
    model is written from it, so the model read then may be either (the newest checkpoint's step
    named a model one save older: the line then says "its latest save")."""
    steps = {}
    try:
        for entry in (run_dir / RUN_LOCK_DIR).iterdir():
            if match := RUN_CHECKPOINT.fullmatch(entry.name):
                steps[int(match[1])] = (entry / RUN_OUTPUTS_MARK).is_file()
    except OSError:  # gone or unreadable meanwhile
        return None
    marked = [step for step, written in steps.items() if written]
    return max(marked, default=None)
