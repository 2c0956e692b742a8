"""The gRPC transport: `Describe`, and `Distill` as a bidirectional stream of many requests.

Distill messages bypass protobuf's generated classes (pass-through serializers and the
hand-rolled framing of `lyceum.proto.wire`): the request's Arrow bytes are decoded straight
from the received buffer and a reply is its knowledge with a few header bytes in front, one
copy instead of the 4+ that `bytes` fields cost.

Why `grpc.aio` on one event-loop thread and not grpcio's thread-pool server: the thread-pool
server holds a pool thread per open call (and a stream that reads ahead needs a second
thread), so the number of students was capped by the pool (32 by default) and every message
crossed three threads (grpc's poller -> stream reader -> engine -> stream handler), each a
futex wake and a GIL hand-over. Here every stream is two coroutines on the loop (a reader that
submits requests as they arrive, the handler that yields replies in completion order), open
streams cost no threads, and while batches are short (`_INLINE_MAX_S`, e.g. a GPU teacher or
a small model) the loop runs ready batches itself, as the ZeroMQ socket thread does
(`DynamicBatcher.run_ready`): a request is read, run and answered without changing threads.
Longer batches run on the batcher's workers, whose replies come back by
`call_soon_threadsafe`, so reads, health checks and Describe calls never wait for a forward
pass. Measured side by side with the thread-pool server (bench/transport.md): server CPU per
64 KB message 630 -> 490 us, 1 MB throughput 0.57x -> 0.76x of a bare grpcio stream (bare
client); handing every batch to a worker instead was slower than the thread-pool server.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lyceum.proto import wire
from lyceum.proto.errors import INVALID_ARGUMENT, UNAVAILABLE
from lyceum.teacher_server.batcher import Knowledge
from lyceum.teacher_server.errors import ServeError
from lyceum.teacher_server.transport.base import TeacherService
from lyceum.v1 import knowledge_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Teacher"].full_name
# Room for the envelope around a maximal payload; payloads themselves are checked against
# the configured limit by the service, which answers INVALID_ARGUMENT and keeps the stream.
_ENVELOPE_SLACK = 1 << 20

_T = TypeVar("_T")


@dataclass(frozen=True)
class _StreamEnd:
    requests: int


@dataclass(frozen=True)
class _Result:
    """A request's outcome, encoded by the stream's handler on the loop when it is sent."""

    request_id: int
    result: Knowledge | ServeError


_Queued = bytes | _Result | _StreamEnd

# The loop runs a batch itself only while recent batches took at most this long: a longer one
# would hold up every stream's reads (later batches would form from fewer requests, and a
# full queue would never refuse: requests wait in HTTP/2 flow control instead), health checks
# and Describe calls for its whole duration.
_INLINE_MAX_S = 0.002


def _bearer(context: grpc.aio.ServicerContext[Any, Any]) -> bytes | None:
    for key, value in context.invocation_metadata() or ():
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
        *,
        host: str,
        port: int | None,
        unix_path: Path | None,
        max_calls: int,
        credentials: grpc.ServerCredentials | None,
        max_connection_age_s: float | None = None,
        max_connection_age_grace_s: float = 5.0,
    ) -> None:
        self._service = service
        self._age_options: list[tuple[str, int]] = []
        if max_connection_age_s is not None:
            self._age_options = [
                ("grpc.max_connection_age_ms", round(max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", round(max_connection_age_grace_s * 1000)),
            ]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="lyceum-grpc", daemon=True
        )
        self._thread.start()
        self._run_scheduled = False
        self._endpoints: list[str] = []
        try:
            # grpc.aio objects belong to the loop they were made on: build them there.
            self._call(self._build(host, port, unix_path, max_calls, credentials))
        except BaseException:
            self._close_loop()
            raise

    def _call(self, coro: Awaitable[_T], timeout_s: float | None = None) -> _T:
        """Run a coroutine on the transport's loop from another thread and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)  # type: ignore[arg-type]

    async def _build(
        self,
        host: str,
        port: int | None,
        unix_path: Path | None,
        max_calls: int,
        credentials: grpc.ServerCredentials | None,
    ) -> None:
        limit = 2 * self._service.max_message_bytes + _ENVELOPE_SLACK
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                ("grpc.so_reuseport", 0),
                *self._age_options,
            ],
            # Beyond this, new calls are refused at once (RESOURCE_EXHAUSTED).
            maximum_concurrent_rpcs=max_calls,
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
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
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
        async def start() -> None:
            await self._server.start()
            for name in ("", SERVICE):
                await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

        self._call(start())

    def begin_drain(self) -> None:
        """Tell health checks and load balancers to stop sending new streams here."""
        if not self._loop.is_closed():
            self._call(self._health.enter_graceful_shutdown())

    def stop(self, grace_s: float) -> None:
        if self._loop.is_closed():
            return
        self.begin_drain()
        try:
            self._call(self._server.stop(grace_s), timeout_s=grace_s + 5)
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    async def _check_access(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        try:
            self._service.authenticate(_bearer(context))
        except ServeError as exc:
            await self._abort(context, exc)
        if self._service.draining:
            refused = ServeError(UNAVAILABLE, "the teacher is shutting down; use another replica")
            await self._abort(context, refused)

    async def _abort(
        self, context: grpc.aio.ServicerContext[Any, Any], exc: ServeError
    ) -> NoReturn:
        self._service.record_error(self.name, exc, context.peer(), 0)
        await context.abort(exc.grpc_status, exc.message)
        raise AssertionError("context.abort returned")  # it raises; this tells type checkers

    async def _describe(
        self, _request: pb.DescribeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DescribeReply:
        await self._check_access(context)
        return self._service.describe_reply

    async def _distill(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        await self._check_access(context)
        peer = context.peer()
        self._service.events.log("stream_open", peer, transport=self.name, peer=peer)
        replies: asyncio.Queue[_Queued] = asyncio.Queue()
        reader = asyncio.ensure_future(self._read(requests, replies, peer))
        sent, expected = 0, None
        try:
            while expected is None or sent < expected:
                item = await replies.get()
                if isinstance(item, _StreamEnd):
                    expected = item.requests
                    continue
                yield self._encode(item, peer) if isinstance(item, _Result) else item
                sent += 1
        finally:
            # A cancelled or failed stream: its requests still in the batcher answer into a
            # queue nobody reads, which is dropped with it.
            reader.cancel()
            self._service.events.log(
                "stream_close", peer, transport=self.name, peer=peer, replies=sent
            )

    async def _read(
        self,
        requests: AsyncIterator[bytes],
        replies: asyncio.Queue[_Queued],
        peer: str,
    ) -> None:
        count = 0
        try:
            async for raw in requests:
                count += 1
                self._handle(raw, replies, peer)
        except grpc.RpcError:
            pass  # the student went away or cancelled: the handler is cancelled with the call
        finally:
            replies.put_nowait(_StreamEnd(count))

    def _handle(self, raw: bytes, replies: asyncio.Queue[_Queued], peer: str) -> None:
        try:
            request = wire.decode_request(raw)
        except wire.WireError as exc:
            error = ServeError(INVALID_ARGUMENT, f"malformed DistillRequest: {exc}")
            self._fail(replies, peer, exc.request_id, error)
            return
        rid = request.request_id
        deliver = self._deliverer(replies)

        def done(result: Knowledge | ServeError) -> None:
            deliver(_Result(rid, result))

        try:
            self._service.submit(self.name, request.mode, request.payload, done, defer=True)
        except ServeError as exc:
            self._fail(replies, peer, rid, exc)
            return
        self._schedule_run()

    def _deliverer(self, replies: asyncio.Queue[_Queued]) -> Callable[[_Result], None]:
        loop, loop_thread = self._loop, self._thread.ident

        def deliver(reply: _Result) -> None:
            if threading.get_ident() == loop_thread:
                replies.put_nowait(reply)  # a batch the loop ran: no hand-off needed
                return
            # RuntimeError: the transport stopped (loop closed); the student is gone with it.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(replies.put_nowait, reply)

        return deliver

    def _encode(self, item: _Result, peer: str) -> bytes:
        result = item.result
        if isinstance(result, Knowledge):
            try:
                batch = self._service.reply_batch(result)
                return wire.encode_batch_reply(item.request_id, batch, self._service.compression)
            except ServeError as exc:
                result = exc
        self._service.record_error(self.name, result, peer, item.request_id)
        return wire.encode_error_reply(item.request_id, result.code, result.message)

    def _schedule_run(self) -> None:
        # Once per loop iteration: the requests every stream read in this iteration are
        # queued before the batch runs, so they share it.
        if not self._run_scheduled:
            self._run_scheduled = True
            self._loop.call_soon(self._run_ready)

    def _run_ready(self) -> None:
        self._run_scheduled = False
        # One batch per iteration: the loop sends its replies and reads what arrived meanwhile
        # before the next one; `again=True` keeps the engine from being handed to a worker.
        if self._service.run_ready(again=True, max_batch_s=_INLINE_MAX_S):
            self._schedule_run()

    def _fail(
        self,
        replies: asyncio.Queue[_Queued],
        peer: str,
        rid: int,
        exc: ServeError,
    ) -> None:
        self._service.record_error(self.name, exc, peer, rid)
        replies.put_nowait(wire.encode_error_reply(rid, exc.code, exc.message))
