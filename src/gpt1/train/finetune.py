"""Chat fine-tuning, LoRA or full: a base model dir + chat data -> a chat model dir.

`finetune(cfg, base, out)` loads the base, injects LoRA (`gpt1.core.lora`), freezes every base
weight except the special-token embedding rows (with `full=true`: trains every weight instead,
no adapter), reads and encodes the chat data
(`gpt1.data.chat_sources`, `gpt1.data.chat`) and runs the shared training loop (`gpt1.train.loop.train`) with padded,
shuffled chat batches whose labels cover assistant replies only. `data` is one chat source or a
list of them (a mixture, read together). Validation: loss and perplexity on the assistant tokens
of held-out conversations (a source's `validation` split when it has one, else a deterministic
`val_fraction` of the message trees of the other sources, together: `gpt1.train.evaluate.read_chat_splits`,
the split `gpt1 eval --chat` scores the held-out side of).

The run dir `out` is a model dir (`gpt1.load(out)` applies the adapter):

    config.json, tokenizer.json   the base's
    chat_template.jinja           the chat template (this makes it a chat model)
    model.safetensors             the base weights with the trained special-token rows written in
    adapter/                      the LoRA adapter in PEFT's layout (adapter_config.json + safetensors)
    base.json                     where the base came from: its path, and the sha256 of its weights (and
                                  adapter, for a fine-tuned base: `weights_fingerprint`)
    + train_config.json, metrics.jsonl, loss.png, checkpoints/ (as every training run)

With `full=true` the run dir is a plain model dir with the chat template: config.json,
tokenizer.json, chat_template.jinja and model.safetensors holding every trained weight (no
adapter/, no base.json; train_config.json records the base's path and fingerprint).

train_config.json's `data` records the training sequences (count, tokens, sha256: a resume on
other data is refused) and the held-out conversations (`validation`: count and
`conversations_fingerprint`), which `gpt1.train.evaluate.evaluate_chat` checks before it calls a score
held-out.
A fine-tune whose base is a gpt1 fine-tune on the same training sequences with the same seed (the
way to train on past a run's end) begins at the epoch after the ones that run trained, as one
longer run would, not at epoch 0's order again (`continued_epochs`).

`merge_model_dir(out, dest)` writes a plain model dir with the adapter merged in.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch

from gpt1.core.atomic import atomic_dir, write_json, write_text
from gpt1.core.chat_template import JINJA_TEMPLATE, TEMPLATE_FILE
from gpt1.core.crash_points import crash_point
from gpt1.core.errors import Gpt1Error
from gpt1.core.fingerprints import file_fingerprint
from gpt1.core.locks import held_by_another
from gpt1.core.lora import (
    DEFAULT_TARGETS,
    LoRAConfig,
    base_state_dict,
    count_trainable,
    inject_lora,
    mark_only_lora_as_trainable,
    save_adapter,
)
from gpt1.core.paths import as_path, folder_target, json_path, owner_of
from gpt1.core.progress import info, warn
from gpt1.core.reading import read_json
from gpt1.core.rng import host_rng_kept
from gpt1.core.tokenizer import Tokenizer
from gpt1.core.weights import save_safetensors
from gpt1.data.chat import ChatBatches, encode_conversations, iter_batches
from gpt1.data.chat_splits import conversations_fingerprint, grouped_by_content
from gpt1.data.conversation import ChatStats
from gpt1.formats.hf import hub_folder, import_hf_model, is_hf_model_dir
from gpt1.formats.modeldir import (
    ADAPTER_DIR,
    BASE_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    check_replaceable,
    hf_weight_files,
    load_model,
    save_model,
    weights_fingerprint,
)
from gpt1.train import checkpoint as ckpt
from gpt1.train import distributed
from gpt1.train.config import TrainConfig, require_config
from gpt1.train.evaluate import (
    CHAT_ALL_PATHS,
    CHAT_VAL_FRACTION,
    ChatEvalResult,  # noqa: F401 (imported from here until 2026-12-07)
    evaluate_chat,  # noqa: F401
    read_chat_splits,
    read_run_record,
    split_unrecorded,
)
from gpt1.train.loop import step_cap_words, train
from gpt1.train.pretrain import set_dropout
from gpt1.train.run_record import CONFIG_FILE as RUN_CONFIG_FILE
from gpt1.train.run_record import RUN_LOCK, toml_value


@dataclass
class FinetuneConfig(TrainConfig):
    """A `TrainConfig` (the loop's knobs) plus the data and LoRA fields of fine-tuning.

    The run length is `max_steps` if > 0, else `max_tokens` (tokens of the training sequences,
    padding excluded), else `epochs` passes over the training sequences.
    """

    # The chat data: one source (OpenAssistant/oasst2, hf:NAME[:SPLIT], a file or folder, chatterbot)
    # or a list of them, read together (a mixture).
    data: str | list[str] = ""
    max_steps: int = 0
    epochs: float = 1.0
    lr: float = 1e-4
    warmup: float = 0.0
    full: bool = False  # train every weight (full fine-tuning) instead of a LoRA adapter; the lora_ keys then do not apply
    lora_r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    # any of q, k, v, o, up, down; a list passes too, stored as the tuple (gpt1.train.config._checked_type)
    lora_targets: Annotated[Sequence[str], tuple[str, ...]] = DEFAULT_TARGETS
    train_special_tokens: bool = True  # train the embedding rows of [PAD] [UNK] [EOS] and the role markers
    all_paths: bool = CHAT_ALL_PATHS  # OASST: every root-to-leaf path instead of the best-ranked replies
    languages: list[str] = field(default_factory=list)  # OASST language codes to keep, e.g. ["en"]; [] = all
    skip_invalid: bool = False  # skip and count malformed lines instead of failing
    val_fraction: float = CHAT_VAL_FRACTION  # held-out share of the message trees when the data has no validation split
    # A run's record holds its --base as init_from: left out when the record is read as a recipe
    # (`load_config`), which the base is not part of.
    RUN_SET_KEYS = ("init_from",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.data, list):
            if not all(self.data) or len(set(self.data)) < len(self.data):
                raise Gpt1Error(f"data: expected chat sources, each named once, got {self.data!r}")
            if len(self.data) <= 1:  # one source is recorded as a string, as it always was: a resume matches
                self.data = self.data[0] if self.data else ""
        if not 0.0 <= self.val_fraction < 1.0:
            raise Gpt1Error(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.n_layer or self.n_head or self.n_embd:
            raise Gpt1Error("n_layer, n_head and n_embd shape a model from scratch; fine-tuning keeps the base "
                            "model's shape (leave them 0)")
        if self.optimizer != "adamw":
            raise Gpt1Error(f"optimizer={self.optimizer} is for pretraining; LoRA fine-tuning uses adamw")
        # Pretraining's keys that a fine-tune would accept and ignore (the base decides the model;
        # its embeddings are frozen; there is no Muon): refused rather than recorded as if they applied.
        defaults = TrainConfig()
        ignored = [f"{name}={toml_value(getattr(self, name))}" for name in ("model", "embedding_lr_scale", "muon_lr_scale")
                   if getattr(self, name) != getattr(defaults, name)]
        if ignored:
            raise Gpt1Error(f"{', '.join(ignored)}: pretraining keys; a LoRA fine-tune takes its model from its base "
                            "and trains no embeddings but the special tokens' rows (at lr)")
        if self.data_order != defaults.data_order:  # the order of a shard's token windows: no shard here
            raise Gpt1Error(f"data_order={self.data_order}: a pretraining key (the order of token windows in a "
                            "data folder); a fine-tune reads its conversations in its own shuffled epochs")
        # Here, not only in `finetune`: --print-config accepted it and printed a recipe without it.
        if self.init_from != defaults.init_from:
            raise Gpt1Error(f"init_from={self.init_from}: a pretraining key; a fine-tune starts from its base (--base)")
        if self.float8:  # LoRA wraps the very layers FP8 would swap; the two together are untested
            raise Gpt1Error("float8=true is for pretraining; LoRA fine-tuning runs in bf16-mixed, fp16-mixed or fp32")
        if self.full:  # LoRA's keys would be recorded as if they applied: refused, as pretraining's keys are
            # As a recipe writes them (train_special_tokens=false, lora_targets=['q', 'v']), not as Python does
            lora = [f"{name}={toml_value(getattr(self, name))}" for name in ("lora_r", "lora_alpha", "lora_dropout",
                                                                            "lora_targets", "train_special_tokens")
                    if getattr(self, name) != FinetuneConfig.__dataclass_fields__[name].default]
            if lora:
                raise Gpt1Error(f"{', '.join(lora)}: LoRA keys, and full=true trains every weight without an adapter "
                                "(the special tokens' rows included); leave them out, or drop full=true for a LoRA "
                                "fine-tune")
            return
        self.lora_config()  # validates r, dropout and targets

    @property
    def sources(self) -> list[str]:
        """The chat sources of `data`: none, one, or a mixture."""
        return list(self.data) if isinstance(self.data, list) else [self.data] if self.data else []

    def lora_config(self, token_ids: list[int] | None = None) -> LoRAConfig:
        return LoRAConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=tuple(self.lora_targets), token_ids=list(token_ids or []))


def load_base(base: str | Path):
    """The base model (CPU) and its tokenizer, from a gpt1 model dir or a transformers GPT-2
    folder with a gpt1-compatible tokenizer (e.g. one written by `gpt1 export`)."""
    if is_hf_model_dir(base):
        model, tokenizer = import_hf_model(base, "cpu")
        if tokenizer is None and not (Path(base) / "tokenizer.json").is_file():
            raise Gpt1Error(f"{base}: no tokenizer.json; put the gpt1 tokenizer.json the model was trained with "
                            "in the folder (chat fine-tuning needs its [PAD], [UNK] and [EOS])")
        if tokenizer is None:  # import_hf_model said why in an info line; the error says it again
            try:
                Tokenizer.load(Path(base) / "tokenizer.json")
            except Gpt1Error as e:
                raise Gpt1Error(f"{e} (chat fine-tuning needs gpt1's tokenizer: its [PAD], [UNK] and [EOS])") from None
        return model, tokenizer
    return load_model(base, device="cpu"), Tokenizer.load(base)


def prepare_model(base: str | Path, cfg: FinetuneConfig):
    """The base model (on CPU, training mode) with LoRA injected and everything else frozen,
    and its tokenizer."""
    model, tokenizer = load_base(base)
    if cfg.dropout >= 0:  # -1: the base's own rate (a GPT-2 import's 0.1, a gpt1 base's as it was trained)
        set_dropout(model, cfg.dropout)
    if cfg.full:
        model.requires_grad_(True)  # an HF import or a merged chat base may come with some frozen
        return model.train(), tokenizer
    token_ids = tokenizer.special_ids if cfg.train_special_tokens else []
    torch.manual_seed(cfg.seed)  # the random init of the A matrices is part of the run
    inject_lora(model, cfg.lora_config(token_ids))
    mark_only_lora_as_trainable(model)
    return model.train(), tokenizer


def save_finetuned(directory: str | Path, model: torch.nn.Module, tokenizer, base: dict) -> Path:
    """Write the fine-tuned model dir layout (module docstring) into `directory`.

    Each file is replaced atomically, one after the other, while readers may load the run dir:
    - base.json comes first: it marks a dir whose weights need their adapter, so a dir cut (or
      read) before its first adapter is refused by `load_model`, not loaded as the base model.
    - model.safetensors differs from the base only in the special-token rows, which the adapter
      holds too and sets on load: with the adapter of the save before, the load is that save's
      model whole.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / BASE_FILE, base)
    save_safetensors(directory / WEIGHTS_FILE, base_state_dict(model), metadata={"format": "pt"})
    model.config.save(directory / CONFIG_FILE, tokenizer.fingerprint)
    tokenizer.save(directory)
    write_text(directory / TEMPLATE_FILE, JINJA_TEMPLATE)
    save_adapter(model, directory / ADAPTER_DIR, base.get("path"))
    return directory


