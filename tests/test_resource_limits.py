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

from gpt1.core.errors import Gpt1Error
from gpt1.core.io import read_bytes
from tests.test_battery import assert_one_clear_line

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
