"""remove_dead_channels: drop conv output channels that are exactly zero, and what reads them.

    x → Conv(C outputs; rows R all-zero, bias 0) → Relu → Conv(C inputs) → y
  ⇒ x → Conv(C − |R| outputs)                  → Relu → Conv(C − |R| inputs) → y

A conv output channel whose weights *and* bias are exactly 0 is 0 everywhere. Ops that map 0 to 0
per channel (Relu, LeakyRelu, Clip with 0 inside its range, Identity) keep it 0, and a reader conv
multiplies it by its weights: dropping the channel and the reader's matching input channels
changes nothing. This is what ResRep's compactors leave after merging (a zero compactor row
times anything is zero). Only exact zeros qualify: pruning small-norm channels is not
equivalent and never happens here.

Declines when a path from the conv reaches anything else (an Add, a Concat, a BN, a graph output,
a grouped reader conv), so shapes elsewhere never change.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import graph as G
from onnxrep import linear as L
from onnxrep.engine import Rewrite, Rule

ZERO_PRESERVING = ("Relu", "LeakyRelu", "Identity")


@dataclass
class DeadChannels:
    conv: gs.Node
    dead: np.ndarray  # bool per output channel
    passthrough: list  # zero-preserving nodes between the conv and its readers
    readers: list  # reader convs


class RemoveDeadChannels(Rule):
    name = "remove_dead_channels"
    description = "drop conv output channels whose weights and bias are exactly zero, with the readers' matching inputs"
    anchors = ("Conv",)

    def match(self, node, ctx):
        w = G.const(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None:
            return None
        b = G.const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else np.zeros(w.shape[0])
        if b is None:
            return None
        dead = ~np.any(w.reshape(w.shape[0], -1) != 0, axis=1) & (b.reshape(-1) == 0)
        if not dead.any() or dead.all():
            return None
        return DeadChannels(node, dead, [], [])

    def check(self, m: DeadChannels, ctx):
        if int(m.conv.attrs.get("group", 1)) != 1:
            return "grouped conv: dropping outputs would unbalance its groups"
        r = G.shared_constant_reason(m.conv.inputs[1])
        if r:
            return r
        frontier = [m.conv.outputs[0]]
        while frontier:
            t = frontier.pop()
            if G.is_graph_output(ctx.graph, t):
                return f"'{t.name}' is a graph output"
            for reader in t.outputs:
                if reader.op in ZERO_PRESERVING or (reader.op == "Clip" and _clip_keeps_zero(reader)):
                    if reader.inputs[0] is not t:
                        return f"{reader.op} reads the channels through a side input"
                    m.passthrough.append(reader)
                    frontier.append(reader.outputs[0])
                elif reader.op == "Conv" and reader.inputs[0] is t:
                    lin = L.conv_of(reader)
                    if not lin:
                        return lin.reason
                    if lin.spec.group != 1:
                        return "a grouped conv reads the channels"
                    r = G.shared_constant_reason(reader.inputs[1])
                    if r:
                        return r
                    m.readers.append(reader)
                else:
                    return f"{reader.op} '{reader.name}' reads the channels (only Relu-like ops and convs may)"
        if not m.readers:
            return "no conv reads the channels"
        return None

    def rewrite(self, m: DeadChannels, ctx):
        keep = ~m.dead
        conv = m.conv
        w, b = G.const(conv.inputs[1]), _bias(conv)
        conv.inputs[1] = G.new_weight(ctx.graph, f"{conv.name}.weight_pruned", w[keep], G.dtype_of(conv.inputs[1]))
        if len(conv.inputs) > 2 and conv.inputs[2].name:
            conv.inputs[2] = G.new_weight(ctx.graph, f"{conv.name}.bias_pruned", b[keep], G.dtype_of(conv.inputs[2]))
        for node in [conv] + m.passthrough:
            shape = node.outputs[0].shape
            if shape is not None and len(shape) > 1:
                node.outputs[0].shape = [shape[0], int(keep.sum())] + list(shape[2:])
        for reader in m.readers:
            rw = G.const(reader.inputs[1])
            reader.inputs[1] = G.new_weight(ctx.graph, f"{reader.name}.weight_pruned", rw[:, keep], G.dtype_of(reader.inputs[1]))
        names = [conv.name] + [r.name for r in m.readers]
        return Rewrite("", names, names, f"{int(m.dead.sum())} of {len(keep)} channels")


def _bias(conv):
    if len(conv.inputs) > 2 and conv.inputs[2].name:
        return G.const(conv.inputs[2])
    return None


def _clip_keeps_zero(node) -> bool:
    lo = G.const(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else node.attrs.get("min")
    hi = G.const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else node.attrs.get("max")
    lo = -np.inf if lo is None else float(np.asarray(lo).reshape(-1)[0])
    hi = np.inf if hi is None else float(np.asarray(hi).reshape(-1)[0])
    return lo <= 0 <= hi
