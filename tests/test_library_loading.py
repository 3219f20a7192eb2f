"""Loading a model in the library: what `gpt1.load` imports (not torch._dynamo), a seed that still
gives the weights it gave, a loaded model holding the file's weights as its own without a second
copy of them (the HF export's import too), and loading weights into a model already allocated."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt1.core.config import ModelConfig
from gpt1.core.model import GPT
from gpt1.formats.hf import export_model, import_hf_model
from gpt1.formats.modeldir import WEIGHTS_FILE, load_model, save_model
from tests.model_factories import finetuned_dir, random_model

# ---- gpt1.load does not import torch._dynamo ------------------------------------------------

def test_loading_a_model_does_not_import_torch_dynamo(tiny_model_dir, tiny_config, tokenizer, tmp_path):
    """nn.Embedding's own init ran normal_ on the meta device, where it imports torch._dynamo:
    1-2 s of every gpt1.load and `gpt1 info`, and TORCHINDUCTOR_CACHE_DIR set in the user's
    environment. A fine-tuned dir with trained token rows went through it again when merged."""
    chat = tmp_path / "chat"
    finetuned_dir(chat, tiny_config, tokenizer, seed=3)
    script = ("import os, sys, gpt1\n"
              "for d in sys.argv[1:]:\n"
              "    gpt1.load(d)\n"
              "    print('torch._dynamo' in sys.modules, 'TORCHINDUCTOR_CACHE_DIR' in os.environ)\n")
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    proc = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir), str(chat)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["False False", "False False"]


def test_a_seed_still_gives_the_weights_it_gave():
    """The embeddings skip their own init only on the meta device: elsewhere its draws from the
    RNG stay, so a seed gives the model it gave before (the numbers of gpt1 at afce909, torch's
    CPU generator) and leaves the RNG where it left it (a run's later draws: dropout, data order)."""
    config = ModelConfig.preset("tiny", vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(config)
    drawn = [model.transformer.wte.weight[0, 0], model.transformer.wpe.weight[0, 0],
             model.transformer.h[0].attn.c_attn.weight[0, 0], model.lm_head.weight[5, 5], torch.rand(1)[0]]
    assert [x.item() for x in drawn] == pytest.approx([0.002619, 0.029778, 0.017620, 0.036276, 0.702682], abs=1e-6)


# A child's peak memory so far, in KiB: VmHWM, its own (ru_maxrss starts at the RSS of the process
# that forked it, pytest's, which a child's peak may never pass).
PEAK_KIB = ("peak_kib = lambda: int(next(line for line in open('/proc/self/status') "
            "if line.startswith('VmHWM:')).split()[1]);")


# ---- loading without a second copy -----------------------------------------------------------------

def _same_weights(model, file) -> None:
    stored = load_file(str(file))
    state = model.state_dict()
    for name, tensor in stored.items():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], tensor.float()), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_loaded_model_holds_the_files_weights_as_its_own(tiny_config, tokenizer, tmp_path, dtype):
    """The same values (fp16 and bf16 files converted to float32), contiguous, tied heads tied; and
    its own memory: a file rewritten in place afterwards changes nothing (a view of the file's
    mapping would follow it, or kill the process if it were truncated)."""
    for tie in (False, True):
        config = dataclasses.replace(tiny_config, tie_embeddings=tie)
        directory = tmp_path / f"{dtype}-{tie}"
        save_model(directory, random_model(config, seed=1), tokenizer)
        file = directory / WEIGHTS_FILE
        if dtype != torch.float32:
            save_file({k: v.to(dtype) for k, v in load_file(str(file)).items()}, str(file), metadata={"format": "pt"})
        model = load_model(directory)
        _same_weights(model, file)
        assert all(p.is_contiguous() and p.device.type == "cpu" for p in model.parameters())
        assert (model.lm_head.weight is model.transformer.wte.weight) == tie
        before = {k: v.clone() for k, v in model.state_dict().items()}
        zeros = {k: torch.zeros_like(v) for k, v in load_file(str(file)).items()}
        save_file(zeros, str(tmp_path / "zeros.safetensors"), metadata={"format": "pt"})
        with open(file, "r+b") as f:  # in place: the same inode, as `cp` rewrites a file
            f.write((tmp_path / "zeros.safetensors").read_bytes())
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_hf_export_imports_with_the_same_weights(tiny_model_dir, tmp_path):
    """The export (its transposed matrices written from column-major weights, not copies) imports
    as the model it was made from, tensor for tensor, contiguous."""
    out = export_model(tiny_model_dir, tmp_path / "hf")
    imported, _ = import_hf_model(out)
    original = load_model(tiny_model_dir)
    assert all(p.is_contiguous() for p in imported.parameters())
    state = imported.state_dict()
    assert all(torch.equal(state[k], v) for k, v in original.state_dict().items())


def test_loading_holds_one_copy_of_the_weights(tmp_path):
    """Peak memory of a load, in a child: the model allocated, then the whole file read beside it,
    took twice the file's size; the model now takes the tensors read, one at a time."""
    if sys.platform != "linux":
        pytest.skip("/proc/self/status: Linux")
    config = ModelConfig(vocab_size=4096, block_size=64, n_layer=4, n_head=8, n_embd=768)
    save_model(tmp_path / "m", GPT(config))
    size = (tmp_path / "m" / WEIGHTS_FILE).stat().st_size
    code = (f"import sys, torch; from gpt1.formats.modeldir import load_model; {PEAK_KIB} "
            "before = peak_kib(); model = load_model(sys.argv[1]); print(peak_kib() - before)")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    peak = int(p.stdout) * 1024
    assert peak < 1.5 * size, f"loading a {size / 2**20:.0f} MiB file took {peak / 2**20:.0f} MiB"


def test_load_weights_into_an_allocated_model_keeps_its_ties_and_its_optimizers_parameters(tiny_config, tmp_path):
    """Second wave: load_weights took the file's tensors as the parameters of any model it was given
    (assign=True), so an allocated model's tied head kept its random weights and an optimizer made
    before held parameters no longer the model's. Only a model on the meta device takes them."""
    from gpt1.formats.modeldir import load_weights

    config = dataclasses.replace(tiny_config, tie_embeddings=True)
    saved = random_model(config, seed=3)
    save_model(tmp_path, saved, None)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters())
    load_weights(model, tmp_path / WEIGHTS_FILE)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, saved.transformer.wte.weight)
    held = optimizer.param_groups[0]["params"]
    assert all(any(p is q for q in held) for p in model.parameters())
