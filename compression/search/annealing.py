"""Simulated-annealing search over token lists, resumable from a JSON state file.

The controller follows PaddleSlim's SAController (mutate one token of the current candidate,
accept a better candidate always and a worse one with probability exp(delta / T), T decaying
geometrically) with three changes:

- Temperature is relative to the reward scale. With rewards that are accuracies in [0, 1],
  PaddleSlim's exp(delta / T) at T = 100 is ~1 for any delta, so the search is a random walk.
  Here delta is divided by a running estimate of the reward spread (the mean absolute delta
  seen so far), so T = 1 accepts a typical worse move with probability 1/e whatever the units.
- Infeasible candidates are re-sampled (a bounded number of times) before evaluation instead of
  being evaluated and given a bad reward.
- Its own `random.Random` (no global RNG), and the whole state, RNG included, is written to JSON
  after every step, so a search resumed from the file makes exactly the same moves.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lyceum.compression._io import write_json_atomic
from lyceum.compression.search.base import Objective, SearchSpace

__all__ = ["InfeasibleSearchError", "SAConfig", "SAController", "SearchResult"]

_STATE_VERSION = 1


class InfeasibleSearchError(RuntimeError):
    """No feasible neighbour was found within `SAConfig.max_resample` draws."""


class SAConfig(BaseModel):
    """Settings of the simulated-annealing controller."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    init_temperature: float = Field(
        default=1.0,
        gt=0,
        description="Starting temperature, in units of the running reward spread.",
    )
    reduce_rate: float = Field(
        default=0.9, gt=0, lt=1, description="Temperature multiplier applied after every step."
    )
    max_iterations: int = Field(
        default=100, ge=0, description="Candidates evaluated after the initial tokens."
    )
    max_resample: int = Field(
        default=300,
        ge=1,
        description="Draws allowed to find a feasible neighbour before giving up.",
    )
    seed: int = Field(default=0, description="Seed of the controller's own random generator.")


