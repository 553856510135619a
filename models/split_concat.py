"""Split -> per-chunk conv -> Concat: a grouped convolution written the long way.

Training-time block (input channels Cin split into g equal chunks, in order)::

    x_0, ..., x_{g-1} = chunk(x, g, dim=1)
    y = concat( BN_0(conv_0(x_0)), ..., BN_{g-1}(conv_{g-1}(x_{g-1})) , dim=1)

with every conv_i of the same kernel size, stride and padding (Cin/g -> Cout/g).

Inference form: fold each BN; stacking the per-chunk kernels along the output axis gives exactly
the weight of one grouped conv (groups g, Cout x Cin/g x K x K) whose group i reads chunk i and
writes output block i; the biases concatenate likewise.

Deploy structure: exactly one ``Conv`` (group g); the Split and Concat are gone.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import ConvBN
from .deploy import conv_bn_kernel, make_conv

__all__ = ["SplitConvConcat"]


class SplitConvConcat(nn.Module):
    """chunk(x, g) -> conv-BN per chunk -> cat."""

    def __init__(self, cin: int = 16, cout: int = 32, groups: int = 4, kernel_size: int = 3,
                 stride: int = 1):
        super().__init__()
        if cin % groups or cout % groups:
            raise ValueError("channels must divide by groups")
        self.groups = groups
        self.convs = nn.ModuleList(
            ConvBN(cin // groups, cout // groups, kernel_size, stride=stride,
                   padding=kernel_size // 2)
            for _ in range(groups))

    def switch_to_deploy(self) -> None:
        """The per-chunk kernels, stacked along the output axis, are one grouped conv."""
        if hasattr(self, "grouped"):
            return
        parts = [conv_bn_kernel(cb) for cb in self.convs]
        k = torch.cat([p[0] for p in parts])
        b = torch.cat([p[1] for p in parts])
        self.grouped = make_conv(self.convs[0].conv, k, b, groups=self.groups)
        del self.convs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "grouped"):
            return self.grouped(x)
        chunks = torch.chunk(x, self.groups, dim=1)
        return torch.cat([conv(c) for conv, c in zip(self.convs, chunks)], dim=1)
