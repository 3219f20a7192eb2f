"""The operating system's limits on a command (pass 13, /tmp/explore/t13_limits): `ulimit -v`
(address space), `ulimit -n` (open files), a thread that cannot start, and a stderr that cannot be
written (`ulimit -f`). Each runs the real command or the real glibc in a child process under a
real rlimit: the limits are per process, and a regression must fail the child, not this one."""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gpt1.cli import main
from gpt1.core.errors import Gpt1Error
from gpt1.core.io import read_bytes
from tests.test_battery import assert_one_clear_line, run_main

MIB = 1 << 20

# A child's first lines: what it imports before its limit is set, and its address space now.
PRELUDE = """
import json, os, resource, sys
def address_space():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
def limit_address_space(headroom):
    resource.setrlimit(resource.RLIMIT_AS, (address_space() + headroom, resource.RLIM_INFINITY))
"""


def child(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=120, env={**(os.environ if env is None else env), "GPT1_QUIET": "1"})


# ---- finding 2: a small JSON file takes a small buffer; Python's MemoryError is one line ------------

def test_a_small_json_file_is_read_under_a_tight_address_space_limit(tiny_model_dir):
    """read_bytes read every JSON file with f.read(64 MiB + 1), which allocates all 64 MiB first:
    a 265-byte config.json failed with a MemoryError under `ulimit -v` (every model load did)."""
    run = child("""
        from gpt1.core.io import read_json
        limit_address_space(32 << 20)
        print(json.dumps([read_json(sys.argv[1]) for _ in range(3)][0]))
    """, str(tiny_model_dir / "config.json"))
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["n_layer"] == 2


def test_a_file_longer_than_its_size_says_is_read_whole_and_still_bounded():
    """/proc's files say 0 bytes: read on past the stat's size, and past the limit refused."""
    status = read_bytes("/proc/self/status", 1 << 20)
    assert b"VmSize:" in status and len(status) > 200
    with pytest.raises(Gpt1Error, match=r"/proc/self/status: larger than 100 bytes, the most gpt1 reads"):
        read_bytes("/proc/self/status", 100)


