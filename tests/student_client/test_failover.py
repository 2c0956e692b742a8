"""Failover with real teacher processes: kill -9 a replica mid-epoch, restart one, lose one."""

from __future__ import annotations

import logging
import threading
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import torch

from lyceum.deploy.examples import digits
from lyceum.deploy.launcher import TeacherProcess, start_teacher
from lyceum.student_client.loader import DistillLoader
from lyceum.student_client.online import TeacherTimeouts
from lyceum.student_client.sources import OnlineTeacher, TeacherUnavailableError
from tests._support.teachers import DIGITS, ENV, SLOW, reference_logits, save_checkpoint

pytestmark = pytest.mark.integration

# Enough to finish a test, short enough that a leaked server stops by itself soon.
EXIT_AFTER_S = 120.0
CLIENT_LOG = "lyceum.student_client.online"  # replicas set aside and back


def _epoch(loader: DistillLoader, after_batch: int = -1, action=None) -> dict[int, torch.Tensor]:
    """Run one epoch; returns sample id -> logits, failing on any id delivered twice."""
    seen: dict[int, torch.Tensor] = {}
    for k, (_x, _y, knowledge) in enumerate(loader):
        for i, row in zip(knowledge["sample_id"].tolist(), knowledge["logits"], strict=True):
            assert i not in seen, f"sample {i} delivered twice"
            seen[i] = row.clone()
        if k == after_batch and action is not None:
            action()
    return seen


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "teacher.safetensors", seed=3)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> torch.Tensor:
    return reference_logits(checkpoint, digits("train"))


def _serve(checkpoint: Path, **kwargs: Any) -> AbstractContextManager[TeacherProcess]:
    return start_teacher(
        SLOW, dataset=DIGITS, checkpoint=checkpoint, env=ENV, exit_after_s=EXIT_AFTER_S, **kwargs
    )


@pytest.mark.parametrize("victim", ["grpc", "zmq"])
def test_kill_one_of_two_replicas_mid_epoch(
    checkpoint: Path, reference: torch.Tensor, victim: str
) -> None:
    """A killed gRPC replica breaks its stream (seen at once); a killed ZeroMQ replica just
    goes silent (seen after request_timeout_s). Either way its requests move to the other."""
    data = digits("train")
    with _serve(checkpoint) as a, _serve(checkpoint, grpc=False, zmq=True) as b:
        endpoints = [a.endpoint("grpc"), b.endpoint("zmq")]
        source = OnlineTeacher(
            endpoints,
            mode="index",
            timeouts=TeacherTimeouts(timeout_s=20, request_timeout_s=1),
        )
        loader = DistillLoader(data, {"t": source}, 32, shuffle=True, seed=1, window=6)
        # Fault-free epoch first, then the same epoch again with one replica killed at batch 3.
        clean = _epoch(loader)
        loader.set_epoch(0)
        killed = a if victim == "grpc" else b
        faulty = _epoch(loader, after_batch=3, action=killed.kill)
        assert killed.proc.returncode is not None  # really dead (SIGKILL)
        source.close()
    assert sorted(faulty) == list(range(len(data)))
    assert source.failovers > 0, "nothing was re-asked: the kill came too late to test failover"
    for i in range(len(data)):
        torch.testing.assert_close(faulty[i], clean[i])
        torch.testing.assert_close(faulty[i], reference[i])


def test_single_replica_restarted_within_timeout(
    checkpoint: Path, reference: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    """The loader carries on where it was; the student's log says once that the replica was
    set aside (a warning with its endpoint) and once that it is back, not once per retry.
    The replica comes back (same port) only once the student has noticed it is gone."""
    data = digits("train")
    noticed, finished = threading.Event(), threading.Event()

    class Notice(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno == logging.WARNING:
                noticed.set()

    def restart(port: int) -> None:
        if noticed.wait(60):  # else the student's timeout fails the test
            with _serve(checkpoint, grpc_port=port):
                finished.wait(120)

    notice = Notice()
    logging.getLogger(CLIENT_LOG).addHandler(notice)
    thread: threading.Thread | None = None
    try:
        with caplog.at_level(logging.INFO, logger=CLIENT_LOG):
            with _serve(checkpoint) as first:
                endpoint = first.endpoint("grpc")
                source = OnlineTeacher(
                    endpoint, mode="index", timeouts=TeacherTimeouts(timeout_s=60), name="cnn"
                )
                loader = DistillLoader(data, {"t": source}, 32, shuffle=True, window=4)
                it = iter(loader)
                seen: dict[int, torch.Tensor] = {}
                for _ in range(3):
                    _x, _y, k = next(it)
                    seen.update(zip(k["sample_id"].tolist(), k["logits"], strict=True))
                first.kill()
                thread = threading.Thread(target=restart, args=(first.port("grpc"),))
                thread.start()
            for _x, _y, k in it:
                for i, row in zip(k["sample_id"].tolist(), k["logits"], strict=True):
                    assert i not in seen
                    seen[i] = row
            source.close()
    finally:
        finished.set()
        if thread is not None:
            thread.join(60)
        logging.getLogger(CLIENT_LOG).removeHandler(notice)
    assert sorted(seen) == list(range(len(data)))
    for i, row in seen.items():
        torch.testing.assert_close(row, reference[i])
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == CLIENT_LOG]
    warnings = [m for level, m in lines if level == logging.WARNING]
    assert len(warnings) == 1, lines
    assert warnings[0].startswith(f"teacher 'cnn': replica {endpoint} set aside (UNAVAILABLE")
    back = [m for level, m in lines if level == logging.INFO]
    assert len(back) == 1 and f"replica {endpoint} answers again, after " in back[0], lines


def test_single_replica_lost_raises_naming_endpoint(checkpoint: Path) -> None:
    data = digits("train")
    with _serve(checkpoint) as only:
        endpoint = only.endpoint("grpc")
        source = OnlineTeacher(endpoint, mode="index", timeouts=TeacherTimeouts(timeout_s=3))
        loader = DistillLoader(data, {"cnn": source}, 32, window=2)
        it = iter(loader)
        next(it)
        only.kill()
        # No replica is left to ask: the error names the teacher, the endpoint and the
        # timeout it gave up after (pytest's timeout guards against a hang).
        with pytest.raises(TeacherUnavailableError) as err:
            for _ in it:
                pass
        source.close()
    message = str(err.value)
    assert "'cnn'" in message and endpoint in message and "within 3s" in message


@pytest.mark.parametrize("scheme", ["grpc", "zmq"])
def test_a_busy_teacher_is_asked_again_not_abandoned(
    checkpoint: Path, reference: torch.Tensor, scheme: str
) -> None:
    """A window larger than the teacher's queue: refused chunks (RESOURCE_EXHAUSTED) are asked
    again later on the same connection; nothing in flight is dropped or asked twice."""
    data = digits("train")
    extra = ["--max-batch", "32", "--max-queue-samples", "32"]
    with _serve(checkpoint, grpc=scheme == "grpc", zmq=scheme == "zmq", extra_args=extra) as t:
        source = OnlineTeacher(
            t.endpoint(scheme), mode="index", timeouts=TeacherTimeouts(timeout_s=30)
        )
        loader = DistillLoader(data, {"t": source}, 32, shuffle=True, seed=2, window=8)
        seen = _epoch(loader)
        source.close()
    assert source.busy_refusals > 0, "the queue never filled: nothing tested"
    assert source.failovers == 0 and source.duplicates_dropped == 0
    assert sorted(seen) == list(range(len(data)))
    for i, row in seen.items():
        torch.testing.assert_close(row, reference[i])
