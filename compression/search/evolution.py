"""Regularized evolution over a `SearchSpace`'s tokens, rebuilt from the study's trials.

once-for-all searches its trained supernet with an evolutionary finder (a population of 100,
children by mutation and crossover of the best quarter, generation after generation); its
generations wait for their slowest member, and its population lives in one process. Here the
population is read from the study, as the SA chain is: *regularized (aging) evolution* (Real
et al., 2019), which is asynchronous by design, so any number of workers extend one search and
a crash loses nothing:

- the population is the `population` latest completed trials (by number: the oldest dies, good
  or not, which keeps a lucky early candidate from ruling for ever);
- trial 0 is the initial tokens, trials 1 to `population - 1` uniform random draws;
- each later trial draws `tournament` members, and its candidate is the best one's tokens with
  one token mutated (one more for every 16 children drawn that were taken); every draw is
  seeded by (seed, trial number, attempt), so a replay needs no RNG state and two workers
  drawing for one number draw alike (the twin check settles them).

Candidates taken by another trial are skipped and infeasible ones re-drawn and counted, as the
SA sampler does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from optuna.trial import FrozenTrial

from lyceum.compression.search.base import SearchSpace
from lyceum.compression.search.chain import mutate, seeded_rng
from lyceum.compression.search.config import SAConfig
from lyceum.compression.search.sampler import InfeasibleSearchError, ProposingSampler
from lyceum.compression.search.trials import StudyTrials, Tokens, trial_tokens

__all__ = ["EvolutionSampler"]

# Children drawn that were taken already before each child mutates one token more: a
# population converged on an explored optimum looks further out instead of re-drawing the
# candidates around it `max_resample` times and evaluating none.
_TAKEN_PER_CHANGE = 16


class EvolutionSampler(ProposingSampler):
    """Regularized evolution over `space`'s tokens (`config.method == "evolution"`)."""

    def __init__(
        self,
        space: SearchSpace,
        config: SAConfig | None = None,
        *,
        init_tokens: Sequence[int] | None = None,
    ) -> None:
        config = config or SAConfig(method="evolution")
        if config.method != "evolution":
            raise ValueError(
                f"EvolutionSampler: config.method is {config.method!r}; set method "
                "'evolution', or use SASampler for annealing"
            )
        super().__init__(space, config, init_tokens=init_tokens)

    def population(self, trials: StudyTrials) -> list[FrozenTrial]:
        """The latest `population` completed trials of `trials` (as last refreshed)."""
        return trials.latest_complete(self.config.population)

    def propose(self, trials: StudyTrials, number: int) -> tuple[list[int], int]:
        return self._propose(self.population(trials), number, trials.is_taken)

    def _propose(
        self,
        population: Sequence[FrozenTrial],
        number: int,
        is_taken: Callable[[Tokens], bool],
    ) -> tuple[list[int], int]:
        seed = self.config.seed
        if not is_taken(tuple(self.init_tokens)):
            if not self.space.is_feasible(self.init_tokens):
                raise ValueError(
                    f"EvolutionSampler: initial tokens {self.init_tokens} violate the "
                    "constraint; pass feasible init_tokens"
                )
            return list(self.init_tokens), 0
        founding = number < self.config.population or not population
        redraws = taken = 0
        fallback: list[int] | None = None
        for attempt in range(self.config.max_resample):
            if founding:
                rng = seeded_rng(seed, "founder", number, attempt)
                drawn = [rng.randrange(n) for n in self.table]
            else:
                drawn = self._child(population, number, attempt, 1 + taken // _TAKEN_PER_CHANGE)
            tokens = self.canonical(drawn)
            if is_taken(tuple(tokens)):
                # Evaluated once is enough: look further, and settle on it only if nothing else.
                taken += 1
                if fallback is None and self.space.is_feasible(tokens):
                    fallback = tokens
                continue
            if self.space.is_feasible(tokens):
                return tokens, redraws
            redraws += 1
        if fallback is not None:
            return fallback, redraws
        raise InfeasibleSearchError(
            f"EvolutionSampler: no feasible candidate for trial {number} in "
            f"{self.config.max_resample} draws; loosen the budget or raise max_resample"
        )

    def _child(
        self, population: Sequence[FrozenTrial], number: int, attempt: int, changes: int
    ) -> list[int]:
        """Draw `attempt` for trial `number`: the tournament's winner, `changes` tokens
        mutated."""
        rng = seeded_rng(self.config.seed, "tournament", number, attempt)
        drawn = rng.sample(list(population), min(self.config.tournament, len(population)))
        # The best; the lowest number among equals, so every worker picks the same parent.
        parent = max(drawn, key=lambda t: (t.value, -t.number))
        tokens = trial_tokens(parent, self.table)
        assert tokens is not None  # the population holds trials with a candidate only
        return mutate(tokens, self.table, rng, changes)