def test_a_memory_error_is_the_one_out_of_memory_line(tiny_model_dir, tmp_path):
    """Python's own MemoryError (an import, a file read under `ulimit -v`) was a traceback, exit 1;
    torch's allocator's was already the out-of-memory line. Here a config.json of 60 MB (valid JSON,
    under read_json's 64 MiB) is read with 64 MiB of address space left."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = model / "config.json"
    config.write_text(" " * (60 * MIB) + config.read_text())
    run = child("""
        import torch
        import gpt1.cli, gpt1.cli.generate_cmd, gpt1.inference.generate, gpt1.inference.decoding, gpt1.inference.llm
        limit_address_space(64 << 20)
        sys.exit(gpt1.cli.main(["generate", "--model", sys.argv[1], "--prompt", "hi"]))
    """, str(model))
    assert_one_clear_line(run.returncode, run.stderr,
                          r"^gpt1 generate: error: out of memory: an allocation failed; raise the address-space limit "
                          r"\(ulimit -v, now \d+\) or use a machine with more free memory$")


# ---- finding 3: too many open files, a thread that cannot start -------------------------------------

def test_too_many_open_files_is_one_line_naming_ulimit_n(tokenizer_dir, corpus_dir, tmp_path):
    """EMFILE was re-raised by the CLI (a traceback: prepare at `ulimit -n 5` failed opening its
    val.bin.partial). The child runs prepare with 1, 2, ... descriptors free until it succeeds:
    each failure must be one line, and those from a file gpt1 opens name the limit to raise."""
    run = child("""
        import contextlib, io, traceback
        import torch
        import gpt1.cli, gpt1.cli.prepare_cmd, gpt1.data.shards
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        results = []
        for free in range(1, 12):
            lowest = os.dup(0)  # the lowest free descriptor: the limit counts from it
            os.close(lowest)
            stderr = io.StringIO()
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest + free, hard))
            try:
                with contextlib.redirect_stderr(stderr):
                    rc = gpt1.cli.main(["prepare", "--tokenizer", sys.argv[1], "--val", "2",
                                        "--out", f"{sys.argv[3]}/d{free}", sys.argv[2]])
            except BaseException:
                rc, stderr = 1, io.StringIO(traceback.format_exc())
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            results.append({"free": free, "limit": lowest + free, "rc": rc, "stderr": stderr.getvalue()})
            if rc == 0:
                break
        print(json.dumps(results))
    """, str(tokenizer_dir), str(corpus_dir), str(tmp_path))
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout.splitlines()[-1])
    assert results[-1]["rc"] == 0, results  # enough descriptors: prepare works
    failures = results[:-1]
    for failure in failures:
        assert_one_clear_line(failure["rc"], failure["stderr"], r"\(Too many open files\)")
    named = [f for f in failures if f"raise the open-file limit (ulimit -n, now {f['limit']})" in f["stderr"]]
    assert named, failures


def test_a_json_file_that_cannot_be_opened_for_want_of_descriptors_names_the_limit(tiny_model_dir):
    run = child("""
        from gpt1.core.errors import Gpt1Error
        from gpt1.core.io import read_json
        lowest = os.dup(0)  # the lowest free descriptor: with the limit there, the next open fails
        os.close(lowest)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        try:
            read_json(sys.argv[1])
        except Gpt1Error as e:
            print(json.dumps({"error": str(e), "limit": lowest}))
    """, str(tiny_model_dir / "config.json"))
    result = json.loads(run.stdout)
    assert result["error"] == (f"{tiny_model_dir / 'config.json'}: cannot read (Too many open files); "
                               f"raise the open-file limit (ulimit -n, now {result['limit']})")


def test_a_thread_that_cannot_start_is_one_line_naming_the_limits(corpus_dir, tmp_path):
    """Python's RuntimeError "can't start new thread" (`ulimit -u`, a container's pids limit)
    was a traceback. Made real here without those limits, which do not bind root: each thread's
    stack is `ulimit -s` (8 GiB) of address space, and `ulimit -v` is 4 GiB."""
    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_STACK, (8 << 30, resource.RLIM_INFINITY))
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    run = subprocess.run([sys.executable, "-m", "gpt1", "tokenizer", "train", "--vocab-size", "300",
                          "--out", str(tmp_path / "tok"), str(corpus_dir / "json")], capture_output=True, text=True,
                         timeout=120, preexec_fn=limits, env={**os.environ, "GPT1_QUIET": "1"})
    assert_one_clear_line(run.returncode, run.stderr,
                          r"^gpt1 tokenizer train: error: cannot start a thread \(can't start new thread\); raise the "
                          r"limit on processes and threads \(ulimit -u.*\) or the container's pids limit, or the "
                          r"address-space limit each thread's stack takes from \(ulimit -v 4194304\)$")


# ---- finding 7: glibc's arenas under `ulimit -v` ---------------------------------------------------

ARENAS_CHILD = """
import threading
from gpt1.core.malloc import fit_arenas_to_address_limit
limit_address_space(512 << 20)
cap = fit_arenas_to_address_limit() if sys.argv[1] == "cap" else None
if sys.argv[1] == "cli":  # what every command does first, before it parses its arguments
    import contextlib, io, gpt1.cli
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
        gpt1.cli.main(["--version"])
threading.stack_size(256 << 10)
# 32 threads alive at once: each one's first malloc (its thread state) takes an arena of its own,
# 64 MiB of address space, up to glibc's cap (8 per core by default).
started = threading.Barrier(33)
before = address_space()
threads = [threading.Thread(target=started.wait) for _ in range(32)]
for thread in threads:
    thread.start()
started.wait()
threads_mib = (address_space() - before) >> 20  # their arenas, and 8 MiB of stacks
for thread in threads:
    thread.join()
try:
    buffer = bytearray(256 << 20)
    fits = True
except MemoryError:
    fits = False
