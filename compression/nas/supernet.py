"""The once-for-all supernet: every subnet of an `OFASpace` in one set of weights.

supernet = Supernet(OFASpace())
supernet.set_active(supernet.space.smallest())   # runs the smallest subnet from now on
config = supernet.sample_active(random.Random(0)) # a random subnet, made active
plain = extract(supernet, config)                # lyceum.compression.nas.extract

Elastic depth runs the first d blocks of each stage (the later blocks are residual ones, so
skipping them keeps the shapes); elastic kernel and width are `ElasticBlock`'s. The stem, the
first and last blocks and the head are the plain modules the subnets have.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import nn

from lyceum.compression.nas._elastic import ElasticBlock
from lyceum.compression.nas.lightnas import InvertedResidual
from lyceum.compression.nas.ofa_space import (
    OFASpace,
    OFASpaceConfig,
    SubnetConfig,
    head,
    stem,
)

__all__ = ["Allowed", "Supernet", "ofa_supernet"]


class Allowed:
    """The values a subnet may take in each elastic dimension (a progressive-shrinking phase's
    set); each defaults to all of the space's values."""

    def __init__(
        self,
        space: OFASpace,
        kernels: Sequence[int] | None = None,
        depths: Sequence[int] | None = None,
        expands: Sequence[int] | None = None,
    ) -> None:
        c = space.config
        self.kernels = tuple(sorted(kernels if kernels is not None else c.kernels))
        self.depths = tuple(sorted(depths if depths is not None else c.depths))
        self.expands = tuple(sorted(expands if expands is not None else c.expands))
        for name, values, full in (
            ("kernels", self.kernels, c.kernels),
            ("depths", self.depths, c.depths),
            ("expands", self.expands, c.expands),
        ):
            if not values or not set(values) <= set(full):
                raise ValueError(
                    f"allowed {name} {list(values)} must be a non-empty subset of the space's "
                    f"{list(full)}"
                )
        self.space = space

    def smallest(self) -> SubnetConfig:
        return self.space.check(self._uniform(0))

    def largest(self) -> SubnetConfig:
        return self.space.check(self._uniform(-1))

    def _uniform(self, i: int) -> SubnetConfig:
        n, d = self.space.stages, self.space.max_depth
        return SubnetConfig(
            depths=(self.depths[i],) * n,
            kernels=((self.kernels[i],) * d,) * n,
            expands=((self.expands[i],) * d,) * n,
        )

    def sample(self, rng: random.Random) -> SubnetConfig:
        """A uniformly random subnet within the sets (every block drawn independently)."""
        n, d = self.space.stages, self.space.max_depth
        return SubnetConfig(
            depths=tuple(rng.choice(self.depths) for _ in range(n)),
            kernels=tuple(tuple(rng.choice(self.kernels) for _ in range(d)) for _ in range(n)),
            expands=tuple(tuple(rng.choice(self.expands) for _ in range(d)) for _ in range(n)),
        )

    def contains(self, config: SubnetConfig) -> bool:
        """Whether every block that runs is within the sets."""
        return all(d in self.depths for d in config.depths) and all(
            k in self.kernels and e in self.expands for _, _, k, e in config.active_blocks()
        )


class Supernet(nn.Module):
    """The supernet of `space`; it runs its active subnet (the largest until `set_active`)."""

    def __init__(self, space: OFASpace | None = None, *, kernel_transform: bool = False) -> None:
        super().__init__()
        self.space = space = space or OFASpace()
        self.kernel_transform = kernel_transform
        c = space.config
        self.stem = stem(c.in_channels, c.stem_channels, space.stem_stride)
        self.first = InvertedResidual(c.stem_channels, c.first_channels, 1, 3, 1, False, True)
        grid: list[list[ElasticBlock]] = []
        cin = c.first_channels
        for cout, stride in zip(c.stage_channels, space.strides, strict=True):
            blocks = [
                ElasticBlock(
                    cin if b == 0 else cout,
                    cout,
                    stride if b == 0 else 1,
                    c.kernels,
                    c.expands,
                    kernel_transform=kernel_transform,
                )
                for b in range(space.max_depth)
            ]
            grid.append(blocks)
            cin = cout
        self.stages = nn.ModuleList(nn.ModuleList(blocks) for blocks in grid)
        # The same blocks, typed, for the code that walks them (the ModuleLists register them).
        self.blocks = grid
        self.last = InvertedResidual(cin, c.last_channels, 6, 3, 1, False, True)
        self.head = head(c.last_channels, c.head_channels, c.num_classes)
        self.active = space.largest()

    def set_active(self, config: SubnetConfig) -> SubnetConfig:
        """Run the subnet `config` from now on (every value checked against the space)."""
        config = self.space.check(config)
        for s, blocks in enumerate(self.blocks):
            for b, block in enumerate(blocks):
                block.kernel, block.expand = config.kernels[s][b], config.expands[s][b]
        self.active = config
        return config

    def sample_active(self, rng: random.Random, allowed: Allowed | None = None) -> SubnetConfig:
        """Make a random subnet (within `allowed`, default the whole space) active."""
        return self.set_active((allowed or Allowed(self.space)).sample(rng))

    def set_tokens(self, tokens: Sequence[int]) -> SubnetConfig:
        """`set_active` of the subnet the search engine's `tokens` stand for."""
        return self.set_active(self.space.subnet(tokens))

    def sort_channels(self) -> None:
        """Re-order every block's hidden channels by importance (before width shrinks)."""
        for blocks in self.blocks:
            for block in blocks:
                block.sort_channels()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(self.stem(x))
        for depth, blocks in zip(self.active.depths, self.blocks, strict=True):
            for block in blocks[:depth]:
                x = block(x)
        return self.head(self.last(x))


def ofa_supernet(kernel_transform: bool = False, **space: object) -> Supernet:
    """The supernet as a model spec: `lyceum.compression.nas:ofa_supernet{"kernels": [3, 5]}`
    (the keyword arguments are `OFASpaceConfig`'s, plus `kernel_transform`)."""
    return Supernet(
        OFASpace(OFASpaceConfig.model_validate(space)), kernel_transform=kernel_transform
    )
