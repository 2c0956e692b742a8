"""Regularized evolution on the toy space of test_search: the population replayed by hand,
rebuilt from storage alone, budgets and twins as the SA sampler has them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from lyceum.compression.search import (
    DRAW_ATTR,
    EvolutionSampler,
    SAConfig,
    StudyConfig,
    StudyTrials,
    draw_attr,
    open_study,
    run_search,
)
from lyceum.compression.search.chain import mutate, seeded_rng

OPTIMUM = [3, 7, 1, 8, 5, 2]
TABLE = [10] * 6


class _Space:
    """Six tokens in 0..9; feasible when their sum is at most `budget`."""

    def __init__(self, budget: int = 30) -> None:
        self.budget = budget

    def range_table(self) -> list[int]:
        return list(TABLE)

    def init_tokens(self) -> list[int]:
        return [0] * 6

    def is_feasible(self, tokens: Sequence[int]) -> bool:
        return sum(tokens) <= self.budget


class _Objective:
    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def __call__(self, tokens: Sequence[int]) -> float:
        self.calls.append(list(tokens))
        return -float(sum((t - o) ** 2 for t, o in zip(tokens, OPTIMUM, strict=True)))


def _config(**kw: int) -> SAConfig:
    return SAConfig(method="evolution", **{"max_iterations": 60, "population": 8, **kw})


def _first_untaken(draws: Sequence[list[int]], taken: set[tuple[int, ...]]) -> list[int]:
    return next(d for d in draws if sum(d) <= 30 and tuple(d) not in taken)


def test_every_trial_is_the_draw_the_population_before_it_gives(tmp_path: Path) -> None:
    config = _config(seed=2, tournament=3)
    study = StudyConfig(storage=str(tmp_path / "s.db"), study="evo")
    history = run_search(_Space(), _Objective(), config, study=study, progress=False).history
    assert len(history) == 61 and history[0]["tokens"] == [0] * 6
    assert all(h["accepted"] is None and h["cached_from"] is None for h in history)
    # By hand, trial after trial (one worker: each trial saw all trials before it finished).
    taken: set[tuple[int, ...]] = {(0,) * 6}
    for h in history[1:]:
        n = h["number"]
        if n < config.population:
            rngs = (seeded_rng(2, "founder", n, a) for a in range(300))
            draws = [[rng.randrange(10) for _ in TABLE] for rng in rngs]
        else:
            population = history[n - config.population : n]  # the latest 8, oldest gone
            draws = []
            for a in range(300):
                rng = seeded_rng(2, "tournament", n, a)
                drawn = rng.sample(population, 3)
                parent = max(drawn, key=lambda p: (p["reward"], -p["number"]))
                changes = 1 + sum(tuple(d) in taken for d in draws) // 16
                draws.append(mutate(parent["tokens"], TABLE, rng, changes))
                if sum(draws[-1]) <= 30 and tuple(draws[-1]) not in taken:
                    break
        assert h["tokens"] == _first_untaken(draws, taken), n
        taken.add(tuple(h["tokens"]))
    # A fresh sampler proposes from the storage alone what this worker would next.
    trials = StudyTrials(open_study(study), TABLE)
    trials.refresh()
    assert [t.number for t in EvolutionSampler(_Space(), config).population(trials)] == list(
        range(53, 61)
    )
    again = EvolutionSampler(_Space(), config).propose(trials, 61)
    memory = run_search(
        _Space(), _Objective(), config.model_copy(update={"max_iterations": 61}), progress=False
    )
    assert memory.history[:61] == history
    assert again[0] == memory.history[61]["tokens"]


def test_evolution_finds_the_toy_optimum_and_evaluates_each_candidate_once() -> None:
    objective = _Objective()
    result = run_search(_Space(), objective, _config(max_iterations=300, seed=0), progress=False)
    assert len(result.history) == 301
    assert len({tuple(c) for c in objective.calls}) == len(objective.calls) == 301
    # The start is 152 away (sum of squares); the optimum is 0.
    assert result.best_reward >= -2


def test_evolution_never_evaluates_an_infeasible_candidate_and_counts_redraws() -> None:
    objective = _Objective()
    space = _Space(budget=12)  # the optimum (sum 26) is over budget: the search presses on it
    result = run_search(space, objective, _config(max_iterations=100, seed=1), progress=False)
    assert all(sum(t) <= 12 for t in objective.calls)
    assert result.redraws > 0


def test_a_study_resumes_only_with_the_method_it_was_searched_with(tmp_path: Path) -> None:
    study = StudyConfig(storage=str(tmp_path / "s.db"), study="evo")
    run_search(_Space(), _Objective(), _config(max_iterations=10), study=study, progress=False)
    longer = _config(max_iterations=20)
    resumed = run_search(_Space(), _Objective(), longer, study=study, progress=False)
    assert resumed.history == run_search(_Space(), _Objective(), longer, progress=False).history
    with pytest.raises(ValueError, match=r"saved chain .*'method': 'evolution'.* differs"):
        run_search(_Space(), _Objective(), SAConfig(max_iterations=20), study=study)
    with pytest.raises(ValueError, match=r"saved chain .*'population': 8.* differs"):
        run_search(_Space(), _Objective(), _config(population=9), study=study)


def test_a_tournament_larger_than_the_population_is_refused() -> None:
    with pytest.raises(ValueError, match="tournament 5 exceeds population 4"):
        SAConfig(method="evolution", population=4, tournament=5)


def test_the_population_takes_a_trial_that_finishes_late_in_its_place(tmp_path: Path) -> None:
    study = open_study(StudyConfig(storage=str(tmp_path / "s.db"), study="evo"))
    trials = StudyTrials(study, TABLE)
    late = None
    for n in range(6):
        trial = study.ask()
        study._storage.set_trial_system_attr(trial._trial_id, DRAW_ATTR, draw_attr([n] * 6, 0))
        if n == 3:
            late = trial  # left running while the later ones complete
        else:
            study.tell(trial, -float(n))
    trials.refresh()
    sampler = EvolutionSampler(_Space(), _config(population=3, tournament=2))
    assert [t.number for t in sampler.population(trials)] == [2, 4, 5]
    assert late is not None
    study.tell(late, -3.0)
    trials.refresh()
    # Finished late, it is still younger than trial 2: the oldest member gives way.
    assert [t.number for t in sampler.population(trials)] == [3, 4, 5]
