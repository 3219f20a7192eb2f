"""Pass 24, the newest releases of every dependency: torchao 0.18 beside torch 2.13 logs four
lines at its import (two CUDA kernels it cannot load, two deprecated enum registrations), and
transformers imports it where it is installed (gpt1[fp8], so gpt1[dev]): a benchmark's reference
side printed them before its table, as float8 training had before it quieted them."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_the_benchmarks_reference_side_imports_without_torchaos_notices():
    pytest.importorskip("torchao")
    pytest.importorskip("transformers")
    script = ("from gpt1.benchmarks.train import _hf_model\nfrom gpt1.core.config import ModelConfig\n"
              "_hf_model(ModelConfig.preset('tiny', n_layer=1))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Failed to load" not in done.stderr and "register_constant" not in done.stderr, done.stderr[-2000:]
