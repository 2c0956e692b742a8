"""Silence torchao's import-time log noise on CPU machines (and only that)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

# torchao logs a warning for each optional CUDA kernel library it cannot load, and torch logs
# one about an enum torchao registers with pytree: noise on every CPU import, nothing to act on.
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextmanager
def quiet_import_logs() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
