"""gpt1 in Jupyter: the progress bar as wide as the cell, and the quickstart notebook run on a
model of a short context."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from gpt1.core.config import ModelConfig
from gpt1.core.model import GPT
from gpt1.formats.modeldir import save_model

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"


def _run_notebook(notebook, cwd: Path) -> list[dict]:
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]


# ---- Jupyter: the progress bar, the notebook on a short context -----------------------------

def test_a_progress_bar_in_jupyter_is_as_wide_as_the_cell(monkeypatch, tmp_path):
    """A kernel's stderr is no terminal, so the log file's settings applied: tqdm.auto's widget
    was 100 px wide (ncols=100) and updated every 10 s (mininterval)."""
    monkeypatch.delenv("GPT1_QUIET", raising=False)  # the kernel inherits the environment: bars on
    cell = ("from gpt1.core.progress import progress\n"
            "bar = progress(range(3), desc='steps')\n"
            "for _ in bar: pass\n"
            "print(bar.container.layout.width, bar.mininterval)")
    outputs = _run_notebook(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell)]), tmp_path)
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert printed.split() == ["100%", "0.1"]


@pytest.mark.slow
def test_the_notebook_runs_on_a_model_of_16_tokens_of_context(tokenizer, monkeypatch, tmp_path):
    """The max-tokens slider went from 1 to block_size - 16: ipywidgets refused a maximum below
    its minimum ("setting max < min"), and the notebook stopped at its second cell."""
    torch.manual_seed(0)
    model_dir = save_model(tmp_path / "ctx16", GPT(ModelConfig.preset(
        "tiny", vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32)), tokenizer)
    monkeypatch.setenv("GPT1_MODEL", str(model_dir))
    outputs = _run_notebook(nbformat.read(NOTEBOOK, as_version=4), tmp_path)
    assert not [o for o in outputs if o.output_type == "error"]
    knobs = next(o for o in outputs if o.output_type == "execute_result" and "max_new_tokens" in o["data"]["text/plain"])
    assert "'max_new_tokens': 1" in knobs["data"]["text/plain"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook did not reach its curves"