def save_full(directory: str | Path, model: torch.nn.Module, tokenizer) -> Path:
    """Write a fully fine-tuned model into `directory`: a plain model dir (every weight) with the
    chat template, which makes it a chat model."""
    save_model(directory, model, tokenizer)
    write_text(Path(directory) / TEMPLATE_FILE, JINJA_TEMPLATE)
    return Path(directory)


def load_chat_splits(cfg: FinetuneConfig, stats=None):
    """(train, validation, stats, whether val_fraction held some out): the conversations of
    `cfg.data` (see `read_chat_splits`); False: every source had its own validation split."""
    if not cfg.sources:
        raise Gpt1Error("no chat data: pass --data (a file, a folder, hf:NAME, OpenAssistant/oasst2 or chatterbot)")
    stats = stats if stats is not None else ChatStats()
    options = dict(all_paths=cfg.all_paths, languages=cfg.languages or None, skip_invalid=cfg.skip_invalid)
    train, val, pooled = read_chat_splits(cfg.sources, cfg.val_fraction, cfg.seed, stats, **options)
    return train, val, stats, pooled


def _no_sequences(stats: ChatStats, train_convs: list, train_data) -> Gpt1Error:
    """The error for chat data that left nothing to train on: the reader's counts (why each
    conversation was left out) or, for conversations read and lost in encoding, the encoder's."""
    if train_convs:
        why = train_data.why_empty() + (f"; as read: {stats.summary()}" if stats.skipped else "")
    else:
        why = stats.why_empty() + ("; none of them is in the train split" if stats.conversations else "")
    return Gpt1Error(f"no training sequences: {why}")


