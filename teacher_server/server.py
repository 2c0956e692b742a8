"""The online teacher server: engines + dynamic batcher + transports, and its lifecycle.

`create_server(config, engines, dataset, model)` builds and binds everything and returns the
server with its bound ports (tests bind port 0); `server.start()` starts serving; `serve(...)`
is the whole process lifecycle: start, announce the endpoints (stdout line and
`--ready-file`), wait for SIGTERM/SIGINT or `exit_after_s`, then drain: refuse new requests
(UNAVAILABLE), finish those in flight within the grace period, stop.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lyceum.proto.manifest import ModelIdentity, model_identity
from lyceum.proto.sizes import sample_bytes
from lyceum.teacher_server.batcher import DynamicBatcher
from lyceum.teacher_server.config import ServerConfig
from lyceum.teacher_server.engine import TeacherEngine
from lyceum.teacher_server.metrics import ServerMetrics, log_event
from lyceum.teacher_server.security import CurveServerKeys, grpc_server_credentials, read_token
from lyceum.teacher_server.transport.base import TeacherService, Transport
from lyceum.teacher_server.transport.grpc import GrpcTransport
from lyceum.teacher_server.transport.zmq import ZmqTransport

_MIN_MESSAGE_LIMIT = 64 << 20


def message_limit(engine: TeacherEngine, max_batch: int) -> int:
    """A message limit that fits a full batch of inputs or knowledge, with room to spare.

    Variable-length (sequence) fields cannot be sized in advance; the 64 MiB floor covers
    typical ones and `max_message_bytes` raises it.
    """
    per_sample = engine.example_bytes
    knowledge = 0
    for spec in engine.schema.fields:
        if spec.variable:
            continue
        knowledge += sample_bytes(spec, 0)
    return max(_MIN_MESSAGE_LIMIT, 2 * max_batch * max(per_sample, knowledge) + (1 << 20))


def _grpc(service: TeacherService, config: ServerConfig) -> Transport | None:
    """gRPC, if the config gives it a TCP port or a unix socket."""
    if config.grpc_port is None and config.grpc_unix is None:
        return None
    return GrpcTransport(
        service,
        host=config.host,
        port=config.grpc_port,
        unix_path=config.grpc_unix,
        max_calls=config.grpc_max_calls,
        credentials=grpc_server_credentials(config.security),
        max_connection_age_s=config.max_connection_age_s,
        max_connection_age_grace_s=config.max_connection_age_grace_s,
    )


def _zmq(service: TeacherService, config: ServerConfig) -> Transport | None:
    """ZeroMQ, if the config gives it a TCP port or an ipc socket."""
    if config.zmq_port is None and config.zmq_ipc is None:
        return None
    return ZmqTransport(
        service,
        host=config.host,
        port=config.zmq_port,
        ipc_path=config.zmq_ipc,
        send_timeout_ms=config.zmq_send_timeout_ms,
        curve=CurveServerKeys.from_config(config.security),
    )


TRANSPORTS: dict[str, Callable[[TeacherService, ServerConfig], Transport | None]] = {
    "grpc": _grpc,
    "zmq": _zmq,
}
"""Every transport a server can run, by name, in the order they are built, started and
listed: each builds itself from the config, or returns None if the config does not enable it.
A new transport is one module beside `transport/grpc.py` and one entry here."""


def _default_identity(model: torch.nn.Module) -> ModelIdentity:
    """The identity of a model served without a spec: its class and its weights' hash.

    Hashing the weights costs one pass over them (measured: 1 ms for the demo teacher,
    ~0.4 GiB/s, i.e. ~1 s per 400 MiB of fp32 weights, next to ~1.5 GiB/s for the checkpoint
    file's hash that `teacher serve` also does). It is paid once per process, not per device,
    and it is what tells replicas apart whose weights no checkpoint names (a factory that
    initialises or downloads them), as the dump's manifest does.
    """
    name = f"{type(model).__module__}:{type(model).__qualname__}"
    return model_identity(name, model)


class TeacherServer:
    """One process's teacher: an engine per device, one batcher, gRPC and/or ZeroMQ.

    `model` is the teacher's identity reported by Describe (spec, checkpoint and weights
    hashes); replicas of one teacher must report the same one. Default: `_default_identity`
    of the first engine's model.
    """

    def __init__(
        self,
        config: ServerConfig,
        engines: Sequence[TeacherEngine],
        dataset: torch.utils.data.Dataset | None = None,
        model: ModelIdentity | None = None,
    ) -> None:
        if not engines:
            raise ValueError("a teacher server needs at least one engine (one per --device)")
        self.config = config
        self.model = model if model is not None else _default_identity(engines[0].model)
        self.metrics = ServerMetrics()
        limit = config.max_message_bytes or message_limit(engines[0], config.max_batch)
        self.batcher = DynamicBatcher(
            engines,
            max_batch=config.max_batch,
            max_delay_s=config.max_delay_ms / 1000,
            max_queue_samples=config.queue_samples(len(engines)),
            metrics=self.metrics,
            max_batch_tokens=config.max_batch_tokens,
        )
        security = config.security
        self.service = TeacherService(
            self.batcher,
            input_schema=engines[0].input_schema,
            sequence_input=engines[0].sequence_input,
            named_inputs=engines[0].layout.kind == "dict",
            dataset=dataset,
            token=read_token(security.token_file) if security.token_file else None,
            max_message_bytes=limit,
            metrics=self.metrics,
            teacher_id=config.teacher_id,
            model=self.model,
            compression=config.compression,
        )
        self.transports: list[Transport] = []
        for build in TRANSPORTS.values():
            transport = build(self.service, config)
            if transport is not None:
                self.transports.append(transport)
        self.metrics_port: int | None = None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    @property
    def endpoints(self) -> list[str]:
        return [e for t in self.transports for e in t.endpoints]

    @property
    def ports(self) -> dict[str, int]:
        """Bound TCP ports by name (`grpc`, `zmq`, `metrics`), for whichever are enabled."""
        ports = {}
        for t in self.transports:
            for e in t.endpoints:
                if e.startswith(("grpc://", "grpcs://", "zmq://")):
                    ports[t.name] = int(e.rsplit(":", 1)[1])
        if self.metrics_port is not None:
            ports["metrics"] = self.metrics_port
        return ports

    def start(self) -> None:
        self.batcher.start()
        for t in self.transports:
            t.start()
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(self.config.host, self.config.metrics_port)
        log_event(
            "serving",
            endpoints=self.endpoints,
            ports=self.ports,
            pid=os.getpid(),
            model=self.model.model_dump(exclude_defaults=True),
        )

    def stop(self, grace_s: float | None = None) -> bool:
        """Drain and stop: refuse new requests, finish those in flight within `grace_s`
        (default: the config's), then close every transport. True if nothing was cut short."""
        grace = self.config.grace_s if grace_s is None else grace_s
        with self._stop_lock:
            if self._stopped.is_set():
                return True
            started = time.monotonic()
            self.service.draining = True
            self.batcher.stop_accepting()
            for t in self.transports:
                t.begin_drain()
            log_event("draining", in_flight_samples=self.batcher.in_flight, grace_s=grace)
            drained = self.batcher.drain(grace)
            # Replies of the last batches may still sit in transport queues: give them a
            # moment to leave before connections close.
            flush = max(0.5, min(2.0, grace - (time.monotonic() - started)))
            # The batcher first: requests it still holds get their UNAVAILABLE replies while
            # the transports can still send them.
            self.batcher.close()
            for t in self.transports:
                t.stop(flush)
            self.metrics.close_http()
            self.service.events.flush()
            self._stopped.set()
            log_event("stopped", drained=drained, seconds=round(time.monotonic() - started, 3))
            return drained

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the server has stopped; True if it did within the timeout."""
        return self._stopped.wait(timeout_s)


def create_server(
    config: ServerConfig,
    engines: Sequence[TeacherEngine],
    dataset: torch.utils.data.Dataset | None = None,
    model: ModelIdentity | None = None,
) -> tuple[TeacherServer, dict[str, int]]:
    """Build and bind a teacher server (not yet serving: call `.start()`) and its TCP ports.

    Binding happens here, so port 0 resolves to the real port before anything is served.
    """
    server = TeacherServer(config, engines, dataset, model)
    return server, server.ports


def _announce(server: TeacherServer, ready_file: Path | None) -> None:
    info: dict[str, Any] = {"pid": os.getpid(), "endpoints": server.endpoints, **server.ports}
    line = json.dumps(info, sort_keys=True)
    # The stdout line is the contract for harnesses without a ready file; flush it at once.
    print(f"lyceum teacher serving {line}", flush=True)
    if ready_file is not None:
        tmp = Path(f"{ready_file}.tmp")
        tmp.write_text(line)
        tmp.replace(ready_file)  # atomic: a reader never sees half a file


def serve(
    config: ServerConfig,
    engines: Sequence[TeacherEngine],
    dataset: torch.utils.data.Dataset | None = None,
    model: ModelIdentity | None = None,
) -> int:
    """Run a teacher until SIGTERM/SIGINT (or `exit_after_s`), then drain; returns an exit code."""
    server, _ports = create_server(config, engines, dataset, model)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log_event("signal", signal=signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        _announce(server, config.ready_file)
        stop.wait(config.exit_after_s)
    finally:
        drained = server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        sys.stdout.flush()
    return 0 if drained else 1
