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

import math
import struct
import threading
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
    row_size = math.prod(row_shape)
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
        rows_arr = pa.FixedSizeListArray.from_arrays(pa.array(values, type=arrow_type), row_size)
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
    return pa.FixedSizeListArray.from_arrays(pa.array(values, type=arrow_type), row_size)


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


# An Arrow IPC stream is [schema message][record batch message][end-of-stream marker]. A
# teacher sends the same schema message in every reply, and serialising it (encode) or parsing
# and validating it (decode) was most of a small message's cost (16x1000 fp32: encode 18 ->
# 6 us, decode 95 -> ~45 us), so both sides remember the schema messages they have seen.
_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"
_CONTINUATION = 0xFFFFFFFF
# Explicit options: without them pyarrow reads two environment variables per writer.
_IPC_WRITE_OPTIONS = pa.ipc.IpcWriteOptions()
# Below this, joining [schema][batch.serialize()][EOS] (two copies of the values) is cheaper
# than a stream writer's fixed cost; above it, one copy into an exactly sized buffer wins.
JOIN_BELOW = 1 << 18
_CACHED_SCHEMAS = 32
_cache_lock = threading.Lock()
_schema_messages: list[tuple[pa.Schema, bytes]] = []


def _schema_message(arrow: pa.Schema) -> bytes:
    """The IPC schema message a stream of `arrow` batches starts with (cached)."""
    for known, message in _schema_messages:
        # equals() with metadata: 0.07 us, where hashing a pa.Schema costs ~5 us.
        if known.equals(arrow, check_metadata=True):
            return message
    message = arrow.serialize().to_pybytes()
    with _cache_lock:
        _schema_messages.insert(0, (arrow, message))
        del _schema_messages[_CACHED_SCHEMAS:]
    return message


def ipc_parts(batch: pa.RecordBatch) -> tuple[bytes, pa.Buffer, bytes]:
    """The three pieces of `batch`'s IPC stream, for callers that join them with more bytes."""
    return _schema_message(batch.schema), batch.serialize(), _EOS


def ipc_size(batch: pa.RecordBatch) -> int:
    """The size in bytes of `to_ipc(batch)`, computed without serialising the values."""
    return len(_schema_message(batch.schema)) + pa.ipc.get_record_batch_size(batch) + len(_EOS)


def write_ipc(sink: pa.NativeFile, batch: pa.RecordBatch) -> None:
    """Write `batch` to `sink` as one IPC stream, the bytes `to_ipc` returns."""
    with pa.ipc.RecordBatchStreamWriter(sink, batch.schema, options=_IPC_WRITE_OPTIONS) as writer:
        writer.write_batch(batch)


def to_ipc(batch: pa.RecordBatch) -> pa.Buffer:
    """One self-describing Arrow IPC stream (schema message + the batch + end of stream) in an
    exactly sized buffer."""
    size = ipc_size(batch)
    if size < JOIN_BELOW:
        return pa.py_buffer(b"".join(ipc_parts(batch)))
    buf = pa.allocate_buffer(size)
    sink = pa.FixedSizeBufferWriter(buf)
    write_ipc(sink, batch)
    sink.close()
    return buf


def encode(
    schema: KnowledgeSchema,
    sample_ids: Sequence[int] | np.ndarray | torch.Tensor,
    tensors: Mapping[str, torch.Tensor | Sequence[torch.Tensor]],
) -> pa.Buffer:
    """Tensors -> Arrow IPC bytes (a `pa.Buffer`; `memoryview(buf)` or `buf.to_pybytes()`)."""
    return to_ipc(to_record_batch(schema, sample_ids, tensors))


@dataclass
class _KnownSchema:
    """A schema message seen before: its parsed schema and its validations so far."""

    arrow: pa.Schema
    validated: dict[tuple[KnowledgeSchema | None, str], KnowledgeSchema]


_known_schemas: dict[bytes, _KnownSchema] = {}


