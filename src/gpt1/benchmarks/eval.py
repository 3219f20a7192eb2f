"""Task scoring speed: `gpt1 eval --task hellaswag` against lm-evaluation-harness (HF backend) on
the same model (its `gpt1 export`), the same 200-example HellaSwag-schema local file, same run.

The documents are synthetic sentences with HellaSwag's shape (a ~40-word context, four ~20-word
endings); the model (512-token context) has random weights (speed does not depend on them) and a 4,096-token BPE
tokenizer trained on a few standard-library packages. Both sides run in this process with the same torch
threads, batch size 32 and fp32; each is timed from the documents to the metrics, after a short
warm-up, with the model already loaded (full: best of 2 interleaved runs). The rows also say whether both found the same acc and
acc_norm. The full run uses the `small` preset on a CPU and the reference model on a GPU; `quick`
uses the `tiny` preset.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

from gpt1.benchmarks import fixed_threads
from gpt1.core.config import ModelConfig
from gpt1.core.errors import Gpt1Error
from gpt1.core.imports import without_torchao_notices
from gpt1.core.model import GPT
from gpt1.core.tokenizer import train_tokenizer
from gpt1.data.sources import iter_documents, stdlib_files
from gpt1.formats.hf import export_model
from gpt1.formats.modeldir import save_model
from gpt1.inference.llm import LLM
from gpt1.train.harness import evaluate_task

# module -> what installs it, checked by `gpt1 bench` up front: the reference, and the export it reads
REQUIRES = {"lm_eval": "'lm-eval>=0.4.13,<0.5'", "transformers": "'gpt1[hf]'"}
EXAMPLES = 200
BATCH = 32
TOKENIZER_VOCAB = 4096  # what a few standard-library packages can teach
WORDS = ("the a man woman dog child team player chef river house road ball knife guitar water paint slowly quickly "
         "then and but while after before opens closes runs jumps cuts plays throws holds pours shows stands sits "
         "walks talks smiles looks turns grabs puts lifts small large red green old new bright quiet long short").split()


def hellaswag_docs(n: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rnd.choice(WORDS) for _ in range(k))

    return [{"ind": i, "activity_label": words(2).capitalize(), "ctx_a": words(rnd.randint(25, 45)) + ".",
             "ctx_b": words(rnd.randint(2, 6)), "ctx": "", "endings": [words(rnd.randint(12, 28)) + "." for _ in range(4)],
             "source_id": f"synthetic~{i}", "split": "val", "split_type": "indomain", "label": str(rnd.randrange(4))}
            for i in range(n)]


def _model_dir(preset: str, out: Path) -> Path:
    files = [f for f in stdlib_files() if "/json/" in f or "/email/" in f or "/logging/" in f]
    tokenizer, _ = train_tokenizer(iter_documents(files), TOKENIZER_VOCAB, show_progress=False)
    torch.manual_seed(0)
    # The preset's vocab (unused rows cost the output layer what a trained tokenizer's would), and
    # the reference model's 512-token context: it holds every prompt + ending, so neither side truncates.
    config = ModelConfig.preset(preset, block_size=512)
    return save_model(out, GPT(config), tokenizer)


def _lm_eval_task(folder: Path, data: Path) -> str:
    import lm_eval

    include = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"
    (folder / "bench_hellaswag.yaml").write_text(
        f"task: bench_hellaswag\ninclude: {include}\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\n    train: {data}\n")
    return "bench_hellaswag"


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """`os.environ` with `values` set while the block runs, then as it was: the settings are this
    benchmark's, and TOKENIZERS_PARALLELISM=false left behind halved a later `prepare`'s MB/s."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _check_lm_eval_version(found: str) -> None:
    """gpt1 scores as lm-eval 0.4.x does; 0.5 divides acc_norm by the ending's length with its
    leading space, so the rows' same_acc_as_lm_eval would say False for a definition's sake."""
    major, minor = (int(part) for part in re.findall(r"\d+", found)[:2])
    if (major, minor) >= (0, 5):
        raise Gpt1Error(f"bench eval compares with lm-eval 0.4.x, whose task definitions gpt1 eval follows; found "
                        f"lm-eval {found}, which computes acc_norm differently: pip install 'lm-eval>=0.4.13,<0.5'")


def run(quick: bool = False) -> list[dict]:
    # Offline: the data is a local file, the model a local export. Tokenizers single-threaded: the
    # setting the published rows were measured under, both sides alike.
    with _environment(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"), \
            fixed_threads() as threads:
        return [{**row, "torch_threads": threads} for row in _run(quick)]


def _run(quick: bool) -> list[dict]:
    with without_torchao_notices():
        import lm_eval

        _check_lm_eval_version(importlib.metadata.version("lm-eval"))
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = "tiny" if quick else "gpt1" if device.type == "cuda" else "small"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = _model_dir(preset, tmp / "model")
        export_dir = export_model(model_dir, tmp / "hf")
        data = tmp / "hellaswag.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in hellaswag_docs(EXAMPLES)))
        task = _lm_eval_task(tmp, data)
        manager = TaskManager(include_path=str(tmp))
        llm = LLM.load(model_dir, device=device, dtype="float32")  # as lm-eval's side (bf16 by default on a GPU)
        hf = HFLM(pretrained=str(export_dir), dtype="float32", batch_size=BATCH, device=str(device))

        def ours(limit=None):
            result = evaluate_task(llm, "hellaswag", source=str(data), limit=limit, batch_size=BATCH, show_progress=False)
            return {m: v for m, (v, _) in result.metrics.items()}

        def theirs(limit=None):
            out = lm_eval.simple_evaluate(model=hf, tasks=[task], task_manager=manager, limit=limit,
                                          bootstrap_iters=0, verbosity="ERROR")
            return {m: out["results"][task][f"{m},none"] for m in ("acc", "acc_norm")}

        ours(8), theirs(8)  # warm-up: kernels, allocator, dataset cache
        timed = {}
        for _ in range(1 if quick else 2):  # interleaved, best of each: a busy machine slows both alike
            for name, fn in (("gpt1 eval (shared-context KV cache)", ours), ("lm-eval HF backend", theirs)):
                start = time.perf_counter()
                metrics = fn()
                seconds = time.perf_counter() - start
                timed[name] = min(timed.get(name, (seconds, metrics)), (seconds, metrics), key=lambda t: t[0])
    reference = timed["lm-eval HF backend"]
    config = llm.model.config
    label = f"{preset} {config.n_layer}x{config.n_embd}, vocab {config.vocab_size} ({llm.model.num_params() / 1e6:.0f}M)"
    return [{"implementation": name, "model": label, "device": device.type, "examples": EXAMPLES,
             "examples_per_s": EXAMPLES / seconds, "speedup_vs_lm_eval": reference[0] / seconds,
             "acc": metrics["acc"], "acc_norm": metrics["acc_norm"],
             "same_acc_as_lm_eval": all(abs(metrics[m] - reference[1][m]) < 1e-9 for m in ("acc", "acc_norm"))}
            for name, (seconds, metrics) in timed.items()]
