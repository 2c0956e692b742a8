"""Connections to one online teacher, one class per transport, with many requests in flight.

A connection moves bytes, nothing more: `submit` sends one encoded request without waiting,
`poll` returns whatever replies have arrived (in any order), `describe` asks for the
teacher's schema. Encoding inputs and decoding knowledge happen a layer up (`OnlineTeacher`),
so the replica/failover client of issue #4 can reuse these classes as they are.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from lyceum.proto import wire
from lyceum.proto.wire import Reply
from lyceum.v1 import knowledge_pb2 as pb

DISTILL_METHOD = "/lyceum.v1.Teacher/Distill"
DESCRIBE_METHOD = "/lyceum.v1.Teacher/Describe"
UNAUTHENTICATED = pb.ERROR_CODE_UNAUTHENTICATED
UNAVAILABLE = pb.ERROR_CODE_UNAVAILABLE
_UNLIMITED = 2**31 - 1


class TeacherError(Exception):
    """A request or call the teacher refused or could not complete: a wire code and its text.

    `code` is the proto's ErrorCode number, equal to the gRPC status code (3 INVALID_ARGUMENT,
    8 RESOURCE_EXHAUSTED, 14 UNAVAILABLE, 16 UNAUTHENTICATED, ...) on both transports.
    """

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{self.code_name}: {message}")

    @property
    def code_name(self) -> str:
        try:
            return pb.ErrorCode.Name(self.code).removeprefix("ERROR_CODE_")  # type: ignore[arg-type]
        except ValueError:
            return f"code {self.code}"


@dataclass(frozen=True)
class Credentials:
    """How a student proves who it is and checks who the teacher is."""

    token: bytes | None = None
    tls_ca: bytes | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls_server_name: str | None = None
    curve_server_key: bytes | None = None
    curve_public_key: bytes | None = None
    curve_secret_key: bytes | None = None


class Connection(Protocol):
    """A transport's connection to one teacher.

    Exists so the client (and issue #4's replicas and failover) treat gRPC and ZeroMQ the same:
    many requests in flight, replies tagged by request id and returned as they arrive.
    """

    def describe(self, timeout_s: float) -> pb.DescribeReply: ...

    def submit(self, request_id: int, inputs: object = None, ids: np.ndarray | None = None) -> None:
        """Send a query (Arrow IPC `inputs`) or index (`ids`) request without waiting."""
        ...

    def poll(self, timeout_s: float) -> list[Reply]:
        """Replies that arrived, waiting up to `timeout_s` for the first one."""
        ...

    def wait_handles(self) -> list[zmq.Socket[bytes] | int]:
        """What becomes readable when a reply may have arrived (ZeroMQ sockets, file
        descriptors), so a client of several connections waits on all at once with one
        `zmq.Poller` instead of polling each in turn."""
        ...

    def close(self) -> None: ...


def wait_any(connections: Sequence[Connection], timeout_s: float) -> None:
    """Block until any of `connections` may have a reply, or `timeout_s` passed.

    Why: a client polling N replicas in turn with short timeouts woke ~1000 times a second
    while it waited, and each wake-up took the GIL from the training thread it shares a core
    with (measured in bench/student.py).
    """
    poller = zmq.Poller()
    for conn in connections:
        for handle in conn.wait_handles():
            poller.register(handle, zmq.POLLIN)
    poller.poll(max(0, int(timeout_s * 1000)))


class GrpcConnection:
    """One channel and one `Distill` stream (opened on the first request)."""

    def __init__(
        self,
        target: str,
        credentials: Credentials,
        tls: bool,
        extra_options: Sequence[tuple[str, int | str]] = (),
    ) -> None:
        options: list[tuple[str, int | str]] = [
            ("grpc.max_send_message_length", _UNLIMITED),
            ("grpc.max_receive_message_length", _UNLIMITED),
            *extra_options,
        ]
        if credentials.tls_server_name:
            options.append(("grpc.ssl_target_name_override", credentials.tls_server_name))
        if tls or credentials.tls_ca is not None:
            creds = grpc.ssl_channel_credentials(
                root_certificates=credentials.tls_ca,
                private_key=credentials.tls_key,
                certificate_chain=credentials.tls_cert,
            )
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._metadata = (
            (("authorization", f"Bearer {credentials.token.decode()}"),)
            if credentials.token
            else ()
        )
        self._describe = self._channel.unary_unary(
            DESCRIBE_METHOD,
            request_serializer=pb.DescribeRequest.SerializeToString,
            response_deserializer=pb.DescribeReply.FromString,
        )
        # No (de)serializers: requests and replies are framed by lyceum.proto.wire.
        self._distill = self._channel.stream_stream(DISTILL_METHOD)
        self._outgoing: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._replies: queue.SimpleQueue[Reply] = queue.SimpleQueue()
        # A byte per reply, so `wait_any` can wait on this stream next to ZeroMQ sockets.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_closed = False  # under _lock: a late reader must not write a reused fd
        self._outstanding: set[int] = set()
        self._lock = threading.Lock()
        self._call: grpc.Future | None = None
        self._reader: threading.Thread | None = None

    def describe(self, timeout_s: float) -> pb.DescribeReply:
        try:
            return self._describe(pb.DescribeRequest(), timeout=timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _rpc_error(exc) from None

    @staticmethod
    def _requests(outgoing: queue.SimpleQueue[bytes | None]) -> Iterator[bytes]:
        while (item := outgoing.get()) is not None:
            yield item

    def _open(self) -> None:
        # Each stream gets its own queue: grpc's request thread of a broken stream may still
        # be blocked in get(), and on a shared queue it would swallow the next stream's message.
        outgoing: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        call = self._distill(self._requests(outgoing), metadata=self._metadata)
        self._outgoing, self._call = outgoing, call
        self._reader = threading.Thread(target=self._read, args=(call, outgoing), daemon=True)
        self._reader.start()

    def _read(self, call: Iterator[bytes], outgoing: queue.SimpleQueue[bytes | None]) -> None:
        failure = TeacherError(UNAVAILABLE, "the teacher closed the stream")
        try:
            for raw in call:
                reply = wire.decode_reply(raw)
                with self._lock:
                    self._outstanding.discard(reply.request_id)
                self._put(reply)
        except grpc.RpcError as exc:
            failure = _rpc_error(exc)
        except wire.WireError as exc:
            failure = TeacherError(UNAVAILABLE, f"malformed reply from the teacher: {exc}")
        finally:
            # The stream is gone, however it ended: every request still on it fails with the
            # stream's status (the caller re-asks), and its request thread is released.
            with self._lock:
                lost, self._outstanding = self._outstanding, set()
                if self._call is call:
                    self._call = None
            outgoing.put(None)
            for rid in lost:
                self._put(Reply(rid, error_code=failure.code, error_message=failure.message))

    def _put(self, reply: Reply) -> None:
        self._replies.put(reply)
        # A full pipe already wakes the waiter.
        with self._lock, contextlib.suppress(BlockingIOError):
            if not self._wake_closed:
                os.write(self._wake_w, b"\0")

    def submit(self, request_id: int, inputs: object = None, ids: np.ndarray | None = None) -> None:
        message = wire.encode_request(request_id, inputs=inputs, ids=ids)
        with self._lock:
            if self._call is None:
                self._open()
            self._outstanding.add(request_id)
            self._outgoing.put(message)

    def wait_handles(self) -> list[zmq.Socket[bytes] | int]:
        return [self._wake_r]

    def poll(self, timeout_s: float) -> list[Reply]:
        # Drained before the queue is read: a byte written after this stays for the next wait.
        with self._lock, contextlib.suppress(BlockingIOError):
            if not self._wake_closed:
                os.read(self._wake_r, 65536)
        out = []
        try:
            out.append(self._replies.get(timeout=timeout_s))
            while True:
                out.append(self._replies.get_nowait())
        except queue.Empty:
            return out

    def close(self) -> None:
        self._outgoing.put(None)
        if self._call is not None:
            self._call.cancel()
        self._channel.close()
        with self._lock:
            if not self._wake_closed:
                self._wake_closed = True
                os.close(self._wake_r)
                os.close(self._wake_w)


class ZmqConnection:
    """A DEALER socket; not thread-safe (submit and poll from one thread)."""

    def __init__(self, address: str, credentials: Credentials) -> None:
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if credentials.curve_server_key is not None:
            public, secret = credentials.curve_public_key, credentials.curve_secret_key
            if public is None or secret is None:
                public, secret = zmq.curve_keypair()
            sock.curve_serverkey = credentials.curve_server_key
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        # The monitor reports a refused CURVE handshake, or one between a CURVE and a plain
        # socket, which would otherwise look like a teacher that never answers.
        self._curve = credentials.curve_server_key is not None
        self._monitor = sock.get_monitor_socket(
            events=zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        )
        sock.connect(address)
        self._sock = sock
        self._token = credentials.token
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._outstanding: set[int] = set()
        self._stash: list[Reply] = []
        self._describes: dict[int, bytes] = {}
        self._describe_ids = itertools.count(1 << 63)

    def _send(self, frames: list[object]) -> None:
        if self._token is not None:
            frames.append(self._token)
        self._sock.send_multipart(frames, copy=False)  # type: ignore[arg-type]

    def describe(self, timeout_s: float) -> pb.DescribeReply:
        rid = next(self._describe_ids)
        self._send([rid.to_bytes(8, "little"), b"describe", b""])
        self._outstanding.add(rid)
        deadline = time.monotonic() + timeout_s
        while rid not in self._describes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._outstanding.discard(rid)
                raise TeacherError(UNAVAILABLE, f"no Describe reply within {timeout_s}s")
            for reply in self._receive(remaining):
                if reply.request_id == rid:
                    raise TeacherError(reply.error_code, reply.error_message)
                self._stash.append(reply)
        return pb.DescribeReply.FromString(self._describes.pop(rid))

    def submit(self, request_id: int, inputs: object = None, ids: np.ndarray | None = None) -> None:
        rid = request_id.to_bytes(8, "little")
        if ids is not None:
            self._send([rid, b"index", np.ascontiguousarray(ids, dtype="<u8").tobytes()])
        else:
            self._send([rid, b"query", inputs])
        self._outstanding.add(request_id)

    def wait_handles(self) -> list[zmq.Socket[bytes] | int]:
        return [self._sock, self._monitor]

    def poll(self, timeout_s: float) -> list[Reply]:
        if self._stash:
            out, self._stash = self._stash, []
            return out + self._receive(0)
        return self._receive(timeout_s)

    def _receive(self, timeout_s: float) -> list[Reply]:
        out: list[Reply] = []
        ready = dict(self._poller.poll(int(timeout_s * 1000)))
        if self._monitor in ready:
            code, message = self._handshake_failure(recv_monitor_message(self._monitor))
            lost, self._outstanding = self._outstanding, set()
            out += [Reply(rid, error_code=code, error_message=message) for rid in lost]
        while True:
            try:
                frames = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return out
            if len(frames) < 3 or len(frames[0].bytes) != 8:
                continue  # not a reply of ours: nothing to match it to
            rid = int.from_bytes(frames[0].bytes, "little")
            self._outstanding.discard(rid)
            kind = frames[1].bytes
            if kind == b"knowledge":
                out.append(Reply(rid, knowledge=_aligned(frames[2])))
            elif kind == b"describe":
                self._describes[rid] = frames[2].bytes
            elif kind == b"error" and len(frames) == 4:
                code = int(frames[2].bytes) if frames[2].bytes.isdigit() else 0
                out.append(
                    Reply(
                        rid,
                        error_code=code,
                        error_message=frames[3].bytes.decode(errors="replace"),
                    )
                )

    def _handshake_failure(self, event: Mapping[str, object]) -> tuple[int, str]:
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return UNAUTHENTICATED, "the teacher refused our CURVE key (not on its allow-list)"
        if event["value"] == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            if self._curve:
                return UNAUTHENTICATED, (
                    "the teacher does not use CURVE (ZeroMQ security mechanism mismatch); "
                    "connect without curve keys, or check the endpoint"
                )
            return UNAUTHENTICATED, (
                "the teacher requires CURVE encryption (ZeroMQ security mechanism mismatch); "
                "pass its public key as curve_server_key"
            )
        return UNAVAILABLE, f"the ZeroMQ handshake with the teacher failed: {event['value']!r}"

    def close(self) -> None:
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)
        self._ctx.term()


def _aligned(frame: zmq.Frame) -> memoryview:
    """The frame's bytes, 8-byte aligned so the tensors decoded from them are too. libzmq
    hands frames smaller than its 8 KiB read batch out as slices of its receive buffer, at any
    alignment; those few KiB are copied (a new `bytes` object's data is aligned)."""
    view = frame.buffer
    if np.frombuffer(view, dtype=np.uint8).ctypes.data % 8:
        return memoryview(frame.bytes)
    return view


def _rpc_error(exc: grpc.RpcError) -> TeacherError:
    code = exc.code() if hasattr(exc, "code") else None
    number = code.value[0] if code is not None else UNAVAILABLE
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return TeacherError(number, details or str(code))
