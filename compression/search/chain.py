"""The simulated-annealing chain as a pure function of the finished trials.

PaddleSlim's SAController (mutate one token of the current candidate, accept a better one always
and a worse one with probability exp(delta / T), T decaying geometrically) keeps its state in the
controller's memory, and so does the SA sampler of Optuna's tutorial: two workers would run two
chains, and a crash loses the chain. Here the chain is *replayed* from the trials a study has
stored, so any worker on any machine rebuilds the same chain from the storage alone:

- trials are replayed in the order of their numbers (the storage's order), each completed one an
  `update(number, tokens, reward)`;
- every random draw comes from a generator seeded by (seed, what, trial number, attempt), never
  from a generator that advances across trials, so the replay needs no RNG state;
- with `warmup` w, trials 1..w are uniform random candidates (the sampler draws them), replayed
  greedily (the better one becomes the current point, no move decided), so the chain starts
  from the best of w + 1 candidates instead of wherever one draw put it;
- T = T0 * reduce_rate**k where k is the number of moves already decided (finished trials past
  the warm-up but the first), and delta is divided by a running mean of |delta| so that T = 1
  accepts a typical worse move with probability 1/e whatever the reward's units (with accuracies in [0, 1], PaddleSlim's
  exp(delta / T) at T = 100 is ~1 for any delta: a random walk).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lyceum.compression.search.config import SAConfig

__all__ = ["SAChain", "check_tokens", "mutate", "seeded_rng"]


def check_tokens(tokens: Sequence[int], table: Sequence[int], what: str) -> list[int]:
    """`tokens` as a list, or a ValueError naming the token outside its range."""
    tokens = [int(t) for t in tokens]
    if len(tokens) != len(table):
        raise ValueError(f"{what}: expected {len(table)} tokens, got {len(tokens)}: {tokens}")
    for i, (t, n) in enumerate(zip(tokens, table, strict=True)):
        if not 0 <= t < n:
            raise ValueError(f"{what}: token {i} is {t}, outside its range [0, {n - 1}]")
    return tokens


def seeded_rng(seed: int, what: str, number: int, attempt: int = 0) -> random.Random:
    """The generator of draw `attempt` of `what` for trial `number`: a pure function of its
    arguments, so a replay needs no RNG state."""
    # A str seed is hashed with SHA-512: the same generator in every process and on every machine.
    return random.Random(f"lyceum-sa:{seed}:{what}:{number}:{attempt}")


def mutate(
    tokens: Sequence[int], table: Sequence[int], rng: random.Random, changes: int = 1
) -> list[int]:
    """`tokens` with `changes` of them (as many as can change, if fewer) set to another value."""
    mutable = [i for i, n in enumerate(table) if n > 1]
    if not mutable:
        raise ValueError(f"range table {list(table)}: every token has one value; nothing to search")
    picked = (
        [rng.choice(mutable)] if changes == 1 else rng.sample(mutable, min(changes, len(mutable)))
    )
    mutated = list(tokens)
    for i in picked:
        # Draw among the other values of the token, so that every draw is a real move.
        value = rng.randrange(table[i] - 1)
        mutated[i] = value if value < mutated[i] else value + 1
    return mutated


@dataclass
class SAChain:
    """State of one annealing chain; `update` it with finished trials in number order."""

    table: list[int]
    current_tokens: list[int]
    seed: int = 0
    init_temperature: float = 1.0
    reduce_rate: float = 0.9
    current_reward: float | None = None
    best_tokens: list[int] = field(default_factory=list)
    best_reward: float | None = None
    moves: int = 0
    spread: float = 0.0
    warmup: int = 0

    def __post_init__(self) -> None:
        if not self.table or any(n < 1 for n in self.table):
            raise ValueError(
                f"SAChain: range table must be non-empty with entries >= 1, got {self.table}"
            )
        self.current_tokens = check_tokens(self.current_tokens, self.table, "init_tokens")
        if not self.best_tokens:
            self.best_tokens = list(self.current_tokens)

    @classmethod
    def of(cls, config: SAConfig, table: Sequence[int], tokens: Sequence[int]) -> SAChain:
        """The chain `config` anneals over `table`, before any trial, at `tokens`."""
        return cls(
            list(table),
            list(tokens),
            seed=config.seed,
            init_temperature=config.init_temperature,
            reduce_rate=config.reduce_rate,
            warmup=config.warmup,
        )

    @property
    def temperature(self) -> float:
        return self.init_temperature * self.reduce_rate**self.moves

    def in_warmup(self, number: int) -> bool:
        """Whether trial `number` is one of the warm-up's random candidates."""
        return 0 < number <= self.warmup

    def copy(self) -> SAChain:
        return replace(
            self, current_tokens=list(self.current_tokens), best_tokens=list(self.best_tokens)
        )

    def update(self, number: int, tokens: Sequence[int], reward: float) -> bool:
        """Decide whether trial `number` (`tokens` scored `reward`) becomes the current point."""
        tokens = check_tokens(tokens, self.table, f"trial {number}")
        if not math.isfinite(reward):
            raise ValueError(f"SAChain: reward must be finite, got {reward} for trial {number}")
        if self.current_reward is None:
            accepted = True
        elif self.in_warmup(number):
            accepted = reward > self.current_reward
        else:
            delta = reward - self.current_reward
            if delta >= 0:
                accepted = True
            else:
                # Ties (delta 0) keep the spread at 0: fall back to this move's own size.
                scale = self.spread or abs(delta)
                u = seeded_rng(self.seed, "accept", number).random()
                accepted = u < math.exp(delta / (self.temperature * scale))
            self.moves += 1
            self.spread += (abs(delta) - self.spread) / self.moves
        if accepted:
            self.current_tokens, self.current_reward = tokens, reward
        if self.best_reward is None or reward > self.best_reward:
            self.best_tokens, self.best_reward = list(tokens), reward
        return accepted

    def neighbour(self, number: int, attempt: int, changes: int = 1) -> list[int]:
        """Draw `attempt` for trial `number`: the current tokens with `changes` tokens changed
        (as many as can change, if fewer)."""
        what = "move" if changes == 1 else f"move{changes}"
        rng = seeded_rng(self.seed, what, number, attempt)
        return mutate(self.current_tokens, self.table, rng, changes)

    def random_tokens(self, number: int, attempt: int) -> list[int]:
        """Draw `attempt` for warm-up trial `number`: every token uniform in its range."""
        rng = seeded_rng(self.seed, "warmup", number, attempt)
        return [rng.randrange(n) for n in self.table]

    def neighbours(self) -> Iterator[tuple[int, ...]]:
        """Every candidate `neighbour` can draw: the current tokens with one token changed."""
        current = tuple(self.current_tokens)
        for i, n in enumerate(self.table):
            for value in range(n):
                if value != current[i]:
                    yield (*current[:i], value, *current[i + 1 :])
