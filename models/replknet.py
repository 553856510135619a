"""RepLKNet (Ding et al., CVPR 2022): very large depthwise kernels trained with a small-kernel twin.

Training-time large-kernel conv (``ReparamLargeKernelConv``, channels C, kernels L > S, both odd)::

    y = BN_L(dwconvLxL(x))  +  BN_S(dwconvSxS(x))       # paddings L//2 and S//2, groups C

Inference form: fold each BN, zero-pad the SxS kernel to LxL (offset (L - S)/2 per axis) and add:
one depthwise LxL conv.  L defaults to 13 here for speed; RepLKNet-31B uses L = 31 (pass
``large=31``).

The full block (``RepLKBlock``) wraps it the way RepLKNet does::

    y = x + BN_2(pw2( ReLU( LK( ReLU(BN_1(pw1( BN_pre(x) ))) ) ) ))

where pw1/pw2 are 1x1 convs.  ``BN_pre`` sits *before* a 1x1 unpadded conv, so it folds into pw1
exactly (scale pw1's input channels, push its shift through pw1's kernel into the bias); the
residual ``Add`` stays.

Hand-written deploy (``switch_to_deploy``, RepLKNet's ``structural_reparam``): only the large
kernels merge; the pre-BN stays a BatchNormalization (RepLKNet's code does not fold it), the 1x1
conv-BN pairs fuse as every conv-BN does.

Deploy structure: ``ReparamLargeKernelConv`` -> exactly one ``Conv`` (depthwise LxL);
``RepLKBlock`` -> ``Conv`` x3 (1x1, depthwise LxL, 1x1), ``Relu`` x2, ``Add`` x1.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import ConvBN
from .deploy import conv_bn_kernel, make_conv, pad_kernel

__all__ = ["ReparamLargeKernelConv", "RepLKBlock"]


class ReparamLargeKernelConv(nn.Module):
    """Depthwise LxL conv-BN plus a parallel depthwise SxS conv-BN, summed."""

    def __init__(self, channels: int = 16, large: int = 13, small: int = 5, stride: int = 1):
        super().__init__()
        if large % 2 != 1 or small % 2 != 1 or small > large:
            raise ValueError("kernels must be odd with small <= large")
        self.lkb_origin = ConvBN(channels, channels, large, stride=stride, padding=large // 2,
                                 groups=channels)
        self.small_conv = ConvBN(channels, channels, small, stride=stride, padding=small // 2,
                                 groups=channels)

    def switch_to_deploy(self) -> None:
        """RepLKNet's ``merge_kernel``: the small kernel, zero-padded, adds into the large one."""
        if hasattr(self, "lkb_reparam"):
            return
        kl, bl = conv_bn_kernel(self.lkb_origin)
        ks, bs = conv_bn_kernel(self.small_conv)
        conv = self.lkb_origin.conv
        self.lkb_reparam = make_conv(conv, kl + pad_kernel(ks, conv.kernel_size), bl + bs)
        del self.lkb_origin, self.small_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "lkb_reparam"):
            return self.lkb_reparam(x)
        return self.lkb_origin(x) + self.small_conv(x)


class RepLKBlock(nn.Module):
    """RepLKNet block: pre-BN, 1x1 conv-BN-ReLU, large kernel, ReLU, 1x1 conv-BN, residual."""

    def __init__(self, channels: int = 16, dw_channels: int = 32, large: int = 13,
                 small: int = 5):
        super().__init__()
        self.prelkb_bn = nn.BatchNorm2d(channels)
        self.pw1 = nn.Sequential(ConvBN(channels, dw_channels, 1), nn.ReLU())
        self.large_kernel = ReparamLargeKernelConv(dw_channels, large, small)
        self.lk_nonlinear = nn.ReLU()
        self.pw2 = ConvBN(dw_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pw1(self.prelkb_bn(x))
        out = self.lk_nonlinear(self.large_kernel(out))
        return x + self.pw2(out)
