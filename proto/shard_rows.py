"""Row addressing of a knowledge shard: where each sample's stored values lie in the bytes of
a memory-mapped Arrow file (`lyceum teacher dump` writes them, the student reads them by id).

Why by byte offset: `Table.take` over memory-mapped, many-chunk tables runs at about
0.01 GB/s, and even one numpy take per record batch pays a fixed cost per batch touched,
which for shuffled ids is nearly every batch. Instead every column's rows of every record
batch are addressed by their byte offset inside the shard's mapping: a row of `row_bytes` at
offset p is element p of `byte_rows(whole, row_bytes)`, a numpy view of the whole file whose
items are `row_bytes` wide with a stride of one byte. One fancy-index per column per shard
touched then copies every requested row (a memcpy each), whichever record batch holds it.
(Fancy indexing, not `ndarray.take`: take would first copy the non-contiguous view whole.)

A fixed-shape column's row r of record batch b starts at `base[b] + r * row_bytes`. A
sequence column (a LargeList of rows) has two: its int64 list offsets (`list_offset_rows`:
sample r's [lo, hi) are the offsets at r and r + 1) and its value rows (`value_rows`, row
index = list offset).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from lyceum.proto._columns import (
    check_values,
    column_dtype,
    decode_stored,
    stored_arrays,
    stored_dtype,
    tensor_view,
)
from lyceum.proto.schema import DType, FieldSpec

__all__ = [
    "OFFSET_BYTES",
    "ColumnRows",
    "MappedShard",
    "Rows",
    "byte_rows",
    "list_offset_rows",
    "value_rows",
]

OFFSET_BYTES = 8
"""A LargeList offset is an int64."""


@dataclass(frozen=True)
class MappedShard:
    """A shard file's whole memory mapping and its record batches (views into it)."""

    file: str
    whole: pa.Buffer
    batches: Sequence[pa.RecordBatch]


def byte_rows(whole: pa.Buffer, row_bytes: int) -> np.ndarray:
    """The whole mapping as items of `row_bytes` bytes at every byte offset (no copy)."""
    return np.ndarray(
        shape=(max(whole.size - row_bytes + 1, 0),),
        dtype=np.dtype((np.void, row_bytes)),
        buffer=whole,
        strides=(1,),
    )


@dataclass(frozen=True)
class Rows:
    """Fixed-size rows in shard files: row r of record batch b (numbered over all shards, in
    order) starts at byte `base[b] + r * row_bytes` of its shard."""

    base: np.ndarray  # int64, one per record batch
    row_bytes: int

    def at(self, batch: np.ndarray, row: np.ndarray) -> np.ndarray:
        """File offsets of rows `row` of record batches `batch`."""
        return self.base[batch] + row * self.row_bytes


@dataclass(frozen=True)
class ColumnRows(Rows):
    """The value rows of one stored column (for sequence fields, indexed by list offset)."""

    spec: FieldSpec
    name: str
    dtype: DType

    def tensor(self, raw: np.ndarray, rows: int, where: str) -> torch.Tensor:
        """Gathered rows (`raw`: `rows` items of `row_bytes`) as a tensor `[rows, *row_shape]`
        of the column's dtype, its values checked (`where` names the dump in the error)."""
        stored = raw.view(stored_dtype(self.spec, self.name)).reshape(
            rows, self.spec.stored_row_size(self.name)
        )
        values = decode_stored(self.spec, self.name, stored)
        try:
            check_values(self.spec, self.name, values)
        except ValueError as exc:
            raise ValueError(
                f"{where}: {exc}: the stored values are corrupt; run `lyceum knowledge verify`"
            ) from None
        return tensor_view(values, self.dtype)


def _file_offset(shard: MappedShard, array: np.ndarray, what: str) -> int:
    """Offset of a zero-copy numpy view inside its shard's mapping."""
    offset = int(array.ctypes.data) - shard.whole.address
    if not array.flags.c_contiguous or offset < 0 or offset + array.nbytes > shard.whole.size:
        raise ValueError(f"shard {shard.file!r}: {what} is not inside the mapped file")
    return offset


def value_rows(spec: FieldSpec, column: str, shards: Sequence[MappedShard]) -> ColumnRows:
    """Where `column`'s value rows lie in every record batch of `shards`."""
    dtype = column_dtype(spec, column)
    row_bytes = spec.stored_row_size(column) * stored_dtype(spec, column).itemsize
    base = []
    for shard in shards:
        for batch in shard.batches:
            values, _ = stored_arrays(batch, spec, column)
            offset = _file_offset(shard, values, f"column {column!r}")
            if spec.variable:
                # `values` starts at list offset raw[0]; rows are addressed by raw offsets.
                raw = batch.column(column).offsets.to_numpy(zero_copy_only=True)
                offset -= int(raw[0]) * row_bytes
            base.append(offset)
    return ColumnRows(np.asarray(base, dtype=np.int64), row_bytes, spec, column, dtype)


def list_offset_rows(spec: FieldSpec, shards: Sequence[MappedShard]) -> Rows:
    """Where a sequence field's int64 list offsets lie in every record batch of `shards`
    (checking that its columns, values and indices, have the same sequence lengths)."""
    base = []
    for shard in shards:
        for batch in shard.batches:
            raw = batch.column(spec.columns[0]).offsets.to_numpy(zero_copy_only=True)
            for other in spec.columns[1:]:
                theirs = batch.column(other).offsets.to_numpy(zero_copy_only=True)
                if not np.array_equal(raw - raw[0], theirs - theirs[0]):
                    raise ValueError(
                        f"shard {shard.file!r}: field {spec.name!r}: values and indices have "
                        f"different sequence lengths"
                    )
            base.append(_file_offset(shard, raw, f"offsets of {spec.name!r}"))
    return Rows(np.asarray(base, dtype=np.int64), OFFSET_BYTES)
