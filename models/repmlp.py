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

import torch.nn.functional as F

from .common import ConvBN
from .deploy import conv_bn_kernel, pad_kernel

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

    def switch_to_deploy(self) -> None:
        """RepMLPNet's ``local_inject``: BN1d folds into the FC; the merged conv, applied to the
        identity basis of the flattened map, is the matrix added to the FC weight."""
        if self.convs is None:
            return
        k_max = max(cb.conv.kernel_size[0] for cb in self.convs)
        parts = [conv_bn_kernel(cb) for cb in self.convs]
        kern = sum(pad_kernel(k, k_max) for k, _ in parts)
        bias = sum(b for _, b in parts)
        groups = self.convs[0].conv.groups
        n = self.cin * self.h * self.w
        with torch.no_grad():
            basis = torch.eye(n, dtype=torch.float64).reshape(n, self.cin, self.h, self.w)
            m = F.conv2d(basis, kern, padding=k_max // 2, groups=groups).reshape(n, -1).t()
            s = self.fc_bn.weight.double() / torch.sqrt(self.fc_bn.running_var.double()
                                                        + self.fc_bn.eps)
            w = self.fc.weight.double() * s.view(-1, 1) + m
            b = ((self.fc.bias.double() - self.fc_bn.running_mean.double()) * s
                 + self.fc_bn.bias.double() + bias.repeat_interleave(self.h * self.w))
            fc = nn.Linear(n, w.shape[0])
            fc.weight.copy_(w.float())
            fc.bias.copy_(b.float())
        self.fc, self.fc_bn, self.convs = fc, None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.convs is None:
            return self.act(self.fc(x.flatten(1)).reshape(-1, self.cout, self.h, self.w))
        fc_out = self.fc_bn(self.fc(x.flatten(1))).reshape(-1, self.cout, self.h, self.w)
        conv_out = self.convs[0](x)
        for branch in self.convs[1:]:
            conv_out = conv_out + branch(x)
        return self.act(fc_out + conv_out)
