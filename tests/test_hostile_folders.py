"""What a model folder from elsewhere (a git clone, a tar) can do to the person who loads it
(security pass 10): special files where gpt1 reads its small files, escape sequences in names it
quotes, a tokenizer that panics in Rust under the server, a block_size that sizes a huge KV cache,
and a metrics.jsonl that matplotlib cannot draw. The commands that could fill the memory or hang
run in a subprocess under a memory limit and a timeout, so that a regression fails the test
instead of the machine."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
import torch
from tokenizers import Regex, pre_tokenizers

import gpt1
from gpt1.core.errors import Gpt1Error
from gpt1.core.io import MAX_JSON_BYTES, read_json
from gpt1.core.progress import printable
from gpt1.core.sampling_params import SamplingParams
from gpt1.inference.engine import Engine, free_memory, kv_cache_bytes
from gpt1.inference.generate import generate
from gpt1.serve import background_server, create_app
from gpt1.train.plot import plot_metrics, read_metrics
from tests.model_factories import finetuned_dir
from tests.test_battery import assert_one_clear_line, run_main

GIB = 1 << 30


def gpt1_limited(*args: str, memory: int = 4 * GIB, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real command, under `ulimit -v` and a timeout: a read of /dev/zero fails in the child
    (a MemoryError traceback) instead of filling the machine, and a hang is a TimeoutExpired."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run([sys.executable, "-m", "gpt1", *args], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit, env={**os.environ, "GPT1_QUIET": "1"})


# ---- 1. special files where gpt1 reads a small file ----------------------------------------------
@pytest.fixture(scope="module")
def finetuned(tiny_config, tokenizer, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hostile") / "chat"
    finetuned_dir(directory, tiny_config, tokenizer, seed=3)
    return directory


@pytest.mark.parametrize("name, kind", [("adapter_config.json", "dev-zero"), ("adapter_config.json", "fifo"),
                                        ("adapter_model.safetensors", "fifo")])
def test_an_adapter_file_that_is_a_device_or_a_fifo_is_one_clear_line(finetuned, tmp_path, name, kind):
    """A link to /dev/zero read until the memory was gone (MemoryError, or the OOM killer), and a
    FIFO hung generate, chat, eval, serve and export forever: read_json read anything, whole, and
    safetensors opened whatever was there."""
    model = tmp_path / "m"
    shutil.copytree(finetuned, model)
    file = model / "adapter" / name
    file.unlink()
    if kind == "dev-zero":
        file.symlink_to("/dev/zero")
        expected = rf"adapter/{name}: a link to /dev/zero, a character device; expected a regular file$"
    else:
        os.mkfifo(file)
        expected = rf"adapter/{name}: a FIFO; expected a regular file$"
    run = gpt1_limited("generate", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "1", timeout=60)
    assert_one_clear_line(run.returncode, run.stderr, expected)


def test_a_lock_file_that_is_a_fifo_does_not_hang_the_load(finetuned, tmp_path):
    """A fine-tuned dir without adapter/ asks its checkpoints/.lock who is saving: a FIFO there
    blocked the open forever."""
    model = tmp_path / "m"
    shutil.copytree(finetuned, model)
    shutil.rmtree(model / "adapter")
    (model / "checkpoints").mkdir(exist_ok=True)
    os.mkfifo(model / "checkpoints" / ".lock")
    run = gpt1_limited("generate", "--model", str(model), "--prompt", "hi", timeout=60)
    assert_one_clear_line(run.returncode, run.stderr, r"without its adapter/ folder")


def test_read_json_refuses_what_no_json_file_of_gpt1_is(tmp_path):
    """An oversized file is refused from its size alone (a sparse one here: nothing is read);
    a number of 5,000 digits (ValueError) and 100,000 open brackets (RecursionError) were tracebacks."""
    big = tmp_path / "config.json"
    with open(big, "wb") as f:
        f.truncate(MAX_JSON_BYTES + 1)
    with pytest.raises(Gpt1Error, match=rf"config.json: larger than {MAX_JSON_BYTES:,} bytes, the most gpt1 reads"):
        read_json(big)
    big.write_text('{"n_layer": ' + "9" * 5000 + "}")
    with pytest.raises(Gpt1Error, match=r"config.json: invalid JSON: a number of more than 4,300 digits$"):
        read_json(big)
    big.write_text("[" * 100_000)
    with pytest.raises(Gpt1Error, match=r"config.json: invalid JSON: nested too deeply$"):
        read_json(big)
    with pytest.raises(Gpt1Error, match=r": is a folder; expected a file$"):
        read_json(tmp_path)
    linked = tmp_path / "linked.json"
    linked.symlink_to(big.name)  # a link to a regular file is fine
    big.write_text('{"a": 1}')
    assert read_json(linked) == {"a": 1}


# ---- 2. control characters in what gpt1 prints ---------------------------------------------------
EVIL = "\x1b]52;c;Y3VybCBodHRwOi8vZXZpbC5leGFtcGxlL3ggfCBzaA==\x07\x1b[2K\r\x1b[1A\x9b8m"


def test_printable_escapes_control_characters_but_newline_and_tab():
    assert printable(f"a{EVIL}\tb\nc é€") == ("a\\x1b]52;c;Y3VybCBodHRwOi8vZXZpbC5leGFtcGxlL3ggfCBzaA==\\x07"
                                              "\\x1b[2K\\r\\x1b[1A\\x9b8m\tb\nc é€")


def test_an_error_quoting_a_hostile_config_json_has_no_raw_control_characters(tiny_model_dir, tmp_path, capsys):
    """config.json's unknown field names went to the terminal raw: an OSC 52 sequence set the
    user's clipboard to a shell command, CR and ESC[1A rewrote the line above."""
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, EVIL: 1}))
    rc, err = run_main(capsys, "info", model)
    line = assert_one_clear_line(rc, err, r"unknown model config field\(s\) \\x1b\]52;c;")
    assert not any(ord(c) < 32 or 0x7f <= ord(c) <= 0x9f for c in line), ascii(line)


