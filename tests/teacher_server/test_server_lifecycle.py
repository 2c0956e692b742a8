"""Back-pressure and shutdown: a full queue refuses with RESOURCE_EXHAUSTED and recovers;
SIGTERM finishes the requests in flight, refuses new ones and exits 0."""

from __future__ import annotations

import time

import pytest
from servers import DATASET, ServerProcess

from lyceum.student_client.online import EndpointClient, TeacherError

pytestmark = pytest.mark.integration

RESOURCE_EXHAUSTED, UNAVAILABLE = 8, 14


def _collect(teacher: EndpointClient, count: int, timeout_s: float = 60) -> dict[int, object]:
    results: dict[int, object] = {}
    deadline = time.monotonic() + timeout_s
    while len(results) < count and time.monotonic() < deadline:
        results.update(teacher.poll(1.0))
    return results


@pytest.mark.parametrize("scheme", ["grpc", "zmq"])
def test_full_queue_gives_resource_exhausted_then_recovers(tmp_path, scheme):
    # 0.1 s per device batch of up to 8 samples, at most 16 samples waiting.
    proc = ServerProcess(
        ["--model", "servers:slow_cnn", "--model-kwargs", '{"delay_s": 0.1}', "--dataset", DATASET,
         f"--{scheme}-port", "0", "--max-batch", "8", "--max-queue-samples", "16"],
        tmp_path,
    )  # fmt: skip
    try:
        with EndpointClient(proc.endpoint(scheme), timeout_s=30) as teacher:
            sent = {teacher.submit(list(range(8 * k, 8 * k + 8))): k for k in range(10)}
            results = _collect(teacher, len(sent))
            assert len(results) == 10
            refused = [r for r in results.values() if isinstance(r, TeacherError)]
            served = [r for r in results.values() if not isinstance(r, TeacherError)]
            # One batch runs, two wait; the other seven arrive while the queue is full.
            assert len(refused) >= 5 and len(served) >= 2
            assert all(
                e.code == RESOURCE_EXHAUSTED and "queue is full" in e.message for e in refused
            )
            # Once the queue has drained, the teacher serves again.
            assert teacher.request([100, 101]).sample_ids.tolist() == [100, 101]
    finally:
        assert proc.terminate() == 0, proc.log()


@pytest.mark.parametrize("scheme", ["grpc", "zmq"])
def test_sigterm_drains_requests_in_flight_and_exits_zero(tmp_path, scheme):
    proc = ServerProcess(
        ["--model", "servers:slow_cnn", "--model-kwargs", '{"delay_s": 0.2}', "--dataset", DATASET,
         f"--{scheme}-port", "0", "--max-batch", "8", "--grace-s", "20"],
        tmp_path,
    )  # fmt: skip
    try:
        with EndpointClient(proc.endpoint(scheme), timeout_s=30) as teacher:
            teacher.describe()
            ids = {teacher.submit(list(range(8 * k, 8 * k + 8))): k for k in range(6)}
            # 6 batches x 0.2 s: the first reply means all six are queued, five still to run.
            first = _collect(teacher, 1)
            started = time.monotonic()
            proc.proc.send_signal(15)
            time.sleep(0.3)
            late = teacher.submit([500])
            results = {**first, **_collect(teacher, 7 - len(first))}
            assert proc.proc.wait(30) == 0, proc.log()
            assert time.monotonic() - started < 20
        for rid, k in ids.items():
            result = results[rid]
            assert not isinstance(result, TeacherError), result
            assert result.sample_ids.tolist() == list(range(8 * k, 8 * k + 8))
        assert isinstance(results[late], TeacherError) and results[late].code == UNAVAILABLE
        assert '"event": "draining"' in proc.log() and '"drained": true' in proc.log()
    finally:
        proc.kill()
