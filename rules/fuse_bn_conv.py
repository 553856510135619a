"""fuse_bn_conv: fold a per-channel affine that precedes a conv into the conv.

    x → BatchNormalization (or Mul/Add/Sub/Div by a per-channel constant) → Conv/Gemm/MatMul → y
  ⇒ x → Conv/Gemm(W', b') → y

With z = a·x + c per input channel i:  W'[o, i] = W[o, i]·a[i],  b'[o] = b[o] + Σ_{i,k} W[o, i, k]·c[i].

Exact only when the conv reads no padding (or c = 0): a padded border holds 0, while the
unfused graph would have c there. That is the pre-activation / BN-first case of RepViT's
BatchNorm1d + Linear head and of BN-before-conv blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxrep import graph as G
from onnxrep import kernels as K
from onnxrep import linear as L
from onnxrep.engine import Rule


@dataclass
class AffineBeforeConv:
    conv: gs.Node  # the Conv/Gemm/MatMul
    affine: gs.Node  # the BN or per-channel op feeding it
    between: gs.Tensor  # the affine's output, the conv's input
    spec: K.ConvSpec | None = None  # the folded conv, set by check
    source: gs.Tensor | None = None  # the affine's input, which the folded conv reads


class FuseBnConv(Rule):
    name = "fuse_bn_conv"
    description = "fold BatchNormalization or a per-channel Mul/Add/Sub/Div into the following unpadded Conv, Gemm or MatMul"
    anchors = ("Conv", "Gemm", "MatMul")

    def match(self, node, ctx):
        t = node.inputs[0]
        up = G.producer(t)
        if up is None or up.op not in L.AFFINE_OPS:
            return None
        if up.op != "BatchNormalization" and not any(G.const(i) is not None for i in up.inputs):
            return None
        return AffineBeforeConv(node, up, t)

    def check(self, match: AffineBeforeConv, ctx):
        node, up, t = match.conv, match.affine, match.between
        aff = L.affine_of(up)
        if not aff:
            return aff.reason
        reason = G.fan_out_reason(ctx.graph, t)
        if reason:
            return reason
        lin = L.conv_of(node)
        if not lin:
            return lin.reason
        for w in node.inputs[1:]:
            r = G.shared_constant_reason(w)
            if r:
                return r
        if aff.scale.size not in (1, lin.spec.cin) or aff.shift.size not in (1, lin.spec.cin):
            return "affine channel count does not match the conv input"
        a, c = aff.broadcast(lin.spec.cin)
        try:
            match.spec = K.affine_before(lin.spec, a, c)
        except K.NotMergeable as e:
            return str(e)
        match.source = aff.x
        return None

    def rewrite(self, match: AffineBeforeConv, ctx):
        node, up = match.conv, match.affine
        dtype = L.data_dtype(node.inputs[1])
        return L.replace_with_conv(ctx.graph, match.spec, match.source, node.outputs[0], [up, node], dtype, up.op)
