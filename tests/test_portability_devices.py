"""Devices this machine does not have, simulated: evaluation on a device without float64 (Apple's
MPS), bf16 judged per GPU on a machine of mixed CUDA GPUs, MPS on a macOS without bf16, `mps:N`.

No GPU or Mac here. A device without float64 is a tensor subclass that computes on the CPU, says
it is on "mps" and refuses float64 as MPS does (pytorch/pytorch#122602); the model's outputs are
put there by a forward hook, so every step after the forward runs as on a Mac. GPUs are torch.cuda's
device properties, monkeypatched: what torch reads to answer `get_device_capability`.
"""

from __future__ import annotations

import logging
import random
from types import SimpleNamespace

import pytest
import torch
from torch.utils._pytree import tree_map

from gpt1.cli import main
from gpt1.core import device as core_device
from gpt1.core.constants import IGNORE_INDEX
from gpt1.core.device import check_device_name, resolve_device
from gpt1.core.errors import Gpt1Error
from gpt1.inference.llm import resolve_dtype
from gpt1.train.evaluate import evaluate_loss
from gpt1.train.harness import Scorer
from gpt1.train.precision import resolve_precision
from tests.model_factories import random_model

MPS = torch.device("mps")


class OnMPS(torch.Tensor):
    """A CPU tensor that says it is on "mps": its ops run on the CPU, and one whose result would
    be float64 raises MPS's own TypeError. `.cpu()` gives back the plain CPU tensor."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                   storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                   device=MPS, requires_grad=elem.requires_grad)

    def __init__(self, elem: torch.Tensor):
        self.elem = elem

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*tree_map(lambda t: t.elem if isinstance(t, OnMPS) else t, args),
                   **tree_map(lambda t: t.elem if isinstance(t, OnMPS) else t, kwargs))
        if "device" in kwargs and torch.device(kwargs["device"]).type == "cpu":  # .cpu(), .to("cpu")
            return out

        def on_mps(t):
            if not isinstance(t, torch.Tensor):
                return t
            if t.dtype == torch.float64:
                raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support "
                                "float64. Please use float32 instead.")
            return OnMPS(t)
        return tree_map(on_mps, out)


@pytest.fixture
def model(tiny_config):
    return random_model(tiny_config, seed=11)


def outputs_on_mps(model):
    """Every forward of `model` returns its tensors on the simulated MPS device."""
    return model.register_forward_hook(
        lambda module, args, output: tree_map(lambda t: OnMPS(t) if isinstance(t, torch.Tensor) else t, output))


def test_the_simulated_mps_refuses_float64_as_mps_does():
    x = OnMPS(torch.ones(3))
    with pytest.raises(TypeError, match="doesn't support float64"):
        x.double()
    assert (x * 2).device.type == "mps" and type((x * 2).cpu()) is torch.Tensor


def test_validation_loss_on_a_device_without_float64_is_the_cpu_one(model, tiny_config):
    # Finding: evaluate_loss summed in a float64 tensor on the device (a TypeError on MPS, at
    # the first validation of every run on a Mac). The sum is the float64 one, to the bit.
    g = torch.Generator().manual_seed(0)
    batches = []
    for ignored in (0, 17, 64, 40):  # uneven target counts per batch, one with none
        x = torch.randint(0, tiny_config.vocab_size, (3, 64), generator=g)
        y = torch.randint(0, tiny_config.vocab_size, (3, 64), generator=g)
        y[:, :ignored] = IGNORE_INDEX
        batches.append((x, y))
    on_cpu = evaluate_loss(model, batches, torch.device("cpu"))
    hook = outputs_on_mps(model)
    try:
        on_mps = evaluate_loss(model, batches, torch.device("cpu"))
    finally:
        hook.remove()
    assert on_mps == on_cpu and on_cpu[1] == 3 * (64 + 47 + 24)


def test_benchmark_scores_on_a_device_without_float64_are_the_cpu_ones(model, tiny_config):
    # Finding: the harness summed the continuation's log-probabilities in float64 on the device.
    rng = random.Random(0)
    pairs = [([rng.randrange(tiny_config.vocab_size) for _ in range(rng.randint(1, 30))],
              [rng.randrange(tiny_config.vocab_size) for _ in range(rng.randint(1, 20))]) for _ in range(12)]
    on_cpu = Scorer(model, batch_size=5).score(pairs)
    hook = outputs_on_mps(model)
    try:
        on_mps = Scorer(model, batch_size=5).score(pairs)
    finally:
        hook.remove()
    assert on_mps == on_cpu


def _gpus(monkeypatch, *gpus: tuple[str, tuple[int, int]]) -> None:
    """A CUDA machine with these (name, compute capability) GPUs, GPU 0 current. A bf16 tensor
    can be made on each: pre-Ampere GPUs emulate bf16, which torch.cuda.is_bf16_supported()
    counts by default."""
    def properties(device):
        index = device.index if isinstance(device, torch.device) else device
        name, (major, minor) = gpus[index or 0]
        return SimpleNamespace(name=name, major=major, minor=minor)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)


T4, H100 = ("Tesla T4", (7, 5)), ("NVIDIA H100 80GB HBM3", (9, 0))


@pytest.mark.parametrize("machine", [(T4, H100), (H100, T4), (T4,)], ids=["T4+H100", "H100+T4", "T4"])
def test_bf16_is_judged_on_the_given_gpu_without_emulation(monkeypatch, caplog, machine):
    # Finding: --dtype auto asked torch.cuda.is_bf16_supported(), which says yes to a T4 (it
    # emulates bf16) and asks about GPU 0 whatever --device names; training asked GPU 0 too.
    _gpus(monkeypatch, *machine)
    for index, (name, capability) in enumerate(machine):
        gpu = resolve_device(f"cuda:{index}")
        if capability >= (8, 0):
            assert resolve_dtype("auto", gpu) is torch.bfloat16
            assert resolve_dtype("bfloat16", gpu) is torch.bfloat16
            assert resolve_precision("bf16-mixed", gpu) == "bf16-mixed"
            continue
        assert resolve_dtype("auto", gpu) is None  # the saved dtype (float32), as on a CPU
        assert resolve_dtype("float16", gpu) is torch.float16
        with pytest.raises(Gpt1Error, match=r"^dtype bfloat16: Tesla T4 \(compute capability 7\.5\) has no native "
                                            r"bfloat16, which needs 8\.0 \(Ampere\) or later; use float16 or float32$"):
            resolve_dtype("bfloat16", gpu)
        with caplog.at_level(logging.WARNING):
            assert resolve_precision("bf16-mixed", gpu) == "fp16-mixed"
        assert "Tesla T4 (compute capability 7.5) has no native bfloat16" in caplog.text
        caplog.clear()


def test_any_rocm_gpu_counts_as_bf16(monkeypatch):
    _gpus(monkeypatch, ("AMD Instinct MI100", (9, 0)))
    monkeypatch.setattr(torch.version, "hip", "6.2")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: pytest.fail("ROCm needs no capability"))
    assert core_device.bf16_supported(torch.device("cuda", 0))


@pytest.fixture
def mac(monkeypatch):
    """A Mac whose macOS is older than 14 (set `.sonoma = True` for 14 or later)."""
    state = SimpleNamespace(sonoma=False)
    monkeypatch.setattr(core_device, "_mps_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: state.sonoma and major <= 14)
    return state


def test_bf16_on_mps_before_macos_14_is_refused_or_falls_back(mac, caplog):
    # Finding: bf16 was checked on CUDA only; on MPS before macOS 14 it failed deep in torch.
    with pytest.raises(Gpt1Error, match="^dtype bfloat16: MPS has no bfloat16 before macOS 14"):
        resolve_dtype("bfloat16", MPS)
    assert resolve_dtype("auto", MPS) is None
    with caplog.at_level(logging.WARNING):
        assert resolve_precision("bf16-mixed", MPS) == "fp32"
    assert "training in fp32 instead of bf16-mixed" in caplog.text
    mac.sonoma = True
    assert resolve_dtype("bfloat16", MPS) is torch.bfloat16
    assert resolve_precision("bf16-mixed", MPS) == "bf16-mixed"


def test_generate_in_bf16_on_an_old_mac_is_one_line(mac, tiny_model_dir, capsys):
    rc = main(["generate", "--model", str(tiny_model_dir), "--prompt", "hi", "--device", "mps", "--dtype", "bfloat16"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "\n" not in err, err
    assert err.endswith("dtype bfloat16: MPS has no bfloat16 before macOS 14, which this Mac does not run; "
                        "use float16 or float32"), err


@pytest.mark.parametrize("name", ["mps:1", "mps:3"])
def test_an_mps_index_past_0_is_refused(mac, name):
    # Finding: torch accepts `mps:1`, which fails at the first tensor put there.
    with pytest.raises(Gpt1Error, match=f"^device: {name} does not exist: a Mac has one MPS device; use mps$"):
        check_device_name(name)
    with pytest.raises(Gpt1Error, match=f"^device: {name} does not exist"):
        resolve_device(name)
    check_device_name("mps:0")
    assert resolve_device("mps:0") == torch.device("mps", 0) and resolve_device("mps") == MPS
