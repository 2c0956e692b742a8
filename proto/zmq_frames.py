"""ZeroMQ framing of the teacher's requests and replies: the multipart frames both sides build
and read (gRPC's messages are framed by `lyceum.proto.wire`).

Request frames (a student's DEALER sends them; the teacher's ROUTER prepends the peer's
identity):
    [request id (8 bytes, little-endian uint64), kind, payload] + [token] if the teacher has one
    kind b"query":    payload is Arrow IPC inputs with a sample_id column
    kind b"index":    payload is the sample ids as little-endian uint64s
    kind b"describe": payload is empty
Reply frames, the request id echoed:
    [request id, b"knowledge", Arrow IPC]  |  [request id, b"describe", DescribeReply protobuf]
    [request id, b"error", code (ASCII decimal, `lyceum.proto.errors`), message]

Frames are read through their buffers where payloads may be large (no copy); a knowledge
frame is handed out 8-byte aligned, so the tensors decoded from it are aligned too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from lyceum.proto.wire import Reply, Request, WireError

__all__ = [
    "KIND_DESCRIBE",
    "KIND_ERROR",
    "KIND_INDEX",
    "KIND_KNOWLEDGE",
    "KIND_QUERY",
    "REQUEST_ID_BYTES",
    "DescribeRequest",
    "Described",
    "Frame",
    "IncomingRequest",
    "describe_reply",
    "describe_request",
    "error_reply",
    "index_request",
    "knowledge_reply",
    "query_request",
    "read_reply",
    "request_id_frame",
    "request_number",
]

KIND_QUERY, KIND_INDEX, KIND_DESCRIBE = b"query", b"index", b"describe"
KIND_KNOWLEDGE, KIND_ERROR = b"knowledge", b"error"
REQUEST_ID_BYTES = 8
_IDS = np.dtype("<u8")  # index payloads: little-endian uint64 ids, parsed once here


class Frame(Protocol):
    """One received frame (a `zmq.Frame`): its bytes (a copy) and a view of them."""

    @property
    def bytes(self) -> bytes: ...

    @property
    def buffer(self) -> memoryview: ...


def request_id_frame(request_id: int) -> bytes:
    """The request id as its frame: 8 bytes, little-endian."""
    return request_id.to_bytes(REQUEST_ID_BYTES, "little")


def request_number(request_id: bytes) -> int:
    """A request id frame as a number, as far as it can be read (for logs and errors)."""
    return int.from_bytes(request_id[:REQUEST_ID_BYTES], "little")


def _with_token(frames: list[object], token: bytes | None) -> list[object]:
    if token is not None:
        frames.append(token)
    return frames


# -- the student's side ---------------------------------------------------------------------


def describe_request(request_id: int, token: bytes | None) -> list[object]:
    """The frames of a Describe request."""
    return _with_token([request_id_frame(request_id), KIND_DESCRIBE, b""], token)


def index_request(request_id: int, ids: np.ndarray, token: bytes | None) -> list[object]:
    """The frames of an index-mode request for `ids`."""
    payload = np.ascontiguousarray(ids, dtype="<u8").tobytes()
    return _with_token([request_id_frame(request_id), KIND_INDEX, payload], token)


def query_request(request_id: int, inputs: object, token: bytes | None) -> list[object]:
    """The frames of a query-mode request; `inputs` is Arrow IPC bytes (any buffer), sent as
    it is."""
    return _with_token([request_id_frame(request_id), KIND_QUERY, inputs], token)


@dataclass(frozen=True)
class Described:
    """A Describe reply: the `DescribeReply` protobuf bytes."""

    request_id: int
    message: bytes


def read_reply(frames: Sequence[Frame]) -> Reply | Described | None:
    """A reply's frames as knowledge or an error (`wire.Reply`) or a Describe reply; None for
    frames that are no reply (nothing to match them to)."""
    if len(frames) < 3 or len(frames[0].bytes) != REQUEST_ID_BYTES:
        return None
    rid = request_number(frames[0].bytes)
    kind = frames[1].bytes
    if kind == KIND_KNOWLEDGE:
        return Reply(rid, knowledge=_aligned(frames[2]))
    if kind == KIND_DESCRIBE:
        return Described(rid, frames[2].bytes)
    if kind == KIND_ERROR and len(frames) == 4:
        code = frames[2].bytes
        return Reply(
            rid,
            error_code=int(code) if code.isdigit() else 0,
            error_message=frames[3].bytes.decode(errors="replace"),
        )
    return None


def _aligned(frame: Frame) -> memoryview:
    """The frame's bytes, 8-byte aligned so the tensors decoded from them are too. libzmq
    hands frames smaller than its 8 KiB read batch out as slices of its receive buffer, at any
    alignment; those few KiB are copied (a new `bytes` object's data is aligned)."""
    view = frame.buffer
    if np.frombuffer(view, dtype=np.uint8).ctypes.data % 8:
        return memoryview(frame.bytes)
    return view


# -- the teacher's side ---------------------------------------------------------------------


@dataclass(frozen=True)
class DescribeRequest:
    """A parsed Describe request."""

    request_id: int


class IncomingRequest:
    """A request's frames as the teacher's ROUTER received them: `[peer, request id, kind,
    payload]` + `[token]`. Read in the order the server checks them: `token()` (the frame
    count), then, once the token is accepted, `parse()`; nothing else is parsed before."""

    def __init__(self, frames: Sequence[Frame]) -> None:
        self._frames = frames
        self.peer = frames[0].bytes
        # As sent, whatever its length: the reply echoes it so the sender can match it.
        self.request_id = frames[1].bytes if len(frames) > 1 else b""

    def token(self) -> bytes | None:
        """The bearer token frame, if any; raises `WireError` for a wrong number of frames."""
        count = len(self._frames)
        if count not in (4, 5):
            raise WireError(
                f"expected frames [request id, kind, payload] (+ [token]), got {count - 1} frames"
            )
        return self._frames[4].bytes if count == 5 else None

    def parse(self) -> Request | DescribeRequest:
        """The request (index ids as uint64, query inputs as a view of the frame); raises
        `WireError` naming what is malformed."""
        if len(self.request_id) != REQUEST_ID_BYTES:
            raise WireError(
                f"request id frame must be {REQUEST_ID_BYTES} bytes (little-endian uint64), got "
                f"{len(self.request_id)}"
            )
        rid = request_number(self.request_id)
        kind = self._frames[2].bytes
        if kind == KIND_DESCRIBE:
            return DescribeRequest(rid)
        view = self._frames[3].buffer
        if kind == KIND_QUERY:
            return Request(rid, inputs=view)
        if kind != KIND_INDEX:
            raise WireError(
                f"unknown request kind {kind[:32]!r}; expected {KIND_QUERY!r}, {KIND_INDEX!r} "
                f"or {KIND_DESCRIBE!r}",
                rid,
            )
        if view.nbytes % 8:
            raise WireError(
                f"index payload of {view.nbytes} bytes is not a whole number of uint64 ids", rid
            )
        return Request(rid, ids=np.frombuffer(view, dtype=_IDS).astype(np.uint64))


def knowledge_reply(peer: bytes, request_id: bytes, ipc: object) -> list[object]:
    """Reply frames carrying knowledge (`ipc`: Arrow IPC bytes, sent without a copy)."""
    return [peer, request_id, KIND_KNOWLEDGE, ipc]


def describe_reply(peer: bytes, request_id: bytes, message: bytes) -> list[object]:
    """Reply frames carrying a `DescribeReply`."""
    return [peer, request_id, KIND_DESCRIBE, message]


def error_reply(peer: bytes, request_id: bytes, code: int, message: str) -> list[object]:
    """Reply frames carrying an error code (`lyceum.proto.errors`) and its message."""
    return [peer, request_id, KIND_ERROR, str(code).encode(), message.encode()]
