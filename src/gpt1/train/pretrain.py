"""Pretraining: prepared shards + a `TrainConfig` -> a trained base model in a run dir.

`pretrain(cfg, data_dir, out)` builds the model (`init_from`), the window batch source over
`train.bin` (in `data_order`; a resumed run in its checkpoint's: `resumed_window_order`), the
fixed validation batches from `val.bin`, and runs the shared loop
(`gpt1.train.loop.train`). The model's vocabulary is the tokenizer stored with the shards
(`DATA/tokenizer.json`); its fingerprint must match `meta.json`, and a model from `init_from`
must use the same tokenizer. The run dir records the data's identity (`data_identity`): a
resume on other data is refused; and, for information, the data folder and how it was prepared
(`data_source`, with each start and resume). A run from the weights of a gpt1 run on the same data
with the same seed (`init_from=RUN`, the way to train on past a run's end) draws the windows after
the ones that run drew, as one longer run would, not the same ones again (`continued_windows`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from gpt1.core.config import ModelConfig
from gpt1.core.errors import Gpt1Error
from gpt1.core.fingerprints import sample_fingerprint
from gpt1.core.model import GPT, CausalSelfAttention
from gpt1.core.paths import as_path, json_path
from gpt1.core.progress import info, warn
from gpt1.core.reading import read_json
from gpt1.core.rng import host_rng_kept
from gpt1.core.tokenizer import Tokenizer
from gpt1.data.shards import PreparedData, check_fingerprint
from gpt1.data.windows import WINDOW_ORDERS, ShardWindows, fixed_windows, sequences_drawn
from gpt1.formats.hf import import_hf_model
from gpt1.formats.modeldir import load_model
from gpt1.formats.modeldir import save_model as save_model_dir
from gpt1.train import checkpoint as ckpt
from gpt1.train import distributed
from gpt1.train.config import TrainConfig, require_config
from gpt1.train.loop import TrainResult, step_cap_words, train
from gpt1.train.run_record import CONFIG_FILE as RUN_CONFIG_FILE


def init_model(cfg: TrainConfig, tokenizer: Tokenizer) -> GPT:
    """The model to train, on CPU: a fresh preset, a gpt1 model dir, or a local transformers GPT-2;
    at the dropout rate `cfg.dropout` (-1: the model's own)."""
    if cfg.init_from == "scratch":
        shape = {name: getattr(cfg, name) for name in ("block_size", "n_layer", "n_head", "n_embd")}
        overrides = {"vocab_size": tokenizer.vocab_size, **{name: value for name, value in shape.items() if value},
                     **({"dropout": cfg.dropout} if cfg.dropout >= 0 else {})}
        config = ModelConfig.preset(cfg.model, **overrides)
        torch.manual_seed(cfg.seed)
        return GPT(config)
    foreign_ids = False  # a GPT-2 import without a gpt1 tokenizer: its embeddings learned other strings' ids
    if cfg.init_from.startswith("hf:"):

        model, hf_tokenizer = import_hf_model(cfg.init_from[3:], "cpu")
        if hf_tokenizer is not None and hf_tokenizer.fingerprint != tokenizer.fingerprint:
            raise Gpt1Error(f"init_from={cfg.init_from}: its tokenizer ({hf_tokenizer.fingerprint}) is not the "
                            f"tokenizer of the data ({tokenizer.fingerprint}); prepare the data with it")
        foreign_ids = hf_tokenizer is None
    else:

        model = load_model(cfg.init_from, device="cpu")
        check_fingerprint({"tokenizer": {"fingerprint": tokenizer.fingerprint}}, Tokenizer.load(cfg.init_from),
                          f"init_from={cfg.init_from}")
    if model.config.vocab_size != tokenizer.vocab_size:
        raise Gpt1Error(f"init_from={cfg.init_from}: the model has {model.config.vocab_size:,} token embeddings, "
                        f"the data's tokenizer {tokenizer.vocab_size:,}")
    _check_shape_matches(cfg, model.config)
    if foreign_ids:  # accepted for its blocks (docs/interop.md), but never without a word
        warn(f"init_from={cfg.init_from} has no gpt1 tokenizer: the data's token ids name other strings than its "
             "embeddings and head learned; only the blocks carry over (docs/interop.md)")
    if cfg.dropout >= 0:
        set_dropout(model, cfg.dropout)
    return model.train()


def set_dropout(model: GPT, rate: float) -> None:
    """Train `model` at dropout `rate`: its config (config.json records it) and every dropout layer
    of its own, attention's included. A LoRA layer's dropout is the adapter's (`lora_dropout`): kept."""
    model.config.dropout = float(rate)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and not name.endswith("lora_dropout"):
            module.p = float(rate)
        elif isinstance(module, CausalSelfAttention):  # a rate, passed to scaled_dot_product_attention
            module.dropout = float(rate)


def _check_shape_matches(cfg: TrainConfig, loaded: ModelConfig) -> None:
    """init_from decides the model: n_layer, n_head and n_embd, where set, must be its own (set to
    the same values, they are accepted), and so must the shape of a `model` preset (set by hand or by
    the recipe), which was silently ignored. The default preset is not a choice: not compared."""
    def describe(c: ModelConfig) -> str:
        return f"{c.n_layer} layers x {c.n_embd} wide, {c.n_head} heads"

    shape = ("n_layer", "n_head", "n_embd")
    if wrong := [name for name in shape if getattr(cfg, name) and getattr(cfg, name) != getattr(loaded, name)]:
        raise Gpt1Error(f"{', '.join(f'{name}={getattr(cfg, name)}' for name in wrong)}: init_from={cfg.init_from} "
                        f"is {describe(loaded)}, and init_from decides the model; leave "
                        f"{' and '.join(wrong)} out, or set {', '.join(f'{n}={getattr(loaded, n)}' for n in wrong)}")
    if cfg.model == TrainConfig.model:
        return
    preset = ModelConfig.preset(cfg.model)
    if any(getattr(preset, name) != getattr(loaded, name) for name in shape):
        raise Gpt1Error(f"model={cfg.model} ({describe(preset)}) is not the model of init_from={cfg.init_from} "
                        f"({describe(loaded)}): init_from decides the model; set model to match it or leave it out")


# What every data record holds (`data_identity`); the shards' fingerprints came later (2026-12-06).
_COUNTED = ("train_tokens", "train_documents", "val_tokens", "val_documents", "tokenizer")


def data_identity(data: PreparedData) -> dict:
    """What tells prepared data apart (recorded in the run dir, checked on resume): its token and
    document counts and tokenizer, and a cheap check of each shard's content (`sample_fingerprint`,
    under the shard's file name), not its path, so that a moved data folder still resumes."""
    meta = data.meta
    return {"train_tokens": meta["train"]["tokens"], "train_documents": meta["train"].get("documents"),
            "val_tokens": meta["val"]["tokens"], "val_documents": meta["val"].get("documents"),
            "tokenizer": meta["tokenizer"]["fingerprint"],
            **{path.name: sample_fingerprint(path) for path in (data.train_path, data.val_path)}}


def continued_windows(cfg: TrainConfig, out: Path, identity: dict) -> dict | None:
    """Where a fresh run from `init_from`'s weights starts drawing windows, where that is a gpt1 run
    that trained on the data of `identity` with the same seed: after the windows it drew (`run`: its
    path, `sequences`: how many), read from its latest checkpoint, as the rest of one longer run.
    From the first window, it drew that run's windows again in the same order (every window is a
    function of the seed and its number). A run recorded by an older gpt1, without its shards'
    fingerprints (before 2026-12-06), is taken at what it records, with a warning. None otherwise
    (another data or seed, a model dir without checkpoints, a resume: its checkpoint holds where its
    windows are)."""
    parent = Path(cfg.init_from)
    if cfg.init_from == "scratch" or cfg.init_from.startswith("hf:") or ckpt.latest_checkpoint(out) is not None:
        return None
    try:
        record = read_json(parent / RUN_CONFIG_FILE) if (parent / RUN_CONFIG_FILE).is_file() else None
    except Gpt1Error:  # a damaged record: a model dir like any other
        return None
    config, recorded = (record.get("config"), record.get("data")) if isinstance(record, dict) else (None, None)
    if (not isinstance(config, dict) or not isinstance(recorded, dict) or config.get("seed") != cfg.seed
            or any(recorded[key] != identity.get(key) for key in recorded)):
        return None
    sampler, world_size, batch_size = ckpt.saved_sampler(parent), record.get("world_size", 1), config.get("batch_size")
    # Windows in another order, or an epoch's windows of another length, are not the ones this run's
    # stream begins with: skipping as many would leave the first of its own epoch out, and the pass
    # it counts would not be one. Such a run starts its own order at its first window.
    parent_order = sampler.get("order", "random") if isinstance(sampler, dict) else None
    if parent_order is not None and (parent_order != cfg.data_order or (
            cfg.data_order == "epochs" and config.get("block_size") != cfg.block_size)):
        info(f"windows: init_from={cfg.init_from} drew its windows in the {parent_order!r} order"
             + (f" of {config.get('block_size')}-token windows" if parent_order == cfg.data_order else "")
             + f"; this run's {cfg.data_order!r} order starts at its first window")
        return None
    try:
        drawn = sequences_drawn(sampler, batch_size, world_size) if sampler is not None else 0
    except (KeyError, TypeError, ValueError):  # not a pretraining run's sampler, or damaged
        return None
    if unrecorded := [key for key in identity if key not in recorded]:
        # Nothing to tell the data by, or to go on from; or no record of the number of processes
        # (before 2026-12-05 12:05): a 2-process parent's draws counted as 1 process's skipped half its windows.
        if any(key in _COUNTED for key in unrecorded) or drawn == 0 or "world_size" not in record:
            return None
        # Going on is safe either way: on the same shards it skips the windows the run drew, on
        # others of the same counts and tokenizer the windows after them are as new as the first.
        # (Drawn from the first, an older run's continuation trained on its batches again, unsaid.)
        warn(f"init_from={cfg.init_from} was recorded by an older gpt1, without {' and '.join(unrecorded)} "
             f"fingerprints: its token and document counts and tokenizer match this data's, so this run draws the "
             f"windows after the {drawn:,} it drew (were its shards others of the same counts, those windows are "
             "as new to the model as the first ones)")
    # "checked": false where the data is not known to be the parent's (no fingerprints to compare)
    return ({"run": json_path(parent.resolve()), "sequences": drawn, **({"checked": False} if unrecorded else {})}
            if drawn > 0 else None)


def resumed_window_order(out: Path) -> str | None:
    """The order of the windows of the checkpoint a run in `out` resumes from: its sampler state's
    "order", or "random" where it has none (saved by a gpt1 that had no other, or in that order);
    None for a fresh run, or a checkpoint this gpt1 cannot read (the loop says why, in its words)."""
    latest = ckpt.latest_checkpoint(out)
    if latest is None:
        return None
    try:
        # mmap: the optimizer's state beside it (2 GB for the 257M model) is not read
        sampler = torch.load(latest / ckpt.STATE_FILE, map_location="cpu", weights_only=True, mmap=True)["sampler"]
    except Exception:  # unreadable, damaged, not a dict
        return None
    order = sampler.get("order", "random") if isinstance(sampler, dict) else None
    return order if order in WINDOW_ORDERS else None


def _recorded_without(out: Path, key: str) -> bool:
    """Whether the run in `out` was begun by a gpt1 without the config key `key` (its record lacks it)."""
    try:
        record = read_json(out / RUN_CONFIG_FILE) if (out / RUN_CONFIG_FILE).is_file() else None
    except Gpt1Error:  # a damaged record: the loop refuses it with its own words
        return False
    return isinstance(record, dict) and isinstance(record.get("config"), dict) and key not in record["config"]


def data_source(data: PreparedData) -> dict:
    """Where the data came from, for information (never compared: a moved folder resumes): the
    folder, and meta.json's preparation key (sources, their files' hash, seed, val share, ...)."""
    return {"path": json_path(data.folder.resolve()), **({"key": data.meta["key"]} if "key" in data.meta else {})}


@host_rng_kept()  # the run seeds the global RNGs (a resume restores them): the caller's come back after
def pretrain(cfg: TrainConfig, data_dir: str | Path, out: str | Path, *, redo_hint: str | None = None) -> TrainResult:
    """Pretrain on `data_dir` (made by `gpt1 prepare`) into the run dir `out`; resumes a run there
    (`redo_hint`: what to do instead when `out` holds another run, see `gpt1.train.loop.train`).
    The caller's RNG states are as they were afterwards (`gpt1.core.rng`)."""
    cfg = require_config(cfg, TrainConfig)  # checked again: a field may have been set after construction
    data_dir, out = as_path(data_dir, "data_dir", "a prepared data dir"), as_path(out, "out", "a run dir")
    dist = distributed.setup(cfg.device)
    data = PreparedData.open(data_dir)
    tokenizer, meta = data.tokenizer, data.meta
    run_tokenizer = out / "tokenizer.json"
    if run_tokenizer.is_file():
        data.check_tokenizer(Tokenizer.load(run_tokenizer), f"the run dir {out}")
    model = init_model(cfg, tokenizer)
    block_size = cfg.block_size or model.config.block_size
    if block_size > model.config.block_size:
        raise Gpt1Error(f"block_size {block_size} is longer than the model's context ({model.config.block_size})")
    identity = data_identity(data)
    continues = continued_windows(cfg, out, identity)
    # A resume goes on with its checkpoint's windows: a run begun before data_order (2026-12-07) with
    # its random ones, where the new default would have switched it to epochs mid-run.
    resumed, asked = resumed_window_order(out), cfg.data_order
    order = resumed or asked
    older_run = resumed is not None and _recorded_without(out, "data_order")
    if older_run:
        # `run_record` compares the key its record lacks at today's default: the config goes on with
        # that whatever data_order says, as the windows are the run's own (data_order=random, its
        # very order, was refused as a change from it).
        cfg = dataclasses.replace(cfg, data_order=TrainConfig.data_order)
    train_data = ShardWindows(data.train_path, block_size, cfg.batch_size, cfg.seed,
                              rank=dist.rank, world_size=dist.world_size, vocab_size=tokenizer.vocab_size,
                              start=continues["sequences"] if continues else 0, order=order)
    val = fixed_windows(data.val_path, block_size, cfg.batch_size, cfg.eval_batches,
                        vocab_size=tokenizer.vocab_size)
    tokens_per_step = cfg.batch_size * block_size * cfg.grad_accum * dist.world_size
    max_steps = cfg.resolve_steps(tokens_per_step, train_data.epoch_tokens)
    # max_steps > 0 decides the length: a max_tokens or epochs set beside the default max_steps=1000 did nothing, unsaid.
    unused = [f"{k}={getattr(cfg, k):g}" for k in ("max_tokens", "epochs") if cfg.max_steps and getattr(cfg, k)]
    at_most, sooner = step_cap_words(cfg)
    dropout = f", dropout {model.config.dropout:g}" if model.config.dropout else ""
    # Logged by the loop once it has checked the run dir: a refused resume does not read as a run that started.
    announce = [f"model: {model.num_params():,} parameters ({cfg.model if cfg.init_from == 'scratch' else cfg.init_from}"
                f"{dropout}); {at_most}{max_steps:,} steps x {tokens_per_step:,} tokens = "
                f"{max_steps * tokens_per_step / train_data.epoch_tokens:.2f} epochs of "
                + (f"{train_data.epoch_windows:,} windows ({meta['train']['tokens']:,} train tokens)" if order == "epochs"
                   else f"{meta['train']['tokens']:,} train tokens, windows drawn at random")
                + f"; {dist.world_size} process(es){sooner}"
                + (f"; max_steps={cfg.max_steps:,} decides the length, not {' or '.join(unused)} (set max_steps=0 for "
                   "those)" if unused else "")]
    if len(val) < cfg.eval_batches:
        announce.append(f"validation: {len(val)} batches, all that {meta['val']['file']} holds without overlap "
                        f"(eval_batches={cfg.eval_batches:,})")
    if older_run and asked != order:
        announce.append(f"windows: {out} began before gpt1 had data_order: it resumes with its own, drawn at random "
                        f"(data_order={order}); to go on in epochs, train on from its weights: --out NEW "
                        f"init_from={out}")
    if continues:
        # Its windows begin at a whole draw of every rank (`ShardWindows`): after the parent's, or a
        # little further where the parent's batches were of another size.
        first = sequences_drawn(train_data.state_dict(), cfg.batch_size, dist.world_size)
        per_draw = cfg.batch_size * dist.world_size
        checked = continues.get("checked", True)
        announce.append(f"windows: init_from={cfg.init_from} drew {continues['sequences']:,} windows of "
                        f"{'this data' if checked else 'data of these counts'} with seed {cfg.seed}; this run draws "
                        "the ones after them"
                        + ((", as one longer run would" if checked else "") if first == continues["sequences"] else
                           f", from window {first:,} (a whole number of its batches of {per_draw:,})"))

    def save_model(directory: Path, m: torch.nn.Module) -> None:
        save_model_dir(directory, m, tokenizer)

    try:
        return train(model, cfg, out, train_data, lambda: val, save_model, max_steps=max_steps,
                     data=identity, data_source=data_source(data), redo_hint=redo_hint,
                     announce=announce, continues=continues)
    finally:
        distributed.cleanup()

