"""remove_identities: drop ops that compute their input unchanged.

    x → Identity → y                 x → y
    x → Dropout (inference) → y      x → y
    x → Add(0) / Sub(0) → y     ⇒    x → y
    x → Mul(1) / Div(1) → y          x → y
    x → Pad(all zero) → y            x → y

Exporters leave these behind (Identity for aliased tensors, `Add(x, 0)` for absent MobileOne
branches, Dropout in inference). They hide linear regions from the other rules. The constant must
not broadcast x to a larger shape or another dtype, or removing it would change the output.
A neutral op inside a runtime-fusable pattern stays (nn.LayerNorm's γ = 1 and β = 0 at init:
ONNX Runtime fuses the written-out LayerNorm only with its Mul and Add).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import graph as G
from onnxrep import patterns as P
from onnxrep.engine import Rewrite, Rule


@dataclass
class Identity:
    node: gs.Node
    keep: gs.Tensor  # the input the node's output equals


class RemoveIdentities(Rule):
    name = "remove_identities"
    description = "drop Identity, inference Dropout, Add/Sub 0, Mul/Div 1 and all-zero Pad"
    anchors = ("Identity", "Dropout", "Add", "Sub", "Mul", "Div", "Pad")

    def match(self, node, ctx):
        if node.op == "Identity":
            return Identity(node, node.inputs[0])
        if node.op == "Dropout":
            return Identity(node, node.inputs[0])
        if node.op == "Pad":
            pads = G.const(node.inputs[1]) if len(node.inputs) > 1 else np.asarray(node.attrs.get("pads", [1]))
            if pads is not None and not np.any(pads):
                return Identity(node, node.inputs[0])
            return None
        if len(node.inputs) != 2:
            return None
        neutral = 0.0 if node.op in ("Add", "Sub") else 1.0
        a, b = node.inputs
        for x, c, pos in ((a, b, 1), (b, a, 0)):
            v = G.const(c)
            if v is None or x is c or G.const(x) is not None:
                continue
            if node.op in ("Sub", "Div") and pos == 0:
                continue  # 0 - x and 1 / x are not x
            if v.size and np.all(v == neutral):
                return Identity(node, x)
        return None

    def check(self, match: Identity, ctx):
        node, x = match.node, match.keep
        if node.op == "Dropout":
            if len(node.outputs) > 1 and node.outputs[1].outputs:
                return "Dropout's mask output is used"
            if len(node.inputs) > 2 and node.inputs[2].name:
                mode = G.const(node.inputs[2])
                if mode is None or bool(np.asarray(mode).reshape(-1)[0]):
                    return "Dropout training_mode is not constant false"
        if node.op in ("Add", "Sub", "Mul", "Div"):
            pattern = P.claim(node)  # LayerNorm's γ = 1, β = 0: ORT fuses the pattern only with them
            if pattern is not None:
                return P.decline_reason(node, pattern)
            c = next(t for t in node.inputs if t is not x)
            v = G.const(c)
            xs, out = x.shape, node.outputs[0].shape
            if xs is None or out is None or len(xs) != len(out) or v.ndim > len(xs):
                return "cannot prove the constant does not broadcast the input to a larger shape"
            if any(vd != 1 and not (isinstance(xd, int) and vd == xd) for vd, xd in zip(v.shape[::-1], xs[::-1])):
                return "the constant broadcasts the input to a larger shape"
            xd = G.dtype_of(x)
            if xd is not None and v.dtype != xd:
                return "the constant's dtype differs from the input's"
        if G.is_graph_output(ctx.graph, node.outputs[0]):
            up = G.producer(x)
            if up is None or G.is_graph_output(ctx.graph, x) or len(x.outputs) > 1:
                return "its output is a graph output fed directly by a graph input or a shared tensor"
        return None

    def rewrite(self, match: Identity, ctx):
        node = match.node
        name = node.name
        G.bypass(node, match.keep, ctx.graph)
        return Rewrite("", [name], [], node.op)
