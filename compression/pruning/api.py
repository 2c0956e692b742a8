"""`prune(model, config, example_input, evaluate=...)`: one verb for every pruning strategy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lyceum.compression.analysis import count_flops, count_params
from lyceum.compression.pruning._graph import ChannelGraph, prune_by_ratios
from lyceum.compression.pruning.auto import FlopsOracle, PruningSpace, make_objective
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
from lyceum.compression.search import SAController, SearchResult

__all__ = ["PruneResult", "prune", "prune_to_flops"]

_BISECT_STEPS = 40
# How far (in fractions of the unpruned FLOPs) a FLOPs-targeted result may land from its
# target before it is an error rather than channel granularity.
_TARGET_TOLERANCE = 0.02


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

    @property
    def flops_reduction(self) -> float:
        """Fraction of FLOPs removed, e.g. 0.5 for -50%."""
        return 1.0 - self.flops_after / self.flops_before


def _no_metric(model: nn.Module) -> float:
    raise ValueError("prune: this strategy needs evaluate=callable(model) -> metric")


def _bisect(
    reduction_of: Callable[[float], float], target: float, hi: float
) -> tuple[float, float]:
    """The x in [0, hi] whose reduction is closest to `target` (reduction non-decreasing in x).

    FLOPs move in channel-sized steps, so the search keeps the closest point it has seen
    rather than the last one.
    """
    lo, best = 0.0, (abs(reduction_of(0.0) - target), 0.0)
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        got = reduction_of(mid)
        best = min(best, (abs(got - target), mid))
        if got < target:
            lo = mid
        else:
            hi = mid
    got = reduction_of(best[1])
    if abs(got - target) > _TARGET_TOLERANCE:
        raise ValueError(
            f"prune: cannot remove {target:.1%} of the FLOPs; the closest reachable is "
            f"{got:.1%}. Lower the target, or select more layers (include/exclude) or allow "
            "larger per-layer ratios (max_ratio)"
        )
    return best[1], got


def _uniform_ratios(oracle: FlopsOracle, config: UniformPruning) -> dict[str, float]:
    names = [g.name for g in oracle.groups]
    if config.ratio is not None:
        return dict.fromkeys(names, config.ratio)
    # UniformPruning's validator guarantees flops is set when ratio is not.
    target = -(config.flops or 0.0)
    ratio, _ = _bisect(lambda r: oracle.reduction(dict.fromkeys(names, r)), target, 0.95)
    return dict.fromkeys(names, ratio)


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
    threshold, _ = _bisect(lambda t: oracle.reduction(ratios_at(t)), -config.flops, top)
    return ratios_at(threshold)


def prune(
    model: nn.Module,
    config: PruningConfig,
    example_input: torch.Tensor,
    *,
    evaluate: Callable[[nn.Module], float] | None = None,
    candidate_finetune: Callable[[nn.Module], object] | None = None,
) -> PruneResult:
    """Prune `model` in place with `config`; channels are really removed.

    - `UniformPruning`: one ratio for every selected group (given, or bisected to `flops`).
    - `SensitivityPruning`: needs `evaluate(model) -> metric` (higher is better, e.g.
      validation accuracy); analyses each group, then picks per-group ratios.
    - `AutoPruning`: needs `evaluate`; each candidate is passed to `candidate_finetune` (a short
      fine-tune, modifying the model in place) before it is evaluated.

    Fine-tuning the result is the caller's step (see `lyceum.compression.pruning.finetune`).
    The classifier's outputs are never pruned, so output shapes are unchanged.
    """
    if isinstance(config, SensitivityPruning | AutoPruning) and evaluate is None:
        raise ValueError(
            f"prune: {type(config).__name__} scores candidates, so pass "
            "evaluate=callable(model) -> metric (higher is better)"
        )
    score: Callable[[nn.Module], float] = evaluate if evaluate is not None else _no_metric
    flops_before = count_flops(model, example_input)
    params_before = count_params(model)
    graph = ChannelGraph(model, example_input, include=config.include, exclude=config.exclude)
    if not graph.groups:
        raise ValueError(
            f"prune: no prunable groups selected (include={config.include!r}, "
            f"exclude={config.exclude!r}); check the regexes against model.named_modules()"
        )
    oracle = FlopsOracle(model, example_input, graph, config.criterion)
    sensitivity: SensitivityResult | None = None
    search: SearchResult | None = None
    if isinstance(config, UniformPruning):
        ratios = _uniform_ratios(oracle, config)
    elif isinstance(config, SensitivityPruning):
        sensitivity = analyze_sensitivity(
            model,
            example_input,
            score,
            ratios=config.ratios,
            criterion=config.criterion,
            include=config.include,
            exclude=config.exclude,
            path=config.sensitivity_file,
        )
        ratios = _sensitivity_ratios(oracle, sensitivity, config)
    elif isinstance(config, AutoPruning):
        space = PruningSpace(oracle, config)
        controller = SAController(
            space, config.search, state_path=config.state_file, init_tokens=config.init_tokens
        )
        search = controller.search(make_objective(oracle, space, score, candidate_finetune))
        ratios = space.ratios(search.best_tokens)
    else:
        raise ValueError(f"prune: unknown config type {type(config).__name__}")
    plan = prune_by_ratios(model, example_input, ratios, config.criterion)
    return PruneResult(
        model=model,
        plan=plan,
        ratios=ratios,
        flops_before=flops_before,
        flops_after=count_flops(model, example_input),
        params_before=params_before,
        params_after=count_params(model),
        sensitivity=sensitivity,
        search=search,
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
