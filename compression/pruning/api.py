"""`prune(model, config, example_input, evaluate=...)`: one verb for every pruning strategy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from lyceum.compression.analysis import count_flops, count_params
from lyceum.compression.pruning._auto import FlopsOracle, PruningSpace, make_objective
from lyceum.compression.pruning._graph import ChannelGraph, prune_by_ratios
from lyceum.compression.pruning._targets import check_target, closest_ratios
from lyceum.compression.pruning.config import (
    AutoPruning,
    Criterion,
    PruningConfig,
    SensitivityPruning,
    UniformPruning,
)
from lyceum.compression.pruning.plan import PrunePlan
from lyceum.compression.pruning.sensitivity import (
    SensitivityResult,
    analyze_sensitivity,
    ratio_for_loss,
)
from lyceum.compression.search import SearchResult, run_search

__all__ = ["PruneResult", "prune", "prune_to_flops"]


@dataclass
class PruneResult:
    """The pruned model (the same object, pruned in place) and what was done to it."""

    model: nn.Module
    plan: PrunePlan
    ratios: dict[str, float]
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    sensitivity: SensitivityResult | None = None
    search: SearchResult | None = field(default=None, repr=False)
    target: float | None = None
    """The FLOPs reduction asked for (0.5 for flops=-0.5); None for a ratio or a search."""

    @property
    def flops_reduction(self) -> float:
        """Fraction of FLOPs removed, e.g. 0.5 for -50%."""
        return 1.0 - self.flops_after / self.flops_before


def _no_metric(model: nn.Module) -> float:
    raise ValueError("prune: this strategy needs evaluate=callable(model) -> metric")


def _uniform_ratios(oracle: FlopsOracle, config: UniformPruning) -> dict[str, float]:
    names = [g.name for g in oracle.groups]
    if config.ratio is not None:
        return dict.fromkeys(names, config.ratio)
    # UniformPruning's validator guarantees flops is set when ratio is not.
    target = -(config.flops or 0.0)
    ratios, reached = closest_ratios(
        lambda r: dict.fromkeys(names, r), oracle.reduction, target, 0.95
    )
    check_target(reached, target, config.tolerance)
    return ratios


def _sensitivity_ratios(
    oracle: FlopsOracle, sensitivity: SensitivityResult, config: SensitivityPruning
) -> dict[str, float]:
    curves = {g.name: sensitivity.losses(g.name) for g in oracle.groups}

    def ratios_at(threshold: float) -> dict[str, float]:
        return {n: ratio_for_loss(c, threshold, config.max_ratio) for n, c in curves.items()}

    # Bisect on the loss threshold: every group gets the largest ratio whose predicted loss
    # stays under it, so groups that tolerate pruning give up the most channels.
    top = max((loss for c in curves.values() for _, loss in c), default=0.0)
    top = max(top, 0.0) + 1e-3  # above every point, tie-breaking slope included
    ratios, reached = closest_ratios(ratios_at, oracle.reduction, -config.flops, top)
    check_target(reached, -config.flops, config.tolerance)
    return ratios


@dataclass(frozen=True)
class _Inputs:
    """What every strategy may use to pick its ratios."""

    model: nn.Module
    example_input: torch.Tensor
    oracle: FlopsOracle
    score: Callable[[nn.Module], float]
    candidate_finetune: Callable[[nn.Module], object] | None
    progress: bool


@dataclass(frozen=True)
class _Picked:
    """A strategy's per-group ratios, with the analysis or search behind them."""

    ratios: dict[str, float]
    sensitivity: SensitivityResult | None = None
    search: SearchResult | None = None


def _uniform(inputs: _Inputs, config: UniformPruning) -> _Picked:
    return _Picked(_uniform_ratios(inputs.oracle, config))


def _sensitivity(inputs: _Inputs, config: SensitivityPruning) -> _Picked:
    sensitivity = analyze_sensitivity(
        inputs.model,
        inputs.example_input,
        inputs.score,
        ratios=config.ratios,
        criterion=config.criterion,
        include=config.include,
        exclude=config.exclude,
        path=config.sensitivity_file,
        progress=inputs.progress,
    )
    return _Picked(_sensitivity_ratios(inputs.oracle, sensitivity, config), sensitivity)


