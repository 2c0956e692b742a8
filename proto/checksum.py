"""sha256 of files and buffers, in blocks: shard checksums and checkpoint hashes.

One loop for every side: the dump hashes each shard it writes, students and `knowledge
verify` hash the shards they read (from the memory mapping they read through, with a stop
switch for a background thread), and servers and dumps hash a checkpoint to name their
teacher. The hex digests go into manifests and `Describe` replies, so the two sides must
compute them the same way.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["file_sha256", "sha256_buffer"]

_BLOCK = 4 << 20
"""Bytes hashed per step: large enough that hashlib releases the GIL, small enough to stop."""


def sha256_buffer(buffer: object, stop: Callable[[], bool] | None = None) -> str | None:
    """Hex sha256 of anything with the buffer protocol (bytes, an `mmap`, a memory-mapped
    `pa.Buffer`), read in 4 MiB steps without a copy; None if `stop()` became true
    between two steps."""
    digest = hashlib.sha256()
    with memoryview(buffer) as view:  # type: ignore[arg-type]  # any buffer-protocol object
        for offset in range(0, len(view), _BLOCK):
            if stop is not None and stop():
                return None
            # hashlib releases the GIL on large updates: other threads keep running meanwhile.
            digest.update(view[offset : offset + _BLOCK])
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a whole file, hashed through a memory mapping (from the page cache when
    the file was just written or read). An unreadable file is an `OSError` naming it."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return hashlib.sha256().hexdigest()  # an empty file cannot be mapped
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            digest = sha256_buffer(mapped)
    if digest is None:
        raise AssertionError("unreachable: hashing without a stop switch runs to the end")
    return digest
