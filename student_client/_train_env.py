"""Where one training process runs: its rank among DDP ranks, and the signals that stop it.

Under `torchrun` (WORLD_SIZE > 1) every rank must take the same number of optimizer steps (a
DDP step is a collective), so a stop is agreed on: after fetching each batch, before its step,
the ranks exchange whether a signal arrived and whether their teachers failed (`halt`), and
all stop at the same batch.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Distributed", "StopSignals", "rank_from_env"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def rank_from_env() -> int:
    """This process's rank as torchrun sets it (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


class Distributed:
    """Rank, world size and device of this process; DDP set up when WORLD_SIZE > 1."""

    def __init__(self, device: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = rank_from_env()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda") and self.world > 1 and ":" not in device:
            device = f"cuda:{local}"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # nccl binds each rank to its current device
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.owns_group = True

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def halt(self, signum: int | None, failed: bool) -> tuple[int | None, int | None]:
        """`(signal, failed rank)` over all ranks: a stop signal seen on any rank (the larger
        number if several), and the first rank whose teachers failed; None for neither."""
        if not self.enabled:
            return signum, (self.rank if failed else None)
        t = torch.tensor(
            [signum or 0, (self.world - self.rank) if failed else 0], device=self.device
        )
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        seen, failing = (int(v) for v in t.tolist())
        return seen or None, (self.world - failing) if failing else None

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def close(self, together: bool) -> None:
        """Tear down the process group this process made. `together`: every rank got here
        in step (a finished or collectively halted run), so they first wait for each other:
        a rank that tears gloo down while another still writes its checkpoint was seen to
        abort ("terminate called without an active exception") under load. After an error
        on this rank alone, the others may be stuck in a collective: no barrier then.

        The run's DDP module holds the group, so a module still referenced from a reference
        cycle (a caught exception's traceback and its frames) keeps gloo alive past
        `destroy_process_group`; gloo is then torn down during interpreter finalization and
        the process aborts after a clean run (SIGABRT, "terminate called without an active
        exception"). Collecting first frees such a module while the interpreter is whole."""
        if not self.owns_group:
            return
        gc.collect()
        if together:
            dist.barrier()
        dist.destroy_process_group()


class StopSignals:
    """SIGINT and SIGTERM, caught while training: the loop finishes the batch in progress,
    writes a checkpoint and returns.

    A second signal means "now": the previous handlers come back and the signal is raised
    again, so a second Ctrl-C raises `KeyboardInterrupt` at once (a checkpoint being written
    is abandoned: its temp file is removed and the last complete `last.pt` stays) and a
    second SIGTERM ends the process as SIGTERM does.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                # None: a handler installed outside Python; the default is the closest match.
                self._previous[s] = signal.signal(s, self._handle) or signal.SIG_DFL
        return self

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            return
        self._restore()
        signal.raise_signal(signum)

    def _restore(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()

    def __exit__(self, *_exc: object) -> None:
        self._restore()
