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

With ``use_se`` the block applies MobileOne's squeeze-excite (``SEBlock``: average pool over the
whole map, 1x1 reduce, ReLU, 1x1 expand, sigmoid, multiply) to the branch sum, before ``act``; the
SE is not re-parameterizable and stays in the deploy form.

Hand-written deploy (``switch_to_deploy``, MobileOne's ``reparameterize``): one ``reparam_conv``.

Deploy structure: one ``Conv`` per block (plus one ``Relu`` per block when ``act`` is set).
``num_conv_branches=0`` gives a BN-only block (FastViT uses one as its RepMixer ``norm``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

from .common import ConvBN
from .deploy import branch_sum_kernel, make_conv

__all__ = ["SEBlock", "MobileOneBlock", "MobileOneNet", "MobileOneSENet"]


class SEBlock(nn.Module):
    """MobileOne's squeeze-excite: ``x * sigmoid(expand(relu(reduce(avg_pool(x, [h, w])))))``."""

    def __init__(self, channels: int, rd_ratio: float = 0.0625):
        super().__init__()
        rd = max(1, int(channels * rd_ratio))
        self.reduce = nn.Conv2d(channels, rd, 1, bias=True)
        self.expand = nn.Conv2d(rd, channels, 1, bias=True)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        _, c, h, w = inputs.size()
        x = F.avg_pool2d(inputs, kernel_size=[int(h), int(w)])
        x = torch.sigmoid(self.expand(F.relu(self.reduce(x))))
        return inputs * x.view(-1, c, 1, 1)


class MobileOneBlock(nn.Module):
    """Training-time MobileOne block: k KxK conv-BN branches + 1x1 conv-BN + identity BN."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, num_conv_branches: int = 3, use_scale: bool = True,
                 use_skip: bool = True, act: bool = True, use_se: bool = False):
        super().__init__()
        self.kernel_size, self.stride, self.groups = kernel_size, stride, groups
        self.cin, self.cout = cin, cout
        p = kernel_size // 2
        self.rbr_skip = (nn.BatchNorm2d(cin)
                         if use_skip and cin == cout and stride == 1 else None)
        self.rbr_scale = (ConvBN(cin, cout, 1, stride=stride, padding=0, groups=groups)
                          if use_scale and kernel_size > 1 else None)
        self.rbr_conv = nn.ModuleList(
            ConvBN(cin, cout, kernel_size, stride=stride, padding=p, groups=groups)
            for _ in range(num_conv_branches))
        self.se = SEBlock(cout) if use_se else nn.Identity()
        self.act = nn.ReLU() if act else nn.Identity()

    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """KxK kernel and bias (float64) of the branch sum (MobileOne's ``_get_kernel_bias``)."""
        return branch_sum_kernel(self.kernel_size, self.groups, self.rbr_skip, self.rbr_scale, self.rbr_conv)

    def switch_to_deploy(self) -> None:
        """MobileOne's ``reparameterize``: one ``reparam_conv`` replaces every branch."""
        if hasattr(self, "reparam_conv"):
            return
        kern, bias = self.get_equivalent_kernel_bias()
        like = nn.Conv2d(self.cin, self.cout, self.kernel_size, stride=self.stride,
                         padding=self.kernel_size // 2, groups=self.groups)
        self.reparam_conv = make_conv(like, kern, bias)
        del self.rbr_skip, self.rbr_scale, self.rbr_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "reparam_conv"):
            return self.act(self.se(self.reparam_conv(x)))
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for branch in self.rbr_conv:
            out = out + branch(x)
        return self.act(self.se(out))


class MobileOneNet(nn.Module):
    """A stack of MobileOne units: (depthwise KxK block, pointwise 1x1 block) per entry of ``plan``.

    ``plan`` holds ``(cout, stride)`` per unit; the depthwise block takes the stride and the
    pointwise block maps cin -> cout.  With the default plan the network contains a depthwise block
    with identity (stride 1), one without (stride 2), a pointwise block without identity
    (cin != cout, which exports the ``Add(t, 0)``) and one with identity.
    """

    def __init__(self, cin: int = 16, plan: Sequence[tuple[int, int]] = ((32, 1), (32, 2)),
                 num_conv_branches: int = 3, use_se: bool = False):
        super().__init__()
        blocks = []
        for cout, stride in plan:
            blocks.append(MobileOneBlock(cin, cin, 3, stride=stride, groups=cin,
                                         num_conv_branches=num_conv_branches, use_se=use_se))
            blocks.append(MobileOneBlock(cin, cout, 1, stride=1, groups=1,
                                         num_conv_branches=num_conv_branches, use_se=use_se))
            cin = cout
        self.body = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class MobileOneSENet(MobileOneNet):
    """One MobileOne unit with squeeze-excite on both blocks (as MobileOne's SE stages): a
    depthwise 3x3 block with identity (stride 1) and a pointwise block ``cin -> cout``."""

    def __init__(self, cin: int = 32, cout: int = 64, num_conv_branches: int = 3):
        super().__init__(cin, ((cout, 1),), num_conv_branches=num_conv_branches, use_se=True)
