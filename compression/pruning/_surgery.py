"""Surgery: Torch-Pruning's pruning functions applied by layer name, attention heads, checks.

The graph (`_graph`) decides which indices of which layer sides go; this module applies them
to a model found by names (the traced model, a copy, or a fresh instance from the factory).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import nn

from lyceum.compression.pruning._heads import AttentionHeads
from lyceum.compression.pruning._tracing import tracing


@dataclass(frozen=True)
class Side:
    """One side (outputs or inputs) of a named layer or parameter, with TP's pruning function."""

    name: str
    param: bool
    handler: Callable[..., Any]
    dim: int
    is_out: bool


class _Heads(Protocol):
    num_heads: int


def prune_heads(model: nn.Module, heads: AttentionHeads, indices: dict[Side, set[int]]) -> None:
    """Set `num_heads` from the pruned projections; drop removed heads from per-head params."""
    module = cast(_Heads, model.get_submodule(heads.module))
    before = module.num_heads
    removed = {
        (i // heads.head_dim) % before
        for side, idxs in indices.items()
        if side.is_out and side.name in heads.projections
        for i in idxs
    }
    projection = cast(nn.Linear, model.get_submodule(heads.projections[0]))
    module.num_heads = projection.out_features // heads.per_head
    keep = torch.tensor([h for h in range(before) if h not in removed])
    for name, dim in heads.head_params:
        param = model.get_parameter(name)
        owner, _, attr = name.rpartition(".")
        pruned = nn.Parameter(param.detach().index_select(dim, keep), param.requires_grad)
        setattr(model.get_submodule(owner) if owner else model, attr, pruned)


def apply_side(model: nn.Module, side: Side, idxs: list[int]) -> None:
    """Torch-Pruning's pruning function of `side`, on the layer of that name in `model`."""
    # TP's pruners are shared objects that read the dimension to prune from an attribute
    # (as its `Dependency.__call__` sets it), for parameters and LayerNorms.
    side.handler.__self__.pruning_dim = side.dim  # type: ignore[attr-defined]
    if not side.param:
        side.handler(model.get_submodule(side.name), idxs)
        return
    owner, _, attr = side.name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    setattr(module, attr, side.handler(model.get_parameter(side.name), idxs))


def check_runs(
    model: nn.Module,
    example_input: torch.Tensor,
    expected: tuple[int, ...],
    pruned: list[str],
    uncalled: list[str],
) -> None:
    """Raise if the pruned `model` fails on `example_input` or changes its output shape.

    `uncalled` are the conv/linear layers the trace never saw called: their weights are used
    by functional calls (torchvision's Swin runs `F.linear(x, self.qkv.weight)`), which
    Torch-Pruning cannot follow, so their inputs are not pruned with their producers.
    """
    try:
        with tracing(model), torch.no_grad():
            shape = tuple(model(example_input).shape)
    except RuntimeError as e:
        functional = (
            f"; these layers are not called as modules, their weights are used by functional "
            f"calls the trace cannot follow: {uncalled}"
            if uncalled
            else ""
        )
        raise ValueError(
            f"prune: the pruned model fails on the example input ({e}); its forward "
            "probably reshapes with a width stored when it was built (a `hidden_dim`, an "
            "attention that reshapes to its input width instead of num_heads * head_dim)"
            f"{functional}. Groups pruned: {pruned}; keep the one that breaks with exclude=..."
        ) from e
    if shape != expected:
        raise ValueError(
            f"prune: pruning {pruned} changed the output shape from {expected} "
            f"to {shape}; keep those groups with exclude=..."
        )
