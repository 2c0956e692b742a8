"""Automatic pruning: per-group ratios as a `SearchSpace` for the simulated-annealing controller.

Token `i` is the ratio of group `i` on the grid 0, step, 2*step, ... up to `max_layer_ratio`.
Feasibility is the FLOPs window (and optionally a latency bound), checked on a pruned copy;
FLOPs depend only on which channels each group keeps, and a group's selection grows with its
ratio, so results are cached by the number of channels each group loses.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lyceum.compression.analysis import count_flops, measure_latency
from lyceum.compression.pruning._graph import ChannelGraph, Criterion, prune_by_ratios
from lyceum.compression.pruning.config import AutoPruning


class FlopsOracle:
    """FLOPs (and latency) of `model` pruned by per-group ratios, cached by channel counts."""

    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        graph: ChannelGraph,
        criterion: Criterion,
    ) -> None:
        self.model = model
        self.example_input = example_input
        self.graph = graph
        self.groups = graph.groups
        self.criterion = criterion
        self.base_flops = count_flops(model, example_input)
        self._cache: dict[tuple[int, ...], tuple[int, float | None]] = {}

    def _counts(self, ratios: dict[str, float]) -> tuple[int, ...]:
        return tuple(
            len(self.graph.select(g, ratios.get(g.name, 0.0), self.criterion)) for g in self.groups
        )

    def pruned(self, ratios: dict[str, float]) -> nn.Module:
        candidate = copy.deepcopy(self.model)
        prune_by_ratios(candidate, self.example_input, ratios, self.criterion, graph=self.graph)
        return candidate

    def reduction(self, ratios: dict[str, float]) -> float:
        """Fraction of FLOPs removed by `ratios`."""
        key = self._counts(ratios)
        if key not in self._cache:
            self._cache[key] = (count_flops(self.pruned(ratios), self.example_input), None)
        return 1.0 - self._cache[key][0] / self.base_flops

    def latency_ms(self, ratios: dict[str, float]) -> float:
        """Median latency of the pruned model in ms (1 thread), measured once per counts."""
        key = self._counts(ratios)
        flops, latency = self._cache.get(key, (None, None))
        if latency is None:
            pruned = self.pruned(ratios)
            latency = 1000.0 * measure_latency(pruned, self.example_input, runs=30, warmup=5)
            self._cache[key] = (
                flops if flops is not None else count_flops(pruned, self.example_input),
                latency,
            )
        return latency


class PruningSpace:
    """Per-group pruning ratios as tokens; feasible when the FLOPs/latency constraint holds."""

    def __init__(self, oracle: FlopsOracle, config: AutoPruning) -> None:
        self.oracle = oracle
        self.config = config
        n = int(config.max_layer_ratio / config.ratio_step + 1e-9) + 1
        self.grid = [round(i * config.ratio_step, 6) for i in range(n)]

    def ratios(self, tokens: Sequence[int]) -> dict[str, float]:
        return {g.name: self.grid[t] for g, t in zip(self.oracle.groups, tokens, strict=True)}

    def range_table(self) -> list[int]:
        return [len(self.grid)] * len(self.oracle.groups)

    def is_feasible(self, tokens: Sequence[int]) -> bool:
        ratios = self.ratios(tokens)
        if not self.config.min_ratio <= self.oracle.reduction(ratios) <= self.config.max_ratio:
            return False
        limit = self.config.max_latency_ms
        return limit is None or self.oracle.latency_ms(ratios) <= limit

    def init_tokens(self) -> list[int]:
        """A feasible start: the largest uniform grid ratio below the window, then greedy steps.

        Each greedy step raises the one token that brings the FLOPs reduction closest to the
        window without passing its upper bound; a uniform ratio alone rarely lands inside a
        narrow window.
        """
        n = len(self.oracle.groups)
        tokens = [0] * n
        for t in range(len(self.grid)):
            if self.oracle.reduction(self.ratios([t] * n)) > self.config.max_ratio:
                break
            tokens = [t] * n
            if self.is_feasible(tokens):
                return tokens
        for _ in range(n * len(self.grid)):
            if self.is_feasible(tokens):
                return tokens
            options = []
            for i in range(n):
                if tokens[i] + 1 < len(self.grid):
                    trial = [*tokens[:i], tokens[i] + 1, *tokens[i + 1 :]]
                    reduction = self.oracle.reduction(self.ratios(trial))
                    if reduction <= self.config.max_ratio:
                        options.append((reduction, i, trial))
            if not options:
                break
            tokens = max(options)[2]
        raise ValueError(
            f"AutoPruning: found no feasible start for FLOPs window [{self.config.min_ratio}, "
            f"{self.config.max_ratio}] (latency bound {self.config.max_latency_ms} ms) on a "
            f"{self.config.ratio_step} ratio grid; widen the window, refine ratio_step or pass "
            "init_tokens"
        )


def make_objective(
    oracle: FlopsOracle,
    space: PruningSpace,
    evaluate: Callable[[nn.Module], float],
    candidate_finetune: Callable[[nn.Module], object] | None,
) -> Callable[[Sequence[int]], float]:
    """Reward of tokens: prune a copy, fine-tune it briefly if asked, evaluate."""

    def objective(tokens: Sequence[int]) -> float:
        candidate = oracle.pruned(space.ratios(tokens))
        if candidate_finetune is not None:
            candidate_finetune(candidate)
        return float(evaluate(candidate))

    return objective
