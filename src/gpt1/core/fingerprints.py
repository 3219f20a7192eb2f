"""Fingerprints of files: what a run records of its data and weights, to tell them on resume."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


SAMPLE_BYTES = 1 << 20


def sample_fingerprint(path: Path) -> str:
    """sha256 (16 hex digits) of a file's size and its first and last MiB (all of it, up to 2 MiB):
    other content with the same token counts (another preparation, shuffled or shifted) is told
    apart on resume at the cost of reading 2 MiB, not the whole file (about 18 GB for the card's
    OpenWebText); an edit confined to the middle of a larger file is not."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}\n".encode())
    with open(path, "rb") as f:
        digest.update(f.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()[:16]
