"""Connections to one online teacher: the contract every transport's connection keeps.

A connection moves bytes, nothing more: `submit` sends one encoded request without waiting,
`poll` returns whatever replies have arrived (in any order), `describe` asks for the
teacher's schema. Encoding inputs, decoding knowledge, replicas and failover happen a layer
up (`OnlineTeacher`). One class per transport (`_grpc_connection`, `_zmq_connection`);
`_endpoints.connect` picks one for an endpoint URL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import zmq

from lyceum.proto.errors import code_name
from lyceum.proto.wire import Reply
from lyceum.v1 import knowledge_pb2 as pb

__all__ = ["Connection", "Credentials", "TeacherError", "wait_any"]


class TeacherError(Exception):
    """A request or call the teacher refused or could not complete: a wire code and its text.

    `code` is one of `lyceum.proto.errors`' codes (gRPC's status codes: INVALID_ARGUMENT,
    RESOURCE_EXHAUSTED, UNAVAILABLE, UNAUTHENTICATED, ...), the same on both transports.
    """

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{self.code_name}: {message}")

    @property
    def code_name(self) -> str:
        return code_name(self.code)


@dataclass(frozen=True)
class Credentials:
    """How a student proves who it is and checks who the teacher is (the files read)."""

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

    Exists so the client (its replicas and failover) treats gRPC and ZeroMQ the same: many
    requests in flight, replies tagged by request id and returned as they arrive.
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