def _schema_message_end(view: memoryview) -> int:
    """Where the leading schema message of an IPC stream ends, or 0 if it cannot be told."""
    if len(view) < 8:
        return 0
    continuation, length = struct.unpack_from("<Ii", view)
    end = 8 + length
    return end if continuation == _CONTINUATION and length > 0 and end <= len(view) else 0


def _read_known(buf: pa.Buffer) -> tuple[pa.RecordBatch, _KnownSchema] | None:
    """Read a stream whose schema message was seen before: only its batch message is parsed.
    None if the schema is new or anything is unusual; the full reader then decides."""
    view = memoryview(buf)
    end = _schema_message_end(view)
    known = _known_schemas.get(bytes(view[:end])) if end else None
    if known is None:
        return None
    reader = pa.BufferReader(buf.slice(end))
    try:
        message = pa.ipc.read_message(reader)
        if message.type != "record batch":
            return None
        batch = pa.ipc.read_record_batch(message, known.arrow)
    except (pa.ArrowException, OSError, ValueError):
        return None  # the full reader raises the error users know
    tail = view[end + reader.tell() :]
    # bytes(): a pa.Buffer's memoryview has format "b", which never equals bytes ("B").
    if tail.nbytes and (tail.nbytes != len(_EOS) or bytes(tail) != _EOS):
        return None  # more batches or trailing bytes: the full reader says which
    return batch, known


def _read_full(buf: pa.Buffer) -> pa.RecordBatch:
    try:
        batches = list(pa.ipc.open_stream(buf))
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise ValueError(
            f"knowledge message: not a valid Arrow IPC stream ({buf.size} bytes; "
            f"truncated or garbage?): {exc}"
        ) from exc
    if len(batches) != 1:
        raise ValueError(f"knowledge message: expected exactly 1 record batch, got {len(batches)}")
    return batches[0]


def _read(data: bytes | bytearray | memoryview | pa.Buffer) -> tuple[pa.RecordBatch, _KnownSchema]:
    buf = data if isinstance(data, pa.Buffer) else pa.py_buffer(data)
    found = _read_known(buf)
    if found is not None:
        return found
    batch = _read_full(buf)
    view = memoryview(buf)
    end = _schema_message_end(view)
    known = _KnownSchema(batch.schema, {})
    if end:
        with _cache_lock:
            if len(_known_schemas) >= _CACHED_SCHEMAS:
                _known_schemas.clear()
            _known_schemas[bytes(view[:end])] = known
    return batch, known


def read_ipc(data: bytes | bytearray | memoryview | pa.Buffer) -> pa.RecordBatch:
    """Parse one Arrow IPC stream holding exactly one record batch."""
    return _read(data)[0]


def decode(
    data: bytes | bytearray | memoryview | pa.Buffer, expected: KnowledgeSchema | None = None
) -> KnowledgeBatch:
    """Arrow IPC bytes -> validated `KnowledgeBatch` of zero-copy tensors."""
    batch, known = _read(data)
    where = "knowledge"
    schema = known.validated.get((expected, where))
    if schema is None:
        schema = validate_arrow_schema(known.arrow, expected, where)
        known.validated[(expected, where)] = schema
    return _view(batch, schema, where)


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


def _fixed_values(col: pa.FixedSizeListArray) -> pa.Array:
    """The child values of a FixedSizeList's rows (what `flatten()` returns for a column
    without nulls, but without pyarrow.compute's ~15 us dispatch per call)."""
    size = col.type.list_size
    return col.values.slice(col.offset * size, len(col) * size)


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
        col = col.values.slice(int(raw[0]), int(raw[-1] - raw[0])) if raw.size else col.values
        if col.null_count:
            raise ValueError(f"column {column!r}: null rows inside sequences")
    values = _primitive_numpy(_fixed_values(col), column).reshape(-1, *spec.row_shape)
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
    return _view(batch, validate_arrow_schema(batch.schema, expected, where), where)


def _view(batch: pa.RecordBatch, schema: KnowledgeSchema, where: str) -> KnowledgeBatch:
    """Tensors of a batch whose Arrow schema was validated as `schema`."""
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
