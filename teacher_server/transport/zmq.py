"""The ZeroMQ transport: a ROUTER socket speaking multipart frames, same semantics as gRPC.

The frames are `lyceum.proto.zmq_frames`' (request id, kind, payload, optional token; replies
echo the request id).

One thread owns the socket (ZeroMQ sockets are not thread-safe). It receives every request
that has arrived, queues them all, then runs the ready batch itself when an engine is idle
(`DynamicBatcher.run_ready`) and sends those replies directly: on a busy server requests
never change threads. Replies of batches that batcher workers ran (a request that waited for
company, another device, a gRPC-run batch) come back through a queue and wake the thread
with a byte on a pipe the poller watches. Large frames are sent zero-copy (the Arrow buffer
itself). ROUTER_MANDATORY makes a send to a peer at its high-water mark block (up to
`send_timeout_ms`) or fail instead of silently dropping.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from lyceum.proto import zmq_frames
from lyceum.proto.codec import to_ipc
from lyceum.proto.errors import INVALID_ARGUMENT
from lyceum.proto.wire import WireError
from lyceum.teacher_server.batcher import Done, Knowledge
from lyceum.teacher_server.errors import ServeError
from lyceum.teacher_server.metrics import log_event
from lyceum.teacher_server.security import CurveServerKeys
from lyceum.teacher_server.transport.base import TeacherService

_MONITOR_EVENTS: dict[int, str] = {
    zmq.EVENT_ACCEPTED: "connect",
    zmq.EVENT_DISCONNECTED: "disconnect",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth_failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed",
}
_RECV_BURST = 64
# A ZeroMQ peer's identity is 5 bytes ROUTER picked, unless the peer sets its own (up to 255
# bytes; a raw TCP client's garbage read as ZMTP 1.0 does): logs show this much of it.
_PEER_BYTES = 16


def _peer_name(peer: bytes) -> str:
    shown = peer[:_PEER_BYTES].hex()
    return shown if len(peer) <= _PEER_BYTES else f"{shown}...({len(peer)} bytes)"


class ZmqTransport:
    """ROUTER socket on TCP and/or ipc, optional CURVE encryption with ZAP authentication."""

    name = "zmq"

    def __init__(
        self,
        service: TeacherService,
        *,
        host: str,
        port: int | None,
        ipc_path: Path | None,
        send_timeout_ms: int,
        curve: CurveServerKeys | None,
    ) -> None:
        self._service = service
        self._ctx = zmq.Context()
        self._auth = (
            curve.start_authenticator(self._ctx, service.events) if curve is not None else None
        )
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
        sock.setsockopt(zmq.LINGER, 0)
        # A hard cap far above the configured limit: frames between the two get a polite
        # INVALID_ARGUMENT from the service; beyond it libzmq drops the connection.
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * service.max_message_bytes + (1 << 20))
        if curve is not None:
            curve.apply(sock)
        self._sock = sock
        self._endpoints: list[str] = []
        if port is not None:
            shown = f"[{host}]" if ":" in host else host
            if ":" in host:
                sock.setsockopt(zmq.IPV6, 1)
            bound = self._bind(f"tcp://{shown}:{port if port else '*'}")
            self._endpoints.append(f"zmq://{shown}:{bound.rsplit(':', 1)[1]}")
        if ipc_path is not None:
            path = Path(ipc_path).resolve()
            self._bind(f"ipc://{path}")
            self._endpoints.append(f"ipc://{path}")
        self._monitor = sock.get_monitor_socket(events=sum(_MONITOR_EVENTS))
        # Results of batches a worker ran, encoded and sent by the socket thread.
        self._outbox: queue.SimpleQueue[tuple[bytes, bytes, Knowledge | ServeError]] = (
            queue.SimpleQueue()
        )
        self._wake_r, self._wake_w = os.pipe()
        self._wake_lock = threading.Lock()
        self._wake_closed = False
        os.set_blocking(self._wake_w, False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lyceum-zmq", daemon=True)

    def _bind(self, address: str) -> str:
        try:
            self._sock.bind(address)
        except zmq.ZMQError as exc:
            raise ValueError(
                f"ZeroMQ cannot bind {address!r} (in use? no permission?): {exc}"
            ) from exc
        return self._sock.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def endpoints(self) -> list[str]:
        return list(self._endpoints)

    def start(self) -> None:
        self._thread.start()

    def begin_drain(self) -> None:
        """Nothing to announce: ZeroMQ has no health service or load balancer to tell. Students
        learn of the drain from the UNAVAILABLE answers the service gives new requests."""

    def stop(self, grace_s: float) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(timeout=grace_s + 5)
        if self._thread.is_alive():
            # Still inside a send to a student that stopped reading: ZeroMQ sockets are not
            # thread-safe, so leave the socket to the (daemon) thread and the process exit.
            log_event("zmq_stop_timeout", grace_s=grace_s)
            return
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()
        with self._wake_lock:
            # A reply callback running after this (a worker the drain left behind) must not
            # write to a closed, possibly reused, descriptor: _wake checks under the lock.
            self._wake_closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _wake(self) -> None:
        # One unread byte is enough to wake the loop; a full pipe means a wake-up is pending.
        with self._wake_lock, contextlib.suppress(BlockingIOError):
            if not self._wake_closed:
                os.write(self._wake_w, b"\0")

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        timeout: int | None = None
        while True:
            ready = dict(poller.poll(timeout))
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            self._flush()
            if self._stop.is_set():
                return
            if self._monitor in ready:
                self._log_connections()
            if self._sock in ready:
                for _ in range(_RECV_BURST):
                    try:
                        frames = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(frames)
            # After a batch ran here, look for what arrived meanwhile without blocking: it
            # forms the next batch.
            timeout = 0 if self._service.run_ready(again=True) else None

    def _log_connections(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self._monitor, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            name = _MONITOR_EVENTS.get(int(event["event"])) or str(event["event"])
            endpoint = event["endpoint"]
            # Keyed by descriptor: every connection is logged until a client that reconnects
            # in a loop reaches the limiter's burst.
            self._service.events.log(
                f"connection_{name}",
                str(event["value"]),
                transport=self.name,
                endpoint=endpoint.decode() if isinstance(endpoint, bytes) else endpoint,
                fd=event["value"],
            )

    def _flush(self) -> None:
        while True:
            try:
                peer, rid, result = self._outbox.get_nowait()
            except queue.Empty:
                return
            self._send(self._reply(peer, rid, result))

    def _send(self, frames: list[object]) -> None:
        try:
            self._sock.send_multipart(frames, copy=False)  # type: ignore[arg-type]
        except zmq.ZMQError as exc:
            # Again: the student stopped reading (send timeout). EHOSTUNREACH under
            # ROUTER_MANDATORY: it disconnected before its reply.
            peer = frames[0]
            reason = (
                "student not reading (send timeout)" if isinstance(exc, zmq.Again) else str(exc)
            )
            self._service.events.log(
                "reply_dropped",
                _peer_name(peer) if isinstance(peer, bytes) else "",
                transport=self.name,
                peer=_peer_name(peer) if isinstance(peer, bytes) else None,
                reason=reason,
            )

    def _handle(self, frames: list[zmq.Frame]) -> None:
        request = zmq_frames.IncomingRequest(frames)
        peer, rid = request.peer, request.request_id
        try:
            try:
                # Credentials first: nothing from an unauthenticated peer is parsed or run.
                self._service.authenticate(request.token())
                parsed = request.parse()
            except WireError as exc:
                raise ServeError(INVALID_ARGUMENT, str(exc)) from None
            if isinstance(parsed, zmq_frames.DescribeRequest):
                reply = self._service.describe_reply.SerializeToString()
                self._send(zmq_frames.describe_reply(peer, rid, reply))
                return
            self._service.submit(
                self.name, parsed.mode, parsed.payload, self._replier(peer, rid), defer=True
            )
        except ServeError as exc:
            self._service.record_error(
                self.name, exc, _peer_name(peer), zmq_frames.request_number(rid)
            )
            self._send(zmq_frames.error_reply(peer, rid, exc.code, exc.message))

    def _replier(self, peer: bytes, rid: bytes) -> Done:
        def done(result: Knowledge | ServeError) -> None:
            if threading.get_ident() == self._thread.ident:
                self._send(self._reply(peer, rid, result))  # a batch this thread ran
            else:
                self._outbox.put((peer, rid, result))
                self._wake()

        return done

    def _reply(self, peer: bytes, rid: bytes, result: Knowledge | ServeError) -> list[object]:
        if isinstance(result, Knowledge):
            try:
                batch = self._service.reply_batch(result)
                data = to_ipc(batch, self._service.compression)
                return zmq_frames.knowledge_reply(peer, rid, data)
            except ServeError as exc:
                result = exc
        self._service.record_error(
            self.name, result, _peer_name(peer), zmq_frames.request_number(rid)
        )
        return zmq_frames.error_reply(peer, rid, result.code, result.message)
