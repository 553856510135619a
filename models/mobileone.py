"""MobileOne (Vasu et al., CVPR 2023): over-parameterized conv blocks, training-time form.

Training-time block (kernel K, padding K // 2, stride s, groups g)::

    y = act( BN_skip(x)                      # only when cin == cout and s == 1
           + BN_scale(conv1x1(x))            # "scale branch", only when K > 1
           + sum_{i < k} BN_i(convKxK_i(x)) )  # k over-parameterized conv branches

The sum is written the way MobileOne's code writes it -- the scale and identity terms start as the
Python number 0 when absent and the conv branches are accumulated onto them -- so a block without
either branch exports an ``Add(t, 0)`` with a literal zero in the legacy exporter.

Inference form: fold each BN into its conv, embed the 1x1 kernel at the centre, turn BN_skip into
the per-group identity kernel scaled by gamma/sigma, and add kernels and biases: one KxK conv.
A MobileOne "unit" is a depthwise KxK block (g = cin) followed by a pointwise 1x1 block (g = 1).

Deploy structure: one ``Conv`` per block (plus one ``Relu`` per block when ``act`` is set).
``num_conv_branches=0`` gives a BN-only block (FastViT uses one as its RepMixer ``norm``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .common import ConvBN

__all__ = ["MobileOneBlock", "MobileOneNet"]


class MobileOneBlock(nn.Module):
    """Training-time MobileOne block: k KxK conv-BN branches + 1x1 conv-BN + identity BN."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, num_conv_branches: int = 3, use_scale: bool = True,
                 use_skip: bool = True, act: bool = True):
        super().__init__()
        p = kernel_size // 2
        self.rbr_skip = (nn.BatchNorm2d(cin)
                         if use_skip and cin == cout and stride == 1 else None)
        self.rbr_scale = (ConvBN(cin, cout, 1, stride=stride, padding=0, groups=groups)
                          if use_scale and kernel_size > 1 else None)
        self.rbr_conv = nn.ModuleList(
            ConvBN(cin, cout, kernel_size, stride=stride, padding=p, groups=groups)
            for _ in range(num_conv_branches))
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for branch in self.rbr_conv:
            out = out + branch(x)
        return self.act(out)


class MobileOneNet(nn.Module):
    """A stack of MobileOne units: (depthwise KxK block, pointwise 1x1 block) per entry of ``plan``.

    ``plan`` holds ``(cout, stride)`` per unit; the depthwise block takes the stride and the
    pointwise block maps cin -> cout.  With the default plan the network contains a depthwise block
    with identity (stride 1), one without (stride 2), a pointwise block without identity
    (cin != cout, which exports the ``Add(t, 0)``) and one with identity.
    """

    def __init__(self, cin: int = 16, plan: Sequence[tuple[int, int]] = ((32, 1), (32, 2)),
                 num_conv_branches: int = 3):
        super().__init__()
        blocks = []
        for cout, stride in plan:
            blocks.append(MobileOneBlock(cin, cin, 3, stride=stride, groups=cin,
                                         num_conv_branches=num_conv_branches))
            blocks.append(MobileOneBlock(cin, cout, 1, stride=1, groups=1,
                                         num_conv_branches=num_conv_branches))
            cin = cout
        self.body = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
