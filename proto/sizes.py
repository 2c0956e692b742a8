"""How many bytes a knowledge message takes, from its schema and its samples' lengths.

Both sides of a wire need it: a student cuts its requests so that no reply can exceed the
teacher's message limit (`Describe.max_message_bytes`), a teacher sizes its limit, and a
bench counts bytes per token. The figures are upper bounds of the uncompressed Arrow IPC
stream `codec.encode` writes (`ipc_size` gives the exact size of a built batch): every buffer
is padded to 8 bytes, and a message adds its schema and batch headers.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

from lyceum.proto._columns import stored_dtype
from lyceum.proto.schema import FieldSpec, KnowledgeSchema

__all__ = ["MessageCost", "message_bytes", "message_cost", "sample_bytes"]

_ID_BYTES = 8  # sample_id: uint64
_OFFSET_BYTES = 8  # a LargeList offset: int64
_PADDING = 8  # each buffer of a column padded to 8 bytes
_HEADERS = 16 << 10  # the schema message (the schema's JSON included) and batch metadata


def sample_bytes(spec: FieldSpec, length: int) -> int:
    """Stored bytes of one sample of `spec` (a sequence field: of `length` positions)."""
    rows = length if spec.variable else 1
    size = _OFFSET_BYTES if spec.variable else 0
    for column in spec.columns:
        size += rows * spec.stored_row_size(column) * stored_dtype(spec, column).itemsize
    return size


def message_bytes(schema: KnowledgeSchema, lengths: Sequence[int]) -> int:
    """An upper bound of the IPC message holding samples of these sequence lengths (0 for
    samples without a sequence: only fixed-shape fields count then)."""
    columns = len(schema.columns) + 1
    fixed = _HEADERS + len(schema.to_json()) + columns * 3 * _PADDING
    per_sample = sum(sample_bytes(f, 0) for f in schema.fields if not f.variable) + _ID_BYTES
    variable = [f for f in schema.fields if f.variable]
    total = fixed + len(lengths) * per_sample
    for spec in variable:
        total += sum(sample_bytes(spec, n) for n in lengths)
    return total


class MessageCost(NamedTuple):
    """`message_bytes` as a line: `fixed + sum(per_sample + per_position * length)`."""

    fixed: int
    per_sample: int
    per_position: int
    sequences: bool  # whether lengths count (the schema has a sequence field)


@lru_cache(maxsize=16)
def message_cost(schema: KnowledgeSchema) -> MessageCost:
    """The coefficients of `message_bytes` for `schema` (computed once per schema)."""
    fixed = message_bytes(schema, [])
    empty = message_bytes(schema, [0])
    return MessageCost(
        fixed,
        empty - fixed,
        message_bytes(schema, [1]) - empty,
        any(f.variable for f in schema.fields),
    )
