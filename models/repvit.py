"""RepViT (Wang et al., CVPR 2024): RepVggDw token mixer and the distillation classifier head.

Token mixer ``RepVggDw`` (channels C, depthwise)::

    y = BN_o( BN_3(dwconv3x3(x)) + dwconv1x1(x) + x )     # dwconv1x1 has a bias and no BN

Inference form: fold BN_3, embed the 1x1 kernel and the identity (1 at the centre) in the 3x3
kernel, add, then fold the *outer* BN_o (a BN after an Add: it scales the summed kernel and bias).
One depthwise 3x3 conv.

Classifier head with distillation (``BNLinearHead`` x2, averaged at inference)::

    logits = ( Linear_a(BN1d_a(f)) + Linear_d(BN1d_d(f)) ) / 2

A BN1d before a Linear folds into it exactly (no padding in a Linear): ``W' = W * s``,
``b' = b + W @ t`` with ``s = gamma/sigma`` and ``t = beta - mean*s``; the average of two linear
maps of the same ``f`` is one linear map ``(W'_a + W'_d)/2``, ``(b'_a + b'_d)/2``.

``RepViTNet`` is a minimal RepViT stage: RepVggDw token mixer -> channel-mixer residual
(1x1 conv-BN -> ReLU -> 1x1 conv-BN, + input) -> global average pool -> flatten -> head.  (RepViT
uses GELU in the channel mixer; ReLU is used here so that the deploy op histogram does not depend
on how each exporter decomposes GELU.)

Deploy structure: token mixer -> one depthwise ``Conv``; head -> one ``Gemm``.  Whole network:
``Conv`` x3, ``Relu`` x1, ``Add`` x1 (the channel-mixer residual), ``GlobalAveragePool`` (ReduceMean),
``Flatten`` (Reshape), ``Gemm`` x1.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import ConvBN

__all__ = ["RepVggDw", "BNLinearHead", "DistillHead", "RepViTNet"]


class RepVggDw(nn.Module):
    """RepViT's token mixer: BN(dw3x3-BN(x) + dw1x1(x) + x)."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.conv = ConvBN(dim, dim, 3, padding=1, groups=dim)
        self.conv1 = nn.Conv2d(dim, dim, 1, groups=dim, bias=True)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn((self.conv(x) + self.conv1(x)) + x)


class BNLinearHead(nn.Sequential):
    """BatchNorm1d followed by Linear."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.l = nn.Linear(dim, num_classes)


class DistillHead(nn.Module):
    """Classifier + distillation head, averaged (RepViT's inference-time ``Classfier``)."""

    def __init__(self, dim: int = 16, num_classes: int = 10):
        super().__init__()
        self.classifier = BNLinearHead(dim, num_classes)
        self.classifier_dist = BNLinearHead(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.classifier(x) + self.classifier_dist(x)) / 2


class RepViTNet(nn.Module):
    """Token mixer, channel-mixer residual, pool, distillation head."""

    def __init__(self, dim: int = 16, hidden: int = 32, num_classes: int = 10):
        super().__init__()
        self.token_mixer = RepVggDw(dim)
        self.channel_mixer = nn.Sequential(ConvBN(dim, hidden, 1), nn.ReLU(),
                                           ConvBN(hidden, dim, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.head = DistillHead(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        x = x + self.channel_mixer(x)
        return self.head(self.flatten(self.pool(x)))
