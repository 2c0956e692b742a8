"""Torch-Pruning's dependency graph, with what it does not map fixed on top of it.

Torch-Pruning (TP) traces the model's autograd graph and maps channel indices across every op
between two layers. It handles residual sums, depthwise convs, concatenation and split along
channels, flatten into a linear layer, LayerNorm, `nn.MultiheadAttention`, and unwrapped
parameters such as a ViT's class token and position embedding. What it does not map is fixed
here, on TP's own graph:

- a channel split (`x.chunk(2, dim=1)`): TP's trace ignores which output of the split each
  consumer reads and takes them in the order it met them, and with torch 2.13's autograd
  (`_saved_self_sym_sizes`) it infers the split sizes from the consumers' widths, which
  gives a concat's width for a half (ShuffleNetV2's units). `_fix_splits` reads the sizes and
  the output each consumer reads from autograd, then TP's index mapping runs again on them.
- a channel concatenation whose result is flattened into a linear layer: TP compares the
  concat's width with the linear's (flattened) input width, finds them different, concludes
  the concat is not along channels and leaves its inputs unmapped, so every branch lands at
  offset 0 of the linear's inputs. `_map_flattened_concats` installs TP's own concat mapping.
- a channel shuffle (`view(B, G, C/G, H, W)`, `transpose(1, 2)`, `view(B, C, H, W)`, as in
  ShuffleNetV2): TP sees two reshapes and derives a flatten stride from them (a division by
  zero, or a wrong stride); its benchmarks list ShuffleNetV2 as unsupported. The two reshapes
  are marked element-wise before TP maps anything and `_map_shuffles` installs the shuffle's
  permutation instead.
- structures that remove channels only in units: a grouped conv (the same positions in every
  group), `nn.MultiheadAttention` (its embedding in `num_heads` equal blocks), attention heads
  of a qkv linear (whole heads), a shuffle or a `chunk` (the same positions in each block);
  a split into sizes written in the code removes none. TP applies the first three only
  inside its own pruners (`out_channel_groups`, `num_heads`) and the others not at all; its
  raw graph has none, so `constraints` lists them for `_graph.ChannelGraph` to enforce.
- per-head parameters of an attention module (Swin's relative position bias table): TP maps
  a head's index onto its feature indices; they are left out of the trace and pruned with
  their heads (`AttentionHeads`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops
from torch_pruning._helpers import _HybridIndex
from torch_pruning.dependency import index_mapping, shape_infer
from torch_pruning.dependency.index_mapping import _ConcatIndexMapping
from torch_pruning.dependency.node import Node

from lyceum.compression.pruning._heads import AttentionHeads, find_attention_heads

# A dim saved by autograd for a negative argument wraps around as an unsigned 64-bit value.
_WRAP = 2**64
_WIDTHS = ("in_channels", "out_channels", "in_features", "out_features", "embed_dim")


@dataclass(frozen=True)
class Constraint:
    """Channels of one layer side that must be removed together.

    `blocks`: the index space is `size` equal blocks and a position goes from all of them at
    once (grouped convs, attention embeddings, a shuffle's input, a chunk's input). `chunks`:
    the index space is made of consecutive runs of `size` indices that go whole (attention
    heads). `fixed`: nothing can go (a split into sizes written in the forward's code).
    """

    kind: Literal["blocks", "chunks", "fixed"]
    size: int
    width: int

    def classes(self) -> list[list[int]]:
        """The sets of indices that are removed together."""
        if self.width % self.size:
            raise ValueError(f"{self.width} channels do not split into {self.kind} of {self.size}")
        if self.kind == "fixed":
            return [list(range(self.width))]
        if self.kind == "chunks":
            return [list(range(c, c + self.size)) for c in range(0, self.width, self.size)]
        block = self.width // self.size
        return [[b * block + p for b in range(self.size)] for p in range(block)]


@dataclass(frozen=True)
class _Shuffle:
    first: Node  # view(B, G, C/G, H, W)
    groups: int
    channels: int


class _Graph(tp.DependencyGraph):
    """TP's graph with channels-last slices and channel shuffles marked before TP's index
    mapping runs."""

    shuffles: list[_Shuffle]

    def _trace(self, model: nn.Module, *args: Any, **kwargs: Any) -> dict[Any, Node]:
        module2node: dict[Any, Node] = super()._trace(model, *args, **kwargs)
        for node in module2node.values():
            if node.type == ops.OPTYPE.SLICE and not self._slices_channels(node):
                node.type = ops.OPTYPE.ELEMENTWISE
        self.shuffles = _find_shuffles(module2node)
        return module2node

    def _slices_channels(self, node: Node) -> bool:
        """Whether a slice TP maps as a channel slice (dim 1 of 4D, dim 2 of 3D) is one.

        TP assumes channels first; in a channels-last tensor (Swin's `x[..., 0::2, 0::2, :]`)
        that dim is a spatial one, and slicing it keeps every channel. It is a channel slice
        only if that dim is as wide as the channels TP infers for the sliced tensor.
        """
        sizes = _saved_sizes(node)
        dim = {4: 1, 3: 2}.get(len(sizes)) if sizes is not None else None
        if sizes is None or dim is None or node.module.dim != dim:
            return True
        width = shape_infer.infer_out_channels_recursively(self, node.inputs[0], [0])
        return width is None or width == sizes[dim]


def _saved_sizes(node: Node) -> tuple[int, ...] | None:
    grad_fn = node.grad_fn
    for attr in ("_saved_self_sym_sizes", "_saved_self_sizes"):
        sizes = getattr(grad_fn, attr, None)
        if sizes is not None:
            return tuple(int(s) for s in sizes)
    return None


def _is_transpose_1_2(node: Node) -> bool:
    grad_fn = node.grad_fn
    name = grad_fn.name() if hasattr(grad_fn, "name") else ""
    if name == "TransposeBackward0":
        return {int(grad_fn._saved_dim0), int(grad_fn._saved_dim1)} == {1, 2}
    if name == "PermuteBackward0":
        return tuple(int(d) for d in grad_fn._saved_dims) == (0, 2, 1, 3, 4)
    return False


def _find_shuffles(module2node: dict[Any, Node]) -> list[_Shuffle]:
    """Channel shuffles in the traced graph; their two reshapes are marked element-wise."""
    found = []
    for node in module2node.values():
        sizes = _saved_sizes(node)
        if node.type != ops.OPTYPE.RESHAPE or sizes is None or len(sizes) != 4:
            continue
        if len(node.outputs) != 1 or not _is_transpose_1_2(node.outputs[0]):
            continue
        after = node.outputs[0]
        while len(after.outputs) == 1 and after.outputs[0].type == ops.OPTYPE.ELEMENTWISE:
            after = after.outputs[0]  # a clone from .contiguous()
        last = after.outputs[0] if len(after.outputs) == 1 else None
        five = _saved_sizes(last) if last is not None else None
        if last is None or last.type != ops.OPTYPE.RESHAPE or five is None or len(five) != 5:
            continue
        channels, groups = sizes[1], five[2]
        if five[1] * groups != channels or groups < 2:
            continue
        node.type = last.type = ops.OPTYPE.ELEMENTWISE
        found.append(_Shuffle(first=node, groups=groups, channels=channels))
    return found


class _Permutation:
    """A TP index mapping through a channel shuffle (input channel -> output position)."""

    def __init__(self, channels: int, groups: int, reverse: bool) -> None:
        block = channels // groups
        forward = [(j % block) * groups + j // block for j in range(channels)]
        self.table = forward if not reverse else sorted(range(channels), key=forward.__getitem__)

    def __call__(self, idxs: Sequence[Any]) -> list[Any]:
        return [type(i)(idx=self.table[i.idx], root_idx=i.root_idx) for i in idxs]


def _dep(source: Node, target: Node, used: list[Any]) -> Any:
    dep = next(d for d in source.dependencies if d.target is target and d not in used)
    used.append(dep)
    return dep


def _map_shuffles(dg: _Graph) -> None:
    for shuffle in dg.shuffles:
        node = shuffle.first
        (before,) = node.inputs
        _dep(before, node, []).index_mapping[0] = _Permutation(
            shuffle.channels, shuffle.groups, reverse=False
        )
        _dep(node, before, []).index_mapping[0] = _Permutation(
            shuffle.channels, shuffle.groups, reverse=True
        )


def _fix_splits(dg: _Graph) -> dict[Node, int]:
    """Split sizes and consumer order from autograd; returns the splits this cannot fix, with
    their input width."""
    unfixed = {}
    for node in dg.module2node.values():
        if node.type != ops.OPTYPE.SPLIT:
            continue
        grad_fn = node.grad_fn
        total = getattr(grad_fn, "_saved_self_sym_sizes", None)
        dim = int(getattr(grad_fn, "_saved_dim", -1))
        if total is None or dim != 1:
            continue
        width = int(total[1])
        if hasattr(grad_fn, "_saved_split_sizes"):
            sizes = [int(s) for s in grad_fn._saved_split_sizes]
        else:
            step = int(grad_fn._saved_split_size)
            sizes = [min(step, width - start) for start in range(0, width, step)]
        reads = sorted(
            (nr, i)
            for i, consumer in enumerate(dict.fromkeys(node.outputs))
            for f, nr in consumer.grad_fn.next_functions
            if f is grad_fn
        )
        if [nr for nr, _ in reads] != list(range(len(sizes))):
            unfixed[node] = width  # an output read twice or not at all: TP cannot express it
            continue
        consumers = list(dict.fromkeys(node.outputs))
        node.outputs[:] = [consumers[i] for _, i in reads]
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        node.module.split_sizes, node.module.offsets = sizes, offsets
    return unfixed


def _split_constraint(node: Node) -> Constraint | None:
    """`chunk(n)` keeps its parts equal only if each loses the same positions; a split into
    sizes fixed in the code cannot lose any channel."""
    grad_fn = node.grad_fn
    sizes = node.module.split_sizes
    if int(getattr(grad_fn, "_saved_dim", -1)) != 1 or not sizes:
        return None
    width = sum(sizes)
    if hasattr(grad_fn, "_saved_split_size") and len(set(sizes)) == 1:
        return Constraint("blocks", len(sizes), width)
    return Constraint("fixed", 1, width)


def _remap(dg: _Graph) -> None:
    """Run TP's index mapping again from scratch (after `_fix_splits` changed its inputs)."""
    for node in dg.module2node.values():
        for dep in node.dependencies:
            dep.index_mapping = [None, None]
        if node.type == ops.OPTYPE.CONCAT:
            node.module.concat_sizes = node.module.offsets = None
    index_mapping.update_index_mapping(dg)


def _concat_width(node: Node) -> tuple[int, ...] | None:
    """The concat's output shape as saved by the first consumer that keeps one (a reshape)."""
    while len(node.outputs) == 1:
        node = node.outputs[0]
        sizes = _saved_sizes(node)
        if sizes is not None:
            return sizes
        if node.type != ops.OPTYPE.ELEMENTWISE:
            return None
    return None


def _map_flattened_concats(dg: _Graph) -> None:
    for node in dg.module2node.values():
        if node.type != ops.OPTYPE.CONCAT or not node.enable_index_mapping:
            continue
        sizes = node.module.concat_sizes
        if sizes is None or any(s is None for s in sizes):
            continue
        mapped = any(d.index_mapping[1] is not None for d in node.dependencies)
        shape = _concat_width(node)
        if mapped or shape is None or len(shape) not in (2, 4):
            continue
        dim = int(node.grad_fn._saved_dim)
        dim = dim - _WRAP if dim >= _WRAP // 2 else dim
        if dim % len(shape) != 1 or shape[1] != sum(sizes):
            continue
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        node.module.offsets = offsets
        into: list[Any] = []
        back: list[Any] = []
        for i, source in enumerate(node.inputs):
            span = offsets[i : i + 2]
            _dep(source, node, into).index_mapping[1] = _ConcatIndexMapping(span, reverse=False)
            _dep(node, source, back).index_mapping[1] = _ConcatIndexMapping(span, reverse=True)


def closure(
    dg: tp.DependencyGraph, module: nn.Module, channels: Sequence[int], bound: int
) -> dict[tuple[Node, Any], set[Any]] | None:
    """Every layer side that removing each of `module`'s output `channels` reaches.

    The traversal of TP's `get_pruning_group`, for many root channels at once and without
    its merge: each reached index keeps the root channel that reached it (`root_idx`), even
    where two root channels reach the same index (TP's merge keeps only the first). TP's index
    mappings are left as they are, not recomputed for every call as `get_pruning_group` does,
    which makes this fast enough to run for every channel of a model. Items on parameters TP
    was told to ignore are not reported, as TP's merge drops them. None if an index reaches
    `bound` (wider than any layer of the model): a mapping TP got wrong, which would grow
    without end.
    """
    root = dg.module2node[module]
    fn = dg.get_pruner_of_module(module).prune_out_channels
    if isinstance(module, nn.modules.conv._ConvNd) and 1 < module.out_channels == module.groups:
        fn = tp.prune_depthwise_conv_out_channels
    start = [_HybridIndex(idx=c, root_idx=c) for c in channels]
    reached: dict[tuple[Node, Any], set[Any]] = {(root, fn): set(start)}
    stack = [(root, fn, start)]
    while stack:
        node, trigger, idxs = stack.pop()
        for dep in node.dependencies:
            if not dep.is_triggered_by(trigger):
                continue
            mapped = idxs
            for mapping in dep.index_mapping:
                if mapping is not None:
                    mapped = mapping(mapped)
            if any(not 0 <= i.idx < bound for i in mapped):
                return None
            seen = reached.setdefault((dep.target, dep.handler), set())
            fresh = [i for i in mapped if i not in seen]
            if fresh:
                seen.update(fresh)
                stack.append((dep.target, dep.handler, fresh))
    ignored = {id(p) for p in dg.ignored_params}
    return {key: idxs for key, idxs in reached.items() if id(key[0].module) not in ignored}


@dataclass
class TracedGraph:
    """TP's graph of `model` plus the removal units TP's raw graph does not enforce."""

    dg: tp.DependencyGraph
    constraints: dict[tuple[Node, Any], list[Constraint]]
    attention: list[AttentionHeads]
    bound: int  # more than any channel index: every layer's inputs, outputs and parameters


@contextlib.contextmanager
def tracing(model: nn.Module) -> Iterator[None]:
    # Tracing runs a forward pass: in train mode it would update batch-norm running stats,
    # and tp needs autograd on (it reads grad_fn), so force eval + grad for the trace only.
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        model.train(was_training)


def trace(model: nn.Module, example_input: torch.Tensor) -> TracedGraph:
    """Build TP's dependency graph of `model` for `example_input`, with the fixes above."""
    attention = find_attention_heads(model)
    # Per-head parameters are pruned with their heads (`_graph`), not traced: TP would map
    # a head's index onto its feature indices.
    per_head = [model.get_parameter(p) for heads in attention for p, _ in heads.head_params]
    dg = _Graph()
    with tracing(model):
        dg.build_dependency(
            model, example_inputs=example_input, verbose=False, ignored_params=per_head
        )
    unfixed = _fix_splits(dg)
    _remap(dg)
    _map_flattened_concats(dg)
    _map_shuffles(dg)
    constraints: dict[tuple[Node, Any], list[Constraint]] = {}

    def add(module: Any, handler: Any, constraint: Constraint) -> None:
        node = dg.module2node.get(module)
        if node is not None:
            constraints.setdefault((node, handler), []).append(constraint)

    for module in model.modules():
        pruner = dg.get_pruner_of_module(module)
        if isinstance(module, nn.modules.conv._ConvNd):
            g, c_in, c_out = int(module.groups), int(module.in_channels), int(module.out_channels)
            # Depthwise convs (groups == out_channels) simply follow their input.
            if 1 < g != c_out:
                add(module, pruner.prune_out_channels, Constraint("blocks", g, c_out))
                add(module, pruner.prune_in_channels, Constraint("blocks", g, c_in))
        elif isinstance(module, nn.MultiheadAttention) and module.num_heads > 1:
            blocks = Constraint("blocks", module.num_heads, module.embed_dim)
            add(module, pruner.prune_out_channels, blocks)
    for heads in attention:
        for projection in heads.projections:
            layer = cast(nn.Linear, model.get_submodule(projection))
            prune_out = dg.get_pruner_of_module(layer).prune_out_channels
            width = layer.out_features
            if len(heads.projections) == 1:  # q, k and v of a head go together
                add(layer, prune_out, Constraint("blocks", 3, width))
            add(layer, prune_out, Constraint("chunks", heads.head_dim, width))
    for node in dg.module2node.values():
        split = _split_constraint(node) if node.type == ops.OPTYPE.SPLIT else None
        if node in unfixed:
            split = Constraint("fixed", 1, unfixed[node])
        if split is not None:
            fn = dg.get_pruner_of_module(node.module).prune_out_channels
            constraints.setdefault((node, fn), []).append(split)
    for shuffle in dg.shuffles:
        pruner = dg.get_pruner_of_module(shuffle.first.module)
        constraints.setdefault((shuffle.first, pruner.prune_out_channels), []).append(
            Constraint("chunks", shuffle.groups, shuffle.channels)
        )
    widths = [p.numel() for p in model.parameters()]
    widths += [int(getattr(m, a)) for m in model.modules() for a in _WIDTHS if hasattr(m, a)]
    return TracedGraph(dg, constraints, attention, bound=max(widths, default=0) + 1)
