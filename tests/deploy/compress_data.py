"""A dataset for `lyceum compress` subprocess tests: the digits, which block the run once
its checkpoint is inside a given step, so a test kills it there without a race."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch

from lyceum.deploy.examples import Digits


class PausedDigits(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """The digits' `split`. Reading a training item once `checkpoint` (a run's state.json)
    says the run is at plan step `at_step`, some batches in, creates `paused` and blocks for
    good: the run then stands still with that checkpoint on disk until the test kills it.
    Only once: where `paused` exists, or for another split, the items are plain digits."""

    def __init__(
        self,
        split: str = "train",
        limit: int | None = None,
        checkpoint: str = "",
        at_step: int = -1,
        paused: str = "",
    ) -> None:
        self.digits = Digits(split, limit)  # type: ignore[arg-type]
        self.split = split
        self.checkpoint, self.at_step, self.paused = Path(checkpoint), at_step, Path(paused)

    def __len__(self) -> int:
        return len(self.digits)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.split == "train" and self._inside():
            self.paused.touch()
            threading.Event().wait()  # never set: the test's SIGKILL ends this process
        return self.digits[i]

    def _inside(self) -> bool:
        if self.paused.exists():
            return False
        try:
            state = json.loads(self.checkpoint.read_text())
        # Absent before the first checkpoint, and for a moment at each swap (checkpoint/ is
        # renamed to checkpoint.old/ before checkpoint.tmp/ takes its place); the file is
        # written whole, so a partial one is never read.
        except FileNotFoundError:
            return False
        return bool(state["step"] == self.at_step and state["position"] > 0)


def paused_digits(
    split: str = "train",
    limit: int | None = None,
    checkpoint: str = "",
    at_step: int = -1,
    paused: str = "",
) -> PausedDigits:
    return PausedDigits(split, limit, checkpoint, at_step, paused)
