"""Hand-written deploy conversion of the zoo, the way the papers' own code does it.

Each training-time block that its paper re-parameterizes has a ``switch_to_deploy()`` method
(RepVGG's name; MobileOne and FastViT call it ``reparameterize``, RepViT ``fuse``) that computes
the equivalent kernel and bias in PyTorch, installs one plain ``nn.Conv2d`` / ``nn.Linear`` in
place of the branches, deletes the branches, and from then on runs the plain path.  ``convert``
is the papers' model-level helper (RepVGG's ``repvgg_model_convert``, FastViT's
``reparameterize_model``): a deep copy on which every such method is called.

This module holds the kernel arithmetic those methods share, written in PyTorch as the papers
write it (float64 accumulation, one cast back), independent of onnxrep: the deploy export made
from it is the yardstick onnxrep's output is measured against (``tools/bench_zoo.py``).

What a paper's conversion does *not* touch stays as it is: RepLKNet's ``structural_reparam``
merges only the large kernels (its pre-BN stays a BatchNorm); FastViT keeps its layer-scale
multiplies and RepViT its squeeze-excite.  A conv followed by a BN (``models.common.ConvBN``) is
fused like ``torch.nn.utils.fusion.fuse_conv_bn_eval`` does -- every paper's deploy path does
that, either in its code or through the exporter's constant folding.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
import torch.nn.functional as F

__all__ = [
    "convert",
    "fuse_bn",
    "conv_bn_kernel",
    "bn_kernel",
    "pad_kernel",
    "branch_sum_kernel",
    "compose_1x1_kxk",
    "make_conv",
    "fuse_bn_linear",
]


def convert(model: nn.Module) -> nn.Module:
    """Deploy copy of ``model``: call ``switch_to_deploy()`` on every module that has one, and
    loralib's ``merge()`` (W += s·B·A; loralib does it on ``eval()``) on every LoRA module.

    Parents are converted before their children (``modules()`` is pre-order), so a block that
    merges its sub-blocks reads them unconverted; the children it drops are converted afterwards
    to no effect.  The input model is left untouched; the copy is returned in eval mode.
    """
    deployed = copy.deepcopy(model).eval()
    for module in list(deployed.modules()):
        if hasattr(module, "switch_to_deploy"):
            module.switch_to_deploy()
        elif hasattr(module, "merge"):  # idempotent: a parent's merge() already merged its children
            module.merge()
    return deployed


def _sigma_scale(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) with ``BN(y) = s * y + t`` in inference mode, in float64."""
    std = torch.sqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.affine else torch.ones_like(std)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(std)
    s = gamma / std
    return s, beta - bn.running_mean.double() * s


