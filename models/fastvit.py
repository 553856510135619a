"""FastViT (Vasu et al., ICCV 2023): the RepMixer token mixer and a RepMixer stage, training form.

Training-time RepMixer (channels C, kernel K, layer scale ``ls`` of shape (C, 1, 1))::

    y = x + ls * ( mixer(x) - norm(x) )
    mixer(x) = BN_c(dwconvKxK(x)) + BN_s(x)        # MobileOne block: 1 conv branch + skip BN, no act
    norm(x)  = BN_n(x)                             # MobileOne block with only its skip BN

Every term is a depthwise conv of ``x``: the identity ``x`` is the kernel with 1 at the centre,
BN_s and BN_n are centre-only kernels ``gamma/sigma`` with bias ``beta - mean*gamma/sigma``, and
``ls`` scales output channels.  Hence

    K = I + ls * (K_c + K_s - K_n),   b = ls * (b_c + b_s - b_n)

-- one depthwise KxK conv (padding K//2, groups C, with bias), which is exactly FastViT's own
``reparameterize`` result (``RepMixer.switch_to_deploy`` here).  ``ls`` is named ``layer_scale``
so that ``calibrate`` gives it a non-trivial value (FastViT initialises it to 1e-5, which would
hide a dropped term).

A FastViT stage (``FastViTStage``) stacks ``RepMixerBlock``s, each a RepMixer followed by FastViT's
``ConvFFN`` on a layer-scaled residual::

    x = RepMixer(x)
    x = x + ls2 * fc2(GELU(fc1(BN(dwconv7x7(x)))))        # fc1, fc2: 1x1 convs with bias

FastViT's ``reparameterize_model`` touches only the RepMixer (and MobileOne blocks): the ConvFFN's
conv-BN is left to the exporter's folding and ``ls2`` stays a multiply.  The hand-written deploy
form here is that, with the conv-BN fused (``ConvBN.switch_to_deploy``).

Deploy structure: ``RepMixer`` -> exactly one ``Conv`` (depthwise KxK).
"""
from __future__ import annotations

import torch
from torch import nn

from .common import ConvBN
from .deploy import make_conv
from .mobileone import MobileOneBlock

__all__ = ["RepMixer", "ConvFFN", "RepMixerBlock", "FastViTStage"]


class RepMixer(nn.Module):
    """Training-time FastViT RepMixer: ``x + layer_scale * (mixer(x) - norm(x))``."""

    def __init__(self, dim: int = 16, kernel_size: int = 3, layer_scale_init: float = 1e-5):
        super().__init__()
        self.dim, self.kernel_size = dim, kernel_size
        self.norm = MobileOneBlock(dim, dim, kernel_size, groups=dim, num_conv_branches=0,
                                   use_scale=False, act=False)
        self.mixer = MobileOneBlock(dim, dim, kernel_size, groups=dim, num_conv_branches=1,
                                    use_scale=False, act=False)
        self.layer_scale = nn.Parameter(layer_scale_init * torch.ones(dim, 1, 1))

    def switch_to_deploy(self) -> None:
        """FastViT's ``RepMixer.reparameterize``: one depthwise conv (``reparam_conv``)."""
        if hasattr(self, "reparam_conv"):
            return
        k = self.kernel_size
        km, bm = self.mixer.get_equivalent_kernel_bias()
        kn, bn = self.norm.get_equivalent_kernel_bias()
        with torch.no_grad():
            ls = self.layer_scale.double()
            ident = torch.zeros(self.dim, 1, k, k, dtype=torch.float64)
            ident[:, 0, k // 2, k // 2] = 1.0
            kern = ident + ls.unsqueeze(-1) * (km - kn)
            bias = ls.flatten() * (bm - bn)
        like = nn.Conv2d(self.dim, self.dim, k, padding=k // 2, groups=self.dim)
        self.reparam_conv = make_conv(like, kern, bias)
        del self.mixer, self.norm, self.layer_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "reparam_conv"):
            return self.reparam_conv(x)
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))


class ConvFFN(nn.Module):
    """FastViT's ConvFFN: depthwise 7x7 conv-BN, 1x1 (``fc1``), GELU, 1x1 (``fc2``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.conv = ConvBN(dim, dim, 7, padding=3, groups=dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.conv(x))))


class RepMixerBlock(nn.Module):
    """FastViT's RepMixerBlock: RepMixer token mixer, then ``x + layer_scale * ConvFFN(x)``."""

    def __init__(self, dim: int, kernel_size: int = 3, mlp_ratio: float = 3.0,
                 layer_scale_init: float = 1e-5):
        super().__init__()
        self.token_mixer = RepMixer(dim, kernel_size, layer_scale_init)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio))
        self.layer_scale = nn.Parameter(layer_scale_init * torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        return x + self.layer_scale * self.convffn(x)


class FastViTStage(nn.Sequential):
    """``depth`` RepMixerBlocks of width ``dim`` (a FastViT stage without its patch embedding)."""

    def __init__(self, dim: int = 32, depth: int = 2, kernel_size: int = 3,
                 mlp_ratio: float = 3.0):
        super().__init__(*(RepMixerBlock(dim, kernel_size, mlp_ratio) for _ in range(depth)))
