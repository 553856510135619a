"""PP-LCNetV3's learnable re-parameterization layer (PaddleClas, 2023), training-time form.

``LearnableRepLayer`` (kernel K, padding (K - 1) // 2, stride s, groups g)::

    t = BN_id(x)                            # only when cin == cout and s == 1
      + BN_1(conv1x1(x))                    # only when K > 1
      + sum_{i < n} BN_i(convKxK_i(x))      # n = num_conv_branches
    u = a * t + c                           # LearnableAffineBlock: two learnable *scalars*
    y = a' * hardswish(u) + c'              # Act: HardSwish then its own LearnableAffineBlock
                                            # (skipped when s == 2, like LCNetV3)

The branch sum is MobileOne's and collapses the same way (fold BNs, embed the 1x1 at the
centre, the identity BN as the per-group identity kernel, add) into one KxK conv ``(W, b)``.
The scalar affine before the activation is linear in the conv's output: ``a * (W x + b) + c`` is
the conv ``(a W, a b + c)``.  The one after the activation cannot move through HardSwish; it
folds forward only into a following conv that has no padding (``a' * h + c'`` read by a
1x1 conv ``V`` is the conv ``(a' V, V c' + bias)``).

Hand-written deploy (``switch_to_deploy``, PaddleClas's ``rep()``): one ``reparam_conv`` replaces
the branches; like PaddleClas it keeps *both* learnable affines as they are (``lab`` after the
conv, ``act.lab`` after HardSwish), so its export has a scalar Mul and Add on each side of the
activation.  onnxrep reaches fewer nodes than that (see ``models.ZOO["pplcnet"]``).

``LCNetV3Pair`` is LCNetV3's block without SE: a depthwise KxK layer followed by a pointwise 1x1
layer.  The learnable scalars start at PaddleClas's (1, 0) plus seeded noise so that a
re-parameterization that drops or misplaces one changes the output.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import ConvBN
from .deploy import branch_sum_kernel, make_conv

__all__ = ["LearnableAffineBlock", "LearnableRepLayer", "LCNetV3Pair"]


class LearnableAffineBlock(nn.Module):
    """``scale * x + bias`` with two learnable scalars (shape [1])."""

    def __init__(self, scale: float = 1.0, bias: float = 0.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([float(scale)]))
        self.bias = nn.Parameter(torch.tensor([float(bias)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x + self.bias


def _perturbed_lab() -> LearnableAffineBlock:
    """A LearnableAffineBlock away from identity (seeded by the caller's torch.manual_seed)."""
    return LearnableAffineBlock(1.0 + 0.4 * (torch.rand(()).item() - 0.5), 0.2 * torch.randn(()).item())


class LearnableRepLayer(nn.Module):
    """Training-time PP-LCNetV3 layer: n KxK conv-BN + 1x1 conv-BN + identity BN, summed, scalar
    affine, HardSwish, scalar affine."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 num_conv_branches: int = 4):
        super().__init__()
        self.cin, self.cout, self.kernel_size = cin, cout, kernel_size
        self.stride, self.groups = stride, groups
        p = (kernel_size - 1) // 2
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.conv_kxk = nn.ModuleList(
            ConvBN(cin, cout, kernel_size, stride=stride, padding=p, groups=groups)
            for _ in range(num_conv_branches))
        self.conv_1x1 = (ConvBN(cin, cout, 1, stride=stride, padding=0, groups=groups)
                         if kernel_size > 1 else None)
        self.lab = _perturbed_lab()
        self.act = nn.Hardswish()
        self.act_lab = _perturbed_lab()

    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """KxK kernel and bias (float64) of the branch sum (PaddleClas's ``_get_kernel_bias``)."""
        return branch_sum_kernel(self.kernel_size, self.groups, self.identity, self.conv_1x1, self.conv_kxk)

    def switch_to_deploy(self) -> None:
        """PaddleClas's ``rep()``: one ``reparam_conv``; both learnable affines stay."""
        if hasattr(self, "reparam_conv"):
            return
        kern, bias = self.get_equivalent_kernel_bias()
        like = nn.Conv2d(self.cin, self.cout, self.kernel_size, stride=self.stride,
                         padding=(self.kernel_size - 1) // 2, groups=self.groups)
        self.reparam_conv = make_conv(like, kern, bias)
        del self.identity, self.conv_kxk, self.conv_1x1

    def _activate(self, out: torch.Tensor) -> torch.Tensor:
        out = self.lab(out)
        if self.stride != 2:
            out = self.act_lab(self.act(out))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "reparam_conv"):
            return self._activate(self.reparam_conv(x))
        out = 0
        if self.identity is not None:
            out = out + self.identity(x)
        if self.conv_1x1 is not None:
            out = out + self.conv_1x1(x)
        for branch in self.conv_kxk:
            out = out + branch(x)
        return self._activate(out)


class LCNetV3Pair(nn.Module):
    """LCNetV3 block without SE: depthwise KxK LearnableRepLayer, then pointwise 1x1 one."""

    def __init__(self, cin: int = 16, cout: int = 16, kernel_size: int = 3, stride: int = 1,
                 num_conv_branches: int = 4):
        super().__init__()
        self.dw = LearnableRepLayer(cin, cin, kernel_size, stride, groups=cin,
                                    num_conv_branches=num_conv_branches)
        self.pw = LearnableRepLayer(cin, cout, 1, 1, num_conv_branches=num_conv_branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))

