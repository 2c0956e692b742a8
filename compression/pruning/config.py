"""Pruning strategies as config objects: `prune(model, UniformPruning(flops=-0.5), x)`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lyceum.compression.search import SAConfig, StudyConfig

__all__ = [
    "AutoPruning",
    "Criterion",
    "PruningConfig",
    "SensitivityPruning",
    "UniformPruning",
    "with_state_in",
]

Criterion = Literal["l1", "l2", "fpgm"]

_DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class _Selection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    criterion: Criterion = Field(
        default="l1",
        description="Channel importance: 'l1' or 'l2' norm of the group's weights, or 'fpgm' "
        "(distance to the geometric median; removes the most replaceable filters).",
    )
    include: str | None = Field(
        default=None,
        description="Regex (re.fullmatch) on layer names: only groups with a matching layer "
        "are pruned, e.g. '.*_sep_weights' or 'layers\\..*\\.conv1'. Default: all groups.",
    )
    exclude: str | None = Field(
        default=None,
        description="Regex (re.fullmatch) on layer names: groups with a match are kept.",
    )

    @field_validator("include", "exclude")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"invalid regex {value!r}: {e}") from e
        return value


class _FlopsTarget(_Selection):
    tolerance: float = Field(
        default=0.02,
        ge=0.0,
        lt=1.0,
        description="How far the FLOPs reduction may land from `flops` (a fraction of the "
        "unpruned FLOPs, e.g. 0.02 for two points): the closest reachable plan within it is "
        "taken and its reduction reported (PruneResult.flops_reduction); a farther miss is an "
        "error naming the closest reachable reduction.",
    )


def _check_flops(flops: float) -> float:
    if not -1.0 < flops < 0.0:
        raise ValueError(
            f"flops must be the relative FLOPs change in (-1, 0), e.g. -0.5 to remove half; "
            f"got {flops}"
        )
    return flops


class UniformPruning(_FlopsTarget):
    """Remove the same fraction of channels from every selected group.

    Give `ratio` directly, or `flops` (e.g. -0.5) and the ratio is found by bisection; where
    it jumps over the target (groups that lose coarse units, an attention embedding or a
    ShuffleNet stage, lose one at once), those groups take the step on one side and the
    others' ratio is bisected again (`lyceum.compression.pruning._targets.closest_ratios`).
    """

    kind: Literal["uniform"] = "uniform"
    ratio: float | None = Field(
        default=None, ge=0.0, lt=1.0, description="Fraction of each group's channels to remove."
    )
    flops: float | None = Field(
        default=None, description="Target relative FLOPs change, e.g. -0.5; the ratio is bisected."
    )

    @model_validator(mode="after")
    def _one_target(self) -> Self:
        if (self.ratio is None) == (self.flops is None):
            raise ValueError(
                f"UniformPruning: give exactly one of 'ratio' or 'flops' "
                f"(got ratio={self.ratio}, flops={self.flops})"
            )
        if self.flops is not None:
            _check_flops(self.flops)
        return self


class SensitivityPruning(_FlopsTarget):
    """Per-group ratios from a sensitivity analysis, meeting a FLOPs target at least loss.

    Each group is pruned alone at each of `ratios` and evaluated; then a loss threshold is
    bisected so that every group gets the largest ratio whose (interpolated) metric loss stays
    under it, and the FLOPs target is met (PaddleSlim's SensitivePruner). Where the
    threshold jumps over the target, the groups that jump are held on one side of their
    step, as in uniform pruning (`targets.closest_ratios`).
    """

    kind: Literal["sensitivity"] = "sensitivity"
    flops: float = Field(description="Target relative FLOPs change, e.g. -0.5.")
    ratios: tuple[float, ...] = Field(
        default=_DEFAULT_RATIOS, description="Ratios each group is tried at, increasing, in (0, 1)."
    )
    max_ratio: float = Field(
        default=0.9, gt=0.0, lt=1.0, description="Largest fraction removed from any one group."
    )
    sensitivity_file: Path | None = Field(
        default=None, description="JSON file the analysis is saved to as it runs and resumed from."
    )

    @field_validator("flops")
    @classmethod
    def _flops(cls, value: float) -> float:
        return _check_flops(value)

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(not 0.0 < r < 1.0 for r in value) or list(value) != sorted(set(value)):
            raise ValueError(f"ratios must be increasing, distinct, in (0, 1); got {value}")
        return value


class AutoPruning(_Selection):
    """Per-group ratios searched by simulated annealing under a FLOPs or latency constraint.

    Candidates are per-group ratios on a grid of `ratio_step` up to `max_layer_ratio`; a
    candidate is feasible when it removes between `min_ratio` and `max_ratio` of the FLOPs
    (PaddleSlim's auto_prune) and, if set, runs under `max_latency_ms`. Each feasible candidate
    is fine-tuned briefly (the `candidate_finetune` callable given to `prune`) and scored by
    `evaluate`. The search is `lyceum.compression.search.run_search` on an Optuna study.
    """

    kind: Literal["auto"] = "auto"
    min_ratio: float = Field(
        default=0.5, ge=0.0, lt=1.0, description="Least fraction of FLOPs removed."
    )
    max_ratio: float = Field(
        default=0.55, gt=0.0, lt=1.0, description="Most fraction of FLOPs removed."
    )
    max_latency_ms: float | None = Field(
        default=None,
        gt=0.0,
        description="Optional measured-latency bound (median, 1 thread), in ms.",
    )
    ratio_step: float = Field(
        default=0.1, gt=0.0, lt=1.0, description="Grid step of per-group ratios."
    )
    max_layer_ratio: float = Field(
        default=0.8, gt=0.0, lt=1.0, description="Largest fraction removed from any one group."
    )
    search: SAConfig = Field(
        default_factory=SAConfig, description="Simulated-annealing settings (seed, budget...)."
    )
    study: StudyConfig = Field(
        default_factory=lambda: StudyConfig(study="auto-pruning"),
        description="The Optuna study the search is stored in: resuming is running the same "
        "config again; several workers may share it (default: in memory, no resume).",
    )
    init_tokens: list[int] | None = Field(
        default=None, description="Start of the search, e.g. the best tokens of an earlier run."
    )

    @model_validator(mode="after")
    def _window(self) -> Self:
        if self.min_ratio > self.max_ratio:
            raise ValueError(
                f"AutoPruning: min_ratio {self.min_ratio} exceeds max_ratio {self.max_ratio}"
            )
        return self


PruningConfig = UniformPruning | SensitivityPruning | AutoPruning


def with_state_in(strategy: PruningConfig, out: Path) -> PruningConfig:
    """`strategy` with its resumable state kept in `out` unless it names a place: the
    sensitivity table (`sensitivity.json`) or the search's study (`search.db`), so that a run
    killed inside the analysis or the search continues where it was."""
    if isinstance(strategy, SensitivityPruning) and strategy.sensitivity_file is None:
        return strategy.model_copy(update={"sensitivity_file": out / "sensitivity.json"})
    if isinstance(strategy, AutoPruning) and strategy.study.storage is None:
        study = strategy.study.model_copy(update={"storage": str(out / "search.db")})
        return strategy.model_copy(update={"study": study})
    return strategy
