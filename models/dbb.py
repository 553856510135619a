"""Diverse Branch Block (Ding et al., CVPR 2021), training-time form.

Four branches read the same input ``x`` (K = kernel size, P = K // 2, stride s, groups g) and are
summed::

    y = BN_o(convKxK(x))                                          # origin: pad P, stride s
      + BN_1(conv1x1(x))                                          # 1x1: pad 0, stride s
      + BN_a(AvgPool_K,s,pad 0( BNAndPad_P( conv1x1(x) ) ))       # 1x1 -> avg
      + BN_k(convKxK,s,pad 0( BNAndPad_P( conv1x1'(x) ) ))        # 1x1 -> KxK

``BNAndPad_P`` is a BN followed by a P-pixel border filled with that BN's own per-channel output for
a zero input, ``v = beta - mean * gamma / sqrt(var + eps)`` (see ``models.common.BNAndPad``).
Hence ``BNAndPad_P(conv1x1(x)) == BN(conv1x1(pad0_P(x)))`` -- the padding has moved in front of the
bias-free 1x1 conv -- and each two-conv branch is exactly one padded KxK conv of ``x``:

- 1x1 -> KxK (DBB transform IV): ``K[o, i] = sum_m W2'[o, m] * W1[m, i]`` (per group), bias
  ``b2' + sum_m W2'[o, m, :, :].sum() * b1[m]`` with the BNs folded (BN_k into the KxK; the
  BNAndPad's BN into the 1x1);
- 1x1 -> AvgPool (transform V): the average pool is the KxK conv with ``1/K^2`` on the group
  diagonal, then the same composition; the trailing BN_a folds into it;
- the 1x1 branch is embedded at the centre (transform VI), BN_o/BN_1 fold (transform I), and all
  four are added (transform II).

Note: writing the avg branch as ``1x1-BN -> AvgPool(pad 1) -> BN`` (zero-padded pool after a biased
BN) would *not* be a conv of ``x`` -- the border pixels see fewer copies of the BN bias.  DBB
avoids that with the BN-and-pad layer plus an unpadded pool, and this module does the same.

``pad_mode`` ("slice" or "subpadadd") selects how BN-and-pad's border fill is written in PyTorch,
because the exporters turn each into a different ONNX pattern (see models/EXPORTS.md).

Deploy structure: exactly one ``Conv`` (KxK, padding P, stride s, with bias).
"""
from __future__ import annotations

import torch
from torch import nn

from .common import BNAndPad, ConvBN
from .deploy import compose_1x1_kxk, conv_bn_kernel, fuse_bn, make_conv, pad_kernel

__all__ = ["DiverseBranchBlock"]


class DiverseBranchBlock(nn.Module):
    """Training-time DBB: KxK, 1x1, 1x1->avg and 1x1->KxK branches, each ending in a BN, summed.

    Args:
        cin, cout: channels; ``internal`` is the width of the 1x1->KxK branch's middle tensor
            (default ``cin``).
        kernel_size: K (odd); stride and groups apply to every branch's spatial operator.
        pad_mode: "slice" (F.pad + slice assignment, like DBB's code) or "subpadadd"
            (``F.pad(y - v) + v``).
    """

    def __init__(self, cin: int = 8, cout: int = 16, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, internal: int | None = None, pad_mode: str = "slice"):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError("kernel_size must be odd")
        k, p = kernel_size, kernel_size // 2
        internal = cin if internal is None else internal
        self.pad_mode = pad_mode
        self.dbb_origin = ConvBN(cin, cout, k, stride=stride, padding=p, groups=groups)
        self.dbb_1x1 = ConvBN(cin, cout, 1, stride=stride, padding=0, groups=groups)
        self.dbb_avg = nn.Sequential()
        self.dbb_avg.add_module("conv", nn.Conv2d(cin, cout, 1, groups=groups, bias=False))
        self.dbb_avg.add_module("bnpad", BNAndPad(cout, p, pad_mode))
        self.dbb_avg.add_module("avg", nn.AvgPool2d(k, stride=stride, padding=0))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(cout))
        self.dbb_1x1_kxk = nn.Sequential()
        self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(cin, internal, 1, groups=groups,
                                                       bias=False))
        self.dbb_1x1_kxk.add_module("bnpad1", BNAndPad(internal, p, pad_mode))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(internal, cout, k, stride=stride,
                                                       padding=0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(cout))

    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """DBB's transforms I-VI in PyTorch: the KxK kernel and bias (float64) of the block."""
        conv = self.dbb_origin.conv
        g, k = conv.groups, conv.kernel_size
        k_origin, b_origin = conv_bn_kernel(self.dbb_origin)
        k_1x1, b_1x1 = conv_bn_kernel(self.dbb_1x1)
        # 1x1 -> BN-and-pad -> AvgPool -> BN: the pool is a KxK conv with 1/K^2 per group.
        avg_conv = self.dbb_avg.conv
        w1, b1 = fuse_bn(avg_conv.weight, None, self.dbb_avg.bnpad.bn)
        c = avg_conv.out_channels
        avg = torch.zeros(c, c // g, *k, dtype=torch.float64)
        o = torch.arange(c)
        avg[o, o % (c // g)] = 1.0 / (k[0] * k[1])
        w2, b2 = fuse_bn(avg, None, self.dbb_avg.avgbn)
        k_avg, b_avg = compose_1x1_kxk(w1, b1, w2, b2, g)
        # 1x1 -> BN-and-pad -> KxK (pad 0) -> BN.
        br = self.dbb_1x1_kxk
        w1, b1 = fuse_bn(br.conv1.weight, None, br.bnpad1.bn)
        w2, b2 = fuse_bn(br.conv2.weight, None, br.bn2)
        k_kxk, b_kxk = compose_1x1_kxk(w1, b1, w2, b2, g)
        kern = k_origin + pad_kernel(k_1x1, k) + k_avg + k_kxk
        return kern, b_origin + b_1x1 + b_avg + b_kxk

    def switch_to_deploy(self) -> None:
        """DBB's conversion: one KxK conv (``dbb_reparam``) replaces the four branches."""
        if hasattr(self, "dbb_reparam"):
            return
        kern, bias = self.get_equivalent_kernel_bias()
        self.dbb_reparam = make_conv(self.dbb_origin.conv, kern, bias)
        del self.dbb_origin, self.dbb_1x1, self.dbb_avg, self.dbb_1x1_kxk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "dbb_reparam"):
            return self.dbb_reparam(x)
        out = self.dbb_origin(x)
        out = out + self.dbb_1x1(x)
        out = out + self.dbb_avg(x)
        out = out + self.dbb_1x1_kxk(x)
        return out