def test_a_warning_quoting_a_hostile_name_has_no_raw_control_characters(tmp_path, capsys):
    """Warnings and notes (the gpt1 logger's lines on stderr) quote paths and names from
    elsewhere too: here a run folder's name, from a tar."""
    run = tmp_path / f"run{EVIL}"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.5}\n')
    rc, err = run_main(capsys, "plot", run, "--out", tmp_path / "loss.png")
    assert rc == 0, err
    assert "skipped 1 line" in err and "run\\x1b]52;c;" in err
    assert not any(ord(c) < 32 and c not in "\n\t" or 0x7f <= ord(c) <= 0x9f for c in err), ascii(err)


# ---- 3. a tokenizer that panics in Rust, under the server ---------------------------------------
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_rust_panic_in_the_tokenizer_is_an_openai_500(tiny_model_dir, path):
    """pyo3's PanicException is a BaseException, which the app's Exception handler let by: the
    client got a plain-text 500 ("Internal Server Error"), not OpenAI's error body. The pattern
    (a+)+$ hits oniguruma's backtracking limit on 40 a's and a '!', and the Rust side panics."""
    llm = gpt1.load(tiny_model_dir, device="cpu")
    backend = llm.tokenizer.backend
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("(a+)+$"), "isolated"),
                                                     backend.pre_tokenizer])
    text = "a" * 40 + "!"
    body = {"prompt": text} if path == "/v1/completions" else {"messages": [{"role": "user", "content": text}]}
    with background_server(create_app(llm, max_batch=1)) as url:
        for stream in (False, True):
            response = httpx.post(url + path, json={**body, "max_tokens": 2, "stream": stream}, timeout=60)
            assert response.status_code == 500, response.text
            assert response.headers["content-type"] == "application/json"
            error = response.json()["error"]
            assert error["type"] == "server_error" and "PanicException" in error["message"], error
        assert httpx.get(url + "/health", timeout=30).status_code == 200  # the server goes on
        ok = httpx.post(url + path, json={**body, **({"prompt": "hello"} if "prompt" in body else
                                                     {"messages": [{"role": "user", "content": "hello"}]}),
                                          "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200, ok.text


# ---- 4. a KV cache over the memory the process may use -------------------------------------------
ENGINE_UNDER_A_LIMIT = textwrap.dedent("""
    import json, resource, sys
    from gpt1.core.config import ModelConfig
    from gpt1.core.errors import Gpt1Error
    from gpt1.core.model import GPT
    from gpt1.core.tokenizer import Tokenizer
    from gpt1.inference.engine import Engine, kv_cache_bytes

    tokenizer = Tokenizer.load(sys.argv[1])
    # A tiny model whose config.json says block_size 2^20: 256 MiB of KV cache.
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=1 << 20, n_layer=8, n_head=1, n_embd=4)
    model = GPT(config).eval()
    kv = kv_cache_bytes(model, 1)

    def vm_size() -> int:
        status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
        return int(status["VmSize"].split()[0]) * 1024

    outcomes = []
    # Room for half the cache: refused by the check, before any allocation. Then room for the
    # cache but not its token table: the check passes and the allocation fails.
    for room in (kv // 2, kv + (2 << 20)):
        limit = vm_size() + room
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
        try:
            Engine(model, tokenizer, max_batch=1, tune_threads=False)
            outcomes.append("built")
        except Gpt1Error as e:
            outcomes.append(str(e))
        except BaseException as e:
            outcomes.append(f"{type(e).__name__}: {e}")
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    print(json.dumps(outcomes))
""")


def test_a_kv_cache_over_the_process_memory_limit_is_one_clear_error(tokenizer_dir):
    """The check read MemAvailable only, which ignores `ulimit -v` (and a container's cgroup
    limit): the allocation then failed with the CPU allocator's RuntimeError ("can't allocate
    memory"), a traceback, which the engine did not catch (only CUDA's OutOfMemoryError)."""
    # One thread: an OpenMP pool started under the limit could not make its threads' stacks.
    run = subprocess.run([sys.executable, "-c", ENGINE_UNDER_A_LIMIT, str(tokenizer_dir)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    refused, failed = json.loads(run.stdout.splitlines()[-1])
    assert refused.startswith("max_batch 1: the KV cache needs 0.25 GiB (1 x 1,048,576 positions, the model's "
                              "block_size) but only 0.12 GiB is free on cpu; lower max_batch"), refused
    assert failed.startswith("max_batch 1: out of memory allocating the KV cache (0.25 GiB, 1 x 1,048,576 "
                             "positions, the model's block_size) on cpu; lower max_batch"), failed


def test_free_memory_counts_the_process_limits():
    """`ulimit -v` (RLIMIT_AS) bounds what the process can allocate whatever MemAvailable says."""
    script = ("import resource, torch; from gpt1.inference.engine import free_memory; "
              "resource.setrlimit(resource.RLIMIT_AS, (8 << 30, resource.RLIM_INFINITY)); "
              "print(free_memory(torch.device('cpu')))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert 0 < int(run.stdout) < 8 << 30
    assert free_memory(torch.device("cpu")) > 0


def test_an_engine_sized_to_its_prompts_generates_the_same(tiny_model_dir):
    """A one-shot engine (`generate`) needs a prompt plus max_new_tokens positions per slot, not
    block_size: a config.json's block_size of 16M zeroed an 8 GiB cache for one token."""
    llm = gpt1.load(tiny_model_dir, device="cpu")
    ids = llm.tokenizer.encode("import json")
    greedy = SamplingParams(temperature=0, max_new_tokens=6)

    def run(engine: Engine, params: SamplingParams) -> list[int]:
        requests = engine.submit([ids], params, lambda i: lambda chunk: None)
        while engine.busy:
            engine.step()
        return requests[0].state.token_ids

    small = Engine(llm.model, llm.tokenizer, max_batch=1, tune_threads=False, max_len=len(ids) + 6)
    assert small.kv_bytes == kv_cache_bytes(llm.model, 1) * (len(ids) + 6) // llm.config.block_size
    assert run(small, greedy) == generate(llm.model, llm.tokenizer, ids, greedy).token_ids
    penalised = SamplingParams(temperature=0, max_new_tokens=6, repeat_penalty=1.3, repeat_last_n=-1)
    full = Engine(llm.model, llm.tokenizer, max_batch=1, tune_threads=False)
    assert run(small, penalised) == run(full, penalised)
    with pytest.raises(Gpt1Error, match=r"^prompt: \d+ tokens plus max_new_tokens \(7\) need \d+ positions, but this "
                                        r"engine's slots hold \d+ \(its max_len\)$"):
        small.submit([ids], SamplingParams(temperature=0, max_new_tokens=7), lambda i: lambda chunk: None)
    with pytest.raises(Gpt1Error, match=r"^engine: max_len must be an int from 1 to the block_size \(64\), got 65$"):
        Engine(llm.model, llm.tokenizer, max_len=65)


# ---- 5. gpt1 plot on lines matplotlib cannot draw ------------------------------------------------
def test_plot_skips_numbers_no_run_logs(tmp_path, caplog):
    """Each of these lines was a traceback: a 5,000-digit step (json's ValueError), a 400-digit
    step (matplotlib's OverflowError), a loss of 1e308 beside -1e308 (its tick locator's
    ValueError); 100,000 open brackets a RecursionError."""
    run = tmp_path / "run"
    run.mkdir()
    lines = ['{"step": 1, "loss": 2.0}', '{"step": ' + "9" * 5000 + ', "loss": 1.0}',
             '{"step": ' + "9" * 400 + ', "loss": 1.0}', '{"step": 2, "loss": 1e308}', '{"step": 3, "loss": -1e308}',
             '{"step": 4, "loss": 1.0, "val_loss": -0.5}', "[" * 100_000, '{"step": -1, "loss": 1.0}',
             '{"step": 5, "loss": 1.5, "val_loss": 1.7}']
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 5]
    assert "skipped 7 lines" in caplog.text and "(lines 2, 3, 4, 5, 6, ...)" in caplog.text
    out = plot_metrics(run / "metrics.jsonl", tmp_path / "loss.png")
    assert out.stat().st_size > 1000


def test_plot_draws_the_largest_loss_a_run_can_log(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0, "loss": 0}\n{"step": 9223372036854775807, "loss": 1e39}\n')
    assert len(read_metrics(run / "metrics.jsonl")) == 2
    assert plot_metrics(run / "metrics.jsonl", tmp_path / "loss.png").stat().st_size > 1000


def test_generate_sizes_its_cache_to_its_prompts(tiny_model_dir, monkeypatch):
    """`generate` (and generate_batch, llm.generate) build an engine whose slots hold the prompt
    plus max_new_tokens, not the model's whole context."""
    import gpt1.inference.generate as generate_module

    built = []

    class Recorded(Engine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self.max_len)

    llm = gpt1.load(tiny_model_dir, device="cpu")
    prompts = [llm.tokenizer.encode("import json"), llm.tokenizer.encode("x")]
    greedy = SamplingParams(temperature=0, max_new_tokens=5)
    expected = generate_module.generate_batch(llm.model, llm.tokenizer, prompts, greedy)
    monkeypatch.setattr(generate_module, "Engine", Recorded)
    assert generate_module.generate_batch(llm.model, llm.tokenizer, prompts, greedy) == expected
    assert built == [max(map(len, prompts)) + 5] and built[0] < llm.config.block_size
