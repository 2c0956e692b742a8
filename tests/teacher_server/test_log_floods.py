"""Bad input from outside is logged once per peer per interval, with a count; metrics count all.

Before: 50 garbage frames of 100 KB on the ZeroMQ port were ~6,900 log lines (raw bytes that
libzmq reads as ZMTP 1.0 messages, hundreds per connection). The limiter is tested with a
fake clock; the servers are real processes, stopped before their log is counted, so the log
is complete when it is read.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from contextlib import suppress
from pathlib import Path

import pytest

from lyceum.teacher_server.metrics import EventLimiter
from tests._support.servers import RawGrpc, RawZmq, ServerProcess
from tests._support.teachers import DIGITS, MODEL
from tests._support.waiting import wait_until

GARBAGE = b"\xff" * 100_000  # an over-long varint for gRPC; one frame of 1 for ZeroMQ
FRAMES = 50
ERRORS = 'lyceum_teacher_errors_total{{code="INVALID_ARGUMENT",transport="{}"}}'


def _events(log: str) -> list[dict[str, object]]:
    out = []
    for line in log.splitlines():
        start = line.find("{")
        if " lyceum.teacher_server " in line and start >= 0:
            out.append(json.loads(line[start:]))
    return out


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _logged(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "lyceum.teacher_server"]


def test_limiter_logs_once_per_key_per_interval_with_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = _Clock()
    limiter = EventLimiter(interval_s=10, burst=3, clock=clock)
    with caplog.at_level(logging.INFO, logger="lyceum.teacher_server"):
        for i in range(FRAMES):
            limiter.log("request_error", "peer-a", n=i)
        assert [e["n"] for e in _logged(caplog)] == [0]
        clock.now += 10  # the next interval: one line with the count held back meanwhile
        limiter.log("request_error", "peer-a", n=50)
        assert _logged(caplog)[-1] == {"event": "request_error", "n": 50, "repeated": 49}
        # Many peers: at most `burst` lines per event per interval; the rest are counted.
        for p in range(20):
            limiter.log("request_error", f"peer-{p}")
        limiter.log("stream_open", "peer-x")  # another event has its own burst
        assert len(_logged(caplog)) == 2 + 2 + 1
        limiter.flush()
    last = _logged(caplog)[-1]
    assert last == {"event": "events_not_logged", "of": "request_error", "count": 18, "keys": 18}


def test_limiter_forgets_old_peers_but_not_their_counts(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    limiter = EventLimiter(interval_s=10, burst=100, max_keys=4, clock=clock)
    with caplog.at_level(logging.INFO, logger="lyceum.teacher_server"):
        for p in range(4):
            limiter.log("e", f"p{p}")
            limiter.log("e", f"p{p}")  # held back
        clock.now += 10
        limiter.log("e", "new")  # the table is full: expired peers are forgotten
        assert len(limiter._keys) == 1
        limiter.flush()
    assert _logged(caplog)[-1] == {"event": "events_not_logged", "of": "e", "count": 4, "keys": 0}


def _server(tmp_path: Path) -> ServerProcess:
    return ServerProcess(
        ["--model", MODEL, "--dataset", DIGITS, "--grpc-port", "0", "--zmq-port", "0",
         "--metrics-port", "0"],
        tmp_path,
    )  # fmt: skip


@pytest.mark.integration
@pytest.mark.parametrize("transport", ["grpc", "zmq"])
def test_fifty_garbage_frames_are_one_log_line_and_fifty_in_the_metrics(
    tmp_path: Path, transport: str
) -> None:
    server = _server(tmp_path)
    try:
        if transport == "grpc":
            raw = RawGrpc(server.endpoint("grpc"))
            replies = raw.exchange([GARBAGE] * FRAMES)
        else:
            raw = RawZmq(server.endpoint("zmq"))  # type: ignore[assignment]
            replies = raw.exchange([[GARBAGE]] * FRAMES)  # type: ignore[list-item]
        raw.close()
        assert len(replies) == FRAMES  # every frame got its error reply
        assert server.metrics()[ERRORS.format(transport)] == FRAMES
    finally:
        assert server.terminate() == 0
    events = _events(server.log())
    bad = [e for e in events if e["event"] == "request_error"]
    assert len(bad) == 1 and bad[0]["transport"] == transport, bad
    held = [e for e in events if e["event"] == "events_not_logged" and e["of"] == "request_error"]
    assert held == [{"event": "events_not_logged", "of": "request_error", "count": 49, "keys": 1}]
    assert len(server.log().splitlines()) < 20, server.log()


@pytest.mark.integration
def test_raw_bytes_on_the_zmq_port_are_a_bounded_number_of_lines(tmp_path: Path) -> None:
    """The issue's flood: 50 connections each writing 100 KB of random bytes, which libzmq
    parses as hundreds of ZMTP 1.0 messages from peers with garbage identities."""
    server = _server(tmp_path)
    try:
        port = server.info["zmq"]
        for _ in range(FRAMES):
            # libzmq may close a connection before it has read everything: OSError.
            with socket.create_connection(("127.0.0.1", port)) as s, suppress(OSError):
                s.sendall(os.urandom(len(GARBAGE)))
        # Wait until the server has turned at least that many messages into error replies.
        wait_until(
            lambda: server.metrics().get(ERRORS.format("zmq"), 0) >= FRAMES,
            f"{FRAMES} garbage messages answered with errors",
        )
    finally:
        assert server.terminate() == 0
    log = server.log()
    lines = log.splitlines()
    # At most a burst of lines per event and interval (about 40 for these four events),
    # not thousands; the rest are counted in one line per event at shutdown.
    assert len(lines) < 100, f"{len(lines)} lines:\n{log[-3000:]}"
    peers = [e["peer"] for e in _events(log) if e["event"] == "request_error"]
    assert peers and all(len(str(p)) <= 50 for p in peers)  # identities shown cut short
    held = {e["of"]: e["count"] for e in _events(log) if e["event"] == "events_not_logged"}
    assert len(peers) + int(str(held.get("request_error", 0))) >= FRAMES, held  # none lost