print(json.dumps({"cap": cap, "threads_mib": threads_mib, "fits": fits}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's arenas")
def test_arenas_are_capped_under_an_address_space_limit():
    """Each thread's arena reserved 64 MiB of a `ulimit -v`: prepare's threads (the tokenizers')
    took it all, and Rust's allocator aborted ("memory allocation of 1 bytes failed", exit 134)."""
    environment = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX" and k != "GLIBC_TUNABLES"}
    capped = child(ARENAS_CHILD, "cap", env=environment)
    assert capped.returncode == 0, capped.stderr
    result = json.loads(capped.stdout)
    assert result["cap"] == 2 and result["threads_mib"] <= 64 + 8 and result["fits"], result
    uncapped = json.loads(child(ARENAS_CHILD, "default", env=environment).stdout)
    assert not uncapped["fits"], uncapped  # glibc's default (8 arenas per core): what the cap is for
    by_the_cli = json.loads(child(ARENAS_CHILD, "cli", env=environment).stdout)
    assert by_the_cli["threads_mib"] <= 64 + 8 and by_the_cli["fits"], by_the_cli
    with_environment = child(ARENAS_CHILD, "cap", env={**environment, "MALLOC_ARENA_MAX": "4"})
    assert json.loads(with_environment.stdout)["cap"] is None  # the environment's choice wins


# ---- finding 8: the last line cannot be written -----------------------------------------------------

STDERR_LIMIT = 4096


def _stderr_at_its_limit(path: Path) -> None:
    path.write_bytes(b"x" * STDERR_LIMIT)


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (STDERR_LIMIT, STDERR_LIMIT))


def _catches_sigterm(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as status:
        caught = int(next(line for line in status if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.parametrize("ending", ["sigterm", "error"])
def test_a_stderr_that_cannot_be_written_keeps_the_exit_status(tmp_path, ending):
    """stderr into a log at its `ulimit -f` (or a full disk): the final line's print raised
    (EFBIG), and SIGTERM's status 143 became 1 (a supervisor recorded a failure), an error's 2
    became 1 too."""
    log = tmp_path / "log"
    _stderr_at_its_limit(log)
    args = ["generate", "--model", str(tmp_path / "nowhere")]  # the prompt from stdin: it waits there
    if ending == "error":
        args += ["--prompt", "hi"]
    with open(log, "ab") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "gpt1", *args], stdin=subprocess.PIPE,
                                   stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=_limit_file_size,
                                   env={**os.environ, "GPT1_QUIET": "1"})
    try:
        if ending == "sigterm":
            deadline = time.monotonic() + 60
            while not _catches_sigterm(process.pid) and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
        rc = process.wait(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert rc == (128 + signal.SIGTERM if ending == "sigterm" else 2)
    assert log.stat().st_size == STDERR_LIMIT


def test_an_unseeded_request_needs_no_file_descriptor():
    """An unseeded request's generator was seeded by torch's `Generator.seed()`, which opens
    /dev/urandom: with the descriptors taken (a burst of clients under `ulimit -n`) every unseeded
    request was a 500 "Unable to open /dev/urandom"."""
    script = textwrap.dedent("""
        import resource
        from gpt1.inference.engine import _generator
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        held = []
        try:
            while True:
                held.append(open("/dev/null"))
        except OSError:
            pass
        draws = {_generator(None).initial_seed() for _ in range(8)}
        print(len(draws))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 1  # still a fresh seed each time


# ---- pass 17: one rule for "out of memory", shared by the CLI, the server and the engine ----------

WINDOWS_CPU_REFUSAL = "[enforce fail at alloc_cpu.cpp:116] data. DefaultCPUAllocator: not enough memory: " \
                      "you tried to allocate 1099511627776 bytes."

MPS_REFUSAL = "MPS backend out of memory (MPS allocated: 17.36 GB, other allocations: 1.02 GB, max allowed: " \
              "18.13 GB). Tried to allocate 192.00 MB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 " \
              "to disable upper limit for memory allocations (may cause system failure)."


def test_every_wording_of_a_refused_allocation_is_a_memory_shortage():
    """The CLI, the server and the engine each had their own rule: the CLI and the server missed the
    Windows allocator's wording (a traceback, a 500), and the engine took any RuntimeError that
    mentions "alloc" for a KV cache that did not fit."""
    import torch

    from gpt1.core.errors import memory_shortage
    from gpt1.serve.errors import resource_shortage
    with pytest.raises(RuntimeError) as refused:  # this machine's allocator, for real
        torch.empty(2**60, dtype=torch.uint8)
    for error in (refused.value, RuntimeError(WINDOWS_CPU_REFUSAL), MemoryError()):
        assert memory_shortage(error) == "memory" and resource_shortage(error) == "memory"
    assert memory_shortage(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) == "GPU memory"
    # pass 18: a Mac's, which torch's MPS allocator raises as a plain RuntimeError (a traceback, a 500)
    assert memory_shortage(RuntimeError(MPS_REFUSAL)) == "GPU memory" == resource_shortage(RuntimeError(MPS_REFUSAL))
    for error in (RuntimeError("mmap: shared-memory allocator handle is invalid"), ValueError("can't allocate memory")):
        assert memory_shortage(error) is None and resource_shortage(error) is None


def test_the_windows_allocators_refusal_is_the_one_out_of_memory_line(tiny_model_dir):
    """A refusal in the Windows allocator's words, raised where the model's weights are loaded."""
    run = child(f"""
        import torch, gpt1.cli
        def refuse(*args, **kwargs):
            raise RuntimeError({WINDOWS_CPU_REFUSAL!r})
        torch.nn.Module.load_state_dict = refuse
        sys.exit(gpt1.cli.main(["generate", "--model", sys.argv[1], "--prompt", "hi"]))
    """, str(tiny_model_dir))
    assert_one_clear_line(run.returncode, run.stderr,
                          r"^gpt1 generate: error: out of memory: an allocation of 1024.00 GiB failed; .*$")


# The kernel's 15 bytes of a process name, cut in the middle of a character.

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc are Linux's")

# The child names itself as a script "ааааааааа.py" run by its shebang is named: the kernel keeps
# 15 bytes of the name, which cuts its eighth "а" (2 bytes in UTF-8) in half.
CUT_NAME_CHILD = """
import ctypes, sys
ctypes.CDLL(None).prctl(15, ctypes.c_char_p(("а" * 9).encode()), 0, 0, 0)  # PR_SET_NAME
with open("/proc/self/comm", "rb") as f:
    comm = f.read()
try:
    comm.decode()
    sys.exit("the process name is valid UTF-8: nothing tested")
except UnicodeDecodeError:
    pass
import gpt1, torch
from gpt1.inference.engine import free_memory
assert free_memory(torch.device("cpu")) > 0  # what an engine with a cache to check reads
llm = gpt1.load(sys.argv[1], device="cpu")
print(repr(llm.chat([{"role": "user", "content": "hi"}], max_new_tokens=3, temperature=0)))
"""


@linux_only
def test_the_engine_runs_under_a_process_name_cut_in_the_middle_of_a_character(chat_dir):
    """free_memory read /proc/self/status (whose `Name:` is the process name) as UTF-8 text:
    every Engine, so llm.chat, `gpt1 generate/chat/serve`, failed with a UnicodeDecodeError."""
    out = subprocess.run([sys.executable, "-c", CUT_NAME_CHILD, str(chat_dir)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONWARNINGS": "error::ResourceWarning"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("'") and "Traceback" not in out.stderr


# What surrounds a command rather than its input: a full disk or a file-size limit, standard
# streams that are closed, full or gone, an encoding that cannot hold the output, torchrun variables
# left in the environment. Each ends in one line on stderr (or quietly, where nothing went wrong but
# the reader left), never a traceback. Real processes: these are about the process itself.

TRAIN = ["model=tiny", "block_size=32", "batch_size=2", "device=cpu", "eval_batches=1"]


def gpt1(*args, env: dict | None = None, file_size: int | None = None, close: int | None = None,
         stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    """`python -m gpt1 ARGS`; with `file_size`, under that limit (`ulimit -f`: a write past it fails
    with EFBIG, as SIGXFSZ is ignored); with `close`, that descriptor closed (`1>&-`, `2>&-`)."""
    def limit():
        if file_size is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
        if close is not None:
            os.close(close)

    return subprocess.run([sys.executable, "-m", "gpt1", *map(str, args)], stdout=stdout, stderr=subprocess.PIPE,
                          env={**os.environ, "GPT1_QUIET": "1", **(env or {})}, preexec_fn=limit, timeout=300)


# ---- a full disk, a file-size limit ---------------------------------------------------------

@pytest.mark.slow
def test_a_file_size_limit_is_one_line_naming_the_file(tokenizer_dir, tiny_model_dir, corpus_dir, tmp_path):
    """Tracebacks: safetensors' SafetensorError (export), numpy's OSError without errno (gguf,
    and prepare before its writes named the file), EFBIG not counted as a failed write (tokenizer train, which left an empty --out)."""
    cases = [  # (argv, the limit in bytes, the line)
        (["export", "--model", tiny_model_dir, "--out", tmp_path / "hf"], 8192,
         r"hf/model.safetensors: cannot write \(File too large\); raise the file-size limit"),
        (["export", "--model", tiny_model_dir, "--out", tmp_path / "m.gguf", "--format", "gguf"], 100_000,  # in the tensors
         r"m.gguf: cannot write \(the disk is full or a file-size limit was reached\)"),
        (["prepare", "--tokenizer", tokenizer_dir, "--out", tmp_path / "data", corpus_dir / "json"], 8192,
         r"data/train.bin.partial: cannot write \(File too large\); raise the file-size limit"),
        (["tokenizer", "train", "--vocab-size", "300", "--out", tmp_path / "new" / "tok", corpus_dir / "json"], 8192,
         r"new/tok/tokenizer.json: cannot write \(File too large\)"),
    ]
    for argv, limit, pattern in cases:
        result = gpt1(*argv, file_size=limit)
        assert_one_clear_line(result.returncode, result.stderr.decode(), pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # a resumable prepare; no temps, no empty new/


@pytest.mark.slow
def test_a_checkpoint_past_the_file_size_limit_is_one_line_and_the_last_one_stays(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["pretrain", "--data", data_dir, "--out", run, *TRAIN, "max_steps=4", "save_every=2"]
    assert gpt1(*args, env={"GPT1_CRASH_AT": "before-outputs:1"}).returncode == 137  # stopped after step 2's save
    result = gpt1(*args, file_size=64 * 1024)
    assert_one_clear_line(result.returncode, result.stderr.decode(),
                          r"run/checkpoints/.step-00000004.tmp/trainable.safetensors: cannot write \(File too large\)")
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".lock", "step-00000002"]  # the failed save's temp is gone
    assert run_main(capsys, *args)[0] == 0  # the rerun (no limit: in-process) resumes from step 2


# ---- standard streams ------------------------------------------------------------------------

@pytest.mark.slow
def test_stdout_whose_reader_is_gone_ends_quietly(tiny_model_dir):
    """`gpt1 info DIR | head -1` and `gpt1 generate ... | head -c 20`: a BrokenPipeError traceback
    and exit code 1 (the OSError handler re-raised EPIPE before the BrokenPipeError one)."""
    generate = ["generate", "--model", tiny_model_dir, "--prompt", "def", "--max-new-tokens", "20", "--seed", "1"]
    for argv in (["info", tiny_model_dir], generate):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the first write: no race with it
        try:
            result = gpt1(*argv, stdout=write)
        finally:
            os.close(write)
        # No traceback, and no complaint from the flush at exit either ("Exception ignored ...").
        assert result.returncode == 128 + signal.SIGPIPE and result.stderr.decode().strip() == "", result.stderr


@pytest.mark.slow
def test_closed_stdout_or_stderr_and_a_full_stdout(tiny_model_dir, capsys):
    """`1>&-` was an AttributeError on None; `2>&-` sent the log lines into stdout, between the
    generated text (tqdm writes to stdout when stderr is None); `> /dev/full` said "a file:
    cannot write ...; choose a writable --out"."""
    generate = ["generate", "--model", tiny_model_dir, "--prompt", "def", "--max-new-tokens", "5", "--seed", "1"]
    closed_stdout = gpt1(*generate, close=1, stdout=None)  # its product is stdout: refused up front (test_cli_environment.py)
    assert_one_clear_line(closed_stdout.returncode, closed_stdout.stderr.decode(),
                          r"standard output is closed \(started with >&-\), and this command writes the generated text there")
    assert main([str(a) for a in generate]) == 0  # the text with both streams open: in-process, the same numbers
    text = capsys.readouterr().out.encode()
    closed_stderr = gpt1(*generate, close=2)
    assert closed_stderr.returncode == 0 and closed_stderr.stdout == text and b"prompt tokens" not in text
    if Path("/dev/full").exists():
        with open("/dev/full", "wb") as full:
            result = gpt1(*generate, stdout=full)
        line = assert_one_clear_line(result.returncode, result.stderr.decode(),
                                     r"^gpt1 generate: error: standard output: cannot write \(No space left on device\)$")
        assert "--out" not in line


@pytest.mark.slow
def test_output_the_encoding_cannot_hold_is_escaped_and_utf8_arguments_are_taken(tiny_model_dir, tmp_path):
    """PYTHONIOENCODING=ascii: the export finished, then printing its path raised
    UnicodeEncodeError (exit 1). LANG=C without UTF-8 mode: valid UTF-8 arguments were "not valid
    UTF-8"; they reach the OS as the same bytes, and the path printed is those bytes."""
    out = tmp_path / "exp ☃"
    result = gpt1("export", "--model", tiny_model_dir, "--out", out, env={"PYTHONIOENCODING": "ascii"})
    assert result.returncode == 0 and result.stdout.decode("ascii").strip().endswith("exp \\u2603"), result.stderr
    c_locale = {"LANG": "C", "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}
    again = gpt1("export", "--model", tiny_model_dir, "--out", tmp_path / "né ☃", env=c_locale)
    assert again.returncode == 0 and again.stdout.decode("utf-8").strip() == str(tmp_path / "né ☃"), again.stderr
    assert (tmp_path / "né ☃" / "model.safetensors").is_file() and (out / "model.safetensors").is_file()
    bad = gpt1("info", os.fsdecode(b"caf\xe9"), env=c_locale)
    assert_one_clear_line(bad.returncode, bad.stderr.decode(), r"argument model: not valid UTF-8 \(byte b'\\xe9' at byte 3\)")


# ---- torchrun's variables outside torchrun -----------------------------------------------------

@pytest.mark.parametrize("env, pattern", [
    ({"WORLD_SIZE": "2"}, r"sets WORLD_SIZE=2 but not RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, which torchrun sets"),
    ({"RANK": "1"}, r"sets RANK=1 but not LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT.*unset RANK to run as one"),
    ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"},
     r"RANK=2, .*: expected 0 <= RANK < WORLD_SIZE"),
    ({"RANK": "one", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"},
     r"RANK=one, .*: RANK, LOCAL_RANK and WORLD_SIZE must be whole numbers"),
])
def test_stale_torchrun_variables_are_one_line(data_dir, tmp_path, monkeypatch, capsys, env, pattern):
    """WORLD_SIZE=2 alone was torch's traceback ("environment variable RANK expected"); RANK=1
    alone dropped the `model:` line silently, as if this were rank 1 of a torchrun launch."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    rc, err = run_main(capsys, "pretrain", "--data", data_dir, "--out", tmp_path / "run", *TRAIN, "max_steps=1")
    assert_one_clear_line(rc, err, pattern)
    assert not (tmp_path / "run").exists()
