"""PaddleSlim's Light-NAS space: a MobileNetV2 whose 5 middle stages are searched, 30 tokens.

Each of the 5 stages has 6 tokens, in this order (PaddleSlim's `LightNASSpace`):

| token | meaning | values |
| --- | --- | --- |
| 0 | expansion ratio of the inverted residual | 3, 4, 5, 6 |
| 1 | output channels | per stage: (18,24,30), (24,32,40), (48,64,80), (72,96,120), (120,160,192) |
| 2 | repeats (blocks in the stage) | per stage: (1,2,3), (2,3,4), (3,4,5), (2,3,4), (2,3,4) |
| 3 | depthwise kernel | 3, 5 |
| 4 | shortcut (residual where shapes allow: stride 1, same channels) | 0, 1 |
| 5 | squeeze-excitation after the depthwise conv | 0, 1 |

The stem (3x3 conv, 32 channels), the first stage (expansion 1, 16 channels, 1 block), the last
stage (expansion 6, 320 channels, 1 block), the 1x1 head conv (1280) and the classifier are
fixed. The initial tokens are MobileNetV2 itself (expansion 6, the middle channels and repeats,
kernel 3, shortcut, no SE).

Strides: on ImageNet-sized inputs (>= 64 px) MobileNetV2's, stem 2 and stages (2, 2, 2, 1, 2),
/32 in all. An 8x8 digit would be 1x1 after the third stride, so below 64 px the stem keeps the
resolution and only stages 2 and 4 stride: 8x8 -> 4x4 -> 2x2 (/4 in all).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lyceum.compression.nas.base import Op, op_key
from lyceum.compression.search.chain import check_tokens

__all__ = ["LightNASSpace", "lightnas_space"]

EXPANSIONS = (3, 4, 5, 6)
CHANNELS = ((18, 24, 30), (24, 32, 40), (48, 64, 80), (72, 96, 120), (120, 160, 192))
REPEATS = ((1, 2, 3), (2, 3, 4), (3, 4, 5), (2, 3, 4), (2, 3, 4))
KERNELS = (3, 5)
STAGE_TABLE = [len(EXPANSIONS), 3, 3, len(KERNELS), 2, 2]
# MobileNetV2: t=6, c=(24, 32, 64, 96, 160), n=(2, 3, 4, 3, 3), k=3, shortcut, no SE.
INIT_STAGE = [3, 1, 1, 0, 1, 0]

_STEM, _FIRST, _LAST, _HEAD = 32, 16, 320, 1280


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(8, channels // reduction)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Hardsigmoid(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, kxk depthwise (+ SE), 1x1 project, optional residual."""

    def __init__(
        self,
        cin: int,
        cout: int,
        expansion: int,
        kernel: int,
        stride: int,
        se: bool,
        shortcut: bool,
    ) -> None:
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [*_conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [*_conv_bn(hidden, hidden, kernel, stride, groups=hidden), nn.ReLU6(inplace=True)]
        if se:
            layers.append(_SqueezeExcite(hidden))
        layers += _conv_bn(hidden, cout, 1)
        self.body = nn.Sequential(*layers)
        self.residual = shortcut and stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class _Head(nn.Module):
    def __init__(self, cin: int, classes: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(*_conv_bn(cin, _HEAD, 1), nn.ReLU6(inplace=True))
        self.fc = nn.Linear(_HEAD, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


class LightNASSpace:
    """The 30-token Light-NAS space for `in_channels` x `input_size` x `input_size` images."""

    def __init__(self, input_size: int = 8, in_channels: int = 1, num_classes: int = 10) -> None:
        if input_size < 4:
            raise ValueError(f"LightNASSpace: input_size must be >= 4 pixels, got {input_size}")
        self.input_size = input_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        small = input_size < 64
        self.stem_stride = 1 if small else 2
        self.strides = (1, 2, 1, 2, 1) if small else (2, 2, 2, 1, 2)

    def range_table(self) -> list[int]:
        return STAGE_TABLE * len(CHANNELS)

    def init_tokens(self) -> list[int]:
        return INIT_STAGE * len(CHANNELS)

    def is_feasible(self, tokens: Sequence[int]) -> bool:
        return True  # budgets are checked by `lyceum.compression.nas.BudgetedSpace`

    def _block(self, cin: int, cout: int, t: int, k: int, s: int, se: bool, sc: bool, h: int) -> Op:
        # Shortcut only changes a block where it applies: one key for the others.
        sc = sc and s == 1 and cin == cout
        key = op_key("mbv2", cin=cin, cout=cout, t=t, k=k, s=s, se=int(se), sc=int(sc), hw=h)
        return Op(key, lambda: InvertedResidual(cin, cout, t, k, s, se, sc), (cin, h, h))

    def ops(self, tokens: Sequence[int]) -> list[Op]:
        tokens = check_tokens(tokens, self.range_table(), "LightNASSpace")
        size, stem_stride = self.input_size, self.stem_stride
        c0 = self.in_channels

        def stem() -> nn.Module:
            return nn.Sequential(*_conv_bn(c0, _STEM, 3, stem_stride), nn.ReLU6(inplace=True))

        ops = [
            Op(op_key("stem", cin=c0, cout=_STEM, s=stem_stride, hw=size), stem, (c0, size, size))
        ]
        h = -(-size // stem_stride)
        ops.append(self._block(_STEM, _FIRST, 1, 3, 1, False, True, h))
        cin = _FIRST
        for stage, stride in enumerate(self.strides):
            t, c, n, k, sc, se = tokens[6 * stage : 6 * stage + 6]
            cout = CHANNELS[stage][c]
            for i in range(REPEATS[stage][n]):
                s = stride if i == 0 else 1
                ops.append(
                    self._block(cin, cout, EXPANSIONS[t], KERNELS[k], s, bool(se), bool(sc), h)
                )
                h = -(-h // s)
                cin = cout
        ops.append(self._block(cin, _LAST, 6, 3, 1, False, True, h))
        classes = self.num_classes
        ops.append(
            Op(
                op_key("head", cin=_LAST, classes=classes, hw=h),
                lambda: _Head(_LAST, classes),
                (_LAST, h, h),
            )
        )
        return ops

    def all_ops(self) -> list[Op]:
        """Every distinct op: each stage's blocks for every input width the stages before allow."""
        seen: dict[str, Op] = {}
        base = self.init_tokens()
        # A block depends on its own stage's tokens and its input channels only, so varying one
        # stage at a time over every earlier stage's channel choice covers every block.
        for stage in range(len(CHANNELS)):
            for prev in range(3):
                for t in range(len(EXPANSIONS)):
                    for c in range(3):
                        for n in range(3):
                            for k in range(2):
                                for sc in range(2):
                                    for se in range(2):
                                        tokens = list(base)
                                        if stage:
                                            tokens[6 * (stage - 1) + 1] = prev
                                        tokens[6 * stage : 6 * stage + 6] = [t, c, n, k, sc, se]
                                        for op in self.ops(tokens):
                                            seen.setdefault(op.key, op)
        return list(seen.values())

    def build(self, tokens: Sequence[int]) -> nn.Module:
        return nn.Sequential(*(op.build() for op in self.ops(tokens)))


def lightnas_space(
    input_size: int = 8, in_channels: int = 1, num_classes: int = 10
) -> LightNASSpace:
    """The Light-NAS space as a `module:callable` spec: `lyceum.compression.nas:lightnas_space`."""
    return LightNASSpace(input_size, in_channels, num_classes)
