"""Offline dump: run a teacher over a whole dataset once and write its knowledge to Arrow shards.

Layout and guarantees (the manifest is described in `lyceum.proto.manifest`):

- Shard k is the Arrow IPC file `shard-{k:05d}.arrow` holding ids `[k * shard_rows, ...)`.
  It is written as `*.tmp`, fsynced, renamed, and the directory fsynced; only then is it
  listed in `manifest.json` (rewritten atomically). A kill at any point leaves complete,
  listed shards plus debris that the next run removes.
- Rerunning the same dump resumes at the first missing shard and leaves complete shards
  untouched. A run with another teacher, schema, dataset or shard size is refused before
  anything in the directory changes.
- Record batches are accumulated to `record_batch_bytes` (default 4 MiB) before being
  written: each record batch costs 20-70 us of fixed work to write and to read, which
  dominates at the size of one inference batch.

Pipeline: DataLoader workers read and collate samples, the calling thread runs the engine,
and a writer thread encodes, writes and hashes, so only inference sits on the critical path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import queue
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from lyceum.proto.codec import arrow_schema, to_record_batch
from lyceum.proto.manifest import (
    MANIFEST_NAME,
    Manifest,
    ModelIdentity,
    ShardInfo,
    dataset_fingerprint,
    fsync_directory,
    shard_file_name,
)
from lyceum.teacher_server.engine import TeacherEngine

log = logging.getLogger(__name__)

_TMP_SUFFIX = ".tmp"
Columns = Mapping[str, torch.Tensor | Sequence[torch.Tensor]]

# Directory locks held by this process. A forked child (a DataLoader worker) would share
# each flock; if the dump were killed, an orphaned worker would keep its directory locked
# and the rerun would be refused. The lock belongs to the dump process alone.
_HELD_LOCKS: set[int] = set()


def _close_locks_in_child() -> None:
    for fd in _HELD_LOCKS:
        os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_locks_in_child)


class DumpConfig(BaseModel):
    """How a dump batches, shards and pipelines its work."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shard_rows: int = Field(default=65536, gt=0, description="Samples per shard file.")
    batch_size: int = Field(default=256, gt=0, description="Samples per inference batch.")
    workers: int = Field(
        default=1, ge=0, description="DataLoader worker processes (0: load in this process)."
    )
    record_batch_bytes: int = Field(
        default=4 << 20, gt=0, description="Accumulate at least this many bytes per record batch."
    )
    queue_depth: int = Field(
        default=8, gt=0, description="Inference batches buffered between engine and writer."
    )
    progress: bool = Field(default=True, description="Show a progress bar on a terminal.")


