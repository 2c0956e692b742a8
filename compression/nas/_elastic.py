"""The supernet's elastic inverted-residual block: one set of weights for every kernel and width.

The weights are those of the largest block (largest kernel, largest expansion), held in plain
`nn.Conv2d` / `nn.BatchNorm2d` modules so that the state dict reads like a normal network's; the
forward pass slices them for the active setting:

- kernel: a smaller kernel is the centre crop of the next larger one (once-for-all's shared
  kernel). With `kernel_transform`, each crop goes through a learned (k*k x k*k) matrix, shared
  by all channels and initialised to the identity, as once-for-all's KERNEL_TRANSFORM_MODE does:
  the small kernel can then differ from the centre of the large one it is made from.
- width: the first `cin * expand` hidden channels (expansion conv outputs, depthwise conv, its
  BN, projection inputs). `sort_channels` re-orders the hidden channels by importance (L1 norm
  of the projection's input weights) before the width shrinks, so the channels a small subnet
  keeps are the ones that matter most; the reorder leaves every output of the block unchanged.

BN is sliced too: its running statistics are shared by every subnet, which is why a subnet's BN
is re-calibrated (`lyceum.compression.nas.ofa_train.recalibrate_bn`) before it is evaluated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ElasticBlock"]


def _batch_norm(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """`bn` on the first `x.shape[1]` channels; training updates those running stats in place
    (the leading slice of a buffer is a view of it)."""
    c = x.shape[1]
    assert bn.running_mean is not None and bn.running_var is not None
    return F.batch_norm(
        x,
        bn.running_mean[:c],
        bn.running_var[:c],
        bn.weight[:c],
        bn.bias[:c],
        bn.training,
        bn.momentum if bn.momentum is not None else 0.1,
        bn.eps,
    )


class ElasticBlock(nn.Module):
    """1x1 expand, kxk depthwise, 1x1 project, residual where stride 1 and cin == cout."""

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        kernels: tuple[int, ...],
        expands: tuple[int, ...],
        *,
        kernel_transform: bool = False,
    ) -> None:
        super().__init__()
        self.cin, self.cout, self.stride = cin, cout, stride
        self.kernels, self.expands = kernels, expands
        hidden, kmax = cin * expands[-1], kernels[-1]
        self.expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(
            hidden, hidden, kmax, stride, kmax // 2, groups=hidden, bias=False
        )
        self.depthwise_bn = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, cout, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(cout)
        self.residual = stride == 1 and cin == cout
        # One matrix per step down, "7to5" for the crop of a 7x7 kernel to 5x5.
        self.transforms = nn.ParameterDict(
            {
                f"{big}to{small}": nn.Parameter(torch.eye(small * small))
                for big, small in zip(kernels[:0:-1], kernels[-2::-1], strict=True)
            }
            if kernel_transform
            else {}
        )
        self.kernel, self.expand = kmax, expands[-1]

    def depthwise_weight(self, kernel: int) -> torch.Tensor:
        """The depthwise weights of `kernel`: the largest kernel cropped (and transformed) step by
        step down to `kernel`, for every hidden channel."""
        weight = self.depthwise.weight
        for big, small in zip(self.kernels[:0:-1], self.kernels[-2::-1], strict=True):
            if big <= kernel:
                break
            start = (big - small) // 2
            weight = weight[:, :, start : start + small, start : start + small]
            name = f"{big}to{small}"
            if name in self.transforms:
                shape = weight.shape
                weight = F.linear(weight.reshape(-1, small * small), self.transforms[name])
                weight = weight.reshape(shape)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, kernel = self.cin * self.expand, self.kernel
        y = F.conv2d(x, self.expand_conv.weight[:hidden])
        y = F.relu6(_batch_norm(self.expand_bn, y))
        weight = self.depthwise_weight(kernel)[:hidden]
        y = F.conv2d(y, weight, None, self.stride, kernel // 2, groups=hidden)
        y = F.relu6(_batch_norm(self.depthwise_bn, y))
        y = self.project_bn(F.conv2d(y, self.project.weight[:, :hidden]))
        return x + y if self.residual else y

    @torch.no_grad()
    def sort_channels(self) -> None:
        """Re-order the hidden channels, most important first (once-for-all's
        `re_organize_middle_weights`): importance is the L1 norm of each channel's projection
        weights. Every output of the block, at every setting that keeps all channels, is
        unchanged; a narrower setting then keeps the most important ones."""
        importance = self.project.weight.abs().sum(dim=(0, 2, 3))
        order = torch.argsort(importance, descending=True)
        self.project.weight.copy_(self.project.weight[:, order])
        self.expand_conv.weight.copy_(self.expand_conv.weight[order])
        self.depthwise.weight.copy_(self.depthwise.weight[order])
        for bn in (self.expand_bn, self.depthwise_bn):
            assert bn.running_mean is not None and bn.running_var is not None
            for tensor in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                tensor.copy_(tensor[order])
