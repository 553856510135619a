"""Detector blocks: YOLOv7/YOLOv6 RepConv, QARepVGG, YOLOv9 RepNCSPELAN4, RT-DETR RepC3.

Small re-implementations written from the methods' math (8-32 channels, 16x16 maps), each with the
hand-written deploy conversion its paper's code ships (``switch_to_deploy``, built on
``models.deploy``).

YOLO BatchNorms use ``eps=1e-3, momentum=0.03`` (what YOLOv5..v9's ``initialize_weights`` sets);
RT-DETR's keep PyTorch's defaults (eps 1e-5).  The exporters write the epsilon as an attribute, so
a rule that assumes 1e-5 is caught.

RepConv (YOLOv7 ``RepConv``, YOLOv6 ``RepVGGBlock``)::

    y = act( BN_3(conv3x3(x)) + BN_1(conv1x1(x)) [+ BN_id(x)] )     # BN_id iff c1 == c2, s == 1

act is SiLU (v7) or ReLU (v6).  Deploy: one 3x3 conv (1x1 at the centre, identity per group --
not YOLOv7's ``fill_diagonal_``, which is wrong for g > 1), then act.

QARepVGG (YOLOv6 v3 ``QARepVGGBlock``, Chu et al. 2022, "Make RepVGG greater again")::

    y = ReLU( BN( BN_3(conv3x3(x)) + conv1x1(x) [+ x] ) )           # 1x1 and identity: no BN

Deploy: the branch sum is one 3x3 conv (kernel K, bias b = BN_3's shift only); the trailing BN then
scales its output channels (``_fuse_extra_bn_tensor``): one 3x3 conv + ReLU.

RepNCSPELAN4 (YOLOv9)::

    a, b = chunk(Conv1x1(x), 2)                      # Conv = conv-BN-SiLU
    c = Conv3x3(RepNCSP(b));  d = Conv3x3(RepNCSP(c))
    y = Conv1x1(cat(a, b, c, d))
    RepNCSP(t) = Conv1x1(cat(RepNBottleneck^n(Conv1x1(t)), Conv1x1(t)))
    RepNBottleneck(t) = t + Conv3x3(RepConvN(t))     # residual when shortcut and c1 == c2
    RepConvN(t) = SiLU(BN(conv3x3(t)) + BN(conv1x1(t)))   # no identity branch

Deploy (YOLOv9's ``fuse``): every RepConvN -> one 3x3 conv (``fuse_convs``), every Conv absorbs its
BN; the chunk, concats and residual adds stay.

RepC3 (RT-DETR's ``CSPRepLayer`` / ultralytics ``RepC3``)::

    y = cv3( RepVgg^n(cv1(x)) + cv2(x) )       # cv1, cv2: 1x1 conv-BN-SiLU; cv3: identity or one
    RepVgg(t) = SiLU(BN(conv3x3(t)) + BN(conv1x1(t)))

Deploy (RT-DETR's ``convert_to_deploy``): each RepVggBlock -> one 3x3 conv + SiLU.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .common import ConvBN
from .deploy import bn_kernel, conv_bn_kernel, fuse_bn, make_conv, pad_kernel
from .repvgg import RepVGGBlock

__all__ = ["ConvBNAct", "RepConv", "RepConvNet", "QARepVGGBlock", "QARepVGGNet", "RepConvN",
           "RepNBottleneck", "RepNCSP", "RepNCSPELAN4", "RepVggBlock", "RepC3", "yolo_bn"]


def yolo_bn(model: nn.Module) -> nn.Module:
    """YOLO's ``initialize_weights``: every BatchNorm2d gets eps 1e-3 and momentum 0.03."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps, m.momentum = 1e-3, 0.03
    return model


def _act(name: str) -> nn.Module:
    return {"silu": nn.SiLU, "relu": nn.ReLU}[name]()


class ConvBNAct(nn.Module):
    """YOLO's ``Conv``: conv (no bias, "same" padding) -> BN -> activation (SiLU by default).

    Its deploy conversion (YOLO's ``fuse_conv_and_bn``) is the ``ConvBN`` unit's own
    ``switch_to_deploy``, which ``models.deploy.convert`` calls on it.
    """

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, g: int = 1, act: str | None = "silu"):
        super().__init__()
        self.unit = ConvBN(c1, c2, k, stride=s, padding=k // 2, groups=g)
        self.act = _act(act) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.unit(x))


class RepConv(RepVGGBlock):
    """YOLOv7 ``RepConv`` (act "silu") / YOLOv6 ``RepVGGBlock`` (act "relu"): RepVGG's block
    (``models.repvgg``: the same branches, kernel and ``switch_to_deploy``) with the detector's
    activation. ``identity=False`` drops the identity BN (YOLOv9's RepConvN, RT-DETR's RepVggBlock)."""

    def __init__(self, c1: int, c2: int, s: int = 1, g: int = 1, act: str = "silu", identity: bool = True):
        super().__init__(c1, c2, stride=s, groups=g, use_identity=identity)
        self.act = _act(act)


