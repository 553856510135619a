"""canonicalize_border_fill: a Pad whose border is then overwritten with per-channel constants.

    y → Pad(0) → ScatterND(c) → ScatterND(c) → … → z          (slice assignment out[:, :, :p] = c,
  ⇒ y → Sub(c) → Pad(0) → Add(c) → z                           as the exporters write it)

The legacy exporter writes the ScatterNDs directly; the dynamo exporter moves each sliced axis to
the front with Transposes around them. Transposes inside the chain are followed too, as long as
their net permutation is the identity.

Both compute "y in the interior, c[channel] on the border". The Sub/Pad/Add form is the one the
linear-region walk understands: when y = conv1×1(x) + b with b = c (DBB's BN-and-pad), the
Sub cancels the bias, the Pad moves onto x, and the Add restores the border, so a following K×K
conv composes exactly. The rewrite is exact for any y; it also replaces k ScatterNDs by two
element-wise ops.

Checked by replaying the ScatterNDs (constant indices and updates) on a marker array of the padded
shape: every border element must be written, with a value that depends on the channel only, and
no interior element may be written.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from dataclasses import dataclass

from onnxrep import graph as G
from onnxrep import linear as L
from onnxrep.engine import Rewrite, Rule


@dataclass
class BorderFill:
    pad: gs.Node
    chain: list
    values: np.ndarray | None = None  # per-channel border value, set by check


class CanonicalizeBorderFill(Rule):
    name = "canonicalize_border_fill"
    description = "rewrite Pad + ScatterND border fills (slice assignment) as Sub → Pad → Add so branches can merge"
    anchors = ("ScatterND", "Transpose")

    def match(self, node, ctx):
        out = node.outputs[0]
        if len(out.outputs) == 1 and out.outputs[0].op in CHAIN_OPS and out.outputs[0].inputs[0] is out:
            return None  # not the last of the chain
        chain = [node]
        t = node.inputs[0]
        while G.producer(t) is not None and G.producer(t).op in CHAIN_OPS:
            chain.insert(0, G.producer(t))
            t = chain[0].inputs[0]
        pad = G.producer(t)
        if pad is None or pad.op != "Pad" or not any(n.op == "ScatterND" for n in chain):
            return None
        perm = list(range(len(pad.outputs[0].shape or ())))
        for n in chain:
            if n.op == "Transpose":
                p = n.attrs.get("perm") or list(range(len(perm)))[::-1]
                if len(p) != len(perm):
                    return None
                perm = [perm[i] for i in p]
        if perm != sorted(perm):
            return None  # the chain ends in another layout: a real Transpose, not a border fill
        return BorderFill(pad, chain)

    def check(self, match, ctx):
        pad, chain = match.pad, match.chain
        lin = L.pad_of(pad)
        if not lin:
            return lin.reason
        symbolic = _symbolic_index_source(chain)
        if symbolic is not None:  # before fan-out: the Shape ops reading the Pad are that fan-out
            _hint_pin_batch(ctx)
            return (f"ScatterND indices are computed from the symbolic shape of '{symbolic.name}' "
                    "(legacy export with a dynamic batch): pin it with --input-shape")
        links = [pad.outputs[0]] + [n.outputs[0] for n in chain[:-1]]
        for t in links:
            reason = G.fan_out_reason(ctx.graph, t)
            if reason:
                return reason
        for n in chain:
            if n.op == "Transpose":
                continue
            if n.attrs.get("reduction", "none") not in ("none", b"none"):
                return "ScatterND with a reduction"
            if G.const(n.inputs[1]) is None or G.const(n.inputs[2]) is None:
                return "ScatterND indices or updates are not constant"
        shape = G.static_shape(pad.outputs[0])
        if shape is None:
            return "padded shape is not static"
        fill = _replay(shape, chain)
        r = len(shape)
        sp = lin.spec.pads
        interior = (slice(None), slice(None)) + tuple(
            slice(sp[a], shape[a + 2] - sp[a + r - 2]) for a in range(r - 2))
        inner_mask = np.zeros(shape, dtype=bool)
        inner_mask[interior] = True
        if np.any(~np.isnan(fill[inner_mask])):
            return "ScatterND writes inside the padded region"
        border = np.where(inner_mask, np.nan, fill)
        if np.any(np.isnan(border[~inner_mask])):
            return "ScatterND does not cover the whole border"
        per_channel = np.moveaxis(border, 1, 0).reshape(shape[1], -1)
        vals = np.nanmax(per_channel, axis=1)
        if np.any(np.nanmin(per_channel, axis=1) != vals):
            return "border values vary within a channel"
        match.values = vals
        return None

    def rewrite(self, match, ctx):
        pad, chain, vals = match.pad, match.chain, match.values
        shape = G.static_shape(pad.outputs[0])
        dtype = L.data_dtype(*[n.inputs[2] for n in chain if n.op == "ScatterND"])
        c = G.new_constant(ctx.graph, f"{pad.name}/border_value", vals.astype(dtype).reshape((1, -1) + (1,) * (len(shape) - 2)))
        y = pad.inputs[0]
        out = chain[-1].outputs[0]
        shifted = G.new_variable(ctx.graph, f"{pad.name}/minus_border", dtype=out.dtype, shape=y.shape)
        padded = pad.outputs[0]
        names = [n.name for n in chain]
        for n in chain:
            G.remove_node(n)
        sub = gs.Node("Sub", G.unique_node_name(ctx.graph, f"{pad.name}/Sub"), inputs=[y, c], outputs=[shifted])
        pad.inputs[0] = shifted
        add = gs.Node("Add", G.unique_node_name(ctx.graph, f"{pad.name}/Add"), inputs=[padded, c], outputs=[out])
        ctx.graph.nodes.extend([sub, add])
        return Rewrite("", names, [sub.name, add.name], f"{len(chain)} ScatterND/Transpose")


CHAIN_OPS = ("ScatterND", "Transpose")


def _symbolic_index_source(chain) -> gs.Tensor | None:
    """The tensor whose symbolic shape the chain's ScatterND indices or updates are computed from
    (Shape → Gather → Range → ... as the legacy exporter writes a slice assignment on a dynamic
    batch), or None. Only shape arithmetic is followed: a value computed from data is not this case."""
    seen: set[int] = set()
    stack = [t for n in chain if n.op == "ScatterND" for t in n.inputs[1:3] if G.const(t) is None]
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        node = G.producer(t)
        if node is None:
            continue
        if node.op == "Shape":
            src = node.inputs[0]
            if G.static_shape(src) is None:
                return src
            continue
        stack.extend(i for i in node.inputs if G.const(i) is None)
    return None


def _hint_pin_batch(ctx) -> None:
    """One note per run, in the summary (not only --explain): the user can fix this one."""
    dynamic = [t for t in ctx.graph.inputs if t.shape is not None and any(not isinstance(d, int) for d in t.shape)]
    example = ""
    if len(dynamic) == 1 and all(isinstance(d, int) for d in dynamic[0].shape[1:]):
        t = dynamic[0]
        example = f" {t.name}:{','.join(['1'] + [str(d) for d in t.shape[1:]])}"
    note = ("slice-assignment border fills (DBB / ECB-style BN-and-pad) compute their ScatterND indices from "
            f"the symbolic batch size and stay unmerged: pin the batch with --input-shape{example} "
            "(input_shapes= in Python; the output then has that fixed batch), or export with the dynamo exporter")
    if note not in ctx.notes:
        ctx.notes.append(note)


def _replay(shape, chain) -> np.ndarray:
    """The chain applied to NaN-filled padded data: NaN where the data survives, else the value."""
    fill = np.full(shape, np.nan)
    for n in chain:
        if n.op == "Transpose":
            fill = np.transpose(fill, n.attrs.get("perm") or None)
            shape = fill.shape
            continue
        idx = G.const(n.inputs[1]).astype(np.int64)
        upd = G.const(n.inputs[2]).astype(np.float64)
        k = idx.shape[-1]
        flat_idx = idx.reshape(-1, k)
        flat_upd = upd.reshape((flat_idx.shape[0],) + tuple(shape[k:]))
        fill[tuple(flat_idx.T)] = flat_upd  # later writes win, as in ScatterND
    return fill
