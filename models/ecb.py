"""ECB, the edge-oriented convolution block of ECBSR (Zhang et al., ACM MM 2021), training-time form.

Five branches read the same input ``x`` (I -> O channels, all stride 1) and are summed, then PReLU::

    y = conv3x3(x)                                   # pad 1, bias
      + conv3x3'(fill_b0(conv1x1(x)))                # 1x1 (I -> M) then 3x3 pad 0 (M -> O)
      + dw3x3(fill_b0(conv1x1(x)); s_x * Sobel_x)    # 1x1 (I -> O) then depthwise 3x3 pad 0
      + dw3x3(fill_b0(conv1x1(x)); s_y * Sobel_y)    #   whose kernel is a learnable per-channel
      + dw3x3(fill_b0(conv1x1(x)); s_l * Laplacian)  #   scale times a fixed mask, plus a bias
      [+ x]                                          # with_idt and I == O
    out = PReLU(y)                                   # per-channel slope

``fill_b0`` is ECBSR's border: zero-pad one pixel (``F.pad``) then overwrite the border rows and
columns with the 1x1 conv's own bias ``b0`` by slice assignment (``y0[:, :, 0:1, :] = b0`` ...),
which is what the 1x1 conv would have produced on a zero-padded input.  Hence each two-conv
branch is exactly one padded 3x3 conv of ``x`` (``K[o, i] = sum_m W1[o, m] * W0[m, i]``, bias
``b1 + sum_{m,u,v} W1[o, m, u, v] * b0[m]``, the depthwise ones with a diagonal W1), and the sum
is one 3x3 conv (the identity at the kernel centre).  The exporters write the slice assignments
like DBB's ``slice`` border (models/dbb.py): Pad then four ScatterND.

Hand-written deploy (``switch_to_deploy``, ECBSR's ``rep_params``): one 3x3 conv, then the PReLU.
ECBSR's own ``forward`` re-computes that kernel on every eval call; here eval runs the branches
(the training-time graph is what gets exported) until ``switch_to_deploy``.  Initial values differ
from ECBSR's where its tiny ones (scales and biases ~1e-3) would hide a misplaced border or bias:
scales ~N(0, 0.5^2), biases ~N(0, 0.1^2), PReLU slopes U(0.1, 0.4) per channel.

Deploy structure: one ``Conv`` + ``PRelu`` per block.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .deploy import make_conv

__all__ = ["SeqConv3x3", "ECB", "ECBNet", "SEQ_TYPES"]

SEQ_TYPES = ("conv1x1-conv3x3", "conv1x1-sobelx", "conv1x1-sobely", "conv1x1-laplacian")


def _edge_mask(seq_type: str, channels: int) -> torch.Tensor:
    """(channels, 1, 3, 3): the fixed Sobel-x / Sobel-y / Laplacian kernel on every channel."""
    m = {
        "conv1x1-sobelx": [[1, 0, -1], [2, 0, -2], [1, 0, -1]],
        "conv1x1-sobely": [[1, 2, 1], [0, 0, 0], [-1, -2, -1]],
        "conv1x1-laplacian": [[0, 1, 0], [1, -4, 1], [0, 1, 0]],
    }[seq_type]
    return torch.tensor(m, dtype=torch.float32).view(1, 1, 3, 3).repeat(channels, 1, 1, 1)


def _fill_border(y0: torch.Tensor, b0: torch.Tensor) -> torch.Tensor:
    """ECBSR's border: pad one pixel with zeros, then write the bias b0 into the border."""
    y0 = F.pad(y0, (1, 1, 1, 1), "constant", 0)
    b0_pad = b0.view(1, -1, 1, 1)
    y0[:, :, 0:1, :] = b0_pad
    y0[:, :, -1:, :] = b0_pad
    y0[:, :, :, 0:1] = b0_pad
    y0[:, :, :, -1:] = b0_pad
    return y0


