"""OREPA (Hu et al., CVPR 2022, "Online Convolutional Re-parameterization"), training-time form.

OREPA drops the per-branch BNs of DBB-style blocks and builds the kernel *in forward* from its
parameters, so training runs one conv.  With K = kernel size, O x I channels (groups 1) and a
learnable per-branch, per-output-channel vector ``v`` (6 x O)::

    W = v[0] * W_origin                                   # KxK
      + v[1] * (W_avg[o, i] * 1/K^2)                      # 1x1 -> average pool, as a KxK kernel
      + v[2] * (W_pfir[o, i] * P[o])                      # 1x1 times a fixed frequency prior P
      + v[3] * sum_m W2[o, m] * (W1 + Id)[m, i]           # 1x1 (identity-initialized) -> KxK
      + v[4] * pad(W_1x1)                                 # 1x1 at the kernel centre
      + v[5] * sum_t Wpw[o, i, t] * Wdw[i, t]             # depthwise KxK (multiplier T) -> 1x1
    y = act(BN(conv(x, W, stride, padding K // 2)))       # one conv, then the trailing BN

(``v[i] * A`` scales A's output channels.)  The exporters write the weight computation as
Einsum / Mul / Add / Pad / Gather ops over initializers (the folding forms may fold some or all of
it to one initializer): a re-parameterizer must constant-fold it, then fold the trailing BN into
the conv.  The prior P is a fixed 2-D DCT basis (one frequency per output channel), a buffer.

Hand-written deploy (``switch_to_deploy``, OREPA's own): evaluate W once, fold the BN into it, one
biased ``nn.Conv2d``.  The initial values follow OREPA's (vector (0.25, 0.25, 0, 0.5, 1, 0.5),
W1 = 0) plus seeded noise, so that a branch left out of the fold changes the output.

Deploy structure: one ``Conv`` + ``Relu`` per block.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from .deploy import fuse_bn, make_conv

__all__ = ["OREPA", "OREPANet"]


def _dct_prior(channels: int, k: int) -> torch.Tensor:
    """(channels, k, k): channel o holds the 2-D DCT-II basis of frequency divmod(o mod k^2, k)."""
    prior = torch.zeros(channels, k, k)
    pos = torch.arange(k, dtype=torch.float64) + 0.5
    for o in range(channels):
        u, v = divmod(o % (k * k), k)
        row = torch.cos(math.pi * pos * u / k)
        col = torch.cos(math.pi * pos * v / k)
        prior[o] = torch.outer(row, col).float()
    return prior


class OREPA(nn.Module):
    """Training-time OREPA block: kernel computed from six branches, one conv, BN, ReLU."""

    def __init__(self, cin: int = 8, cout: int = 16, kernel_size: int = 3, stride: int = 1,
                 internal: int | None = None, dw_multiplier: int = 2, act: bool = True):
        super().__init__()
        k = kernel_size
        internal = cin if internal is None else internal
        self.cin, self.cout, self.kernel_size, self.stride = cin, cout, k, stride
        self.dw_multiplier = dw_multiplier

        def param(*shape, scale=None):
            fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
            s = 1.0 / math.sqrt(fan_in) if scale is None else scale
            return nn.Parameter(torch.randn(*shape) * s)

        self.weight_origin = param(cout, cin, k, k)
        self.weight_avg_conv = param(cout, cin, 1, 1)
        self.register_buffer("weight_avg_avg", torch.full((k, k), 1.0 / (k * k)))
        self.weight_pfir_conv = param(cout, cin, 1, 1)
        self.register_buffer("weight_prior", _dct_prior(cout, k))
        self.weight_1x1_kxk_idconv1 = param(internal, cin, 1, 1, scale=0.1)
        id_tensor = torch.zeros(internal, cin, 1, 1)
        id_tensor[torch.arange(min(internal, cin)), torch.arange(min(internal, cin))] = 1.0
        self.register_buffer("id_tensor", id_tensor)
        self.weight_1x1_kxk_conv2 = param(cout, internal, k, k)
        self.weight_1x1 = param(cout, cin, 1, 1)
        self.weight_dw = param(cin * dw_multiplier, 1, k, k)
        self.weight_pw = param(cout, cin * dw_multiplier, 1, 1)
        init = torch.tensor([0.25, 0.25, 0.0, 0.5, 1.0, 0.5]).view(6, 1)
        self.vector = nn.Parameter(init + 0.2 * torch.randn(6, cout))
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU() if act else nn.Identity()

    def weight_gen(self) -> torch.Tensor:
        """The kernel W (O x I x K x K) of the module docstring, computed from the parameters."""
        k, p = self.kernel_size, self.kernel_size // 2
        v = self.vector
        w = torch.einsum("oihw,o->oihw", self.weight_origin, v[0, :])
        # 1x1 kernels enter the einsums as (O, I): ONNX's Einsum does not broadcast a size-1 label
        # against a size-K one the way torch.einsum does (the dynamo-noopt export would fail
        # ONNX shape inference).
        avg = torch.einsum("oi,hw->oihw", self.weight_avg_conv.flatten(1), self.weight_avg_avg)
        w = w + torch.einsum("oihw,o->oihw", avg, v[1, :])
        pfir = torch.einsum("oi,ohw->oihw", self.weight_pfir_conv.flatten(1), self.weight_prior)
        w = w + torch.einsum("oihw,o->oihw", pfir, v[2, :])
        conv1 = self.weight_1x1_kxk_idconv1 + self.id_tensor
        seq = torch.einsum("omhw,mi->oihw", self.weight_1x1_kxk_conv2, conv1.flatten(1))
        w = w + torch.einsum("oihw,o->oihw", seq, v[3, :])
        w = w + torch.einsum("oihw,o->oihw", F.pad(self.weight_1x1, [p, p, p, p]), v[4, :])
        t = self.dw_multiplier
        dw = self.weight_dw.view(self.cin, t, k, k)
        pw = self.weight_pw.view(self.cout, self.cin, t)
        w = w + torch.einsum("oihw,o->oihw", torch.einsum("oit,ithw->oihw", pw, dw), v[5, :])
        # the legacy exporter's Conv needs the kernel's shape, which its shape inference does not
        # carry through Einsum: a Reshape to the known shape states it
        return w.reshape(self.cout, self.cin, k, k)

    def switch_to_deploy(self) -> None:
        """OREPA's conversion: evaluate the kernel, fold the BN, one biased conv."""
        if hasattr(self, "orepa_reparam"):
            return
        with torch.no_grad():
            kern, bias = fuse_bn(self.weight_gen(), None, self.bn)
        like = nn.Conv2d(self.cin, self.cout, self.kernel_size, stride=self.stride,
                         padding=self.kernel_size // 2)
        self.orepa_reparam = make_conv(like, kern, bias)
        for name in ("weight_origin", "weight_avg_conv", "weight_pfir_conv",
                     "weight_1x1_kxk_idconv1", "weight_1x1_kxk_conv2", "weight_1x1", "weight_dw",
                     "weight_pw", "vector", "weight_avg_avg", "weight_prior", "id_tensor", "bn"):
            delattr(self, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "orepa_reparam"):
            return self.act(self.orepa_reparam(x))
        out = F.conv2d(x, self.weight_gen(), None, self.stride, self.kernel_size // 2)
        return self.act(self.bn(out))


class OREPANet(nn.Module):
    """Two OREPA blocks: cin -> width (stride 1), width -> width (stride 2)."""

    def __init__(self, cin: int = 8, width: int = 16):
        super().__init__()
        self.block1 = OREPA(cin, width, 3, stride=1)
        self.block2 = OREPA(width, width, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x))
