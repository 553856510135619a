"""ACNet (Ding et al., ICCV 2019): Asymmetric Convolution Block.

Training-time block::

    y = BN_sq(conv3x3(x)) + BN_h(conv1x3(x)) + BN_v(conv3x1(x))

- conv3x3: kernel (3, 3), padding (1, 1);
- conv1x3: kernel (1, 3), padding (0, 1)  (horizontal "skeleton");
- conv3x1: kernel (3, 1), padding (1, 0)  (vertical "skeleton");
- all with the same stride and groups and no bias, each followed by its own BN.

Inference form: fold each BN into its conv, embed the 1x3 kernel in row 1 and the 3x1 kernel in
column 1 of a 3x3 kernel (offset P - p per axis: (1 - 0, 1 - 1) = (1, 0) and (0, 1)), and add
kernels and biases.  Because the paddings are chosen so that every branch produces the same output
grid, the sum is exact at the borders as well.

Deploy structure: exactly one ``Conv`` (3x3, padding 1, with bias).
"""
from __future__ import annotations

import torch
from torch import nn

from .common import ConvBN
from .deploy import conv_bn_kernel, make_conv, pad_kernel

__all__ = ["ACBlock"]


class ACBlock(nn.Module):
    """Training-time asymmetric convolution block (3x3 + 1x3 + 3x1, each conv-BN, summed)."""

    def __init__(self, cin: int = 8, cout: int = 16, stride: int = 1, groups: int = 1):
        super().__init__()
        self.square = ConvBN(cin, cout, (3, 3), stride=stride, padding=(1, 1), groups=groups)
        self.hor = ConvBN(cin, cout, (1, 3), stride=stride, padding=(0, 1), groups=groups)
        self.ver = ConvBN(cin, cout, (3, 1), stride=stride, padding=(1, 0), groups=groups)

    def switch_to_deploy(self) -> None:
        """ACNet's conversion: the 1x3 and 3x1 kernels land in the centre row/column; one conv."""
        if hasattr(self, "fused"):
            return
        ks, bs = conv_bn_kernel(self.square)
        kh, bh = conv_bn_kernel(self.hor)
        kv, bv = conv_bn_kernel(self.ver)
        k = ks + pad_kernel(kh, 3) + pad_kernel(kv, 3)
        self.fused = make_conv(self.square.conv, k, bs + bh + bv)
        del self.square, self.hor, self.ver

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "fused"):
            return self.fused(x)
        return self.square(x) + self.hor(x) + self.ver(x)
