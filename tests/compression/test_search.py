"""The simulated-annealing controller on toy spaces with known optima."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from lyceum.compression.search import (
    InfeasibleSearchError,
    SAConfig,
    SAController,
    SearchSpace,
)

OPTIMUM = [3, 7, 1, 8, 5, 2]


class _Space:
    """Six tokens in 0..9; feasible when their sum is at most `budget`."""

    def __init__(self, budget: int = 30) -> None:
        self.budget = budget

    def range_table(self) -> list[int]:
        return [10] * 6

    def init_tokens(self) -> list[int]:
        return [0] * 6

    def is_feasible(self, tokens: Sequence[int]) -> bool:
        return sum(tokens) <= self.budget


class _Objective:
    def __init__(self, space: _Space, scale: float = 1.0, offset: float = 0.0) -> None:
        self.space, self.scale, self.offset = space, scale, offset
        self.calls: list[list[int]] = []

    def __call__(self, tokens: Sequence[int]) -> float:
        self.calls.append(list(tokens))
        return self.offset + self.scale * -sum(
            (t - o) ** 2 for t, o in zip(tokens, OPTIMUM, strict=False)
        )


def _run(config: SAConfig, **kw: float) -> tuple[list[list[int]], list[float]]:
    space = _Space()
    objective = _Objective(space, **kw)
    result = SAController(space, config).search(objective)
    return [h["tokens"] for h in result.history], [h["reward"] for h in result.history]


def test_space_satisfies_protocol() -> None:
    assert isinstance(_Space(), SearchSpace)


def test_same_seed_same_search_different_seed_differs() -> None:
    a = _run(SAConfig(max_iterations=60, seed=1))
    b = _run(SAConfig(max_iterations=60, seed=1))
    c = _run(SAConfig(max_iterations=60, seed=2))
    assert a == b
    assert a[0] != c[0]


def test_infeasible_candidates_are_never_evaluated() -> None:
    space = _Space(budget=12)  # the optimum (sum 26) is infeasible: the search presses on the bound
    objective = _Objective(space)
    SAController(space, SAConfig(max_iterations=200, seed=0)).search(objective)
    assert len(objective.calls) == 201
    assert all(sum(t) <= 12 for t in objective.calls)


def test_finds_known_optimum_of_toy_objective() -> None:
    space = _Space()
    result = SAController(space, SAConfig(max_iterations=400, seed=0)).search(_Objective(space))
    # Start is 148 away (sum of squares); the optimum is 0.
    assert result.best_reward >= -2
    assert sum(abs(t - o) for t, o in zip(result.best_tokens, OPTIMUM, strict=False)) <= 2


def test_acceptance_is_invariant_to_reward_units() -> None:
    # Temperature is relative to the running reward spread, so accuracies in [0, 1] and
    # percentages search identically (PaddleSlim's absolute temperature would not).
    config = SAConfig(max_iterations=80, seed=3)
    tokens_unit, _ = _run(config, scale=1.0)
    tokens_milli, _ = _run(config, scale=1e-3, offset=0.9)
    assert tokens_unit == tokens_milli


def test_worse_moves_are_accepted_early_rarely_late() -> None:
    space = _Space()
    result = SAController(space, SAConfig(max_iterations=300, seed=0)).search(_Objective(space))
    history = result.history[1:]
    rewards = [h["reward"] for h in result.history]
    worse_accepted = [
        h["accepted"] and h["reward"] < max(rewards[: i + 1]) - 1e-12 for i, h in enumerate(history)
    ]
    assert any(worse_accepted[:100])
    assert sum(worse_accepted[200:]) < sum(worse_accepted[:100])


class _Interrupt(Exception):
    pass


def test_resume_from_state_continues_identically(tmp_path: Path) -> None:
    config = SAConfig(max_iterations=50, seed=7)
    reference = _run(config)

    state = tmp_path / "sa.json"
    space = _Space()
    calls = 0

    def flaky(tokens: Sequence[int]) -> float:
        nonlocal calls
        calls += 1
        if calls == 23:
            raise _Interrupt
        return -sum((t - o) ** 2 for t, o in zip(tokens, OPTIMUM, strict=False))

    with pytest.raises(_Interrupt):
        SAController(space, config, state_path=state).search(flaky)
    saved = json.loads(state.read_text())
    assert len(saved["history"]) == 22
    resumed = SAController(space, config, state_path=state).search(_Objective(space))
    assert [h["tokens"] for h in resumed.history] == reference[0]
    assert [h["reward"] for h in resumed.history] == reference[1]
    assert not list(tmp_path.glob(".*tmp"))


def test_resume_with_larger_budget_extends_search(tmp_path: Path) -> None:
    space = _Space()
    state = tmp_path / "sa.json"
    SAController(space, SAConfig(max_iterations=20, seed=4), state_path=state).search(
        _Objective(space)
    )
    objective = _Objective(space)
    extended = SAController(space, SAConfig(max_iterations=30, seed=4), state_path=state)
    result = extended.search(objective)
    assert len(objective.calls) == 10
    assert len(result.history) == 31
    assert [h["tokens"] for h in result.history] == _run(SAConfig(max_iterations=30, seed=4))[0]


def test_resume_refuses_different_settings(tmp_path: Path) -> None:
    space = _Space()
    state = tmp_path / "sa.json"
    SAController(space, SAConfig(max_iterations=3, seed=1), state_path=state).search(
        _Objective(space)
    )
    with pytest.raises(ValueError, match="saved config"):
        SAController(space, SAConfig(max_iterations=3, seed=2), state_path=state)


def test_init_tokens_are_used_and_validated() -> None:
    space = _Space()
    objective = _Objective(space)
    SAController(space, SAConfig(max_iterations=0), init_tokens=[*OPTIMUM[:5], 0]).search(objective)
    assert objective.calls == [[3, 7, 1, 8, 5, 0]]
    with pytest.raises(ValueError, match="token 2 is 10, outside its range"):
        SAController(space, init_tokens=[0, 0, 10, 0, 0, 0])
    with pytest.raises(ValueError, match="violate the constraint"):
        SAController(space, init_tokens=[9, 9, 9, 9, 0, 0]).search(objective)


def test_no_feasible_neighbour_raises_clear_error() -> None:
    class Stuck(_Space):
        def is_feasible(self, tokens: Sequence[int]) -> bool:
            return list(tokens) == [0] * 6

    space = Stuck()
    controller = SAController(space, SAConfig(max_iterations=5, max_resample=20))
    with pytest.raises(
        InfeasibleSearchError, match=r"no feasible neighbour of \[0, 0, 0, 0, 0, 0\] in 20 draws"
    ):
        controller.search(_Objective(space))


def test_bad_config_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="reduce_rate"):
        SAConfig(reduce_rate=1.5)
    with pytest.raises(ValueError, match="extra"):
        SAConfig.model_validate({"temperature": 3})


def test_tied_rewards_then_a_worse_one_do_not_divide_by_zero() -> None:
    # Accuracies often tie: every earlier delta 0 leaves the running spread at 0.
    controller = SAController(_Space(), SAConfig(seed=0))
    for reward in (0.5, 0.5, 0.5):
        controller.update(controller.propose(), reward)
    accepted = controller.update(controller.propose(), 0.4)
    assert isinstance(accepted, bool)
    assert controller.history[-1]["reward"] == 0.4
