"""Prepare throughput: `gpt1 prepare` (read, tokenize in parallel batches, write shards) against
the bare tokenizer's `encode_batch` on the same documents already in memory, in the same run.
A ratio near 1 means prepare is limited by the tokenizer, not by Python around it.

Corpus: the Python standard library's own source (ships with every Python); `quick` uses a
few packages of it (~2 MB), the full run the `stdlib` source (~13 MB, see `gpt1.data.sources`).
The tokenizer is trained on a sample of the same corpus (vocab 8,192).
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from pathlib import Path

from gpt1.core.tokenizer import train_tokenizer
from gpt1.data.prepare import prepare
from gpt1.data.sources import iter_documents

QUICK_PACKAGES = ("json", "email", "collections", "logging", "asyncio", "unittest")


def run(quick: bool = False) -> list[dict]:
    stdlib = Path(os.__file__).parent
    if quick:
        sources = [str(stdlib / p) for p in QUICK_PACKAGES]
    else:
        sources = ["stdlib"]
    documents = list(iter_documents(sources, skip_invalid=True))
    n_bytes = sum(len(d.encode("utf-8", errors="surrogatepass")) for d in documents)
    tokenizer, _ = train_tokenizer(itertools.islice(documents, 400), 2048 if quick else 8192, show_progress=False)

    t0 = time.perf_counter()
    n_tokens = 0
    for i in range(0, len(documents), 1024):
        n_tokens += sum(len(ids) + 1 for ids in tokenizer.encode_batch(documents[i:i + 1024]))
    bare = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        meta = prepare(sources, tokenizer, Path(tmp) / "data", val=5, skip_invalid=True)
        ours = time.perf_counter() - t0
    tokens = meta["train"]["tokens"] + meta["val"]["tokens"]
    assert tokens == n_tokens, (tokens, n_tokens)
    return [{"corpus": f"stdlib{' (part)' if quick else ''}", "MB": n_bytes / 1e6, "tokens": tokens,
             "cores": os.cpu_count(), "prepare MB/s": n_bytes / 1e6 / ours, "prepare tok/s": tokens / ours,
             "encode_batch MB/s": n_bytes / 1e6 / bare, "encode_batch tok/s": n_tokens / bare, "ratio": bare / ours}]
