"""Coupling groups from Torch-Pruning's dependency graph, channel selection and plan replay.

Torch-Pruning traces the model with autograd and returns, for every prunable output dimension,
the group of coupled layers that must lose the same channels: conv -> BN -> next conv's inputs,
every member of a residual sum, a depthwise conv with the layer that feeds it, concatenation
slices, and a linear head behind a flatten. We name each group by its first member (in
`named_modules` order), which is stable across fresh instances of the same architecture, so a
plan recorded on one instance replays on another.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from lyceum.compression.pruning.config import Criterion
from lyceum.compression.pruning.plan import PlanStep, PrunePlan

_LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass
class Group:
    """One set of coupled output channels that can be pruned together."""

    name: str
    layers: list[str]
    channels: int
    root: nn.Module
    # Grouped convs among the members split the channels into this many equal blocks, and
    # every block must lose the same positions (see `channels_to_remove`).
    blocks: int = 1

    def removal_count(self, ratio: float) -> int:
        """Channels removed at `ratio`: rounded per block, at least one channel kept per block."""
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"group {self.name!r}: ratio must be in [0, 1), got {ratio}")
        size = self.channels // self.blocks
        return self.blocks * min(size - 1, round(ratio * size))


def _conv_blocks(conv: nn.Module) -> int:
    """Channel blocks a grouped (not depthwise) conv imposes on the channels it touches."""
    if isinstance(conv, nn.modules.conv._ConvNd) and 1 < conv.groups < conv.out_channels:
        return int(conv.groups)
    return 1


@contextlib.contextmanager
def _tracing(model: nn.Module) -> Iterator[None]:
    # Tracing runs a forward pass: in train mode it would update batch-norm running stats,
    # and tp needs autograd on (it reads grad_fn), so force eval + grad for the trace only.
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        model.train(was_training)


def _output_layers(dg: tp.DependencyGraph) -> set[nn.Module]:
    """Conv/linear layers whose outputs reach the model output without another such layer."""
    sinks = [node for node in dg.module2node.values() if not node.outputs]
    found: set[nn.Module] = set()
    seen: set[int] = set()
    stack = list(sinks)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node.module, _LAYER_TYPES):
            found.add(node.module)
            continue
        stack.extend(node.inputs)
    return found


class ChannelGraph:
    """Prunable groups of `model` for `example_input`, with selection by name regex.

    A group is selected when one of its layers matches `include` (`re.fullmatch`, default all)
    and none matches `exclude`. Groups whose channels reach the model output (the classifier's
    outputs) are never selected: pruning them would change what the model predicts.
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        *,
        include: str | None = None,
        exclude: str | None = None,
    ) -> None:
        self.model = model
        self.example_input = example_input
        with _tracing(model):
            self.dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input, verbose=False
            )
        order = {module: i for i, (_, module) in enumerate(model.named_modules())}
        names = {module: name for name, module in model.named_modules()}
        self._names = names
        include_re = re.compile(include) if include is not None else None
        exclude_re = re.compile(exclude) if exclude is not None else None
        self.groups: list[Group] = []
        for g in self.dg.get_all_groups(ignored_layers=list(_output_layers(self.dg))):
            members = [
                dep.target.module
                for dep, _ in g
                if isinstance(dep.target.module, _LAYER_TYPES)
                and self.dg.is_out_channel_pruning_fn(dep.handler)
            ]
            members = sorted(set(members), key=lambda m: order[m])
            layers = [names[m] for m in members]
            if include_re is not None and not any(include_re.fullmatch(n) for n in layers):
                continue
            if exclude_re is not None and any(exclude_re.fullmatch(n) for n in layers):
                continue
            blocks = max(_conv_blocks(dep.target.module) for dep, _ in g)
            self.groups.append(
                Group(
                    name=layers[0],
                    layers=layers,
                    channels=len(g[0].idxs),
                    root=members[0],
                    blocks=blocks,
                )
            )
        self.groups.sort(key=lambda grp: order[grp.root])

    def _group_of(self, root: nn.Module, idxs: list[int]) -> Any:
        pruner = self.dg.get_pruner_of_module(root)
        return self.dg.get_pruning_group(root, pruner.prune_out_channels, idxs)

    def importance(self, group: Group, criterion: Criterion) -> torch.Tensor:
        """One score per output channel of `group` (higher = more important)."""
        scorer: tp.importance.Importance
        if criterion == "l1":
            scorer = tp.importance.GroupMagnitudeImportance(p=1, normalizer=None)
        elif criterion == "l2":
            scorer = tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
        elif criterion == "fpgm":
            scorer = tp.importance.FPGMImportance(p=2, normalizer=None)
        else:
            raise ValueError(f"unknown criterion {criterion!r}; use 'l1', 'l2' or 'fpgm'")
        with torch.no_grad():
            scores = scorer(self._group_of(group.root, list(range(group.channels))))
        if scores is None or len(scores) != group.channels:
            raise ValueError(f"group {group.name!r}: importance {criterion!r} gave no scores")
        return scores

    def channels_to_remove(self, group: Group, ratio: float, criterion: Criterion) -> list[int]:
        """The least important `group.removal_count(ratio)` channels (at least one is kept).

        With grouped convs in the group (`blocks` > 1), importance is averaged over the blocks
        and the same positions are removed from every block, which keeps each conv group the
        same width (Torch-Pruning's pruners do the same; its raw dependency graph does not).
        """
        n = group.removal_count(ratio)
        if n <= 0:
            return []
        size = group.channels // group.blocks
        scores = self.importance(group, criterion).view(group.blocks, size).mean(0)
        positions = torch.argsort(scores, stable=True)[: n // group.blocks]
        return sorted(b * size + int(i) for b in range(group.blocks) for i in positions)

    def prune_group(self, group: Group, removed: list[int]) -> PlanStep:
        """Remove `removed` output channels from `group` and all coupled layers."""
        g = self._group_of(group.root, removed)
        members: dict[str, list[int]] = {}
        for dep, idxs in g:
            module = dep.target.module
            if isinstance(module, _LAYER_TYPES) and self.dg.is_out_channel_pruning_fn(dep.handler):
                members[self._names[module]] = sorted(int(i) for i in idxs)
        if not self.dg.check_pruning_group(g):
            raise ValueError(f"group {group.name!r}: removing {removed} would empty a layer")
        g.prune()
        return PlanStep(layer=group.name, removed=sorted(removed), members=members)

    def plan_input(self) -> tuple[list[int], str]:
        return list(self.example_input.shape), str(self.example_input.dtype).removeprefix("torch.")


def prune_by_ratios(
    model: nn.Module,
    example_input: torch.Tensor,
    ratios: dict[str, float],
    criterion: Criterion,
    *,
    include: str | None = None,
    exclude: str | None = None,
) -> PrunePlan:
    """Prune `model` in place, removing `ratios[group]` of each named group's channels."""
    graph = ChannelGraph(model, example_input, include=include, exclude=exclude)
    by_name = {g.name: g for g in graph.groups}
    unknown = sorted(set(ratios) - set(by_name))
    if unknown:
        raise ValueError(
            f"ratios name unknown or unselected groups {unknown}; prunable groups are "
            f"{sorted(by_name)}"
        )
    # Pick every group's channels before pruning any: importance is then computed on the
    # unpruned weights, independent of the order the groups are processed in.
    selected = {
        name: graph.channels_to_remove(by_name[name], ratio, criterion)
        for name, ratio in ratios.items()
    }
    steps = [graph.prune_group(by_name[n], idxs) for n, idxs in selected.items() if idxs]
    shape, dtype = graph.plan_input()
    return PrunePlan(input_shape=shape, input_dtype=dtype, steps=steps)


def apply_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Replay `plan` on a fresh, unpruned `model` in place."""
    graph = ChannelGraph(model, plan.example_input())
    by_name = {g.name: g for g in graph.groups}
    for step in plan.steps:
        group = by_name.get(step.layer)
        if group is None:
            raise ValueError(
                f"plan: layer {step.layer!r} is not a prunable group of this model (groups: "
                f"{sorted(by_name)}); build the model with the factory used when pruning"
            )
        if step.removed and max(step.removed) >= group.channels:
            raise ValueError(
                f"plan: layer {step.layer!r} has {group.channels} channels but the plan removes "
                f"index {max(step.removed)}; the model's width differs from the pruned one"
            )
        graph.prune_group(group, list(step.removed))
    return model
