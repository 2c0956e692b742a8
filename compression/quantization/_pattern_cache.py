"""Spare torchao the pattern graphs it exports again and again while it prepares and converts.

torchao's PT2E flow finds conv-BN, batch-norm and dropout subgraphs by matching against small
pattern graphs, and builds every pattern afresh with `torch.export` each time it needs one: 18
exports in `prepare_qat_pt2e`, 6 in every `.train()` / `.eval()` of a captured model, and 108
in `convert_pt2e` of a model with batch norm (`_fold_conv_bn_qat`: 2 patterns for each of 12
variants of 4 convolution kinds). Each export costs 0.2-1 s of CPU, so converting even a tiny
QAT model took 20-120 s. Two changes, neither of which changes a graph torchao produces:

- **Cache.** A pattern is a function (in torchao's `WrapperModule`) whose graph depends only on
  its code, the values its closure captured (flags such as `is_per_channel`, the conv
  function), the example inputs' shapes and dtypes, and grad mode, never the example values.
  That is the key; a pattern with anything unhashable in its closure is exported afresh.
  Callers get a deep copy, since some torchao passes edit a pattern graph in place.
- **No patterns for convolutions the model lacks.** The conv-BN fuse and fold passes try
  conv1d, conv2d, conv_transpose1d and conv_transpose2d in turn; a graph without, say, a
  conv1d node cannot match a conv1d pattern, so that pass runs only the graph clean-ups the
  full pass would have run, without exporting its patterns.

`install()` puts both in where the PT2E modules look the functions up, once per process, on the
first `quantize` / `convert`: the `.train()` / `.eval()` methods torchao binds to a captured
graph export patterns long after those verbs return. torchao is pinned (pyproject); if a
release moves these functions, `install()` leaves torchao as it is.
"""

from __future__ import annotations

import copy
import importlib
import threading
import warnings
from collections.abc import Callable, Hashable
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule

_QAT = "torchao.quantization.pt2e.qat_utils"
# The modules that import the export function by name (export_utils imports it from utils
# inside its functions, so patching utils covers it).
_EXPORTERS = (
    "torchao.quantization.pt2e.utils",
    _QAT,
    "torchao.quantization.pt2e.reference_representation_rewrite",
)
_EXPORT = "_get_aten_graph_module_for_pattern"
_FUSE = "_fuse_conv_bn_qat_helper"
_FOLD = "_fold_conv_bn_qat_helper"
_CONV_OPS = {
    F.conv1d: torch.ops.aten.conv1d,
    F.conv2d: torch.ops.aten.conv2d,
    F.conv_transpose1d: torch.ops.aten.conv_transpose1d,
    F.conv_transpose2d: torch.ops.aten.conv_transpose2d,
}

_lock = threading.Lock()
_graphs: dict[Hashable, GraphModule] = {}
_stats = {"exports": 0, "hits": 0, "passes_skipped": 0}
_installed = False


def install() -> bool:
    """Route torchao's pattern work through this module; True once installed (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return True
        exporters = [importlib.import_module(name) for name in _EXPORTERS]
        qat = importlib.import_module(_QAT)
        needed = [(m, _EXPORT) for m in exporters] + [(qat, _FUSE), (qat, _FOLD)]
        if not all(callable(getattr(m, name, None)) for m, name in needed):
            return False
        cached = _cached(getattr(exporters[0], _EXPORT))
        for module in exporters:
            setattr(module, _EXPORT, cached)
        setattr(qat, _FUSE, _only_if_present(getattr(qat, _FUSE), _fuse_clean_up))
        setattr(qat, _FOLD, _only_if_present(getattr(qat, _FOLD), _fold_clean_up(qat)))
        _installed = True
        return True


def stats() -> dict[str, int]:
    """Pattern exports run, cache hits and conv-BN passes skipped so far in this process."""
    with _lock:
        return dict(_stats)


def _cached(export: Callable[..., GraphModule]) -> Callable[..., GraphModule]:
    def get(
        pattern: Callable[..., Any],
        example_inputs: tuple[Any, ...],
        is_cuda: bool = False,
        **kwargs: Any,
    ) -> GraphModule:
        key = pattern_key(pattern, example_inputs, is_cuda, kwargs)
        graph = None
        if key is not None:
            with _lock:
                graph = _graphs.get(key)
                _stats["hits"] += graph is not None
        if graph is None:
            graph = export(pattern, example_inputs, is_cuda, **kwargs)
            with _lock:
                _stats["exports"] += 1
                if key is None:
                    return graph
                graph = _graphs.setdefault(key, graph)
        return _copy(graph)

    get.__wrapped__ = export  # type: ignore[attr-defined]
    return get


def _copy(graph: GraphModule) -> GraphModule:
    with warnings.catch_warnings():
        # Copying the graph's pytree specs trips torch's deprecation of its own `LeafSpec`
        # check, once per process: torch's wording, nothing a user can act on.
        warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
        return copy.deepcopy(graph)


def pattern_key(
    pattern: Callable[..., Any],
    example_inputs: tuple[Any, ...],
    is_cuda: bool,
    kwargs: dict[str, Any],
) -> Hashable | None:
    """What a pattern's exported graph depends on, or None where that cannot be told."""
    fn = getattr(pattern, "fn", pattern)
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    captured = tuple(cell.cell_contents for cell in fn.__closure__ or ())
    defaults = (fn.__defaults__, tuple(sorted((fn.__kwdefaults__ or {}).items())))
    inputs = tuple(_describe(x) for x in example_inputs)
    named = tuple((name, _describe(value)) for name, value in sorted(kwargs.items()))
    key = (code, captured, defaults, inputs, named, is_cuda, torch.is_grad_enabled())
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _describe(value: Any) -> Hashable:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type, value.requires_grad)
    return value


def _only_if_present(
    conv_bn_pass: Callable[..., GraphModule], clean_up: Callable[[GraphModule], None]
) -> Callable[..., GraphModule]:
    def run(m: GraphModule, conv_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> GraphModule:
        op = _CONV_OPS.get(conv_fn)
        if op is None or any(_calls(node, op) for node in m.graph.nodes):
            return conv_bn_pass(m, conv_fn, *args, **kwargs)
        clean_up(m)
        with _lock:
            _stats["passes_skipped"] += 1
        return m

    run.__wrapped__ = conv_bn_pass  # type: ignore[attr-defined]
    return run


def _calls(node: torch.fx.Node, op: Any) -> bool:
    target = node.target
    return node.op == "call_function" and (
        target is op or getattr(target, "overloadpacket", None) is op
    )


def _fuse_clean_up(m: GraphModule) -> None:
    # What `_fuse_conv_bn_qat_helper` does to a graph in which nothing matches.
    m.graph.eliminate_dead_code()
    m.recompile()


def _fold_clean_up(qat: ModuleType) -> Callable[[GraphModule], None]:
    # What `_fold_conv_bn_qat_helper` does to a graph in which nothing matches.
    def clean_up(m: GraphModule) -> None:
        m.graph.eliminate_dead_code()
        m.recompile()
        qat._duplicate_dequantize_node(m)
        m.recompile()
        qat._remove_extra_dequantize(m)
        m.graph.eliminate_dead_code()
        m.recompile()

    return clean_up
