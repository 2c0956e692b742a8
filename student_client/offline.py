"""Offline knowledge: memory-mapped Arrow shards written by `lyceum teacher dump`, read by id.

`OfflineKnowledge(DIR).get(ids)` returns the knowledge of any ids, in the order asked, as one
`KnowledgeBatch`, so a student may shuffle freely. On open it checks the manifest's format
version, each listed shard's size, schema and sample ids, and (given the student's dataset)
the dataset fingerprint, so knowledge from another dataset is refused instead of silently
misaligned. `verify()` re-hashes every shard.

Why the gather is hand-made: `Table.take` over memory-mapped, many-chunk tables runs at about
0.01 GB/s, and even one numpy take per record batch pays a fixed cost per batch touched,
which for shuffled ids is nearly every batch. Instead, every column's values of every
record batch are addressed by their byte offset inside the shard's mapping: a row of
`row_bytes` at offset p is element p of a numpy view of the whole file whose items are
`row_bytes` wide with a stride of one byte. One fancy-index per column per shard touched then
copies every requested row (a memcpy each), whichever record batch holds it. (Fancy
indexing, not `ndarray.take`: take would first copy the non-contiguous view whole.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from lyceum.proto.codec import (
    TORCH_DTYPES,
    KnowledgeBatch,
    column_arrays,
    validate_arrow_schema,
)
from lyceum.proto.manifest import Manifest, ShardInfo, check_dataset
from lyceum.proto.schema import DType, FieldSpec, KnowledgeSchema, TopK

_NUMPY_CARRIERS = {"bfloat16": np.uint16, "bool": np.uint8}


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
    mmap: pa.MemoryMappedFile
    whole: pa.Buffer
    batches: list[pa.RecordBatch]
    views: dict[int, np.ndarray]

    def view(self, row_bytes: int) -> np.ndarray:
        """The whole file as items of `row_bytes` bytes at every byte offset (no copy)."""
        if row_bytes not in self.views:
            self.views[row_bytes] = np.ndarray(
                shape=(max(self.whole.size - row_bytes + 1, 0),),
                dtype=np.dtype((np.void, row_bytes)),
                buffer=self.whole,
                strides=(1,),
            )
        return self.views[row_bytes]


@dataclass(frozen=True)
class _Column:
    spec: FieldSpec
    name: str
    dtype: DType
    row_bytes: int
    # Per record batch (global index over all shards): file offset of value row 0 of the
    # batch's column. For variable fields, the row index is the Arrow list offset.
    base: np.ndarray


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


def verify_knowledge(directory: str | Path) -> list[str]:
    """Re-hash every listed shard; returns one message per bad shard (empty if all are good)."""
    directory = Path(directory)
    manifest = Manifest.read(directory)
    problems = []
    for s in manifest.shards:
        path = directory / s.file
        if not path.is_file():
            problems.append(f"{s.file}: missing")
            continue
        size = path.stat().st_size
        if size != s.bytes:
            problems.append(f"{s.file}: {size} bytes, the manifest says {s.bytes}")
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(4 << 20):
                digest.update(block)
        if digest.hexdigest() != s.sha256:
            problems.append(
                f"{s.file}: sha256 {digest.hexdigest()[:16]}... does not match the manifest's "
                f"{s.sha256[:16]}... (corrupt)"
            )
    return problems


class OfflineKnowledge:
    """Random access by sample id to a complete knowledge dump (see the module docstring)."""

    def __init__(
        self, directory: str | Path, dataset: torch.utils.data.Dataset | None = None
    ) -> None:
        self.directory = Path(directory)
        self.manifest = Manifest.read(self.directory)
        if not self.manifest.complete:
            raise ValueError(
                f"{str(self.directory)!r}: the dump is incomplete ({self.manifest.rows} of "
                f"{self.manifest.dataset.length} samples); rerun the same `lyceum teacher dump` "
                f"command to finish it"
            )
        if dataset is not None:
            check_dataset(self.manifest, dataset, where=str(self.directory))
        self.schema: KnowledgeSchema = self.manifest.knowledge_schema
        self._shards: list[_Shard] = []
        try:
            for info in self.manifest.shards:
                self._shards.append(self._open_shard(info))
        except BaseException:
            # A bad shard later in the list must not leave the earlier ones mapped.
            for shard in self._shards:
                shard.mmap.close()
            raise
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
        self._columns = {
            spec.name: [self._column(spec, c) for c in spec.columns] for spec in self.schema.fields
        }
        self._offsets_base = {
            spec.name: self._offsets_base_of(spec) for spec in self.schema.fields if spec.variable
        }

    def __len__(self) -> int:
        return self.manifest.dataset.length

    def _open_shard(self, info: ShardInfo) -> _Shard:
        path = self.directory / info.file
        where = f"shard {str(path)!r}"
        if not path.is_file():
            raise ValueError(f"{where} is listed in the manifest but missing; re-run the dump")
        size = path.stat().st_size
        if size != info.bytes:
            raise ValueError(
                f"{where}: {size} bytes, the manifest says {info.bytes} (truncated or replaced); "
                f"delete it and re-run the dump to rewrite it"
            )
        try:
            mmap = pa.memory_map(str(path))
            whole = mmap.read_buffer(size)
            reader = pa.ipc.open_file(mmap)
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
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
        return _Shard(info, mmap, whole, batches, {})

    def _file_offset(self, shard: _Shard, array: np.ndarray, where: str) -> int:
        """Offset of a zero-copy numpy view inside its shard's mapping."""
        offset = int(array.ctypes.data) - shard.whole.address
        if not array.flags.c_contiguous or offset < 0 or offset + array.nbytes > shard.whole.size:
            raise ValueError(f"shard {shard.info.file!r}: {where} is not inside the mapped file")
        return offset

    def _column(self, spec: FieldSpec, column: str) -> _Column:
        dtype: DType = "int32" if column.endswith(".indices") else spec.dtype
        row_bytes = spec.row_size * np.dtype(_numpy_dtype(dtype)).itemsize
        base = []
        for shard in self._shards:
            for batch in shard.batches:
                values, _ = column_arrays(batch, spec, column)
                offset = self._file_offset(shard, values, f"column {column!r}")
                if spec.variable:
                    # `values` starts at list offset raw[0]; address rows by raw offsets.
                    raw = batch.column(column).offsets.to_numpy(zero_copy_only=True)
                    offset -= int(raw[0]) * row_bytes
                base.append(offset)
        return _Column(spec, column, dtype, row_bytes, np.asarray(base, dtype=np.int64))

    def _offsets_base_of(self, spec: FieldSpec) -> np.ndarray:
        """File offset of each record batch's int64 list offsets of a variable field."""
        base = []
        for shard in self._shards:
            for batch in shard.batches:
                raw = batch.column(spec.columns[0]).offsets.to_numpy(zero_copy_only=True)
                for other in spec.columns[1:]:
                    theirs = batch.column(other).offsets.to_numpy(zero_copy_only=True)
                    if not np.array_equal(raw - raw[0], theirs - theirs[0]):
                        raise ValueError(
                            f"shard {shard.info.file!r}: field {spec.name!r}: values and "
                            f"indices have different sequence lengths"
                        )
                base.append(self._file_offset(shard, raw, f"offsets of {spec.name!r}"))
        return np.asarray(base, dtype=np.int64)

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
        ids = _as_ids(sample_ids, len(self))
        batch = np.searchsorted(self._batch_start, ids, side="right") - 1
        row = ids - self._batch_start[batch]
        shard_of = self._batch_shard[batch]
        groups = _group(shard_of)
        tensors: dict[str, torch.Tensor] = {}
        for spec in self.schema.fields:
            cols = self._columns[spec.name]
            if not spec.variable:
                for col in cols:
                    raw = self._gather(col.row_bytes, groups, col.base[batch] + row * col.row_bytes)
                    tensors[col.name] = _tensor(raw, col, len(ids))
                continue
            # Sequence fields: read each sample's [lo, hi) list offsets, then every row.
            off = self._offsets_base[spec.name][batch] + 8 * row
            lo = self._gather(8, groups, off).view(np.int64)
            hi = self._gather(8, groups, off + 8).view(np.int64)
            lengths = hi - lo
            offsets = np.zeros(len(ids) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
            elem_groups = _group(np.repeat(shard_of, lengths))
            offsets_t = torch.from_numpy(offsets)
            for col in cols:
                start = col.base[batch] + lo * col.row_bytes
                pos = np.repeat(start, lengths) + within * col.row_bytes
                raw = self._gather(col.row_bytes, elem_groups, pos)
                values = _tensor(raw, col, int(offsets[-1]))
                tensors[col.name] = torch.nested.nested_tensor_from_jagged(
                    values, offsets=offsets_t
                )
        for spec in self.schema.fields:
            if isinstance(spec.encoding, TopK):
                _check_indices(spec, tensors[spec.columns[1]])
        return KnowledgeBatch(sample_ids=torch.from_numpy(ids), tensors=tensors, schema=self.schema)

    def verify(self) -> list[str]:
        """Re-hash every shard; one message per bad shard (empty if all are good)."""
        return verify_knowledge(self.directory)

    def stats(self) -> dict[str, FieldStats]:
        """Per stored column: min, mean and max over every value in the dump."""
        result: dict[str, FieldStats] = {}
        for col in (c for cols in self._columns.values() for c in cols):
            lo, hi, total, count = float("inf"), float("-inf"), 0.0, 0
            for shard in self._shards:
                for batch in shard.batches:
                    values, _ = column_arrays(batch, col.spec, col.name)
                    if values.size == 0:
                        continue
                    # A copy: mapped buffers are read-only and torch wants writable arrays.
                    t = _tensor(np.array(values), col, len(values)).double()
                    lo, hi = min(lo, float(t.min())), max(hi, float(t.max()))
                    total += float(t.sum())
                    count += t.numel()
            result[col.name] = FieldStats(lo, total / max(count, 1), hi, count)
        return result

    def close(self) -> None:
        for shard in self._shards:
            shard.views.clear()
            shard.mmap.close()
        self._shards = []

    def __enter__(self) -> OfflineKnowledge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _numpy_dtype(dtype: str) -> np.dtype:
    return np.dtype(_NUMPY_CARRIERS.get(dtype, dtype))


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


def _tensor(raw: np.ndarray, col: _Column, rows: int) -> torch.Tensor:
    """Gathered bytes -> a tensor `[rows, *row_shape]` of the column's dtype."""
    values = raw.view(_numpy_dtype(col.dtype)).reshape(rows, *col.spec.row_shape)
    t = torch.from_numpy(values)
    return t.view(TORCH_DTYPES[col.dtype]) if col.dtype in _NUMPY_CARRIERS else t


def _check_indices(spec: FieldSpec, indices: torch.Tensor) -> None:
    flat = indices.values() if indices.is_nested else indices
    vocab = spec.shape[-1]
    if flat.numel() and vocab is not None and (int(flat.min()) < 0 or int(flat.max()) >= vocab):
        raise ValueError(
            f"field {spec.name!r}: stored top-k indices outside [0, {vocab}); the dump is "
            f"corrupt, run `lyceum knowledge verify`"
        )
