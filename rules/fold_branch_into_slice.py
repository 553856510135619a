"""fold_branch_into_slice: merge a linear branch added to a slice of a Linear's output into that
Linear's weight columns (LoRA on q and v of a fused qkv projection).

    x ─┬─ MatMul(Wqkv) ─ Add(b) ─┬─ Slice[0:C]  ─ Add ─ q          x ─ MatMul(W') ─ Add(b') ─┬─ Slice[0:C]  ─ q
       │                         ├─ Slice[C:2C] ─────── k    ⇒                              ├─ Slice[C:2C] ─ k
       │                         └─ Slice[2C:3C] ─ Add ─ v                                  └─ Slice[2C:3C] ─ v
       ├─ MatMul(Aq) ─ MatMul(Bq) ─ Mul(s) ─┘ (to q's Add)
       └─ MatMul(Av) ─ MatMul(Bv) ─ Mul(s) ─┘ (to v's Add)
    (or one Split on the last axis instead of the Slices)

Math: with the Linear T = x·W + b and a branch l = x·M + m (found by fold_linear_affine's walk,
M [Cin, hi−lo]), T[..., lo:hi] + l = x·W' + b' with W'[:, lo:hi] = W[:, lo:hi] + M and
b'[lo:hi] = b[lo:hi] + m; the other columns are unchanged. The other readers of T are left as they
are, which is exact only because they read other columns.

Declines: the branch reads another tensor than the Linear's input; T has a reader that is not a
Slice/Split of the last axis (or Shape) or whose columns overlap [lo, hi); the slice output has
other readers; the Linear's weight is not constant or is shared; a branch bias with no bias Add
to take it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import graph as G
from onnxrep import kernels as K
from onnxrep import linear as L
from onnxrep.engine import Rewrite, Rule

from .fold_linear_affine import Form, NotLinear, Walker, _escapes, _last


@dataclass
class SliceMatch:
    add: gs.Node  # the Add of slice and branch
    side: int  # which of its inputs is the slice
    split: gs.Node  # the Slice/Split
    matmul: gs.Node
    bias: gs.Node | None  # the Linear's bias Add
    x: gs.Tensor  # the Linear's input
    form: Form | None = None  # the branch, set by check
    cols: tuple[int, int] | None = None


def _last_axis_range(node: gs.Node, t: gs.Tensor) -> tuple[int, int] | None:
    """The [lo, hi) columns of the last axis that output `t` of a Slice/Split takes, or None."""
    x = node.inputs[0]
    r, c = G.rank(x), _last(x)
    if r is None or c is None:
        return None
    if node.op == "Split":
        if int(node.attrs.get("axis", 0)) % r != r - 1:
            return None
        split = G.const(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else node.attrs.get("split")
        n = len(node.outputs)
        if split is None:
            if c % n:
                return None
            split = [c // n] * n
        split = [int(v) for v in np.asarray(split).reshape(-1)]
        k = next(i for i, o in enumerate(node.outputs) if o is t)
        return sum(split[:k]), sum(split[: k + 1])
    if node.op == "Slice":
        vals = [G.const(i) for i in node.inputs[1:]]
        if len(node.inputs) < 4 or any(v is None for v in vals):
            return None
        starts, ends, axes = vals[0].reshape(-1), vals[1].reshape(-1), vals[2].reshape(-1)
        steps = vals[3].reshape(-1) if len(vals) > 3 else np.ones(1, dtype=np.int64)
        if len(axes) != 1 or int(axes[0]) % r != r - 1 or int(steps[0]) != 1:
            return None
        lo, hi = int(starts[0]), int(ends[0])
        lo = max(0, min(c, lo + c if lo < 0 else lo))
        hi = max(0, min(c, hi + c if hi < 0 else hi))
        return (lo, hi) if hi > lo else None
    return None


def _linear(graph, t: gs.Tensor):
    """(matmul, bias_add or None, x) when t = MatMul(x, W) or Add(MatMul(x, W), b), else None."""
    n = G.producer(t)
    add = None
    if n is not None and n.op == "Add" and len(n.inputs) == 2:
        consts = [i for i in n.inputs if G.const(i) is not None]
        data = [i for i in n.inputs if G.const(i) is None]
        if len(consts) != 1 or len(data) != 1 or not G.private_to(graph, data[0], n):
            return None
        add, n = n, G.producer(data[0])
    if n is None or n.op != "MatMul" or not isinstance(n.inputs[1], gs.Constant):
        return None
    return n, add, n.inputs[0]


class FoldBranchIntoSlice(Rule):
    name = "fold_branch_into_slice"
    description = "merge a linear branch (LoRA on q/v) added to a last-axis slice of a Linear's output into its columns"
    anchors = ("Add",)

    def match(self, node, ctx):
        if len(node.inputs) != 2:
            return None
        for si, s in enumerate(node.inputs):
            p = G.producer(s)
            if p is None or p.op not in ("Slice", "Split"):
                continue
            lin = _linear(ctx.graph, p.inputs[0])
            if lin is None:
                continue
            return SliceMatch(node, si, p, *lin)
        return None

    def check(self, m, ctx):
        node, si, p, mm, add, x = m.add, m.side, m.split, m.matmul, m.bias, m.x
        s, other = node.inputs[si], node.inputs[1 - si]
        rng = _last_axis_range(p, s)
        if rng is None:
            return f"{p.op} is not a constant range of the last axis"
        if not G.private_to(ctx.graph, s, node):
            return G.fan_out_reason(ctx.graph, s) or f"'{s.name}' is read by another node"
        t = p.inputs[0]
        if G.is_graph_output(ctx.graph, t):
            return f"'{t.name}' is a graph output"
        for r in t.outputs:  # every other reader takes other columns
            if r.op == "Shape":
                continue
            if r.op not in ("Slice", "Split"):
                return f"'{t.name}' is read whole by {r.op} '{r.name}'"
            for o in r.outputs:
                if o is s:
                    continue
                ro = _last_axis_range(r, o)
                if ro is None:
                    return f"{r.op} '{r.name}' is not a constant range of the last axis"
                if ro[0] < rng[1] and rng[0] < ro[1]:
                    return f"{r.op} '{r.name}' reads columns {ro} that overlap {rng}"
        for w in (mm.inputs[1],) + ((next(i for i in add.inputs if G.const(i) is not None),) if add else ()):
            reason = G.shared_constant_reason(w)
            if reason:
                return reason
        w = mm.inputs[1]
        if w.shape is None or len(w.shape) != 2:
            return "the Linear's weight is not a matrix"
        if add is not None and G.const(next(i for i in add.inputs if G.const(i) is not None)).size != int(w.shape[1]):
            return "the Linear's bias is not one value per output column"
        if G.producer(other) is None or not G.private_to(ctx.graph, other, node):
            return "the branch is not private to the Add"
        walker = Walker(ctx.graph)
        try:
            form = walker.form(other)
        except (NotLinear, K.NotMergeable) as e:
            return f"the branch is not linear: {e}"
        if form.source is not x:
            return f"the branch reads '{form.source.name}', the Linear reads '{x.name}'"
        if not any(n.op in ("MatMul", "Gemm", "Einsum") for n in form.nodes):
            return "the branch has no matrix product"
        if form.spec.cout != rng[1] - rng[0]:
            return f"the branch makes {form.spec.cout} channels, the slice has {rng[1] - rng[0]}"
        reason = _escapes(ctx.graph, form.nodes, other)
        if reason:
            return reason
        if add is None and np.any(form.spec.bias != 0):
            return "the branch has a bias and the Linear no bias Add to take it"
        m.form, m.cols = form, rng
        return None

    def rewrite(self, m, ctx):
        node, si, p, mm, add = m.add, m.side, m.split, m.matmul, m.bias
        form, (lo, hi) = m.form, m.cols
        w = np.array(G.const(mm.inputs[1]), dtype=np.float64)
        dtype = L.data_dtype(mm.inputs[1])
        w[:, lo:hi] += K.matmul_weight(form.spec)
        names = [n.name for n in form.nodes] + [node.name]
        mm.inputs[1] = G.new_weight(ctx.graph, f"{mm.name}.weight", w, dtype)
        if add is not None:
            bi = next(i for i, t in enumerate(add.inputs) if G.const(t) is not None)
            b = np.array(G.const(add.inputs[bi]), dtype=np.float64).reshape(-1)
            b[lo:hi] += form.spec.bias
            add.inputs[bi] = G.new_weight(ctx.graph, f"{add.name}.bias", b, dtype)
        out, s = node.outputs[0], node.inputs[si]
        for n in form.nodes + [node]:
            G.remove_node(n)
        k = next(i for i, o in enumerate(p.outputs) if o is s)
        p.outputs[k] = out
        return Rewrite("", names, [mm.name], f"branch {form.spec.cin}→{form.spec.cout} into columns {lo}:{hi}")
