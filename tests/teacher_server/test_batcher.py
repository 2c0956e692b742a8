"""The dynamic batcher in-process: coalescing, limits, splitting results back, refusals."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import pyarrow as pa
import pytest
import torch
from torch import nn

from lyceum.proto.codec import from_record_batch
from lyceum.proto.errors import RESOURCE_EXHAUSTED, UNAVAILABLE
from lyceum.teacher_server._inputs import InputBatch
from lyceum.teacher_server.batcher import DynamicBatcher, Job, Knowledge
from lyceum.teacher_server.engine import EngineConfig, TeacherEngine
from lyceum.teacher_server.errors import ServeError
from lyceum.teacher_server.metrics import ServerMetrics
from tests._support.waiting import wait_until


class Recording(TeacherEngine):
    """An engine that records the size of every device batch (and can be slowed down)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        torch.manual_seed(0)
        super().__init__(nn.Linear(4, 3), EngineConfig(), torch.zeros(4))
        self.sizes: list[int] = []
        self.delay_s = delay_s

    def infer(
        self, batch: torch.Tensor | InputBatch, lengths: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        self.sizes.append(batch.samples if isinstance(batch, InputBatch) else len(batch))
        time.sleep(self.delay_s)  # slowness on purpose (a device batch's cost), not a wait
        return super().infer(batch, lengths)


def _knowledge(result: object) -> pa.RecordBatch:
    """A job's answer, which must be knowledge (not a ServeError)."""
    assert isinstance(result, Knowledge), result
    return result.record_batch()


class Results:
    def __init__(self) -> None:
        self.items: dict[int, object] = {}
        self.event = threading.Event()

    def callback(self, key: int, expected: int) -> Callable[[object], None]:
        def done(result: object) -> None:
            self.items[key] = result
            if len(self.items) == expected:
                self.event.set()

        return done


def _job(ids: list[int], done: Callable[[object], None]) -> Job:
    import numpy as np

    x = torch.arange(len(ids) * 4, dtype=torch.float32).reshape(len(ids), 4) + ids[0]
    return Job(ids=np.asarray(ids, dtype=np.uint64), inputs=x, done=done)


def _batcher(
    engines: Sequence[TeacherEngine], max_batch: int = 8, delay_s: float = 0.05, queue: int = 64
) -> DynamicBatcher:
    b = DynamicBatcher(engines, max_batch, delay_s, queue, ServerMetrics())
    b.start()
    return b


def test_requests_coalesce_up_to_max_batch_and_split_back():
    engine = Recording()
    batcher = _batcher([engine], max_batch=8, delay_s=0.2)
    results = Results()
    jobs = [_job([3 * k, 3 * k + 1, 3 * k + 2], results.callback(k, 5)) for k in range(5)]
    for job in jobs:
        batcher.submit(job)
    assert results.event.wait(10)
    batcher.close()
    # 3+3 fit in 8, a third request of 3 would not: batches of 6, 6 and 3 samples.
    assert engine.sizes == [6, 6, 3]
    for k, job in enumerate(jobs):
        got = from_record_batch(_knowledge(results.items[k]))
        assert got.sample_ids.tolist() == [3 * k, 3 * k + 1, 3 * k + 2]
        with torch.inference_mode():
            want = engine.model(job.inputs)
        assert torch.equal(got.tensors["logits"], want)


def test_a_request_waits_for_company_but_not_forever():
    engine = Recording()
    batcher = _batcher([engine], delay_s=0.5)
    results = Results()
    batcher.submit(_job([1], results.callback(0, 2)))
    assert engine.sizes == []  # within its delay, the first request waits for company
    batcher.submit(_job([2], results.callback(1, 2)))
    assert results.event.wait(5)
    lone = Results()
    batcher.submit(_job([3], lone.callback(0, 1)))
    assert lone.event.wait(5)  # nobody joins it: it runs alone once its delay is over
    batcher.close()
    assert engine.sizes == [2, 1]


def test_full_queue_refuses_and_shutdown_refuses():
    engine = Recording(delay_s=0.3)
    batcher = _batcher([engine], max_batch=4, delay_s=0.0, queue=8)
    results = Results()
    batcher.submit(_job([0, 1, 2, 3], results.callback(0, 3)))
    wait_until(lambda: engine.sizes, "the first batch to run")  # the queue is empty again
    batcher.submit(_job([4, 5, 6, 7], results.callback(1, 3)))
    batcher.submit(_job([8, 9, 10, 11], results.callback(2, 3)))
    with pytest.raises(ServeError) as err:
        batcher.submit(_job([12], results.callback(3, 3)))
    assert err.value.code == RESOURCE_EXHAUSTED and "8 of 8 samples" in err.value.message
    assert batcher.in_flight == 12
    batcher.stop_accepting()
    with pytest.raises(ServeError) as err:
        batcher.submit(_job([13], results.callback(4, 3)))
    assert err.value.code == UNAVAILABLE
    assert batcher.drain(5)
    batcher.close()
    assert sorted(results.items) == [0, 1, 2] and batcher.in_flight == 0


class Meeting(Recording):
    """Each forward waits at a barrier: two engines get past it only if they run at once."""

    def __init__(self, barrier: threading.Barrier) -> None:
        super().__init__()
        self.barrier = barrier

    def infer(
        self, batch: torch.Tensor | InputBatch, lengths: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        self.barrier.wait()  # BrokenBarrierError (an INTERNAL answer) if run one at a time
        return super().infer(batch, lengths)


def test_one_worker_per_engine_runs_batches_in_parallel():
    barrier = threading.Barrier(2, timeout=10)
    engines = [Meeting(barrier), Meeting(barrier)]
    batcher = _batcher(engines, max_batch=2, delay_s=0.0)
    results = Results()
    for k in range(4):
        batcher.submit(_job([2 * k, 2 * k + 1], results.callback(k, 4)))
    assert results.event.wait(30)
    batcher.close()
    assert [len(e.sizes) for e in engines] == [2, 2]
    assert not any(isinstance(r, ServeError) for r in results.items.values())


def test_close_answers_queued_requests_unavailable():
    engine = Recording(delay_s=0.3)
    batcher = _batcher([engine], max_batch=1, delay_s=0.0)
    results = Results()
    for k in range(3):
        batcher.submit(_job([k], results.callback(k, 3)))
    wait_until(lambda: engine.sizes, "the first request to run")  # the other two queue
    batcher.close()
    assert results.event.wait(5)
    codes = [
        r.code if isinstance(r, ServeError) else "ok" for _, r in sorted(results.items.items())
    ]
    assert codes == ["ok", UNAVAILABLE, UNAVAILABLE]


class Threaded(Recording):
    """Records which thread ran each device batch."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__(delay_s)
        self.threads: list[int] = []

    def infer(
        self, batch: torch.Tensor | InputBatch, lengths: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        self.threads.append(threading.get_ident())
        return super().infer(batch, lengths)


def test_run_ready_runs_deferred_requests_on_the_calling_thread():
    engine = Threaded()
    batcher = _batcher([engine], max_batch=8, delay_s=0.0)
    results = Results()
    assert not batcher.run_ready()  # nothing queued
    jobs = [_job([3 * k, 3 * k + 1, 3 * k + 2], results.callback(k, 4)) for k in range(4)]
    for job in jobs:
        batcher.submit(job, defer=True)
    # Deferred: no worker was woken, so the caller forms the batches (6, then 6) itself.
    assert batcher.run_ready(again=True) and batcher.run_ready(again=True)
    assert not batcher.run_ready(again=True)
    assert results.event.is_set() and batcher.drain(1)
    batcher.close()
    assert engine.sizes == [6, 6]
    assert engine.threads == [threading.get_ident()] * 2
    for k in range(4):
        got = from_record_batch(_knowledge(results.items[k]))
        assert got.sample_ids.tolist() == [3 * k, 3 * k + 1, 3 * k + 2]


def test_run_ready_leaves_a_batch_that_may_wait_to_a_worker():
    engine = Threaded()
    batcher = _batcher([engine], max_batch=4, delay_s=0.5)
    results = Results()
    batcher.submit(_job([0, 1], results.callback(0, 3)), defer=True)
    # Half a batch, within its delay: a worker waits for company, the caller goes on.
    assert not batcher.run_ready()
    # A full batch need not wait: the caller runs it.
    batcher.submit(_job([2, 3], results.callback(1, 3)), defer=True)
    assert batcher.run_ready()
    assert engine.sizes == [4] and engine.threads == [threading.get_ident()]
    batcher.submit(_job([4], results.callback(2, 3)), defer=True)
    assert not batcher.run_ready()
    assert results.event.wait(5)
    batcher.close()
    assert engine.sizes == [4, 1] and engine.threads[1] != threading.get_ident()


def test_run_ready_does_not_take_an_engine_a_worker_holds():
    engine = Threaded(delay_s=0.3)
    batcher = _batcher([engine], max_batch=2, delay_s=0.0)
    results = Results()
    batcher.submit(_job([0, 1], results.callback(0, 2)))  # a worker takes the engine
    wait_until(lambda: engine.sizes, "a worker to run the first batch")
    batcher.submit(_job([2, 3], results.callback(1, 2)), defer=True)
    assert not batcher.run_ready()  # busy: the worker runs it once the engine is free
    assert results.event.wait(5)
    batcher.close()
    assert engine.sizes == [2, 2] and threading.get_ident() not in engine.threads


def test_with_several_engines_run_ready_leaves_batches_to_the_workers():
    engines = [Threaded(), Threaded()]
    batcher = _batcher(engines, max_batch=2, delay_s=0.0)
    results = Results()
    for k in range(4):
        batcher.submit(_job([2 * k, 2 * k + 1], results.callback(k, 4)), defer=True)
    assert not batcher.run_ready(again=True)  # the caller keeps receiving; workers run these
    assert results.event.wait(5)
    batcher.close()
    assert sum(len(e.sizes) for e in engines) == 4
    assert threading.get_ident() not in engines[0].threads + engines[1].threads


def test_recent_batch_time_is_unknown_then_follows_the_batches():
    engine = Threaded(delay_s=0.05)
    batcher = _batcher([engine], max_batch=2, delay_s=0.0)
    assert batcher.recent_batch_s == float("inf")  # unknown before any batch ran
    results = Results()
    batcher.submit(_job([0, 1], results.callback(0, 2)), defer=True)
    assert batcher.run_ready()
    slow = batcher.recent_batch_s
    assert 0.05 <= slow < float("inf")
    engine.delay_s = 0.0
    batcher.submit(_job([2, 3], results.callback(1, 2)), defer=True)
    assert batcher.run_ready()
    # A moving average: a fast batch pulls it down without forgetting the slow one at once.
    assert 0 < batcher.recent_batch_s < slow
    batcher.close()


def test_a_caller_can_leave_long_batches_to_the_workers():
    engine = Threaded(delay_s=0.05)
    batcher = _batcher([engine], max_batch=2, delay_s=0.0)
    results = Results()
    # Not timed yet: a caller that cannot afford long batches leaves it to a worker.
    batcher.submit(_job([0, 1], results.callback(0, 4)), defer=True)
    assert not batcher.run_ready(max_batch_s=0.002)
    assert batcher.drain(30)  # a worker ran it and gave the engine back
    # Timed at 50 ms: still the workers' (the caller would stop receiving for that long)...
    batcher.submit(_job([2, 3], results.callback(1, 4)), defer=True)
    assert not batcher.run_ready(max_batch_s=0.002)
    assert batcher.drain(30) and len(results.items) == 2
    # ...unless the caller allows that long, or any length (the default).
    batcher.submit(_job([4, 5], results.callback(2, 4)), defer=True)
    assert batcher.run_ready(max_batch_s=1.0)
    batcher.submit(_job([6, 7], results.callback(3, 4)), defer=True)
    assert batcher.run_ready()
    assert results.event.wait(5)
    batcher.close()
    me = threading.get_ident()
    assert [t == me for t in engine.threads] == [False, False, True, True]
