"""FastViT (Vasu et al., ICCV 2023): the RepMixer token mixer with layer scale, training-time form.

Training-time RepMixer (channels C, kernel K, layer scale ``ls`` of shape (C, 1, 1))::

    y = x + ls * ( mixer(x) - norm(x) )
    mixer(x) = BN_c(dwconvKxK(x)) + BN_s(x)        # MobileOne block: 1 conv branch + skip BN, no act
    norm(x)  = BN_n(x)                             # MobileOne block with only its skip BN

Every term is a depthwise conv of ``x``: the identity ``x`` is the kernel with 1 at the centre,
BN_s and BN_n are centre-only kernels ``gamma/sigma`` with bias ``beta - mean*gamma/sigma``, and
``ls`` scales output channels.  Hence

    K = I + ls * (K_c + K_s - K_n),   b = ls * (b_c + b_s - b_n)

-- one depthwise KxK conv (padding K//2, groups C, with bias), which is exactly FastViT's own
``reparameterize`` result.  ``ls`` is named ``layer_scale`` so that ``calibrate`` gives it a
non-trivial value (FastViT initialises it to 1e-5, which would hide a dropped term).

Deploy structure: exactly one ``Conv`` (depthwise KxK).
"""
from __future__ import annotations

import torch
from torch import nn

from .mobileone import MobileOneBlock

__all__ = ["RepMixer"]


class RepMixer(nn.Module):
    """Training-time FastViT RepMixer: ``x + layer_scale * (mixer(x) - norm(x))``."""

    def __init__(self, dim: int = 16, kernel_size: int = 3, layer_scale_init: float = 1e-5):
        super().__init__()
        self.norm = MobileOneBlock(dim, dim, kernel_size, groups=dim, num_conv_branches=0,
                                   use_scale=False, act=False)
        self.mixer = MobileOneBlock(dim, dim, kernel_size, groups=dim, num_conv_branches=1,
                                    use_scale=False, act=False)
        self.layer_scale = nn.Parameter(layer_scale_init * torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))