@torch.no_grad()
def fuse_bn(weight: torch.Tensor, bias: torch.Tensor | None,
            bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias (float64) of ``BN(conv(x))``: scale output channels, shift the bias."""
    s, t = _sigma_scale(bn)
    w = weight.double() * s.view(-1, *([1] * (weight.dim() - 1)))
    b = t if bias is None else bias.double() * s + t
    return w, b


@torch.no_grad()
def conv_bn_kernel(unit: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias (float64) of a ``ConvBN`` (fused or not) or of a plain ``nn.Conv2d``."""
    if isinstance(unit, nn.Conv2d):
        conv, bn = unit, None
    else:
        conv, bn = unit.conv, getattr(unit, "bn", None)
    if bn is None:
        b = (conv.bias.double() if conv.bias is not None
             else torch.zeros(conv.out_channels, dtype=torch.float64))
        return conv.weight.double(), b
    return fuse_bn(conv.weight, conv.bias, bn)


@torch.no_grad()
def bn_kernel(bn: nn.modules.batchnorm._BatchNorm, groups: int, kernel_size=(1, 1)
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A BN on the identity branch as a conv: per group, ``gamma/sigma`` at the kernel centre.

    For ``groups`` g over C channels the in-group input index of output channel o is
    ``o mod (C/g)`` (not o: the bug of a plain ``fill_diagonal_`` for g > 1).
    """
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    c = bn.num_features
    ident = torch.zeros(c, c // groups, kh, kw, dtype=torch.float64)
    o = torch.arange(c)
    ident[o, o % (c // groups), kh // 2, kw // 2] = 1.0
    return fuse_bn(ident, None, bn)


def pad_kernel(weight: torch.Tensor, kernel_size) -> torch.Tensor:
    """Zero-pad a (.., kh, kw) kernel to ``kernel_size`` with the original at the centre."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    dh, dw = kh - weight.shape[-2], kw - weight.shape[-1]
    return F.pad(weight, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])


@torch.no_grad()
def branch_sum_kernel(kernel_size: int, groups: int, identity=None, one_by_one=None, kxk=()
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """KxK kernel and bias (float64) of an identity BN + a 1x1 conv-BN + k×k conv-BNs, summed:
    MobileOne's and PP-LCNetV3's ``_get_kernel_bias`` (each term may be absent; ``kxk`` not empty)."""
    terms = [conv_bn_kernel(branch) for branch in kxk]
    if identity is not None:
        terms.append(bn_kernel(identity, groups, kernel_size))
    if one_by_one is not None:
        k1, b1 = conv_bn_kernel(one_by_one)
        terms.append((pad_kernel(k1, kernel_size), b1))
    return sum(k for k, _ in terms), sum(b for _, b in terms)


@torch.no_grad()
def compose_1x1_kxk(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                    groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``conv2(conv1(x))`` for a 1x1 conv1 (M x Cin/g) then a KxK conv2 (Cout x M/g x K x K).

    DBB's transform III, per group: ``K[o, i] = sum_m w2[o, m] * w1[m, i]`` and
    ``b[o] = b2[o] + sum_{m, u, v} w2[o, m, u, v] * b1[m]``.  Exact only where conv2's padding
    is filled with b1 (DBB's BN-and-pad) or b1 = 0.
    """
    w1, b1, w2, b2 = w1.double(), b1.double(), w2.double(), b2.double()
    m, cout = w1.shape[0], w2.shape[0]
    ks, bs = [], []
    for g in range(groups):
        w1g = w1[g * m // groups:(g + 1) * m // groups, :, 0, 0]            # (M/g, Cin/g)
        w2g = w2[g * cout // groups:(g + 1) * cout // groups]               # (Cout/g, M/g, K, K)
        b1g = b1[g * m // groups:(g + 1) * m // groups]
        ks.append(torch.einsum("omuv,mi->oiuv", w2g, w1g))
        bs.append(torch.einsum("omuv,m->o", w2g, b1g))
    return torch.cat(ks), torch.cat(bs) + b2


def make_conv(like: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor, **override
              ) -> nn.Conv2d:
    """A biased ``nn.Conv2d`` with ``like``'s geometry (stride, padding, dilation, groups, unless
    overridden) holding ``weight`` and ``bias`` cast to ``like``'s dtype."""
    geometry = dict(stride=like.stride, padding=like.padding, dilation=like.dilation,
                    groups=like.groups)
    geometry.update(override)
    conv = nn.Conv2d(weight.shape[1] * geometry["groups"], weight.shape[0],
                     tuple(weight.shape[-2:]), bias=True, **geometry)
    dtype = like.weight.dtype
    with torch.no_grad():
        conv.weight.copy_(weight.to(dtype))
        conv.bias.copy_(bias.to(dtype))
    return conv.eval()


@torch.no_grad()
def fuse_bn_linear(bn: nn.BatchNorm1d, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias (float64) of ``linear(BN1d(f))``: ``W * s`` and ``b + W @ t``."""
    s, t = _sigma_scale(bn)
    w = linear.weight.double()
    b = linear.bias.double() if linear.bias is not None else torch.zeros(w.shape[0],
                                                                         dtype=torch.float64)
    return w * s.view(1, -1), b + w @ t
