"""fuse_conv_bn: fold a per-channel affine that follows a conv into the conv.

    x → Conv/ConvTranspose/Gemm/MatMul(W, b) → BatchNormalization → y
                                            (or Mul/Add/Sub/Div by a per-channel constant)
  ⇒ x → Conv/ConvTranspose/Gemm(W', b') → y

With the affine y = a·z + c per output channel o:  W'[o] = a[o]·W[o],  b'[o] = a[o]·b[o] + c[o].
Exact for any groups, stride, dilation and padding, since it acts on outputs only. A Linear
followed by BatchNorm1d (RepViT/LeViT heads) is the rank-0 case.

Declines when the weight is not constant or is shared, when the conv output has another reader
or is a graph output, or when the BN uses batch statistics (training_mode=1).

Leaves a Conv → affine alone when it is one branch of a sum or Concat that merge_linear_regions,
later in the same sweep, is sure to fold (merge_linear_regions.takes_branch): the block is then
folded from the original weights in one float64 pass instead of two.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxrep import folding as F
from onnxrep import graph as G
from onnxrep import kernels as K
from onnxrep import linear as L
from onnxrep.engine import Rewrite, Rule

from .merge_linear_regions import MergeLinearRegions, takes_branch

LINEAR_PRODUCERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class ConvThenAffine:
    affine_node: gs.Node  # the BN or per-channel op
    conv: gs.Node  # the Conv/ConvTranspose/Gemm/MatMul feeding it
    between: gs.Tensor  # the conv's output, the affine's data operand
    affine: "L.Affine | None" = None  # what the affine computes, set by check


class FuseConvBn(Rule):
    name = "fuse_conv_bn"
    description = "fold BatchNormalization or a per-channel Mul/Add/Sub/Div into the preceding Conv, ConvTranspose, Gemm or MatMul"
    anchors = tuple(L.AFFINE_OPS)

    def match(self, node, ctx):
        for t in node.inputs[:2] if node.op != "BatchNormalization" else node.inputs[:1]:
            up = G.producer(t)
            if up is not None and up.op in LINEAR_PRODUCERS and G.const(t) is None:
                if node.op != "BatchNormalization" and not any(G.const(o) is not None for o in node.inputs):
                    return None
                if ctx.runs_after(self.name, MergeLinearRegions.name) and takes_branch(ctx.graph, up, node):
                    return None  # a branch of a block merge_linear_regions folds whole, later in this sweep
                return ConvThenAffine(node, up, t)
        return None

    def check(self, match: ConvThenAffine, ctx):
        node, up, t = match.affine_node, match.conv, match.between
        aff = L.affine_of(node)
        if not aff:
            return aff.reason
        if aff.x is not t:
            return "the conv output is not the affine's data operand"
        reason = G.fan_out_reason(ctx.graph, t)
        if reason:
            return reason
        for w in up.inputs[1:]:
            r = G.shared_constant_reason(w)
            if r:
                return r
        if up.op in KEEPS_GEOMETRY:
            if G.const(up.inputs[1]) is None:
                return f"{up.op} weight is not constant{F.overridable_hint(up.inputs[1])}"
            if len(up.inputs) > 2 and up.inputs[2].name and G.const(up.inputs[2]) is None:
                return f"{up.op} bias is not constant{F.overridable_hint(up.inputs[2])}"
            cout = _out_channels(up)
        else:
            lin = L.conv_of(up)
            if not lin:
                return lin.reason
            cout = lin.spec.cout
        if aff.scale.size not in (1, cout) or aff.shift.size not in (1, cout):
            return f"affine has {max(aff.scale.size, aff.shift.size)} channels, {up.op} makes {cout}"
        match.affine = aff
        return None

    def rewrite(self, match: ConvThenAffine, ctx):
        node, up, aff = match.affine_node, match.conv, match.affine
        dtype = L.data_dtype(up.inputs[1])
        if up.op in KEEPS_GEOMETRY:
            return _rescale_in_place(ctx, node, up, aff, dtype)
        lin = L.conv_of(up)
        a, c = aff.broadcast(lin.spec.cout)
        spec = K.affine_after(lin.spec, a, c)
        return L.replace_with_conv(ctx.graph, spec, lin.x, node.outputs[0], [up, node], dtype, node.op)


# Conv and ConvTranspose keep every attribute (pads, auto_pad, output_padding, ...): only their
# output channels are scaled, so their geometry never needs to be known.
KEEPS_GEOMETRY = ("Conv", "ConvTranspose")


def _out_channels(up: gs.Node) -> int:
    w = G.const(up.inputs[1])
    return w.shape[0] if up.op == "Conv" else w.shape[1] * int(up.attrs.get("group", 1))


def _rescale_in_place(ctx, node, up, aff, dtype):
    w = G.const(up.inputs[1])
    b = G.const(up.inputs[2]) if len(up.inputs) > 2 and up.inputs[2].name else None
    group = int(up.attrs.get("group", 1))
    a, c = aff.broadcast(_out_channels(up))
    if up.op == "Conv":
        scaled = K.affine_after(K.ConvSpec(w, b, group=group), a, c, inplace=True)  # a float64 copy of w
        w2, b2 = scaled.weight, scaled.bias
    else:
        w2, b2 = K.affine_after_transposed(w, b, group, a, c)
    names = [up.name, node.name]
    x, out, attrs, name = up.inputs[0], node.outputs[0], dict(up.attrs), up.name
    G.remove_node(up)
    G.remove_node(node)
    wt = G.new_weight(ctx.graph, f"{name}.weight", w2, dtype)
    bt = G.new_weight(ctx.graph, f"{name}.bias", b2, dtype)
    new = gs.Node(up.op, name, attrs, [x, wt, bt], [out])
    ctx.graph.nodes.append(new)
    return Rewrite("", names, [name], node.op)
