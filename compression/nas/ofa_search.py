"""Searching the trained supernet: the Light-NAS engine, a reward that trains nothing.

A candidate's reward is the validation top-1 of its subnet, extracted from the supernet and BN
re-calibrated on the same few training batches as every other candidate: seconds per candidate
where Light-NAS trains each one for minutes. The search itself is `search_architecture` on the
supernet's `OFASpace`, so budgets (FLOPs, params, latency from a latency table measured for
that space) are checked before any candidate is evaluated, and any number of workers share one
study's storage as in Light-NAS.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import Dataset

from lyceum.compression.nas.budget import Budget, BudgetedSpace
from lyceum.compression.nas.job import search_architecture
from lyceum.compression.nas.latency import LatencyTable
from lyceum.compression.nas.ofa_train import calibration_batches, evaluate_subnet
from lyceum.compression.nas.supernet import Supernet
from lyceum.compression.search import SAConfig, SearchResult, StudyConfig

__all__ = ["SubnetReward", "search_subnet"]


class SubnetReward:
    """Validation top-1 of a candidate's subnet after BN re-calibration (records each one)."""

    def __init__(
        self,
        supernet: Supernet,
        calibration: Dataset,
        val_data: Dataset,
        *,
        batches: int = 4,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        self.supernet, self.val_data = supernet, val_data
        # Drawn once: every candidate is re-calibrated on the same inputs.
        self.batches = calibration_batches(calibration, batches, batch_size, seed)
        self.evaluated: list[list[int]] = []

    def __call__(self, tokens: Sequence[int]) -> float:
        self.evaluated.append(list(tokens))
        config = self.supernet.space.subnet(tokens)
        return evaluate_subnet(self.supernet, config, self.batches, self.val_data)


def search_subnet(
    reward: SubnetReward,
    *,
    budget: Budget | None = None,
    lut: LatencyTable | None = None,
    search: SAConfig | None = None,
    study: StudyConfig | None = None,
    progress: bool = True,
    worker: str = "supernet",
) -> tuple[SearchResult, BudgetedSpace]:
    """One worker of a subnet search under `budget` (see `search_architecture`)."""
    return search_architecture(
        reward.supernet.space,
        reward,
        budget=budget,
        lut=lut,
        search=search,
        study=study,
        progress=progress,
        worker=worker,
    )
