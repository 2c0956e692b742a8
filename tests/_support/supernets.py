"""Tiny once-for-all spaces and supernets for the supernet tests (seconds, not minutes)."""

from __future__ import annotations

import random

import torch

from lyceum.compression.nas import OFASpace, OFASpaceConfig, Supernet
from lyceum.compression.nas._elastic import ElasticBlock

# Two stages (stride 1 at 8x8, then stride 2), every dimension with two or three values.
TINY = {
    "stage_channels": [4, 8],
    "kernels": [3, 5],
    "depths": [1, 2],
    "expands": [2, 3],
    "stem_channels": 4,
    "first_channels": 4,
    "last_channels": 8,
    "head_channels": 16,
}


def tiny_space(**changes: object) -> OFASpace:
    return OFASpace(OFASpaceConfig.model_validate({**TINY, **changes}))


def trained_like(space: OFASpace, *, kernel_transform: bool = False, seed: int = 0) -> Supernet:
    """A supernet whose BN statistics and kernel transforms are not the initial ones (so that
    a slip in copying them shows), in eval mode, the largest subnet active."""
    torch.manual_seed(seed)
    net = Supernet(space, kernel_transform=kernel_transform)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net.sample_active(random.Random(seed))
            net(torch.randn(16, 1, 8, 8))
        for module in net.modules():
            if isinstance(module, ElasticBlock):
                for matrix in module.transforms.values():
                    matrix.add_(0.1 * torch.randn_like(matrix))
                module.project_bn.weight.mul_(1.5)
    net.set_active(space.largest())
    return net.eval()
