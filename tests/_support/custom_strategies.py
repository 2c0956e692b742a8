"""Merge strategies of "a user's own" module, named in tests by `module:attribute` specs
(`tests._support.custom_strategies:Median`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lyceum.proto.schema import FieldSpec

CALLS: list[int] = []
"""Rows merged by each `counting_mean` call, so a test sees that the trainer used it."""


class Median:
    """The element-wise median of the teachers (a MergeStrategy, not a built-in one)."""

    name = "median"

    def merged_spec(
        self, field: str, specs: Sequence[FieldSpec], teachers: Sequence[str]
    ) -> FieldSpec:
        return FieldSpec.model_validate({**specs[0].model_dump(), "dtype": "float32"})

    def __call__(self, tensors: Sequence[Tensor], teachers: Sequence[str]) -> Tensor:
        return torch.stack(list(tensors)).median(0).values


MEDIAN = Median()


def scaled_sum(tensors: list[Tensor], scale: float = 1.0) -> Tensor:
    return scale * torch.stack(tensors).sum(0)


def counting_mean(tensors: list[Tensor]) -> Tensor:
    CALLS.append(tensors[0].shape[0])
    return torch.stack(tensors).mean(0)


class NotAStrategy:
    """A class without `merged_spec`: a spec naming it is refused."""