@host_rng_kept()  # the run seeds the global RNGs (a resume restores them): the caller's come back after
def finetune(cfg: FinetuneConfig, base: str | Path, out: str | Path, *, step_limit: int | None = None,
             redo_hint: str | None = None):
    """Fine-tune the model dir `base` on `cfg.data` into the run dir `out` (resumes a run there).
    `step_limit` caps the steps resolved from the config (e.g. a time budget); `redo_hint` says
    what to do instead when `out` holds another run. Returns the loop's TrainResult."""
    cfg = require_config(cfg, FinetuneConfig)  # checked again (init_from too): a field may have been set after construction
    named = str(as_path(base, "base", "a model dir"))
    base = hub_folder(named[3:]) if named.startswith("hf:") else Path(named)  # hf: may name a Hub model
    out = as_path(out, "out", "a run dir")
    if is_hf_model_dir(base):  # its weights may be shards; a pickle only is refused now, by name
        hf_weight_files(base)
    elif not base.is_dir():  # "...; pass the base model with --base" read as if --base were missing
        why = "a file, not a model directory" if base.exists() else "not a model dir (no such folder)"
        raise Gpt1Error(f"{base}: {why}")
    elif not (base / WEIGHTS_FILE).is_file():
        raise Gpt1Error(f"{base}: not a model dir (no {WEIGHTS_FILE}); pass the base model with --base")
    _check_not_training(base)
    folder_target(out)  # writable: found now, not once the chat data is read and encoded
    dist = distributed.setup(cfg.device)
    try:
        return _finetune(cfg, base, out, dist, step_limit, redo_hint)
    finally:
        distributed.cleanup()


