"""Back-pressure and shutdown, seen by students: a full queue refuses with RESOURCE_EXHAUSTED
and the student asks again until it is served; SIGTERM finishes the requests in flight,
refuses new ones (UNAVAILABLE) and exits 0."""

from __future__ import annotations

import logging
import queue
import time

import grpc
import numpy as np
import pytest
import torch

from lyceum.proto import wire
from lyceum.proto.codec import KnowledgeBatch
from lyceum.student_client import OnlineTeacher, TeacherTimeouts
from tests._support.servers import ServerProcess
from tests._support.teachers import DIGITS, MODEL
from tests._support.waiting import wait_until

pytestmark = pytest.mark.integration

CLIENT_LOG = "lyceum.student_client.online"  # replicas set aside and back


def _collect(teacher: OnlineTeacher, count: int) -> dict[int, KnowledgeBatch]:
    """Poll until `count` requests are answered (a hang guard fails the test instead)."""
    results: dict[int, KnowledgeBatch] = {}
    deadline = time.monotonic() + 60
    while len(results) < count:
        assert time.monotonic() < deadline, f"{len(results)} of {count} answered in 60 s"
        results.update(teacher.poll(1.0))
    return results


def _requests(teacher: OnlineTeacher, count: int) -> dict[int, list[int]]:
    """Submit `count` index requests of 8 ids each; request id -> its ids."""
    sent = {k: list(range(8 * k, 8 * k + 8)) for k in range(count)}
    for rid, ids in sent.items():
        teacher.submit(rid, torch.tensor(ids))
    return sent


@pytest.mark.parametrize("scheme", ["grpc", "zmq"])
def test_full_queue_refuses_with_resource_exhausted_and_students_ask_again(tmp_path, scheme):
    # 0.1 s per device batch of up to 8 samples, at most 16 samples waiting.
    proc = ServerProcess(
        ["--model", "tests._support.models:slow_cnn", "--model-kwargs", '{"delay_s": 0.1}', "--dataset", DIGITS,
         f"--{scheme}-port", "0", "--max-batch", "8", "--max-queue-samples", "16"],
        tmp_path,
    )  # fmt: skip
    try:
        timeouts = TeacherTimeouts(timeout_s=30)
        with OnlineTeacher(proc.endpoint(scheme), mode="index", timeouts=timeouts) as teacher:
            sent = _requests(teacher, 10)  # all ten at once: one batch runs, two wait
            results = _collect(teacher, len(sent))
            # The other seven arrived while the queue was full: refused, asked again, served.
            assert teacher.busy_refusals >= 5 and teacher.failovers == 0
            for rid, ids in sent.items():
                assert results[rid].sample_ids.tolist() == ids
            assert teacher.request([100, 101]).sample_ids.tolist() == [100, 101]
        assert '"code": "RESOURCE_EXHAUSTED"' in proc.log() and "queue is full" in proc.log()
    finally:
        assert proc.terminate() == 0, proc.log()


def _wait_for_log(proc: ServerProcess, line: str) -> None:
    def exited() -> str | None:
        code = proc.proc.poll()
        return None if code is None else f"the server exited with {code}:\n{proc.log()}"

    wait_until(lambda: line in proc.log(), f"{line!r} in the server's log", gave_up=exited)


@pytest.mark.parametrize("scheme", ["grpc", "zmq"])
def test_sigterm_drains_requests_in_flight_and_exits_zero(tmp_path, scheme, caplog):
    caplog.set_level(logging.WARNING, logger=CLIENT_LOG)
    proc = ServerProcess(
        ["--model", "tests._support.models:slow_cnn", "--model-kwargs", '{"delay_s": 0.2}', "--dataset", DIGITS,
         f"--{scheme}-port", "0", "--max-batch", "8", "--grace-s", "20", "--metrics-port", "0"],
        tmp_path,
    )  # fmt: skip
    endpoint = proc.endpoint(scheme)
    refused = f"replica {endpoint} set aside (UNAVAILABLE: the teacher is shutting down"
    try:
        with (
            OnlineTeacher(endpoint, mode="index", timeouts=TeacherTimeouts(timeout_s=30)) as t,
            OnlineTeacher(endpoint, mode="index") as late,
        ):
            late.describe()  # connected before the drain: only its request comes late
            sent = _requests(t, 6)
            # 6 batches x 0.2 s: all six received (the server's counter; a first reply alone
            # does not prove it under load), then the drain begins with five still to run.
            received = f'lyceum_teacher_requests_total{{mode="index",transport="{scheme}"}}'
            wait_until(lambda: proc.metrics().get(received, 0) >= 6, "six requests received")
            results = _collect(t, 1)
            proc.proc.send_signal(15)
            _wait_for_log(proc, '"event": "draining"')
            late.submit(1, torch.tensor([500]))
            deadline = time.monotonic() + 30  # a hang guard
            while not any(refused in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
                assert late.poll(0.05) == []  # refused: asked again later, never answered
            assert late.outstanding().keys() == {1}
            results.update(_collect(t, 6 - len(results)))
            assert proc.proc.wait(30) == 0, proc.log()
        for rid, ids in sent.items():
            assert results[rid].sample_ids.tolist() == ids
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
    roomy = ServerProcess(["--model", MODEL, "--dataset", DIGITS, "--grpc-port", "0"], tmp_path)
    tight = ServerProcess(
        ["--model", MODEL, "--dataset", DIGITS, "--grpc-port", "0", "--grpc-max-calls", "3"],
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

            def served_again() -> bool:
                again = _OpenStream(distill, 4)
                try:
                    assert again.reply().knowledge is not None
                    return True
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    return False
                finally:
                    again.close()

            # The server learns of the cancelled stream asynchronously: ask until it has.
            wait_until(served_again, "the closed stream's call slot to come back")
            for s in streams[1:]:
                s.close()
    finally:
        assert roomy.terminate() == 0, roomy.log()
        assert tight.terminate() == 0, tight.log()
