"""Observability: Prometheus metrics (optional HTTP endpoint) and one-line structured logs.

Metrics live in a registry per server rather than prometheus-client's global one, so several
servers in one process (tests, benches) do not collide.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("lyceum.teacher_server")

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """One JSON line per event (connection, error, lifecycle), easy to grep and to ship."""
    if log.isEnabledFor(level):
        log.log(level, json.dumps({"event": event, **fields}, default=str, sort_keys=True))


class ServerMetrics:
    """Requests, samples, errors by code, batch sizes, queue depth and request latency."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._http: WSGIServer | None = None
        self.requests = Counter(
            "lyceum_teacher_requests",
            "Distill requests received.",
            ["transport", "mode"],
            registry=self.registry,
        )
        self.samples = Counter(
            "lyceum_teacher_samples",
            "Samples answered with knowledge.",
            ["transport", "mode"],
            registry=self.registry,
        )
        self.errors = Counter(
            "lyceum_teacher_errors",
            "Requests answered with an error, by error code.",
            ["transport", "code"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "lyceum_teacher_batch_size",
            "Samples per device batch.",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_samples = Gauge(
            "lyceum_teacher_queue_samples",
            "Samples waiting for a device.",
            registry=self.registry,
        )
        self.latency = Histogram(
            "lyceum_teacher_request_latency_seconds",
            "From a request's arrival in the queue to its knowledge being encoded.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def serve_http(self, host: str, port: int) -> int:
        """Expose the metrics at http://host:port/metrics; returns the bound port."""
        try:
            self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ValueError(
                f"--metrics-port {port}: cannot bind {host}:{port} ({exc}); is the port in use? "
                f"pick another or 0 for any free port"
            ) from exc
        return int(self._http.server_port)

    def close_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
