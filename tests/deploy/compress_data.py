"""Datasets for `lyceum compress` tests: the digits, which block a subprocess run once its
checkpoint is at a given step, so a test signals it there without a race; and the digits
with the labels of later ids changed, to show which labels a run used."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch

from lyceum.deploy.examples import Digits

_POLL_S = 0.01  # how often a paused read looks for its release file


class PausedDigits(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """The digits' `split`. Reading a training item once `checkpoint` (a run's state.json)
    says the run is at plan step `at_step`, at least `after_batches` batches in, creates
    `paused` and blocks: until `release` exists (the test creates it after signalling the
    run), or for good without one (the test kills the run). Only once: where `paused`
    exists, or for another split, the items are plain digits."""

    def __init__(
        self,
        split: str = "train",
        limit: int | None = None,
        checkpoint: str = "",
        at_step: int = -1,
        paused: str = "",
        after_batches: int = 1,
        release: str = "",
    ) -> None:
        self.digits = Digits(split, limit)  # type: ignore[arg-type]
        self.split = split
        self.checkpoint, self.at_step, self.paused = Path(checkpoint), at_step, Path(paused)
        self.after_batches = after_batches
        self.release = Path(release) if release else None

    def __len__(self) -> int:
        return len(self.digits)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.split == "train" and self._inside():
            self.paused.touch()
            wake = threading.Event()  # never set: only the release file (or the kill) ends it
            while not (self.release is not None and self.release.exists()):
                wake.wait(_POLL_S)
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
        return bool(state["step"] == self.at_step and state["position"] >= self.after_batches)


def paused_digits(
    split: str = "train",
    limit: int | None = None,
    checkpoint: str = "",
    at_step: int = -1,
    paused: str = "",
    after_batches: int = 1,
    release: str = "",
) -> PausedDigits:
    return PausedDigits(split, limit, checkpoint, at_step, paused, after_batches, release)


class RelabelledDigits(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """The digits' `split` with the label of every id >= `keep` moved to the next class."""

    def __init__(self, split: str = "train", limit: int | None = None, keep: int = 0) -> None:
        self.digits = Digits(split, limit)  # type: ignore[arg-type]
        self.keep = keep

    def __len__(self) -> int:
        return len(self.digits)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.digits[i]
        return image, label if i < self.keep else (int(label) + 1) % 10


def relabelled_digits(
    split: str = "train", limit: int | None = None, keep: int = 0
) -> RelabelledDigits:
    return RelabelledDigits(split, limit, keep)
