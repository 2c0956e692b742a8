"""The knowledge codec: tensors <-> Arrow record batches <-> Arrow IPC bytes, with validation.

This is the only module that knows the layout of a knowledge batch (ARCHITECTURE.md):

- a `sample_id: uint64` column, then one column per field (two for top-k: `NAME.values`
  and `NAME.indices`), in schema order;
- a fixed per-sample shape is a FixedSizeList of the flattened values; a variable leading
  dimension is a LargeList of such FixedSizeLists (one entry per row of the sequence);
- bfloat16 travels as its 16-bit pattern, bool as one byte per value.

Decoding is zero-copy where the dtype allows: each tensor is a view of the Arrow buffer it
came from (of the message bytes, or of a memory-mapped file). Treat decoded tensors as
read-only; `.clone()` before editing them in place. Variable-length fields decode to a
`torch.nested` jagged tensor (values and offsets, both views of the Arrow buffers).

Bad input raises `ValueError` naming the field and what was expected vs what came.

Behind it: `_ipc` frames a record batch as Arrow IPC bytes and back, `_columns` holds the
dtype carriers and the column views, and `_schema_cache` remembers what each schema costs to
build, serialise, parse and validate, so a stream pays for it once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from lyceum.proto._columns import (
    DTYPE_NAMES,
    NUMPY_CARRIERS,
    TORCH_DTYPES,
    check_values,
    column_arrays,
    column_dtype,
    flat_numpy,
    numpy_dtype,
    primitive_numpy,
    tensor_view,
)
from lyceum.proto._ipc import COMPRESSIONS, Compression, ipc_size, read_ipc, read_stream, to_ipc
from lyceum.proto._schema_cache import SCHEMAS, SchemaEntry
from lyceum.proto._topk_indices import ef_encode, pack_indices
from lyceum.proto._topk_values import encode_values
from lyceum.proto.schema import (
    SAMPLE_ID,
    FieldSpec,
    KnowledgeSchema,
)

__all__ = [
    "COMPRESSIONS",
    "DTYPE_NAMES",
    "NUMPY_CARRIERS",
    "TORCH_DTYPES",
    "Compression",
    "KnowledgeBatch",
    "arrow_schema",
    "check_unique_ids",
    "check_values",
    "column_arrays",
    "concat_batches",
    "decode",
    "encode",
    "from_record_batch",
    "ipc_size",
    "numpy_dtype",
    "read_ipc",
    "schema_difference",
    "tensor_view",
    "to_ipc",
    "to_record_batch",
    "validate_arrow_schema",
]

_MAX_SAMPLE_ID = 2**63 - 1


@dataclass(frozen=True)
class KnowledgeBatch:
    """A decoded batch: sample ids (int64) and one tensor per column, keyed by column name."""

    sample_ids: torch.Tensor
    tensors: dict[str, torch.Tensor]
    schema: KnowledgeSchema

    def __len__(self) -> int:
        return int(self.sample_ids.numel())


def arrow_schema(schema: KnowledgeSchema) -> pa.Schema:
    """`schema.to_arrow()`, cached: schemas are immutable and encoded once per batch."""
    return SCHEMAS.arrow(schema)


def _describe_tensor(t: torch.Tensor) -> str:
    return f"{DTYPE_NAMES.get(t.dtype, str(t.dtype))} {list(t.shape[1:])}"


def _describe_expected(spec: FieldSpec, column: str) -> str:
    dtype = column_dtype(spec, column)
    return f"{dtype} {list('*' if d is None else d for d in spec.stored_shape)}"


def _sample_id_array(sample_ids: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(sample_ids, torch.Tensor):
        ids = sample_ids.detach().cpu().numpy()
    else:
        ids = np.asarray(sample_ids)
    if ids.ndim != 1:
        raise ValueError(f"sample ids: expected a 1-d sequence, got shape {list(ids.shape)}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"sample ids: expected integers, got {ids.dtype}")
    # uint64 ids (what the batcher and the clients pass) cannot be negative: skip numpy's
    # min/max reductions, ~4 us each on a small array, on every reply.
    if ids.dtype != np.uint64 and ids.size and (ids.min() < 0 or ids.max() > _MAX_SAMPLE_ID):
        raise ValueError(f"sample ids: must be in [0, 2**63), got min {ids.min()} max {ids.max()}")
    ids = ids.astype(np.uint64, copy=False)
    check_unique_ids(ids)
    return ids


def check_unique_ids(ids: np.ndarray) -> None:
    """Raise if any sample id appears twice (knowledge is joined by id)."""
    if ids.size < 2:
        return
    if ids.size <= 256:
        # A set beats numpy's sort + compare + reduce for the small batches most requests are.
        listed = ids.tolist()
        if len(set(listed)) == len(listed):
            return
    ordered = np.sort(ids)
    repeated = ordered[1:] == ordered[:-1]
    if repeated.any():
        dups = np.unique(ordered[1:][repeated])[:5].tolist()
        raise ValueError(
            f"sample ids: duplicate ids {dups} (each sample may appear once per batch)"
        )


def _column_array(
    spec: FieldSpec, column: str, value: torch.Tensor | Sequence[torch.Tensor], rows: int
) -> pa.Array:
    dtype = column_dtype(spec, column)
    want = TORCH_DTYPES[dtype]
    row_shape = list(spec.row_shape)
    arrow_type = spec.stored_arrow_type(column)
    stored_size = spec.stored_row_size(column)
    if spec.variable:
        pieces = _variable_pieces(spec, column, value, rows)
        lengths = np.fromiter((p.shape[0] for p in pieces), dtype=np.int64, count=len(pieces))
        for p in pieces:
            if p.dtype != want or list(p.shape[1:]) != row_shape:
                raise ValueError(
                    f"field {spec.name!r} column {column!r}: expected {_describe_expected(spec, column)}"
                    f", got {DTYPE_NAMES.get(p.dtype, str(p.dtype))} {['*', *p.shape[1:]]}"
                )
        flat = torch.cat([p.reshape(-1, *row_shape) for p in pieces]) if pieces else None
        values = flat_numpy(flat, dtype) if flat is not None else np.empty(0, numpy_dtype(dtype))
        values = _coded(spec, column, values)
        rows_arr = pa.FixedSizeListArray.from_arrays(pa.array(values, type=arrow_type), stored_size)
        offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return pa.LargeListArray.from_arrays(pa.array(offsets), rows_arr)
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"field {spec.name!r} column {column!r}: expected a tensor, got {type(value).__name__}"
        )
    if value.dtype != want or list(value.shape[1:]) != row_shape or value.shape[0] != rows:
        raise ValueError(
            f"field {spec.name!r} column {column!r}: expected {_describe_expected(spec, column)} "
            f"for {rows} samples, got {_describe_tensor(value)} for {value.shape[0] if value.dim() else 0}"
        )
    values = _coded(spec, column, flat_numpy(value, dtype))
    return pa.FixedSizeListArray.from_arrays(pa.array(values, type=arrow_type), stored_size)


def _coded(spec: FieldSpec, column: str, flat: np.ndarray) -> np.ndarray:
    """A column's flat values (int32 indices, or values in the field's numpy type) as the
    flat stored items: indices in their width or Elias-Fano code, 8-bit values coded."""
    where = f"field {spec.name!r} column {column!r}"
    if column.endswith(".indices"):
        rows = flat.reshape(-1, spec.row_size)
        if spec.index_code == "elias_fano":
            assert spec.shape[-1] is not None  # a top-k field has a fixed last dimension
            return ef_encode(rows, spec.shape[-1], where).reshape(-1)
        return pack_indices(rows, spec.index_bits, where).reshape(-1)
    if spec.value_bits is None:
        return flat
    rows = flat.reshape(-1, spec.row_size)
    if spec.dtype == "bfloat16":
        rows = tensor_view(rows, "bfloat16").float().numpy()
    return encode_values(rows, where).reshape(-1)


def _sorted_by_index(
    spec: FieldSpec,
    values: torch.Tensor | Sequence[torch.Tensor],
    indices: torch.Tensor | Sequence[torch.Tensor],
) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor | list[torch.Tensor]]:
    """An Elias-Fano field's values and indices with each row in ascending index order
    (the order the code stores them in)."""

    def one(v: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if v.shape != i.shape:
            raise ValueError(
                f"field {spec.name!r}: top-k values {list(v.shape)} and indices "
                f"{list(i.shape)} differ in shape"
            )
        ordered, order = torch.sort(i, dim=-1)
        return v.gather(-1, order), ordered

    if isinstance(values, torch.Tensor) and not values.is_nested:
        if not isinstance(indices, torch.Tensor) or indices.is_nested:
            raise ValueError(f"field {spec.name!r}: values and indices must be alike")
        return one(values, indices)
    vs = list(values.unbind()) if isinstance(values, torch.Tensor) else list(values)
    ix = list(indices.unbind()) if isinstance(indices, torch.Tensor) else list(indices)
    if len(vs) != len(ix):
        raise ValueError(
            f"field {spec.name!r}: {len(vs)} samples of values but {len(ix)} of indices"
        )
    pairs = [one(v, i) for v, i in zip(vs, ix, strict=True)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _variable_pieces(
    spec: FieldSpec, column: str, value: torch.Tensor | Sequence[torch.Tensor], rows: int
) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor) and value.is_nested:
        pieces = list(value.unbind())
    elif isinstance(value, torch.Tensor):
        raise ValueError(
            f"field {spec.name!r} column {column!r} has a variable leading dimension: pass a "
            f"list of per-sample tensors or a torch.nested jagged tensor, not a dense tensor"
        )
    else:
        pieces = list(value)
    if len(pieces) != rows:
        raise ValueError(
            f"field {spec.name!r} column {column!r}: expected {rows} samples, got {len(pieces)}"
        )
    return pieces


def to_record_batch(
    schema: KnowledgeSchema,
    sample_ids: Sequence[int] | np.ndarray | torch.Tensor,
    tensors: Mapping[str, torch.Tensor | Sequence[torch.Tensor]],
) -> pa.RecordBatch:
    """Build a knowledge record batch; `tensors` is keyed by column name (`schema.columns`)."""
    ids = _sample_id_array(sample_ids)
    expected = schema.columns
    missing = [c for c in expected if c not in tensors]
    extra = [c for c in tensors if c not in expected]
    if missing or extra:
        raise ValueError(
            f"knowledge columns: missing {missing}, unexpected {extra}; the schema's columns "
            f"are {list(expected)}"
        )
    arrays: list[pa.Array] = [pa.array(ids, type=pa.uint64())]
    for spec in schema.fields:
        columns = {c: tensors[c] for c in spec.columns}
        if spec.index_code == "elias_fano":
            values, indices = spec.columns
            columns[values], columns[indices] = _sorted_by_index(
                spec, tensors[values], tensors[indices]
            )
        for column in spec.columns:
            arrays.append(_column_array(spec, column, columns[column], len(ids)))
    return pa.RecordBatch.from_arrays(arrays, schema=arrow_schema(schema))


def encode(
    schema: KnowledgeSchema,
    sample_ids: Sequence[int] | np.ndarray | torch.Tensor,
    tensors: Mapping[str, torch.Tensor | Sequence[torch.Tensor]],
) -> pa.Buffer:
    """Tensors -> Arrow IPC bytes (a `pa.Buffer`; `memoryview(buf)` or `buf.to_pybytes()`)."""
    return to_ipc(to_record_batch(schema, sample_ids, tensors))


def decode(
    data: bytes | bytearray | memoryview | pa.Buffer, expected: KnowledgeSchema | None = None
) -> KnowledgeBatch:
    """Arrow IPC bytes -> validated `KnowledgeBatch` of zero-copy tensors."""
    batch, entry = read_stream(data)
    schema = _validated(entry.arrow, expected, "knowledge", entry)
    return _view(batch, schema, "knowledge")


def validate_arrow_schema(
    arrow: pa.Schema, expected: KnowledgeSchema | None = None, where: str = "knowledge"
) -> KnowledgeSchema:
    """Check an Arrow schema against its own metadata and, if given, the expected schema."""
    return _validated(arrow, expected, where, None)


def _validated(
    arrow: pa.Schema, expected: KnowledgeSchema | None, where: str, entry: SchemaEntry | None
) -> KnowledgeSchema:
    # Every message of a stream carries the same schema: it is validated once (per expected
    # schema and place), then found in the schema cache.
    return SCHEMAS.validated(
        arrow, expected, where, lambda: _validate(arrow, expected, where), entry
    )


def _validate(arrow: pa.Schema, expected: KnowledgeSchema | None, where: str) -> KnowledgeSchema:
    schema = KnowledgeSchema.from_arrow(arrow)
    if expected is not None and schema != expected:
        raise ValueError(f"{where}: schema mismatch: {schema_difference(expected, schema)}")
    want = arrow_schema(schema)
    got_names = arrow.names
    if got_names != want.names:
        missing = [n for n in want.names if n not in got_names]
        extra = [n for n in got_names if n not in want.names]
        raise ValueError(
            f"{where}: columns {got_names} do not match the schema's {want.names} "
            f"(missing {missing}, unexpected {extra})"
        )
    for w, g in zip(want, arrow, strict=True):
        if not w.type.equals(g.type):
            raise ValueError(
                f"{where}: column {g.name!r}: expected Arrow type {w.type}, got {g.type}"
            )
    return schema


def schema_difference(expected: KnowledgeSchema, got: KnowledgeSchema) -> str:
    """A one-line description of how two schemas differ, naming the first differing field."""
    if expected.names != got.names:
        missing = [n for n in expected.names if n not in got.names]
        extra = [n for n in got.names if n not in expected.names]
        return (
            f"expected fields {list(expected.names)}, got {list(got.names)} "
            f"(missing {missing}, unexpected {extra})"
        )
    for e, g in zip(expected.fields, got.fields, strict=True):
        if e != g:
            return f"field {e.name!r}: expected {e.describe()}, got {g.describe()}"
    return f"expected format {expected.format_version}, got {got.format_version}"


def from_record_batch(
    batch: pa.RecordBatch, expected: KnowledgeSchema | None = None, where: str = "knowledge"
) -> KnowledgeBatch:
    """Validate a knowledge record batch and view it as tensors (no copies where possible)."""
    return _view(batch, validate_arrow_schema(batch.schema, expected, where), where)


def _view(batch: pa.RecordBatch, schema: KnowledgeSchema, where: str) -> KnowledgeBatch:
    """Tensors of a batch whose Arrow schema was validated as `schema`."""
    ids = primitive_numpy(batch.column(0), SAMPLE_ID)
    check_unique_ids(ids)
    if ids.size and int(ids.max()) > _MAX_SAMPLE_ID:
        raise ValueError(f"{where}: sample ids must be < 2**63, got {int(ids.max())}")
    tensors: dict[str, torch.Tensor] = {}
    for spec in schema.fields:
        first_offsets: np.ndarray | None = None
        offsets_t: torch.Tensor | None = None
        for column in spec.columns:
            values, offsets = column_arrays(batch, spec, column)
            check_values(spec, column, values)
            t = tensor_view(values, column_dtype(spec, column))
            if offsets is None:
                tensors[column] = t
                continue
            if first_offsets is not None and not np.array_equal(first_offsets, offsets):
                raise ValueError(
                    f"field {spec.name!r}: values and indices have different sequence lengths"
                )
            if offsets_t is None:
                # One offsets tensor per field: values and indices then share the same
                # ragged dimension and can be combined in one expression.
                first_offsets, offsets_t = offsets, tensor_view(offsets, "int64")
            tensors[column] = torch.nested.nested_tensor_from_jagged(t, offsets=offsets_t)
    return KnowledgeBatch(
        sample_ids=tensor_view(ids.view(np.int64), "int64"), tensors=tensors, schema=schema
    )


def concat_batches(batches: Sequence[KnowledgeBatch]) -> KnowledgeBatch:
    """One batch holding the rows of `batches` in order (same schema; jagged fields too)."""
    if len(batches) == 1:
        return batches[0]
    schema = batches[0].schema
    tensors: dict[str, torch.Tensor] = {}
    for column in batches[0].tensors:
        parts = [b.tensors[column] for b in batches]
        if parts[0].is_nested:
            values = torch.cat([p.values() for p in parts])
            # The jagged NestedTensor has offsets(); torch's Tensor stubs do not list it.
            lengths = torch.cat([p.offsets().diff() for p in parts])  # type: ignore[attr-defined]
            offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
            torch.cumsum(lengths, 0, out=offsets[1:])
            tensors[column] = torch.nested.nested_tensor_from_jagged(values, offsets=offsets)
        else:
            tensors[column] = torch.cat(parts)
    ids = torch.cat([b.sample_ids for b in batches])
    return KnowledgeBatch(sample_ids=ids, tensors=tensors, schema=schema)
