"""ResNet-18 / ResNet-50 (He et al., 2016), torchvision-like structure written from scratch.

Structure (width w, default 64 as in torchvision; use a small w and a 64x64 input for speed)::

    stem:   conv7x7/2 (pad 3)-BN-ReLU -> MaxPool 3x3/2 (pad 1)
    layers: 4 stages of widths w, 2w, 4w, 8w; stages 2-4 start with stride 2
            BasicBlock (ResNet-18, [2, 2, 2, 2]):
                y = ReLU( BN(conv3x3(ReLU(BN(conv3x3/s(x))))) + shortcut(x) )
            Bottleneck (ResNet-50, [3, 4, 6, 3], expansion 4, stride on the 3x3 -- "v1.5"):
                y = ReLU( BN(conv1x1(ReLU(BN(conv3x3/s(ReLU(BN(conv1x1(x)))))))) + shortcut(x) )
            shortcut = identity, or 1x1/s conv-BN projection when shape changes
    head:   AdaptiveAvgPool(1) -> flatten -> Linear

The last BN of every residual branch carries ``calib_scale = 0.25`` so that ``calibrate`` gives it
quarter-size gamma/beta (like torchvision's ``zero_init_residual``, less extreme): this keeps the
random deep network out of the chaotic regime (full-size branches: float32 drifts ~5e-5 of
the output from float64; at 0.25: ~2e-6).

Deploy structure (plain re-parameterization, no RM): every conv absorbs its BN; the residual Adds,
MaxPool and head stay.
- ResNet-18: ``Conv`` 20 (1 + 16 + 3 projections), ``Relu`` 17, ``Add`` 8, ``MaxPool`` 1.
- ResNet-50: ``Conv`` 53 (1 + 48 + 4 projections), ``Relu`` 49, ``Add`` 16, ``MaxPool`` 1.
Plus ``GlobalAveragePool`` (ReduceMean), ``Flatten`` (Reshape) and ``Gemm`` 1.

With RM (ResNet -> plain, opt-in): each block input is >= 0 (it comes from a ReLU, or MaxPool of a
ReLU), so the residual can ride through the block's convs on extra Dirac channels (a projected
shortcut, which may be negative, rides as the pair relu(d), relu(-d)); every Add disappears:
ResNet-18 -> ``Conv`` 17, ``Relu`` 17; ResNet-50 -> ``Conv`` 49, ``Relu`` 49 (MACs grow).
"""
from __future__ import annotations

from typing import Sequence, Type

import torch
from torch import nn

from .common import CALIB_SCALE_ATTR, ConvBN

#: gamma/beta factor ``calibrate`` applies to the last BN of every residual branch (see common).
RESIDUAL_BN_SCALE = 0.25

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet50"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = ConvBN(cin, width, 3, stride=stride, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = ConvBN(width, cout, 3, padding=1)
        setattr(self.conv2.bn, CALIB_SCALE_ATTR, RESIDUAL_BN_SCALE)
        self.downsample = (ConvBN(cin, cout, 1, stride=stride)
                           if stride != 1 or cin != cout else None)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.relu1(self.conv1(x)))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = ConvBN(cin, width, 1)
        self.relu1 = nn.ReLU()
        self.conv2 = ConvBN(width, width, 3, stride=stride, padding=1)
        self.relu2 = nn.ReLU()
        self.conv3 = ConvBN(width, cout, 1)
        setattr(self.conv3.bn, CALIB_SCALE_ATTR, RESIDUAL_BN_SCALE)
        self.downsample = (ConvBN(cin, cout, 1, stride=stride)
                           if stride != 1 or cin != cout else None)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.relu(self.conv3(out) + identity)


class ResNet(nn.Module):
    def __init__(self, block: Type[nn.Module], layers: Sequence[int], width: int = 64,
                 in_ch: int = 3, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(ConvBN(in_ch, width, 7, stride=2, padding=3), nn.ReLU())
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = []
        cin = width
        for i, depth in enumerate(layers):
            w = width * 2 ** i
            blocks = []
            for j in range(depth):
                blocks.append(block(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.stem(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(width: int = 64, num_classes: int = 10) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), width=width, num_classes=num_classes)


def resnet50(width: int = 64, num_classes: int = 10) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), width=width, num_classes=num_classes)
