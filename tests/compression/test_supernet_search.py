"""Searching a supernet: every candidate evaluated is within the budget; rewards need no
training (the supernet's weights are untouched by the search)."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

from lyceum.compression.nas import Budget, BudgetedSpace, SubnetReward, Supernet, search_subnet
from lyceum.compression.search import SAConfig, StudyConfig
from tests._support.supernets import tiny_space, trained_like


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    )


# Either method of the engine: annealing, and regularized evolution (once-for-all's kind).
_METHODS = pytest.mark.parametrize(
    "method", [{}, {"method": "evolution", "population": 5, "tournament": 2}]
)


@_METHODS
def test_the_search_never_evaluates_a_subnet_over_budget(method: dict[str, Any]) -> None:
    space = tiny_space(kernels=[3, 5, 7])
    net = trained_like(space)
    figures = BudgetedSpace(space).figures
    largest, smallest = (
        figures(space.tokens(c)).flops for c in (space.largest(), space.smallest())
    )
    # Between the smallest and the largest: some of the space is out, the start (largest) too.
    limit = smallest + (largest - smallest) // 3
    rng = random.Random(0)
    draws = [figures([rng.randrange(n) for n in space.range_table()]).flops for _ in range(50)]
    assert any(f > limit for f in draws) and any(f <= limit for f in draws)

    before = {k: v.clone() for k, v in net.state_dict().items()}
    reward = SubnetReward(net, _data(16, 0), _data(16, 1), batches=2, batch_size=8)
    result, budgeted = search_subnet(
        reward,
        budget=Budget(max_flops=limit),
        search=SAConfig(max_iterations=12, seed=0, **method),
        study=StudyConfig(storage=None, study="ofa"),
        progress=False,
    )
    assert len(reward.evaluated) == 13 == len(result.history)
    assert all(figures(tokens).flops <= limit for tokens in reward.evaluated)
    assert result.redraws > 0  # over-budget candidates were drawn, and skipped unevaluated
    assert budgeted.figures(result.best_tokens).flops <= limit
    assert result.best_reward == max(h["reward"] for h in result.history)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert isinstance(net, Supernet)


@_METHODS
def test_a_subnet_is_evaluated_once_whichever_tokens_reach_it(method: dict[str, Any]) -> None:
    # Depth 1 of 2 leaves a stage's second block idle: its two tokens name no new subnet.
    space = tiny_space(kernels=[3, 5, 7])
    net = trained_like(space)
    figures = BudgetedSpace(space).figures
    largest, smallest = (
        figures(space.tokens(c)).flops for c in (space.largest(), space.smallest())
    )
    limit = smallest + 2 * (largest - smallest) // 3
    reward = SubnetReward(net, _data(16, 0), _data(16, 1), batches=1, batch_size=8)
    result, budgeted = search_subnet(
        reward,
        budget=Budget(max_flops=limit),
        search=SAConfig(max_iterations=20, seed=0, **method),
        study=StudyConfig(storage=None, study="ofa"),
        progress=False,
    )
    subnets = [space.subnet(tokens).canonical(space) for tokens in reward.evaluated]
    assert len(subnets) == 21 == len(result.history)
    # Every evaluation a distinct subnet, drawn as its canonical tokens.
    assert len(set(subnets)) == len(subnets)
    assert all(space.canonical(t) == t for t in reward.evaluated)
    # Idle blocks were reached: without canonical draws some of these evaluations were twins.
    assert any(min(s.depths) < 2 for s in subnets)
    best = space.subnet(result.best_tokens)
    assert space.check(best) == best and budgeted.figures(result.best_tokens).flops <= limit
    assert result.best_reward == max(h["reward"] for h in result.history)
