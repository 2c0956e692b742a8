"""Hand-rolled framing of the two large protobuf messages, `DistillRequest` and `DistillReply`.

Why not the generated classes: a protobuf `bytes` field is copied when a message is parsed,
again when the field is read in Python and again when a message is serialised; for 16 MiB of
knowledge that was 4+ copies and a third of gRPC's throughput. These messages are an id plus
one `bytes` or small sub-message field, so they are framed by hand: encoding writes a few
header bytes before the payload (one copy when joined), decoding returns `memoryview` slices
of the received bytes (no copy). The wire format is the generated classes' (same field
numbers and wire types), so a client using the generated stubs interoperates; the small
sub-messages (`SampleIds`, `Error`) still go through the generated classes. One liberty: a
reply's knowledge length (and, where needed, its id) is written as a padded (non-minimal)
varint so the Arrow stream starts a multiple of 8 bytes into the message; its buffers, and
the tensors a client views them as, are then 8-byte aligned (with minimal varints they sat
2-8 bytes off: float32 tensors were views at 2-byte alignment). Protobuf parsers read padded
varints (upb tested; it reads lengths in at most 5 bytes, ids in 10); only byte-for-byte
equality with `SerializeToString()` is lost.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import pyarrow as pa
from google.protobuf.message import DecodeError

from lyceum.proto import _ipc
from lyceum.v1 import knowledge_pb2 as pb

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MAX_VARINT_BYTES = 10


class WireError(ValueError):
    """A message that is not a well-formed `DistillRequest` / `DistillReply`; `request_id` is
    the id it carried, if that much could be read (else 0), so the error reply can be matched."""

    def __init__(self, message: str, request_id: int = 0) -> None:
        super().__init__(message)
        self.request_id = request_id


def _varint(value: int, width: int = 0) -> bytes:
    """`value` as a protobuf varint, padded with continuation bytes to `width` bytes if
    that is longer than its minimal form (at most 10 bytes, as parsers allow)."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            break
    if len(out) < width:
        out[-1] |= 0x80
        out += b"\x80" * (width - len(out) - 1) + b"\x00"
    return bytes(out)


def _id_field(request_id: int) -> bytes:
    # proto3 leaves out fields at their default (0), so the bytes match protobuf's own.
    return b"\x08" + _varint(request_id) if request_id else b""


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    for i in range(pos, min(pos + _MAX_VARINT_BYTES, len(buf))):
        byte = buf[i]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i + 1
        shift += 7
    raise WireError(f"truncated or over-long varint at byte {pos} of {len(buf)}")


def _fields(data: bytes | memoryview) -> list[tuple[int, int | memoryview]]:
    """(field number, value) for each field: varints and fixed-width values as ints,
    length-delimited ones as views of `data`."""
    buf = memoryview(data).cast("B")
    pos, out = 0, []
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError(f"field number 0 at byte {pos}: not a protobuf message")
        value: int | memoryview
        if wire_type == _VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire_type == _LEN:
            length, pos = _read_varint(buf, pos)
            if pos + length > len(buf):
                raise WireError(
                    f"field {number}: length {length} runs past the end of the "
                    f"{len(buf)}-byte message"
                )
            value, pos = buf[pos : pos + length], pos + length
        elif wire_type in (_I64, _I32):
            width = 8 if wire_type == _I64 else 4
            if pos + width > len(buf):
                raise WireError(f"field {number}: truncated fixed-width value")
            value, pos = int.from_bytes(buf[pos : pos + width], "little"), pos + width
        else:
            raise WireError(f"field {number}: unsupported wire type {wire_type}")
        out.append((number, value))
    return out


@dataclass(frozen=True)
class Request:
    """A parsed `DistillRequest`: exactly one of `inputs` (query) or `ids` (index) is set."""

    request_id: int
    inputs: memoryview | None = None
    ids: np.ndarray | None = None

    @property
    def mode(self) -> Literal["query", "index"]:
        return "query" if self.inputs is not None else "index"

    @property
    def payload(self) -> memoryview | np.ndarray:
        """The inputs (query mode) or the sample ids (index mode)."""
        if self.inputs is not None:
            return self.inputs
        if self.ids is None:
            raise WireError("carries neither inputs (query mode) nor ids (index mode)")
        return self.ids


def encode_request(request_id: int, inputs: object = None, ids: object = None) -> bytes:
    """`DistillRequest` bytes; `inputs` is Arrow IPC bytes (any buffer), `ids` integers."""
    if (inputs is None) == (ids is None):
        raise ValueError("a request carries either inputs (query mode) or ids (index mode)")
    head = _id_field(request_id)
    if ids is not None:
        body = pb.SampleIds(ids=[int(i) for i in np.asarray(ids).reshape(-1)]).SerializeToString()
        return head + b"\x1a" + _varint(len(body)) + body
    view = memoryview(inputs).cast("B")  # type: ignore[arg-type]
    return b"".join((head, b"\x12", _varint(view.nbytes), view))


