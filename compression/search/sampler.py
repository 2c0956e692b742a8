"""Optuna samplers over a `SearchSpace`'s integer tokens that only hand out feasible candidates.

`SASampler` is simulated annealing whose chain is rebuilt from the study's trials at every draw
(`lyceum.compression.search.chain`), so it holds no state a crash could lose and every worker
sharing the study extends one chain. The trials come from a `StudyTrials`, read incrementally,
and the replay of the trials below the lowest unfinished one is kept (finished trials never
change), so a draw costs the same with 10 or 10,000 trials in the study.

`FeasibleSampler` wraps any other Optuna sampler (random, TPE) with the same budget and
taken-candidate checks, so the searches compared in the bench differ only in how they draw;
`lyceum.compression.search.evolution` is the third way, regularized evolution.

All of them hand out canonical tokens only (`canonical_tokens`: a `CanonicalSpace`'s one list per
candidate), so a candidate drawn under another of its token lists is a taken one, and the
study's twin check (equal tokens) keeps it from being evaluated twice.

A trial's candidate is one system attribute, `DRAW_ATTR` (see `lyceum.compression.search.trials`):
one storage write, where a `suggest_int` per token was one SQLite transaction each. The search
loop writes it with the trial itself (`SASampler.propose`, then one `create_new_trial`); through
Optuna's `ask` the sampler writes it. `FeasibleSampler` also writes the per-token parameters,
which its inner sampler learns from. Both check the budget before anything is built for training.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from optuna.distributions import BaseDistribution, IntDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.trial import FrozenTrial, TrialState

from lyceum.compression.search.base import SearchSpace, canonical_tokens
from lyceum.compression.search.chain import SAChain, check_tokens
from lyceum.compression.search.config import SAConfig
from lyceum.compression.search.trials import (
    DRAW_ATTR,
    StudyTrials,
    Tokens,
    draw_attr,
    param_names,
    trial_tokens,
)

if TYPE_CHECKING:
    from optuna.storages import BaseStorage
    from optuna.study import Study

__all__ = [
    "FeasibleSampler",
    "InfeasibleSearchError",
    "ProposingSampler",
    "SASampler",
    "TokenSampler",
]

# Draws in a row that missed (taken or over budget) before the sampler checks whether every
# one-token move is (a chain stuck on an explored optimum, at the budget's edge or not): then the
# draws left change two tokens, instead of missing `max_resample` times and evaluating none.
_ALL_TAKEN_AFTER = 16


class InfeasibleSearchError(RuntimeError):
    """No feasible candidate was found within `SAConfig.max_resample` draws."""


def _distributions(table: Sequence[int]) -> dict[str, BaseDistribution]:
    return {
        name: IntDistribution(0, n - 1) for name, n in zip(param_names(table), table, strict=True)
    }


class TokenSampler(BaseSampler):
    """What every sampler of tokens shares (annealing, evolution, `FeasibleSampler`): the
    search space is the space's tokens, a trial enqueued with its candidate (a retry) keeps
    it, and a new draw is written as one `DRAW_ATTR`.

    `trial.relative_params` (t00, t01, ...) are the trial's tokens, whichever way they came."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.canonical = canonical_tokens(space)
        self.table = list(space.range_table())
        self.names = param_names(self.table)
        self._view: tuple[BaseStorage, int, StudyTrials] | None = None

    def trials(self, study: Study) -> StudyTrials:
        """This sampler's incremental copy of `study`'s trials (not refreshed here)."""
        if (
            self._view is None
            or self._view[0] is not study._storage
            or self._view[1] != study._study_id
        ):
            self._view = (study._storage, study._study_id, StudyTrials(study, self.table))
        return self._view[2]

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

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        raise ValueError(
            f"{type(self).__name__} samples only the space's tokens; parameter {param_name!r} "
            "is not one"
        )

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


