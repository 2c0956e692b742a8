"""Dynamic batching: requests from every student and transport coalesce into device batches.

One queue, bounded in samples, feeds one worker thread per engine (one engine per device).
A worker takes the oldest request, then keeps taking requests until the batch holds
`max_batch` samples or the oldest request has waited `max_delay`; it runs the engine once,
splits the knowledge back per request (views of the engine's output, which the transports
encode on their own threads).
Requests are never split across batches, so one request's rows come from one forward pass.

A transport thread may also run a batch itself (`run_ready`): when the server has one engine,
it is idle and the queued requests need not wait for company (`max_delay` 0, a full batch,
or the oldest request's deadline passed). On a busy server this is most batches: the
requests that queued while the engine ran form the next batch. Why: handing every request
to a worker thread and every reply back cost 4-12 thread switches per message (futex wake,
GIL hand-over, cold cache), measured at 0.4-0.6 ms of CPU per message, several times the
Python work itself (bench/transport.md). An engine is claimed by one thread at a time.
With several engines (devices) the transport threads only queue: a thread busy running one
device's batch would not receive the requests that keep the other devices busy. A transport
may also refuse batches that take long (`run_ready(max_batch_s=...)`, judged by recent
batches): the gRPC event loop does, as it would otherwise stop reading every stream and
answering health checks for each forward pass (ZeroMQ's socket thread keeps running them:
libzmq queues what arrives meanwhile, and handing them to a worker measured 7% slower on
bench/batching.py).

Why a bounded queue in samples (not requests): memory and latency grow with samples; a full
queue refuses new work at once (RESOURCE_EXHAUSTED) so students back off instead of the
server growing without bound.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from lyceum.proto.codec import to_record_batch
from lyceum.proto.errors import INTERNAL, RESOURCE_EXHAUSTED, UNAVAILABLE
from lyceum.proto.schema import KnowledgeSchema
from lyceum.teacher_server._inputs import sample_length
from lyceum.teacher_server.engine import TeacherEngine
from lyceum.teacher_server.errors import ServeError
from lyceum.teacher_server.metrics import ServerMetrics, log_event


@dataclass(frozen=True)
class Knowledge:
    """One request's rows of a device batch (views of the engine's output), not yet encoded.

    The transport that answers encodes it (`record_batch()`, then its wire format) on its own
    thread, so a worker that runs the engine spends its time on forward passes (which release
    the GIL while the transport encodes). Measured on bench/batching.py with gRPC, whose long
    batches run on the workers: 8-15% more samples/s than encoding on the worker.
    """

    schema: KnowledgeSchema
    ids: np.ndarray
    columns: dict[str, torch.Tensor | list[torch.Tensor]]

    def record_batch(self) -> pa.RecordBatch:
        """The Arrow record batch; raises `ServeError` (INTERNAL) if the model's output does
        not fit its schema (a bug in the model or its output spec, not the student's)."""
        try:
            return to_record_batch(self.schema, self.ids, self.columns)
        except Exception as exc:
            log_event("encode_error", samples=len(self.ids), error=repr(exc))
            raise ServeError(INTERNAL, f"encoding knowledge failed: {exc}") from None


Done = Callable[[Knowledge | ServeError], None]
Inputs = torch.Tensor | list[torch.Tensor] | list[dict[str, torch.Tensor]]
"""A request's inputs: a stacked tensor, per-sample sequences, or per-sample named tensors."""


@dataclass
class Job:
    """One request: its sample ids, its inputs (a stacked tensor or per-sample sequences) and
    the callback that receives its `Knowledge` or the error (each transport serialises the
    knowledge its own way, with as few copies as it allows). `done` is called exactly once,
    from the thread that ran the batch (or from `submit`'s caller when it raises)."""

    ids: np.ndarray
    inputs: Inputs
    done: Done
    enqueued: float = field(default_factory=time.monotonic)
    # Longest sequence of the request (0 for fixed-shape inputs): its padded cost in a batch.
    longest: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, torch.Tensor) and self.inputs:
            self.longest = max(sample_length(s) for s in self.inputs)

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
        max_batch_tokens: int | None = None,
    ) -> None:
        if not engines:
            raise ValueError("the batcher needs at least one engine (one per --device)")
        schemas = {e.schema for e in engines}
        if len(schemas) != 1:
            raise ValueError(f"all engines must produce the same knowledge schema, got {schemas}")
        self.engines = tuple(engines)
        self.schema = engines[0].schema
        self.max_batch = max_batch
        # Padded tokens (samples x longest) of one device batch; None: samples only.
        self.max_batch_tokens = max_batch_tokens
        self.max_delay_s = max_delay_s
        self.max_queue_samples = max_queue_samples
        self._metrics = metrics
        self._queue: deque[Job] = deque()
        self._queued = 0
        self._running = 0
        # Engines not running a batch; a worker or a transport thread claims one to run it.
        self._idle: list[TeacherEngine] = list(self.engines)
        # One lock, two conditions: workers wait for work, `drain` for an empty server. Waking
        # a thread that finds nothing to do costs a context switch per batch (measured), so
        # each is woken only when its condition may have become true.
        self._lock = threading.Lock()
        self._has_work = threading.Condition(self._lock)
        self._settled = threading.Condition(self._lock)
        self._accepting = True
        self._stopping = False
        # Seconds per batch, averaged over recent batches; unknown (inf) before the first.
        self._batch_s = float("inf")
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
        with self._lock:
            return self._queued + self._running

    @property
    def recent_batch_s(self) -> float:
        """How long recent batches took to run (a moving average; inf before the first): what
        `run_ready(max_batch_s=...)` judges by."""
        return self._batch_s

    def submit(self, job: Job, *, defer: bool = False) -> None:
        """Queue a request; raises `ServeError` (RESOURCE_EXHAUSTED, UNAVAILABLE) if refused.

        `defer=True` does not wake a worker: the caller promises to call `run_ready` next
        (after queueing whatever else it received), which runs the batch on its own thread or
        wakes a worker.
        """
        if job.size > self.max_batch:
            # Transports check this first; kept here so the batcher's own contract holds.
            raise ServeError(
                RESOURCE_EXHAUSTED,
                f"request of {job.size} samples exceeds the batch limit {self.max_batch}",
            )
        with self._lock:
            if not self._accepting:
                raise ServeError(UNAVAILABLE, "the teacher is shutting down; use another replica")
            # An idle engine takes a batch at once: those samples are not waiting. (A
            # transport thread queues all it received before it runs the first batch; without
            # this it would refuse requests a busy worker-run server accepted.)
            waiting = self._queued - self.max_batch * len(self._idle)
            if waiting + job.size > self.max_queue_samples:
                raise ServeError(
                    RESOURCE_EXHAUSTED,
                    f"the teacher's queue is full ({max(waiting, 0)} of "
                    f"{self.max_queue_samples} samples waiting); retry later or keep fewer "
                    f"requests in flight",
                )
            self._queue.append(job)
            self._queued += job.size
            self._metrics.queue_samples.set(self._queued)
            if not defer:
                self._has_work.notify_all()

    def run_ready(self, *, again: bool = False, max_batch_s: float = math.inf) -> bool:
        """Run one batch of queued requests on the calling thread if the one engine is idle,
        recent batches took at most `max_batch_s` (none timed yet counts as longer, unless it
        is inf) and the batch need not wait for more requests; otherwise leave the queue to
        the workers.
        True if a batch ran here (its replies have been handed to their callbacks).

        `again=True`: the caller calls `run_ready` again as soon as this returns True, so the
        requests still queued are not handed to a worker meanwhile (that hand-off is what
        running here saves).
        """
        with self._lock:
            if not self._queue:
                return False
            # See the module docstring: several devices, or batches too long to run here.
            if len(self.engines) > 1 or self._batch_s > max_batch_s:
                self._has_work.notify_all()
                return False
            ready = (
                self.max_delay_s == 0
                or self._queued >= self.max_batch
                or time.monotonic() >= self._queue[0].enqueued + self.max_delay_s
            )
            if not (ready and self._idle) or self._stopping:
                # A worker waits out the delay; a busy engine's release wakes one.
                if self._idle:
                    self._has_work.notify_all()
                return False
            engine = self._idle.pop()
            batch = self._take()
        self._run_claimed(engine, batch, wake=not again)
        return True

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or running; True if drained within the timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._queued or self._running:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._settled.wait(remaining)
        return True

    def close(self, join_timeout_s: float = 5.0) -> None:
        """Stop the workers; requests still queued are answered UNAVAILABLE. A worker stuck in
        a forward pass (a hung device) is left behind after `join_timeout_s`: the workers are
        daemon threads, so the process can still exit."""
        with self._lock:
            self._accepting = False
            self._stopping = True
            left = list(self._queue)
            self._queue.clear()
            self._queued = 0
            self._has_work.notify_all()
            self._settled.notify_all()
        for job in left:
            _answer(job, ServeError(UNAVAILABLE, "the teacher stopped before running this request"))
        deadline = time.monotonic() + join_timeout_s
        for w in self._workers:
            w.join(max(0.0, deadline - time.monotonic()))
            if w.is_alive():
                log_event("worker_stuck", thread=w.name, join_timeout_s=join_timeout_s)

    def _take(self) -> list[Job]:
        """Pop the oldest requests that fit one batch; they count as running until answered.
        Call with the lock held and the queue non-empty."""
        first = self._queue.popleft()
        batch, n = [first], first.size
        if self.max_batch_tokens is None:
            while self._queue and n + self._queue[0].size <= self.max_batch:
                job = self._queue.popleft()
                batch.append(job)
                n += job.size
        else:
            n = self._take_by_tokens(batch, self.max_batch_tokens)
        self._queued -= n
        self._running += n
        self._metrics.queue_samples.set(self._queued)
        return batch

    def _take_by_tokens(self, batch: list[Job], budget: int) -> int:
        """Add to `batch` (the oldest request) the queued requests that keep it within
        `max_batch` samples and `budget` padded tokens, oldest first; requests that would
        overflow it wait for the next batch (so similar lengths gather). Returns samples."""
        n, longest = batch[0].size, batch[0].longest
        kept: deque[Job] = deque()
        while self._queue:
            job = self._queue.popleft()
            widest = max(longest, job.longest)
            if n + job.size <= self.max_batch and (n + job.size) * widest <= budget:
                batch.append(job)
                n, longest = n + job.size, widest
            else:
                kept.append(job)
        self._queue = kept
        return n

    def _next_batch(self, engine: TeacherEngine) -> list[Job] | None:
        with self._lock:
            while True:
                if self._stopping:
                    return None
                if not (self._queue and engine in self._idle):
                    self._has_work.wait()
                    continue
                # Wait for company up to the oldest request's deadline unless the queue
                # already fills a batch. The engine stays idle meanwhile, so a transport
                # thread may run these requests first: every wake-up looks again.
                remaining = self._queue[0].enqueued + self.max_delay_s - time.monotonic()
                if self._queued >= self.max_batch or remaining <= 0:
                    self._idle.remove(engine)
                    return self._take()
                self._has_work.wait(remaining)

    def _work(self, engine: TeacherEngine) -> None:
        while (batch := self._next_batch(engine)) is not None:
            self._run_claimed(engine, batch)

    def _run_claimed(self, engine: TeacherEngine, batch: list[Job], wake: bool = True) -> None:
        """Run a batch on an engine this thread claimed; then give the engine back. `wake`:
        let a worker take what queued meanwhile (not needed if this thread comes back for it;
        `drain` waiters are woken once nothing is left)."""
        n = sum(j.size for j in batch)
        started = time.monotonic()
        try:
            self._run(engine, batch)
        finally:
            took = time.monotonic() - started
            with self._lock:
                self._batch_s = (
                    took if self._batch_s == float("inf") else (0.8 * self._batch_s + 0.2 * took)
                )
                self._running -= n
                self._idle.append(engine)
                if self._queue and wake:
                    self._has_work.notify_all()
                if not (self._queued or self._running):
                    self._settled.notify_all()

    def _run(self, engine: TeacherEngine, batch: list[Job]) -> None:
        n = sum(j.size for j in batch)
        self._metrics.batch_size.observe(n)
        longest = max(j.longest for j in batch)
        if longest:
            real = sum(sample_length(s) for j in batch for s in j.inputs)
            self._metrics.padding_waste.observe(1 - real / (n * longest))
        try:
            if isinstance(batch[0].inputs, torch.Tensor):
                inputs = torch.cat([j.inputs for j in batch])  # type: ignore[misc]
                columns = engine.infer(inputs)
            else:
                columns = engine.infer(engine.collate_batch([s for j in batch for s in j.inputs]))
        except Exception as exc:  # the model's own failure: answer every request, keep serving
            log_event("inference_error", device=str(engine.device), samples=n, error=repr(exc))
            for job in batch:
                _answer(job, ServeError(INTERNAL, f"inference failed on {engine.device}: {exc}"))
            return
        offset = 0
        for job in batch:
            part = {name: col[offset : offset + job.size] for name, col in columns.items()}
            offset += job.size
            self._metrics.latency.observe(time.monotonic() - job.enqueued)
            _answer(job, Knowledge(self.schema, job.ids, part))


def _answer(job: Job, result: Knowledge | ServeError) -> None:
    """Deliver a result; a transport's failing callback must not kill the engine's worker
    (that device would never serve again) nor keep the batch's other requests unanswered."""
    try:
        job.done(result)
    except Exception as exc:
        log_event("reply_error", samples=job.size, error=repr(exc))
