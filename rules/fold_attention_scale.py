"""fold_attention_scale: fold the attention's constant scale (q·kᵀ·d^-½, on q, on k, or per head)
into the weight columns and bias of the projection that makes q (or k).

    x ─ MatMul(Wq) ─ Add(bq) ─ Reshape[B,N,H,d] ─ Transpose ─┐
                                                             MatMul ─ Mul(c) ─ Softmax
    x ─ MatMul(Wk) ─ Add(bk) ─ Reshape ─ Transpose ──────────┘
  ⇒ x ─ MatMul(Wq·c) ─ Add(bq·c) ─ Reshape ─ Transpose ─ MatMul ─ Softmax

    (also: Mul/Div on q or k after the head split, a per-head constant [1, H, 1, 1] or [H, 1, 1]
     on the heads or on the scores, Split/Slice of a fused qkv Linear's last axis on the way)

Math: a constant c that is 1 along the scores' last two axes (a scalar, or one value per batch
or head index) commutes with the score MatMul: c ⊙ (A·B) = (c ⊙ A)·B. A Transpose permutes c's
axes; a Reshape that splits the last axis C into trailing axes [H, d] (row-major) turns c over
those axes into a vector over C when c is 1 on every other axis; a Slice/Split of columns
[lo, hi) of the Linear's output puts it on those columns. At the Linear, y = x·W + b scaled per
column by v is x·(W·diag(v)) + b⊙v.

Declines: a tensor on the path read by another node or a graph output (q's projection feeding
anything else would see the scale too; fan-out), a constant that varies along the scores' last
two axes or along a token axis, a broadcast operand (the scale's axis missing on it), a Reshape
that does not only split the last axis, another reader of the fused Linear that is not a
Slice/Split of other columns, a weight shared with another node, a node runtimes fuse whole.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import graph as G
from onnxrep import linear as L
from onnxrep import patterns as P
from onnxrep.engine import Rewrite, Rule

from .fold_branch_into_slice import _last_axis_range
from .fold_linear_affine import _const_and_data, _last

MAX_DEPTH = 16


@dataclass
class ScaleMatch:
    node: gs.Node  # the Mul/Div
    data: gs.Tensor
    scale: np.ndarray  # the constant c as a multiplier (1/c for Div)
    matmul: gs.Node | None = None
    bias: gs.Node | None = None
    vector: np.ndarray | None = None  # per output column of the Linear
    cols: tuple[int, int] | None = None


class NoPath(Exception):
    pass


def _dims(t: gs.Tensor):
    return list(t.shape) if t.shape is not None else None


def _padded(c: np.ndarray, rank: int) -> np.ndarray:
    if c.ndim > rank:
        raise NoPath(f"constant of rank {c.ndim} raises the rank of a rank-{rank} tensor")
    return c.reshape((1,) * (rank - c.ndim) + c.shape)


class _Walk:
    def __init__(self, graph: gs.Graph):
        self.graph = graph

    def up(self, t: gs.Tensor, c: np.ndarray, reader: gs.Node, depth: int = 0):
        """(matmul, bias Add, per-column vector, columns) of the Linear whose output, scaled by c
        along the path to `t`, is `t` scaled by c."""
        if depth > MAX_DEPTH:
            raise NoPath("path too long")
        if not G.private_to(self.graph, t, reader):
            raise NoPath(G.fan_out_reason(self.graph, t) or f"'{t.name}' is read by another node")
        n = G.producer(t)
        r = G.rank(t)
        if n is None or r is None:
            raise NoPath(f"'{t.name}' has no producer or an unknown rank")
        c = _padded(c, r)
        lin = G.linear_of(self.graph, t)
        if lin is not None:
            return self._linear(*lin, c, r)
        if n.op == "Add" and len(n.inputs) == 2:
            raise NoPath("Add is not a Linear's bias")
        if n.op == "MatMul":
            return self._scores(n, c, r, depth)
        if n.op == "Transpose":
            perm = n.attrs.get("perm")
            if perm is None or len(perm) != r:
                raise NoPath("Transpose without a full perm")
            return self.up(n.inputs[0], np.transpose(c, np.argsort(perm)), n, depth + 1)
        if n.op == "Reshape":
            return self.up(n.inputs[0], self._unsplit(n, c, r), n, depth + 1)
        if n.op in ("Slice", "Split"):
            return self._slice(n, t, c, r)
        raise NoPath(f"{n.op} '{n.name}' is not on a path to a Linear")

    def _scores(self, n: gs.Node, c: np.ndarray, r: int, depth: int):
        """c ⊙ (A·B) = (c ⊙ A)·B when c is 1 on the last two axes and A is not broadcast where c varies."""
        if r < 2 or any(d != 1 for d in c.shape[-2:]):
            raise NoPath("the constant varies along the scores' last two axes (not a per-head scale)")
        out = n.outputs[0]
        reasons = []
        for operand in n.inputs:
            orank = G.rank(operand)
            varies = [i for i, d in enumerate(c.shape) if d != 1]
            if varies and (orank != r or any(_dims(operand) is None or _dims(out) is None
                                            or operand.shape[i] != out.shape[i] for i in varies)):
                reasons.append(f"'{operand.name}' is broadcast where the scale varies")
                continue
            try:
                return self.up(operand, c if orank == r else c.reshape(-1)[:1].reshape(()), n, depth + 1)
            except NoPath as e:
                reasons.append(str(e))
        raise NoPath("; ".join(reasons))

    def _unsplit(self, n: gs.Node, c: np.ndarray, r: int) -> np.ndarray:
        """c on the Reshape's output as a constant on its input, when the Reshape splits the input's
        last axis C into trailing axes whose product is C and c is 1 on every other axis."""
        x, y = n.inputs[0], n.outputs[0]
        rx, cx = G.rank(x), _last(x)
        if c.size == 1:
            return c.reshape(())
        ys = _dims(y)
        if rx is None or cx is None or ys is None:
            raise NoPath("Reshape shapes unknown")
        k, prod = 0, 1
        while prod < cx and k < r:
            d = ys[r - 1 - k]
            if not isinstance(d, (int, np.integer)) or d <= 0:
                raise NoPath("Reshape's trailing dims are not static")
            prod *= int(d)
            k += 1
        if prod != cx:
            raise NoPath(f"Reshape does not split the last axis ({cx}) into trailing axes")
        if any(d != 1 for d in c.shape[: r - k]):
            raise NoPath("the constant varies along a token axis")
        v = np.broadcast_to(c.reshape(c.shape[r - k:]), tuple(int(d) for d in ys[r - k:])).reshape(-1)
        return v.reshape((1,) * (rx - 1) + (cx,))

    def _slice(self, n: gs.Node, t: gs.Tensor, c: np.ndarray, r: int):
        rng = _last_axis_range(n, t)
        if rng is None:
            raise NoPath(f"{n.op} is not a constant range of the last axis")
        src = n.inputs[0]
        for other in src.outputs:  # the Linear's other readers must take other columns
            if other.op == "Shape":
                continue
            if other.op not in ("Slice", "Split"):
                raise NoPath(f"'{src.name}' is read whole by {other.op} '{other.name}'")
            for o in other.outputs:
                if o is t:
                    continue
                ro = _last_axis_range(other, o)
                if ro is None or (ro[0] < rng[1] and rng[0] < ro[1]):
                    raise NoPath(f"{other.op} '{other.name}' reads columns overlapping {rng}")
        if G.is_graph_output(self.graph, src):
            raise NoPath(f"'{src.name}' is a graph output")
        lin = G.producer(src)
        if lin is None:
            raise NoPath("no Linear above the slice")
        v = self._vector(c, r, rng[1] - rng[0])
        found = G.linear_of(self.graph, src)
        if found is not None:
            return self._target(*found, v, rng)
        raise NoPath("the slice is not of a Linear's output")

    @staticmethod
    def _target(mm: gs.Node, add: gs.Node | None, v, rng):
        """The Linear to fold into, checked here so that the walk can try the other operand."""
        consts = [mm.inputs[1]] + ([next(i for i in add.inputs if G.const(i) is not None)] if add else [])
        for t in consts:
            reason = G.shared_constant_reason(t)
            if reason:
                raise NoPath(reason)
        w = mm.inputs[1]
        if w.shape is None or len(w.shape) != 2:
            raise NoPath("the Linear's weight is not a matrix")
        if add is not None and G.const(consts[1]).size != int(w.shape[1]):
            raise NoPath("the Linear's bias is not one value per output column")
        return mm, add, v, rng

    def _vector(self, c: np.ndarray, r: int, width: int) -> np.ndarray:
        if any(d != 1 for d in c.shape[:-1]):
            raise NoPath("the constant varies along a token axis at the Linear")
        v = c.reshape(-1)
        if v.size not in (1, width):
            raise NoPath(f"the constant has {v.size} values for {width} columns")
        return np.broadcast_to(v.astype(np.float64), (width,))

    def _linear(self, mm: gs.Node, add: gs.Node | None, c: np.ndarray, r: int):
        w = mm.inputs[1]
        if w.shape is None or len(w.shape) != 2:
            raise NoPath("the Linear's weight is not a matrix")
        return self._target(mm, add, self._vector(c, r, int(w.shape[1])), (0, int(w.shape[1])))


class FoldAttentionScale(Rule):
    name = "fold_attention_scale"
    description = ("fold the attention's constant q·kᵀ scale (on q, k or the scores; per head too) into the "
                   "q (or k) projection's weight columns and bias")
    anchors = ("Mul", "Div")

    def match(self, node, ctx):
        if len(node.inputs) != 2:
            return None
        cd = _const_and_data(node)
        if cd is None:
            return None
        data, c, const_first = cd
        if not np.issubdtype(c.dtype, np.floating) or (node.op == "Div" and const_first):
            return None
        up = G.producer(data)
        if up is None or up.op not in ("MatMul", "Transpose", "Reshape", "Split", "Slice"):
            return None  # a scale right after a Linear (or elsewhere) is fold_linear_affine's business
        if up.op == "MatMul" and G.const(up.inputs[1]) is not None:
            return None
        if node.op == "Div" and np.any(c == 0):
            return None
        scale = (1.0 / c.astype(np.float64)) if node.op == "Div" else c.astype(np.float64)
        return ScaleMatch(node, data, scale)

    def check(self, m: ScaleMatch, ctx):
        pattern = P.claim(m.node)
        if pattern is not None:
            return P.decline_reason(m.node, pattern)
        try:
            mm, add, v, cols = _Walk(ctx.graph).up(m.data, m.scale, m.node)
        except NoPath as e:
            return f"no Linear to fold the scale into: {e}"
        m.matmul, m.bias, m.vector, m.cols = mm, add, v, cols
        return None

    def rewrite(self, m: ScaleMatch, ctx):
        mm, add, (lo, hi), v = m.matmul, m.bias, m.cols, m.vector
        g = ctx.graph
        w = np.array(G.const(mm.inputs[1]), dtype=np.float64)
        w[:, lo:hi] *= v
        mm.inputs[1] = G.new_weight(g, f"{mm.name}.weight", w, L.data_dtype(mm.inputs[1]))
        names = [m.node.name, mm.name]
        if add is not None:
            bi = next(i for i, t in enumerate(add.inputs) if G.const(t) is not None)
            shape = G.const(add.inputs[bi]).shape
            b = np.array(G.const(add.inputs[bi]), dtype=np.float64).reshape(-1)
            b[lo:hi] *= v
            add.inputs[bi] = G.new_weight(g, f"{add.name}.bias", b.reshape(shape), L.data_dtype(add.inputs[bi]))
            names.append(add.name)
        G.bypass(m.node, m.data, g)
        what = "scale" if np.unique(v).size == 1 else "per-head scale"
        return Rewrite("", names, [mm.name], f"{what} into columns {lo}:{hi} of '{mm.name}'")
