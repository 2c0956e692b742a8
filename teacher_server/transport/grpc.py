"""The gRPC transport: `Describe`, and `Distill` as a bidirectional stream of many requests.

Distill messages bypass protobuf's generated classes (pass-through serializers and the
hand-rolled framing of `lyceum.proto.wire`): the request's Arrow bytes are decoded straight
from the received buffer and a reply is its knowledge with a few header bytes in front, one
copy instead of the 4+ that `bytes` fields cost. Each stream has a reader thread that submits
requests as they arrive, while the handler thread yields replies as the batcher finishes them,
so one stream keeps many requests in flight and replies come back in completion order.
Batches run on the batcher's workers: running them on the handler thread instead (as the
ZeroMQ transport does on its socket thread) was slower here, 0.7-0.8x at 64 KB and 16 MiB
(bench/transport.md): the handler then encodes and sends in turn instead of in parallel.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lyceum.proto import wire
from lyceum.teacher_server.errors import INVALID_ARGUMENT, UNAVAILABLE, ServeError
from lyceum.teacher_server.metrics import log_event
from lyceum.teacher_server.transport.base import INDEX, QUERY, TeacherService
from lyceum.v1 import knowledge_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Teacher"].full_name
# Room for the envelope around a maximal payload; payloads themselves are checked against
# the configured limit by the service, which answers INVALID_ARGUMENT and keeps the stream.
_ENVELOPE_SLACK = 1 << 20


@dataclass(frozen=True)
class _StreamEnd:
    requests: int


_CANCELLED = object()


def _bearer(context: grpc.ServicerContext) -> bytes | None:
    for key, value in context.invocation_metadata():
        if key == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip().encode() if scheme.lower() == "bearer" else b""
    return None


class GrpcTransport:
    """Serves the Teacher service, grpc's health service and server reflection."""

    name = "grpc"

    def __init__(
        self,
        service: TeacherService,
        host: str,
        port: int | None,
        unix_path: Path | None,
        workers: int,
        credentials: grpc.ServerCredentials | None,
    ) -> None:
        self._service = service
        limit = 2 * service.max_message_bytes + _ENVELOPE_SLACK
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lyceum-grpc"),
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                ("grpc.so_reuseport", 0),
            ],
            # Each open call holds a pool thread: beyond the pool, refuse new calls at once
            # (RESOURCE_EXHAUSTED) rather than leave them hanging in grpc's backlog.
            maximum_concurrent_rpcs=workers,
        )
        handlers = {
            "Describe": grpc.unary_unary_rpc_method_handler(
                self._describe,
                request_deserializer=pb.DescribeRequest.FromString,
                response_serializer=pb.DescribeReply.SerializeToString,
            ),
            # No (de)serializers: the handler gets and yields raw bytes (see module docstring).
            "Distill": grpc.stream_stream_rpc_method_handler(self._distill),
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self._endpoints: list[str] = []
        scheme = "grpcs" if credentials is not None else "grpc"
        if port is not None:
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            bound = self._bind(address, credentials)
            shown = f"[{host}]" if ":" in host else host
            self._endpoints.append(f"{scheme}://{shown}:{bound}")
        if unix_path is not None:
            self._bind(f"unix:{Path(unix_path).resolve()}", credentials)
            self._endpoints.append(f"unix://{Path(unix_path).resolve()}")

    def _bind(self, address: str, credentials: grpc.ServerCredentials | None) -> int:
        try:
            if credentials is None:
                return self._server.add_insecure_port(address)
            return self._server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise ValueError(
                f"gRPC cannot bind {address!r} (in use? no permission?): {exc}"
            ) from exc

    @property
    def endpoints(self) -> list[str]:
        return list(self._endpoints)

    def start(self) -> None:
        self._server.start()
        for name in ("", SERVICE):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def begin_drain(self) -> None:
        """Tell health checks and load balancers to stop sending new streams here."""
        self._health.enter_graceful_shutdown()

    def stop(self, grace_s: float) -> None:
        self.begin_drain()
        self._server.stop(grace_s).wait()

    def _check_access(self, context: grpc.ServicerContext) -> None:
        try:
            self._service.authenticate(_bearer(context))
        except ServeError as exc:
            self._service.record_error(self.name, exc, context.peer(), 0)
            context.abort(exc.grpc_status, exc.message)
        if self._service.draining:
            refused = ServeError(UNAVAILABLE, "the teacher is shutting down; use another replica")
            self._service.record_error(self.name, refused, context.peer(), 0)
            context.abort(refused.grpc_status, refused.message)

    def _describe(
        self, _request: pb.DescribeRequest, context: grpc.ServicerContext
    ) -> pb.DescribeReply:
        self._check_access(context)
        return self._service.describe_reply

    def _distill(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._check_access(context)
        peer = context.peer()
        log_event("stream_open", transport=self.name, peer=peer)
        replies: queue.SimpleQueue[Any] = queue.SimpleQueue()
        context.add_callback(lambda: replies.put(_CANCELLED))
        reader = threading.Thread(
            target=self._read,
            args=(requests, replies, peer),
            name="lyceum-grpc-reader",
            daemon=True,
        )
        reader.start()
        sent, expected = 0, None
        try:
            while expected is None or sent < expected:
                item = replies.get()
                if item is _CANCELLED:
                    break
                if isinstance(item, _StreamEnd):
                    expected = item.requests
                    continue
                yield item
                sent += 1
        finally:
            log_event("stream_close", transport=self.name, peer=peer, replies=sent)

    def _read(self, requests: Iterator[bytes], replies: queue.SimpleQueue[Any], peer: str) -> None:
        count = 0
        try:
            for raw in requests:
                count += 1
                self._handle(raw, replies, peer)
        except grpc.RpcError:
            pass  # the student went away or cancelled: the stream's callback ends the handler
        finally:
            replies.put(_StreamEnd(count))

    def _handle(self, raw: bytes, replies: queue.SimpleQueue[Any], peer: str) -> None:
        try:
            request = wire.decode_request(raw)
        except wire.WireError as exc:
            error = ServeError(INVALID_ARGUMENT, f"malformed DistillRequest: {exc}")
            self._fail(replies, peer, exc.request_id, error)
            return
        rid = request.request_id

        def done(result: pa.RecordBatch | ServeError) -> None:
            if isinstance(result, ServeError):
                self._fail(replies, peer, rid, result)
            else:
                replies.put(wire.encode_batch_reply(rid, result))

        mode, payload = (
            (QUERY, request.inputs) if request.inputs is not None else (INDEX, request.ids)
        )
        try:
            self._service.submit(self.name, mode, payload, done)  # type: ignore[arg-type]
        except ServeError as exc:
            self._fail(replies, peer, rid, exc)

    def _fail(self, replies: queue.SimpleQueue[Any], peer: str, rid: int, exc: ServeError) -> None:
        self._service.record_error(self.name, exc, peer, rid)
        replies.put(wire.encode_error_reply(rid, exc.code, exc.message))
