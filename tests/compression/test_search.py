"""The search engine on toy spaces with known optima: the SA chain, its samplers, the study."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

import lyceum.compression.search.study as search_study
from lyceum.compression.search import (
    CACHED_ATTR,
    DRAW_ATTR,
    InfeasibleSearchError,
    SAChain,
    SAConfig,
    SASampler,
    SearchSpace,
    StudyConfig,
    StudyTrials,
    draw_attr,
    fail_stale_trials,
    open_study,
    param_names,
    run_search,
    trial_tokens,
)
from tests._support.waiting import wait_until

OPTIMUM = [3, 7, 1, 8, 5, 2]


class _Space:
    """Six tokens in 0..9; feasible when their sum is at most `budget`."""

    def __init__(self, budget: int = 30) -> None:
        self.budget = budget
        self.checked = 0

    def range_table(self) -> list[int]:
        return [10] * 6

    def init_tokens(self) -> list[int]:
        return [0] * 6

    def is_feasible(self, tokens: Sequence[int]) -> bool:
        self.checked += 1
        return sum(tokens) <= self.budget


class _Objective:
    def __init__(self, scale: float = 1.0, offset: float = 0.0) -> None:
        self.scale, self.offset = scale, offset
        self.calls: list[list[int]] = []

    def __call__(self, tokens: Sequence[int]) -> float:
        self.calls.append(list(tokens))
        return self.offset + self.scale * -sum(
            (t - o) ** 2 for t, o in zip(tokens, OPTIMUM, strict=True)
        )


def _tokens(config: SAConfig, **kw: float) -> list[list[int]]:
    result = run_search(_Space(), _Objective(**kw), config, progress=False)
    return [h["tokens"] for h in result.history]


class _Uneven(_Space):
    """Tokens of 2, 1, 4, 3, 1 and 10 values: two tokens can take only 0."""

    TABLE = (2, 1, 4, 3, 1, 10)

    def range_table(self) -> list[int]:
        return list(self.TABLE)


def test_proposals_stay_within_each_tokens_range() -> None:
    space: SearchSpace = _Uneven(budget=100)  # typed as the protocol: mypy checks the fit
    result = run_search(space, _Objective(), SAConfig(max_iterations=150, seed=0), progress=False)
    proposals = [h["tokens"] for h in result.history]
    assert len(proposals) == 151
    for tokens in proposals:
        assert all(0 <= t < n for t, n in zip(tokens, _Uneven.TABLE, strict=True)), tokens
    values = [sorted({tokens[i] for tokens in proposals}) for i in range(6)]
    assert values[1] == values[4] == [0]  # a one-value token never moves
    assert len(values[5]) > 2  # the wide token is explored


def test_same_seed_same_search_different_seed_differs() -> None:
    a = _tokens(SAConfig(max_iterations=60, seed=1))
    assert a == _tokens(SAConfig(max_iterations=60, seed=1))
    assert a != _tokens(SAConfig(max_iterations=60, seed=2))
    assert len(a) == 61 and a[0] == [0] * 6


def test_infeasible_candidates_are_never_evaluated_and_redraws_are_counted() -> None:
    space = _Space(budget=12)  # the optimum (sum 26) is infeasible: the search presses on the bound
    objective = _Objective()
    result = run_search(space, objective, SAConfig(max_iterations=200, seed=0), progress=False)
    assert len(result.history) == 201
    assert objective.calls and all(sum(t) <= 12 for t in objective.calls)
    assert result.redraws > 0
    assert result.redraws == sum(h["redraws"] for h in result.history)


def test_a_revisited_candidate_is_not_evaluated_twice() -> None:
    objective = _Objective()
    result = run_search(_Space(), objective, SAConfig(max_iterations=150, seed=0), progress=False)
    assert len({tuple(c) for c in objective.calls}) == len(objective.calls)
    cached = [h for h in result.history if h["cached_from"] is not None]
    by_number = {h["number"]: h for h in result.history}
    for h in cached:
        assert by_number[h["cached_from"]]["tokens"] == h["tokens"]
        assert by_number[h["cached_from"]]["reward"] == h["reward"]
    assert len(objective.calls) + len(cached) == 151


def test_finds_known_optimum_of_toy_objective() -> None:
    result = run_search(
        _Space(), _Objective(), SAConfig(max_iterations=300, seed=0), progress=False
    )
    # Start is 152 away (sum of squares); the optimum is 0.
    assert result.best_reward >= -2
    assert sum(abs(t - o) for t, o in zip(result.best_tokens, OPTIMUM, strict=True)) <= 2


def test_acceptance_is_invariant_to_reward_units() -> None:
    # Temperature is relative to the running reward spread, so accuracies in [0, 1] and
    # percentages search identically (PaddleSlim's absolute temperature would not).
    config = SAConfig(max_iterations=80, seed=3)
    assert _tokens(config, scale=1.0) == _tokens(config, scale=1e-3, offset=0.9)


def test_worse_moves_are_accepted_early_rarely_late() -> None:
    result = run_search(
        _Space(), _Objective(), SAConfig(max_iterations=300, seed=0), progress=False
    )
    rewards = [h["reward"] for h in result.history]
    worse_accepted = [
        h["accepted"] and h["reward"] < max(rewards[:i]) - 1e-12
        for i, h in enumerate(result.history)
        if i > 0
    ]
    assert any(worse_accepted[:100])
    assert sum(worse_accepted[200:]) < sum(worse_accepted[:100])


def test_chain_rebuilt_from_storage_equals_the_in_memory_chain(tmp_path: Path) -> None:
    config = SAConfig(max_iterations=20, seed=5)
    memory = run_search(_Space(), _Objective(), config, progress=False)
    study = StudyConfig(storage=str(tmp_path / "s.db"), study="toy")
    stored = run_search(_Space(), _Objective(), config, study=study, progress=False)
    assert stored.history == memory.history
    # One worker's chain, driven in memory by hand through the same updates...
    by_hand = SAChain([10] * 6, [0] * 6, seed=5, init_temperature=1.0, reduce_rate=0.9)
    accepted = [by_hand.update(h["number"], h["tokens"], h["reward"]) for h in memory.history]
    assert accepted == [h["accepted"] for h in memory.history]
    # ...equals the chain a fresh sampler rebuilds from the storage alone.
    trials = open_study(study).get_trials()
    assert SASampler(_Space(), config).chain(trials) == by_hand
    assert by_hand.best_tokens == stored.best_tokens


class _Stop(Exception):
    pass


def test_a_stopped_search_resumes_from_storage_and_continues_identically(tmp_path: Path) -> None:
    config = SAConfig(max_iterations=25, seed=7)
    reference = run_search(_Space(), _Objective(), config, progress=False)
    study = StudyConfig(storage=str(tmp_path / "s.db"), study="toy")

    def stop_after_12(entry: dict) -> None:
        if entry["number"] == 11:
            raise _Stop

    with pytest.raises(_Stop):
        run_search(
            _Space(), _Objective(), config, study=study, on_trial=stop_after_12, progress=False
        )
    objective = _Objective()
    resumed = run_search(_Space(), objective, config, study=study, progress=False)
    assert resumed.history == reference.history
    assert len(objective.calls) == sum(h["cached_from"] is None for h in reference.history[12:])


def test_resume_with_larger_budget_extends_the_search(tmp_path: Path) -> None:
    study = StudyConfig(storage=str(tmp_path / "s.db"), study="toy")
    run_search(
        _Space(), _Objective(), SAConfig(max_iterations=10, seed=4), study=study, progress=False
    )
    result = run_search(
        _Space(), _Objective(), SAConfig(max_iterations=15, seed=4), study=study, progress=False
    )
    assert (
        result.history
        == run_search(
            _Space(), _Objective(), SAConfig(max_iterations=15, seed=4), progress=False
        ).history
    )


def test_resume_refuses_different_settings(tmp_path: Path) -> None:
    study = StudyConfig(storage=str(tmp_path / "s.db"), study="toy")
    run_search(
        _Space(), _Objective(), SAConfig(max_iterations=3, seed=1), study=study, progress=False
    )
    with pytest.raises(ValueError, match=r"study 'toy': saved chain .* differs"):
        run_search(_Space(), _Objective(), SAConfig(max_iterations=3, seed=2), study=study)

    class Wider(_Space):
        def range_table(self) -> list[int]:
            return [11] * 6

    with pytest.raises(ValueError, match=r"saved range_table \[10, 10"):
        run_search(Wider(), _Objective(), SAConfig(max_iterations=3, seed=1), study=study)


def test_a_trial_without_heartbeat_is_failed_and_its_candidate_retried(tmp_path: Path) -> None:
    config = SAConfig(max_iterations=5, seed=0)
    study_config = StudyConfig(
        storage=str(tmp_path / "s.db"), study="toy", heartbeat_interval=0.1, grace_period=0.5
    )
    run_search(_Space(), _Objective(), config, study=study_config, progress=False)
    # A worker that drew a candidate and died: the trial stays RUNNING with no heartbeat.
    sampler = SASampler(_Space(), config)
    study = open_study(study_config, sampler)
    dead = study.ask()
    tokens = [int(dead.relative_params[n]) for n in param_names([10] * 6)]
    assert fail_stale_trials(study, grace_period=3600) == []
    failed = wait_until(
        lambda: fail_stale_trials(study, grace_period=0.5), "the dead trial judged stale"
    )
    assert failed == [dead.number]
    objective = _Objective()
    result = run_search(
        _Space(), objective, config.model_copy(update={"max_iterations": 7}), study=study_config
    )
    # Handed out again first, and trained once.
    assert objective.calls[0] == tokens
    retry = open_study(study_config).trials[dead.number + 1]
    assert retry.state == TrialState.COMPLETE and trial_tokens(retry, [10] * 6) == tokens
    assert len(result.history) == 8


def test_init_tokens_are_used_and_validated() -> None:
    objective = _Objective()
    config = SAConfig(max_iterations=0)
    run_search(_Space(), objective, config, init_tokens=[*OPTIMUM[:5], 0], progress=False)
    assert objective.calls == [[3, 7, 1, 8, 5, 0]]
    with pytest.raises(ValueError, match="token 2 is 10, outside its range"):
        run_search(_Space(), objective, config, init_tokens=[0, 0, 10, 0, 0, 0])
    with pytest.raises(ValueError, match="violate the constraint"):
        run_search(_Space(), objective, config, init_tokens=[9, 9, 9, 9, 0, 0])


def test_no_feasible_neighbour_raises_clear_error() -> None:
    class Stuck(_Space):
        def is_feasible(self, tokens: Sequence[int]) -> bool:
            return list(tokens) == [0] * 6

    with pytest.raises(
        InfeasibleSearchError,
        match=r"no feasible candidate for trial 1 in 20 draws around \[0, 0, 0, 0, 0, 0\]",
    ):
        run_search(Stuck(), _Objective(), SAConfig(max_iterations=5, max_resample=20))


_OTHER_SAMPLERS = pytest.mark.parametrize(
    "sampler",
    [
        optuna.samplers.RandomSampler(seed=0),
        optuna.samplers.TPESampler(seed=0, n_startup_trials=5),  # multivariate in Optuna 5
        optuna.samplers.TPESampler(seed=0, multivariate=False),
    ],
    ids=["random", "tpe", "tpe-independent"],
)


@_OTHER_SAMPLERS
def test_other_samplers_draw_only_feasible_candidates(sampler: optuna.samplers.BaseSampler) -> None:
    objective = _Objective()
    result = run_search(
        _Space(budget=26), objective, SAConfig(max_iterations=30), sampler=sampler, progress=False
    )
    assert len(result.history) == 31
    assert all(sum(t) <= 26 for t in objective.calls)
    assert result.redraws > 0  # random draws from 0..9 x 6 (mean sum 27) are often over 26
    assert all(h["accepted"] is None for h in result.history)


def test_a_joint_proposal_is_used_where_the_inner_sampler_makes_one() -> None:
    proposals: list[tuple[int, ...]] = []

    class Recording(optuna.samplers.TPESampler):
        def sample_relative(
            self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]
        ) -> dict[str, Any]:
            params = super().sample_relative(study, trial, search_space)
            if params:
                proposals.append(tuple(params[name] for name in sorted(params)))
            return params

    inner = Recording(seed=0, multivariate=True, n_startup_trials=5)
    config = SAConfig(max_iterations=15)
    result = run_search(_Space(budget=40), _Objective(), config, sampler=inner, progress=False)
    # Past the startup trials, multivariate TPE's joint draws are the candidates.
    assert proposals
    assert {tuple(h["tokens"]) for h in result.history[5:]} & set(proposals)


class _Tiny(_Space):
    """Two tokens of three values: nine candidates, six of them feasible (sum <= 2)."""

    def range_table(self) -> list[int]:
        return [3, 3]

    def init_tokens(self) -> list[int]:
        return [0, 0]

    def is_feasible(self, tokens: Sequence[int]) -> bool:
        return sum(tokens) <= 2


@_OTHER_SAMPLERS
def test_other_samplers_draw_a_taken_candidate_only_when_none_is_left(
    sampler: optuna.samplers.BaseSampler,
) -> None:
    calls: list[tuple[int, ...]] = []

    def objective(tokens: Sequence[int]) -> float:
        calls.append(tuple(tokens))
        return float(tokens[0])

    config = SAConfig(max_iterations=7)
    result = run_search(_Tiny(), objective, config, sampler=sampler, progress=False)
    # The six feasible candidates each evaluated once, then two copies: none left to draw.
    assert sorted(calls) == [
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0)
    ]  # fmt: skip
    assert [h["cached_from"] is not None for h in result.history] == [False] * 6 + [True] * 2


def test_bad_config_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="reduce_rate"):
        SAConfig(reduce_rate=1.5)
    with pytest.raises(ValueError, match="extra"):
        SAConfig.model_validate({"temperature": 3})
    with pytest.raises(ValueError, match=r"grace_period 1\.0 s must exceed heartbeat_interval"):
        StudyConfig(heartbeat_interval=2, grace_period=1)
    with pytest.raises(ValueError, match=r"directory .*nowhere does not exist"):
        run_search(_Space(), _Objective(), study=StudyConfig(storage="/nowhere/s.db"))


def test_tied_rewards_then_a_worse_one_do_not_divide_by_zero() -> None:
    # Accuracies often tie: every earlier delta 0 leaves the running spread at 0.
    chain = SAChain([10] * 6, [0] * 6)
    for number, reward in enumerate((0.5, 0.5, 0.5)):
        chain.update(number, chain.neighbour(number, 0), reward)
    assert isinstance(chain.update(3, chain.neighbour(3, 0), 0.4), bool)
    assert chain.spread > 0 and chain.moves == 3


def test_an_objective_error_fails_the_trial_and_propagates(tmp_path: Path) -> None:
    study = StudyConfig(storage=str(tmp_path / "s.db"), study="toy")

    def broken(tokens: Sequence[int]) -> float:
        raise RuntimeError("no data")

    with pytest.raises(RuntimeError, match="no data"):
        run_search(_Space(), broken, study=study, progress=False)
    [trial] = open_study(study).trials
    assert trial.state == TrialState.FAIL
    assert trial.system_attrs["lyceum:error"] == "RuntimeError: no data"
    assert CACHED_ATTR not in trial.system_attrs
    assert trial.system_attrs[DRAW_ATTR] == {"tokens": [0] * 6, "redraws": 0}


def test_progress_counts_the_studys_trials_and_resumes_from_storage(
    tmp_path: Path, progress_lines
) -> None:
    study = StudyConfig(storage=str(tmp_path / "s.db"), study="toy")
    run_search(_Space(), _Objective(), SAConfig(max_iterations=5, seed=0), study=study)
    first = [line for line in progress_lines() if line.startswith("search:")]
    assert first[-1].startswith("search: 6/6 trial (100%), ") and "best=" in first[-1]
    run_search(_Space(), _Objective(), SAConfig(max_iterations=8, seed=0), study=study)
    assert [x for x in progress_lines() if x.startswith("search:")][-1].startswith(
        "search: 9/9 trial (100%), "
    )
    summaries = [line for line in progress_lines() if line.startswith("trial ")]
    assert len(summaries) == 9
    assert summaries[0].startswith("trial 0: reward -152.0000, tokens 0,0,0,0,0,0, 0 redraws;")


class _CountingStorage(optuna.storages.InMemoryStorage):
    """An in-memory storage that counts the calls a search makes of it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def get_all_trials(self, *args: Any, **kwargs: Any) -> list[FrozenTrial]:
        self.calls["get_all_trials"] += 1
        return super().get_all_trials(*args, **kwargs)

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        drawn = template_trial is not None and DRAW_ATTR in template_trial.system_attrs
        self.calls["create_new_trial" + (f" with {DRAW_ATTR}" if drawn else "")] += 1
        return super().create_new_trial(study_id, template_trial)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        self.calls["get_trial"] += 1
        return super().get_trial(trial_id)

    def set_trial_param(self, *args: Any, **kwargs: Any) -> None:
        self.calls["set_trial_param"] += 1
        super().set_trial_param(*args, **kwargs)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.calls[f"set_trial_system_attr {key}"] += 1
        super().set_trial_system_attr(trial_id, key, value)


