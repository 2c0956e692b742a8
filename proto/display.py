"""How long work shows itself to a user: progress on a terminal, log lines elsewhere.

Every long loop (a dump, training epochs, pruning trials, calibration) reports through
`Progress`. On a terminal it is a tqdm bar; when stderr is not a terminal (a log file, a CI
job, `kubectl logs`) carriage-return updates would pile up as kilobytes of one line, so it
writes one plain log line at most every `every_s` seconds, and one at the end. Kept in
`proto` because the teacher, the student and compression all use it and import nothing of
each other.

`format_bytes` and `plural` keep the figures in those lines readable ("1 shard", "3.4 MiB").
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Progress", "format_bytes", "plural"]

_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: int | float) -> str:
    """`1536` -> `"1.5 KiB"`; below 1 KiB the exact count (`"512 bytes"`)."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable: the loop returns at the last unit")


def plural(n: int, word: str, many: str | None = None) -> str:
    """`plural(1, "shard")` -> `"1 shard"`, `plural(3, "shard")` -> `"3 shards"`."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


class Progress:
    """Progress of `total` units of work: a tqdm bar on a terminal, else periodic log lines.

        with Progress(total=len(loader), desc="epoch 1/3", unit="batch", log=log) as bar:
            for batch in loader:
                ...
                bar.update(1, loss=f"{loss:.4f}")

    `enabled=False` shows nothing. `initial` counts work done before (a resumed run).
    `stream` is what decides terminal or not (default `sys.stderr`); `clock` paces the log
    lines (tests pass their own).
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        *,
        initial: int = 0,
        enabled: bool = True,
        log: logging.Logger | None = None,
        every_s: float = 30.0,
        stream: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = initial
        self._initial = initial
        self.enabled = enabled
        self.every_s = every_s
        self._log = log or logging.getLogger("lyceum")
        self._postfix: dict[str, object] = {}
        self._clock = clock
        self._started = clock()
        self._last_line = self._started
        self._closed = False
        stream = sys.stderr if stream is None else stream
        self._stream = stream
        isatty = getattr(stream, "isatty", None)
        self._bar: Any = None
        if enabled and callable(isatty) and isatty():
            from tqdm import tqdm  # imported here: `import lyceum` stays lean

            self._bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, leave=False, file=stream
            )

    def update(self, n: int = 1, **postfix: object) -> None:
        """`n` more units done; `postfix` values are shown beside the count."""
        self.n += n
        if postfix:
            self._postfix = postfix
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: str(v) for k, v in postfix.items()}, refresh=False)
            return
        now = self._clock()
        if now - self._last_line >= self.every_s:
            self._last_line = now
            self._log.info("%s", self.line())

    def line(self) -> str:
        """The current state as one line: `desc: 120/400 batch (30%), 12.0 batch/s, k=v`."""
        elapsed = max(self._clock() - self._started, 1e-9)
        done = f"{self.n:,}"
        if self.total:
            done += f"/{self.total:,} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            done += f" {self.unit}"
        # The rate of this run: work done before a resume took no time here.
        rate = (self.n - self._initial) / elapsed
        parts = [f"{self.desc}: {done}", f"{rate:.1f} {self.unit}/s"]
        parts += [f"{k}={v}" for k, v in self._postfix.items()]
        return ", ".join(parts)

    def write(self, message: str) -> None:
        """A line of its own that does not break the bar (tqdm.write on a terminal)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        else:
            self._log.info("%s", message)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            self._log.info("%s", self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
