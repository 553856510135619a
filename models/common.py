"""Shared building blocks and the calibration routine for the training-time model zoo.

Why calibrate
-------------
A freshly constructed network has every BatchNorm at its identity state (gamma = 1, beta = 0,
running_mean = 0, running_var = 1).  A re-parameterization bug that mishandles a BN (drops it, folds
it on the wrong side of a conv, forgets its epsilon, uses gamma where it needs gamma/sigma) is then
invisible, because the BN does nothing.  `calibrate` makes every BN matter:

1. every BN's affine parameters are drawn from seeded noise (gamma ~ U(0.6, 1.4) with a random sign
   flip on ~10% of channels, beta ~ N(0, 0.2^2)), and every *layer-scale* parameter (any parameter
   whose name ends with ``layer_scale``) is drawn from U(0.3, 1.2);
2. the running statistics are reset and re-estimated in train mode from a few seeded random
   batches with ``momentum=None`` (PyTorch's cumulative average), so running_mean / running_var are
   the true statistics of the activations each BN sees;
3. the model is returned in ``eval()`` mode (momentum restored to its previous value, which only
   matters to the exporters, who write it as an attribute).

The affine noise is applied *before* the statistics pass (rather than after) so that every BN's
running statistics describe the activations produced by the final, perturbed upstream layers, which
keeps every layer's eval-mode output close to zero mean / unit variance.

A BN may carry the attribute ``calib_scale`` (``CALIB_SCALE_ATTR``): its gamma and beta are then
multiplied by that factor.  Residual networks set it on the last BN of each residual branch (the
analogue of torchvision's ``zero_init_residual``): with full-scale branches a random 16-block
ResNet-50 is chaotic, and its float32 output drifts ~5e-5 (relative to max|y|) from float64 --
more than the tolerance an equivalence check can afford; at 0.25 the drift is ~2e-6.

The routine never touches conv / linear weights, so structure that a block sets on purpose (the
zero rows of a ResRep compactor, for instance) is preserved.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn
import torch.nn.functional as F

__all__ = [
    "calibrate",
    "CALIB_SCALE_ATTR",
    "batchnorms",
    "ConvBN",
    "bn_fill_value",
    "BNAndPad",
    "PAD_MODES",
]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

#: optional BN attribute: factor applied to that BN's calibrated gamma and beta.
CALIB_SCALE_ATTR = "calib_scale"


def batchnorms(model: nn.Module) -> Iterable[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """Yield (qualified name, module) for every BatchNorm{1,2,3}d in ``model``."""
    for name, mod in model.named_modules():
        if isinstance(mod, _BN_TYPES):
            yield name, mod


@torch.no_grad()
def calibrate(
    model: nn.Module,
    input_shape: Sequence[int],
    seed: int = 0,
    steps: int = 4,
    batch: int = 8,
) -> nn.Module:
    """Give every BN real statistics and non-identity affine parameters; return the model in eval.

    Args:
        model: the training-time network (modified in place and returned).
        input_shape: the model's input shape; its leading (batch) entry is replaced by ``batch``.
        seed: seeds both the parameter noise and the calibration inputs (``torch.manual_seed``).
        steps: number of random N(0, 1) batches used to estimate the running statistics.
        batch: calibration batch size.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    # 1. Non-identity affine parameters (and layer scales).
    for _, bn in batchnorms(model):
        if bn.affine:
            c = bn.num_features
            gamma = torch.empty(c).uniform_(0.6, 1.4, generator=gen)
            flip = torch.rand(c, generator=gen) < 0.1
            gamma[flip] = -gamma[flip]
            beta = 0.2 * torch.randn(c, generator=gen)
            scale = float(getattr(bn, CALIB_SCALE_ATTR, 1.0))
            bn.weight.copy_(scale * gamma)
            bn.bias.copy_(scale * beta)
    for name, p in model.named_parameters():
        if name.split(".")[-1].endswith("layer_scale"):
            p.copy_(torch.empty(p.shape).uniform_(0.3, 1.2, generator=gen))

    # 2. Running statistics from real activations (cumulative average over `steps` batches).
    saved_momentum = {}
    for name, bn in batchnorms(model):
        saved_momentum[name] = bn.momentum
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    shape = (batch, *tuple(input_shape)[1:])
    for _ in range(steps):
        model(torch.randn(shape, generator=gen))
    for name, bn in batchnorms(model):
        bn.momentum = saved_momentum[name]

    # 3. Inference mode.
    return model.eval()


class ConvBN(nn.Sequential):
    """``Conv2d(bias=False)`` followed by ``BatchNorm2d``: the unit every branch is built from.

    Inference math: ``y = gamma * (W * x - mean) / sqrt(var + eps) + beta``, i.e. a conv with kernel
    ``W * gamma / sigma`` and bias ``beta - mean * gamma / sigma`` (sigma = sqrt(var + eps)).
    ``padding`` may be an int or a (pad_h, pad_w) pair.
    """

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0, groups: int = 1,
                 dilation=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding,
                              groups=groups, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def switch_to_deploy(self) -> None:
        """Fold the BN into the conv (``fuse_conv_bn_eval``'s math); the unit becomes one conv."""
        if not hasattr(self, "bn"):
            return
        from .deploy import conv_bn_kernel, make_conv

        w, b = conv_bn_kernel(self)
        self.conv = make_conv(self.conv, w, b)
        del self.bn


PAD_MODES = ("slice", "subpadadd")


def bn_fill_value(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """Per-channel output of an inference-mode BN for a zero input: ``beta - mean * gamma / sigma``.

    This is the value a zero-padded border of the BN's *input* becomes after the BN.  Like DBB's
    original BNAndPadLayer it always uses the running statistics (also in train mode).
    """
    if bn.affine:
        return bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return -bn.running_mean / torch.sqrt(bn.running_var + bn.eps)


class BNAndPad(nn.Module):
    """DBB's "BN-and-pad" layer: ``BatchNorm2d`` then pad ``p`` pixels per side with the BN's bias.

    Filling the border with ``v = bn_fill_value(bn)`` (per channel) makes the result equal to
    ``BN(pad0(x))``: the layer commutes with zero padding.  That is what lets a preceding bias-free
    1x1 conv compose exactly with the following unpadded KxK conv / AvgPool: the pair then equals
    one padded KxK conv of the block input.

    ``pad_mode`` picks how the fill is written in PyTorch, because each exports differently:

    - ``"slice"``: ``F.pad`` with zeros, then four slice assignments ``out[:, :, :p, :] = v`` ...
      (the way DBB's original code writes it);
    - ``"subpadadd"``: ``F.pad(y - v) + v`` (Sub, zero Pad, Add).
    """

    def __init__(self, num_features: int, pad: int, pad_mode: str = "slice"):
        super().__init__()
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        self.bn = nn.BatchNorm2d(num_features)
        self.pad = pad
        self.pad_mode = pad_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        p = self.pad
        if p == 0:
            return y
        v = bn_fill_value(self.bn).view(1, -1, 1, 1)
        if self.pad_mode == "subpadadd":
            return F.pad(y - v, [p, p, p, p]) + v
        out = F.pad(y, [p, p, p, p])
        out[:, :, :p, :] = v
        out[:, :, -p:, :] = v
        out[:, :, :, :p] = v
        out[:, :, :, -p:] = v
        return out
