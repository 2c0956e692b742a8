"""A student's ZeroMQ connection to one teacher: a DEALER socket speaking the frames of
`lyceum.proto.zmq_frames`, with a monitor that reports refused CURVE handshakes.
"""

from __future__ import annotations

import errno
import itertools
import time
from collections.abc import Mapping

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from lyceum.proto import zmq_frames
from lyceum.proto.errors import UNAUTHENTICATED, UNAVAILABLE
from lyceum.proto.wire import Reply
from lyceum.student_client._connections import Credentials, TeacherError
from lyceum.v1 import knowledge_pb2 as pb

__all__ = ["ZmqConnection"]

_NO_DETAIL_LIMIT = 3


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
        # socket, which would otherwise look like a teacher that never answers. A mismatch is
        # not always told as one: when the teacher closes the connection before our side has
        # read its error, libzmq reports a handshake failed "with no detail" (errno EPIPE or
        # ECONNRESET), and on some connections every retry does (2 of 40 plain connections to
        # a CURVE socket on a loaded machine). A TCP proxy whose backend is down looks the same,
        # so `_NO_DETAIL_LIMIT` of those in a row are reported as UNAVAILABLE (retryable: the
        # proxy's teacher may come back) with both causes named, and a handshake that succeeds
        # afterwards takes the report back.
        self._curve = credentials.curve_server_key is not None
        self._no_detail = 0
        self._monitor = sock.get_monitor_socket(
            events=zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_SUCCEEDED
        )
        try:
            sock.connect(address)
        except zmq.ZMQError as exc:
            self._monitor.close(linger=0)
            sock.close(linger=0)
            self._ctx.term()
            raise ValueError(
                f"ZeroMQ cannot connect to {address!r} ({exc}); expected zmq://host:port or "
                f"ipc:///path"
            ) from None
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
        self._sock.send_multipart(frames, copy=False)  # type: ignore[arg-type]

    def describe(self, timeout_s: float) -> pb.DescribeReply:
        rid = next(self._describe_ids)
        self._send(zmq_frames.describe_request(rid, self._token))
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
        if ids is not None:
            self._send(zmq_frames.index_request(request_id, ids, self._token))
        else:
            self._send(zmq_frames.query_request(request_id, inputs, self._token))
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
            failure = self._monitor_events()
            if failure is not None:
                code, message = failure
                lost, self._outstanding = self._outstanding, set()
                out += [Reply(rid, error_code=code, error_message=message) for rid in lost]
        while True:
            try:
                frames = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return out
            reply = zmq_frames.read_reply(frames)
            if reply is None:
                continue  # not a reply of ours: nothing to match it to
            self._outstanding.discard(reply.request_id)
            if isinstance(reply, zmq_frames.Described):
                self._describes[reply.request_id] = reply.message
            else:
                out.append(reply)

    def _monitor_events(self) -> tuple[int, str] | None:
        """Read every pending monitor event, in order; the handshake failure they amount to,
        if any: a refusal (UNAUTHENTICATED) outranks anything after it, a streak of failures
        without detail counts until a handshake succeeds."""
        failure: tuple[int, str] | None = None
        while True:
            try:
                event = recv_monitor_message(self._monitor, flags=zmq.NOBLOCK)
            except zmq.Again:
                return failure
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._no_detail = 0
                if failure is not None and failure[0] != UNAUTHENTICATED:
                    failure = None
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                self._no_detail += 1
                if self._no_detail >= _NO_DETAIL_LIMIT and failure is None:
                    failure = self._no_detail_failure(event)
            else:
                self._no_detail = 0
                found = self._handshake_failure(event)
                if failure is None or failure[0] != UNAUTHENTICATED:
                    failure = found

    def _no_detail_failure(self, event: Mapping[str, object]) -> tuple[int, str]:
        number = int(event["value"])  # type: ignore[call-overload]
        cause = (
            "the teacher refused our CURVE handshake or does not use CURVE (check "
            "curve_server_key against its public key)"
            if self._curve
            else "the teacher requires CURVE encryption (pass its public key as curve_server_key)"
        )
        return UNAVAILABLE, (
            f"the teacher closed {self._no_detail} ZeroMQ handshakes in a row without a reason "
            f"({errno.errorcode.get(number, str(number))}): most likely {cause}; or the "
            "endpoint is a TCP proxy whose teacher is down, or not a Lyceum teacher"
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
        return UNAVAILABLE, (
            f"the ZeroMQ handshake with the teacher failed (ZMTP protocol error "
            f"{int(event['value']):#x})"  # type: ignore[call-overload]
        )

    def close(self) -> None:
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)
        self._ctx.term()
