"""rm_residual (opt-in, --rm): RMNet's ResNet → plain conversion of residual blocks.

    x ─┬─ Conv₁ ─ Relu ─ … ─ Conv_L ─ Add ─ Relu            (shortcut: x itself, or a 1×1
       └──────────── shortcut(x) ─────┘                       stride-s projection Conv)
  ⇒ x ── Conv₁' ─ Relu ─ … ─ Conv_L' ── Relu

Conv₁' gains Cin output channels with a Dirac kernel (1 at the tap that reads the output
position itself), so they carry x, sampled on Conv₁'s grid. Every inner Relu leaves them
unchanged *because x ≥ 0*; inner convs pass them on with their own Dirac channels. Conv_L' reads
them through a Dirac (identity shortcut) or the projection's weights (projection shortcut) and
adds them to its outputs; the projection's bias joins Conv_L's. The Add disappears.

Preconditions (each declines with its reason):
- x is provably ≥ 0: it comes from a Relu, or a MaxPool of one (a pre-activation ResNet fails);
- the inner activations are Relu (ReLU6 / Clip would cut the carried values);
- every conv in the chain is dense (group 1), constant, privately read, and its padding puts
  a kernel tap on the output position (pad ≤ (k−1)·d and a multiple of d);
- the shortcut samples x on the same grid: identity with total stride 1, or a 1×1 unpadded
  projection with stride equal to the chain's total stride (a ResNet-D AvgPool shortcut is not).

It adds MACs (ResNet-18 at 224²: 1.8 → 3.2 GMAC), which is why it is opt-in; what it buys is a
plain Conv-Relu chain without residual memory traffic (and, in RMNet, pruning freedom).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import graph as G
from onnxrep import linear as L
from onnxrep.engine import Rewrite, Rule


@dataclass
class Block:
    add: gs.Node
    x: gs.Tensor
    convs: list  # Conv₁ … Conv_L
    relus: list  # the L−1 inner activations
    shortcut: gs.Node | None  # projection conv, or None for identity
    why_not: str | None = None  # a residual branch whose shortcut cannot be carried: the reason


class RmResidual(Rule):
    name = "rm_residual"
    description = "remove residual Adds of ReLU ResNet blocks by carrying the input in Dirac channels (adds MACs)"
    anchors = ("Add",)
    default = False

    def match(self, node, ctx):
        if len(node.inputs) != 2 or any(G.const(t) is not None for t in node.inputs):
            return None
        for main, short in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            chain = _chain(main, ctx.graph)
            if chain is None:
                continue
            convs, relus, x = chain
            if len(convs) < 2:
                continue  # Add(conv(x), x) is a linear region: merge_linear_regions' job
            if short is x:
                return Block(node, x, convs, relus, None)
            up = G.producer(short)
            if up is not None and up.op == "Conv" and up.inputs[0] is x:
                return Block(node, x, convs, relus, up)
            what = "a graph input" if up is None else f"{up.op} '{up.name}'"
            return Block(node, x, convs, relus, None,
                         why_not=f"shortcut comes from {what}, neither the block input nor a 1×1 projection of it "
                                 "(a ResNet-D AvgPool shortcut does not sample the input on the branch's grid)")
        return None

    def check(self, b: Block, ctx):
        if b.why_not:
            return b.why_not
        reason = _nonnegative_reason(b.x)
        if reason:
            return reason
        for r in b.relus:
            if r.op != "Relu":
                return f"inner activation is {r.op}, not Relu: it would change the carried input"
        for c in b.convs:
            lin = L.conv_of(c)
            if not lin:
                return lin.reason
            if lin.spec.group != 1:
                return "grouped conv in the residual branch"
            for t in c.inputs[1:]:
                r = G.shared_constant_reason(t)
                if r:
                    return r
            if _dirac_tap(lin.spec) is None:
                return f"{c.name}: no kernel tap reads the output position (padding vs kernel)"
        for t in [c.outputs[0] for c in b.convs[:-1]] + [r.outputs[0] for r in b.relus] + [b.convs[-1].outputs[0]]:
            reason = G.fan_out_reason(ctx.graph, t)
            if reason:
                return reason
        total_stride = tuple(math.prod(s) for s in zip(*(L.conv_of(c).spec.strides for c in b.convs)))
        if b.shortcut is None:
            if any(s != 1 for s in total_stride):
                return "identity shortcut but the branch is strided"
        else:
            sc = L.conv_of(b.shortcut)
            if not sc:
                return sc.reason
            if any(k != 1 for k in sc.spec.kernel_shape) or any(sc.spec.pads) or sc.spec.group != 1:
                return "shortcut is not a 1×1 unpadded dense projection"
            if sc.spec.strides != total_stride:
                return "shortcut stride differs from the branch's total stride"
            r = G.fan_out_reason(ctx.graph, b.shortcut.outputs[0])
            if r:
                return r
        if G.channels(b.x) is None:
            return "block input channel count is unknown"
        for t in b.add.inputs:
            if not G.same_shape(t, b.add.outputs[0]):
                return "cannot prove the Add's inputs have its output shape (it may broadcast)"
        return None

    def rewrite(self, b: Block, ctx):
        cin = G.channels(b.x)
        graph = ctx.graph
        specs = [L.conv_of(c).spec for c in b.convs]
        names = [c.name for c in b.convs] + [b.add.name] + ([b.shortcut.name] if b.shortcut else [])
        for i, (c, spec) in enumerate(zip(b.convs, specs)):
            w, bias = spec.weight, spec.bias
            cout, cin_i = w.shape[:2]
            k = spec.kernel_shape
            tap = _dirac_tap(spec)
            last = i == len(specs) - 1
            if i > 0:  # read the carried channels: zero weights for the original outputs
                w = np.concatenate([w, np.zeros((cout, cin) + k)], axis=1)
                carried_in = cin_i
            if not last:
                dirac = np.zeros((cin, w.shape[1]) + k)
                offset = 0 if i == 0 else carried_in
                for j in range(cin):
                    dirac[(j, offset + j) + tap] = 1.0
                w = np.concatenate([w, dirac], axis=0)
                bias = np.concatenate([bias, np.zeros(cin)])
            else:
                if b.shortcut is None:
                    for j in range(cin):
                        w[(j, carried_in + j) + tap] += 1.0
                else:
                    sc = L.conv_of(b.shortcut).spec
                    w[(slice(None), slice(carried_in, carried_in + cin)) + tap] += sc.weight.reshape(cout, cin)
                    bias = bias + sc.bias
            dtype = L.data_dtype(c.inputs[1])
            c.inputs[1] = G.new_weight(graph, f"{c.name}.weight_rm", w, dtype)
            bt = G.new_weight(graph, f"{c.name}.bias_rm", bias, dtype)
            if len(c.inputs) > 2:
                c.inputs[2] = bt
            else:
                c.inputs.append(bt)
            if not last:
                for t in (c.outputs[0], b.relus[i].outputs[0]):
                    if t.shape is not None:
                        t.shape = [t.shape[0], w.shape[0]] + list(t.shape[2:])
        # Conv_L now writes the Add's output; the Add (and a projection) go away
        out = b.add.outputs[0]
        last = b.convs[-1]
        G.remove_node(b.add)
        if b.shortcut is not None:
            G.remove_node(b.shortcut)
        last.outputs[0] = out
        return Rewrite("", names, [c.name for c in b.convs], "identity" if b.shortcut is None else "projection")


def _chain(t: gs.Tensor, graph):
    """Conv (→ act → Conv)* ending at t; returns (convs, activations, block input) or None."""
    convs, acts = [], []
    node = G.producer(t)
    while node is not None and node.op == "Conv":
        convs.insert(0, node)
        up = G.producer(node.inputs[0])
        if up is not None and up.op in ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSwish", "Elu", "Selu") and \
                G.producer(up.inputs[0]) is not None and G.producer(up.inputs[0]).op == "Conv" and \
                G.private_to(graph, up.outputs[0], node):
            acts.insert(0, up)
            node = G.producer(up.inputs[0])
            continue
        return (convs, acts, node.inputs[0]) if len(convs) >= 1 else None
    return None


def _dirac_tap(spec):
    tap = []
    for a, (k, d) in enumerate(zip(spec.kernel_shape, spec.dilations)):
        p = spec.pads_begin[a]
        if p % d or p // d >= k:
            return None
        tap.append(p // d)
    return tuple(tap)


def _nonnegative_reason(x: gs.Tensor) -> str | None:
    up = G.producer(x)
    if up is not None and up.op == "MaxPool":
        up = G.producer(up.inputs[0])
    if up is not None and up.op == "Relu":
        return None
    what = "a graph input" if up is None else up.op
    return f"block input comes from {what}, not provably ≥ 0 (needs a Relu, or a MaxPool of one)"
