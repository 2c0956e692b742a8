"""Offline knowledge: memory-mapped Arrow shards written by `lyceum teacher dump`, read by id.

`OfflineKnowledge(DIR).get(ids)` returns the knowledge of any ids, in the order asked, as one
`KnowledgeBatch`, so a student may shuffle freely. On open it checks the manifest's format
version, that the dump is complete, each listed shard's size, schema and sample ids, and
(given the student's dataset) the dataset fingerprint, so knowledge from another dataset is
refused instead of silently misaligned.

Shard checksums: no read returns bytes of a shard whose sha256 has not been checked against
the manifest, in this run or (same path, size and mtime) an earlier one. By default a
background thread hashes the shards from the moment the dump opens and a read of a shard not
yet verified hashes it first; `verify="first_touch"` hashes each shard when first read,
`verify="off"` not at all (see `lyceum.student_client._shard_check`). A bad shard fails the
read with its file name and the fix. Verified shards are recorded in
`$LYCEUM_CACHE_DIR/verified-shards.json` (default `~/.cache/lyceum/`), so the next run does
not hash them again. `verify()` re-hashes every shard whatever that record says.

Reads gather rows by their byte offsets in the shard files (`lyceum.proto.shard_rows` says
where each row lies, and why): one fancy-index per column per shard touched copies every
requested row, whichever record batch holds it. A dump written with `--compression zstd`
(the manifest says so) has each shard decompressed into memory when the dump opens, then
read the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from lyceum.proto.codec import KnowledgeBatch, column_arrays, tensor_view, validate_arrow_schema
from lyceum.proto.manifest import Manifest, ShardInfo, check_dataset
from lyceum.proto.schema import FieldSpec, KnowledgeSchema
from lyceum.proto.shard_rows import (
    OFFSET_BYTES,
    ColumnRows,
    MappedShard,
    Rows,
    byte_rows,
    list_offset_rows,
    value_rows,
)
from lyceum.student_client._shard_check import ShardVerifier, VerifyMode, verify_knowledge

__all__ = ["DumpInputs", "FieldStats", "OfflineKnowledge", "VerifyMode", "verify_knowledge"]

# The field a plain tensor sample is stored under (teacher_server._inputs.INPUT_FIELD; the
# student side does not import the teacher's).
INPUT_FIELD = "input"


@dataclass(frozen=True)
class FieldStats:
    """Minimum, mean and maximum of a field's stored values over the whole dump."""

    min: float
    mean: float
    max: float
    count: int


@dataclass
class _Shard:
    info: ShardInfo
    stat: os.stat_result
    mmap: pa.MemoryMappedFile
    whole: pa.Buffer  # the file's mapping, whose bytes are checksummed
    batches: list[pa.RecordBatch]
    views: dict[int, np.ndarray]
    rows: pa.Buffer  # what the batches view: `whole`, or a compressed shard decompressed

    def view(self, row_bytes: int) -> np.ndarray:
        """The rows' buffer as items of `row_bytes` bytes at every byte offset (no copy)."""
        if row_bytes not in self.views:
            self.views[row_bytes] = byte_rows(self.rows, row_bytes)
        return self.views[row_bytes]


def _decompressed(
    schema: pa.Schema, batches: list[pa.RecordBatch]
) -> tuple[pa.Buffer, list[pa.RecordBatch]]:
    """A compressed shard's batches written again, uncompressed, into one buffer in memory:
    rows are then addressed by byte offset in it as in a memory-mapped uncompressed shard
    (one shard's knowledge in memory per open shard)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    whole = sink.getvalue()
    reader = pa.ipc.open_file(whole)
    return whole, [reader.get_batch(i) for i in range(reader.num_record_batches)]


@dataclass(frozen=True)
class _Groups:
    """The shards a gather touches: `single` if only one, else `spans` (shard, a, b) over
    `order`, the gather's positions sorted by shard, so each shard is indexed once."""

    single: int | None
    order: np.ndarray
    spans: list[tuple[int, int, int]]


