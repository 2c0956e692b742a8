"""Dynamic batching: requests from every student and transport coalesce into device batches.

One queue, bounded in samples, feeds one worker thread per engine (one engine per device).
A worker takes the oldest request, then keeps taking requests until the batch holds
`max_batch` samples or the oldest request has waited `max_delay`; it runs the engine once,
splits the knowledge back per request as Arrow record batches (views of the engine's output). Requests are never
split across batches, so one request's rows come from one forward pass.

Why a bounded queue in samples (not requests): memory and latency grow with samples; a full
queue refuses new work at once (RESOURCE_EXHAUSTED) so students back off instead of the
server growing without bound.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from lyceum.proto.codec import to_record_batch
from lyceum.teacher_server.engine import TeacherEngine
from lyceum.teacher_server.errors import INTERNAL, RESOURCE_EXHAUSTED, UNAVAILABLE, ServeError
from lyceum.teacher_server.metrics import ServerMetrics, log_event

Done = Callable[[pa.RecordBatch | ServeError], None]


@dataclass
class Job:
    """One request: its sample ids, its inputs (a stacked tensor or per-sample sequences) and
    the callback that receives the knowledge record batch or the error (each transport
    serialises the batch its own way, with as few copies as it allows). `done` is called exactly
    once, from a worker thread (or from `submit`'s caller when it raises)."""

    ids: np.ndarray
    inputs: torch.Tensor | list[torch.Tensor]
    done: Done
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def size(self) -> int:
        return len(self.ids)


class DynamicBatcher:
    """A sample-bounded request queue and one inference worker per engine."""

    def __init__(
        self,
        engines: Sequence[TeacherEngine],
        max_batch: int,
        max_delay_s: float,
        max_queue_samples: int,
        metrics: ServerMetrics,
    ) -> None:
        if not engines:
            raise ValueError("the batcher needs at least one engine (one per --device)")
        schemas = {e.schema for e in engines}
        if len(schemas) != 1:
            raise ValueError(f"all engines must produce the same knowledge schema, got {schemas}")
        self.engines = tuple(engines)
        self.schema = engines[0].schema
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue_samples = max_queue_samples
        self._metrics = metrics
        self._queue: deque[Job] = deque()
        self._queued = 0
        self._running = 0
        self._cond = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._workers = [
            threading.Thread(target=self._work, args=(e,), name=f"lyceum-engine-{i}", daemon=True)
            for i, e in enumerate(self.engines)
        ]

    def start(self) -> None:
        for w in self._workers:
            w.start()

    @property
    def in_flight(self) -> int:
        """Samples queued or running."""
        with self._cond:
            return self._queued + self._running

    def submit(self, job: Job) -> None:
        """Queue a request; raises `ServeError` (RESOURCE_EXHAUSTED, UNAVAILABLE) if refused."""
        if job.size > self.max_batch:
            # Transports check this first; kept here so the batcher's own contract holds.
            raise ServeError(
                RESOURCE_EXHAUSTED,
                f"request of {job.size} samples exceeds the batch limit {self.max_batch}",
            )
        with self._cond:
            if not self._accepting:
                raise ServeError(UNAVAILABLE, "the teacher is shutting down; use another replica")
            if self._queued + job.size > self.max_queue_samples:
                raise ServeError(
                    RESOURCE_EXHAUSTED,
                    f"the teacher's queue is full ({self._queued} of {self.max_queue_samples} "
                    f"samples waiting); retry later or keep fewer requests in flight",
                )
            self._queue.append(job)
            self._queued += job.size
            self._metrics.queue_samples.set(self._queued)
            self._cond.notify()

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or running; True if drained within the timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queued or self._running:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, join_timeout_s: float = 5.0) -> None:
        """Stop the workers; requests still queued are answered UNAVAILABLE. A worker stuck in
        a forward pass (a hung device) is left behind after `join_timeout_s`: the workers are
        daemon threads, so the process can still exit."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            left = list(self._queue)
            self._queue.clear()
            self._queued = 0
            self._cond.notify_all()
        for job in left:
            _answer(job, ServeError(UNAVAILABLE, "the teacher stopped before running this request"))
        deadline = time.monotonic() + join_timeout_s
        for w in self._workers:
            w.join(max(0.0, deadline - time.monotonic()))
            if w.is_alive():
                log_event("worker_stuck", thread=w.name, join_timeout_s=join_timeout_s)

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch, n = [first], first.size
            deadline = first.enqueued + self.max_delay_s
            while n < self.max_batch and not self._stopping:
                if self._queue:
                    if n + self._queue[0].size > self.max_batch:
                        break
                    job = self._queue.popleft()
                    batch.append(job)
                    n += job.size
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            # Requests taken by this worker are counted as running until answered.
            self._queued -= sum(j.size for j in batch)
            self._running += n
            self._metrics.queue_samples.set(self._queued)
            return batch

    def _work(self, engine: TeacherEngine) -> None:
        while (batch := self._next_batch()) is not None:
            n = sum(j.size for j in batch)
            try:
                self._run(engine, batch)
            finally:
                with self._cond:
                    self._running -= n
                    self._cond.notify_all()

    def _run(self, engine: TeacherEngine, batch: list[Job]) -> None:
        n = sum(j.size for j in batch)
        self._metrics.batch_size.observe(n)
        try:
            if isinstance(batch[0].inputs, torch.Tensor):
                inputs = torch.cat([j.inputs for j in batch])  # type: ignore[misc]
                columns = engine.infer(inputs)
            else:
                padded, lengths = engine.collate([s for j in batch for s in j.inputs])
                columns = engine.infer(padded, lengths)
        except Exception as exc:  # the model's own failure: answer every request, keep serving
            log_event("inference_error", device=str(engine.device), samples=n, error=repr(exc))
            for job in batch:
                _answer(job, ServeError(INTERNAL, f"inference failed on {engine.device}: {exc}"))
            return
        offset = 0
        for job in batch:
            part = {name: col[offset : offset + job.size] for name, col in columns.items()}
            offset += job.size
            try:
                result: pa.RecordBatch | ServeError = to_record_batch(self.schema, job.ids, part)
            except Exception as exc:  # e.g. an output its schema does not allow: answer, go on
                log_event("encode_error", samples=job.size, error=repr(exc))
                result = ServeError(INTERNAL, f"encoding knowledge failed: {exc}")
            self._metrics.latency.observe(time.monotonic() - job.enqueued)
            _answer(job, result)


def _answer(job: Job, result: pa.RecordBatch | ServeError) -> None:
    """Deliver a result; a transport's failing callback must not kill the engine's worker
    (that device would never serve again) nor keep the batch's other requests unanswered."""
    try:
        job.done(result)
    except Exception as exc:
        log_event("reply_error", samples=job.size, error=repr(exc))
