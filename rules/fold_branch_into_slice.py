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

In place (`r = qkv(x); r[..., lo:hi] += l`): the exporters write the sum back into T with a
ScatterND whose updates are the Add's output: `ScatterND(T, I, U)` (legacy, I the (row..., col)
index of every element of columns [lo, hi)) or `Transpose(ScatterND(Transpose(T), I, Transpose(U)))`
with the last and first axes swapped and I = [[lo], ..., [hi−1]] (dynamo's slice_scatter). Such a
ScatterND replaces exactly T's columns [lo, hi), so it reads nothing of T that the merge changes:
it is an allowed reader of T. After the merge U = T'[..., lo:hi], and a ScatterND writing a
tensor's own columns back into them returns the tensor: the second anchor (ScatterND) removes it.
Exactness of the scatter is proven for every value of the symbolic dims (onnxrep.symbolic): the
indices are (i_0, ..., i_{r-2}, lo + j) over the whole of T's leading axes, whether constant or
computed from Shape(T) at run time, and the Reshape/Expand the updates pass through keep their
shape (the legacy exporter writes each `+=` twice; each folds).

Declines: the branch reads another tensor than the Linear's input; T has a reader that is not a
Slice/Split of the last axis (or Shape), or a ScatterND writing exactly [lo, hi) with the Add's
sum, or whose columns overlap [lo, hi); the slice output has other readers; the Linear's weight is
not constant or is shared; a branch bias with no bias Add to take it. A scatter whose indices
cannot be followed, cover other columns or only some rows is not read as a column block.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxrep import graph as G
from onnxrep import kernels as K
from onnxrep import linear as L
from onnxrep import symbolic as S
from onnxrep.engine import Rewrite, Rule

from .fold_linear_affine import Form, NotLinear, Walker, _escapes, _last


@dataclass
class SelfScatter:
    """A ScatterND that writes a tensor's own columns back into them: it returns the tensor."""
    scatter: ColumnScatter


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


@dataclass
class ColumnScatter:
    """`result` = `data` with columns [lo, hi) of its last axis replaced by `updates`."""
    data: gs.Tensor
    cols: tuple[int, int]
    updates: gs.Tensor
    result: gs.Tensor
    nodes: list  # the ScatterND and the plumbing around it (Transposes)


_SHAPE_KEEPING = ("Reshape", "Expand", "Identity", "CastLike", "Cast")


def _keeps_shape(ev: S.Evaluator, n: gs.Node) -> bool:
    """Whether a Reshape/Expand/Identity/Cast provably returns its input's shape for every value of the
    symbolic dims (it then passes the values through unchanged)."""
    if n.op == "Identity":
        return True
    if n.op in ("Cast", "CastLike"):  # a cast to the dtype the value already has (dynamo-noopt's copy_)
        to = G.dtype_of(n.inputs[1]) if n.op == "CastLike" else None
        if n.op == "Cast":
            try:
                to = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(n.attrs.get("to"))))
            except (TypeError, ValueError, KeyError):
                return False
        return to is not None and G.dtype_of(n.inputs[0]) == to
    try:
        dims = ev.shape(n.inputs[0])
        target = ev._target(n.inputs[1])
        if n.op == "Expand":
            return S.broadcast_dims([dims, tuple(target)]) == tuple(dims)
        if not int(n.attrs.get("allowzero", 0)):
            target = [dims[i] if d.static == 0 and i < len(dims) else d for i, d in enumerate(target)]
        if [d.static for d in target].count(-1) == 1:
            target[[d.static for d in target].index(-1)] = ev._infer_minus_one(dims, target, n)
        return tuple(target) == tuple(dims)
    except (S.Unknown, IndexError):
        return False


def _unplumb(t: gs.Tensor, ev: S.Evaluator) -> gs.Tensor:
    """Walk up Reshape/Expand/Identity nodes that provably keep the shape, and casts to the dtype
    the value has (exporters wrap a slice assignment's updates in them): they pass the values
    through unchanged."""
    for _ in range(8):
        n = G.producer(t)
        if n is None or n.op not in _SHAPE_KEEPING or not _keeps_shape(ev, n):
            return t
        t = n.inputs[0]
    return t


