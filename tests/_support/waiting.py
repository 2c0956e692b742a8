"""Waiting on observable state another process or thread changes: a file appears, a metric
counts up, a log line is written. There is no event to block on across a process boundary,
so this polls the state, with a hang guard that fails the test instead of hanging it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["HANG_GUARD_S", "wait_until"]

T = TypeVar("T")

HANG_GUARD_S = 120.0
"""Long enough never to fire on a loaded 2-core machine; only a hung test reaches it."""


def wait_until(
    state: Callable[[], T],
    what: str,
    *,
    timeout_s: float = HANG_GUARD_S,
    gave_up: Callable[[], str | None] = lambda: None,
    interval_s: float = 0.01,
) -> T:
    """Poll `state()` until it returns something truthy, and return that. `what` names the
    awaited state in the error; `gave_up()` returns why waiting is pointless (the process
    that would change the state has exited) or None, checked on each poll."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = state()
        if value:
            return value
        reason = gave_up()
        if reason is not None:
            raise AssertionError(f"gave up waiting for {what}: {reason}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached after {timeout_s:g}s (a hang guard)")
        time.sleep(interval_s)  # a poll interval: the state is re-read, never assumed
