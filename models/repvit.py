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

``RepViTBlockNet`` is a full RepViT block as the paper builds it (stride 1, SE on): token mixer
``RepVggDw`` -> timm's ``SqueezeExcite`` (mean over H, W, 1x1 reduce, ReLU, 1x1 expand, sigmoid,
multiply), then the channel-mixer residual with GELU (1x1 conv-BN -> GELU -> 1x1 conv-BN, + input),
pool and the BN-Linear distillation head.

Hand-written deploy (``switch_to_deploy``, RepViT's ``fuse``): RepVggDw -> one depthwise conv, each
conv-BN -> one conv, the head -> one Linear (RepViT's ``Classfier.fuse`` averages the two fused
BN-Linears); SE and GELU stay.

Deploy structure: token mixer -> one depthwise ``Conv``; head -> one ``Gemm``.  Whole network:
``Conv`` x3, ``Relu`` x1, ``Add`` x1 (the channel-mixer residual), ``GlobalAveragePool`` (ReduceMean),
``Flatten`` (Reshape), ``Gemm`` x1.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import ConvBN
from .deploy import conv_bn_kernel, fuse_bn, fuse_bn_linear, make_conv, pad_kernel

__all__ = ["RepVggDw", "BNLinearHead", "DistillHead", "RepViTNet", "SqueezeExcite",
           "RepViTBlockNet"]


class RepVggDw(nn.Module):
    """RepViT's token mixer: BN(dw3x3-BN(x) + dw1x1(x) + x)."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.conv = ConvBN(dim, dim, 3, padding=1, groups=dim)
        self.conv1 = nn.Conv2d(dim, dim, 1, groups=dim, bias=True)
        self.bn = nn.BatchNorm2d(dim)

    def switch_to_deploy(self) -> None:
        """RepViT's ``RepVGGDW.fuse``: 3x3 + 1x1 + identity, then the outer BN: one dw conv."""
        if self.bn is None:
            return
        k3, b3 = conv_bn_kernel(self.conv)
        k1, b1 = conv_bn_kernel(self.conv1)
        ident = torch.zeros_like(k3)
        ident[:, 0, 1, 1] = 1.0
        kern, bias = fuse_bn(k3 + pad_kernel(k1, 3) + ident, b3 + b1, self.bn)
        self.conv = make_conv(self.conv.conv, kern, bias)
        self.conv1, self.bn = None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is None:
            return self.conv(x)
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

    def switch_to_deploy(self) -> None:
        """RepViT's ``Classfier.fuse``: fold each BN1d into its Linear, average: one Linear."""
        if self.classifier is None:
            return
        wa, ba = fuse_bn_linear(self.classifier.bn, self.classifier.l)
        wd, bd = fuse_bn_linear(self.classifier_dist.bn, self.classifier_dist.l)
        lin = nn.Linear(wa.shape[1], wa.shape[0])
        with torch.no_grad():
            lin.weight.copy_(((wa + wd) / 2).float())
            lin.bias.copy_(((ba + bd) / 2).float())
        self.fused = lin.eval()
        self.classifier, self.classifier_dist = None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            return self.fused(x)
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


class SqueezeExcite(nn.Module):
    """timm's SqueezeExcite as RepViT uses it (rd_ratio 0.25, rounded to a multiple of 8)."""

    def __init__(self, channels: int, rd_ratio: float = 0.25, divisor: int = 8):
        super().__init__()
        rd = max(divisor, int(channels * rd_ratio + divisor / 2) // divisor * divisor)
        self.fc1 = nn.Conv2d(channels, rd, 1, bias=True)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(rd, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(x_se)


class RepViTBlockNet(nn.Module):
    """A RepViT block (RepVggDw + SE token mixer, GELU channel-mixer residual), pool, head."""

    def __init__(self, dim: int = 32, hidden: int = 64, num_classes: int = 10):
        super().__init__()
        self.token_mixer = nn.Sequential(RepVggDw(dim), SqueezeExcite(dim))
        self.channel_mixer = nn.Sequential(ConvBN(dim, hidden, 1), nn.GELU(),
                                           ConvBN(hidden, dim, 1))
        self.head = DistillHead(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        x = x + self.channel_mixer(x)
        return self.head(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))
