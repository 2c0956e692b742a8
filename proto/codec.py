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
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa
import torch

from lyceum.proto.schema import (
    ARROW_VALUE_TYPES,
    METADATA_SCHEMA_KEY,
    METADATA_VERSION_KEY,
    SAMPLE_ID,
    TOPK_INDEX_TYPE,
    DType,
    FieldSpec,
    KnowledgeSchema,
)

TORCH_DTYPES: dict[DType, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, DType] = {v: k for k, v in TORCH_DTYPES.items()}

# Same-size integer types used to move bfloat16 and bool through numpy/Arrow unchanged.
_CARRIER: dict[str, torch.dtype] = {"bfloat16": torch.int16, "bool": torch.uint8}
_MAX_SAMPLE_ID = 2**63 - 1

# Arrow buffers are read-only and sharing them is the point (see the module docstring);
# torch warns about every such view. The filter is limited to this module's calls (a
# catch_warnings block around each call cost 10-20 us per column).
warnings.filterwarnings(
    "ignore", message="The given NumPy array is not writable", module=r"lyceum\.proto\.codec"
)


@dataclass(frozen=True)
class KnowledgeBatch:
    """A decoded batch: sample ids (int64) and one tensor per column, keyed by column name."""

    sample_ids: torch.Tensor
    tensors: dict[str, torch.Tensor]
    schema: KnowledgeSchema

    def __len__(self) -> int:
        return int(self.sample_ids.numel())


@lru_cache(maxsize=64)
def arrow_schema(schema: KnowledgeSchema) -> pa.Schema:
    """`schema.to_arrow()`, cached: schemas are immutable and encoded once per batch."""
    return schema.to_arrow()


def _describe_tensor(t: torch.Tensor) -> str:
    return f"{DTYPE_NAMES.get(t.dtype, str(t.dtype))} {list(t.shape[1:])}"


def _describe_expected(spec: FieldSpec, column: str) -> str:
    dtype = "int32" if column.endswith(".indices") else spec.dtype
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
    if ids.size and (ids.min() < 0 or (ids.dtype != np.uint64 and ids.max() > _MAX_SAMPLE_ID)):
        raise ValueError(f"sample ids: must be in [0, 2**63), got min {ids.min()} max {ids.max()}")
    ids = ids.astype(np.uint64, copy=False)
    check_unique_ids(ids)
    return ids


def check_unique_ids(ids: np.ndarray) -> None:
    """Raise if any sample id appears twice (knowledge is joined by id)."""
    if ids.size < 2:
        return
    ordered = np.sort(ids)
    repeated = ordered[1:] == ordered[:-1]
    if repeated.any():
        dups = np.unique(ordered[1:][repeated])[:5].tolist()
        raise ValueError(
            f"sample ids: duplicate ids {dups} (each sample may appear once per batch)"
        )


def _flat_numpy(t: torch.Tensor, dtype: str) -> np.ndarray:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if dtype in _CARRIER:
        t = t.view(_CARRIER[dtype])
    arr = t.numpy().reshape(-1)
    return arr.view(np.uint16) if dtype == "bfloat16" else arr


def _column_array(
    spec: FieldSpec, column: str, value: torch.Tensor | Sequence[torch.Tensor], rows: int
) -> pa.Array:
    is_index = column.endswith(".indices")
    dtype = "int32" if is_index else spec.dtype
    want = TORCH_DTYPES[dtype]
    row_shape = list(spec.row_shape)
    arrow_type = TOPK_INDEX_TYPE if is_index else ARROW_VALUE_TYPES[spec.dtype]
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
        values = (
            _flat_numpy(flat, dtype)
            if flat is not None
            else np.empty(0, arrow_type.to_pandas_dtype())
        )
        rows_arr = pa.FixedSizeListArray.from_arrays(
            pa.array(values, type=arrow_type), spec.row_size
        )
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
    values = _flat_numpy(value, dtype)
    return pa.FixedSizeListArray.from_arrays(pa.array(values, type=arrow_type), spec.row_size)


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
        for column in spec.columns:
            arrays.append(_column_array(spec, column, tensors[column], len(ids)))
    return pa.RecordBatch.from_arrays(arrays, schema=arrow_schema(schema))


