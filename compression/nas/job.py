"""`lyceum nas search CONFIG.yaml`: Light-NAS as one config, a space, a budget and a reward.

The reward of a candidate is its validation accuracy after `epochs` of training (PaddleSlim's
Light-NAS: top-1 after a few epochs). The library takes built objects (the space, the data
sets); the CLI resolves the specs.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.utils.data import Dataset

from lyceum.compression.nas.base import NASSpace
from lyceum.compression.nas.budget import Budget, BudgetedSpace
from lyceum.compression.nas.distill import NASDistillation, TeacherKnowledge, train_candidate
from lyceum.compression.nas.latency import LatencyTable
from lyceum.compression.nas.train import FinalTraining
from lyceum.compression.search import (
    SAConfig,
    SearchResult,
    StudyConfig,
    open_study,
    run_search,
    saved_sa_config,
    search_result,
)
from lyceum.proto.evaluation import top1_accuracy

__all__ = [
    "NASConfig",
    "NASSearchConfig",
    "TrainingReward",
    "read_search",
    "search_architecture",
]


class NASSearchConfig(SAConfig):
    """The search settings of an architecture search: `SAConfig`, annealing from the best of a
    few random architectures by default."""

    warmup: int = Field(
        default=5,
        ge=0,
        description="annealing: uniform random architectures (within the budget) evaluated "
        "after the initial one before annealing starts, from the best of them. On bench/ofa.py's "
        "supernet (30 and 100 trials, 3 latency budgets, 5 seeds), SA with 5 beat random search "
        "in 19 of 20 cases, without in 16 (a chain started at a poor point stays near it). 0: "
        "PaddleSlim's chain from the initial architecture.",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_sa_config(cls, data: Any) -> Any:
        # An `SAConfig` built by hand is taken with its values, its warm-up (0 by default) too.
        if isinstance(data, SAConfig) and not isinstance(data, cls):
            return data.model_dump()
        return data


class NASConfig(BaseModel):
    """A Light-NAS search: the space, the budget, the reward's training, the study."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    space: str = Field(
        default="lyceum.compression.nas:lightnas_space",
        description="The space, a `module:callable` spec returning a NASSpace.",
    )
    space_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the space's factory."
    )
    dataset: str = Field(
        default="lyceum.deploy.examples:digits",
        description="Dataset factory spec, called with split='train' and split='val'.",
    )
    dataset_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the dataset factory."
    )
    budget: Budget = Field(default_factory=Budget, description="Bounds every candidate meets.")
    lut: Path | None = Field(
        default=None, description="Latency table (`lyceum nas lut`), for latency budgets."
    )
    epochs: int = Field(default=2, ge=1, description="Training epochs of each candidate.")
    batch_size: int = Field(default=64, ge=1, description="Training batch size.")
    lr: float = Field(default=3e-3, gt=0, description="Adam learning rate.")
    search: NASSearchConfig = Field(
        default_factory=NASSearchConfig,
        description="Search settings: annealing (default) or evolution, iterations, seed.",
    )
    study: StudyConfig = Field(
        default_factory=lambda: StudyConfig(storage="nas.db", study="lightnas"),
        description="Where the search is stored (every worker passes the same).",
    )
    distill: NASDistillation | None = Field(
        default=None,
        description="Distil each candidate's training from a teacher (an offline dump or "
        "online endpoints): the reward is then the distilled student's accuracy.",
    )
    final: FinalTraining = Field(
        default_factory=FinalTraining,
        description="Full training of the found architecture (`lyceum nas train`).",
    )


class TrainingReward:
    """Validation top-1 of a candidate after `epochs` of training (counts its builds), distilled
    from `teacher` when given."""

    def __init__(
        self,
        space: NASSpace,
        train_data: Dataset,
        val_data: Dataset,
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        seed: int = 0,
        teacher: TeacherKnowledge | None = None,
    ) -> None:
        self.space, self.train_data, self.val_data = space, train_data, val_data
        self.epochs, self.batch_size, self.lr, self.seed = epochs, batch_size, lr, seed
        self.teacher = teacher
        if teacher is not None:
            teacher.check(train_data)
        self.built: list[list[int]] = []

    def train(self, tokens: Sequence[int]) -> nn.Module:
        torch.manual_seed(self.seed)
        self.built.append(list(tokens))
        model = self.space.build(tokens)
        train_candidate(
            model,
            self.train_data,
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            seed=self.seed,
            teacher=self.teacher,
        )
        return model

    def __call__(self, tokens: Sequence[int]) -> float:
        return float(top1_accuracy(self.train(tokens), self.val_data))


def search_architecture(
    space: NASSpace,
    reward: Callable[[Sequence[int]], float],
    *,
    budget: Budget | None = None,
    lut: LatencyTable | None = None,
    search: SAConfig | None = None,
    study: StudyConfig | None = None,
    progress: bool = True,
    worker: str = "nas",
) -> tuple[SearchResult, BudgetedSpace]:
    """One worker of an architecture search under `budget`; the space returned gives figures.

    `reward(tokens)` only ever sees candidates within the budget.
    """
    budgeted = BudgetedSpace(space, budget, lut)
    search = search or NASSearchConfig()
    start = _feasible_start(budgeted, search)
    result = run_search(
        budgeted,
        reward,
        search,
        study=study,
        progress=progress,
        worker=worker,
        init_tokens=start,
    )
    return result, budgeted


def read_search(
    space: NASSpace,
    study: StudyConfig,
    *,
    budget: Budget | None = None,
    lut: LatencyTable | None = None,
) -> tuple[SearchResult, BudgetedSpace]:
    """What `search_architecture` returns, read back from `study` alone: every worker's trials
    (finished or not, on any machine), each one's SA acceptance when the study was annealed
    (its saved settings replay the chain), and the space that gives their figures."""
    opened = open_study(study)
    result = search_result(opened, space.range_table(), saved_sa_config(opened))
    return result, BudgetedSpace(space, budget, lut)


def _feasible_start(space: BudgetedSpace, search: SAConfig) -> list[int]:
    """The space's initial tokens if they meet the budget, else the first of seeded random draws
    that does (PaddleSlim re-draws its start too), else the first value of every token (the
    smallest architecture of the built-in spaces, whose values run from small to large): a
    budget below the initial network's figures (the point of a -30% FLOPs search), or one
    that few random architectures meet, must not stop the search before it starts."""
    tokens = space.init_tokens()
    rng = random.Random(f"lyceum-nas-start:{search.seed}")
    for _ in range(search.max_resample):
        if space.is_feasible(tokens):
            return tokens
        tokens = [rng.randrange(n) for n in space.range_table()]
    first = [0] * len(space.range_table())
    if space.is_feasible(first):
        return first
    f = space.figures(space.init_tokens())
    raise ValueError(
        f"search_architecture: no architecture within the budget {space.budget.model_dump()} "
        f"in {search.max_resample} random draws nor at the first value of every token (the "
        f"initial one has {f.flops:,} MACs, {f.params:,} params, latency {f.latency_ms} ms); "
        "loosen the budget"
    )