def sha256_and_sync(path: Path, chunk: int = 4 << 20) -> str:
    """sha256 of a file, then fsync it: the bytes are hashed from the page cache just written."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
        # fsync flushes the file's dirty pages whatever the descriptor's mode.
        os.fsync(f.fileno())
    return digest.hexdigest()


@dataclass
class _OpenShard:
    index: int
    next_id: int
    stop: int
    tmp: Path
    sink: pa.NativeFile
    writer: pa.ipc.RecordBatchFileWriter
    pending: list[pa.RecordBatch] = field(default_factory=list)
    pending_bytes: int = 0


class KnowledgeWriter:
    """Writes knowledge into a dump directory shard by shard, resuming what a killed run left.

    `write` takes batches of consecutive sample ids; a batch may span shards. Usable without
    an engine (e.g. to write synthetic knowledge in benches). Holds an exclusive lock on the
    directory while open so that two dumps never interleave in one directory.
    """

    def __init__(
        self, directory: str | Path, manifest: Manifest, record_batch_bytes: int = 4 << 20
    ) -> None:
        self.directory = Path(directory)
        self.record_batch_bytes = record_batch_bytes
        self._schema = manifest.knowledge_schema
        self._arrow_schema = arrow_schema(self._schema)
        self._shard: _OpenShard | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_directory(self.directory)
        try:
            self.manifest = _prepare_directory(self.directory, manifest)
        except BaseException:
            self.abort()
            raise

    def write(
        self, sample_ids: Sequence[int] | np.ndarray | torch.Tensor, columns: Columns
    ) -> None:
        """Append knowledge for consecutive ids that continue a missing shard."""
        batch = to_record_batch(self._schema, sample_ids, columns)
        ids = batch.column(0).to_numpy()
        offset = 0
        while offset < batch.num_rows:
            shard = self._shard or self._open_shard(int(ids[offset]))
            take = min(batch.num_rows - offset, shard.stop - shard.next_id)
            expected = np.arange(shard.next_id, shard.next_id + take, dtype=np.uint64)
            if not np.array_equal(ids[offset : offset + take], expected):
                raise ValueError(
                    f"knowledge writer: shard {shard.index} expects ids {shard.next_id}.."
                    f"{shard.next_id + take - 1} next, got {ids[offset : offset + take][:8]}...; "
                    f"write consecutive ids in order"
                )
            piece = batch.slice(offset, take)
            shard.pending.append(piece)
            shard.pending_bytes += piece.nbytes
            shard.next_id += take
            offset += take
            if shard.pending_bytes >= self.record_batch_bytes:
                self._flush(shard)
            if shard.next_id == shard.stop:
                self._finish(shard)

    def _open_shard(self, first_id: int) -> _OpenShard:
        index, rem = divmod(first_id, self.manifest.shard_rows)
        if rem or index not in self.manifest.missing_shards():
            raise ValueError(
                f"knowledge writer: id {first_id} does not start a missing shard; the missing "
                f"shards start at {[self.manifest.shard_range(k)[0] for k in self.manifest.missing_shards()][:8]}"
            )
        _, stop = self.manifest.shard_range(index)
        tmp = self.directory / (shard_file_name(index) + _TMP_SUFFIX)
        sink = pa.OSFile(str(tmp), "wb")
        writer = pa.ipc.new_file(sink, self._arrow_schema)
        self._shard = _OpenShard(index, first_id, stop, tmp, sink, writer)
        return self._shard

    def _flush(self, shard: _OpenShard) -> None:
        if shard.pending:
            batch = (
                shard.pending[0] if len(shard.pending) == 1 else pa.concat_batches(shard.pending)
            )
            shard.writer.write_batch(batch)
            shard.pending, shard.pending_bytes = [], 0

    def _finish(self, shard: _OpenShard) -> None:
        self._flush(shard)
        shard.writer.close()
        shard.sink.close()
        digest = sha256_and_sync(shard.tmp)
        final = self.directory / shard_file_name(shard.index)
        os.replace(shard.tmp, final)
        fsync_directory(self.directory)
        start, stop = self.manifest.shard_range(shard.index)
        info = ShardInfo(
            index=shard.index,
            file=final.name,
            start=start,
            stop=stop,
            rows=stop - start,
            bytes=final.stat().st_size,
            sha256=digest,
        )
        shards = tuple(sorted((*self.manifest.shards, info), key=lambda s: s.index))
        self.manifest = self.manifest.model_copy(update={"shards": shards})
        self.manifest.write(self.directory)
        self._shard = None

    def close(self) -> Manifest:
        """Release the directory; raises if a shard was left half-written (it is discarded)."""
        try:
            if self._shard is not None:
                shard = self._shard
                raise ValueError(
                    f"knowledge writer: shard {shard.index} is incomplete (next id "
                    f"{shard.next_id}, ends at {shard.stop}); it was discarded"
                )
            return self.manifest
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop a half-written shard and release the directory lock."""
        if self._shard is not None:
            shard, self._shard = self._shard, None
            for closing in (shard.writer.close, shard.sink.close):
                # The file is deleted next: a failed close changes nothing.
                with contextlib.suppress(OSError, pa.ArrowException):
                    closing()
            shard.tmp.unlink(missing_ok=True)
        if self._lock_fd >= 0:
            _HELD_LOCKS.discard(self._lock_fd)
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> KnowledgeWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def _lock_directory(directory: Path) -> int:
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(
            f"{str(directory)!r} is locked by another dump; wait for it or dump elsewhere"
        ) from None
    _HELD_LOCKS.add(fd)
    return fd


def _prepare_directory(directory: Path, fresh: Manifest) -> Manifest:
    """Start or resume a dump in `directory`; refuse (changing nothing) if it holds another."""
    if not (directory / MANIFEST_NAME).exists():
        if any(directory.iterdir()):
            raise ValueError(
                f"{str(directory)!r} is not empty and has no {MANIFEST_NAME}: it is not a "
                f"knowledge dump; choose an empty or new --out directory"
            )
        fresh.write(directory)
        return fresh
    existing = Manifest.read(directory)
    why = existing.incompatibility(fresh)
    if why:
        raise ValueError(
            f"{str(directory)!r} holds a dump that this run cannot continue ({why}). Dump into "
            f"another --out directory, or delete {str(directory)!r} to start over."
        )
    # Debris of a killed run: temp files, and shards renamed but not yet listed.
    listed = {s.file for s in existing.shards}
    for path in directory.iterdir():
        if path.name.endswith(_TMP_SUFFIX) or (
            path.name.startswith("shard-") and path.name not in listed
        ):
            log.info("removing %s left by an interrupted dump", path)
            path.unlink()
    damaged = [
        s
        for s in existing.shards
        if not (directory / s.file).is_file() or (directory / s.file).stat().st_size != s.bytes
    ]
    if damaged:
        log.warning(
            "re-dumping shards missing or resized since listed: %s", [s.file for s in damaged]
        )
        for s in damaged:
            (directory / s.file).unlink(missing_ok=True)
        kept = tuple(s for s in existing.shards if s not in damaged)
        existing = existing.model_copy(update={"shards": kept})
        existing.write(directory)
    return existing