def _check_not_training(base: Path) -> None:
    """Refuse a base that a run is still training: it replaces its weights at every save, so the
    weights loaded could be a later save than the ones base.json's fingerprint was read from."""
    lock = base / RUN_LOCK
    if held_by_another(lock.parent):
        try:
            holder = lock.read_text(encoding="utf-8").strip() or "a process"
        except OSError:  # unreadable or gone meanwhile: the lock said enough
            holder = "a process"
        raise Gpt1Error(f"{base}: {holder} is still training it, and its weights change at every save; wait for it "
                        "to end (or stop it) and run the command again")


def _finetune(cfg: FinetuneConfig, base: Path, out: Path, dist, step_limit: int | None, redo_hint: str | None):
    # The base is what it loads as: a fine-tuned base's adapter is part of it (`weights_fingerprint`,
    # marked as such: base.json files without the mark may hold the fingerprint before adapters counted).
    # Its path, recorded in base.json and train_config.json, checked first: JSON needs UTF-8.
    base_info = {"path": json_path(base.resolve()), "sha256": weights_fingerprint(base), "sha256_of": BASE_FINGERPRINT}
    if (out / BASE_FILE).is_file() and (why := _other_base(out, base, base_info)):
        raise Gpt1Error(f"{why}; " + (redo_hint or "choose another --out"))
    recorded = read_run_record(out).get("data")  # the base as of the first checkpoint (base.json comes with the outputs)
    if isinstance(recorded, dict) and recorded.get("base", base_info["sha256"]) != base_info["sha256"]:
        raise Gpt1Error(f"{out} was fine-tuned from other base weights than {base} (its {RUN_CONFIG_FILE} records "
                        "theirs); " + (redo_hint or "choose another --out"))
    model, tokenizer = prepare_model(base, cfg)
    block_size = cfg.block_size or model.config.block_size
    if block_size > model.config.block_size:
        raise Gpt1Error(f"block_size {block_size} is longer than the model's context ({model.config.block_size})")

    def save_model(directory: Path, m: torch.nn.Module) -> None:
        if cfg.full:
            save_full(directory, m, tokenizer)
        else:
            save_finetuned(directory, m, tokenizer, base_info)

    # Recorded in the run dir's train_config.json with the run's config: its base, as a path (as the
    # OS names it: the loop records it as text). Set after the checks, which refuse an init_from set
    # by the user; the loop checks the config no more.
    run_cfg = dataclasses.replace(cfg)
    run_cfg.init_from = str(base.resolve())
    if (finished := _finished_run(out, cfg, step_limit)) is not None:
        # Nothing to train: the loop checks the recipe against the run's and says so, without the
        # chat data read and encoded first (two minutes for 200k conversations).
        max_steps, data = finished
        return train(model, run_cfg, out, _NoBatches(), list, save_model, max_steps=max_steps, data=data,
                     redo_hint=redo_hint)

    train_convs, val_convs, stats, pooled = load_chat_splits(cfg)
    train_data = encode_conversations(tokenizer, train_convs, block_size + 1, progress=dist.is_main)
    if not len(train_data):
        raise _no_sequences(stats, train_convs, train_data)
    record = read_run_record(out)
    if split_unrecorded(record) and grouped_by_content(train_convs + val_convs):
        _check_legacy_split(out, record, len(train_data), dist, redo_hint)
    val_data = encode_conversations(tokenizer, val_convs, block_size + 1)
    # The batches used, built alone: all of a large held-out set's (padded) took its memory, to keep a few.
    val = list(itertools.islice(iter_batches(val_data, cfg.batch_size, tokenizer.pad_id), cfg.eval_batches))
    continues = continued_epochs(base, out, cfg, train_data)
    batches = ChatBatches(train_data, cfg.batch_size, seed=cfg.seed, pad_id=tokenizer.pad_id,
                          rank=dist.rank, world_size=dist.world_size, epoch=continues["epoch"] if continues else 0)
    sequences_per_step = cfg.batch_size * cfg.grad_accum * dist.world_size
    if cfg.max_steps > 0:
        max_steps = cfg.max_steps
    elif cfg.max_tokens > 0:
        # A sequence's inputs, as the loop counts its tokens: all of its ids but the last (a target only).
        # Counted with the last, the mean ran 3-5% long, and the run as much short of max_tokens.
        inputs = train_data.num_tokens - len(train_data)
        max_steps = max(1, -(-cfg.max_tokens * len(train_data) // (sequences_per_step * inputs)))  # ceil, exact
    else:  # whole epochs of the sampler, each ending on a step topped up from its start
        max_steps = batches.steps_for(cfg.epochs, cfg.grad_accum)
    if step_limit is not None:
        max_steps = max(1, min(max_steps, step_limit))
    if cfg.max_steps == 0 and cfg.max_tokens == 0 and ckpt.latest_checkpoint(out) is not None:
        max_steps = _legacy_epoch_steps(record, cfg, len(train_data), sequences_per_step, step_limit) or max_steps
    if dist.is_main:
        data_name = " + ".join(cfg.sources)
        info(f"chat data {data_name}: {stats.summary()}")
        info(f"train: {train_data.summary()}")
        info(f"validation: {val_data.summary()} ({len(val)} batch{'es' if len(val) != 1 else ''} used)")
        # What keep_best and early_stop act on is missing: they would do nothing, silently.
        idle = [f"{k}={str(getattr(cfg, k)).lower()}" for k in ("keep_best", "early_stop") if getattr(cfg, k)]
        idle_words = f" ({' and '.join(idle)} do{'es' if len(idle) == 1 else ''} nothing)" if idle else ""
        if not val and val_convs:
            warn(f"{data_name}: nothing to validate on, the held-out conversations left no sequence "
                 f"({val_data.why_empty()}): the run reports no validation loss{idle_words}")
        elif not val and not pooled:  # its own split, every conversation of it left out (counted above)
            warn(f"{data_name}: nothing to validate on, the data's validation split left no conversation (see "
                 f"'skipped' above): the run reports no validation loss{idle_words}")
        elif not val and cfg.val_fraction > 0:
            trees = len({c.group for c in train_convs})
            warn(f"{data_name}: nothing held out for validation (val_fraction holds out whole message trees, and "
                 f"the data has {trees:,} tree{'s' if trees != 1 else ''}): the run reports no validation "
                 f"loss{idle_words}")
        elif not val and idle:
            warn(f"{data_name}: val_fraction=0 holds nothing out: there is no validation, and {' and '.join(idle)} "
                 f"do{'es' if len(idle) == 1 else ''} nothing")
        trainable, total = count_trainable(model), sum(p.numel() for p in model.parameters())
        method = ("full fine-tuning" if cfg.full
                  else f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha:g} on {', '.join(cfg.lora_targets)}")
        info(f"{method}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%)")
        at_most, sooner = step_cap_words(cfg)
        # The sampler's epochs (each a whole number of steps), not sequences drawn / sequences:
        # the top-up of an epoch's last step is not a part of the next epoch.
        info(f"{at_most}{max_steps:,} steps x {sequences_per_step} sequences = "
             f"{max_steps / batches.epoch_steps(cfg.grad_accum):.2f} epochs of {len(train_data):,}{sooner}")
        if continues:
            checked = continues.get("checked", True)
            info(f"--base {base} was fine-tuned on {'these' if checked else 'as many'} {len(train_data):,} sequences "
                 f"with seed {cfg.seed} for {continues['epoch']} epoch{'s' if continues['epoch'] != 1 else ''}: this run "
                 "goes on with the next epochs' orders" + (", as one longer run would" if checked else ""))

    # Recorded in the run dir's train_config.json: resuming with another base, or on other
    # training sequences (an edit of the chat data, even one that keeps their number), is refused.
    # What the run holds out is recorded with them: `gpt1.train.evaluate.evaluate_chat` checks it
    # before it calls a score held-out. A run recorded without it keeps its record (its training sequences tell).
    # The base's fingerprint too: base.json is written with the outputs, after the checkpoint, so a
    # run killed between the two resumed on other base weights at the same path without a word.
    data = {"sequences": len(train_data), "tokens": train_data.num_tokens, "sha256": train_data.fingerprint(),
            "validation": {"conversations": len(val_convs), "sha256": conversations_fingerprint(val_convs)},
            "base": base_info["sha256"]}
    for key in ("validation", "base"):  # recorded since 2026-12-06 ("base"); an older run keeps its record
        if isinstance(record.get("data"), dict) and key not in record["data"]:
            del data[key]
    return train(model, run_cfg, out, batches, lambda: val, save_model, max_steps=max_steps, data=data,
                 redo_hint=redo_hint, continues=continues)


def continued_epochs(base: Path, out: Path, cfg: FinetuneConfig, train_data) -> dict | None:
    """Where a fresh fine-tune of `base` starts its epochs, where `base` is a gpt1 fine-tune on the same
    training sequences (`train_data`) with the same seed: at the epoch after those it trained (`run`:
    its path, `epoch`: the first epoch of this run), read from its latest checkpoint, as the rest of one
    longer run; at epoch 0 it trained on that run's orders again. A fine-tune recorded by an older gpt1,
    without its data (before 2026-12-05), is taken at its checkpoint's count of sequences, with a
    warning. None otherwise (other data or seed, a folder without checkpoints, a resume: its
    checkpoint holds where its batches are)."""
    try:
        record = read_run_record(base)
    except Gpt1Error:  # a damaged record: a base like any other
        return None
    data = record.get("data")
    if (not (data is None or isinstance(data, dict) and data.get("sha256") == train_data.fingerprint())
            or not isinstance(record.get("config"), dict) or record["config"].get("seed") != cfg.seed
            or ckpt.latest_checkpoint(out) is not None):
        return None
    sampler = ckpt.saved_sampler(base) or {}
    epoch, position = sampler.get("epoch"), sampler.get("position")
    if not isinstance(epoch, int) or not isinstance(position, int) or sampler.get("sequences") != len(train_data):
        return None
    epoch += position > 0  # stopped inside an epoch: the next one, as epochs= counts whole passes
    if epoch > 0 and data is None:
        # Going on is safe either way: on the same sequences it skips the orders the run trained on,
        # on others of the same number the next epoch's order is as new as the first's.
        warn(f"--base {base} was recorded by an older gpt1, without a fingerprint of its training sequences: their "
             f"number ({len(train_data):,}) and seed match this data's, so this run goes on with epoch {epoch} (were "
             "they other sequences of the same number, its order is as new to the model as the first's)")
    # "checked": false where the sequences are not known to be the base's (no fingerprint to compare)
    return ({"run": json_path(base.resolve()), "epoch": epoch, **({"checked": False} if data is None else {})}
            if epoch > 0 else None)


def _legacy_epoch_steps(record: dict, cfg: FinetuneConfig, sequences: int, sequences_per_step: int,
                        step_limit: int | None) -> int | None:
    """The length of a run begun before 2026-12-06 on `epochs`, when its train_config.json records
    it: epochs x sequences / global batch steps, which stopped part-way through the last epoch
    (each epoch ends on a step topped up from its start). It resumes with that length: the loop
    refuses a resolved max_steps other than the recorded one. None: not such a run."""
    steps = max(1, math.ceil(cfg.epochs * sequences / sequences_per_step))
    if step_limit is not None:
        steps = max(1, min(steps, step_limit))
    return steps if record.get("max_steps") == steps else None


def _finished_run(out: Path, cfg: FinetuneConfig, step_limit: int | None) -> tuple[int, dict | None] | None:
    """(max_steps, the data record) of the run in `out` when its latest checkpoint is its last
    step: a rerun has nothing to train, and tells so from the run dir alone. The run's length is
    the one this config resolves to: `max_steps`, or the one recorded for a length the data set
    (epochs, max_tokens: the data is not read again to resolve it; a rerun of a finished run
    does nothing, whatever became of its data). None: steps remain, or it cannot tell (a
    `step_limit` on a data-set length), and the data is read and checked as for any resume."""
    record = read_run_record(out)
    latest = ckpt.latest_checkpoint(out) if record else None
    if latest is None or not isinstance(record.get("max_steps"), int):
        return None
    if cfg.max_steps > 0:
        max_steps = cfg.max_steps if step_limit is None else max(1, min(cfg.max_steps, step_limit))
    elif step_limit is None:
        max_steps = record["max_steps"]
    else:
        return None
    try:
        state = torch.load(latest / ckpt.STATE_FILE, map_location="cpu", weights_only=True)
    except Exception:  # unreadable: the loop names the file when it loads the checkpoint
        return None
    end = state.get("end", max_steps) if isinstance(state, dict) else max_steps  # a time budget may end it early
    if not isinstance(end, int) or ckpt.checkpoint_step(latest) < end:  # not a number: the loop names the file
        return None
    data = record.get("data")
    return max_steps, data if isinstance(data, dict) else None


class _NoBatches:
    """The batch source of a finished run, which takes no step: it draws no batch, and keeps
    the sampler state the loop restores into it."""

    pad_id = None

    def __init__(self) -> None:
        self.state: dict = {}

    def next_batch(self):
        raise RuntimeError("a finished run draws no batch")

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


# base.json's "sha256_of": its sha256 is `weights_fingerprint`'s. A base.json without it may be
# older (before 2026-12-05, 243c308), when the sha256 was that of model.safetensors alone.
BASE_FINGERPRINT = "model.safetensors and adapter/"


def _other_base(out: Path, base: Path, base_info: dict) -> str | None:
    """Why `base` is not the base the run in `out` was fine-tuned from, per its base.json (None: it is)."""
    recorded = read_json(out / BASE_FILE)
    if recorded.get("sha256") == base_info["sha256"]:
        return None
    # A fine-tuned base recorded before its adapter counted: its model.safetensors alone. That file
    # is also its own base's when it was fine-tuned without special tokens, so the path decides.
    legacy = ("sha256_of" not in recorded and (base / WEIGHTS_FILE).is_file()
              and recorded.get("sha256") == file_fingerprint(base / WEIGHTS_FILE))
    if not legacy:
        return f"{out} was fine-tuned from other base weights than {base} ({BASE_FILE} differs)"
    if recorded.get("path") == base_info["path"]:
        return None
    return (f"{out / BASE_FILE} predates 2026-12-05 and records the model.safetensors of a fine-tuned base, not "
            f"its {ADAPTER_DIR}/, so it cannot tell {base} from another model with that file: pass --base "
            f"{recorded.get('path')} (the path it names) to resume")


def _check_legacy_split(out: Path, record: dict, sequences: int, dist, redo_hint: str | None) -> None:
    """A resume of a run that may have split its {"messages"} records by file and line: its
    checkpoint's number of training sequences is the one check left."""
    latest = ckpt.latest_checkpoint(out)
    if latest is None:
        return
    try:
        saved = torch.load(latest / ckpt.STATE_FILE, map_location="cpu", weights_only=True)["sampler"]["sequences"]
    except Exception:  # unreadable: the loop names the file when it loads the checkpoint
        return
    why = ("the run predates 2026-12-05, when gpt1 split {\"messages\"} records into train and "
           "validation by file and line (by their first turn since 2026-12-07)")
    if saved != sequences:
        raise Gpt1Error(f"cannot resume {out}: its checkpoint was made on {saved} chat sequences and the data now "
                        f"gives {sequences}, but the data may not have changed: {why}; "
                        + (redo_hint or "finish it with the gpt1 that began it (`gpt1 export --merge` merges it "
                                        "as it is), or choose another --out"))
    if dist.is_main and ckpt.checkpoint_step(latest) < record.get("max_steps", 0):
        warn(f"{out}: {why}: the resumed steps may train on conversations that the run held out")


def merge_model_dir(source: str | Path, dest: str | Path) -> Path:
    """Write a plain model dir (config, merged weights, tokenizer, chat template, and the run's
    train_config.json) from a fine-tuned model dir."""
    source, dest = Path(source), Path(dest)
    if not (source / ADAPTER_DIR).is_dir():
        raise Gpt1Error(f"{source}: nothing to merge (no {ADAPTER_DIR}/ folder)")
    def check_dest() -> None:
        check_replaceable(dest, source, "an earlier merged model", lambda d: owner_of(d) == "a model dir" and
                          (d / TEMPLATE_FILE).is_file() and not (d / ADAPTER_DIR).exists())

    check_dest()
    model = load_model(source, device="cpu")  # the adapter is merged on load
    check_dest()  # again: what appeared there while the model loaded counts as found at the start
    # Whole or not at all: killed between the weights and the chat template, the folder was a
    # base model that a rerun left as it was.
    with atomic_dir(dest) as tmp:
        save_model(tmp, model, Tokenizer.load(source))
        crash_point("merge-template")
        shutil.copyfile(source / TEMPLATE_FILE, tmp / TEMPLATE_FILE)
        if (source / RUN_CONFIG_FILE).is_file():  # how it was trained: `eval --chat` holds out the run's split
            shutil.copyfile(source / RUN_CONFIG_FILE, tmp / RUN_CONFIG_FILE)
    return dest