class SeqConv3x3(nn.Module):
    """ECBSR's sequential branch: a 1x1 conv, the bias-filled border, then a 3x3 conv (pad 0):
    dense (``conv1x1-conv3x3``, width ``depth_multiplier * O``) or depthwise scale * fixed mask."""

    def __init__(self, seq_type: str, cin: int, cout: int, depth_multiplier: int = 2):
        super().__init__()
        if seq_type not in SEQ_TYPES:
            raise ValueError(f"seq_type must be one of {SEQ_TYPES}, got {seq_type!r}")
        self.type, self.cin, self.cout = seq_type, cin, cout
        if seq_type == "conv1x1-conv3x3":
            self.mid = int(cout * depth_multiplier)
            conv0 = nn.Conv2d(cin, self.mid, 1)
            conv1 = nn.Conv2d(self.mid, cout, 3)
            self.k0, self.b0 = conv0.weight, conv0.bias
            self.k1, self.b1 = conv1.weight, conv1.bias
        else:
            conv0 = nn.Conv2d(cin, cout, 1)
            self.k0, self.b0 = conv0.weight, conv0.bias
            self.scale = nn.Parameter(0.5 * torch.randn(cout, 1, 1, 1))
            self.bias = nn.Parameter(0.1 * torch.randn(cout))
            self.register_buffer("mask", _edge_mask(seq_type, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0 = _fill_border(F.conv2d(x, self.k0, self.b0, stride=1), self.b0)
        if self.type == "conv1x1-conv3x3":
            return F.conv2d(y0, self.k1, self.b1, stride=1)
        return F.conv2d(y0, self.scale * self.mask, self.bias, stride=1, groups=self.cout)

    @torch.no_grad()
    def rep_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ECBSR's ``rep_params``: the padded 3x3 kernel (O x I x 3 x 3) and bias, in float64."""
        k0, b0 = self.k0.double(), self.b0.double()
        if self.type == "conv1x1-conv3x3":
            k1, b1 = self.k1.double(), self.b1.double()
        else:
            tmp = (self.scale * self.mask).double()
            k1 = torch.zeros(self.cout, self.cout, 3, 3, dtype=torch.float64)
            o = torch.arange(self.cout)
            k1[o, o] = tmp[:, 0]
            b1 = self.bias.double()
        rk = F.conv2d(k1, k0.permute(1, 0, 2, 3))
        rb = torch.ones(1, k1.shape[1], 3, 3, dtype=torch.float64) * b0.view(1, -1, 1, 1)
        rb = F.conv2d(rb, k1).view(-1) + b1
        return rk, rb


class ECB(nn.Module):
    """Training-time ECB: 3x3 + 1x1->3x3 + 1x1->Sobel-x/Sobel-y/Laplacian (+ identity), PReLU."""

    def __init__(self, cin: int, cout: int, depth_multiplier: int = 2, with_idt: bool = False):
        super().__init__()
        self.cin, self.cout = cin, cout
        self.with_idt = with_idt and cin == cout
        self.conv3x3 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv1x1_3x3 = SeqConv3x3("conv1x1-conv3x3", cin, cout, depth_multiplier)
        self.conv1x1_sbx = SeqConv3x3("conv1x1-sobelx", cin, cout)
        self.conv1x1_sby = SeqConv3x3("conv1x1-sobely", cin, cout)
        self.conv1x1_lpl = SeqConv3x3("conv1x1-laplacian", cin, cout)
        self.act = nn.PReLU(num_parameters=cout)
        with torch.no_grad():
            self.act.weight.copy_(0.1 + 0.3 * torch.rand(cout))

    @torch.no_grad()
    def rep_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ECBSR's ``rep_params``: the sum of the branches' 3x3 kernels and biases (float64)."""
        rk = self.conv3x3.weight.double()
        rb = self.conv3x3.bias.double()
        for seq in (self.conv1x1_3x3, self.conv1x1_sbx, self.conv1x1_sby, self.conv1x1_lpl):
            k, b = seq.rep_params()
            rk, rb = rk + k, rb + b
        if self.with_idt:
            ident = torch.zeros(self.cout, self.cin, 3, 3, dtype=torch.float64)
            o = torch.arange(self.cout)
            ident[o, o, 1, 1] = 1.0
            rk = rk + ident
        return rk, rb

    def switch_to_deploy(self) -> None:
        """One 3x3 conv (``rep_conv``) replaces the branches; the PReLU stays."""
        if hasattr(self, "rep_conv"):
            return
        rk, rb = self.rep_params()
        self.rep_conv = make_conv(self.conv3x3, rk, rb)
        del self.conv3x3, self.conv1x1_3x3, self.conv1x1_sbx, self.conv1x1_sby, self.conv1x1_lpl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "rep_conv"):
            return self.act(self.rep_conv(x))
        y = (self.conv3x3(x) + self.conv1x1_3x3(x) + self.conv1x1_sbx(x) + self.conv1x1_sby(x)
             + self.conv1x1_lpl(x))
        if self.with_idt:
            y = y + x
        return self.act(y)


class ECBNet(nn.Module):
    """Two ECBs, like ECBSR's body: cin -> width, then width -> width with the identity."""

    def __init__(self, cin: int = 4, width: int = 8, depth_multiplier: int = 2):
        super().__init__()
        self.block1 = ECB(cin, width, depth_multiplier)
        self.block2 = ECB(width, width, depth_multiplier, with_idt=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x))
