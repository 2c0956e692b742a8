"""A PT2E `Quantizer` that annotates conv and linear layers with PaddleSlim's schemes.

torchao's `X86InductorQuantizer` fixes the scheme (per-channel int8 weights, asymmetric uint8
activations from a histogram observer) and annotates whole patterns (conv-bn-relu, adds,
pooling). PaddleSlim quantizes only the inputs and weights of conv/linear layers, with a
symmetric scheme chosen per layer, so this quantizer annotates exactly those two inputs of
`aten.conv2d` / `aten.linear` and nothing else; outputs stay float.

So in a transformer the projections are int8 and the rest is float: attention's products of
two activations (scores, scores times values, or `scaled_dot_product_attention`), softmax,
LayerNorm, GELU, a class token and position embedding. `nn.MultiheadAttention` runs its
projections as `F.linear` calls, so they are quantized too, all named by the attention
module's path (`blocks.0.attn`), which is what `skip` and `overrides` patterns match.

How each scheme maps to a `QuantizationSpec` (and why):

- weights, both schemes: int8 in [-127, 127], `per_channel_symmetric` on axis 0. Per-tensor
  `abs_max` uses a per-channel layout with one shared scale (`AbsMaxObserver("shared_channel")`)
  because inductor's x86 int8 fusion only matches per-channel weights; the values are those of
  per-tensor quantization.
- static activations (`moving_average_abs_max`): uint8 in [0, 255] with zero point 128, i.e.
  PaddleSlim's symmetric grid shifted onto uint8 codes, because oneDNN's x86 qconv rejects int8
  inputs. Values below -127 * scale clip to -128 * scale instead of -127 * scale.
- dynamic activations (`abs_max`): int8 in [-127, 127], `is_dynamic=True`; `convert_pt2e`
  inserts `choose_qparams_symmetric`, whose scale is `max|x| / 127`, PaddleSlim's formula.
  Inductor fuses this into oneDNN only for linear layers (dynamic qlinear); dynamic convs run
  as quantize/dequantize + float conv.
"""

from __future__ import annotations

import re

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e.fake_quantize import FakeQuantize
from torchao.quantization.pt2e.observer import MovingAverageMinMaxObserver, PlaceholderObserver
from torchao.quantization.pt2e.quantizer import (
    QuantizationAnnotation,
    QuantizationSpec,
    Quantizer,
)

from .config import PTQ, QAT, ActivationScheme, WeightScheme
from .observers import (
    QMAX,
    AbsMaxObserver,
    HistogramAbsMaxObserver,
    MovingAverageAbsMaxObserver,
)

_aten = torch.ops.aten
# The ops PaddleSlim quantizes (conv2d, depthwise_conv2d via groups, mul/matmul as linear).
QUANTIZABLE_OPS = (_aten.conv2d.default, _aten.linear.default)
# Smallest dynamic scale: keeps an all-zero batch from dividing by zero.
_DYNAMIC_EPS = 2**-20


def layer_name(node: Node) -> str:
    """Module path of the conv/linear call `node` (`features.0.0`), from torch.export's metadata.

    A functional call made directly in the root module's forward has the name "".
    """
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return str(path).removeprefix("L['self'].")


def quantizable_layers(model: GraphModule) -> list[str]:
    """Module paths of every conv/linear call in the captured graph, in graph order."""
    names: list[str] = []
    for node in model.graph.nodes:
        if node.op == "call_function" and node.target in QUANTIZABLE_OPS:
            name = layer_name(node)
            if name not in names:
                names.append(name)
    return names


def check_patterns(config: QAT | PTQ, layers: list[str]) -> None:
    """Raise if a skip or override pattern matches none of `layers` (almost always a typo)."""
    for pattern in config.patterns():
        if not any(re.fullmatch(pattern, name) for name in layers):
            raise ValueError(
                f"layer pattern {pattern!r} matches no conv/linear layer; patterns are "
                f"matched with re.fullmatch against the module paths {layers}"
            )


def _weight_spec(scheme: WeightScheme, is_qat: bool) -> QuantizationSpec:
    granularity = "channel" if scheme == "channel_wise_abs_max" else "shared_channel"
    # accumulate=False: the scale follows the current weights, as PaddleSlim recomputes it.
    observer = AbsMaxObserver.with_args(granularity=granularity, accumulate=False, ch_axis=0)
    ctr = FakeQuantize.with_args(observer=observer) if is_qat else observer
    return QuantizationSpec(
        dtype=torch.int8,
        quant_min=-QMAX,
        quant_max=QMAX,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
        observer_or_fake_quant_ctr=ctr,
    )


def _activation_spec(scheme: ActivationScheme, config: QAT | PTQ) -> QuantizationSpec:
    is_qat = isinstance(config, QAT)
    if scheme == "abs_max":
        # Dynamic: QAT fake-quantizes with the current batch's abs max (averaging_constant=1);
        # after convert, choose_qparams_symmetric computes the same scale at inference.
        dynamic_ctr = (
            FakeQuantize.with_args(
                observer=MovingAverageMinMaxObserver.with_args(averaging_constant=1),
                eps=_DYNAMIC_EPS,
            )
            if is_qat
            else PlaceholderObserver.with_args(eps=_DYNAMIC_EPS)
        )
        return QuantizationSpec(
            dtype=torch.int8,
            quant_min=-QMAX,
            quant_max=QMAX,
            qscheme=torch.per_tensor_symmetric,
            is_dynamic=True,
            observer_or_fake_quant_ctr=dynamic_ctr,
        )
    if isinstance(config, QAT):
        ctr = FakeQuantize.with_args(
            observer=MovingAverageAbsMaxObserver.with_args(moving_rate=config.moving_rate)
        )
    elif config.observer == "minmax":
        ctr = AbsMaxObserver.with_args(granularity="tensor", accumulate=True)
    else:
        ctr = HistogramAbsMaxObserver.with_args(
            method=config.observer, percentile=config.percentile, bins=config.bins
        )
    return QuantizationSpec(
        dtype=torch.uint8,
        quant_min=0,
        quant_max=255,
        qscheme=torch.per_tensor_symmetric,
        observer_or_fake_quant_ctr=ctr,
    )


class PaddleSlimQuantizer(Quantizer):
    """Annotates the input and weight of each conv2d/linear with the layer's PaddleSlim scheme.

    Layers are named by module path; `config.skip` leaves layers float and `config.overrides`
    changes the scheme of matching layers (see `QAT` / `PTQ`).
    """

    def __init__(self, config: QAT | PTQ) -> None:
        super().__init__()
        self.config = config
        self.annotated: dict[str, tuple[WeightScheme, ActivationScheme]] = {}

    def annotate(self, model: GraphModule) -> GraphModule:
        is_qat = isinstance(self.config, QAT)
        for node in model.graph.nodes:
            if node.op != "call_function" or node.target not in QUANTIZABLE_OPS:
                continue
            name = layer_name(node)
            scheme = self.config.scheme_for(name)
            if scheme is None:
                continue
            weights, activations = scheme
            x, w = node.args[0], node.args[1]
            if not isinstance(x, Node) or not isinstance(w, Node):
                continue
            node.meta["quantization_annotation"] = QuantizationAnnotation(
                input_qspec_map={
                    x: _activation_spec(activations, self.config),
                    w: _weight_spec(weights, is_qat),
                },
                _annotated=True,
            )
            self.annotated[name] = scheme
        return model

    def validate(self, model: GraphModule) -> None:
        """Nothing to check beyond what `annotate` enforces."""