def _block_indices(ev: S.Evaluator, idx: gs.Tensor, data: gs.Tensor) -> tuple[int, int] | str:
    """[lo, hi) when ScatterND indices `idx` are, for every value of the symbolic dims,
    idx[i_0, ..., i_{r-2}, j] = (i_0, ..., i_{r-2}, lo + j) over the whole of data's leading axes."""
    try:
        index, dims = ev.value(idx), ev.shape(data)
    except S.Unknown as e:
        return f"the scatter's indices cannot be followed ({e})"
    r = len(dims)
    if index.rank != r + 1 or index.shape[-1] != S.Poly(r) or tuple(index.shape[:r - 1]) != tuple(dims[:r - 1]):
        return "the scatter's indices are not one (row..., column) index per element of a column block"
    m, c = index.shape[r - 1].static, dims[-1].static
    if m is None or c is None:
        return "the scatter's column block or the last dim is not static"
    try:
        for j in range(r):
            comp = index.component(j)
            axis_len = index.shape[j]
            if j == r - 1:
                if comp.depends_on() - {j}:
                    return "the scatter's column index varies with the row"
                got = [comp.at({j: i}).scalar()[0] for i in range(m)]
                lo = got[0].static
                if lo is None or got != [S.Poly(lo + i) for i in range(m)] or lo < 0 or lo + m > c:
                    return f"the scatter writes columns {[str(g) for g in got]}, not one contiguous range"
                return lo, lo + m
            deps = comp.depends_on()
            if not deps:
                if axis_len != S.ONE or comp.scalar()[0] != S.Poly(0):
                    return f"the scatter's index on axis {j} is not the row's own"
            elif deps != {j}:
                return f"the scatter's index on axis {j} does not follow the row"
            elif axis_len.static is not None:
                n = axis_len.static
                if [comp.at({j: i}).scalar()[0] for i in range(n)] != [S.Poly(i) for i in range(n)]:
                    return f"the scatter's index on axis {j} moves rows"
            elif comp.scalar() != (S.Poly(0), {j: 1}):
                return f"the scatter's index on axis {j} moves rows"
    except S.Unknown as e:
        return f"the scatter's indices cannot be followed ({e})"
    return "the scatter's indices are empty"


def _swap_perm(node: gs.Node, r: int) -> bool:
    perm = [int(v) for v in node.attrs.get("perm", [])]
    want = list(range(r))
    want[0], want[-1] = r - 1, 0
    return node.op == "Transpose" and perm == want


def column_scatter(graph, node: gs.Node) -> ColumnScatter | str:
    """Read a ScatterND as "data with columns [lo, hi) of the last axis replaced", or say why not."""
    if node.op != "ScatterND" or len(node.inputs) != 3 or node.attrs.get("reduction", "none") not in ("none", b"none"):
        return "not a plain ScatterND"
    ev = S.Evaluator()
    data, upd, out = node.inputs[0], node.inputs[2], node.outputs[0]
    dp = G.producer(data)
    r = G.rank(data)
    if r is None or r < 2:
        return "the scatter's data has no known rank of at least 2"
    if dp is not None and _swap_perm(dp, r):  # dynamo's slice_scatter: rows of the transposed tensor
        idx = G.const(node.inputs[1])
        readers = out.outputs
        up = G.producer(upd)
        if len(readers) != 1 or not _swap_perm(readers[0], r) or G.is_graph_output(graph, out):
            return "the transposed scatter is not transposed back"
        if up is None or not _swap_perm(up, r):
            return "the scatter's updates are not transposed like its data"
        if not G.private_to(graph, data, node) or not G.private_to(graph, upd, node):
            return "the scatter's transposed operands have other readers"
        if idx is None or idx.ndim != 2 or idx.shape[1] != 1 or idx.shape[0] == 0:
            return "the scatter's indices are not constant row indices"
        rows = idx.reshape(-1).astype(np.int64)
        c = _last(dp.inputs[0])
        if c is None:
            return "the scattered tensor's last dim is not known"
        rows = np.where(rows < 0, rows + c, rows)
        lo = int(rows[0])
        if not np.array_equal(rows, np.arange(lo, lo + len(rows))) or lo < 0 or lo + len(rows) > c:
            return f"the scatter writes columns {rows.tolist()}, not one contiguous range"
        return ColumnScatter(dp.inputs[0], (lo, lo + len(rows)), _unplumb(up.inputs[0], ev), readers[0].outputs[0],
                             [dp, node, readers[0], up])
    cols = _block_indices(ev, node.inputs[1], data)
    if isinstance(cols, str):
        return cols
    return ColumnScatter(data, cols, _unplumb(upd, ev), out, [node])


