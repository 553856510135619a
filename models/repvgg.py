"""RepVGG (Ding et al., CVPR 2021): a plain 3x3-conv + ReLU network trained with parallel branches.

Training-time block (``RepVGGBlock``)::

    y = ReLU( BN_3(conv3x3(x)) + BN_1(conv1x1(x)) + BN_id(x) )

- conv3x3: kernel 3, padding 1, stride s, groups g, no bias;
- conv1x1: kernel 1, padding 0, same stride s and groups g, no bias;
- BN_id (the identity branch) exists only when ``cin == cout`` and ``s == 1``.

Inference form: every branch is a conv of ``x`` with the same output geometry, so their sum is one
3x3 conv (padding 1, stride s, groups g, with bias):

- BN_k after conv_k folds into it (scale output channels by gamma/sigma, bias beta - mean*gamma/sigma);
- the 1x1 (pad 0) kernel is embedded at the centre of a 3x3 (pad 1) kernel (offset P - p = 1);
  this also holds at stride 2, which is why the stride-2 blocks keep their 1x1 branch;
- the identity is the 3x3 kernel with a 1 at the centre of ``K[o, o mod (cin/g)]`` -- *per group*
  (for g > 1 the in-group index is ``o mod (cin/g)``, not ``o``);
- the kernels and biases are summed.

Deploy structure: the body is only ``Conv`` and ``Relu`` (one of each per block); the network adds
``GlobalAveragePool`` (ReduceMean in the dynamo export), ``Flatten`` (Reshape) and one ``Gemm``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .common import ConvBN
from .deploy import bn_kernel, conv_bn_kernel, make_conv, pad_kernel

__all__ = ["RepVGGBlock", "RepVGG"]


class RepVGGBlock(nn.Module):
    """Training-time RepVGG block: 3x3 conv-BN + 1x1 conv-BN (+ identity BN) then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1,
                 use_identity: bool = True):
        super().__init__()
        if cin % groups or cout % groups:
            raise ValueError(f"channels {cin}->{cout} not divisible by groups={groups}")
        self.rbr_dense = ConvBN(cin, cout, 3, stride=stride, padding=1, groups=groups)
        self.rbr_1x1 = ConvBN(cin, cout, 1, stride=stride, padding=0, groups=groups)
        self.rbr_identity = (nn.BatchNorm2d(cin)
                             if use_identity and cin == cout and stride == 1 else None)
        self.act = nn.ReLU()

    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """3x3 kernel and bias (float64) equal to the three branches' sum."""
        k3, b3 = conv_bn_kernel(self.rbr_dense)
        k1, b1 = conv_bn_kernel(self.rbr_1x1)
        k, b = k3 + pad_kernel(k1, 3), b3 + b1
        if self.rbr_identity is not None:
            kid, bid = bn_kernel(self.rbr_identity, self.rbr_dense.conv.groups, 3)
            k, b = k + kid, b + bid
        return k, b

    def switch_to_deploy(self) -> None:
        """RepVGG's own conversion: one 3x3 conv (``rbr_reparam``) replaces the branches."""
        if hasattr(self, "rbr_reparam"):
            return
        k, b = self.get_equivalent_kernel_bias()
        self.rbr_reparam = make_conv(self.rbr_dense.conv, k, b)
        del self.rbr_dense, self.rbr_1x1, self.rbr_identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "rbr_reparam"):
            return self.act(self.rbr_reparam(x))
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.act(out)


class RepVGG(nn.Module):
    """A small RepVGG classifier.

    Stem: RepVGGBlock(in_ch -> widths[0], stride 2).  Stage i: ``depths[i]`` blocks of width
    ``widths[i + 1]``, the first with stride 2.  Counting blocks over the whole network (stem = 0),
    the odd-indexed blocks use ``groups`` (as RepVGG's g2/g4 variants do), so the network contains
    grouped blocks both with and without an identity branch.  Head: global average pool, flatten,
    Linear.
    """

    def __init__(self, in_ch: int = 3, widths: Sequence[int] = (8, 16, 32),
                 depths: Sequence[int] = (2, 3), groups: int = 4, num_classes: int = 10):
        super().__init__()
        if len(widths) != len(depths) + 1:
            raise ValueError("need one width for the stem plus one per stage")
        blocks = [RepVGGBlock(in_ch, widths[0], stride=2)]
        cin = widths[0]
        for width, depth in zip(widths[1:], depths):
            for j in range(depth):
                g = groups if len(blocks) % 2 == 1 else 1
                blocks.append(RepVGGBlock(cin, width, stride=2 if j == 0 else 1, groups=g))
                cin = width
        self.body = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(cin, num_classes)

    @property
    def num_blocks(self) -> int:
        return len(self.body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.body(x))))