def _group(shard_of: np.ndarray) -> _Groups:
    if shard_of.size == 0:
        return _Groups(None, shard_of, [])
    if shard_of.min() == shard_of.max():
        return _Groups(int(shard_of[0]), shard_of, [])
    order = np.argsort(shard_of, kind="stable")
    by_shard = shard_of[order]
    cuts = (np.flatnonzero(by_shard[1:] != by_shard[:-1]) + 1).tolist()
    bounds = zip([0, *cuts], [*cuts, by_shard.size], strict=True)
    return _Groups(None, order, [(int(by_shard[a]), a, b) for a, b in bounds])


class OfflineKnowledge:
    """Random access by sample id to a complete knowledge dump (see the module docstring).

    `verify` chooses when shard checksums are checked: `"background"` (default),
    `"first_touch"` or `"off"`."""

    def __init__(
        self,
        directory: str | Path,
        dataset: torch.utils.data.Dataset | None = None,
        *,
        verify: VerifyMode = "background",
    ) -> None:
        self.directory = Path(directory)
        self.manifest = Manifest.read(self.directory)
        incomplete = self.manifest.incomplete_reason()
        if incomplete:
            raise ValueError(f"{str(self.directory)!r}: {incomplete}")
        if dataset is not None:
            check_dataset(self.manifest, dataset, where=str(self.directory))
        stored = set(self.manifest.stored_inputs or ())
        whole = self.manifest.knowledge_schema
        self.schema: KnowledgeSchema = whole.model_copy(
            update={"fields": tuple(f for f in whole.fields if f.name not in stored)}
        )
        """The knowledge fields (the dump's schema less its stored inputs)."""
        self.input_fields = tuple(f for f in whole.fields if f.name in stored)
        """The fields of the inputs stored with `--store-inputs` (empty if none)."""
        self._shards: list[_Shard] = []
        try:
            for info in self.manifest.shards:
                self._shards.append(self._open_shard(info))
            self._index_batches()
            # Last: its thread starts hashing at once, and nothing after it can fail.
            self._verifier = ShardVerifier(
                self.directory,
                self.manifest.shards,
                [shard.stat for shard in self._shards],
                [shard.whole for shard in self._shards],
                verify,
            )
        except BaseException:
            # A bad shard later in the list must not leave the earlier ones mapped.
            for shard in self._shards:
                shard.mmap.close()
            raise

    def _index_batches(self) -> None:
        starts: list[int] = []
        shard_of: list[int] = []
        for k, shard in enumerate(self._shards):
            row = shard.info.start
            for batch in shard.batches:
                starts.append(row)
                shard_of.append(k)
                row += batch.num_rows
        # Global record batch table: the first id of each batch, and its shard.
        self._batch_start = np.asarray(starts, dtype=np.int64)
        self._batch_shard = np.asarray(shard_of, dtype=np.int64)
        mapped = [MappedShard(s.info.file, s.rows, s.batches) for s in self._shards]
        fields = self.manifest.knowledge_schema.fields
        self._columns: dict[str, list[ColumnRows]] = {
            spec.name: [value_rows(spec, c, mapped) for c in spec.columns] for spec in fields
        }
        self._list_offsets: dict[str, Rows] = {
            spec.name: list_offset_rows(spec, mapped) for spec in fields if spec.variable
        }

    def __len__(self) -> int:
        return self.manifest.dataset.length

    def _open_shard(self, info: ShardInfo) -> _Shard:
        path = self.directory / info.file
        where = f"shard {str(path)!r}"
        if not path.is_file():
            raise ValueError(f"{where} is listed in the manifest but missing; re-run the dump")
        stat = path.stat()
        size = stat.st_size
        if size != info.bytes:
            raise ValueError(
                f"{where}: {size} bytes, the manifest says {info.bytes} (truncated or replaced); "
                f"delete it and re-run the dump to rewrite it"
            )
        try:
            mmap = pa.memory_map(str(path))
            whole = rows = mmap.read_buffer(size)
            reader = pa.ipc.open_file(mmap)
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            if self.manifest.compression is not None:
                rows, batches = _decompressed(reader.schema, batches)
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{where} is not a readable Arrow file (corrupt?): {exc}") from exc
        validate_arrow_schema(reader.schema, self.manifest.knowledge_schema, where)
        row = info.start
        for batch in batches:
            ids = batch.column(0).to_numpy(zero_copy_only=True)
            if not np.array_equal(ids, np.arange(row, row + batch.num_rows, dtype=np.uint64)):
                raise ValueError(f"{where}: sample ids are not {row}..{row + batch.num_rows - 1}")
            row += batch.num_rows
        if row != info.stop:
            raise ValueError(
                f"{where}: holds ids up to {row - 1}, the manifest says {info.stop - 1}"
            )
        return _Shard(info, stat, mmap, whole, batches, {}, rows)

    def _gather(self, row_bytes: int, groups: _Groups, pos: np.ndarray) -> np.ndarray:
        """Rows of `row_bytes` at file offsets `pos` (grouped by shard), in the order of `pos`."""
        # Fancy indexing, not `take`: take first copies a non-contiguous source whole.
        if groups.single is not None:
            return self._shards[groups.single].view(row_bytes)[pos]
        out = np.empty(pos.size, dtype=np.dtype((np.void, row_bytes)))
        by_shard = pos[groups.order]
        for k, a, b in groups.spans:
            out[groups.order[a:b]] = self._shards[k].view(row_bytes)[by_shard[a:b]]
        return out

    def get(self, sample_ids: Sequence[int] | np.ndarray | torch.Tensor) -> KnowledgeBatch:
        """The knowledge of `sample_ids`, in that order, as one batch (fresh tensors).

        Repeated ids are allowed (e.g. ids drawn with replacement); each gets its row."""
        ids, tensors = self._read(sample_ids, self.schema.fields)
        return KnowledgeBatch(sample_ids=torch.from_numpy(ids), tensors=tensors, schema=self.schema)

    def inputs(
        self, sample_ids: Sequence[int] | np.ndarray | torch.Tensor
    ) -> list[torch.Tensor | dict[str, torch.Tensor]]:
        """The inputs stored with the knowledge (`teacher dump --store-inputs`) of each id, in
        order: a tensor (a sample that was one: its tokens), or a dict of the named inputs
        the sample gave but its attention mask, each per-token one at the real positions."""
        if not self.input_fields:
            raise ValueError(
                f"{str(self.directory)!r} holds no inputs: it was dumped without "
                f"--store-inputs; read the inputs from the dataset, or dump again with it"
            )
        _, tensors = self._read(sample_ids, self.input_fields)
        per_field = {
            f.name: tensors[f.name].unbind() if f.variable else tensors[f.name].unbind(0)
            for f in self.input_fields
        }
        count = len(next(iter(per_field.values())))
        if [f.name for f in self.input_fields] == [INPUT_FIELD]:
            return list(per_field[INPUT_FIELD])
        return [{name: rows[i] for name, rows in per_field.items()} for i in range(count)]

    def _read(
        self,
        sample_ids: Sequence[int] | np.ndarray | torch.Tensor,
        fields: Sequence[FieldSpec],
    ) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        """The ids, and the columns of `fields` at them (fresh tensors)."""
        ids = _as_ids(sample_ids, len(self))
        batch = np.searchsorted(self._batch_start, ids, side="right") - 1
        row = ids - self._batch_start[batch]
        shard_of = self._batch_shard[batch]
        self._verifier.require(shard_of)
        groups = _group(shard_of)
        where = str(self.directory)
        tensors: dict[str, torch.Tensor] = {}
        for spec in fields:
            cols = self._columns[spec.name]
            if not spec.variable:
                for col in cols:
                    raw = self._gather(col.row_bytes, groups, col.at(batch, row))
                    tensors[col.name] = col.tensor(raw, len(ids), where)
                continue
            # Sequence fields: read each sample's [lo, hi) list offsets, then every row.
            offsets_at = self._list_offsets[spec.name]
            lo = self._gather(OFFSET_BYTES, groups, offsets_at.at(batch, row)).view(np.int64)
            hi = self._gather(OFFSET_BYTES, groups, offsets_at.at(batch, row + 1)).view(np.int64)
            lengths = hi - lo
            offsets = np.zeros(len(ids) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
            elem_groups = _group(np.repeat(shard_of, lengths))
            offsets_t = torch.from_numpy(offsets)
            for col in cols:
                pos = np.repeat(col.at(batch, lo), lengths) + within * col.row_bytes
                raw = self._gather(col.row_bytes, elem_groups, pos)
                values = col.tensor(raw, int(offsets[-1]), where)
                tensors[col.name] = torch.nested.nested_tensor_from_jagged(
                    values, offsets=offsets_t
                )
        return ids, tensors

    def verify(self) -> list[str]:
        """Re-hash every shard; one message per bad shard (empty if all are good)."""
        return verify_knowledge(self.directory)

    def record_batches(self) -> Iterator[pa.RecordBatch]:
        """Every record batch of the dump in id order (views of the mapped files), each
        shard's checksum checked before its first batch: a streaming read of the whole dump."""
        for k, shard in enumerate(self._shards):
            self._verifier.require(np.array([k]))
            yield from shard.batches

    def wait_verified(self) -> None:
        """Block until every shard's checksum is checked; raise naming a bad one."""
        self._verifier.wait()

    @property
    def hashed_shards(self) -> list[str]:
        """Shard files this open hashed so far; the others were trusted from the record of
        earlier runs (or `verify="off"`)."""
        return list(self._verifier.hashed)

    def stats(self) -> dict[str, FieldStats]:
        """Per stored column: min, mean and max over every value in the dump."""
        result: dict[str, FieldStats] = {}
        self._verifier.wait()
        for col in (c for cols in self._columns.values() for c in cols):
            lo, hi, total, count = float("inf"), float("-inf"), 0.0, 0
            for shard in self._shards:
                for batch in shard.batches:
                    values, _ = column_arrays(batch, col.spec, col.name)
                    if values.size == 0:
                        continue
                    # A copy: mapped buffers are read-only and torch wants writable arrays.
                    t = tensor_view(np.array(values), col.dtype).double()
                    lo, hi = min(lo, float(t.min())), max(hi, float(t.max()))
                    total += float(t.sum())
                    count += t.numel()
            result[col.name] = FieldStats(lo, total / max(count, 1), hi, count)
        return result

    def close(self) -> None:
        # The checking thread reads the mappings: it stops before they are unmapped.
        self._verifier.close()
        for shard in self._shards:
            shard.views.clear()
            shard.mmap.close()
        self._shards = []

    def __enter__(self) -> OfflineKnowledge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_ids(sample_ids: Sequence[int] | np.ndarray | torch.Tensor, length: int) -> np.ndarray:
    if isinstance(sample_ids, torch.Tensor):
        sample_ids = sample_ids.detach().cpu().numpy()
    ids = np.asarray(sample_ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(
            f"sample ids: expected a 1-d sequence of integers, got {ids.dtype} {list(ids.shape)}"
        )
    ids = ids.astype(np.int64, copy=True)
    if ids.size and (ids.min() < 0 or ids.max() >= length):
        bad = ids[(ids < 0) | (ids >= length)][:5].tolist()
        raise ValueError(f"sample ids {bad} are outside the dump's ids [0, {length})")
    return ids


class DumpInputs(torch.utils.data.Dataset[torch.Tensor | dict[str, torch.Tensor]]):
    """The inputs a dump stored (`teacher dump --store-inputs`) as a map-style dataset:
    item i is `OfflineKnowledge.inputs([i])[0]`, so a student trains from the dump alone
    (its labels, e.g. next tokens, come from the inputs)."""

    def __init__(self, knowledge: OfflineKnowledge) -> None:
        if not knowledge.input_fields:
            knowledge.inputs([])  # raises, naming the fix
        self.knowledge = knowledge

    def __len__(self) -> int:
        return len(self.knowledge)

    def __getitem__(self, i: int) -> torch.Tensor | dict[str, torch.Tensor]:
        return self.knowledge.inputs([i])[0]