def decode_request(data: bytes | memoryview) -> Request:
    """Parse `DistillRequest` bytes; raises `WireError` naming what is malformed."""
    request_id, inputs, ids = 0, None, None
    for number, value in _fields(data):
        if number == 1 and isinstance(value, int):
            request_id = value
        elif number == 2 and isinstance(value, memoryview):
            inputs, ids = value, None
        elif number == 3 and isinstance(value, memoryview):
            try:
                sample_ids = pb.SampleIds.FromString(bytes(value))
            except DecodeError as exc:
                raise WireError(f"malformed sample ids: {exc}", request_id) from exc
            ids, inputs = np.fromiter(sample_ids.ids, dtype=np.uint64), None
        # Unknown fields are skipped, as protobuf does, for forward compatibility.
    if inputs is None and ids is None:
        raise WireError("carries neither inputs (query mode) nor ids (index mode)", request_id)
    return Request(request_id=request_id, inputs=inputs, ids=ids)


# Parsers take varints of up to 10 bytes, but upb reads a length (a 32-bit size) in at most 5.
_MAX_LENGTH_VARINT_BYTES = 5


@lru_cache(maxsize=1024)
def _aligned_widths(id_bytes: int, length_bytes: int, has_id: bool) -> tuple[int, int] | None:
    """Widths (id varint, 0 = no id field; length varint) that make the reply header a
    multiple of 8 bytes long, shortest first; None if no padding can."""
    id_widths = range(id_bytes, _MAX_VARINT_BYTES + 1) if has_id else (0, *range(1, 11))
    for total in range(8, 8 * 4, 8):
        for w_id in id_widths:
            w_len = total - 1 - (1 + w_id if w_id else 0)
            if length_bytes <= w_len <= _MAX_LENGTH_VARINT_BYTES:
                return w_id, w_len
    return None


def knowledge_header(request_id: int, nbytes: int) -> bytes:
    """The bytes that precede `nbytes` of knowledge in a `DistillReply`, padded to a multiple
    of 8 bytes (see the module docstring)."""
    length = _varint(nbytes)
    rid = _varint(request_id)
    widths = _aligned_widths(len(rid), len(length), request_id != 0)
    if widths is None:
        return _id_field(request_id) + b"\x12" + length
    w_id, w_len = widths
    # An explicit id 0 is legal (proto3 reads it as the default) and gives two more bytes.
    head = b"\x08" + _varint(request_id, w_id) if w_id else b""
    return head + b"\x12" + _varint(nbytes, w_len)


def encode_batch_reply(
    request_id: int, batch: pa.RecordBatch, compression: _ipc.Compression = "none"
) -> bytes:
    """`DistillReply` bytes with `batch` as Arrow IPC (the bytes of `codec.to_ipc`).

    grpcio only sends `bytes`. Small replies join header, schema message, batch message and
    end-of-stream marker (cheapest below ~1 MiB). Large ones copy the knowledge exactly once:
    the IPC size is computed first, then header and stream are written straight into a new
    `bytes` object. Writing into a fresh bytes object before anything else holds a reference
    is the C API's own idiom (PyBytes_FromStringAndSize(NULL, n), then fill); ctypes gives
    Arrow a view of its memory. A compressed body's size is known only once it is written.
    """
    if compression != "none":
        stream = _ipc.to_ipc(batch, compression)
        return b"".join((knowledge_header(request_id, stream.size), stream))
    size = _ipc.ipc_size(batch)
    header = knowledge_header(request_id, size)
    if size < _ipc.JOIN_BELOW:
        return b"".join((header, *_ipc.ipc_parts(batch)))
    out = bytes(len(header) + size)
    address = ctypes.cast(ctypes.c_char_p(out), ctypes.c_void_p).value
    if address is None:  # only for an empty object, which a reply never is
        raise ValueError("cannot address an empty reply buffer")
    view = memoryview((ctypes.c_char * len(out)).from_address(address)).cast("B")
    view[: len(header)] = header
    sink = pa.FixedSizeBufferWriter(pa.py_buffer(view[len(header) :]))
    _ipc.write_ipc(sink, batch)
    sink.close()
    return out


def encode_error_reply(request_id: int, code: int, message: str) -> bytes:
    return pb.DistillReply(
        request_id=request_id,
        error=pb.Error(code=code, message=message),  # type: ignore[arg-type]
    ).SerializeToString()


@dataclass(frozen=True)
class Reply:
    """One reply, on either transport (a parsed `DistillReply`, or ZeroMQ's reply frames):
    `knowledge` (a view of the received bytes) or an error code (gRPC status number) and
    its text."""

    request_id: int
    knowledge: memoryview | None = None
    error_code: int = 0
    error_message: str = ""


def decode_reply(data: bytes | memoryview) -> Reply:
    request_id, knowledge, error = 0, None, None
    for number, value in _fields(data):
        if number == 1 and isinstance(value, int):
            request_id = value
        elif number == 2 and isinstance(value, memoryview):
            knowledge, error = value, None
        elif number == 3 and isinstance(value, memoryview):
            try:
                error = pb.Error.FromString(bytes(value))
            except DecodeError as exc:
                raise WireError(f"malformed error: {exc}", request_id) from exc
            knowledge = None
    if error is not None:
        return Reply(request_id, error_code=int(error.code), error_message=error.message)
    if knowledge is None:
        raise WireError("carries neither knowledge nor an error", request_id)
    return Reply(request_id, knowledge=knowledge)