class RepConvNet(nn.Module):
    """A chain of RepConvs: ``plan`` holds (c2, stride, groups) per block."""

    def __init__(self, c1: int = 16, plan: Sequence[tuple[int, int, int]] = ((32, 2, 1), (32, 1, 1), (32, 1, 4)),
                 act: str = "silu"):
        super().__init__()
        blocks = []
        for c2, s, g in plan:
            blocks.append(RepConv(c1, c2, s=s, g=g, act=act))
            c1 = c2
        self.body = nn.Sequential(*blocks)
        yolo_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class QARepVGGBlock(nn.Module):
    """QARepVGG: BN only on the 3x3 branch, the sum normalized by one BN, then ReLU."""

    def __init__(self, c1: int, c2: int, s: int = 1):
        super().__init__()
        self.rbr_dense = ConvBN(c1, c2, 3, stride=s, padding=1)
        self.rbr_1x1 = nn.Conv2d(c1, c2, 1, stride=s, bias=False)
        self.rbr_identity = nn.Identity() if c1 == c2 and s == 1 else None
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.ReLU()

    def switch_to_deploy(self) -> None:
        """QARepVGG's conversion: branch sum as one 3x3 kernel, then the trailing BN folded in."""
        if hasattr(self, "rbr_reparam"):
            return
        k, b = conv_bn_kernel(self.rbr_dense)
        k = k + pad_kernel(self.rbr_1x1.weight.double(), 3)
        if self.rbr_identity is not None:
            c = k.shape[0]
            ident = torch.zeros_like(k)
            ident[torch.arange(c), torch.arange(c), 1, 1] = 1.0
            k = k + ident
        k, b = fuse_bn(k, b, self.bn)
        self.rbr_reparam = make_conv(self.rbr_dense.conv, k, b)
        del self.rbr_dense, self.rbr_1x1, self.rbr_identity, self.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "rbr_reparam"):
            return self.act(self.rbr_reparam(x))
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.act(self.bn(out))


class QARepVGGNet(nn.Module):
    """Two QARepVGG blocks: 16->32 stride 2 (no identity), 32->32 stride 1 (identity)."""

    def __init__(self, c1: int = 16, c2: int = 32):
        super().__init__()
        self.body = nn.Sequential(QARepVGGBlock(c1, c2, s=2), QARepVGGBlock(c2, c2, s=1))
        yolo_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class RepConvN(RepConv):
    """YOLOv9 ``RepConvN``: 3x3 conv-BN + 1x1 conv-BN, SiLU; no identity branch. Its ``fuse_convs``
    is RepVGG's conversion without the identity kernel."""

    def __init__(self, c1: int, c2: int):
        super().__init__(c1, c2, act="silu", identity=False)


class RepNBottleneck(nn.Module):
    """``t + Conv3x3(RepConvN(t))`` (the residual only when shortcut and c1 == c2)."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True):
        super().__init__()
        self.cv1 = RepConvN(c1, c2)
        self.cv2 = ConvBNAct(c2, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class RepNCSP(nn.Module):
    """YOLOv9's CSP with RepNBottlenecks: ``cv3(cat(m(cv1(x)), cv2(x)))``, hidden c2 * e."""

    def __init__(self, c1: int, c2: int, n: int = 1, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = ConvBNAct(c1, c_, 1)
        self.cv2 = ConvBNAct(c1, c_, 1)
        self.cv3 = ConvBNAct(2 * c_, c2, 1)
        self.m = nn.Sequential(*(RepNBottleneck(c_, c_) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class RepNCSPELAN4(nn.Module):
    """YOLOv9's RepNCSPELAN4(c1, c2, c3, c4, c5): ELAN over two RepNCSP + Conv3x3 stages.

    ``split=False`` runs YOLOv9's ``forward`` (``chunk(2, 1)``), ``split=True`` its
    ``forward_split`` (``split((c, c), 1)``): the same math, spelled differently by the legacy
    exporter -- chunk becomes two ``Slice`` nodes (over Shape/Gather/Div index arithmetic that
    folds to constants), split one ``Split``; the dynamo exporter writes one ``Split`` for both.
    """

    def __init__(self, c1: int = 16, c2: int = 16, c3: int = 16, c4: int = 8, c5: int = 1,
                 split: bool = False):
        super().__init__()
        self.c, self.split = c3 // 2, split
        self.cv1 = ConvBNAct(c1, c3, 1)
        self.cv2 = nn.Sequential(RepNCSP(c3 // 2, c4, c5), ConvBNAct(c4, c4, 3))
        self.cv3 = nn.Sequential(RepNCSP(c4, c4, c5), ConvBNAct(c4, c4, 3))
        self.cv4 = ConvBNAct(c3 + 2 * c4, c2, 1)
        yolo_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.cv1(x)
        y = list(t.split((self.c, self.c), 1) if self.split else t.chunk(2, 1))
        y.extend(m(y[-1]) for m in (self.cv2, self.cv3))
        return self.cv4(torch.cat(y, 1))


class RepVggBlock(RepConvN):
    """RT-DETR's ``RepVggBlock``: SiLU(BN(conv3x3(x)) + BN(conv1x1(x))), the block YOLOv9 calls
    RepConvN; RT-DETR's ``convert_to_deploy`` is the same one-3x3-conv conversion."""


class RepC3(nn.Module):
    """RT-DETR's ``CSPRepLayer`` (ultralytics ``RepC3``): ``cv3(RepVgg^n(cv1(x)) + cv2(x))``.

    Hidden width ``c_ = int(c2 * e)``; cv3 is a 1x1 conv-BN-SiLU when ``c_ != c2``, else identity.
    """

    def __init__(self, c1: int = 16, c2: int = 16, n: int = 3, e: float = 1.0):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = ConvBNAct(c1, c_, 1)
        self.cv2 = ConvBNAct(c1, c_, 1)
        self.m = nn.Sequential(*(RepVggBlock(c_, c_) for _ in range(n)))
        self.cv3 = ConvBNAct(c_, c2, 1) if c_ != c2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(self.m(self.cv1(x)) + self.cv2(x))
