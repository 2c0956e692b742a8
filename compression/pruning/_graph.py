"""Coupling groups of a model's channels, channel selection, surgery and plan replay.

Torch-Pruning's graph (`_tracing.trace`) gives, for one output channel of a conv or linear
layer (a *root*), every layer side that must lose a channel with it: conv -> BN -> the next
conv's inputs, all members of a residual sum, a depthwise conv with its producer, concat
offsets, a linear behind a flatten, LayerNorms, a ViT's class token and position embedding.
Each root channel is an *element*. Elements whose closures share an index, or whose indices a
`Constraint` ties together (the same position in every conv group, a whole attention head, a
shuffle's blocks), form one *unit*, removed whole; roots that share units form one *group*,
named by its first root in `named_modules` order, which is stable across fresh instances.

All of it is computed once, on the unpruned model and in its channel numbering. Pruning a
selection of units applies, to each layer side, the union of their indices with
Torch-Pruning's pruning functions: the result does not depend on the order of the groups, and
a copy of the model (same module names) is pruned without tracing it again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops

from lyceum.compression.pruning._criteria import group_scores
from lyceum.compression.pruning._surgery import Side, apply_side, check_runs, prune_heads
from lyceum.compression.pruning._tracing import TracedGraph, closure, trace, tracing
from lyceum.compression.pruning.config import Criterion
from lyceum.compression.pruning.plan import PlanStep, PrunePlan

_ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
# Layers listed as a group's members (what include/exclude match and the plan records).
_LAYER_TYPES = (*_ROOT_TYPES, nn.MultiheadAttention)
_PIN = -1  # the union-find element of everything that must stay


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The pin is always a representative, so "is pinned" is find(x) == _PIN.
            self.parent[rb if ra == _PIN else ra] = ra if ra == _PIN else rb


@dataclass(frozen=True)
class _Element:
    """One output channel of a root layer and every layer side its removal reaches."""

    root: int
    channel: int
    sides: tuple[tuple[Side, tuple[int, ...]], ...]


@dataclass
class Group:
    """Coupled output channels of one or more root layers, removed in whole `units`.

    Channels are numbered root by root (in `named_modules` order), each root's channels in
    its own order: for the usual group of one root, channel `i` is the root's output `i`.
    """

    name: str
    layers: list[str]
    channels: int
    units: list[list[int]]


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
        if isinstance(node.module, _ROOT_TYPES):
            found.add(node.module)
            continue
        stack.extend(node.inputs)
    return found


class ChannelGraph:
    """Prunable groups of `model` for `example_input`, with selection by name regex.

    A group is selected when one of its layers matches `include` (`re.fullmatch`, default all)
    and none matches `exclude`. Channels that reach the model output (the classifier's
    outputs) are never removed: that would change what the model predicts.
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
        self._spent = False
        self._scores: dict[Criterion, list[torch.Tensor]] = {}
        self._rankings: dict[
            tuple[str, Criterion], tuple[dict[Side, int], list[tuple[list[int], dict[Side, int]]]]
        ] = {}
        traced = trace(model, example_input)
        with tracing(model), torch.no_grad():
            self._output_shape = tuple(model(example_input).shape)
        self._dg = traced.dg
        self._attention = traced.attention
        inside_attention = {
            id(m)
            for a in model.modules()
            if isinstance(a, nn.MultiheadAttention)
            for m in a.modules()
        }
        self._uncalled = [
            name
            for name, m in model.named_modules()
            if isinstance(m, _ROOT_TYPES)
            and m not in traced.dg.module2node
            and id(m) not in inside_attention
        ]
        self._roots: list[tuple[str, nn.Module]] = []
        self._elements: list[_Element] = []
        uf = self._trace_elements(traced)
        self._numbering: dict[str, list[int]] = {}
        self.all_groups = self._make_groups(uf)
        include_re = re.compile(include) if include is not None else None
        exclude_re = re.compile(exclude) if exclude is not None else None
        self.groups = [
            g
            for g in self.all_groups
            if (include_re is None or any(include_re.fullmatch(n) for n in g.layers))
            and not (exclude_re is not None and any(exclude_re.fullmatch(n) for n in g.layers))
        ]

    def _trace_elements(self, traced: TracedGraph) -> _UnionFind:
        """Every root channel's closure, united by shared indices and by the constraints."""
        dg = traced.dg
        names = {m: n for n, m in self.model.named_modules()}
        params = {p: n for n, p in self.model.named_parameters()}
        outputs = _output_layers(dg)
        uf = _UnionFind()
        uf.find(_PIN)
        reach: dict[tuple[Any, Any], dict[int, int]] = {}
        for name, module in self.model.named_modules():
            node = dg.module2node.get(module)
            if node is None or not isinstance(module, _ROOT_TYPES) or module in outputs:
                continue
            fn = dg.get_pruner_of_module(module).prune_out_channels
            # A root already reached (a residual member, a depthwise conv) adds nothing new.
            known = set(reach.get((node, fn), {})) | set(
                reach.get((node, tp.prune_depthwise_conv_out_channels), {})
            )
            fresh = [c for c in range(int(dg.get_out_channels(module))) if c not in known]
            if not fresh:
                continue
            closed = closure(dg, module, fresh, traced.bound)
            if closed is None:  # TP cannot map this layer's channels: they stay
                continue
            self._roots.append((name, module))
            first = len(self._elements)
            element_of = {c: first + i for i, c in enumerate(fresh)}
            sides: dict[int, dict[Side, list[int]]] = {e: {} for e in element_of.values()}
            for (target, handler), hybrid in closed.items():
                is_out = dg.is_out_channel_pruning_fn(handler)
                pinned = target.type == ops.OPTYPE.OUTPUT or (is_out and target.module in outputs)
                side_name = names.get(target.module) or params.get(target.module)
                side = None
                if side_name is not None:
                    param = target.type == ops.OPTYPE.PARAMETER
                    side = Side(side_name, param, handler, target.pruning_dim, is_out)
                for index in hybrid:
                    element = element_of[index.root_idx]
                    seen = reach.setdefault((target, handler), {}).setdefault(index.idx, element)
                    uf.union(seen, element)
                    if pinned:
                        uf.union(_PIN, element)
                    if side is not None:
                        sides[element].setdefault(side, []).append(int(index.idx))
            for channel in fresh:
                element = element_of[channel]
                self._elements.append(
                    _Element(
                        len(self._roots) - 1,
                        channel,
                        tuple((side, tuple(sorted(i))) for side, i in sides[element].items()),
                    )
                )
        for key, constraints in traced.constraints.items():
            reached = reach.get(key, {})
            for constraint in constraints:
                for members in constraint.classes():
                    elements = {reached[i] for i in members if i in reached}
                    # A fixed split, or a class partly out of reach (fed by the model's
                    # inputs): none of it can go.
                    if elements and (
                        constraint.kind == "fixed" or any(i not in reached for i in members)
                    ):
                        elements.add(_PIN)
                    for element in elements:
                        uf.union(min(elements), element)
        return uf

    def _make_groups(self, uf: _UnionFind) -> list[Group]:
        """Units are the removable components; roots sharing a unit form one group."""
        units: dict[int, list[int]] = {}
        for element in range(len(self._elements)):
            rep = uf.find(element)
            if rep != _PIN:
                units.setdefault(rep, []).append(element)
        joined = _UnionFind()
        for unit in units.values():
            for element in unit:
                joined.union(self._elements[unit[0]].root, self._elements[element].root)
        roots_of: dict[int, list[int]] = {}
        for root in range(len(self._roots)):
            roots_of.setdefault(joined.find(root), []).append(root)
        order = {name: i for i, (name, _) in enumerate(self.model.named_modules())}
        groups = []
        for roots in roots_of.values():
            members = set(roots)
            elements = [e for e, el in enumerate(self._elements) if el.root in members]
            number = {e: n for n, e in enumerate(elements)}
            group_units = sorted(
                sorted(number[e] for e in unit)
                for unit in units.values()
                if self._elements[unit[0]].root in members
            )
            if not group_units:
                continue
            layers = {
                side.name
                for e in elements
                for side, _ in self._elements[e].sides
                if side.is_out
                and not side.param
                and isinstance(self.model.get_submodule(side.name), _LAYER_TYPES)
            }
            name = self._roots[min(roots)][0]
            self._numbering[name] = elements
            groups.append(
                Group(
                    name=name,
                    layers=sorted(layers, key=order.__getitem__),
                    channels=len(elements),
                    units=group_units,
                )
            )
        groups.sort(key=lambda g: order[g.name])
        return groups

    def _check_unspent(self) -> None:
        if self._spent:
            raise RuntimeError("ChannelGraph: its model was pruned; build a new graph for it")

    def scores(self, group: Group, criterion: Criterion) -> torch.Tensor:
        """One score per channel of `group` (higher = more important)."""
        self._check_unspent()
        if criterion not in self._scores:
            dg = self._dg
            per_root = []
            for name, module in self._roots:
                fn = dg.get_pruner_of_module(module).prune_out_channels
                width = int(dg.get_out_channels(module))
                full = dg.get_pruning_group(module, fn, list(range(width)))
                per_root.append(group_scores(full, width, criterion, name))
            self._scores[criterion] = per_root
        per_root = self._scores[criterion]
        elements = [self._elements[e] for e in self._numbering[group.name]]
        return torch.stack([per_root[el.root][el.channel] for el in elements])

    def select(self, group: Group, ratio: float, criterion: Criterion) -> list[int]:
        """The channels removed from `group` at `ratio`: the least important whole units.

        Units go in increasing mean score while the channels removed stay within half a
        unit of `ratio * channels`; a unit that would take the group's last index from a
        layer side is kept. More channels
        are removed as `ratio` grows (the selection at a larger ratio contains the smaller).
        """
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"group {group.name!r}: ratio must be in [0, 1), got {ratio}")
        target = ratio * group.channels
        if target <= 0:
            return []
        left = dict(self._ranked(group, criterion)[0])
        removed: list[int] = []
        for unit, loss in self._ranked(group, criterion)[1]:
            if len(removed) + len(unit) / 2 > target + 1e-9:
                break
            if any(left[side] <= n for side, n in loss.items()):
                continue
            for side, n in loss.items():
                left[side] -= n
            removed.extend(unit)
        return sorted(removed)

    def _ranked(
        self, group: Group, criterion: Criterion
    ) -> tuple[dict[Side, int], list[tuple[list[int], dict[Side, int]]]]:
        """The group's share of every layer side, and its units by increasing mean score,
        each with the indices it removes per side (computed once per group and criterion)."""
        key = (group.name, criterion)
        if key not in self._rankings:
            scores = self.scores(group, criterion)
            units = sorted(group.units, key=lambda u: (float(scores[u].mean()), u[0]))
            # Each group keeps at least one of its indices on every side it touches: a
            # concat branch, a layer's inputs, never disappear entirely.
            share = self._side_counts(group, list(range(group.channels)))
            self._rankings[key] = (share, [(u, self._side_counts(group, u)) for u in units])
        return self._rankings[key]

    def _side_counts(self, group: Group, channels: list[int]) -> dict[Side, int]:
        """How many indices of each layer side `channels` of `group` remove."""
        counts: dict[Side, int] = {}
        numbering = self._numbering[group.name]
        for n in channels:
            for side, idxs in self._elements[numbering[n]].sides:
                counts[side] = counts.get(side, 0) + len(idxs)
        return counts

    def prune(self, model: nn.Module, removed: dict[str, list[int]]) -> list[PlanStep]:
        """Remove `removed[group]` channels (whole units) from `model`, in place.

        `model` is the graph's model or a copy of it (a `copy.deepcopy`, or a fresh instance
        from the same factory): layers are found by name. Returns one plan step per group.
        """
        self._check_unspent()
        by_name = {g.name: g for g in self.all_groups}
        indices: dict[Side, set[int]] = {}
        steps = []
        for name, channels in removed.items():
            group = by_name.get(name)
            if group is None:
                raise ValueError(
                    f"group {name!r} is not a prunable group of this model (groups: "
                    f"{sorted(by_name)}); build the model with the factory used when pruning"
                )
            if not channels:
                continue
            if max(channels) >= group.channels or min(channels) < 0:
                raise ValueError(
                    f"group {name!r} has {group.channels} channels but the plan removes index "
                    f"{max(channels)}; the model's width differs from the pruned one"
                )
            chosen = set(channels)
            broken = [u for u in group.units if chosen.intersection(u) and not chosen.issuperset(u)]
            if broken or not chosen.issubset(c for u in group.units for c in u):
                raise ValueError(
                    f"group {name!r}: channels {sorted(chosen)} split a unit that is removed "
                    f"whole (units: {group.units}); the plan was made for another model"
                )
            members: dict[str, list[int]] = {}
            numbering = self._numbering[name]
            for n in sorted(chosen):
                for side, side_idxs in self._elements[numbering[n]].sides:
                    indices.setdefault(side, set()).update(side_idxs)
                    if side.is_out and side.name in group.layers:
                        members.setdefault(side.name, []).extend(side_idxs)
            steps.append(
                PlanStep(
                    layer=name,
                    removed=sorted(chosen),
                    members={k: sorted(set(v)) for k, v in members.items()},
                )
            )
        if model is self.model:
            self._spent = True
        for side, idxs in indices.items():
            apply_side(model, side, sorted(idxs))
        for heads in self._attention:
            prune_heads(model, heads, indices)
        pruned = [s.layer for s in steps]
        check_runs(model, self.example_input, self._output_shape, pruned, self._uncalled)
        return steps

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
    graph: ChannelGraph | None = None,
) -> PrunePlan:
    """Prune `model` in place, removing `ratios[group]` of each named group's channels.

    `graph` is a `ChannelGraph` of `model`, or of the model `model` was copied from, to
    reuse instead of tracing `model` again.
    """
    if graph is None:
        graph = ChannelGraph(model, example_input, include=include, exclude=exclude)
    by_name = {g.name: g for g in graph.groups}
    unknown = sorted(set(ratios) - set(by_name))
    if unknown:
        raise ValueError(
            f"ratios name unknown or unselected groups {unknown}; prunable groups are "
            f"{sorted(by_name)}"
        )
    # Every group's channels are picked on the unpruned weights, independent of order.
    removed = {name: graph.select(by_name[name], r, criterion) for name, r in ratios.items()}
    steps = graph.prune(model, {n: c for n, c in removed.items() if c})
    shape, dtype = graph.plan_input()
    return PrunePlan(input_shape=shape, input_dtype=dtype, steps=steps)


def apply_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Replay `plan` on a fresh, unpruned `model` in place."""
    graph = ChannelGraph(model, plan.example_input())
    names = {g.name for g in graph.all_groups}
    for step in plan.steps:
        if step.layer not in names:
            raise ValueError(
                f"plan: layer {step.layer!r} is not a prunable group of this model (groups: "
                f"{sorted(names)}); build the model with the factory used when pruning"
            )
    graph.prune(model, {s.layer: list(s.removed) for s in plan.steps})
    return model
