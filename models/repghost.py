"""RepGhost (Chen et al., 2022): the Ghost module with its feature reuse moved into a BN branch.

Training-time module::

    x1 = ReLU(BN_p(conv1x1(x)))                 # primary (dense) conv
    x2 = BN_c(dwconvKxK(x1)) + BN_f(x1)         # cheap depthwise conv + the "fusion BN" branch
    y  = ReLU(x2)                               # optional

The fusion BN is an identity branch: ``BN_f(x1) = x1 * gamma/sigma + (beta - mean*gamma/sigma)``,
i.e. a depthwise KxK conv with ``gamma/sigma`` at the kernel centre.  Adding it to the folded
depthwise conv-BN gives one depthwise KxK conv (the feature-reuse concat of GhostNet becomes an
addition in RepGhost precisely so that this works).

Deploy structure: the BN branch is gone: ``Conv`` (1x1) -> ``Relu`` -> ``Conv`` (depthwise KxK)
-> ``Relu``; no BatchNormalization and no Add remain.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import ConvBN
from .deploy import bn_kernel, conv_bn_kernel, make_conv

__all__ = ["RepGhostModule"]


class RepGhostModule(nn.Module):
    """Training-time RepGhost module: primary 1x1 conv-BN-ReLU, cheap dw conv-BN + fusion BN."""

    def __init__(self, cin: int = 16, cout: int = 32, kernel_size: int = 3, relu: bool = True):
        super().__init__()
        self.primary_conv = nn.Sequential(ConvBN(cin, cout, 1), nn.ReLU())
        self.cheap_operation = ConvBN(cout, cout, kernel_size, padding=kernel_size // 2,
                                      groups=cout)
        self.fusion_bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def switch_to_deploy(self) -> None:
        """RepGhost's conversion: the fusion BN merges into the cheap depthwise conv."""
        if self.fusion_bn is None:
            return
        k, b = conv_bn_kernel(self.cheap_operation)
        kid, bid = bn_kernel(self.fusion_bn, self.fusion_bn.num_features,
                             self.cheap_operation.conv.kernel_size)
        self.cheap_operation = make_conv(self.cheap_operation.conv, k + kid, b + bid)
        self.fusion_bn = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        if self.fusion_bn is None:
            return self.relu(self.cheap_operation(x1))
        x2 = self.cheap_operation(x1) + self.fusion_bn(x1)
        return self.relu(x2)
