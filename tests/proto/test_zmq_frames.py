"""ZeroMQ framing, both sides: what a student sends is what the teacher reads, what the teacher
answers is what the student reads, malformed frames are refused naming what is wrong, and
knowledge frames come out 8-byte aligned."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from lyceum.proto import zmq_frames
from lyceum.proto.errors import INVALID_ARGUMENT
from lyceum.proto.wire import Reply, Request, WireError

PEER = b"\x00peer"


class Frame:
    """A received frame (what `zmq.Frame` offers): its bytes and a view of them."""

    def __init__(self, data: object) -> None:
        self.buffer = memoryview(data).cast("B")  # type: ignore[arg-type]

    @property
    def bytes(self) -> bytes:
        return self.buffer.tobytes()


def _received(frames: Sequence[object], peer: bytes | None = PEER) -> list[Frame]:
    """Frames as the other side's socket hands them over (a ROUTER prepends the peer)."""
    return [Frame(f) for f in [*([peer] if peer is not None else []), *frames]]


@pytest.mark.parametrize("token", [None, b"s3cret"])
def test_requests_read_back_as_sent(token: bytes | None) -> None:
    ids = np.array([5, 0, 2**40], dtype=np.uint64)
    index = zmq_frames.IncomingRequest(_received(zmq_frames.index_request(7, ids, token)))
    assert index.peer == PEER and index.request_id == (7).to_bytes(8, "little")
    assert index.token() == token
    parsed = index.parse()
    assert isinstance(parsed, Request) and parsed.request_id == 7 and parsed.mode == "index"
    assert parsed.ids is not None and parsed.ids.tolist() == ids.tolist()
    assert parsed.ids.dtype == np.uint64

    arrow = b"\x01\x02\x03\x04 arrow ipc bytes"
    query = zmq_frames.IncomingRequest(_received(zmq_frames.query_request(2**63, arrow, token)))
    assert query.token() == token
    parsed = query.parse()
    assert isinstance(parsed, Request) and parsed.request_id == 2**63
    assert parsed.mode == "query" and bytes(parsed.payload) == arrow

    describe = zmq_frames.IncomingRequest(_received(zmq_frames.describe_request(9, token)))
    assert describe.token() == token
    assert describe.parse() == zmq_frames.DescribeRequest(9)


@pytest.mark.parametrize(
    ("frames", "phrase"),
    [
        ([b"\x01" * 8, b"index"], "expected frames [request id, kind, payload] (+ [token]), got 2"),
        ([b"\x01" * 8, b"index", b"", b"t", b"x"], "got 5 frames"),
        ([b"short", b"index", b""], "request id frame must be 8 bytes (little-endian uint64), got 5"),
        ([b"\x01" * 8, b"bogus", b""], "unknown request kind b'bogus'; expected b'query', b'index' or b'describe'"),
        ([b"\x01" * 8, b"index", b"\x01\x02\x03"], "index payload of 3 bytes is not a whole number of uint64 ids"),
    ],
)  # fmt: skip
def test_malformed_requests_name_what_is_wrong(frames: list[bytes], phrase: str) -> None:
    request = zmq_frames.IncomingRequest(_received(frames))
    with pytest.raises(WireError) as err:
        request.token()
        request.parse()
    assert phrase in str(err.value)
    # The reply echoes the id frame as sent, so even a malformed request is matched.
    reply = zmq_frames.error_reply(
        request.peer, request.request_id, INVALID_ARGUMENT, str(err.value)
    )
    assert reply[:2] == [PEER, frames[0]]


def test_replies_read_back_as_sent() -> None:
    rid = zmq_frames.request_id_frame(12)
    knowledge = bytes(range(64))
    read = zmq_frames.read_reply(
        _received(zmq_frames.knowledge_reply(PEER, rid, knowledge)[1:], None)
    )
    assert isinstance(read, Reply) and read.request_id == 12 and read.error_code == 0
    assert read.knowledge is not None and bytes(read.knowledge) == knowledge

    described = zmq_frames.read_reply(
        _received(zmq_frames.describe_reply(PEER, rid, b"pb")[1:], None)
    )
    assert described == zmq_frames.Described(12, b"pb")

    error = zmq_frames.error_reply(PEER, rid, INVALID_ARGUMENT, "bad input é")
    assert error[2:4] == [zmq_frames.KIND_ERROR, b"3"]
    read = zmq_frames.read_reply(_received(error[1:], None))
    assert read == Reply(12, error_code=INVALID_ARGUMENT, error_message="bad input é")


def test_frames_that_are_no_reply_are_ignored() -> None:
    rid = zmq_frames.request_id_frame(1)
    for frames in ([rid, zmq_frames.KIND_KNOWLEDGE], [b"short", zmq_frames.KIND_KNOWLEDGE, b"x"],
                   [rid, b"bogus", b"x"], [rid, zmq_frames.KIND_ERROR, b"3"]):  # fmt: skip
        assert zmq_frames.read_reply(_received(frames, None)) is None
    # An error code that is not a number reads as 0 (no known code), with its message.
    odd = zmq_frames.read_reply(_received([rid, zmq_frames.KIND_ERROR, b"x1", b"m"], None))
    assert odd == Reply(1, error_code=0, error_message="m")


def test_knowledge_frames_are_handed_out_aligned() -> None:
    store = np.zeros(4096 + 8, dtype=np.uint8)
    payload = np.arange(4096, dtype=np.uint8)
    # A frame at an odd address (libzmq hands small frames out as slices of its buffer).
    start = next(o for o in range(8) if (store.ctypes.data + o) % 8 == 1)
    store[start : start + 4096] = payload
    frames = [Frame(zmq_frames.request_id_frame(3)), Frame(zmq_frames.KIND_KNOWLEDGE)]
    frames.append(Frame(store[start : start + 4096]))
    read = zmq_frames.read_reply(frames)
    assert isinstance(read, Reply) and read.knowledge is not None
    assert np.frombuffer(read.knowledge, dtype=np.uint8).ctypes.data % 8 == 0
    assert bytes(read.knowledge) == payload.tobytes()
    # An aligned frame is handed out as it is: no copy.
    aligned = next(o for o in range(8) if (store.ctypes.data + o) % 8 == 0)
    frames[2] = Frame(store[aligned : aligned + 4096])
    read = zmq_frames.read_reply(frames)
    assert isinstance(read, Reply) and read.knowledge is not None
    assert np.frombuffer(read.knowledge, dtype=np.uint8).ctypes.data == store.ctypes.data + aligned
