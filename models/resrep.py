"""ResRep (Ding et al., ICCV 2021): a conv-BN followed by a 1x1 "compactor", as left by training.

Training-time block::

    h = compactor( BN_1(convKxK(x)) )        # compactor: 1x1 conv C -> C, no bias
    y = BN_2(convKxK'( ReLU(h) ))

ResRep trains the compactor with a penalty that drives whole output rows of its kernel to zero
and finally zeroes them; ``zero_fraction`` simulates that by setting that fraction of the
compactor's output rows (seeded choice) *exactly* to 0.  The compactor starts as the identity plus
noise (ResRep initialises it to the identity).

Inference form: conv-BN-compactor is one KxK conv (fold BN_1; compose with the 1x1:
``K = Q @ K_1'``, ``b = Q @ b_1'``).  A row of ``Q`` that is zero gives an output channel whose
weights *and* bias are exactly zero; ReLU(0) = 0, so that channel is dead: it is dropped together
with the matching input channels of the following conv.  (Only exact zeros may be dropped; pruning
by a norm threshold changes the function.)

Deploy structure: ``Conv`` x2 and ``Relu`` x1; the first Conv has ``C - round(zero_fraction * C)``
output channels and the second conv as many input channels.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import ConvBN
from .deploy import conv_bn_kernel, make_conv

__all__ = ["ResRepBlock"]


class ResRepBlock(nn.Module):
    """conv-BN -> 1x1 compactor (some rows exactly zero) -> ReLU -> conv-BN."""

    def __init__(self, cin: int = 8, channels: int = 16, cout: int = 16, kernel_size: int = 3,
                 zero_fraction: float = 0.25, seed: int = 0):
        super().__init__()
        p = kernel_size // 2
        self.conv = ConvBN(cin, channels, kernel_size, padding=p)
        self.compactor = nn.Conv2d(channels, channels, 1, bias=False)
        self.relu = nn.ReLU()
        self.following = ConvBN(channels, cout, kernel_size, padding=p)
        gen = torch.Generator().manual_seed(seed)
        n_zero = int(round(zero_fraction * channels))
        with torch.no_grad():
            q = torch.eye(channels) + 0.3 * torch.randn(channels, channels, generator=gen)
            zero_rows = torch.randperm(channels, generator=gen)[:n_zero].sort().values
            q[zero_rows] = 0.0
            self.compactor.weight.copy_(q.view(channels, channels, 1, 1))
        self.register_buffer("zero_rows", zero_rows, persistent=False)

    @property
    def kept_channels(self) -> int:
        return self.compactor.out_channels - len(self.zero_rows)

    def switch_to_deploy(self) -> None:
        """ResRep's conversion: conv-BN-compactor -> one conv; the zero rows of the compactor (and
        the matching input channels of the following conv) are removed."""
        if self.compactor is None:
            return
        k, b = conv_bn_kernel(self.conv)
        with torch.no_grad():
            q = self.compactor.weight.double()[:, :, 0, 0]
            keep = torch.ones(q.shape[0], dtype=torch.bool)
            keep[self.zero_rows] = False
            k2 = torch.einsum("om,miuv->oiuv", q[keep], k)
            b2 = q[keep] @ b
            kf, bf = conv_bn_kernel(self.following)
        self.conv = make_conv(self.conv.conv, k2, b2)
        self.following = make_conv(self.following.conv, kf[:, keep], bf)
        self.compactor = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compactor is None:
            return self.following(self.relu(self.conv(x)))
        return self.following(self.relu(self.compactor(self.conv(x))))
