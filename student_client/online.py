"""`EndpointClient`: a small synchronous client of one online teacher (gRPC or ZeroMQ).

    teacher = EndpointClient("grpc://127.0.0.1:50051", token="...")
    info = teacher.describe()
    batch = teacher.request([3, 1, 4])                      # index mode
    batch = teacher.request([0, 1], inputs=torch.rand(2, 1, 8, 8))   # query mode

Endpoints: `grpc://host:port`, `grpcs://host:port` (TLS), `unix:///path` (gRPC over a unix
socket), `zmq://host:port`, `ipc:///path` (ZeroMQ over a unix socket). `submit`/`poll` keep
many requests in flight; the transport layer (`lyceum.student_client._connections`) is kept
separate so the replica/failover source of issue #4 can reuse it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lyceum.proto.codec import KnowledgeBatch, decode, encode
from lyceum.proto.schema import KnowledgeSchema
from lyceum.proto.wire import Reply
from lyceum.student_client._connections import (
    Connection,
    Credentials,
    GrpcConnection,
    TeacherError,
    ZmqConnection,
)
from lyceum.student_client._credentials import CredentialOptions
from lyceum.v1 import knowledge_pb2 as pb

__all__ = ["EndpointClient", "TeacherError", "TeacherInfo", "connect"]


@dataclass(frozen=True)
class TeacherInfo:
    """What `describe()` returns: the teacher's schemas, identity and limits."""

    schema: KnowledgeSchema
    input_schema: KnowledgeSchema | None
    teacher_id: str
    format_version: str
    accepts_index: bool
    max_request_samples: int
    max_message_bytes: int

    @classmethod
    def from_reply(cls, reply: pb.DescribeReply) -> TeacherInfo:
        return cls(
            schema=KnowledgeSchema.from_json(reply.knowledge_schema_json),
            input_schema=(
                KnowledgeSchema.from_json(reply.input_schema_json)
                if reply.input_schema_json
                else None
            ),
            teacher_id=reply.teacher_id,
            format_version=reply.format_version,
            accepts_index=reply.accepts_index,
            max_request_samples=reply.max_request_samples,
            max_message_bytes=reply.max_message_bytes,
        )


def connect(endpoint: str, credentials: Credentials) -> Connection:
    """A transport connection for an endpoint URL; errors list the supported schemes."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or not rest:
        raise ValueError(
            f"endpoint {endpoint!r}: expected grpc://host:port, grpcs://host:port, unix:///path, "
            f"zmq://host:port or ipc:///path"
        )
    if scheme in ("grpc", "grpcs"):
        return GrpcConnection(rest, credentials, tls=scheme == "grpcs")
    if scheme == "unix":
        return GrpcConnection(endpoint, credentials, tls=False)
    if scheme == "zmq":
        return ZmqConnection(f"tcp://{rest}", credentials)
    if scheme == "ipc":
        return ZmqConnection(endpoint, credentials)
    raise ValueError(
        f"endpoint {endpoint!r}: unknown scheme {scheme!r}; use grpc, grpcs, unix, zmq or ipc"
    )


class EndpointClient:
    """A client of one teacher: `describe()`, `request(ids, inputs=None)`, `submit`/`poll`."""

    def __init__(
        self,
        endpoint: str,
        *,
        token: str | bytes | None = None,
        token_file: str | Path | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_server_name: str | None = None,
        curve_server_key: str | bytes | None = None,
        curve_public_key: str | bytes | None = None,
        curve_secret_key: str | bytes | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        credentials = CredentialOptions(
            token=token,
            token_file=token_file,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_server_name=tls_server_name,
            curve_server_key=curve_server_key,
            curve_public_key=curve_public_key,
            curve_secret_key=curve_secret_key,
        ).build([endpoint])
        self._conn = connect(endpoint, credentials)
        self._ids = itertools.count(1)
        self._info: TeacherInfo | None = None
        self._done: dict[int, KnowledgeBatch | TeacherError] = {}

    def describe(self) -> TeacherInfo:
        """The teacher's knowledge schema, input schema and limits (asked once, then cached)."""
        if self._info is None:
            reply = self._conn.describe(self.timeout_s)
            self._info = TeacherInfo.from_reply(reply)
        return self._info

    def submit(
        self,
        ids: Sequence[int] | np.ndarray | torch.Tensor,
        inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> int:
        """Send one request without waiting; returns its request id (see `poll`)."""
        rid = next(self._ids)
        id_array = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.uint64)
        if inputs is None:
            self._conn.submit(rid, ids=id_array)
            return rid
        info = self.describe()
        if info.input_schema is None:
            raise ValueError(f"teacher {self.endpoint} did not describe its inputs; use index mode")
        column = info.input_schema.fields[0].name
        self._conn.submit(rid, inputs=encode(info.input_schema, id_array, {column: inputs}))
        return rid

    def poll(self, timeout_s: float = 0.0) -> list[tuple[int, KnowledgeBatch | TeacherError]]:
        """Finished requests as (request id, knowledge or error), waiting up to `timeout_s`."""
        return [(r.request_id, self._result(r)) for r in self._conn.poll(timeout_s)]

    def _result(self, reply: Reply) -> KnowledgeBatch | TeacherError:
        if reply.knowledge is None:
            return TeacherError(reply.error_code, reply.error_message)
        try:
            return decode(reply.knowledge, self.describe().schema)
        except ValueError as exc:
            return TeacherError(13, f"the teacher's knowledge does not match its schema: {exc}")

    def wait(self, request_id: int, timeout_s: float | None = None) -> KnowledgeBatch:
        """Block until one request finishes; raises `TeacherError` if it failed."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while request_id not in self._done:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TeacherError(
                    14, f"no reply to request {request_id} from {self.endpoint} in time"
                )
            self._done.update(self.poll(remaining))
        result = self._done.pop(request_id)
        if isinstance(result, TeacherError):
            raise result
        return result

    def request(
        self,
        ids: Sequence[int] | np.ndarray | torch.Tensor,
        inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> KnowledgeBatch:
        """Knowledge for `ids`: index mode without `inputs`, query mode with them."""
        return self.wait(self.submit(ids, inputs))

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> EndpointClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