class SearchResult(BaseModel):
    """Outcome of a search: the best tokens, their reward and every evaluated step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    best_tokens: list[int] = Field(description="Tokens with the highest reward seen.")
    best_reward: float = Field(description="Reward of `best_tokens`.")
    history: list[dict[str, Any]] = Field(
        description="One entry per evaluation: iteration, tokens, reward, accepted."
    )


class SAController:
    """Simulated annealing over a `SearchSpace`, scored by an `Objective` (higher is better).

    Use `search(objective)` for the whole loop, or `propose()` / `update(tokens, reward)` to
    drive it step by step. With `state_path`, the state is saved after every evaluation and a
    new controller built with the same path, space and config resumes exactly where it stopped.
    `init_tokens` overrides the space's starting point (e.g. the best tokens of an earlier run).
    """

    def __init__(
        self,
        space: SearchSpace,
        config: SAConfig | None = None,
        *,
        state_path: str | Path | None = None,
        init_tokens: Sequence[int] | None = None,
    ) -> None:
        self.space = space
        self.config = config or SAConfig()
        self.table = list(space.range_table())
        if not self.table or any(n < 1 for n in self.table):
            raise ValueError(
                f"SAController: range table must be non-empty with entries >= 1, got {self.table}"
            )
        self.state_path = Path(state_path) if state_path is not None else None
        self._rng = random.Random(self.config.seed)
        self.iteration = 0
        self.current_tokens: list[int] = self._check_tokens(
            list(init_tokens) if init_tokens is not None else list(space.init_tokens()),
            "init_tokens",
        )
        self.current_reward: float | None = None
        self.best_tokens: list[int] = list(self.current_tokens)
        self.best_reward: float | None = None
        self._spread = 0.0
        self._n_deltas = 0
        self.history: list[dict[str, Any]] = []
        if self.state_path is not None and self.state_path.exists():
            self._load(self.state_path)

    @property
    def temperature(self) -> float:
        return self.config.init_temperature * self.config.reduce_rate**self.iteration

    def _check_tokens(self, tokens: list[int], what: str) -> list[int]:
        if len(tokens) != len(self.table):
            raise ValueError(
                f"{what}: expected {len(self.table)} tokens, got {len(tokens)}: {tokens}"
            )
        for i, (t, n) in enumerate(zip(tokens, self.table, strict=True)):
            if not 0 <= t < n:
                raise ValueError(f"{what}: token {i} is {t}, outside its range [0, {n - 1}]")
        return tokens

    def propose(self) -> list[int]:
        """A feasible neighbour of the current tokens (one token changed), re-sampled as needed."""
        mutable = [i for i, n in enumerate(self.table) if n > 1]
        if not mutable:
            raise InfeasibleSearchError(
                "SAController: every token has a single value; nothing to search"
            )
        for _ in range(self.config.max_resample):
            tokens = list(self.current_tokens)
            i = self._rng.choice(mutable)
            # Draw among the other values of the token, so that every draw is a real move.
            value = self._rng.randrange(self.table[i] - 1)
            tokens[i] = value if value < tokens[i] else value + 1
            if self.space.is_feasible(tokens):
                return tokens
        raise InfeasibleSearchError(
            f"SAController: no feasible neighbour of {self.current_tokens} in "
            f"{self.config.max_resample} draws; loosen the constraint or raise max_resample"
        )

    def update(self, tokens: Sequence[int], reward: float) -> bool:
        """Record the reward of `tokens` (from `propose`), decide acceptance, save state."""
        tokens = self._check_tokens(list(tokens), "update")
        if not math.isfinite(reward):
            raise ValueError(f"SAController: reward must be finite, got {reward} for {tokens}")
        if self.current_reward is None:
            accepted = True
        else:
            delta = reward - self.current_reward
            if delta >= 0:
                accepted = True
            else:
                # Ties (delta 0) keep the spread at 0: fall back to this move's own size.
                scale = self._spread or abs(delta)
                accepted = self._rng.random() < math.exp(delta / (self.temperature * scale))
            self._n_deltas += 1
            self._spread += (abs(delta) - self._spread) / self._n_deltas
            self.iteration += 1
        self.history.append(
            {"iteration": self.iteration, "tokens": tokens, "reward": reward, "accepted": accepted}
        )
        if accepted:
            self.current_tokens, self.current_reward = tokens, reward
        if self.best_reward is None or reward > self.best_reward:
            self.best_tokens, self.best_reward = list(tokens), reward
        if self.state_path is not None:
            write_json_atomic(self.state_path, self._state())
        return accepted

    def search(self, objective: Objective) -> SearchResult:
        """Evaluate the initial tokens (unless resumed), then anneal for `max_iterations` steps."""
        if self.current_reward is None:
            if not self.space.is_feasible(self.current_tokens):
                raise ValueError(
                    f"SAController: initial tokens {self.current_tokens} violate the constraint; "
                    "pass feasible init_tokens"
                )
            self.update(self.current_tokens, objective(self.current_tokens))
        while self.iteration < self.config.max_iterations:
            tokens = self.propose()
            self.update(tokens, objective(tokens))
        return self.result()

    def result(self) -> SearchResult:
        if self.best_reward is None:
            raise ValueError("SAController: nothing evaluated yet; call search() first")
        return SearchResult(
            best_tokens=self.best_tokens, best_reward=self.best_reward, history=self.history
        )

    def _state(self) -> dict[str, Any]:
        version, internal, gauss = self._rng.getstate()
        return {
            "format_version": _STATE_VERSION,
            "config": self.config.model_dump(),
            "range_table": self.table,
            "iteration": self.iteration,
            "current_tokens": self.current_tokens,
            "current_reward": self.current_reward,
            "best_tokens": self.best_tokens,
            "best_reward": self.best_reward,
            "spread": self._spread,
            "n_deltas": self._n_deltas,
            "rng": [version, list(internal), gauss],
            "history": self.history,
        }

    def _load(self, path: Path) -> None:
        state = json.loads(path.read_text())
        if state.get("format_version") != _STATE_VERSION:
            raise ValueError(
                f"{path}: search state format_version {state.get('format_version')!r} is not "
                f"{_STATE_VERSION}; delete the file to start a new search"
            )
        # max_iterations may differ: resuming with a larger budget extends a finished search.
        saved_config = {k: v for k, v in state["config"].items() if k != "max_iterations"}
        my_config = {k: v for k, v in self.config.model_dump().items() if k != "max_iterations"}
        for key, saved, mine in (
            ("range_table", state["range_table"], self.table),
            ("config", saved_config, my_config),
        ):
            if saved != mine:
                raise ValueError(
                    f"{path}: saved {key} {saved} differs from this search's {mine}; "
                    "use a new state path or the same settings to resume"
                )
        self.iteration = int(state["iteration"])
        self.current_tokens = list(state["current_tokens"])
        self.current_reward = state["current_reward"]
        self.best_tokens = list(state["best_tokens"])
        self.best_reward = state["best_reward"]
        self._spread = float(state["spread"])
        self._n_deltas = int(state["n_deltas"])
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self.history = list(state["history"])
