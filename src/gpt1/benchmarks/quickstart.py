"""The five-minute model: the quickstart's pretraining against the recipe it replaced, side by side.

Both configurations train from scratch on the Python standard library's source (the
quickstart's corpus) for the same time budget, one after the other in this run, each with its
own tokenizer, and are scored on the same held-out documents (the validation split picks
documents by a hash of their index, whatever the tokenizer; each scores them in whole context
windows, so up to a window's bytes at the end differ) by held-out **bits per byte**, which does
not depend on the tokenizer. `vs_before` is the ratio of bits per byte (issue 15's
target: <= 0.75, a 25% reduction).

- `before`: `tiny-cpu` as shipped until 2026-11-27 (the `tiny` preset, 4,096-token vocabulary,
  fp32 eager, batch 16 x 128, lr 2e-3, AdamW), frozen here so the comparison stays put when the
  shipped recipe moves; given the same time budget.
- `after`: what `gpt1 quickstart` trains now (`gpt1.quickstart.pretrain_config`).

The full run uses the quickstart's default budget (5 minutes each, ~12 minutes in all); `quick`
30 seconds each. Run it on an otherwise idle machine: the budget is wall time.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import gpt1
from gpt1.core.config import ModelConfig
from gpt1.core.progress import info
from gpt1.data.prepare import prepare
from gpt1.quickstart import QUICKSTART_VAL, QuickstartConfig, pretrain_config, train_corpus_tokenizer
from gpt1.train.config import TrainConfig
from gpt1.train.evaluate import evaluate_data
from gpt1.train.pretrain import pretrain

BEFORE_VOCAB = 4096
BEFORE = TrainConfig(
    model="tiny", block_size=128, batch_size=16, grad_accum=1, lr=2e-3, min_lr=1e-4, warmup=0.05,
    weight_decay=0.0, betas=(0.9, 0.95), grad_clip=1.0, precision="fp32", compile=False,
    eval_every=100, eval_batches=8, save_every=100, seed=1337, device="cpu")


def run(quick: bool = False) -> list[dict]:
    return compare(0.5 if quick else QuickstartConfig.minutes)


def compare(minutes: float) -> list[dict]:
    """Train `before` and `after` for `minutes` each, one after the other; a row per configuration."""
    qs = QuickstartConfig(minutes=minutes, device="cpu")
    budget = 60 * minutes
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gpt1-bench-quickstart-") as tmp:
        data: dict[int, tuple[Path, dict]] = {}  # vocab -> prepared data (shared when the vocabularies agree)
        for name, vocab in (("before", BEFORE_VOCAB), ("after", qs.vocab_size)):
            if vocab not in data:
                work = Path(tmp) / f"vocab{vocab}"
                tokenizer = train_corpus_tokenizer(qs.corpus, vocab, work / "tokenizer")
                data[vocab] = (work / "data", prepare([qs.corpus], tokenizer, work / "data", val=QUICKSTART_VAL,
                                                      seed=qs.seed, skip_invalid=True))
            data_dir, meta = data[vocab]
            if name == "before":
                train_cfg = dataclasses.replace(BEFORE, max_steps=1_000_000, time_budget=budget)
            else:
                train_cfg = pretrain_config(qs, meta["train"]["tokens"], budget)
            info(f"\n== {name}: {budget:g} s of pretraining")
            start = time.perf_counter()
            result = pretrain(train_cfg, data_dir, Path(tmp) / name)
            seconds = time.perf_counter() - start
            scores = evaluate_data(gpt1.load(result.run_dir, device="cpu"), [str(data_dir)], batch_size=16,
                                   show_progress=False)
            rows.append({
                "config": name, "vocab": vocab, "model": _shape(result.run_dir), "precision": train_cfg.precision,
                "compile": train_cfg.compile, "optimizer": train_cfg.optimizer, "batch": train_cfg.batch_size, "lr": train_cfg.lr,
                "budget_s": budget, "train_s": seconds, "steps": result.steps, "tokens": result.tokens,
                "val_documents": meta["val"]["documents"], "val_bytes": scores.bytes,
                "val_perplexity": scores.perplexity, "val_bits_per_byte": scores.bits_per_byte,
            })
    before = rows[0]["val_bits_per_byte"]
    for row in rows:
        row["vs_before"] = row["val_bits_per_byte"] / before
    return rows


def _shape(run_dir: Path) -> str:
    config = ModelConfig.load(run_dir / "config.json")
    return f"{config.n_layer}x{config.n_embd}, ctx {config.block_size}"
