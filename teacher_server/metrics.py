"""Observability: Prometheus metrics (optional HTTP endpoint) and one-line structured logs.

Metrics live in a registry per server rather than prometheus-client's global one, so several
servers in one process (tests, benches) do not collide.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
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


class EventLimiter:
    """Logs an event that outsiders can trigger at will (bad input, refused credentials,
    dropped replies, connections) at most once per key (a peer) per `interval_s`, and at
    most `burst` lines per event per interval over all keys. A line logged after some were
    held back says how many (`repeated`: this key's since its previous line); `flush` logs
    what is still held. The metrics count every occurrence.

    Why: 50 garbage frames of 100 KB sent to the ZeroMQ port were ~6,900 log lines (libzmq
    reads raw bytes as ZMTP 1.0 messages, hundreds per connection); a log that floods
    hides the lines that matter and fills the disk.
    """

    def __init__(
        self,
        interval_s: float = 10.0,
        burst: int = 10,
        max_keys: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        # (event, key) -> [when last logged, occurrences held back since]
        self._keys: dict[tuple[str, str], list[float]] = {}
        # event -> [window start, lines logged in the window]
        self._windows: dict[str, list[float]] = {}
        self._dropped: dict[str, int] = {}  # held counts of keys forgotten by _prune

    def log(self, event: str, key: str, level: int = logging.INFO, **fields: Any) -> None:
        now = self._clock()
        with self._lock:
            entry = self._keys.get((event, key))
            if entry is None:
                if len(self._keys) >= self.max_keys:
                    self._prune(now)
                entry = self._keys[(event, key)] = [-float("inf"), 0]
            window = self._windows.setdefault(event, [now, 0])
            if now - window[0] >= self.interval_s:
                window[:] = [now, 0]
            if now - entry[0] < self.interval_s or window[1] >= self.burst:
                entry[1] += 1
                return
            repeated = int(entry[1])
            entry[:] = [now, 0]
            window[1] += 1
        if repeated:
            fields["repeated"] = repeated
        log_event(event, level, **fields)

    def flush(self) -> None:
        """One line per event with occurrences still held back (e.g. when the server stops)."""
        with self._lock:
            held: dict[str, list[int]] = {}
            for (event, _key), entry in self._keys.items():
                if entry[1]:
                    total = held.setdefault(event, [0, 0])
                    total[0] += int(entry[1])
                    total[1] += 1
                    entry[1] = 0
            for event, n in self._dropped.items():
                held.setdefault(event, [0, 0])[0] += n
            self._dropped.clear()
        for event, (count, keys) in sorted(held.items()):
            log_event("events_not_logged", of=event, count=count, keys=keys)

    def _prune(self, now: float) -> None:
        # Forget keys whose interval has passed; their held counts survive in _dropped.
        for k, entry in list(self._keys.items()):
            if now - entry[0] >= self.interval_s or len(self._keys) >= self.max_keys:
                if entry[1]:
                    self._dropped[k[0]] = self._dropped.get(k[0], 0) + int(entry[1])
                del self._keys[k]


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
        self.padding_waste = Histogram(
            "lyceum_teacher_padding_waste",
            "Fraction of a device batch's positions that are padding (sequence inputs).",
            buckets=(0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75),
            registry=self.registry,
        )
        self.queue_samples = Gauge(
            "lyceum_teacher_queue_samples",
            "Samples waiting for a device.",
            registry=self.registry,
        )
        self.latency = Histogram(
            "lyceum_teacher_request_latency_seconds",
            "From a request's arrival in the queue to its knowledge being computed (observed "
            "before the knowledge is encoded and sent).",
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