def _same_dims(a: gs.Tensor, b: gs.Tensor) -> bool:
    try:
        ev = S.Evaluator()
        return tuple(ev.shape(a)) == tuple(ev.shape(b))
    except S.Unknown:
        return False


def _linear(graph, t: gs.Tensor):
    """(matmul, bias_add or None, x) when t = MatMul(x, W) or Add(MatMul(x, W), b), else None."""
    lin = G.linear_of(graph, t)
    return None if lin is None else (*lin, lin[0].inputs[0])


class FoldBranchIntoSlice(Rule):
    name = "fold_branch_into_slice"
    description = "merge a linear branch (LoRA on q/v) added to a last-axis slice of a Linear's output into its columns"
    anchors = ("Add", "ScatterND")

    def match(self, node, ctx):
        if node.op == "ScatterND":
            sc = column_scatter(ctx.graph, node)
            if isinstance(sc, str):
                return None
            p = G.producer(sc.updates)
            if p is None or p.op not in ("Slice", "Split") or p.inputs[0] is not sc.data:
                return None
            if _last_axis_range(p, sc.updates) != sc.cols:
                return None
            return SelfScatter(sc)
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
        if isinstance(m, SelfScatter):
            if G.is_graph_output(ctx.graph, m.scatter.result):
                return f"'{m.scatter.result.name}' is a graph output"
            return None
        node, si, p, mm, add, x = m.add, m.side, m.split, m.matmul, m.bias, m.x
        s, other = node.inputs[si], node.inputs[1 - si]
        rng = _last_axis_range(p, s)
        if rng is None:
            return f"{p.op} is not a constant range of the last axis"
        if G.is_graph_output(ctx.graph, s) or any(r is not node and r.op != "Shape" for r in s.outputs):
            return G.fan_out_reason(ctx.graph, s) or f"'{s.name}' is read by another node"
        if any(r.op == "Shape" for r in s.outputs) and not _same_dims(s, node.outputs[0]):
            return f"'{s.name}' is read by a Shape and the sum's shape is not provably the slice's"
        t = p.inputs[0]
        if G.is_graph_output(ctx.graph, t):
            return f"'{t.name}' is a graph output"
        for r in t.outputs:  # every other reader takes other columns
            if r.op == "Shape":
                continue
            if r.op in ("ScatterND", "Transpose"):
                sn = r if r.op == "ScatterND" else (r.outputs[0].outputs[0] if len(r.outputs[0].outputs) == 1 else None)
                sc = column_scatter(ctx.graph, sn) if sn is not None and sn.op == "ScatterND" else "not a scatter"
                if isinstance(sc, str):
                    return f"'{t.name}' is read whole by {r.op} '{r.name}' ({sc})"
                if sc.data is not t or sc.cols != rng or sc.updates is not node.outputs[0]:
                    return (f"{sn.op} '{sn.name}' writes columns {sc.cols} of '{sc.data.name}' with "
                            f"'{sc.updates.name}', not the sum into {rng}")
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
        if isinstance(m, SelfScatter):
            sc = m.scatter
            for reader in list(sc.result.outputs):
                for i, t in enumerate(reader.inputs):
                    if t is sc.result:
                        reader.inputs[i] = sc.data
            names = [n.name for n in sc.nodes]
            for n in sc.nodes:
                G.remove_node(n)
            return Rewrite("", names, [], f"scatter of columns {sc.cols[0]}:{sc.cols[1]} into themselves removed")
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
        for r in list(s.outputs):  # a Shape of the slice (the exporter sizes the scatter's updates by it)
            r.inputs[0] = out
        k = next(i for i, o in enumerate(p.outputs) if o is s)
        p.outputs[k] = out
        return Rewrite("", names, [mm.name], f"branch {form.spec.cin}→{form.spec.cout} into columns {lo}:{hi}")
