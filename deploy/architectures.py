"""Tiny versions of well-known architectures, from their public definitions, for 8x8 digits.

Each one keeps the structure that makes its family hard to prune or quantize (a residual sum,
depthwise and grouped convs, concatenation, channel split and shuffle, attention heads with
a class token, windows with a per-head position bias, a state dict with its own version) at a size that trains on two CPU cores in
seconds. Inputs are `[N, 1, 8, 8]` images, outputs ten logits. Every factory works as a spec
(`--model lyceum.deploy.architectures:shufflenet_tiny`); `ARCHITECTURES` names them all, the
transformers of `lyceum.deploy.vision_transformers` included.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lyceum.deploy.vision_transformers import swin_tiny, vit_mha_tiny, vit_qkv_tiny

__all__ = [
    "ARCHITECTURES",
    "ConcatFlattenNet",
    "InceptionTiny",
    "MNASNetTiny",
    "MobileNetV2Tiny",
    "ResNeXtTiny",
    "ResNetTiny",
    "ShuffleNetV2Tiny",
    "SideBySide",
    "VGGTiny",
    "channel_shuffle",
    "concat_flatten_net",
    "inception_tiny",
    "mnasnet_tiny",
    "mobilenetv2_tiny",
    "resnet_tiny",
    "resnext_tiny",
    "shufflenet_tiny",
    "vgg_tiny",
]


def _conv_bn_relu(
    cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _conv_bn(
    cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


class VGGTiny(nn.Module):
    """VGG: stacks of 3x3 conv-BN-ReLU with max pooling, flattened into a two-layer classifier."""

    def __init__(self, width: int = 16, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(1, width),
            _conv_bn_relu(width, width),
            nn.MaxPool2d(2),
            _conv_bn_relu(width, 2 * width),
            _conv_bn_relu(2 * width, 2 * width),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 2 * 2, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convs and an identity or 1x1 projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(cin, cout, stride=stride)
        self.conv2 = _conv_bn(cout, cout, kernel=3)
        self.downsample = (
            _conv_bn(cin, cout, stride=stride) if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(self.conv1(x)) + self.downsample(x))


class ResNetTiny(nn.Module):
    """ResNet-18's layout at 8x8: a stem, two stages of two basic blocks, global pooling."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(1, width)
        self.layer1 = nn.Sequential(_BasicBlock(width, width, 1), _BasicBlock(width, width, 1))
        self.layer2 = nn.Sequential(
            _BasicBlock(width, 2 * width, 2), _BasicBlock(2 * width, 2 * width, 1)
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class _InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise, linear 1x1 projection, residual."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_relu(cin, hidden, kernel=1))
        layers += [
            _conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),
            _conv_bn(hidden, cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2Tiny(nn.Module):
    """MobileNetV2: inverted residuals with depthwise convs, a wide last 1x1 conv, dropout."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(1, width),
            _InvertedResidual(width, width, 1, 1),
            _InvertedResidual(width, 24, 2, 4),
            _InvertedResidual(24, 24, 1, 4),
            _InvertedResidual(24, 32, 2, 4),
            _InvertedResidual(32, 32, 1, 4),
            _conv_bn_relu(32, 96, kernel=1),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(96, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


class _ResNeXtBlock(nn.Module):
    """ResNeXt's bottleneck: 1x1 reduce, grouped 3x3 (cardinality), 1x1 expand, residual."""

    def __init__(self, channels: int, width: int, cardinality: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(channels, width, kernel=1)
        self.conv2 = _conv_bn_relu(width, width, groups=cardinality)
        self.conv3 = _conv_bn(width, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv3(self.conv2(self.conv1(x))))


class ResNeXtTiny(nn.Module):
    """ResNeXt: bottleneck blocks whose 3x3 convs are grouped (4 groups here)."""

    def __init__(self, width: int = 32, cardinality: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(1, width)
        self.blocks = nn.Sequential(
            _ResNeXtBlock(width, width, cardinality),
            nn.MaxPool2d(2),
            _ResNeXtBlock(width, width, cardinality),
        )
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class _Inception(nn.Module):
    """GoogLeNet's module: 1x1, 1x1-3x3 and pool-1x1 branches concatenated on channels."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, cp: int) -> None:
        super().__init__()
        self.branch1 = _conv_bn_relu(cin, c1, kernel=1)
        self.branch2 = nn.Sequential(_conv_bn_relu(cin, c3r, kernel=1), _conv_bn_relu(c3r, c3))
        self.branch3 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1), _conv_bn_relu(cin, cp, kernel=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x)], 1)


class InceptionTiny(nn.Module):
    """GoogLeNet: inception modules (concatenation), max pooling, global average pooling."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(1, 16)
        self.inception1 = _Inception(16, 8, 8, 16, 8)
        self.pool = nn.MaxPool2d(2)
        self.inception2 = _Inception(32, 16, 12, 16, 8)
        self.fc = nn.Linear(40, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inception2(self.pool(self.inception1(self.stem(x))))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


class ConcatFlattenNet(nn.Module):
    """Two conv branches concatenated on channels, flattened straight into a linear layer."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn_relu(1, 16), nn.MaxPool2d(2))
        self.branch_a = _conv_bn_relu(16, 16)
        self.branch_b = _conv_bn_relu(16, 8, kernel=1)
        self.fc1 = nn.Linear(24 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's shuffle: channel `g * (C / groups) + i` moves to `i * groups + g`."""
    batch, channels, height, width = x.shape
    x = x.view(batch, groups, channels // groups, height, width)
    return x.transpose(1, 2).contiguous().view(batch, channels, height, width)


class _ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: split in two halves (stride 1) or two branches (stride 2), shuffle."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                _conv_bn(cin, cin, kernel=3, stride=stride, groups=cin),
                _conv_bn_relu(cin, half, kernel=1),
            )
        branch_in = cin if stride > 1 else half
        self.branch2 = nn.Sequential(
            _conv_bn_relu(branch_in, half, kernel=1),
            _conv_bn(half, half, kernel=3, stride=stride, groups=half),
            _conv_bn_relu(half, half, kernel=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2Tiny(nn.Module):
    """ShuffleNetV2: a stem, stages of shuffle units (split, branch, concat, shuffle), 1x1 conv."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(1, width)
        self.stage2 = nn.Sequential(
            _ShuffleUnit(width, 2 * width, 2),
            _ShuffleUnit(2 * width, 2 * width, 1),
            _ShuffleUnit(2 * width, 2 * width, 1),
        )
        self.conv5 = _conv_bn_relu(2 * width, 64, kernel=1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stage2(self.conv1(x)))
        return self.fc(x.mean((2, 3)))


class _MNASBlock(nn.Module):
    """MNASNet's mobile block: expansion, depthwise conv, linear projection, residual."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.layers = nn.Sequential(
            _conv_bn_relu(cin, mid, kernel=1),
            _conv_bn_relu(mid, mid, stride=stride, groups=mid),
            _conv_bn(mid, cout),
        )
        self.apply_residual = cin == cout and stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x) if self.apply_residual else self.layers(x)


class MNASNetTiny(nn.Module):
    """MNASNet, with torchvision's state-dict versioning: `_load_from_state_dict` refuses a
    state dict whose metadata lacks the version (torchvision's check, verbatim in spirit)."""

    _version = 2

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            _conv_bn_relu(1, width),
            _MNASBlock(width, width, 1, 3),
            _MNASBlock(width, 24, 2, 3),
            _MNASBlock(24, 24, 1, 3),
            _conv_bn_relu(24, 64, kernel=1),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layers(x).mean((2, 3)))

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        version = local_metadata.get("version")
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def vgg_tiny() -> VGGTiny:
    return VGGTiny()


def resnet_tiny() -> ResNetTiny:
    return ResNetTiny()


def mobilenetv2_tiny() -> MobileNetV2Tiny:
    return MobileNetV2Tiny()


def resnext_tiny() -> ResNeXtTiny:
    return ResNeXtTiny()


def inception_tiny() -> InceptionTiny:
    return InceptionTiny()


def concat_flatten_net() -> ConcatFlattenNet:
    return ConcatFlattenNet()


def shufflenet_tiny() -> ShuffleNetV2Tiny:
    return ShuffleNetV2Tiny()


def mnasnet_tiny() -> MNASNetTiny:
    return MNASNetTiny()


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "vgg": vgg_tiny,
    "resnet": resnet_tiny,
    "mobilenetv2": mobilenetv2_tiny,
    "resnext": resnext_tiny,
    "inception": inception_tiny,
    "concat_flatten": concat_flatten_net,
    "shufflenetv2": shufflenet_tiny,
    "vit_mha": vit_mha_tiny,
    "vit_qkv": vit_qkv_tiny,
    "swin": swin_tiny,
    "mnasnet": mnasnet_tiny,
}
"""Structure name -> factory, in the order of the coverage table (`bench/coverage.py`)."""


class SideBySide(nn.Module):
    """Several models on the same input, their logits stacked `[models, batch, classes]`.

    Quantizing them as one module costs one capture and one convert for all of them: torchao's
    QAT convert traces its conv-BN patterns once per call (~25 s on two cores), whatever the
    model's size.
    """

    def __init__(self, models: dict[str, nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleDict(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([model(x) for model in self.models.values()])

    @staticmethod
    def loss(outputs: torch.Tensor, _inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The sum of every model's cross-entropy (a `train_qat` loss_fn)."""
        losses = [nn.functional.cross_entropy(o, labels) for o in outputs]
        return torch.stack(losses).sum()
