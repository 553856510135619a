"""RepMLP (Ding et al., RepMLPNet, CVPR 2022): locality injected into a fully connected layer.

Training-time block, for an input x: [N, C, h, w] whose h and w are fixed::

    fc(x)   = reshape(BN1d(Linear(flatten(x))), [N, O, h, w])     Linear: C·h·w → O·h·w
    conv(x) = Σ_k BN_k(conv_k×k(x))                                k in `kernels`, padding k//2,
                                                                   `groups` groups, O outputs
    y       = Relu(fc(x) + conv(x))

The FC sees the whole map (global, position-aware); the conv branches add the local prior an MLP
lacks.  Written as ``fc_out + (conv_1 + conv_3)`` like RepMLPNet, so the conv branches form one
linear region of x.

Inference form.  Fold every BN into its conv / into the Linear (BN1d acts per output feature),
merge the conv branches into one k_max×k_max conv (kernels zero-padded to the largest, added).
On a fixed h×w a conv is a linear map of flatten(x): a sparse, weight-shared matrix

    M[o·hw + n, c·hw + q] = K[o, c − group_start(o), u]    for q = n + u − k//2 inside the map

(taps on the zero padding contribute nothing), with its bias repeated per position.  So

    y = Relu(reshape((W_fc + M) · flatten(x) + b_fc + repeat(b_conv, h·w), [N, O, h, w]))

Deploy structure: Flatten → Gemm (C·h·w → O·h·w) → Reshape → Relu.  The conv costs nothing at run
time: the dense FC already touches every (input, output) pair.

RepMLPNet applies the FC per h×w partition of a larger map; here the map is one partition.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import ConvBN

__all__ = ["RepMLPBlock"]


class RepMLPBlock(nn.Module):
    """FC over the flattened map + parallel conv-BN branches, summed, ReLU."""

    def __init__(self, channels: int = 8, out_channels: int = 8, h: int = 8, w: int = 8,
                 kernels: tuple[int, ...] = (1, 3), groups: int = 2):
        super().__init__()
        self.cin, self.cout, self.h, self.w = channels, out_channels, h, w
        self.fc = nn.Linear(channels * h * w, out_channels * h * w)
        self.fc_bn = nn.BatchNorm1d(out_channels * h * w)
        self.convs = nn.ModuleList(
            ConvBN(channels, out_channels, k, padding=k // 2, groups=groups) for k in kernels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc_out = self.fc_bn(self.fc(x.flatten(1))).reshape(-1, self.cout, self.h, self.w)
        conv_out = self.convs[0](x)
        for branch in self.convs[1:]:
            conv_out = conv_out + branch(x)
        return self.act(fc_out + conv_out)
