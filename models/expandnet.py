"""ExpandNet-CL (Guo et al., NeurIPS 2020): a KxK conv trained as a linear chain of three convs.

Training-time expanded conv (``ExpandConvCL``, expansion r, no nonlinearity inside)::

    y = conv1x1_c( convKxK_b( conv1x1_a(x) ) )
        conv1x1_a: cin     -> r*cin,  no bias, no padding
        convKxK_b: r*cin   -> r*cout, bias,   padding K//2, stride s
        conv1x1_c: r*cout  -> cout,   bias,   no padding

Where the padding sits, and why that is exact: the only padded conv is the middle KxK, and the conv
feeding it has **no bias**, so zero-padding its output equals applying it to a zero-padded input
(``W_a * pad0(x) = pad0(W_a * x)``).  The chain is therefore one KxK conv of ``x`` with padding
K//2 and stride s:

    K[o, i] = sum_{m, n} W_c[o, n] * W_b[n, m] * W_a[m, i]      (per spatial tap)
    b[o]    = b_c[o] + sum_n W_c[o, n] * b_b[n]

(A bias on conv1x1_a would break this at the border -- the padded ring would hold zeros instead of
the bias -- unless the padding were moved to the input.)

``ExpandNetCL`` stacks two expanded convs with a ReLU after each.

Deploy structure: one ``Conv`` (KxK) per expanded conv: ``ExpandNetCL`` -> ``Conv`` x2, ``Relu`` x2.
"""
from __future__ import annotations

import torch
from torch import nn

from .deploy import make_conv

__all__ = ["ExpandConvCL", "ExpandNetCL"]


class ExpandConvCL(nn.Module):
    """A KxK conv expanded into 1x1 (no bias) -> KxK (padded) -> 1x1, with no nonlinearity."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1,
                 expansion: int = 4):
        super().__init__()
        mid_in, mid_out = expansion * cin, expansion * cout
        self.expand = nn.Conv2d(cin, mid_in, 1, bias=False)
        self.conv = nn.Conv2d(mid_in, mid_out, kernel_size, stride=stride,
                              padding=kernel_size // 2, bias=True)
        self.squeeze = nn.Conv2d(mid_out, cout, 1, bias=True)
        # Variance-preserving init (std 1/sqrt(fan_in)): PyTorch's default shrinks the variance ~3x
        # per conv, ~27x per expanded conv with no BN to renormalize.
        for conv in (self.expand, self.conv, self.squeeze):
            fan_in = conv.weight[0].numel()
            nn.init.normal_(conv.weight, std=fan_in ** -0.5)
            if conv.bias is not None:
                nn.init.uniform_(conv.bias, -0.2, 0.2)

    def switch_to_deploy(self) -> None:
        """ExpandNet's collapse: the three-conv linear chain becomes the one KxK conv it equals."""
        if hasattr(self, "collapsed"):
            return
        with torch.no_grad():
            wa = self.expand.weight.double()[:, :, 0, 0]                    # (r*cin, cin)
            wb, bb = self.conv.weight.double(), self.conv.bias.double()     # (r*cout, r*cin, K, K)
            wc = self.squeeze.weight.double()[:, :, 0, 0]                   # (cout, r*cout)
            kern = torch.einsum("on,nmuv,mi->oiuv", wc, wb, wa)
            bias = self.squeeze.bias.double() + wc @ bb
        self.collapsed = make_conv(self.conv, kern, bias)
        del self.expand, self.conv, self.squeeze

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "collapsed"):
            return self.collapsed(x)
        return self.squeeze(self.conv(self.expand(x)))


class ExpandNetCL(nn.Module):
    """Two ExpandNet-CL convs, each followed by ReLU (cin -> mid -> cout)."""

    def __init__(self, cin: int = 8, mid: int = 16, cout: int = 16, expansion: int = 4):
        super().__init__()
        self.layer1 = ExpandConvCL(cin, mid, 3, expansion=expansion)
        self.act1 = nn.ReLU()
        self.layer2 = ExpandConvCL(mid, cout, 3, stride=2, expansion=expansion)
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.layer2(self.act1(self.layer1(x))))
