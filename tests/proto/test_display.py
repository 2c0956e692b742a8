"""Progress and figures as a user reads them: bars on a terminal, log lines elsewhere."""

from __future__ import annotations

import io
import logging

import pytest

from lyceum.proto.display import Progress, format_bytes, plural


def test_format_bytes() -> None:
    assert format_bytes(0) == "0 bytes"
    assert format_bytes(1023) == "1023 bytes"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(5 * 1024**2) == "5.0 MiB"
    assert format_bytes(3 * 1024**6) == "3072.0 PiB"


def test_plural() -> None:
    assert plural(1, "shard") == "1 shard"
    assert plural(0, "shard") == "0 shards"
    assert plural(1257, "sample") == "1,257 samples"
    assert plural(2, "replica", "replicas") == "2 replicas"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_not_a_terminal_writes_log_lines_not_carriage_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream = io.StringIO()  # isatty() is False: a log file
    log = logging.getLogger("lyceum.test")
    with (
        caplog.at_level(logging.INFO, logger="lyceum.test"),
        Progress(total=4, desc="epoch 1/2", unit="batch", log=log, every_s=0, stream=stream) as p,
    ):
        for _ in range(4):
            p.update(1, loss="0.5")
        p.write("epoch done")
    assert stream.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("epoch 1/2: 1/4 batch (25%), ") and lines[0].endswith("loss=0.5")
    assert "epoch done" in lines
    assert lines[-1].startswith("epoch 1/2: 4/4 batch (100%)")
    assert len(lines) == 6  # four updates (every_s=0), the message, the closing line


def test_log_lines_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    log = logging.getLogger("lyceum.test")
    with caplog.at_level(logging.INFO, logger="lyceum.test"):
        p = Progress(
            total=1000,
            desc="dump",
            unit="rows",
            log=log,
            stream=io.StringIO(),
            clock=lambda: now[0],
        )
        for i in range(1000):
            now[0] = (i + 1) * 0.1  # 100 s in all: a line every 30 s
            p.update(1)
        p.close()
    firsts = [r.getMessage().split(", ")[0] for r in caplog.records]
    assert firsts == [
        "dump: 300/1,000 rows (30%)",
        "dump: 600/1,000 rows (60%)",
        "dump: 900/1,000 rows (90%)",
        "dump: 1,000/1,000 rows (100%)",
    ]


def test_a_terminal_gets_a_bar(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    stream = _Tty()
    with caplog.at_level(logging.INFO), Progress(total=3, desc="trials", stream=stream) as p:
        p.update(3)
        p.write("trial 3: accepted")
    assert "trials" in stream.getvalue() and "\r" in stream.getvalue()
    assert "trial 3: accepted\n" in stream.getvalue()
    assert capsys.readouterr().out == ""  # messages go where the bar is, not to stdout
    assert caplog.records == []


def test_the_rate_counts_only_this_runs_work() -> None:
    now = [0.0]
    p = Progress(
        total=10,
        desc="epoch 1/1",
        unit="batch",
        initial=6,
        stream=io.StringIO(),
        clock=lambda: now[0],
    )
    now[0] = 2.0
    p.update(2)
    assert p.line().startswith("epoch 1/1: 8/10 batch (80%), 1.0 batch/s")


def test_disabled_shows_nothing(caplog: pytest.LogCaptureFixture) -> None:
    stream = _Tty()
    with (
        caplog.at_level(logging.INFO),
        Progress(total=3, desc="x", enabled=False, stream=stream) as p,
    ):
        p.update(3)
        p.write("hidden")
    assert stream.getvalue() == "" and caplog.records == []
    assert p.n == 3
