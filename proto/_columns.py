"""How a knowledge column's values are held: dtypes and their carriers, numpy views of Arrow
columns, tensors of those views, and the checks on stored values.

bfloat16 has no numpy or Arrow type: it travels as its 16-bit pattern (uint16), bool as one
byte per value (uint8). Those carriers are the one place that says so; the codec, the
offline reader and anything that gathers stored rows convert through them.
"""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import torch

from lyceum.proto._topk_indices import ef_decode, stored_numpy_type, unpack_indices
from lyceum.proto._topk_values import decode_values
from lyceum.proto.schema import DType, FieldSpec

TORCH_DTYPES: dict[DType, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, DType] = {v: k for k, v in TORCH_DTYPES.items()}

NUMPY_CARRIERS: dict[DType, np.dtype] = {
    "bfloat16": np.dtype(np.uint16),
    "bool": np.dtype(np.uint8),
}
"""Same-size integer types that carry bfloat16 and bool through numpy and Arrow unchanged."""
# The torch side of each carrier (torch's uint16 has no numpy conversion in every version).
_TORCH_CARRIERS: dict[str, torch.dtype] = {"bfloat16": torch.int16, "bool": torch.uint8}

# Arrow buffers are read-only and sharing them is the point (zero-copy decoding); torch warns
# about every such view. The filter is limited to this module's calls (a catch_warnings block
# around each call cost 10-20 us per column).
warnings.filterwarnings(
    "ignore", message="The given NumPy array is not writable", module=r"lyceum\.proto\._columns"
)


def column_dtype(spec: FieldSpec, column: str) -> DType:
    """The decoded dtype of one of a field's columns: int32 for top-k indices (however
    narrowly they are stored, `stored_dtype`)."""
    return "int32" if column.endswith(".indices") else spec.dtype


def stored_dtype(spec: FieldSpec, column: str) -> np.dtype:
    """The numpy type of a column's stored items (bytes for bit-packed or Elias-Fano top-k
    indices and for 8-bit top-k values)."""
    if column.endswith(".indices"):
        if spec.index_code == "elias_fano":
            return np.dtype(np.uint8)
        return stored_numpy_type(spec.index_bits)
    if spec.value_bits is not None:
        return np.dtype(np.uint8)
    return numpy_dtype(spec.dtype)


def decode_stored(spec: FieldSpec, column: str, stored: np.ndarray) -> np.ndarray:
    """A column's stored rows `[rows, stored_row_size]` as values `[rows, *row_shape]` in
    their numpy type: a view, except for top-k indices narrower than 32 bits (unpacked) and
    8-bit top-k values (decoded to the field's dtype)."""
    if column.endswith(".indices"):
        if spec.index_code == "elias_fano":
            assert spec.shape[-1] is not None  # a top-k field has a fixed last dimension
            stored = ef_decode(stored, spec.shape[-1], spec.row_size)
        else:
            stored = unpack_indices(stored, spec.index_bits, spec.row_size)
    elif spec.value_bits is not None:
        stored = _as_dtype(decode_values(stored, spec.row_size), spec.dtype)
    return stored.reshape(-1, *spec.row_shape)


def _as_dtype(values: np.ndarray, dtype: DType) -> np.ndarray:
    """float32 values in `dtype`'s numpy type (bfloat16 as its bit pattern)."""
    if dtype == "bfloat16":
        return flat_numpy(torch.from_numpy(values).to(torch.bfloat16), dtype).reshape(values.shape)
    return values.astype(numpy_dtype(dtype), copy=False)


def numpy_dtype(dtype: DType) -> np.dtype:
    """The numpy type that holds values of `dtype` (its carrier for bfloat16 and bool)."""
    carrier = NUMPY_CARRIERS.get(dtype)
    return carrier if carrier is not None else np.dtype(dtype)


def flat_numpy(t: torch.Tensor, dtype: DType) -> np.ndarray:
    """A tensor's values as a flat numpy array of `dtype`'s numpy type (a view if possible)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if dtype in _TORCH_CARRIERS:
        t = t.view(_TORCH_CARRIERS[dtype])
    arr = t.numpy().reshape(-1)
    return arr.view(np.uint16) if dtype == "bfloat16" else arr


def tensor_view(values: np.ndarray, dtype: DType) -> torch.Tensor:
    """A tensor of `dtype` viewing numpy `values` held in that dtype's numpy type (no copy)."""
    t = torch.from_numpy(values)
    return t.view(TORCH_DTYPES[dtype]) if dtype in NUMPY_CARRIERS else t


def primitive_numpy(arr: pa.Array, column: str) -> np.ndarray:
    """A zero-copy numpy view of a primitive Arrow array without nulls."""
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
    """Numpy arrays of one column: values `[rows, *row_shape]` (`decode_stored`: zero-copy
    views but for narrow top-k indices) and, for variable fields, int64 offsets
    `[samples + 1]` into those rows (starting at 0)."""
    stored, offsets = stored_arrays(batch, spec, column)
    return decode_stored(spec, column, stored), offsets


def stored_arrays(
    batch: pa.RecordBatch, spec: FieldSpec, column: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Zero-copy numpy views of one column as stored: rows `[rows, stored_row_size]` and,
    for variable fields, int64 offsets `[samples + 1]` into those rows (starting at 0)."""
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
    values = primitive_numpy(_fixed_values(col), column).reshape(-1, spec.stored_row_size(column))
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


def check_values(spec: FieldSpec, column: str, values: np.ndarray) -> None:
    """Raise unless stored values are in range: top-k indices inside the vocabulary, bools 0
    or 1 (`values` in the column's numpy type)."""
    if values.size == 0:
        return
    if column.endswith(".indices"):
        lo, hi = int(values.min()), int(values.max())
        vocab = spec.shape[-1]
        if vocab is None:  # FieldSpec refuses a top-k field without a fixed last dimension
            raise ValueError(f"field {spec.name!r}: top-k needs a fixed last dimension")
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"field {spec.name!r}: top-k indices must be in [0, {vocab}), got [{lo}, {hi}]"
            )
    elif spec.dtype == "bool" and int(values.max()) > 1:
        raise ValueError(
            f"field {spec.name!r}: bool values must be 0 or 1, got {int(values.max())}"
        )