class _ShardBatches(torch.utils.data.Sampler[list[int]]):
    """Batches of ids that never cross a shard boundary, so the batches (and so the bits of
    batched inference) of a resumed dump equal those of an uninterrupted one."""

    def __init__(self, ranges: Sequence[tuple[int, int]], batch_size: int) -> None:
        self.ranges = ranges
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for start, stop in self.ranges:
            for lo in range(start, stop, self.batch_size):
                yield list(range(lo, min(lo + self.batch_size, stop)))

    def __len__(self) -> int:
        return sum(-(-(stop - start) // self.batch_size) for start, stop in self.ranges)


class _Indexed(torch.utils.data.Dataset[tuple[int, Any]]):
    """Yields `(id, input)`: the sample id travels with its input through the workers."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.dataset[i][0]


class _WriterThread:
    """Runs `KnowledgeWriter.write` off the inference thread; re-raises its error on `put`."""

    def __init__(self, writer: KnowledgeWriter, depth: int) -> None:
        self.writer = writer
        self.queue: queue.Queue[tuple[torch.Tensor, Columns] | None] = queue.Queue(depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="lyceum-dump-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write(*item)
                except BaseException as exc:
                    # Keep draining so that the producer never blocks on a full queue.
                    self.error = exc

    def put(self, ids: torch.Tensor, columns: Columns) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((ids, columns))

    def join(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def dump_knowledge(
    engine: TeacherEngine,
    dataset: torch.utils.data.Dataset,
    out_dir: str | Path,
    config: DumpConfig,
    model_identity: ModelIdentity,
) -> Manifest:
    """Dump the engine's knowledge for every sample of `dataset` into `out_dir`; resumable.

    Sample id i is `dataset[i]`, whose input is `dataset[i][0]`. `model_identity` names the
    teacher (`lyceum.proto.manifest.model_identity(spec, model, checkpoint_sha256)`); a
    resumed dump must have the same one. Returns the final manifest.
    """
    fresh = Manifest(
        knowledge_schema=engine.schema,
        model=model_identity,
        dataset=dataset_fingerprint(dataset),
        shard_rows=config.shard_rows,
    )
    writer = KnowledgeWriter(out_dir, fresh, config.record_batch_bytes)
    try:
        todo = [writer.manifest.shard_range(k) for k in writer.manifest.missing_shards()]
        if todo:
            _run_pipeline(engine, dataset, writer, config, todo)
        return writer.close()
    finally:
        writer.abort()


def _run_pipeline(
    engine: TeacherEngine,
    dataset: torch.utils.data.Dataset,
    writer: KnowledgeWriter,
    config: DumpConfig,
    todo: Sequence[tuple[int, int]],
) -> None:
    def collate(items: list[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor, Any, Any]:
        # Runs in the loader workers: reading and stacking stay off the inference thread.
        batch, lengths = engine.collate([x for _, x in items])
        return torch.tensor([i for i, _ in items], dtype=torch.int64), batch, lengths

    loader = torch.utils.data.DataLoader(
        _Indexed(dataset),
        batch_sampler=_ShardBatches(todo, config.batch_size),
        num_workers=config.workers,
        collate_fn=collate,
        pin_memory=engine.device.type == "cuda",
        # `collate` holds the engine: forked workers share it, where spawn or forkserver
        # (Python 3.14's default) would have to pickle the model.
        multiprocessing_context="fork" if config.workers else None,
    )
    # Start the workers before the writer thread: fork only copies the calling thread.
    batches = iter(loader)
    total = writer.manifest.dataset.length
    bar = tqdm(
        total=total,
        initial=writer.manifest.rows,
        unit="rows",
        unit_scale=True,
        desc="dump",
        disable=not (config.progress and sys.stderr.isatty()),
    )
    thread = _WriterThread(writer, config.queue_depth)
    try:
        for ids, batch, lengths in batches:
            thread.put(ids, engine.infer(batch, lengths))
            bar.update(len(ids))
    finally:
        bar.close()
        thread.join()
