"""A caller's torch settings do not leak into gpt1: generating inside the caller's bfloat16
autocast runs in the model's dtype, a float64 default dtype changes neither seeded text nor the
dtype a model (a gpt1 dir or a Hugging Face folder) loads in."""

from __future__ import annotations

import pytest
import torch

import gpt1


@pytest.fixture
def one_thread_count(monkeypatch):
    """The tuner off (OMP_NUM_THREADS fixes the count): same seed, same text (docs/generation.md)."""
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))


def test_generation_inside_a_callers_bfloat16_autocast_runs_in_the_models_dtype(tiny_model_dir, one_thread_count):
    """A training script's eval callback, a notebook cell under autocast: the forward's bfloat16 keys
    and values failed to go into the float32 KV cache ("Index put requires the source and
    destination dtypes match"). transformers' generate works there; so does gpt1's, in float32."""
    llm = gpt1.load(tiny_model_dir, device="cpu")
    knobs = dict(temperature=0, max_new_tokens=8)
    expected = llm.generate("def", **knobs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert llm.generate("def", **knobs) == expected
        assert "".join(llm.stream("def", **knobs)) == expected


def test_a_callers_float64_default_dtype_leaves_seeded_text_as_it_was(tiny_model_dir, one_thread_count):
    """Each sampled row's uniform number was drawn in torch's default dtype: float64 draws other
    numbers from the same seeded generator, so other text."""
    llm = gpt1.load(tiny_model_dir, device="cpu")
    knobs = dict(temperature=1.0, seed=7, max_new_tokens=24)
    expected = llm.generate("def", **knobs)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = llm.generate("def", **knobs)
    finally:
        torch.set_default_dtype(before)
    assert got == expected


def test_a_model_loaded_under_a_float64_default_dtype_is_float32(tiny_model_dir):
    """The model was built in torch's default dtype and its float32 weights copied into it: a
    float64 model (twice the memory, other text) where LLM.load documents float32 on a CPU."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        llm = gpt1.load(tiny_model_dir, device="cpu")
    finally:
        torch.set_default_dtype(before)
    assert llm.dtype == torch.float32
    assert {p.dtype for p in llm.model.parameters()} == {torch.float32}


def test_a_hugging_face_folder_loaded_under_a_float64_default_dtype_is_float32(tiny_model_dir, tmp_path):
    from gpt1.cli import main

    assert main(["export", "--model", str(tiny_model_dir), "--out", str(tmp_path / "hf")]) == 0
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        llm = gpt1.load(tmp_path / "hf", device="cpu")
    finally:
        torch.set_default_dtype(before)
    assert {p.dtype for p in llm.model.parameters()} == {torch.float32}
