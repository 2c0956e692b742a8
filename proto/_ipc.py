"""Arrow IPC messages: a knowledge batch as the bytes that cross a socket, and back.

One message is one Arrow IPC stream: [schema message][record batch message][end-of-stream
marker], self-describing. Its body may be compressed with Arrow's own IPC body compression
(`Compression`: zstd), which every Arrow reader undoes by itself; uncompressed bodies are
read zero-copy. A teacher sends the same schema message in every reply, so both
sides take it from the schema cache (`_schema_cache`): encoding joins the cached schema
message to the serialised batch, and decoding a stream whose schema message was seen before
parses only its batch message.
"""

from __future__ import annotations

import struct
from typing import Literal, TypeAlias

import pyarrow as pa

from lyceum.proto._schema_cache import SCHEMAS, SchemaEntry

__all__ = [
    "COMPRESSIONS",
    "JOIN_BELOW",
    "Compression",
    "ipc_parts",
    "ipc_size",
    "read_ipc",
    "read_stream",
    "to_ipc",
    "write_ipc",
    "write_options",
]

_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"
_CONTINUATION = 0xFFFFFFFF
# Explicit options: without them pyarrow reads two environment variables per writer.
_IPC_WRITE_OPTIONS = pa.ipc.IpcWriteOptions()
JOIN_BELOW = 1 << 18
"""Below this size, joining [schema][batch.serialize()][EOS] (two copies of the values) is
cheaper than a stream writer's fixed cost; above it, one copy into an exactly sized buffer."""

Data: TypeAlias = bytes | bytearray | memoryview | pa.Buffer
Compression = Literal["none", "zstd"]
COMPRESSIONS: tuple[Compression, ...] = ("none", "zstd")
_COMPRESSED_OPTIONS = {"zstd": pa.ipc.IpcWriteOptions(compression="zstd")}


def write_options(compression: Compression) -> pa.ipc.IpcWriteOptions:
    """Arrow IPC write options of a body compression ("none": the values as they are)."""
    return _COMPRESSED_OPTIONS.get(compression, _IPC_WRITE_OPTIONS)


def ipc_parts(batch: pa.RecordBatch) -> tuple[bytes, pa.Buffer, bytes]:
    """The three pieces of `batch`'s IPC stream, for callers that join them with more bytes."""
    return SCHEMAS.message(batch.schema), batch.serialize(), _EOS


def ipc_size(batch: pa.RecordBatch) -> int:
    """The size in bytes of `to_ipc(batch)`, computed without serialising the values."""
    schema_message = SCHEMAS.message(batch.schema)
    return len(schema_message) + pa.ipc.get_record_batch_size(batch) + len(_EOS)


def write_ipc(
    sink: pa.NativeFile, batch: pa.RecordBatch, compression: Compression = "none"
) -> None:
    """Write `batch` to `sink` as one IPC stream, the bytes `to_ipc` returns."""
    options = write_options(compression)
    with pa.ipc.RecordBatchStreamWriter(sink, batch.schema, options=options) as writer:
        writer.write_batch(batch)


def to_ipc(batch: pa.RecordBatch, compression: Compression = "none") -> pa.Buffer:
    """One self-describing Arrow IPC stream (schema message + the batch + end of stream) in an
    exactly sized buffer (uncompressed: its size is known before the values are copied)."""
    if compression != "none":
        stream = pa.BufferOutputStream()
        write_ipc(stream, batch, compression)
        return stream.getvalue()
    size = ipc_size(batch)
    if size < JOIN_BELOW:
        return pa.py_buffer(b"".join(ipc_parts(batch)))
    buf = pa.allocate_buffer(size)
    sink = pa.FixedSizeBufferWriter(buf)
    write_ipc(sink, batch)
    sink.close()
    return buf


def _schema_message_end(view: memoryview) -> int:
    """Where the leading schema message of an IPC stream ends, or 0 if it cannot be told."""
    if len(view) < 8:
        return 0
    continuation, length = struct.unpack_from("<Ii", view)
    end = 8 + length
    return end if continuation == _CONTINUATION and length > 0 and end <= len(view) else 0


def _read_known(
    buf: pa.Buffer, view: memoryview, end: int
) -> tuple[pa.RecordBatch, SchemaEntry] | None:
    """Read a stream whose schema message was seen before: only its batch message is parsed.
    None if the schema is new or anything is unusual; the full reader then decides."""
    known = SCHEMAS.received(bytes(view[:end])) if end else None
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


def read_stream(data: Data) -> tuple[pa.RecordBatch, SchemaEntry]:
    """The one record batch of an IPC stream and its schema's cache entry; raises
    `ValueError` for anything else (garbage, truncation, several batches)."""
    buf = data if isinstance(data, pa.Buffer) else pa.py_buffer(data)
    view = memoryview(buf)
    end = _schema_message_end(view)
    found = _read_known(buf, view, end)
    if found is not None:
        return found
    batch = _read_full(buf)
    if end:
        return batch, SCHEMAS.remember(bytes(view[:end]), batch.schema)
    return batch, SCHEMAS.entry(batch.schema)


def read_ipc(data: Data) -> pa.RecordBatch:
    """Parse one Arrow IPC stream holding exactly one record batch."""
    return read_stream(data)[0]
