"""Datasets named by spec in the servers and dumps that tests start: one that kills the
dump reading it (a real interrupted dump), an empty one, the digits in another order.

A subprocess given `teachers.ENV` resolves the specs, e.g.
`tests._support.dump_datasets:killed_once`.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from lyceum.deploy.examples import digits
from lyceum.proto.manifest import Manifest

from .waiting import wait_until


class KilledOnce(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """The digits split, except that reading sample `kill_at` the first time (while `marker`
    does not exist) creates `marker` and SIGKILLs the dump: no cleanup runs, as in an OOM
    kill or a lost node. A rerun of the same command reads the same items to the end.

    With `listed` > 0 the kill waits until the manifest in `out` lists that many finished
    shards, so a test knows the dump was cut after some shards and before the end (no race
    between a test that watches the manifest and a dump that may finish first). Read in a
    DataLoader worker (`--workers N`), it kills the dump process, the worker's parent."""

    def __init__(self, split: str, kill_at: int, marker: str, listed: int, out: str) -> None:
        self.data = digits(split)  # type: ignore[arg-type]  # a CLI string, checked by digits()
        self.kill_at, self.marker, self.listed, self.out = kill_at, Path(marker), listed, out

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i == self.kill_at and not self.marker.exists():
            if self.listed:
                wait_until(self._shards_listed, f"{self.listed} shards listed in {self.out}")
            self.marker.touch()
            worker = torch.utils.data.get_worker_info() is not None
            os.kill(os.getppid() if worker else os.getpid(), signal.SIGKILL)
        return self.data[i]

    def _shards_listed(self) -> bool:
        try:
            return len(Manifest.read(Path(self.out)).shards) >= self.listed
        except (OSError, ValueError):  # not written yet, or being replaced
            return False


def killed_once(
    split: str = "test", kill_at: int = 210, marker: str = "killed", listed: int = 0, out: str = ""
) -> KilledOnce:
    if listed and not out:
        raise ValueError("killed_once: listed > 0 needs out, the dump's directory")
    return KilledOnce(split, kill_at, marker, listed, out)


def shuffled_digits(split: str = "train", seed: int = 1) -> torch.utils.data.Dataset:
    """The digits split in another order: same length, same items, other sample ids."""
    base = digits(split)  # type: ignore[arg-type]  # a CLI string, checked by digits()
    order = torch.randperm(len(base), generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.Subset(base, order.tolist())


def empty() -> torch.utils.data.TensorDataset:
    """No samples (e.g. a filter that matched nothing): a dump must say so, not fingerprint it."""
    return torch.utils.data.TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0))
