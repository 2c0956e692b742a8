"""Step lines: what a long step that has no loop of its own is doing.

Loops report through `lyceum.proto.display.Progress` (a bar on a terminal, periodic log lines
otherwise). A step that is one long call (torchao's int8 conversion, `torch.compile` of a
program) cannot count anything, so it says what it is when it starts: a user watching a quiet
terminal then knows what the wait is. Both follow the same `progress` switch.
"""

from __future__ import annotations

import logging

_log = logging.getLogger("lyceum.compression")


def announce(message: str, *, enabled: bool) -> None:
    """Log `message` (INFO, logger `lyceum.compression`) unless progress is switched off."""
    if enabled:
        _log.info("%s", message)
