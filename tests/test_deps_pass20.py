"""Findings of the dependency-floors round (pass 20): what a broken optional piece must not take down."""

from __future__ import annotations

import json

from gpt1.quickstart import _plot


def test_the_quickstarts_curves_are_a_by_product(tmp_path, caplog):
    """matplotlib 3.7 beside numpy 2 fails to import: the quickstart's last stage ended in a
    traceback after both models were written, and its samples were never printed. A plot that
    cannot be drawn is a warning (as each run's own loss.png is)."""
    for run in ("base", "chat"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": 5.0 - s / 10, "lr": 1e-3}) + "\n" for s in range(1, 6)))
    assert _plot(tmp_path) == tmp_path / "loss.png" and (tmp_path / "loss.png").stat().st_size > 0
    (tmp_path / "loss.png").unlink()
    (tmp_path / "loss.png").mkdir()  # something in the way: plot_runs raises
    assert _plot(tmp_path) is None
    assert any("loss.png not drawn (" in r.getMessage()
               and f"`gpt1 plot {tmp_path / 'base'} {tmp_path / 'chat'}` draws it" in r.getMessage() for r in caplog.records)
