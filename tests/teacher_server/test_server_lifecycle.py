"""Back-pressure and shutdown: a full queue refuses with RESOURCE_EXHAUSTED and recovers;
SIGTERM finishes the requests in flight, refuses new ones and exits 0."""

from __future__ import annotations

import queue
import time

import grpc
import numpy as np
import pytest
from servers import DATASET, MODEL, ServerProcess

from lyceum.proto import wire
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


class _OpenStream:
    """A Distill stream kept open: one index request now, more only when asked."""

    def __init__(self, distill: grpc.StreamStreamMultiCallable, first_id: int) -> None:
        self._outgoing: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._outgoing.put(wire.encode_request(1, ids=np.array([first_id], dtype=np.uint64)))
        self._call = distill(iter(self._outgoing.get, None), timeout=60)

    def reply(self) -> wire.Reply:
        return wire.decode_reply(next(self._call))

    def close(self) -> None:
        self._outgoing.put(None)
        self._call.cancel()


def test_open_streams_cost_no_threads_and_the_call_limit_refuses(tmp_path):
    # The grpcio thread-pool server held a pool thread per open stream (32 by default): the
    # 33rd student was refused. 48 streams are open at once here, then a server limited to
    # 3 calls refuses a 4th with RESOURCE_EXHAUSTED and takes one again once a stream ends.
    roomy = ServerProcess(["--model", MODEL, "--dataset", DATASET, "--grpc-port", "0"], tmp_path)
    tight = ServerProcess(
        ["--model", MODEL, "--dataset", DATASET, "--grpc-port", "0", "--grpc-max-calls", "3"],
        tmp_path,
    )
    try:
        with grpc.insecure_channel(roomy.endpoint("grpc").removeprefix("grpc://")) as channel:
            distill = channel.stream_stream("/lyceum.v1.Teacher/Distill")
            streams = [_OpenStream(distill, k) for k in range(48)]
            try:
                replies = [s.reply() for s in streams]  # every stream is still open here
            finally:
                for s in streams:
                    s.close()
            assert all(r.knowledge is not None for r in replies), [r for r in replies][:3]
        with grpc.insecure_channel(tight.endpoint("grpc").removeprefix("grpc://")) as channel:
            distill = channel.stream_stream("/lyceum.v1.Teacher/Distill")
            streams = [_OpenStream(distill, k) for k in range(3)]
            assert all(s.reply().knowledge is not None for s in streams)
            extra = _OpenStream(distill, 3)
            with pytest.raises(grpc.RpcError) as refused:
                extra.reply()
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            streams[0].close()
            deadline = time.monotonic() + 30
            while True:  # the server learns of the cancelled stream asynchronously
                again = _OpenStream(distill, 4)
                try:
                    assert again.reply().knowledge is not None
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert time.monotonic() < deadline, (
                        "a closed stream's call slot never came back"
                    )
                    time.sleep(0.1)
                finally:
                    again.close()
            for s in streams[1:]:
                s.close()
    finally:
        assert roomy.terminate() == 0, roomy.log()
        assert tight.terminate() == 0, tight.log()
