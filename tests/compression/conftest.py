"""What compression's progress wrote, as the log lines a non-terminal run shows."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Callable

import pytest


@pytest.fixture
def progress_lines(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> Callable[[], list[str]]:
    """Call it after the work: the `lyceum` log lines since the test began, stderr not a
    terminal (so `Progress` writes log lines, not a bar, even under `pytest -s`)."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    caplog.set_level(logging.INFO, logger="lyceum")
    return lambda: [r.getMessage() for r in caplog.records if r.name.startswith("lyceum")]
