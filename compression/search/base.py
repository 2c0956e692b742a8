"""Contracts of the search: what is searched (a token space) and how a candidate is scored.

They are Protocols so that the simulated-annealing controller knows nothing about pruning:
auto-pruning searches per-layer ratios through them today, and NAS will search architectures
through the same two methods later.

`CanonicalSpace` is for a space where several token lists name one candidate (a once-for-all
space: the tokens of blocks beyond a stage's depth change nothing): the samplers map every draw
to its canonical list (`canonical_tokens`), so the study's twin check, which compares tokens,
catches the same candidate drawn twice and it is not evaluated again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

__all__ = ["CanonicalSpace", "Objective", "SearchSpace", "canonical_tokens"]


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


@runtime_checkable
class CanonicalSpace(SearchSpace, Protocol):
    """A `SearchSpace` whose candidates may have several token lists; `canonical` picks one.

    Why a protocol of its own: most spaces have one list per candidate and need not say so; a
    space that has more implements `canonical`, and the samplers only ever hand out its result.
    """

    def canonical(self, tokens: Sequence[int]) -> list[int]:
        """The one token list of the candidate `tokens` names (the same for all its lists)."""
        ...


def canonical_tokens(space: SearchSpace) -> Callable[[Sequence[int]], list[int]]:
    """The mapping of `space`'s token lists to their canonical ones: its `canonical` for a
    `CanonicalSpace`, else `list` (one list per candidate). Looked up once, as draws call it
    hundreds of times per trial."""
    if isinstance(space, CanonicalSpace):
        return space.canonical
    return list


class Objective(Protocol):
    """Scores one feasible candidate; higher is better (e.g. validation accuracy)."""

    def __call__(self, tokens: Sequence[int], /) -> float: ...
