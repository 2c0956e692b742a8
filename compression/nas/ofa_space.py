"""The once-for-all space: Light-NAS's skeleton with elastic kernel, depth and expansion.

A subnet of the supernet is a `SubnetConfig`: per stage its depth (the first d blocks run),
and per block its depthwise kernel and expansion ratio (the hidden width is the block's input
channels times the ratio). The stem, the fixed first and last blocks, the head and every
stage's output channels are fixed, as in once-for-all's MobileNetV3 space (elastic width is the
expansion: the hidden channels, which are sorted by importance before they shrink).

Tokens, so that the Light-NAS search engine treats subnets as token lists: per stage, one token
for the depth (an index into `depths`), then two per block of the deepest stage, the kernel and
the expansion (indices into `kernels` and `expands`). The tokens of blocks beyond a stage's
depth do not change the subnet (`SubnetConfig.canonical` sets them to the smallest values), so
`OFASpace` is a `CanonicalSpace`: the search draws canonical tokens only, and a subnet is
evaluated once whichever of its token lists the annealing reached it by.

`OFASpace` is a `NASSpace`: its ops carry Light-NAS's block keys (`mbv2(...)`), so the latency
table (`lyceum nas lut --space lyceum.compression.nas:ofa_space`) and the budgets work on it
unchanged, and `build(tokens)` is the plain subnet, which `extract` fills with the supernet's
weights.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from lyceum.compression.nas.base import Op, op_key
from lyceum.compression.nas.lightnas import InvertedResidual, LightNASSpace
from lyceum.compression.search.chain import check_tokens

__all__ = ["OFASpace", "OFASpaceConfig", "SubnetConfig", "ofa_space"]


class OFASpaceConfig(BaseModel):
    """The supernet's skeleton and the values of each elastic dimension."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_size: int = Field(default=8, ge=4, description="Input height and width, in pixels.")
    in_channels: int = Field(default=1, ge=1, description="Input channels.")
    num_classes: int = Field(default=10, ge=2, description="Classifier outputs.")
    stage_channels: tuple[int, ...] = Field(
        default=(24, 32, 64, 96, 160),
        min_length=1,
        description="Output channels of each elastic stage (MobileNetV2's middle stages).",
    )
    strides: tuple[int, ...] | None = Field(
        default=None,
        description="Stride of each stage's first block; None: Light-NAS's for the input size.",
    )
    kernels: tuple[int, ...] = Field(
        default=(3, 5, 7), min_length=1, description="Depthwise kernel sizes (odd)."
    )
    depths: tuple[int, ...] = Field(
        default=(2, 3, 4), min_length=1, description="Blocks a stage may have (>= 1)."
    )
    expands: tuple[int, ...] = Field(
        default=(3, 4, 6), min_length=1, description="Expansion ratios of a block (>= 2)."
    )
    stem_channels: int = Field(default=32, ge=1, description="Stem conv output channels.")
    first_channels: int = Field(default=16, ge=1, description="Fixed first block's output.")
    last_channels: int = Field(default=320, ge=1, description="Fixed last block's output.")
    head_channels: int = Field(default=1280, ge=1, description="1x1 head conv's output.")

    @model_validator(mode="after")
    def _check(self) -> OFASpaceConfig:
        for name in ("kernels", "depths", "expands"):
            values = getattr(self, name)
            if list(values) != sorted(set(values)):
                raise ValueError(f"{name} must be distinct and increasing, got {list(values)}")
        if any(k % 2 == 0 or k < 1 for k in self.kernels):
            raise ValueError(f"kernels must be odd sizes, got {list(self.kernels)}")
        if self.depths[0] < 1:
            raise ValueError(
                f"depths must be >= 1 (a stage keeps its first block), got {list(self.depths)}"
            )
        if self.expands[0] < 2:
            raise ValueError(
                f"expands must be >= 2 (ratio 1 has no expansion conv to share), got "
                f"{list(self.expands)}"
            )
        if self.strides is not None and len(self.strides) != len(self.stage_channels):
            raise ValueError(
                f"strides has {len(self.strides)} entries for {len(self.stage_channels)} stages"
            )
        return self