def _auto(inputs: _Inputs, config: AutoPruning) -> _Picked:
    space = PruningSpace(inputs.oracle, config)
    objective = make_objective(inputs.oracle, space, inputs.score, inputs.candidate_finetune)
    search = run_search(
        space,
        objective,
        config.search,
        study=config.study,
        init_tokens=config.init_tokens,
        progress=inputs.progress,
    )
    return _Picked(space.ratios(search.best_tokens), search=search)


@dataclass(frozen=True)
class _Strategy:
    pick: Callable[[_Inputs, Any], _Picked]  # Any: the config type the table keys it by
    scores: bool  # scores candidates, so needs `evaluate`


# One entry per member of `PruningConfig`.
_STRATEGIES: dict[type[BaseModel], _Strategy] = {
    UniformPruning: _Strategy(_uniform, scores=False),
    SensitivityPruning: _Strategy(_sensitivity, scores=True),
    AutoPruning: _Strategy(_auto, scores=True),
}


def prune(
    model: nn.Module,
    config: PruningConfig,
    example_input: torch.Tensor,
    *,
    evaluate: Callable[[nn.Module], float] | None = None,
    candidate_finetune: Callable[[nn.Module], object] | None = None,
    progress: bool = True,
) -> PruneResult:
    """Prune `model` in place with `config`; channels are really removed.

    - `UniformPruning`: one ratio for every selected group (given, or bisected to `flops`).
    - `SensitivityPruning`: needs `evaluate(model) -> metric` (higher is better, e.g.
      validation accuracy); analyses each group, then picks per-group ratios.
    - `AutoPruning`: needs `evaluate`; each candidate is passed to `candidate_finetune` (a short
      fine-tune, modifying the model in place) before it is evaluated.

    Fine-tuning the result is the caller's step (see `lyceum.compression.pruning.finetune`).
    The classifier's outputs are never pruned, so output shapes are unchanged. `progress`
    counts the sensitivity trials or the search's evaluations.
    """
    # By the class or the nearest base in the table: a subclass of a config prunes as it does.
    strategy = next((_STRATEGIES[c] for c in type(config).__mro__ if c in _STRATEGIES), None)
    if strategy is None:
        known = ", ".join(c.__name__ for c in _STRATEGIES)
        raise ValueError(f"prune: unknown config type {type(config).__name__}; use {known}")
    if strategy.scores and evaluate is None:
        raise ValueError(
            f"prune: {type(config).__name__} scores candidates, so pass "
            "evaluate=callable(model) -> metric (higher is better)"
        )
    flops_before = count_flops(model, example_input)
    params_before = count_params(model)
    graph = ChannelGraph(model, example_input, include=config.include, exclude=config.exclude)
    if not graph.groups:
        raise ValueError(
            f"prune: no prunable groups selected (include={config.include!r}, "
            f"exclude={config.exclude!r}); check the regexes against model.named_modules()"
        )
    oracle = FlopsOracle(model, example_input, graph, config.criterion)
    score = evaluate if evaluate is not None else _no_metric
    inputs = _Inputs(model, example_input, oracle, score, candidate_finetune, progress)
    picked = strategy.pick(inputs, config)
    plan = prune_by_ratios(model, example_input, picked.ratios, config.criterion, graph=graph)
    flops = getattr(config, "flops", None)
    return PruneResult(
        model=model,
        plan=plan,
        ratios=picked.ratios,
        flops_before=flops_before,
        flops_after=count_flops(model, example_input),
        params_before=params_before,
        params_after=count_params(model),
        sensitivity=picked.sensitivity,
        search=picked.search,
        target=-flops if flops is not None else None,
    )


def prune_to_flops(
    model: nn.Module,
    example_input: torch.Tensor,
    flops_reduction: float = 0.5,
    *,
    criterion: Criterion = "l1",
    finetune: Callable[[nn.Module], object] | None = None,
) -> PruneResult:
    """Uniformly prune `model` to remove `flops_reduction` of its FLOPs, then `finetune` it.

    The demo's one-liner: `prune_to_flops(student, x, 0.5, finetune=lambda m: train(m))`.
    """
    if not 0.0 < flops_reduction < 1.0:
        raise ValueError(
            f"prune_to_flops: flops_reduction is the fraction removed, in (0, 1); got "
            f"{flops_reduction}"
        )
    config = UniformPruning(flops=-flops_reduction, criterion=criterion)
    result = prune(model, config, example_input)
    if finetune is not None:
        finetune(result.model)
    return result