def to_ipc(batch: pa.RecordBatch) -> pa.Buffer:
    """One self-describing Arrow IPC stream (schema message + the batch)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def encode(
    schema: KnowledgeSchema,
    sample_ids: Sequence[int] | np.ndarray | torch.Tensor,
    tensors: Mapping[str, torch.Tensor | Sequence[torch.Tensor]],
) -> pa.Buffer:
    """Tensors -> Arrow IPC bytes (a `pa.Buffer`; `memoryview(buf)` or `buf.to_pybytes()`)."""
    return to_ipc(to_record_batch(schema, sample_ids, tensors))


def read_ipc(data: bytes | bytearray | memoryview | pa.Buffer) -> pa.RecordBatch:
    """Parse one Arrow IPC stream holding exactly one record batch."""
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data) if not isinstance(data, pa.Buffer) else data)
        batches = list(reader)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise ValueError(
            f"knowledge message: not a valid Arrow IPC stream ({len(memoryview(data))} bytes; "
            f"truncated or garbage?): {exc}"
        ) from exc
    if len(batches) != 1:
        raise ValueError(f"knowledge message: expected exactly 1 record batch, got {len(batches)}")
    return batches[0]


def decode(
    data: bytes | bytearray | memoryview | pa.Buffer, expected: KnowledgeSchema | None = None
) -> KnowledgeBatch:
    """Arrow IPC bytes -> validated `KnowledgeBatch` of zero-copy tensors."""
    return from_record_batch(read_ipc(data), expected)


def validate_arrow_schema(
    arrow: pa.Schema, expected: KnowledgeSchema | None = None, where: str = "knowledge"
) -> KnowledgeSchema:
    """Check an Arrow schema against its own metadata and, if given, the expected schema."""
    meta = arrow.metadata or {}
    # Every message of a stream carries the same schema: validate it once. The metadata is
    # part of the key because pa.Schema equality ignores metadata.
    return _validated_schema(
        arrow, meta.get(METADATA_SCHEMA_KEY), meta.get(METADATA_VERSION_KEY), expected, where
    )


@lru_cache(maxsize=256)
def _validated_schema(
    arrow: pa.Schema,
    _schema_meta: bytes | None,
    _version_meta: bytes | None,
    expected: KnowledgeSchema | None,
    where: str,
) -> KnowledgeSchema:
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


def _primitive_numpy(arr: pa.Array, column: str) -> np.ndarray:
    if arr.null_count:
        raise ValueError(f"column {column!r}: {arr.null_count} null values; knowledge has no nulls")
    return arr.to_numpy(zero_copy_only=True)


def column_arrays(
    batch: pa.RecordBatch, spec: FieldSpec, column: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Zero-copy numpy views of one column: values `[rows, *row_shape]` and, for variable
    fields, int64 offsets `[samples + 1]` into those rows (starting at 0)."""
    col = batch.column(column)
    if col.null_count:
        raise ValueError(
            f"column {column!r}: {col.null_count} null entries; knowledge has no nulls"
        )
    offsets: np.ndarray | None = None
    if spec.variable:
        raw = col.offsets.to_numpy(zero_copy_only=True)
        offsets = raw - raw[0] if raw.size and raw[0] else raw
        col = col.flatten()
        if col.null_count:
            raise ValueError(f"column {column!r}: null rows inside sequences")
    values = _primitive_numpy(col.flatten(), column).reshape(-1, *spec.row_shape)
    # Offsets come from the sender: they must step forward and end at the rows that exist,
    # or the jagged tensor built on them would read out of bounds later.
    if (
        offsets is not None
        and offsets.size
        and (offsets[-1] != len(values) or (offsets.size > 1 and np.any(np.diff(offsets) < 0)))
    ):
        raise ValueError(
            f"column {column!r}: sequence offsets are not increasing or do not end at the "
            f"{len(values)} rows the column holds (corrupt or forged message)"
        )
    return values, offsets


def _to_tensor(values: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(values)
    if dtype == "bfloat16":
        return t.view(torch.bfloat16)
    if dtype == "bool":
        return t.view(torch.bool)
    return t


def _check_values(spec: FieldSpec, column: str, values: np.ndarray) -> None:
    if values.size == 0:
        return
    if column.endswith(".indices"):
        lo, hi = int(values.min()), int(values.max())
        vocab = spec.shape[-1]
        assert vocab is not None  # guaranteed by FieldSpec validation for top-k fields
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"field {spec.name!r}: top-k indices must be in [0, {vocab}), got [{lo}, {hi}]"
            )
    elif spec.dtype == "bool" and int(values.max()) > 1:
        raise ValueError(
            f"field {spec.name!r}: bool values must be 0 or 1, got {int(values.max())}"
        )


def from_record_batch(
    batch: pa.RecordBatch, expected: KnowledgeSchema | None = None, where: str = "knowledge"
) -> KnowledgeBatch:
    """Validate a knowledge record batch and view it as tensors (no copies where possible)."""
    schema = validate_arrow_schema(batch.schema, expected, where)
    ids = _primitive_numpy(batch.column(0), SAMPLE_ID)
    check_unique_ids(ids)
    if ids.size and int(ids.max()) > _MAX_SAMPLE_ID:
        raise ValueError(f"{where}: sample ids must be < 2**63, got {int(ids.max())}")
    tensors: dict[str, torch.Tensor] = {}
    for spec in schema.fields:
        first_offsets: np.ndarray | None = None
        offsets_t: torch.Tensor | None = None
        for column in spec.columns:
            dtype = "int32" if column.endswith(".indices") else spec.dtype
            values, offsets = column_arrays(batch, spec, column)
            _check_values(spec, column, values)
            t = _to_tensor(values, dtype)
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
                first_offsets, offsets_t = offsets, _to_tensor(offsets, "int64")
            tensors[column] = torch.nested.nested_tensor_from_jagged(t, offsets=offsets_t)
    return KnowledgeBatch(
        sample_ids=_to_tensor(ids.view(np.int64), "int64"), tensors=tensors, schema=schema
    )
