"""The verb: `quantize(model, QAT(...) | PTQ(...), example_inputs)`, then `calibrate` / train, `convert`.

Built on torchao's PT2E flow: the model is captured with `torch.export` (batch dimension
dynamic), annotated by `PaddleSlimQuantizer`, and prepared with `prepare_qat_pt2e` (fake
quantization; conv-BN is simulated so BN statistics keep training) or `prepare_pt2e`
(observers; conv-BN is folded first, torchao issue 2245). `convert` produces the reference
int8 graph (quantize/dequantize around float ops) that inductor lowers to oneDNN kernels.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence, Sized
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule
from torchao.quantization.pt2e import (
    allow_exported_model_train_eval,
    move_exported_model_to_eval,
)
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e

from lyceum.proto.display import Progress

from . import _pattern_cache
from .config import PTQ, QAT
from .quantizer import PaddleSlimQuantizer, check_patterns, quantizable_layers


def as_tuple(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Example inputs as the positional-argument tuple torch.export expects."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def capture(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> GraphModule:
    """`torch.export` the model with a dynamic leading (batch) dimension on every input."""
    args = as_tuple(example_inputs)
    if not args:
        raise ValueError(
            "example_inputs is empty; pass one example batch, e.g. torch.randn(8, 1, 8, 8)"
        )
    for i, a in enumerate(args):
        if a.dim() == 0 or a.shape[0] < 2:
            # torch.export specialises a dimension of size 0 or 1 to a constant.
            raise ValueError(
                f"example input {i} has shape {tuple(a.shape)}; use a batch of at least 2 "
                "so the batch dimension can be exported as dynamic"
            )
    return export_dynamic_batch(model, args).module()  # type: ignore[return-value]


def export_dynamic_batch(
    model: nn.Module, args: tuple[torch.Tensor, ...]
) -> torch.export.ExportedProgram:
    """`torch.export` with the leading dimension of every input dynamic.

    A forward that turns the batch size into a Python int (`len(x)`, `int(x.shape[0])`)
    makes torch.export fail with a guard message about a "constant"; that becomes a
    `ValueError` saying which model and what to write instead.
    """
    dynamic = tuple({0: torch.export.Dim.DYNAMIC} for _ in args)
    try:
        return torch.export.export(model, args, dynamic_shapes=dynamic)
    except torch._dynamo.exc.UserError as exc:
        if "specialized it to be a constant" not in str(exc):
            raise
        raise ValueError(
            f"{type(model).__name__}'s forward fixes the batch size to {args[0].shape[0]} (it "
            "uses it as a Python int, e.g. len(x)), so torch.export cannot keep it dynamic; "
            "write x.shape[0] in tensor calls instead (x.reshape(x.shape[0], -1), "
            "t.expand(x.shape[0], -1, -1)) or -1"
        ) from exc


def quantize(
    model: nn.Module,
    config: QAT | PTQ,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
) -> GraphModule:
    """Prepare `model` for int8 with PaddleSlim's schemes; returns a new module.

    - `QAT`: the result is in train mode with fake quantization; train it like the original
      (any loss, e.g. a distillation loss), then `convert` it.
    - `PTQ`: the result is in eval mode with observers; run `calibrate` on a few batches, then
      `convert` it. The input model is captured in eval mode (BN folded with running stats).

    The returned module supports `.train()` / `.eval()` (which switch BN and dropout in the
    captured graph). The input model is not modified (it is copied). A pruned model is just a smaller module
    and goes through the same path.
    """
    if not isinstance(config, QAT | PTQ):
        raise ValueError(
            f"quantize: config must be QAT(...) or PTQ(...), got {type(config).__name__}"
        )
    _pattern_cache.install()
    # A copy: the captured graph shares parameter tensors with the module it came from, and
    # QAT training (or BN folding) must not change the caller's float model.
    model = copy.deepcopy(model).train(isinstance(config, QAT))
    graph = capture(model, example_inputs)
    layers = quantizable_layers(graph)
    if not layers:
        raise ValueError(
            f"quantize: {type(model).__name__} has no conv2d or linear layer to quantize"
        )
    check_patterns(config, layers)
    quantizer = PaddleSlimQuantizer(config)
    if isinstance(config, QAT):
        prepared = prepare_qat_pt2e(graph, quantizer)
    else:
        prepared = prepare_pt2e(graph, quantizer)
    if not quantizer.annotated:
        raise ValueError(
            f"quantize: every conv/linear layer is skipped ({list(layers)}); nothing to quantize"
        )
    prepared.meta["lyceum_quant_layers"] = dict(quantizer.annotated)
    allow_exported_model_train_eval(prepared)
    prepared.train(isinstance(config, QAT))
    return prepared


def quantized_layers(prepared: GraphModule) -> dict[str, tuple[str, str]]:
    """The layers `quantize` annotated: module path -> (weight scheme, activation scheme)."""
    return dict(prepared.meta.get("lyceum_quant_layers", {}))


@torch.no_grad()
def calibrate(
    prepared: GraphModule,
    batches: Iterable[Any],
    num_batches: int | None = None,
    *,
    progress: bool = True,
) -> int:
    """Run up to `num_batches` batches through a PTQ-prepared model; returns how many ran.

    A batch is an input tensor, or a `(inputs, labels)` pair / list whose first item is the
    input (what a classification DataLoader yields). `progress` shows the batches done.
    """
    if num_batches is not None and num_batches <= 0:
        raise ValueError(f"calibrate: num_batches must be positive, got {num_batches}")
    move_exported_model_to_eval(prepared)
    total = len(batches) if isinstance(batches, Sized) else None
    if num_batches is not None:
        total = num_batches if total is None else min(total, num_batches)
    count = 0
    with Progress(total=total, desc="calibration", unit="batch", enabled=progress) as bar:
        for batch in batches:
            if num_batches is not None and count >= num_batches:
                break
            x = batch[0] if isinstance(batch, list | tuple) else batch
            prepared(x)
            count += 1
            bar.update(1)
    if count == 0:
        raise ValueError("calibrate: the batch iterable was empty; pass at least one batch")
    return count


def convert(prepared: GraphModule) -> GraphModule:
    """Convert a calibrated (PTQ) or trained (QAT) model to the int8 reference graph.

    Weights become int8 constants with their scales; static activations get fixed
    quantize/dequantize pairs, dynamic ones a `choose_qparams` per batch. Float weights the
    graph no longer reads (convert leaves them attached) are dropped so they are not exported.
    """
    _pattern_cache.install()
    move_exported_model_to_eval(prepared)
    layers = quantized_layers(prepared)
    converted = convert_pt2e(prepared)
    _drop_unused_attributes(converted)
    converted.meta["lyceum_quant_layers"] = layers
    allow_exported_model_train_eval(converted)
    # torchao's train/eval replacements return None, so no chaining.
    converted.eval()
    return converted


def _drop_unused_attributes(module: GraphModule) -> None:
    used = {str(n.target) for n in module.graph.nodes if n.op == "get_attr"}
    for name, _ in list(module.named_parameters()) + list(module.named_buffers()):
        if name in used:
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        delattr(owner, attr)
    module.delete_all_unused_submodules()
