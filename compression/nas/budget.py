"""Budgets a candidate must meet before anything is trained: FLOPs, parameters, latency.

Figures are sums over the candidate's ops, each op counted once per distinct key (ops are
small, so measuring one is cheap and the cache makes a check of a new candidate mostly
lookups): a feasibility check builds single ops for counting, never the candidate network.
Latency is the latency table's prediction (`LatencyTable.predict`), so it costs no measurement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from lyceum.compression.analysis import count_flops, count_params
from lyceum.compression.nas.base import NASSpace, Op
from lyceum.compression.nas.latency import LatencyTable
from lyceum.compression.search import canonical_tokens

__all__ = ["Budget", "BudgetedSpace", "Figures"]


class Budget(BaseModel):
    """Upper bounds on a candidate; None leaves a figure free."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_flops: int | None = Field(default=None, gt=0, description="Most MACs per sample.")
    max_params: int | None = Field(default=None, gt=0, description="Most parameters.")
    max_latency_ms: float | None = Field(
        default=None, gt=0, description="Most predicted latency (needs a latency table), in ms."
    )


@dataclass(frozen=True)
class Figures:
    """What a candidate costs, from its ops."""

    flops: int
    params: int
    latency_ms: float | None


class BudgetedSpace:
    """`space` with `budget` as its hard constraint: feasible when every bound holds."""

    def __init__(
        self, space: NASSpace, budget: Budget | None = None, lut: LatencyTable | None = None
    ) -> None:
        self.space = space
        self.budget = budget or Budget()
        if self.budget.max_latency_ms is not None and lut is None:
            raise ValueError(
                "Budget.max_latency_ms needs a latency table: build one with `lyceum nas lut` "
                "and pass it (lut=LatencyTable.load(path), or `lut:` in the search config)"
            )
        self.lut = lut
        self._canonical = canonical_tokens(space)
        self._counts: dict[str, tuple[int, int]] = {}
        self.checked = 0

    def range_table(self) -> list[int]:
        return self.space.range_table()

    def init_tokens(self) -> list[int]:
        return self.space.init_tokens()

    def canonical(self, tokens: Sequence[int]) -> list[int]:
        """The inner space's canonical tokens (`CanonicalSpace`), so that the search sees them."""
        return self._canonical(tokens)

    def _count(self, op: Op) -> tuple[int, int]:
        if op.key not in self._counts:
            module = op.build()
            example = torch.zeros(1, *op.input_shape)
            self._counts[op.key] = (count_flops(module, example), count_params(module))
        return self._counts[op.key]

    def figures(self, tokens: Sequence[int]) -> Figures:
        ops = self.space.ops(tokens)
        counts = [self._count(op) for op in ops]
        latency = self.lut.predict(ops) if self.lut is not None else None
        return Figures(sum(c[0] for c in counts), sum(c[1] for c in counts), latency)

    def is_feasible(self, tokens: Sequence[int]) -> bool:
        self.checked += 1
        if not self.space.is_feasible(tokens):
            return False
        b, f = self.budget, self.figures(tokens)
        return (
            (b.max_flops is None or f.flops <= b.max_flops)
            and (b.max_params is None or f.params <= b.max_params)
            and (b.max_latency_ms is None or (f.latency_ms or 0.0) <= b.max_latency_ms)
        )