class ProposingSampler(TokenSampler):
    """A sampler of the engine's own (annealing, evolution): its `config`, its canonical
    initial tokens, and a draw that is `propose` on the study's trials, which the search loop
    calls directly (the candidate then created with its trial in one write)."""

    def __init__(
        self,
        space: SearchSpace,
        config: SAConfig,
        *,
        init_tokens: Sequence[int] | None = None,
    ) -> None:
        super().__init__(space)
        self.config = config
        start = init_tokens if init_tokens is not None else space.init_tokens()
        self.init_tokens = self.canonical(check_tokens(start, self.table, "init_tokens"))

    @abstractmethod
    def propose(self, trials: StudyTrials, number: int) -> tuple[list[int], int]:
        """A feasible candidate for trial `number` from `trials` (as last refreshed) that no
        other trial has taken if it can, and the infeasible draws skipped."""

    def _draw(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> tuple[list[int], int]:
        trials = self.trials(study)
        trials.refresh()
        return self.propose(trials, trial.number)


class SASampler(ProposingSampler):
    """Simulated annealing over `space`'s tokens, rebuilt from the study's storage."""

    def __init__(
        self,
        space: SearchSpace,
        config: SAConfig | None = None,
        *,
        init_tokens: Sequence[int] | None = None,
    ) -> None:
        super().__init__(space, config or SAConfig(), init_tokens=init_tokens)
        self._start = SAChain.of(self.config, self.table, self.init_tokens)
        # (the trials, how many replayed) -> the chain after trials [0, replayed): all finished.
        self._cache: tuple[StudyTrials, int, SAChain] | None = None

    def chain(self, trials: Sequence[FrozenTrial]) -> SAChain:
        """The chain after replaying `trials` (a study's, in number order), from scratch."""
        chain = self._start.copy()
        for trial in trials:
            self._update(chain, trial)
        return chain

    def chain_of(self, trials: StudyTrials) -> SAChain:
        """The chain of `trials` as last refreshed: the replay of the finished prefix is kept
        from the previous call, so only the trials finished since are replayed."""
        cached = self._cache
        if cached is None or cached[0] is not trials:
            cached = (trials, 0, self._start.copy())
        _, replayed, prefix = cached
        for number in range(replayed, trials.finished_prefix):
            self._update(prefix, trials[number])
        self._cache = (trials, trials.finished_prefix, prefix)
        chain = prefix.copy()
        for trial in trials.finished_since(trials.finished_prefix):
            self._update(chain, trial)
        return chain

    def _update(self, chain: SAChain, trial: FrozenTrial) -> None:
        if trial.state != TrialState.COMPLETE or trial.value is None:
            return
        tokens = trial_tokens(trial, self.table)
        if tokens is not None:
            chain.update(trial.number, tokens, trial.value)

    def propose(self, trials: StudyTrials, number: int) -> tuple[list[int], int]:
        return self._propose(self.chain_of(trials), number, trials.is_taken)

    def _propose(
        self, chain: SAChain, number: int, is_taken: Callable[[Tokens], bool]
    ) -> tuple[list[int], int]:
        """A feasible candidate not yet taken (else a feasible taken one), and the redraws."""
        if chain.current_reward is None and not is_taken(tuple(chain.current_tokens)):
            if not self.space.is_feasible(chain.current_tokens):
                raise ValueError(
                    f"SASampler: initial tokens {chain.current_tokens} violate the constraint; "
                    "pass feasible init_tokens"
                )
            return list(chain.current_tokens), 0
        redraws = 0
        if chain.in_warmup(number):
            for attempt in range(self.config.max_resample):
                tokens = self.canonical(chain.random_tokens(number, attempt))
                if is_taken(tuple(tokens)):
                    continue
                if self.space.is_feasible(tokens):
                    return tokens, redraws
                redraws += 1
            # A budget random draws rarely meet: the warm-up trial moves from the chain instead.
        fallback: list[int] | None = None
        changes = 1
        for attempt in range(self.config.max_resample):
            tokens = self.canonical(chain.neighbour(number, attempt, changes))
            if is_taken(tuple(tokens)):
                # Seen already: evaluated once is enough, so look further before settling.
                if fallback is None and self.space.is_feasible(tokens):
                    fallback = tokens
                changes = self._widen(chain, attempt, changes, is_taken)
                continue
            if self.space.is_feasible(tokens):
                return tokens, redraws
            redraws += 1
            changes = self._widen(chain, attempt, changes, is_taken)
        if fallback is not None:
            return fallback, redraws
        raise InfeasibleSearchError(
            f"SASampler: no feasible candidate for trial {number} in {self.config.max_resample} "
            f"draws around {chain.current_tokens}; loosen the budget or raise max_resample"
        )

    def _widen(
        self, chain: SAChain, attempt: int, changes: int, is_taken: Callable[[Tokens], bool]
    ) -> int:
        """The tokens the draws after `attempt` change: two once every one-token move of the
        chain is taken or over budget (checked once, after `_ALL_TAKEN_AFTER` misses in a row:
        every draw so far missed, or the loop would have returned)."""
        if changes != 1 or attempt != _ALL_TAKEN_AFTER:
            return changes
        for move in chain.neighbours():
            tokens = self.canonical(move)
            if not is_taken(tuple(tokens)) and self.space.is_feasible(tokens):
                return 1  # a new one-token move is left: keep drawing them
        return 2


# TPE proposes the argmax of its acquisition: asked again for the same trial, it proposes
# (nearly) the same candidate. Past this many draws (over budget or taken), random ones take over.
_INNER_DRAWS = 10


class FeasibleSampler(TokenSampler):
    """Any Optuna sampler's draws of `space`'s tokens, re-drawn until they meet the budget
    and are not taken by another trial (else a taken feasible one).

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
        trials = self.trials(study)
        trials.refresh()
        # A joint (relative) proposal where the inner sampler makes one (Optuna 5's TPE, which
        # is multivariate for one objective): a budget ties the tokens together, and the best
        # value of each token on its own (an independent proposal) is over budget every time.
        relative = self.inner.infer_relative_search_space(study, trial)
        redraws = 0
        fallback: list[int] | None = None
        for attempt in range(self.max_resample):
            draw = self.inner if attempt < _INNER_DRAWS else self._random
            joint = (
                self.inner.sample_relative(study, trial, relative)
                if draw is self.inner and relative
                else {}
            )
            params = [
                joint[name] if name in joint else draw.sample_independent(study, trial, name, dist)
                for name, dist in search_space.items()
            ]
            tokens = self.canonical(check_tokens(params, self.table, f"trial {trial.number}"))
            if not self.space.is_feasible(tokens):
                redraws += 1
            elif not trials.is_taken(tuple(tokens)):
                return tokens, redraws
            elif fallback is None:
                # Evaluated already (the study would copy its reward): a new one is worth more.
                fallback = tokens
        if fallback is not None:
            return fallback, redraws
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
