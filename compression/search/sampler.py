"""Optuna samplers over a `SearchSpace`'s integer tokens that only hand out feasible candidates.

`SASampler` is simulated annealing whose chain is rebuilt from the study's trials at every draw
(`lyceum.compression.search.chain`), so it holds no state a crash could lose and every worker
sharing the study extends one chain. The replay of the trials below the lowest unfinished one is
cached (finished trials never change), so a draw costs the same with 10 or 10,000 trials in the
study, apart from the storage's own listing of its trials.

`FeasibleSampler` wraps any other Optuna sampler (random, TPE) with the same budget check, so
the searches compared in the bench differ only in how they draw.

A trial's candidate is one system attribute, `DRAW_ATTR` = {"tokens": [...], "redraws": n}
(the infeasible draws skipped before it): one storage write, where a `suggest_int` per token
was one SQLite transaction each (30 for the Light-NAS space, half of a trial's overhead).
`trial_tokens` reads it, and the per-token parameters t00, t01, ... of studies written before
it. `FeasibleSampler` also writes the per-token parameters, which its inner sampler learns from.
Both check the budget before anything is built for training.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from optuna.distributions import BaseDistribution, IntDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.trial import FrozenTrial, TrialState

from lyceum.compression.search.base import SearchSpace
from lyceum.compression.search.chain import SAChain, check_tokens
from lyceum.compression.search.config import SAConfig

if TYPE_CHECKING:
    from optuna.study import Study

__all__ = [
    "DRAW_ATTR",
    "FeasibleSampler",
    "InfeasibleSearchError",
    "SASampler",
    "param_names",
    "trial_tokens",
]

DRAW_ATTR = "lyceum:draw"


class InfeasibleSearchError(RuntimeError):
    """No feasible candidate was found within `SAConfig.max_resample` draws."""


def param_names(table: Sequence[int]) -> list[str]:
    """The Optuna parameter of each token: t00, t01, ... (sorted as the tokens are)."""
    width = len(str(len(table) - 1))
    return [f"t{i:0{width}d}" for i in range(len(table))]


def draw_attr(tokens: Sequence[int], redraws: int) -> dict[str, Any]:
    """The value of `DRAW_ATTR` for `tokens` drawn after `redraws` infeasible draws."""
    return {"tokens": [int(t) for t in tokens], "redraws": int(redraws)}


def _distributions(table: Sequence[int]) -> dict[str, BaseDistribution]:
    return {
        name: IntDistribution(0, n - 1) for name, n in zip(param_names(table), table, strict=True)
    }


def trial_tokens(trial: FrozenTrial, table: Sequence[int]) -> list[int] | None:
    """The tokens of `trial`, if it has them: its `DRAW_ATTR`, else (a study written before
    there was one) its per-token params or the params it was enqueued with."""
    drawn = trial.system_attrs.get(DRAW_ATTR)
    if drawn is not None:
        return list(drawn["tokens"])
    params = trial.params or trial.system_attrs.get("fixed_params") or {}
    names = param_names(table)
    if not all(n in params for n in names):
        return None
    return [int(params[n]) for n in names]


class _TokenSampler(BaseSampler):
    """The part both samplers share: the search space is the space's tokens, a trial enqueued
    with its candidate (a retry) keeps it, and a new draw is written as one `DRAW_ATTR`.

    `trial.relative_params` (t00, t01, ...) are the trial's tokens, whichever way they came."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.table = list(space.range_table())
        self.names = param_names(self.table)
        self._listing: list[FrozenTrial] | None = None

    def prefetch(self, trials: Sequence[FrozenTrial]) -> None:
        """The study's trials (in number order), just listed by the caller: the next draw uses
        them instead of listing the study again. On a relational storage a listing is some
        seven queries, the largest part of a draw's cost."""
        self._listing = list(trials)

    def _trials(self, study: Study) -> list[FrozenTrial]:
        """The prefetched listing (once), else the storage's (in number order, like any)."""
        listed, self._listing = self._listing, None
        if listed is not None:
            return listed
        return study._storage.get_all_trials(study._study_id, deepcopy=False)

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return _distributions(self.table)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        tokens = trial_tokens(trial, self.table)
        if tokens is None:
            tokens, redraws = self._draw(study, trial, search_space)
            study._storage.set_trial_system_attr(
                trial._trial_id, DRAW_ATTR, draw_attr(tokens, redraws)
            )
        self._record(study, trial, tokens, search_space)
        return dict(zip(self.names, tokens, strict=True))

    @abstractmethod
    def _draw(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> tuple[list[int], int]:
        """A feasible candidate's tokens and the infeasible draws skipped before it."""

    def _record(
        self,
        study: Study,
        trial: FrozenTrial,
        tokens: list[int],
        search_space: dict[str, BaseDistribution],
    ) -> None:
        """Write what else the sampler reads back of a trial's candidate besides `DRAW_ATTR`."""


class SASampler(_TokenSampler):
    """Simulated annealing over `space`'s tokens, rebuilt from the study's storage."""

    def __init__(
        self,
        space: SearchSpace,
        config: SAConfig | None = None,
        *,
        init_tokens: Sequence[int] | None = None,
    ) -> None:
        super().__init__(space)
        self.config = config or SAConfig()
        start = list(init_tokens) if init_tokens is not None else list(space.init_tokens())
        self._start = SAChain(
            self.table,
            start,
            seed=self.config.seed,
            init_temperature=self.config.init_temperature,
            reduce_rate=self.config.reduce_rate,
        )
        # (study id, trials replayed) -> the chain after trials [0, replayed): all finished.
        self._cache: tuple[int, int, SAChain] | None = None

    @property
    def init_tokens(self) -> list[int]:
        return list(self._start.current_tokens)

    def chain(self, trials: Sequence[FrozenTrial], study_id: int = -1) -> SAChain:
        """The chain after replaying `trials` (a study's, in number order)."""
        done = 0
        while done < len(trials) and trials[done].state.is_finished():
            done += 1
        if self._cache is not None and self._cache[0] == study_id and self._cache[1] <= done:
            replayed, chain = self._cache[1], self._cache[2].copy()
        else:
            replayed, chain = 0, self._start.copy()
        for trial in trials[replayed:done]:
            self._update(chain, trial)
        self._cache = (study_id, done, chain.copy())
        for trial in trials[done:]:
            self._update(chain, trial)
        return chain

    def _update(self, chain: SAChain, trial: FrozenTrial) -> None:
        if trial.state != TrialState.COMPLETE or trial.value is None:
            return
        tokens = trial_tokens(trial, self.table)
        if tokens is not None:
            chain.update(trial.number, tokens, trial.value)

    def _draw(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> tuple[list[int], int]:
        trials = self._trials(study)
        chain = self.chain([t for t in trials if t.number != trial.number], study._study_id)
        taken = {
            tuple(tokens)
            for t in trials
            if t.number != trial.number
            and t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
            and (tokens := trial_tokens(t, self.table)) is not None
        }
        return self._propose(chain, trial.number, taken)

    def _propose(
        self, chain: SAChain, number: int, taken: set[tuple[int, ...]]
    ) -> tuple[list[int], int]:
        """A feasible candidate not yet taken (else a feasible taken one), and the redraws."""
        if chain.current_reward is None and tuple(chain.current_tokens) not in taken:
            if not self.space.is_feasible(chain.current_tokens):
                raise ValueError(
                    f"SASampler: initial tokens {chain.current_tokens} violate the constraint; "
                    "pass feasible init_tokens"
                )
            return list(chain.current_tokens), 0
        redraws = 0
        fallback: list[int] | None = None
        for attempt in range(self.config.max_resample):
            tokens = chain.neighbour(number, attempt)
            if tuple(tokens) in taken:
                # Seen already: evaluated once is enough, so look further before settling.
                if fallback is None and self.space.is_feasible(tokens):
                    fallback = tokens
                continue
            if self.space.is_feasible(tokens):
                return tokens, redraws
            redraws += 1
        if fallback is not None:
            return fallback, redraws
        raise InfeasibleSearchError(
            f"SASampler: no feasible neighbour of {chain.current_tokens} in "
            f"{self.config.max_resample} draws; loosen the budget or raise max_resample"
        )

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        raise ValueError(
            f"SASampler samples only the space's tokens; parameter {param_name!r} is not one"
        )


# TPE proposes the argmax of its acquisition: asked again for the same trial, it proposes
# (nearly) the same candidate. Past this many infeasible draws, random draws take over.
_INNER_DRAWS = 10


class FeasibleSampler(_TokenSampler):
    """Any Optuna sampler's draws of `space`'s tokens, re-drawn until they meet the budget.

    The first `_INNER_DRAWS` draws are the inner sampler's, the rest uniform random ones.
    """

    def __init__(
        self, inner: BaseSampler, space: SearchSpace, max_resample: int = 300, seed: int = 0
    ) -> None:
        super().__init__(space)
        self.inner = inner
        self._random = RandomSampler(seed=seed)
        self.max_resample = max_resample

    def _draw(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> tuple[list[int], int]:
        for redraws in range(self.max_resample):
            draw = self.inner if redraws < _INNER_DRAWS else self._random
            params = [
                draw.sample_independent(study, trial, name, dist)
                for name, dist in search_space.items()
            ]
            tokens = check_tokens(params, self.table, f"trial {trial.number}")
            if self.space.is_feasible(tokens):
                return tokens, redraws
        raise InfeasibleSearchError(
            f"{type(self.inner).__name__}: no feasible candidate in {self.max_resample} draws; "
            "loosen the budget or raise max_resample"
        )

    def _record(
        self,
        study: Study,
        trial: FrozenTrial,
        tokens: list[int],
        search_space: dict[str, BaseDistribution],
    ) -> None:
        # Random and TPE draw from the per-token params of the finished trials: a write each.
        for (name, dist), token in zip(search_space.items(), tokens, strict=True):
            if name not in trial.params:
                study._storage.set_trial_param(
                    trial._trial_id, name, dist.to_internal_repr(token), dist
                )

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.inner.before_trial(study, trial)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()