def _calls(trials: int, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    storage = _CountingStorage()
    monkeypatch.setattr(search_study, "open_storage", lambda url: storage)
    # All-zero rewards: no candidate is ever revisited, so no trial copies a twin's reward.
    run_search(_Space(), lambda tokens: 0.0, SAConfig(max_iterations=trials - 1), progress=False)
    return storage.calls


def test_a_trial_is_created_with_its_candidate_and_reads_the_study_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The difference between 20 trials and 10 is what 10 trials cost, whatever a search's
    # fixed cost (opening, the result) is. Before: 6 parameter writes + a redraws attribute
    # per trial (30 + 1 on the Light-NAS space) and 6 listings; then Optuna's ask (a listing
    # of the waiting trials and a read of the new one), a DRAW_ATTR write and 3 listings.
    per_10 = _calls(20, monkeypatch) - _calls(10, monkeypatch)
    assert per_10 == Counter(
        {
            f"create_new_trial with {DRAW_ATTR}": 10,  # the trial and its candidate, one write
            "get_trial": 10,  # its number (a relational storage returns it with the write)
            # The loop's refresh. One worker: nobody created a trial in between, so the twin
            # check reads nothing more.
            "get_all_trials": 10,
        }
    )


def test_a_study_written_with_per_token_params_resumes_identically(tmp_path: Path) -> None:
    # Studies of the code before DRAW_ATTR hold each token as an Optuna parameter.
    config = SAConfig(max_iterations=15, seed=3)
    reference = run_search(_Space(), _Objective(), config, progress=False)
    study_config = StudyConfig(storage=str(tmp_path / "old.db"), study="toy")
    old = open_study(study_config)
    names = param_names([10] * 6)
    for h in reference.history[:8]:
        old.add_trial(
            optuna.trial.create_trial(
                params=dict(zip(names, h["tokens"], strict=True)),
                distributions={n: optuna.distributions.IntDistribution(0, 9) for n in names},
                value=h["reward"],
            )
        )
    resumed = run_search(_Space(), _Objective(), config, study=study_config, progress=False)
    keys = ("number", "tokens", "reward", "accepted")
    assert [[h[k] for k in keys] for h in resumed.history] == [
        [h[k] for k in keys] for h in reference.history
    ]
    assert resumed.best_tokens == reference.best_tokens


def test_other_samplers_also_write_per_token_params_to_learn_from(tmp_path: Path) -> None:
    study = StudyConfig(storage=str(tmp_path / "tpe.db"), study="tpe")
    run_search(
        _Space(), _Objective(), SAConfig(max_iterations=4), study=study,
        sampler=optuna.samplers.TPESampler(seed=0), progress=False,
    )  # fmt: skip
    names = param_names([10] * 6)
    for trial in open_study(study).get_trials(states=(TrialState.COMPLETE,)):
        tokens = trial.system_attrs[DRAW_ATTR]["tokens"]
        assert trial.params == dict(zip(names, tokens, strict=True))
        assert trial_tokens(trial, [10] * 6) == tokens


def _finish_trial(study: optuna.Study, trials: StudyTrials, sampler: SASampler) -> None:
    """One trial by the worker of `trials` and `sampler`, drawn and created as the loop does."""
    trials.refresh()
    tokens, redraws = sampler.propose(trials, len(trials))
    created = trials.create(
        optuna.trial.create_trial(
            state=TrialState.RUNNING, system_attrs={DRAW_ATTR: draw_attr(tokens, redraws)}
        )
    )
    reward = _Objective()(tokens)
    study._storage.set_trial_state_values(created._trial_id, TrialState.COMPLETE, [reward])


def test_a_trial_finished_by_another_worker_is_seen(tmp_path: Path) -> None:
    config = StudyConfig(storage=str(tmp_path / "s.db"), study="toy")
    mine, theirs = open_study(config), open_study(config)  # two workers: two connections
    seen = StudyTrials(mine, [10] * 6)
    seen.refresh()
    running = theirs.ask()
    theirs.tell(theirs.ask(), -1.0)
    seen.refresh()
    assert len(seen) == 2 and seen.complete == 1 and seen.best == -1.0
    assert [t.number for t in seen.live()] == [running.number]
    assert seen.finished_prefix == 0  # trial 0 still runs: nothing below it to cache
    theirs.tell(running, -0.5)  # finished after this worker read it running
    seen.refresh()
    assert seen.live() == [] and seen.complete == 2 and seen.best == -0.5
    assert seen.finished_prefix == 2
    assert seen[0].value == -0.5


@pytest.mark.parametrize("warmup", [0, 3])
def test_the_cached_chain_equals_a_rebuild_after_trials_by_two_workers(
    tmp_path: Path, warmup: int
) -> None:
    config = SAConfig(max_iterations=40, seed=2, warmup=warmup)
    study_config = StudyConfig(storage=str(tmp_path / "s.db"), study="toy")
    workers = []
    for _ in range(2):
        study = open_study(study_config)
        sampler = SASampler(_Space(), config)
        workers.append((study, sampler.trials(study), sampler))
    # A trial left running by the first worker, so the second one's trials finish above it.
    workers[0][1].refresh()
    hanging = workers[0][0].ask()
    for i in range(24):
        study, trials, sampler = workers[i % 3 // 2]  # worker 0, 0, 1, 0, 0, 1, ...
        _finish_trial(study, trials, sampler)
        if i == 12:
            workers[0][0].tell(hanging, -500.0)
    for _, trials, sampler in workers:
        trials.refresh()
        assert trials.complete == 25
        rebuilt = SASampler(_Space(), config).chain(open_study(study_config).get_trials())
        assert sampler.chain_of(trials) == rebuilt
        # 24 trials with a candidate (the hanging one, trial 0, was asked without a draw): 23
        # moves; with a warm-up, trial 1 starts the chain and trials 2 and 3 are no moves.
        assert rebuilt.moves == (23 if warmup == 0 else 21)


class _LastIsNine(_Space):
    def is_feasible(self, tokens: Sequence[int]) -> bool:
        return tokens[5] == 9


def test_a_chain_whose_every_neighbour_is_taken_moves_two_tokens() -> None:
    sampler = SASampler(_LastIsNine(), SAConfig(max_resample=300))
    current = [1, 2, 3, 4, 5, 9]
    chain = SAChain([10] * 6, current, seed=4)
    chain.update(0, current, -1.0)
    # What a study can hold: the current point and every feasible one-token move evaluated;
    # the moves of the last token are over budget, never evaluated, never taken.
    evaluated = {tuple(current), *(n for n in chain.neighbours() if n[5] == 9)}
    tokens, redraws = sampler._propose(chain, 7, lambda tokens: tokens in evaluated)
    # By hand: the first 17 one-token draws all miss; then two-token draws, the first feasible.
    ones = [chain.neighbour(7, a) for a in range(17)]
    assert all(tuple(d) in evaluated or d[5] != 9 for d in ones)
    draws = [chain.neighbour(7, a, 2) for a in range(17, 300)]
    expected = next(d for d in draws if d[5] == 9)
    assert tokens == expected
    assert sum(t != c for t, c in zip(tokens, current, strict=True)) == 2
    # The infeasible draws skipped: one-token moves of the last token, then two-token ones.
    assert redraws == sum(d[5] != 9 for d in ones) + draws.index(expected)


def test_a_chain_with_a_new_one_token_move_left_keeps_drawing_them() -> None:
    sampler = SASampler(_LastIsNine(), SAConfig(max_resample=300))
    current = [1, 2, 3, 4, 5, 9]
    chain = SAChain([10] * 6, current, seed=4)
    chain.update(0, current, -1.0)
    left = next(n for n in chain.neighbours() if n[5] == 9 and n not in {
        tuple(d) for d in (chain.neighbour(7, a) for a in range(17))
    })  # fmt: skip
    evaluated = {tuple(current), *(n for n in chain.neighbours() if n != left)}
    tokens, _ = sampler._propose(chain, 7, lambda tokens: tokens in evaluated)
    assert tuple(tokens) == left


def test_a_chain_whose_every_candidate_is_taken_settles_on_a_feasible_one() -> None:
    sampler = SASampler(_LastIsNine(), SAConfig(max_resample=300))
    current = [1, 2, 3, 4, 5, 9]
    chain = SAChain([10] * 6, current, seed=4)
    chain.update(0, current, -1.0)
    tokens, redraws = sampler._propose(chain, 7, lambda tokens: True)
    # The first feasible draw, taken as every one is: no evaluation wasted on an error.
    assert tokens == next(d for d in (chain.neighbour(7, a) for a in range(17)) if d[5] == 9)
    assert redraws == 0


def test_warmup_trials_are_random_draws_and_the_chain_starts_from_their_best(
    tmp_path: Path,
) -> None:
    config = SAConfig(max_iterations=20, seed=3, warmup=5)
    study = StudyConfig(storage=str(tmp_path / "s.db"), study="toy")
    result = run_search(_Space(), _Objective(), config, study=study, progress=False)
    history = result.history
    # By hand: trial n of 1..5 is the first feasible, untaken uniform draw of its own.
    by_hand = SAChain.of(config, [10] * 6, [0] * 6)
    taken: set[tuple[int, ...]] = {(0,) * 6}
    for h in history[1:6]:
        draws = (by_hand.random_tokens(h["number"], a) for a in range(300))
        expected = next(d for d in draws if sum(d) <= 30 and tuple(d) not in taken)
        assert h["tokens"] == expected
        taken.add(tuple(expected))
    for h in history[:6]:
        assert by_hand.update(h["number"], h["tokens"], h["reward"]) == h["accepted"]
    # Greedy over the warm-up: the chain sits on its best, no move decided, T still T0.
    best = max(history[:6], key=lambda h: h["reward"])
    assert by_hand.current_tokens == best["tokens"] and by_hand.moves == 0
    assert by_hand.temperature == config.init_temperature
    first_move = history[6]["tokens"]
    assert sum(t != c for t, c in zip(first_move, best["tokens"], strict=True)) == 1
    # The same chain rebuilt from the storage alone, and the same search in memory.
    for h in history[6:]:
        by_hand.update(h["number"], h["tokens"], h["reward"])
    assert SASampler(_Space(), config).chain(open_study(study).get_trials()) == by_hand
    assert run_search(_Space(), _Objective(), config, progress=False).history == history


def test_a_study_annealed_before_warmup_existed_resumes_as_warmup_0(tmp_path: Path) -> None:
    from lyceum.compression.nas import NASSearchConfig

    study = StudyConfig(storage=str(tmp_path / "s.db"), study="toy")
    config = SAConfig(max_iterations=4, seed=1)
    run_search(_Space(), _Objective(), config, study=study, progress=False)
    opened = open_study(study)
    saved = opened.user_attrs[search_study._CHAIN_ATTR]
    # What the code before warm-ups and evolution saved: neither `warmup` nor `method`.
    old = {k: v for k, v in saved.items() if k not in {"warmup", "method"}}
    opened.set_user_attr(search_study._CHAIN_ATTR, old)
    longer = SAConfig(max_iterations=6, seed=1)
    resumed = run_search(_Space(), _Objective(), longer, study=study, progress=False)
    assert resumed.history == run_search(_Space(), _Objective(), longer, progress=False).history
    # A NAS search's default warm-up (5, not set by hand) does not stop it resuming either.
    nas = NASSearchConfig(max_iterations=8, seed=1)
    assert nas.warmup == 5
    resumed = run_search(_Space(), _Objective(), nas, study=study, progress=False)
    plain = SAConfig(max_iterations=8, seed=1)
    assert resumed.history == run_search(_Space(), _Objective(), plain, progress=False).history
    # A warm-up asked for is one the saved chain did not have: refused, naming the setting.
    with pytest.raises(ValueError, match=r"saved chain .* \(warmup: saved 0, here 2\); use a"):
        run_search(_Space(), _Objective(), plain.model_copy(update={"warmup": 2}), study=study)


class _Folded(_Space):
    """Tokens 3 to 5 count only when token 0 is 5 or more (a once-for-all stage's idle
    blocks): below, every value of theirs names the candidate whose are 0."""

    def canonical(self, tokens: Sequence[int]) -> list[int]:
        return list(tokens) if tokens[0] >= 5 else [*tokens[:3], 0, 0, 0]


@pytest.mark.parametrize("sampler", [None, optuna.samplers.RandomSampler(seed=0)])
def test_a_canonical_space_has_each_candidate_evaluated_once(
    sampler: optuna.samplers.BaseSampler | None,
) -> None:
    space = _Folded(budget=100)
    objective = _Objective()
    config = SAConfig(max_iterations=60, seed=0)
    result = run_search(space, objective, config, sampler=sampler, progress=False)
    assert len(result.history) == 61
    # Drawn and stored as canonical tokens only, so the twin check sees every repeat.
    assert all(space.canonical(t) == t for t in objective.calls)
    assert len({tuple(t) for t in objective.calls}) == len(objective.calls)
    assert any(t[0] < 5 for t in objective.calls) and any(t[0] >= 5 for t in objective.calls)
