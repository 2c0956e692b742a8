"""Shard checksums on the student's side: bytes that do not match their manifest are refused.

`knowledge verify` re-hashes a whole dump on demand. A student reading a dump must not train
on a flipped byte either, and it must not pay for a full re-hash of hundreds of GB on every
run or before its first batch. `ShardVerifier` (one per `OfflineKnowledge`) does, per shard:

- trusted without reading if the cross-run record (`_shard_cache`) says this very file (path,
  size, mtime, expected sha256) was verified before, by this process or another;
- else hashed once, from the same memory mapping the reads use (no copy), and recorded.

Modes (`OfflineKnowledge(..., verify=...)`):

- `background` (default): a thread hashes every unverified shard from the moment the dump
  opens; a read of a shard not yet verified hashes it first in the reading thread (or waits
  for the thread that is on it), so the first batch waits only for the shards it touches,
  and two threads hash at once where a core is free. Shuffled batches touch nearly every
  shard, so on a dump's first run the first batch waits for all of the hashing (bench/
  offline.md: 0.14 s for 384 MiB from the page cache with two free cores, 0.4-0.7 s on
  busy ones); later runs wait for none.
  The thread's order starts at a shard that depends on the process id, so DDP ranks opening
  one dump at once hash different shards first and take the others' results from the
  shared record.
- `first_touch`: no thread; each shard is hashed when a read first touches it (a run that
  reads only part of a dump hashes only that part).
- `off`: nothing is hashed (sizes, schemas and ids are still checked on open).

Once any shard is known to be bad, every read fails with its name and the fix (fail fast:
the run would reach it later anyway, after wasting its steps).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from lyceum.proto.checksum import file_sha256, sha256_buffer
from lyceum.proto.manifest import Manifest, ShardInfo
from lyceum.student_client._shard_cache import ShardKey, VerifiedShards

log = logging.getLogger(__name__)

VerifyMode = Literal["background", "first_touch", "off"]

_PENDING, _RUNNING, _OK, _BAD = range(4)


def fix_sentence(directory: Path, file: str) -> str:
    """What to do about a corrupt shard file (a rerun of the dump re-dumps missing shards)."""
    return (
        f"delete {str(directory / file)!r} and rerun the same `lyceum teacher dump` command "
        f"(it re-dumps missing shards)"
    )


def corrupt_message(info: ShardInfo, got: str) -> str:
    return (
        f"{info.file}: sha256 {got[:16]}... does not match the manifest's {info.sha256[:16]}... "
        f"(corrupt: not the bytes the dump wrote)"
    )


def verify_knowledge(directory: str | Path, cache: VerifiedShards | None = None) -> list[str]:
    """Check a dump: one message per problem (empty if the dump is complete and every shard
    matches its manifest); every shard is re-hashed, whatever the record of earlier runs says.

    Problems: the dump is incomplete (the missing ids, merged into ranges), a shard is
    missing, has another size, or its sha256 differs. Shards that pass are recorded, so the
    next student run trusts them without hashing."""
    directory = Path(directory)
    manifest = Manifest.read(directory)
    cache = cache if cache is not None else VerifiedShards()
    problems = []
    incomplete = manifest.incomplete_reason()
    if incomplete:
        problems.append(incomplete)
    for s in manifest.shards:
        path = directory / s.file
        redump = "rerun the same `lyceum teacher dump` command to re-dump it"
        if not path.is_file():
            problems.append(f"{s.file}: missing, though the manifest lists it; {redump}")
            continue
        stat = path.stat()
        if stat.st_size != s.bytes:
            problems.append(
                f"{s.file}: {stat.st_size} bytes, the manifest says {s.bytes} (truncated or "
                f"replaced); {redump}"
            )
            continue
        got = file_sha256(path)
        if got != s.sha256:
            problems.append(f"{corrupt_message(s, got)}; {fix_sentence(directory, s.file)}")
        else:
            cache.add(ShardKey.of(path, stat, s.sha256))
    return problems


class ShardVerifier:
    """Per-shard verification state of one open dump (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        shards: Sequence[ShardInfo],
        stats: Sequence[os.stat_result],
        buffers: Sequence[pa.Buffer],
        mode: VerifyMode,
        cache: VerifiedShards | None = None,
    ) -> None:
        self.directory = directory
        self._shards = list(shards)
        self._buffers = list(buffers)
        self._keys = [
            ShardKey.of(directory / s.file, st, s.sha256)
            for s, st in zip(shards, stats, strict=True)
        ]
        self._cache = cache if cache is not None else VerifiedShards()
        self._cond = threading.Condition()
        self._state = [_PENDING] * len(self._shards)
        self._problem: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.hashed: list[str] = []
        """Files this verifier hashed (the others were trusted from the record, or `off`)."""
        self.ok = np.zeros(len(self._shards), dtype=bool)
        if mode == "off":
            self.ok[:] = True
        else:
            for k, key in enumerate(self._keys):
                if self._cache.contains(key):
                    self._state[k], self.ok[k] = _OK, True
        self.all_ok = bool(self.ok.all())
        if mode == "background" and not self.all_ok:
            self._thread = threading.Thread(
                target=self._run, name="lyceum-shard-check", daemon=True
            )
            self._thread.start()

    def require(self, shards: np.ndarray) -> None:
        """Return once every shard index in `shards` is verified; raise if any shard is bad.

        Shards nobody is hashing are hashed here first; only then does this wait for the
        ones the background thread is on."""
        if self._problem is None and (self.all_ok or self.ok[shards].all()):
            return
        todo = [int(k) for k in np.unique(shards) if not self.ok[k]]
        while todo and self._problem is None:
            with self._cond:
                claimed = next((k for k in todo if self._state[k] == _PENDING), None)
                if claimed is None:
                    todo = [k for k in todo if self._state[k] == _RUNNING]
                    if todo:
                        self._cond.wait()
                    continue
                self._state[claimed] = _RUNNING
            todo.remove(claimed)
            self._check(claimed, stop=None)
        if self._problem is not None:
            raise ValueError(self._problem)

    def wait(self) -> None:
        """Verify every shard now (or wait for the thread to); raise if any is bad."""
        self.require(np.arange(len(self._shards)))

    def close(self) -> None:
        """Stop the background thread; shards it had not finished stay unrecorded."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        n = len(self._shards)
        first = os.getpid() % n
        for k in [*range(first, n), *range(first)]:
            if self._stop.is_set() or self._problem is not None:
                return
            with self._cond:
                if self._state[k] != _PENDING:
                    continue
                self._state[k] = _RUNNING
            try:
                self._check(k, stop=self._stop.is_set)
            except BaseException as exc:  # a bug, not a bad shard: say so where it shows
                log.exception("shard check thread failed on %s", self._shards[k].file)
                self._finish(k, f"{self._shards[k].file}: could not be checked ({exc})")
                return

    def _check(self, k: int, stop: Callable[[], bool] | None) -> None:
        info, key = self._shards[k], self._keys[k]
        if self._cache.contains(key):  # another process verified it meanwhile
            self._finish(k, None)
            return
        try:
            got = sha256_buffer(self._buffers[k], stop)
        except BaseException:
            self._reset(k)
            raise
        if got is None:
            self._reset(k)
            return
        self.hashed.append(info.file)
        if got != info.sha256:
            self._finish(k, corrupt_message(info, got))
            return
        self._cache.add(key)
        self._finish(k, None)

    def _reset(self, k: int) -> None:
        with self._cond:
            self._state[k] = _PENDING
            self._cond.notify_all()

    def _finish(self, k: int, problem: str | None) -> None:
        with self._cond:
            if problem is None:
                self._state[k] = _OK
                self.ok[k] = True
                self.all_ok = bool(self.ok.all())
            else:
                self._state[k] = _BAD
                if self._problem is None:
                    self._problem = (
                        f"knowledge {str(self.directory)!r}: shard {problem}; the student "
                        f"refuses knowledge that does not match its checksum. To fix it, "
                        f"{fix_sentence(self.directory, self._shards[k].file)}, or run "
                        f"`lyceum knowledge verify {self.directory}` to check every shard."
                    )
            self._cond.notify_all()
