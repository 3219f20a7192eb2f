"""What type checkers and help() see: the annotations of the Python API accept what the docs pass
(streams, paths, sequences, betas, LoRA targets), and GPT.forward is typed per call."""

from __future__ import annotations

import pydoc
import typing

import pytest
import torch

from gpt1 import GPT
from gpt1.core.errors import Gpt1Error
from gpt1.train.config import TrainConfig
from gpt1.train.finetune import FinetuneConfig


def test_annotations_accept_what_the_docs_do_with_streams_paths_and_sequences():
    """A stream annotated Iterator made the documented `s.close()` (and contextlib.closing) a type
    error; ModelConfig.save/load refused an os.PathLike, encode_batch a tuple: all run."""
    import collections.abc
    import typing

    import gpt1.inference.generate as gen
    from gpt1.core.config import ModelConfig
    from gpt1.core.tokenizer import Tokenizer
    from gpt1.inference.llm import LLM
    from tests.test_library_api import _fits, _PathLike

    for function in (gen.stream, gen.stream_batch, LLM.stream, LLM.chat_stream):
        assert typing.get_origin(typing.get_type_hints(function)["return"]) is collections.abc.Generator
    for function in (ModelConfig.save, ModelConfig.load):
        assert _fits(function, "path", _PathLike())
    assert _fits(Tokenizer.encode_batch, "texts", ("a", "b"))


def test_forward_is_typed_per_call_and_gpt_has_its_own_docstring():
    import gpt1.core.model as model_module

    returns = [typing.get_type_hints(f, vars(model_module))["return"] for f in typing.get_overloads(GPT.forward)]
    assert returns == [torch.Tensor, tuple[None, torch.Tensor]]  # model(x): logits; model(x, y): (None, loss)
    text = pydoc.render_doc(GPT)
    assert "model(idx)" in text and "Base class for all neural network modules" not in text.split("Method resolution")[0]


def test_the_annotations_of_betas_and_lora_targets_take_the_lists_the_docs_pass():
    from collections.abc import Sequence

    assert typing.get_type_hints(TrainConfig)["betas"] == Sequence[float]  # what a type checker reads
    assert typing.get_type_hints(FinetuneConfig)["lora_targets"] == Sequence[str]
    assert TrainConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)  # stored as the tuple, checked as one
    assert FinetuneConfig(lora_targets=["q", "v"]).lora_targets == ("q", "v")
    with pytest.raises(Gpt1Error, match=r"key 'betas' expects tuple\[float, float\], got \[0.9\]"):
        TrainConfig(betas=[0.9])