class SubnetConfig(BaseModel):
    """One subnet: per stage its depth, per block (all `max(depths)` of them) kernel, expansion."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    depths: tuple[int, ...] = Field(description="Active blocks of each stage.")
    kernels: tuple[tuple[int, ...], ...] = Field(description="Per stage, each block's kernel.")
    expands: tuple[tuple[int, ...], ...] = Field(description="Per stage, each block's ratio.")

    def active_blocks(self) -> list[tuple[int, int, int, int]]:
        """(stage, block, kernel, expansion) of every block that runs, in order."""
        return [
            (s, b, self.kernels[s][b], self.expands[s][b])
            for s, depth in enumerate(self.depths)
            for b in range(depth)
        ]

    def canonical(self, space: OFASpace) -> SubnetConfig:
        """The same subnet with the blocks that do not run at the smallest values.

        The smallest, not the largest: a search moving from this subnet to one a block deeper
        adds the cheapest block, which a budget near the subnet's cost still admits, and grows
        it in later moves; at the largest values the deeper neighbour was mostly over budget
        (a kernel-7, ratio-4 block costs 3x the smallest in bench/ofa.py's space)."""
        c = space.config
        kernels = [list(row) for row in self.kernels]
        expands = [list(row) for row in self.expands]
        for s, depth in enumerate(self.depths):
            for b in range(depth, space.max_depth):
                kernels[s][b], expands[s][b] = c.kernels[0], c.expands[0]
        return SubnetConfig(
            depths=self.depths,
            kernels=tuple(map(tuple, kernels)),
            expands=tuple(map(tuple, expands)),
        )


class OFASpace:
    """The subnets of a once-for-all supernet, as a `NASSpace` over token lists."""

    def __init__(self, config: OFASpaceConfig | None = None) -> None:
        self.config = c = config or OFASpaceConfig()
        skeleton = LightNASSpace(c.input_size, c.in_channels, c.num_classes)
        self.stem_stride = skeleton.stem_stride
        self.strides = c.strides or skeleton.strides[: len(c.stage_channels)]
        if len(self.strides) != len(c.stage_channels):
            raise ValueError(
                f"OFASpace: {len(c.stage_channels)} stages need `strides` (Light-NAS's default "
                f"has {len(skeleton.strides)})"
            )
        self.max_depth = c.depths[-1]
        self.stages = len(c.stage_channels)

    # -- configs and tokens ------------------------------------------------------------------

    def largest(self) -> SubnetConfig:
        c = self.config
        return self.uniform(c.depths[-1], c.kernels[-1], c.expands[-1])

    def smallest(self) -> SubnetConfig:
        c = self.config
        return self.uniform(c.depths[0], c.kernels[0], c.expands[0])

    def uniform(self, depth: int, kernel: int, expand: int) -> SubnetConfig:
        """The subnet whose stages all have `depth` blocks of `kernel` and ratio `expand`."""
        return SubnetConfig(
            depths=(depth,) * self.stages,
            kernels=((kernel,) * self.max_depth,) * self.stages,
            expands=((expand,) * self.max_depth,) * self.stages,
        )

    def check(self, config: SubnetConfig) -> SubnetConfig:
        """`config` if every value is one the space has, else a ValueError naming the value."""
        c = self.config
        if len(config.depths) != self.stages:
            raise ValueError(f"subnet config: {len(config.depths)} depths for {self.stages} stages")
        for s in range(self.stages):
            if config.depths[s] not in c.depths:
                raise ValueError(
                    f"subnet config: stage {s} depth {config.depths[s]} is not one of "
                    f"{list(c.depths)}"
                )
            for name, allowed in (("kernels", c.kernels), ("expands", c.expands)):
                row = getattr(config, name)[s] if s < len(getattr(config, name)) else ()
                if len(row) != self.max_depth:
                    raise ValueError(
                        f"subnet config: stage {s} has {len(row)} {name}, expected one per "
                        f"block ({self.max_depth})"
                    )
                for b, value in enumerate(row):
                    if value not in allowed:
                        raise ValueError(
                            f"subnet config: stage {s} block {b} {name[:-1]} {value} is not "
                            f"one of {list(allowed)}"
                        )
        return config

    def tokens(self, config: SubnetConfig) -> list[int]:
        c = self.check(config)
        out: list[int] = []
        for s in range(self.stages):
            out.append(self.config.depths.index(c.depths[s]))
            for b in range(self.max_depth):
                out += [
                    self.config.kernels.index(c.kernels[s][b]),
                    self.config.expands.index(c.expands[s][b]),
                ]
        return out

    def subnet(self, tokens: Sequence[int]) -> SubnetConfig:
        tokens = check_tokens(tokens, self.range_table(), "OFASpace")
        c, per_stage = self.config, 1 + 2 * self.max_depth
        rows = [tokens[s * per_stage : (s + 1) * per_stage] for s in range(self.stages)]
        return SubnetConfig(
            depths=tuple(c.depths[r[0]] for r in rows),
            kernels=tuple(tuple(c.kernels[k] for k in r[1::2]) for r in rows),
            expands=tuple(tuple(c.expands[e] for e in r[2::2]) for r in rows),
        )

    # -- the NASSpace / CanonicalSpace protocols ----------------------------------------------

    def range_table(self) -> list[int]:
        c = self.config
        stage = [len(c.depths)] + [len(c.kernels), len(c.expands)] * self.max_depth
        return stage * self.stages

    def init_tokens(self) -> list[int]:
        return self.tokens(self.largest())

    def canonical(self, tokens: Sequence[int]) -> list[int]:
        """The tokens of the same subnet with the blocks that do not run at the smallest values."""
        return self.tokens(self.subnet(tokens).canonical(self))

    def is_feasible(self, tokens: Sequence[int]) -> bool:
        return True  # budgets are checked by `lyceum.compression.nas.BudgetedSpace`

    def ops(self, tokens: Sequence[int]) -> list[Op]:
        return self.subnet_ops(self.subnet(tokens))

    def subnet_ops(self, config: SubnetConfig) -> list[Op]:
        """The keyed ops of a subnet: stem, first block, the active blocks, last block, head."""
        c = self.check(config)
        size, stride, cin0 = self.config.input_size, self.stem_stride, self.config.in_channels
        stem_out = self.config.stem_channels
        ops = [
            Op(
                op_key("stem", cin=cin0, cout=stem_out, s=stride, hw=size),
                lambda: stem(cin0, stem_out, stride),
                (cin0, size, size),
            )
        ]
        h = -(-size // stride)
        first = self.config.first_channels
        ops.append(_block(stem_out, first, 1, 3, 1, h))
        cin = first
        for s, b, kernel, expand in c.active_blocks():
            cout, st = self.config.stage_channels[s], self.strides[s] if b == 0 else 1
            ops.append(_block(cin, cout, expand, kernel, st, h))
            h, cin = -(-h // st), cout
        last, hidden, classes = (
            self.config.last_channels,
            self.config.head_channels,
            self.config.num_classes,
        )
        ops.append(_block(cin, last, 6, 3, 1, h))
        ops.append(
            Op(
                op_key("ofa_head", cin=last, hidden=hidden, classes=classes, hw=h),
                lambda: head(last, hidden, classes),
                (last, h, h),
            )
        )
        return ops

    def all_ops(self) -> list[Op]:
        """Every distinct op: a block's key depends on its stage, position (first or not),
        kernel and expansion only, so the uniform subnets cover them all."""
        seen: dict[str, Op] = {}
        c = self.config
        for kernel in c.kernels:
            for expand in c.expands:
                for op in self.subnet_ops(self.uniform(c.depths[-1], kernel, expand)):
                    seen.setdefault(op.key, op)
        return list(seen.values())

    def build(self, tokens: Sequence[int]) -> nn.Module:
        return self.build_subnet(self.subnet(tokens))

    def build_subnet(self, config: SubnetConfig) -> nn.Sequential:
        """The plain subnet (freshly initialised): Light-NAS blocks in an `nn.Sequential`."""
        return nn.Sequential(*(op.build() for op in self.subnet_ops(config)))


def _block(cin: int, cout: int, expand: int, kernel: int, stride: int, h: int) -> Op:
    # Light-NAS's block key: the same block costs the same whichever space it comes from.
    sc = int(stride == 1 and cin == cout)
    key = op_key("mbv2", cin=cin, cout=cout, t=expand, k=kernel, s=stride, se=0, sc=sc, hw=h)
    return Op(
        key, lambda: InvertedResidual(cin, cout, expand, kernel, stride, False, True), (cin, h, h)
    )


def stem(cin: int, cout: int, stride: int) -> nn.Sequential:
    """3x3 conv, BN, ReLU6: the stem of the supernet and of its subnets."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(inplace=True)
    )


def head(cin: int, hidden: int, classes: int) -> nn.Sequential:
    """1x1 conv, BN, ReLU6, global average pooling, classifier."""
    return nn.Sequential(
        nn.Conv2d(cin, hidden, 1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU6(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(hidden, classes),
    )


def ofa_space(**config: object) -> OFASpace:
    """The space as a `module:callable` spec: `lyceum.compression.nas:ofa_space{"kernels": [3, 5]}`."""
    return OFASpace(OFASpaceConfig.model_validate(config))
