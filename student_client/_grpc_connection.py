"""A student's gRPC connection to one teacher: one channel, one `Distill` stream of many
requests, replies collected by a reader thread.

Behind a `dns:///` name (`per_call=True`) every request is a `Distill` call of its own
instead: gRPC's `round_robin` balances calls, not the messages inside one, so a single
long-lived stream would send a whole epoch to one replica. A call per request spreads the
requests over every address behind the name in turn, and a replica added behind the name
takes new calls as soon as gRPC re-resolves it (the servers' `--max-connection-age-s`).

Distill messages are framed by `lyceum.proto.wire` (the channel has no (de)serializers), so
a reply's knowledge is a view of the received bytes.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import zmq

from lyceum.proto import wire
from lyceum.proto.errors import UNAVAILABLE
from lyceum.proto.wire import Reply
from lyceum.student_client._connections import Credentials, TeacherError
from lyceum.v1 import knowledge_pb2 as pb

__all__ = ["GrpcConnection"]

DISTILL_METHOD = "/lyceum.v1.Teacher/Distill"
DESCRIBE_METHOD = "/lyceum.v1.Teacher/Describe"
_UNLIMITED = 2**31 - 1
# Threads that read the replies of per-call requests; more calls in flight wait for one (their
# replies are buffered by gRPC meanwhile).
_CALL_READERS = 32


class GrpcConnection:
    """One channel and one `Distill` stream (opened on the first request); with `per_call`,
    one `Distill` call per request (see the module docstring)."""

    def __init__(
        self,
        target: str,
        credentials: Credentials,
        tls: bool,
        extra_options: Sequence[tuple[str, int | str]] = (),
        per_call: bool = False,
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
        self._calls: dict[int, grpc.Future] = {}  # per-call mode: request id -> its call
        self._call_readers = (
            ThreadPoolExecutor(_CALL_READERS, thread_name_prefix="lyceum-grpc-call")
            if per_call
            else None
        )

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

    def _read_call(self, request_id: int, call: Iterator[bytes]) -> None:
        """Per-call mode: the one reply of a request's own call, or the call's failure."""
        reply = Reply(
            request_id, error_code=UNAVAILABLE, error_message="the teacher closed the call"
        )
        try:
            for raw in call:
                reply = wire.decode_reply(raw)
        except grpc.RpcError as exc:
            failure = _rpc_error(exc)
            reply = Reply(request_id, error_code=failure.code, error_message=failure.message)
        except wire.WireError as exc:
            reply = Reply(
                request_id,
                error_code=UNAVAILABLE,
                error_message=f"malformed reply from the teacher: {exc}",
            )
        with self._lock:
            self._calls.pop(request_id, None)
            self._outstanding.discard(request_id)
        self._put(reply)

    def submit(self, request_id: int, inputs: object = None, ids: np.ndarray | None = None) -> None:
        message = wire.encode_request(request_id, inputs=inputs, ids=ids)
        with self._lock:
            if self._call_readers is not None:
                call = self._distill(iter((message,)), metadata=self._metadata)
                self._calls[request_id] = call
                self._outstanding.add(request_id)
                self._call_readers.submit(self._read_call, request_id, call)
                return
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
        with self._lock:
            calls, self._calls = list(self._calls.values()), {}
        for call in calls:
            call.cancel()
        if self._call_readers is not None:
            self._call_readers.shutdown(wait=False)
        self._channel.close()
        with self._lock:
            if not self._wake_closed:
                self._wake_closed = True
                os.close(self._wake_r)
                os.close(self._wake_w)


def _rpc_error(exc: grpc.RpcError) -> TeacherError:
    code = exc.code() if hasattr(exc, "code") else None
    number = code.value[0] if code is not None else UNAVAILABLE
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return TeacherError(number, details or str(code))
