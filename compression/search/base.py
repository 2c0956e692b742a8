"""Contracts of the search: what is searched (a token space) and how a candidate is scored.

They are Protocols so that the simulated-annealing controller knows nothing about pruning:
auto-pruning searches per-layer ratios through them today, and NAS will search architectures
through the same two methods later.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = ["Objective", "SearchSpace"]


@runtime_checkable
class SearchSpace(Protocol):
    """A space of candidates encoded as token lists: token `i` is an int in `range(table[i])`.

    `is_feasible` is the hard constraint (a FLOPs or latency budget, say). The controller only
    ever hands feasible tokens to the objective, so an expensive evaluation is never spent on a
    candidate that could not be used anyway.
    """

    def range_table(self) -> list[int]:
        """Number of values of each token; every entry >= 1."""
        ...

    def init_tokens(self) -> list[int]:
        """A feasible starting point for the search."""
        ...

    def is_feasible(self, tokens: Sequence[int]) -> bool:
        """Whether `tokens` meets the hard constraint."""
        ...


class Objective(Protocol):
    """Scores one feasible candidate; higher is better (e.g. validation accuracy)."""

    def __call__(self, tokens: Sequence[int], /) -> float: ...
