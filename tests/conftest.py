"""Shared fixtures: a small real corpus (Python's own json/email/collections packages), a
tokenizer trained on it, and a tiny random-weight model dir. Session-scoped: built once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt1.core.chat_template import JINJA_TEMPLATE, TEMPLATE_FILE
from gpt1.core.config import ModelConfig
from gpt1.core.model import GPT
from gpt1.core.tokenizer import train_tokenizer
from gpt1.data.shards import prepare
from gpt1.data.sources import iter_documents
from gpt1.formats.modeldir import save_model

os.environ.setdefault("GPT1_QUIET", "1")  # no progress bars in test output
# Subprocesses (the CLI, killed runs) compute on this process's thread count too: tests compare their
# numbers with in-process runs bit for bit, and another count can sum a matmul in another order.
if not os.environ.get("OMP_NUM_THREADS", "").isdigit():
    os.environ["OMP_NUM_THREADS"] = str(min(2, os.cpu_count() or 1))
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

STDLIB = Path(os.__file__).parent
TEST_VOCAB = 512


@pytest.fixture(scope="session", autouse=True)
def _caches_of_the_session(tmp_path_factory):
    """The files libraries write for themselves go under the session's temp folder: `datasets`'
    cache (gpt1's streaming reads and the lm-eval tests left ~600 lock files and ~300 builder
    folders in ~/.cache/huggingface, and a stale one there was read back), and the temp folders of
    the subprocesses (each torchrun left a torchelastic_* folder in /tmp). This process's own temp
    folder is pytest's choice, made before (gettempdir caches it)."""
    folder = tmp_path_factory.mktemp("caches")
    saved = {name: os.environ.get(name) for name in ("HF_DATASETS_CACHE", "TMPDIR")}
    (folder / "tmp").mkdir()
    os.environ.update(HF_DATASETS_CACHE=str(folder / "hf-datasets"), TMPDIR=str(folder / "tmp"))
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def gpt1_warnings():
    """The warnings the gpt1 logger emits (a handler of its own: the CLI's console handler, once
    installed in this process, stops them reaching pytest's caplog until the test ends)."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("gpt1")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.fixture(autouse=True)
def _gpt1_logger_as_it_was():
    """`main()` (called in-process by many tests) sets up the console: the `gpt1` logger stops
    propagating and gets a handler. Before pytest 9.1, caplog listens at the root logger only, so
    every later test's caplog saw nothing from gpt1: the logger is put back after each test."""
    import logging

    logger = logging.getLogger("gpt1")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """~1 MB of real text: a few standard-library packages copied to a temp dir."""
    out = tmp_path_factory.mktemp("corpus")
    for package in ("json", "email", "collections", "logging"):
        shutil.copytree(STDLIB / package, out / package, ignore=shutil.ignore_patterns("__pycache__"))
    return out


@pytest.fixture(scope="session")
def tokenizer(corpus_dir):
    tok, _ = train_tokenizer(iter_documents([str(corpus_dir)]), TEST_VOCAB, show_progress=False)
    return tok


@pytest.fixture(scope="session")
def tokenizer_dir(tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save(out)
    return out


@pytest.fixture(scope="session")
def data_dir(corpus_dir, tokenizer, tmp_path_factory) -> Path:
    """The corpus as training shards (train.bin, val.bin with 8 documents held out)."""
    out = tmp_path_factory.mktemp("shards")
    prepare([str(corpus_dir)], tokenizer, out, val=8)
    return out


@pytest.fixture(scope="session")
def tiny_config():
    return ModelConfig.preset("tiny", vocab_size=TEST_VOCAB, block_size=64, n_layer=2, n_head=4, n_embd=64)


@pytest.fixture(scope="session")
def chat_dir(tiny_config, tokenizer, tmp_path_factory) -> Path:
    """A chat model dir (random weights, seed 5) with gpt1's chat template, for the export tests."""
    from tests.model_factories import random_model

    directory = tmp_path_factory.mktemp("chat-template") / "chat"
    save_model(directory, random_model(tiny_config, seed=5), tokenizer)
    (directory / TEMPLATE_FILE).write_text(JINJA_TEMPLATE)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_config, tokenizer, tmp_path_factory) -> Path:
    """A model dir with random weights (seeded): config.json, model.safetensors, tokenizer.json."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-model")
    save_model(out, GPT(tiny_config), tokenizer)
    return out


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    """tiny_model_dir loaded on the CPU, once per test module: each module's engine and KV cache its own."""
    import gpt1

    return gpt1.load(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def compile_fallback_run(data_dir, tmp_path_factory):
    """`gpt1 pretrain compile=true` (3 steps of tests/test_train.py's TINY) where Inductor's C++
    build fails for real (no compiler): (the finished process, its run dir, its step overrides).
    One run read by two tests (the warning and the losses; the run record): ~10 s each on 2 cores."""
    from tests.test_train import TINY

    tmp = tmp_path_factory.mktemp("compile-fallback")
    env = {**os.environ, "CXX": str(tmp / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp / "cache"),
           "GPT1_QUIET": "1"}
    steps = ["max_steps=3", "save_every=3", "eval_every=3"]
    proc = subprocess.run([sys.executable, "-m", "gpt1", "pretrain", "--data", str(data_dir), "--out", str(tmp / "run"),
                           *TINY, *steps, "compile=true"], capture_output=True, text=True, timeout=600, env=env)
    return proc, tmp / "run", steps


@pytest.fixture
def stop_training_at(monkeypatch):
    """`stop_training_at(n, error)`: the n-th forward-backward of training from now on raises
    `error`, as a kill in the middle of a run (its earlier checkpoints saved) would stop it.
    `monkeypatch.undo()` lets the next run train on."""
    import gpt1.train.loop as loop

    def arm(n: int, error: type[BaseException]) -> None:
        real, calls = loop._loss_and_backward, []

        def stopping(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise error
            return real(*args, **kwargs)

        monkeypatch.setattr(loop, "_loss_and_backward", stopping)

    return arm


@pytest.fixture(scope="module")
def browser():
    """A real headless Chromium (Playwright drives it) for the chat page's tests, one per module."""
    from tests.test_serve_page import CHROMIUM, CHROMIUM_ARGS

    playwright_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: install it (apt-get install chromium) or set GPT1_CHROMIUM")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def learnt_one_thread(monkeypatch):
    """Two threads, the tuner on (no OMP_NUM_THREADS), and the shared tuner as if it had found
    one thread faster (a busy neighbour): every step runs on one thread; everything put back
    afterwards. Yields the shared tuner."""
    from gpt1.core import threads as threads_module

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads_module.forget_shared()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tuner = threads_module.cpu_thread_tuner("cpu", shared=True)
        tuner.threads = 1
        yield tuner
    finally:
        torch.set_num_threads(before)
        threads_module.forget_shared()
