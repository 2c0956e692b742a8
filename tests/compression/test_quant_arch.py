"""int8 on the architectures people use: PTQ and QAT prepare, convert and export them.

The suite quantizes one structure of each kind of graph int8 meets (`SUITE`); every
structure of `lyceum.deploy.architectures`, the others included, is quantized with PTQ and
QAT by `bench/coverage.py`. Each is trained a little on digits first (random deep nets give
near-constant logits, on which any error looks small). All run side by side in one module
(`SideBySide`), so that one capture and one convert cover them.
Attention (score and value matmuls, softmax), LayerNorm and GELU have no int8 pattern in
`PaddleSlimQuantizer` and stay float; `nn.MultiheadAttention`'s projections are linear calls
and are quantized like any linear layer.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils.data import DataLoader

from lyceum.compression.pruning import UniformPruning, prune
from lyceum.compression.quantization import (
    PTQ,
    QAT,
    calibrate,
    convert,
    load_int8,
    quantize,
    quantized_layers,
    save_program,
    train_qat,
)
from lyceum.deploy.architectures import ARCHITECTURES, SideBySide
from lyceum.deploy.examples import Digits, train_classifier

# One of each kind of graph (each model added to the side-by-side module adds training,
# capture and export time); bench/coverage.py quantizes the rest with PTQ and QAT:
# - resnet: conv-BN-ReLU stacks, a residual add, a 1x1 projection shortcut (vgg's plain
#   conv-BN-ReLU-pool stacks are its subset);
# - mobilenetv2: depthwise (grouped) convs, linear bottlenecks, inverted residuals (mnasnet's
#   block is the same; resnext's grouped 3x3 is a grouped conv like these);
# - inception: branches concatenated on channels, a pooling branch (concat_flatten's concat);
# - shufflenetv2: channel split, concat and shuffle (reshape/transpose between int8 convs);
# - vit_mha: `nn.MultiheadAttention` (its projections are linear calls), a class token,
#   LayerNorm and GELU;
# - swin: windowed attention with a fused qkv linear and heads (vit_qkv's attention), patch
#   merging.
SUITE = ("resnet", "mobilenetv2", "inception", "shufflenetv2", "vit_mha", "swin")
TRANSFORMERS = ("vit_mha", "swin")
# Pruning changes these most (a shuffle's halves, heads, an attention's width): their pruned
# copies are quantized too.
PRUNED = ("shufflenetv2", "vit_mha", "swin")
# Measured on trained copies: PTQ logits 1.1-2.7% from fp32 (relative L2 over the test set),
# QAT's int8 logits within 0.06% of its own fake-quantized model.
PTQ_ERROR = 0.06
QAT_ERROR = 0.01
ACCURACY_DROP = 0.02


@pytest.fixture(scope="module")
def trained(digits_train: Digits) -> dict[str, nn.Module]:
    models = {}
    for name in SUITE:
        factory = ARCHITECTURES[name]
        torch.manual_seed(0)
        epochs = 8 if name in TRANSFORMERS else 3
        models[name] = train_classifier(factory(), digits_train, epochs=epochs, lr=3e-3)
    return models


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def _float_between_quantized(program: GraphModule) -> set[str]:
    """Ops that read a dequantized tensor: only the quantized conv/linear calls should."""
    return {
        str(user.target)
        for node in program.graph.nodes
        if node.op == "call_function" and "dequantize" in str(node.target)
        for user in node.users
    }


def _exported_equals(int8: GraphModule, x: torch.Tensor, path: Path) -> bool:
    save_program(int8, x[:8], path)
    with torch.no_grad():
        return torch.equal(load_int8(path).module()(x), int8(x))


@pytest.mark.slow
def test_ptq_of_every_structure_trained_and_pruned(
    trained: dict[str, nn.Module], digits_train: Digits, digits_test: Digits, tmp_path: Path
) -> None:
    models = dict(trained)
    for name in PRUNED:
        pruned = copy.deepcopy(trained[name])
        prune(pruned, UniformPruning(flops=-0.5), digits_test.images[:1])
        models[f"{name} -50%"] = pruned
    both = SideBySide(models).eval()
    x = digits_test.images
    prepared = quantize(both, PTQ(), x[:8])
    calibrate(prepared, DataLoader(digits_train, batch_size=64), 8, progress=False)
    int8 = convert(prepared)
    assert _float_between_quantized(int8) == {"aten.conv2d.default", "aten.linear.default"}
    layers = quantized_layers(int8)
    assert {"models.vit_mha.blocks.0.attn", "models.swin.blocks.1.attn.qkv"} <= set(layers)
    assert not any("ln_" in name or "norm" in name for name in layers)
    with torch.no_grad():
        fp32, q = both(x), int8(x)
    failures = []
    for i, name in enumerate(models):
        error = _relative_error(q[i], fp32[i])
        drop = _accuracy(fp32[i], digits_test.labels) - _accuracy(q[i], digits_test.labels)
        if error > PTQ_ERROR or (" " not in name and drop > ACCURACY_DROP):
            failures.append(f"{name}: relative error {error:.3f}, accuracy drop {drop:.3f}")
    assert not failures
    assert _exported_equals(int8, x, tmp_path / "ptq.pt2")


@pytest.mark.slow
def test_qat_of_every_structure_trains_converts_and_exports(
    trained: dict[str, nn.Module], digits_test: Digits, tmp_path: Path
) -> None:
    both = SideBySide({k: copy.deepcopy(v) for k, v in trained.items()})
    x = digits_test.images
    prepared = quantize(both, QAT(), x[:8])
    # Five batches at a small learning rate: enough to train the fake quantizers' ranges.
    few = Digits("train", limit=320)
    train_qat(prepared, few, 1, loss_fn=SideBySide.loss, lr=1e-4, progress=False)
    with torch.no_grad():
        fake = prepared(x)
    int8 = convert(prepared)
    assert _float_between_quantized(int8) == {"aten.conv2d.default", "aten.linear.default"}
    with torch.no_grad():
        fp32, q = both(x), int8(x)
    failures = []
    for i, name in enumerate(trained):
        error = _relative_error(q[i], fake[i])
        drop = _accuracy(fp32[i], digits_test.labels) - _accuracy(q[i], digits_test.labels)
        if error > QAT_ERROR or drop > ACCURACY_DROP:
            failures.append(f"{name}: relative error {error:.4f}, accuracy drop {drop:.3f}")
    assert not failures
    assert _exported_equals(int8, x, tmp_path / "qat.pt2")


class _FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(len(x), -1))


def test_a_forward_that_fixes_the_batch_size_is_named() -> None:
    with pytest.raises(
        ValueError, match=r"_FixedBatch's forward fixes the batch size to 8 .*x\.shape\[0\]"
    ):
        quantize(_FixedBatch(), PTQ(), torch.zeros(8, 1, 8, 8))
