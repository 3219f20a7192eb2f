"""Loss and perplexity curves of a training run (`metrics.jsonl`) as a PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

from gpt1.core.errors import Gpt1Error
from gpt1.core.io import atomic_path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl (a line cut short by a kill is skipped)."""
    path = Path(path)
    if not path.is_file():
        raise Gpt1Error(f"{path}: metrics file not found (is this a training run dir?)")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_metrics(metrics_file: str | Path, out: str | Path, title: str | None = None) -> Path:
    """Plot train and validation loss (left) and validation perplexity (right) to the PNG `out`."""
    return plot_runs({title or "": metrics_file}, out)


def plot_runs(runs: dict[str, str | Path], out: str | Path) -> Path:
    """One row per run (title -> metrics.jsonl): loss curves on the left, validation perplexity
    on the right; written atomically to the PNG `out`."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (servers, CI)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 4 * len(runs)), squeeze=False)
    for (title, metrics_file), (ax_loss, ax_ppl) in zip(runs.items(), axes):
        records = read_metrics(metrics_file)
        train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
        if not train and not val:
            raise Gpt1Error(f"{metrics_file}: no loss values to plot yet")
        if train:
            ax_loss.plot(*zip(*train), label="train loss", linewidth=0.8, alpha=0.8)
        if val:
            ax_loss.plot(*zip(*val), "o-", label="val loss", markersize=3)
            ax_ppl.plot([s for s, _ in val], [math.exp(min(v, 700)) for _, v in val], "o-", color="C1", markersize=3)
            ax_ppl.set_yscale("log")
        prefix = f"{title}: " if title else ""
        ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title=f"{prefix}loss")
        ax_loss.legend()
        ax_loss.grid(alpha=0.3)
        ax_ppl.set(xlabel="step", ylabel="perplexity", title=f"{prefix}validation perplexity")
        ax_ppl.grid(alpha=0.3, which="both")
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out
