"""The `lyceum` command's exit codes, one table for every command (documented in the README).

Scripts and schedulers branch on these: a finished run, a check that found a problem, a user
error to fix, teachers that stayed unreachable (retry later), and a stop by signal (after
whatever state the command keeps was saved).
"""

from __future__ import annotations

OK = 0
"""The command did what it was asked."""

FAILED = 1
"""A check ran and failed (e.g. `knowledge verify` found a bad or missing shard)."""

USAGE = 2
"""Bad input: options, configs, specs, files; the message says what and how to fix it."""

UNAVAILABLE = 69
"""Teachers stayed unreachable (sysexits' EX_UNAVAILABLE); a checkpoint was written if the run
had one to write. Retry once the teachers are back (`--resume` for `student train`)."""


def signal_exit(signum: int) -> int:
    """The shell's convention for a process stopped by signal `signum`: 128 + signum
    (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + signum
