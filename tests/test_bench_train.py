"""`gpt1 bench train --quick`: gpt1 against transformers in fp32 and bf16 autocast, with the
honest FLOP rate and each side's peak memory; the reference side's import stays quiet."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gpt1.cli import main


@pytest.mark.slow
def test_bench_train_quick_reports_both_precisions_flops_and_memory(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert main(["bench", "train", "--quick", "--json", str(tmp_path / "bench.json")]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["train"]
    assert [row["precision"] for row in rows] == ["fp32", "bf16-mixed"]
    for row in rows:
        assert row["gpt1 tok/s"] > 0 and row["transformers tok/s"] > 0
        assert row["ratio"] == pytest.approx(row["gpt1 tok/s"] / row["transformers tok/s"])
        assert row["gpt1 TFLOP/s"] > 0 and row["gpt1 MFU"] is None  # no peak FLOPs for a CPU
        assert row["gpt1 peak GB"] > 0 and row["transformers peak GB"] > 0
        low, high = map(float, row["ratio range"].split("-"))  # each pair of steps' ratio: the row's noise
        assert 0 < low <= high
    assert "| gpt1 tok/s |" in capsys.readouterr().out


def test_the_transformers_reference_runs_the_same_fused_gelu_as_gpt1(tokenizer):
    """The reference was built with "gelu_new" (eight Python-level ops, three more tensors kept
    for the backward): most of gpt1's measured CPU lead. transformers' own fused kernel computes
    gpt1's function bit for bit; gpt1's exports name it too, so they run at its speed there."""
    pytest.importorskip("transformers")
    from transformers.activations import ACT2FN

    from gpt1.benchmarks.train import _hf_model
    from gpt1.core.config import ModelConfig
    from gpt1.formats.hf import hf_config_dict

    config = ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    x = torch.randn(4, 4096, generator=torch.Generator().manual_seed(0)) * 4
    ours = torch.nn.GELU(approximate="tanh")(x)
    torch.testing.assert_close(_hf_model(config).transformer.h[0].mlp.act(x), ours, rtol=0, atol=0)
    exported = ACT2FN[hf_config_dict(config, tokenizer)["activation_function"]]
    torch.testing.assert_close(exported(x), ours, rtol=0, atol=0)


@pytest.mark.slow
def test_a_childs_peak_memory_leaves_out_what_its_parent_held_before_starting_it():
    pytest.importorskip("transformers")
    import numpy as np

    from gpt1.benchmarks.train import peak_rss_gb

    ballast = np.ones(3 * 2**29, dtype=np.uint8)  # 1.5 GiB, every page touched: this process's peak
    del ballast
    # The child's own peak (torch, transformers, a tiny step: ~0.45 GiB), not the parent's
    # (ru_maxrss carries it into the child, across exec).
    assert 0.1 < peak_rss_gb("gpt1", "tiny", 1, 16, "fp32", steps=1) < 1.0


def test_the_benchmarks_reference_side_imports_without_torchaos_notices():
    """The newest releases of every dependency: torchao 0.18 beside torch 2.13 logs four lines at
    its import (two CUDA kernels it cannot load, two deprecated enum registrations), and
    transformers imports it where it is installed (gpt1[fp8], so gpt1[dev]): a benchmark's
    reference side printed them before its table, as float8 training had before it quieted them.
    (A fresh interpreter: the notices come at torchao's import, which this process may have done.)"""
    pytest.importorskip("torchao")
    pytest.importorskip("transformers")
    script = ("from gpt1.benchmarks.train import _hf_model\nfrom gpt1.core.config import ModelConfig\n"
              "_hf_model(ModelConfig.preset('tiny', n_layer=1))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Failed to load" not in done.stderr and "register_constant" not in done.stderr, done.stderr[-2000:]
