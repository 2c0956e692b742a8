"""What a NAS space adds to a search space: building a candidate, as a chain of keyed ops.

A candidate network is `nn.Sequential` of ops, each an `Op`: a key naming everything its
latency depends on but the weights (type, shapes, kernel, stride, groups...), how to build it,
and the shape it is fed. The latency table (`lyceum.compression.nas.latency`) measures each
distinct key once and predicts a network as the sum of its ops: so a space that lists its ops
gets latency budgets for free, and `build` is the same ops put in a row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import nn

from lyceum.compression.search import SearchSpace

__all__ = ["NASSpace", "Op", "op_key"]


def op_key(kind: str, /, **fields: object) -> str:
    """A stable key: `kind(name=value,...)`, fields sorted by name."""
    return f"{kind}(" + ",".join(f"{k}={fields[k]}" for k in sorted(fields)) + ")"


@dataclass(frozen=True)
class Op:
    """One op of a candidate: its latency key, its factory, its input shape (batch excluded)."""

    key: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]


@runtime_checkable
class NASSpace(SearchSpace, Protocol):
    """A `SearchSpace` whose candidates are networks made of keyed ops.

    Why a protocol: the search, the budgets and the latency table need nothing else from a
    space, so a user's own space (a `module:callable` spec) plugs in by implementing these.
    """

    def ops(self, tokens: Sequence[int]) -> list[Op]:
        """The ops of the candidate `tokens`, in order."""
        ...

    def all_ops(self) -> list[Op]:
        """Every distinct op any candidate can contain (what a latency table measures)."""
        ...

    def build(self, tokens: Sequence[int]) -> nn.Module:
        """The candidate network (freshly initialised)."""
        ...
