"""Saving, safely loading and compiling int8 programs; optional ONNX QDQ export.

The int8 artefact is a `torch.export` program (`.pt2` archive): the graph as JSON and every
tensor as raw bytes. `torch.export.load` is *not* pickle-free in torch 2.13, though: it
unpickles weights/constants flagged `use_pickle` (tensor subclasses) and opaque objects, and it
falls back to an unrestricted `torch.load` (weights-only mode off) when the stored sample inputs
do not load weights-only. `load_int8` therefore inspects the archive first and refuses any of those
before calling `torch.export.load`; archives written by `save_program` never contain them.
"""

from __future__ import annotations

import io
import json
import logging
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export.pt2_archive import constants as _pt2

from .api import as_tuple, export_dynamic_batch

_log = logging.getLogger("lyceum.compression")


def export_program(
    model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]
) -> torch.export.ExportedProgram:
    """`torch.export` a (converted) model with a dynamic batch dimension."""
    return export_dynamic_batch(model, as_tuple(example_inputs))


# Per-node debugging metadata torch.export serialises into the graph JSON. For small models it
# outweighs the int8 weights (student_cnn: ~20 KB of a ~70 KB archive), and running the program
# does not need it.
_DEBUG_META = ("stack_trace", "source_fn_stack", "nn_module_stack", "torch_fn", "from_node")


