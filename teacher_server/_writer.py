"""The dump's writer: knowledge into a directory of Arrow shards, shard by shard, resumably.

Layout and guarantees (the manifest is described in `lyceum.proto.manifest`, a directory
shared by ranks in `_dump_dir`):

- Shard k is the Arrow IPC file `shard-{k:05d}.arrow` holding ids `[k * shard_rows, ...)`
  (`Manifest.shard_range`: from `shard_starts[k]` for shards sized in tokens).
  It is written as `*.tmp`, fsynced, renamed, and the directory fsynced; only then is it
  listed (in `manifest.json`, or a rank's record; rewritten atomically). A kill at any point
  leaves complete, listed shards plus debris that the next run removes.
- Reopening a directory resumes at the first missing shard and leaves complete shards
  untouched (a listed shard that is missing or resized is re-dumped). A run with another
  teacher, schema, dataset, fingerprint coverage or shard size is refused before anything in
  the directory changes; the creation time and Lyceum version of the first run are kept.
- Several shards may be open at once (one per device of a multi-device dump): a batch
  continues the open shard whose next id it starts with, or opens a missing one.
- Record batches are accumulated to `record_batch_bytes` (default 4 MiB) before being
  written (their bodies zstd-compressed if the manifest says `compression: zstd`): each record batch costs 20-70 us of fixed work to write and to read, which
  dominates at the size of one inference batch.
- `WriterThread` runs the writes on a thread of their own, off the inference threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from lyceum.proto._ipc import write_options
from lyceum.proto.checksum import file_sha256
from lyceum.proto.codec import arrow_schema, to_record_batch
from lyceum.proto.display import Progress
from lyceum.proto.manifest import Manifest, ShardInfo, fsync_directory, shard_file_name
from lyceum.teacher_server._dump_dir import TMP_SUFFIX, DumpDirectory

__all__ = ["Columns", "KnowledgeWriter", "sha256_and_sync"]

log = logging.getLogger(__name__)

Columns = Mapping[str, torch.Tensor | Sequence[torch.Tensor]]


def sha256_and_sync(path: Path) -> str:
    """sha256 of a file, then fsync it: the bytes are hashed from the page cache just written."""
    digest = file_sha256(path)
    with open(path, "rb") as f:
        # fsync flushes the file's dirty pages whatever the descriptor's mode.
        os.fsync(f.fileno())
    return digest


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
    an engine (e.g. to write synthetic knowledge in benches). `rank` of `world_size` writes
    only its own shards (`_dump_dir`): every `world_size`-th from `rank`. Holds a lock on the
    directory while open, so that two dumps never interleave in one directory.
    """

    def __init__(
        self,
        directory: str | Path,
        manifest: Manifest,
        record_batch_bytes: int = 4 << 20,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.directory = Path(directory)
        self.record_batch_bytes = record_batch_bytes
        self._schema = manifest.knowledge_schema
        self._arrow_schema = arrow_schema(self._schema)
        self._open: dict[int, _OpenShard] = {}  # by the next id each expects
        self._dir = DumpDirectory(self.directory, manifest, rank, world_size)

    @property
    def manifest(self) -> Manifest:
        """Every shard known complete (a rank's view includes the other ranks' so far)."""
        return self._dir.manifest

    @property
    def owned(self) -> list[int]:
        """The shards this writer dumps: all of them, or its rank's."""
        return list(self._dir.owned)

    def todo(self) -> list[int]:
        """The shards this writer owns and has still to write, in order."""
        return self._dir.todo()

    def write(
        self, sample_ids: Sequence[int] | np.ndarray | torch.Tensor, columns: Columns
    ) -> None:
        """Append knowledge for consecutive ids that continue an open shard or start a
        missing one."""
        batch = to_record_batch(self._schema, sample_ids, columns)
        ids = batch.column(0).to_numpy()
        offset = 0
        while offset < batch.num_rows:
            shard = self._shard_for(int(ids[offset]))
            take = min(batch.num_rows - offset, shard.stop - shard.next_id)
            expected = np.arange(shard.next_id, shard.next_id + take, dtype=np.uint64)
            if not np.array_equal(ids[offset : offset + take], expected):
                raise ValueError(
                    f"knowledge writer: shard {shard.index} expects ids {shard.next_id}.."
                    f"{shard.next_id + take - 1} next, got {ids[offset : offset + take][:8]}...; "
                    f"write consecutive ids in order"
                )
            piece = batch.slice(offset, take)
            del self._open[shard.next_id]
            shard.pending.append(piece)
            shard.pending_bytes += piece.nbytes
            shard.next_id += take
            offset += take
            if shard.next_id == shard.stop:
                self._finish(shard)
                continue
            self._open[shard.next_id] = shard
            if shard.pending_bytes >= self.record_batch_bytes:
                self._flush(shard)

    def _shard_for(self, first_id: int) -> _OpenShard:
        """The open shard `first_id` continues, or else the one of its index (whose check
        then names the id it expects), or a missing shard that `first_id` starts."""
        if first_id in self._open:
            return self._open[first_id]
        index = self.manifest.shard_of(first_id)
        for shard in self._open.values():
            if shard.index == index:
                return shard
        if self.manifest.shard_range(index)[0] != first_id or index not in self.todo():
            starts = [self.manifest.shard_range(k)[0] for k in self.todo()]
            raise ValueError(
                f"knowledge writer: id {first_id} does not start a missing shard; the missing "
                f"shards start at {starts[:8]}"
            )
        _, stop = self.manifest.shard_range(index)
        tmp = self.directory / (shard_file_name(index) + TMP_SUFFIX)
        sink = pa.OSFile(str(tmp), "wb")
        options = write_options(self.manifest.compression or "none")
        writer = pa.ipc.new_file(sink, self._arrow_schema, options=options)
        self._open[first_id] = _OpenShard(index, first_id, stop, tmp, sink, writer)
        return self._open[first_id]

    def _flush(self, shard: _OpenShard) -> None:
        if shard.pending:
            batch = (
                shard.pending[0] if len(shard.pending) == 1 else pa.concat_batches(shard.pending)
            )
            with _naming(shard.tmp):
                shard.writer.write_batch(batch)
            shard.pending, shard.pending_bytes = [], 0

    def _finish(self, shard: _OpenShard) -> None:
        try:
            self._flush(shard)
            with _naming(shard.tmp):
                shard.writer.close()
                shard.sink.close()
            digest = sha256_and_sync(shard.tmp)
        except BaseException:
            _discard(shard)
            raise
        final = self.directory / shard_file_name(shard.index)
        os.replace(shard.tmp, final)
        fsync_directory(self.directory)
        start, stop = self.manifest.shard_range(shard.index)
        self._dir.add(
            ShardInfo(
                index=shard.index,
                file=final.name,
                start=start,
                stop=stop,
                rows=stop - start,
                bytes=final.stat().st_size,
                sha256=digest,
            )
        )

    def close(self) -> Manifest:
        """Release the directory; raises if a shard was left half-written (it is discarded)."""
        try:
            if self._open:
                shard = min(self._open.values(), key=lambda s: s.index)
                raise ValueError(
                    f"knowledge writer: shard {shard.index} is incomplete (next id "
                    f"{shard.next_id}, ends at {shard.stop}); it was discarded"
                )
            return self.manifest
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop half-written shards and release the directory lock."""
        while self._open:
            _discard(self._open.popitem()[1])
        self._dir.close()

    def __enter__(self) -> KnowledgeWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def _discard(shard: _OpenShard) -> None:
    for closing in (shard.writer.close, shard.sink.close):
        # The file is deleted next: a failed close changes nothing.
        with contextlib.suppress(OSError, pa.ArrowException):
            closing()
    shard.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Give pyarrow's write errors their file: they carry the errno (a full disk) but no path,
    and "no space left" is only actionable with the file system it happened on."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, os.strerror(exc.errno), str(path)) from exc


class WriterThread:
    """Runs `KnowledgeWriter.write` off the inference threads; re-raises its error on `put`.

    One thread for every engine: the writer's state (open shards, the manifest) has one
    owner, and writing and hashing release the GIL, so it keeps up with several devices.
    """

    def __init__(self, writer: KnowledgeWriter, depth: int, bar: Progress) -> None:
        self.writer = writer
        self.bar = bar
        self.queue: queue.Queue[tuple[torch.Tensor, Columns] | None] = queue.Queue(depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="lyceum-dump-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write(*item)
                    self.bar.update(len(item[0]))
                except BaseException as exc:
                    # Keep draining so that the producers never block on a full queue.
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