def save_program(
    model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor], path: str | Path
) -> int:
    """Export `model` (int8 or fp32) and save it as a `.pt2` archive; returns its size in bytes.

    The archive keeps two rows of the example inputs (the batch dimension is dynamic) and drops
    per-node debugging metadata (stack traces, source module paths) to stay small.
    """
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(
            f"save_program: {str(path)!r} should end in '.pt2' (a torch.export archive)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    # clone(): a slice would make torch.export.save store the whole example batch's storage.
    small = tuple(a[:2].clone() for a in as_tuple(example_inputs))
    program = export_program(model, small)
    for node in program.graph.nodes:
        for key in _DEBUG_META:
            node.meta.pop(key, None)
    torch.export.save(program, path)
    return os.path.getsize(path)


def _check_archive(path: Path) -> None:
    """Refuse archive contents that would make `torch.export.load` unpickle or load code."""

    def refuse(why: str) -> ValueError:
        return ValueError(
            f"load_int8: refusing {str(path)!r}: {why}; re-export it with save_program"
        )

    if not zipfile.is_zipfile(path):
        raise refuse("not a .pt2 zip archive")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if not any(n.endswith(_pt2.ARCHIVE_FORMAT_PATH) for n in names):
            raise refuse("no archive_format entry (legacy format, loaded through pickle)")
        for name in names:
            inner = name.split("/", 1)[1] if "/" in name else name
            if inner.startswith((_pt2.AOTINDUCTOR_DIR, _pt2.EXECUTORCH_DIR, _pt2.EXTRA_DIR)):
                raise refuse(f"it contains {name!r} (compiled code or extra files)")
            if name.endswith(".json") and inner.startswith((_pt2.WEIGHTS_DIR, _pt2.CONSTANTS_DIR)):
                config = json.loads(archive.read(name)).get("config", {})
                for fqn, meta in config.items():
                    if meta.get("use_pickle"):
                        raise refuse(f"tensor {fqn!r} is stored pickled")
                    if inner.startswith(_pt2.CONSTANTS_DIR) and not str(
                        meta.get("path_name", "")
                    ).startswith(_pt2.TENSOR_CONSTANT_FILENAME_PREFIX):
                        raise refuse(f"constant {fqn!r} is an object, not a tensor")
            if inner.startswith(_pt2.SAMPLE_INPUTS_DIR):
                data = archive.read(name)
                if data:
                    try:
                        torch.load(io.BytesIO(data), weights_only=True)
                    except Exception as exc:
                        raise refuse(
                            f"sample inputs {name!r} need full unpickling ({exc})"
                        ) from exc


def load_int8(path: str | Path) -> torch.export.ExportedProgram:
    """Load a program written by `save_program`, after checking it needs no unpickling.

    An int8 program calls `torch.ops.quantized_decomposed.*` (quantize/dequantize), which
    torch registers only when `torch.ao.quantization.fx._decomposed` is imported; torchao's
    PT2E modules import it, and this package imports torchao. A plain `torch.export.load`
    in a fresh process therefore needs `import torchao` first, or it fails with "We failed
    to resolve torch.ops.quantized_decomposed... to an operator".
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"load_int8: {str(path)!r} does not exist; expected a .pt2 archive")
    _check_archive(path)
    return torch.export.load(path)


# CPU features with which oneDNN multiplies uint8 activations by int8 weights exactly (int32
# dot products). Without them (AVX2, AVX-512 before VNNI) it uses vpmaddubsw, whose int16 pair
# sums saturate: 255 * 127 * 2 > 32767. On an AVX2 EPYC that put a small CNN's compiled int8
# logits 0.058 from the converted model's (outputs of magnitude 0.16), where the reference
# path is 0.001 from fp32; oneDNN's guide describes it under "Nuances of int8 computations".
_EXACT_INT8_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")


def exact_int8_kernels() -> bool:
    """Whether this CPU runs oneDNN's uint8 x int8 kernels without saturating (VNNI or AMX)."""
    caps = torch.cpu.get_capabilities()
    return any(bool(caps.get(feature, False)) for feature in _EXACT_INT8_FEATURES)


def compile_int8(
    module: nn.Module | torch.export.ExportedProgram, *, int8_kernels: bool | None = None
) -> Callable[..., Any]:
    """`torch.compile` for x86 CPU inference; with freezing, int8 lowers to oneDNN kernels.

    Inductor's quantization fusion (dequantize + conv/linear -> `onednn.qconv_pointwise` /
    `onednn.qlinear_pointwise`, weights prepacked) runs in the freezing passes, which only
    apply under `no_grad`; without freezing the int8 graph compiles to dequantize + float conv,
    which computes what the converted model computes.

    `int8_kernels`: None (default) uses oneDNN's int8 kernels where the CPU computes them
    exactly (`exact_int8_kernels()`: VNNI or AMX) and compiles the dequantize + float graph
    elsewhere, with a warning, since there they saturate and return wrong outputs; True
    forces them, False never uses them.

    Freezing is set with `torch._inductor.config.patch` around each call (compilation happens
    lazily inside the first call) rather than `torch.compile(options={"freezing": True})`:
    with the options dict, torch 2.13 fails on dynamic-activation linears
    ("UnsupportedOperatorException: onednn.qlinear_prepack"), with the patch it works.
    The returned callable is for inference only (it runs under `torch.no_grad`). Dynamo's cache
    does not key on freezing: between two compiles of one module with different `int8_kernels`,
    call `torch._dynamo.reset()`.
    """
    if int8_kernels is None:
        int8_kernels = exact_int8_kernels()
        if not int8_kernels:
            _log.warning(
                "this CPU (%s) has no VNNI or AMX: oneDNN's int8 kernels saturate on it and "
                "return wrong outputs, so compile_int8 compiles the int8 program as dequantize "
                "+ float ops (correct, slower); measure int8 latency where it will be served",
                torch.cpu.get_capabilities().get("cpu_name", "unknown"),
            )
    if isinstance(module, torch.export.ExportedProgram):
        module = module.module()
    compiled = torch.compile(module)

    def run(*args: Any, **kwargs: Any) -> Any:
        with torch._inductor.config.patch(freezing=int8_kernels), torch.no_grad():
            return compiled(*args, **kwargs)

    return run


def export_onnx(
    model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor], path: str | Path
) -> int:
    """Optional: export the converted model to ONNX (QuantizeLinear/DequantizeLinear pairs).

    Needs the `onnx` package (and `onnxscript`, used by torch's exporter); raises ValueError
    naming what is missing otherwise. Static activations only. Returns the file size in bytes.
    Checked with onnx 1.23 / onnxscript 0.7 / onnxruntime 1.32: onnxruntime's outputs match
    the converted model to ~1e-7.
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ValueError(
            f"export_onnx needs the optional packages onnx and onnxscript ({exc}); "
            "pip install onnx onnxscript"
        ) from exc
    if isinstance(model, torch.fx.GraphModule) and any(
        "choose_qparams" in str(node.target) for node in model.graph.nodes
    ):
        raise ValueError(
            "export_onnx: dynamic activations (activations='abs_max') have no ONNX translation "
            "in torch 2.13 (choose_qparams_symmetric); export a model quantized with "
            "activations='moving_average_abs_max', or use save_program"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = export_program(model, example_inputs)
    onnx_program = torch.onnx.export(program, as_tuple(example_inputs), dynamo=True)
    if onnx_program is None:
        raise ValueError("export_onnx: torch.onnx.export returned nothing for this program")
    onnx_program.save(str(path))
    return os.path.getsize(path)


def fused_int8_layers(
    module: nn.Module | torch.export.ExportedProgram,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    int8_kernels: bool | None = None,
) -> int:
    """How many conv/linear layers inductor lowered to oneDNN int8 kernels (weight prepack).

    Compiles `module` afresh with `compile_int8(module, int8_kernels=...)` and reads inductor's
    pattern-matcher counters; a layer that is not counted runs as dequantize + float op.
    """
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = compile_int8(module, int8_kernels=int8_kernels)
    with torch.no_grad():
        compiled(*as_tuple(example_inputs))
    inductor = counters["inductor"]
    return int(
        inductor["qconv_weight_prepack_matcher_count"]
        + inductor["qlinear_weight_prepack_matcher_count"]
    )
