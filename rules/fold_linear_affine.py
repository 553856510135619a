"""fold_linear_affine: collapse a linear region on channel-last tokens into one MatMul (or Gemm).

Transformers keep channels on the LAST axis ([B, N, C]); a Linear is MatMul(x, W[Cin, Cout]) + b.
Between two non-linearities everything is again one matrix:

    x ─ MatMul(W) ─ Add(b) ─ Flatten ─ BN1d ─ Reshape ─      LeViT's Linear+BatchNorm1d
    x ─ MatMul(W) ─ Add(b) ─ Transpose ─ BN ─ Transpose ─    BN1d on [B, C, N]
    x ─ MatMul(W) ─ Add(b) ─ Mul(γ) ─                        layer scale (CaiT, DeiT-III, ConvNeXt)
    x ─┬─ MatMul(W) ─ Add(b) ──────────────────┐
       └─ MatMul(A) ─ MatMul(B) ─ Mul(s) ──────┴─ Add ─      LoRA, unmerged
    x ─ MatMul(W1) ─ MatMul(W2) ─                            Linear∘Linear, cost model decides
    x ─┬─ MatMul(W) ─ Add(b) ─────────────────────────────────────────────┐
       └─ MatMul(A) ─ T ─ Conv1d(B, groups) ─ T ─ ScatterND(zeros) ─ Mul(s) ┴─ Add ─
                                                             loralib's MergedLinear, unmerged
  ⇒ x ─ MatMul(W') ─ Add(b') ─                               (Gemm(transB=1) when x is 2-D)

The walk is merge_linear_regions' one, on the last axis: each tensor is `spec · source` with spec
the rank-0 ConvSpec [Cout, Cin] of onnxrep.kernels, through

    MatMul / Gemm / Einsum('…i,io->…o') with a constant 2-D weight    compose(form(x), W)
    Mul/Add/Sub/Div by a constant that is 1 on all but the last axis  affine_after(form(x))
    BatchNormalization on a 2-D tensor (its axis 1 is the last)       affine_after(form(x))
    Reshape / Flatten keeping the last dim                            the same rows, regrouped
    Transpose(p) → per-channel affines on axis k → Transpose(p⁻¹)     affine on the last axis
      … a pointwise Conv (1-wide, stride 1, unpadded) when k = 1,      compose(form(x), conv)
      … a ScatterND of whole slices into zeros when k = 0             compose(form(x), P)
    ScatterND of whole last-axis rows into zeros (z[..., cols] = y)   compose(form(x), P)
    Expand that keeps the shape                                       form(x)
    Add / Sub / Sum of same-shaped tensors                            add(forms)

and stops at anything else, at a tensor another node reads (fan-out) or a graph output.

Math: with W [Cout, Cin] (MatMul writes Wᵀ), an affine y = a⊙z + c after: W' = diag(a)·W,
b' = a⊙b + c; before: W' = W·diag(a), b' = b + W·c; parallel: W' = ΣWᵢ, b' = Σbᵢ; sequential:
W' = W₂·W₁, b' = W₂·b₁ + b₂. Zero-padding y into columns `cols` of a width-C' tensor is the
placement matrix P [C', m] with P[cols[j], j] = 1 (kernels.placement_spec); a 1-wide grouped conv
is a block-diagonal matrix (kernels.pointwise_spec). A Reshape whose input and output share the
last dim C moves every row of C values unchanged (row-major), so it commutes with a per-row
linear map. The legacy exporter's run-time (row, col) indices of `z[:, cols] = y` with a symbolic
batch or token count H·W (a Range over z's own rows beside constant columns, proven with
onnxrep.symbolic to cover every row once) are the same placement.

Token mixing (TokenWalker): MatMul(W[N', N], x) with the constant on the LEFT mixes axis -2 of
x [B, N, C]; the same algebra holds on that axis, with constants of shape [N', 1], BatchNorm on
[B, N', C] (axis 1 is then W's rows) and pointwise Conv1d as the affines:

    x ─ MatMul(W_tok, ·) ─ Add(b[N', 1]) ─ BatchNormalization ─   ⇒   x ─ MatMul(W', ·) ─ Add(b') ─

Preconditions (each declines): a constant on a non-channel axis (per-token Add, axis-1 BN on
3-D tokens, unless a constant-left MatMul makes that axis the channel axis); a Reshape that changes the last dim (mixes channels with tokens); a Transpose not
undone by its partner; a non-linearity in between; a weight shared with another node; an
intermediate read outside the region or a graph output; a merged matrix that costs more than
the region (a rank-r chain x·A·B without the base branch) unless --aggressive. A Mul/Add right
after a LayerNorm/RMSNorm normalization or inside a GELU is that pattern's own (runtimes fuse
the whole pattern into one kernel): it is left alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import graph as G
from onnxrep import kernels as K
from onnxrep import linear as L
from onnxrep import patterns as P
from onnxrep import symbolic as S
from onnxrep.engine import Rewrite, Rule

MATRIX_OPS = ("MatMul", "Gemm", "Einsum")
AFFINE_OPS = ("Mul", "Add", "Sub", "Div", "BatchNormalization")
SUM_OPS = ("Add", "Sub", "Sum")
REGROUP_OPS = ("Reshape", "Flatten")
CHANNEL_OPS = ("Conv", "ScatterND", "Expand")  # between a Transpose pair (see _transposed_affines)
WALKED = frozenset(MATRIX_OPS + AFFINE_OPS + SUM_OPS + REGROUP_OPS + ("Transpose", "ScatterND", "Expand"))
MAX_DEPTH = 64


@dataclass
class Form:
    """tensor = spec · source along the last axis (rows of the leading axes regrouped at will)."""

    source: gs.Tensor
    spec: K.ConvSpec
    nodes: list = field(default_factory=list)
    tokens: bool = True  # provably the source's token axes (no Reshape, or one that restores them)


class NotLinear(Exception):
    pass


class NotPlacement(NotLinear):
    """A zero padding (ScatterND into zeros, its Expand) not provably a placement: an adapter left
    unmerged, worth a decline line wherever the walk from the sum stopped."""


def _last(t: gs.Tensor, depth: int = 0) -> int | None:
    """The size of t's last (channel) axis: from its shape, or, where shape inference lost it
    (shapes computed at run time from a dynamic batch), from the constant weight of the MatMul/Gemm
    that makes or reads it, a BN on rows, or the data operand of a per-channel affine."""
    shape = t.shape
    if shape:
        d = shape[-1]
        if isinstance(d, (int, np.integer)) and d > 0:
            return int(d)
    if depth > 8:
        return None
    n = G.producer(t)
    if n is not None and n.op in MATRIX_OPS:
        dims = matrix_dims(n)
        if dims is not None:
            return dims[1]
    if n is not None and n.op == "BatchNormalization" and G.rank(t) == 2:
        scale = G.const(n.inputs[1]) if len(n.inputs) > 1 else None
        return None if scale is None else int(scale.size)
    if n is not None and n.op in ("Mul", "Add", "Sub", "Div") and len(n.inputs) == 2:
        cd = _const_and_data(n)
        if cd is not None and cd[1].size == 1:  # a scalar keeps the shape
            return _last(cd[0], depth + 1)
    for r in t.outputs:
        if r.op == "MatMul" and r.inputs[0] is t:
            dims = matrix_dims(r)
            if dims is not None:
                return dims[0]
    return None


def matrix_dims(node: gs.Node) -> tuple[int, int] | None:
    """(Cin, Cout) of a MatMul/Gemm/Einsum with a constant 2-D weight, from the weight's shape alone
    (reading a large weight to learn its size would cost a float64 copy)."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(w, gs.Constant) or w.shape is None or len(w.shape) != 2:
        return None
    a, b = (int(d) for d in w.shape)
    if node.op == "MatMul":
        return a, b
    if node.op == "Gemm":
        return (b, a) if int(node.attrs.get("transB", 0)) else (a, b)
    if node.op == "Einsum":
        eq = node.attrs.get("equation", "")
        tr = K.einsum_matrix(eq.decode() if isinstance(eq, bytes) else eq)
        return None if tr is None else ((b, a) if tr else (a, b))
    return None


def _same_dims(a, b) -> bool:
    if a is None or b is None or len(a) != len(b):
        return False
    return all(x == y and x is not None and not (isinstance(x, str) and not x) for x, y in zip(a, b))


def _const_and_data(node: gs.Node):
    a, b = node.inputs[0], node.inputs[1]
    ca, cb = G.const(a), G.const(b)
    if (ca is None) == (cb is None):
        return None
    return (b, ca, True) if ca is not None else (a, cb, False)


def axis_affine(node: gs.Node, axis: int | None = None) -> L.Affine | str:
    """The node as y = a⊙x + c per channel on `axis` (None: the last axis) of its data input, or
    the reason it is not one. A piece of a pattern runtimes fuse whole (GELU, LayerNorm, ...) is not
    one: the same claim linear.affine_of honours (onnxrep.patterns)."""
    pattern = P.claim(node)
    if pattern is not None:
        return P.decline_reason(node, pattern)
    if node.op == "BatchNormalization":
        aff = L.affine_of(node)
        if not aff:
            return aff.reason
        r = G.rank(node.inputs[0])
        on = (r - 1 if axis is None else axis % r) if r else None
        if on != 1:
            return f"BatchNormalization normalizes axis 1 of a rank-{r} tensor, not its channel axis"
        return aff
    if node.op not in ("Mul", "Add", "Sub", "Div") or len(node.inputs) != 2:
        return f"{node.op} is not a per-channel affine op"
    cd = _const_and_data(node)
    if cd is None:
        return f"{node.op} needs exactly one constant operand"
    x, c, const_first = cd
    if not np.issubdtype(c.dtype, np.floating):
        return f"{node.op} constant is not floating point"
    r = G.rank(x)
    if r is None:
        return f"rank of '{x.name}' is unknown"
    v = K.last_axis_vector(c, r) if axis is None else K.axis_vector(c, r, axis)
    where = "the last axis" if axis is None else f"axis {axis % r}"
    if v is None:
        return f"{node.op} constant of shape {list(c.shape)} is not per-channel on {where}"
    ch = _last(x) if axis is None else x.shape[axis]
    if v.size > 1 and ch != v.size:
        return f"{node.op} constant has {v.size} channels, its input {ch} (it would broadcast)"
    v = v.astype(np.float64)
    one, zero = np.ones_like(v), np.zeros_like(v)
    if node.op == "Mul":
        return L.Affine(v, zero, x, r)
    if node.op == "Add":
        return L.Affine(one, v, x, r)
    if node.op == "Sub":
        return L.Affine(-one, v, x, r) if const_first else L.Affine(one, -v, x, r)
    if const_first:
        return "Div by a tensor is not linear"
    if np.any(v == 0):
        return "Div by a constant containing zero"
    return L.Affine(1.0 / v, zero, x, r)


def matrix_of(node: gs.Node) -> tuple[K.ConvSpec, gs.Tensor] | str:
    """A MatMul/Gemm/Einsum with a constant 2-D right operand as (spec [Cout, Cin], x)."""
    if node.op == "MatMul":
        a, w = node.inputs
        wv = G.const(w)
        if wv is None or G.const(a) is not None:
            return "MatMul's right operand is not a constant (left operand a tensor)"
        if wv.ndim != 2:
            return f"MatMul weight has rank {wv.ndim}, not 2"
        return K.matmul_spec(wv), a
    if node.op == "Gemm":
        if int(node.attrs.get("transA", 0)):
            return "Gemm with transA=1"
        wv = G.const(node.inputs[1])
        if wv is None:
            return "Gemm weight is not constant"
        c = None
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = G.const(node.inputs[2])
            if c is None:
                return "Gemm bias is not constant"
        try:
            return K.gemm_spec(wv, c, bool(int(node.attrs.get("transB", 0))),
                               float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))), node.inputs[0]
        except K.NotMergeable as e:
            return str(e)
    if node.op == "Einsum":
        if len(node.inputs) != 2:
            return "Einsum with other than two operands"
        wv = G.const(node.inputs[1])
        if wv is None or G.const(node.inputs[0]) is not None:
            return "Einsum's second operand is not a constant (first a tensor)"
        eq = node.attrs.get("equation", "")
        eq = eq.decode() if isinstance(eq, bytes) else eq
        tr = K.einsum_matrix(eq, wv.ndim)
        if tr is None:
            return f"Einsum '{eq}' is not a matrix product on the last axis"
        return K.ConvSpec(wv if tr else wv.T, None), node.inputs[0]
    return f"{node.op} is not a matrix product"


class Walker:
    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.stops: list[str] = []
        self.shape_read: list[gs.Tensor] = []  # walked through, though Shape nodes read them too
        self.placement_failed = False  # a NotPlacement stopped the walk somewhere

    # the axis the walk's matrices act on: its size, and how a decline names it
    axis_size = staticmethod(_last)
    axis_name = "channel count (last dim)"

    def leaf(self, t: gs.Tensor) -> Form:
        c = self.axis_size(t)
        if G.rank(t) is None or G.rank(t) < 2:
            raise NotLinear(f"'{t.name}' is not a tensor of rows (rank < 2)")
        if c is None:
            raise NotLinear(f"{self.axis_name} of '{t.name}' is unknown")
        dt = G.dtype_of(t)
        if dt is not None and not np.issubdtype(dt, np.floating):
            raise NotLinear(f"'{t.name}' is not floating point")
        return Form(t, K.identity(c, 0), [])  # depthwise: no C×C matrix until one is needed

    def operand(self, t: gs.Tensor, reader: gs.Node, depth: int) -> Form:
        if G.producer(t) is not None:
            if G.private_to(self.graph, t, reader):
                try:
                    return self.form(t, depth + 1)
                except (NotLinear, K.NotMergeable) as e:
                    self.stops.append(f"'{t.name}': {e}")
                    self.placement_failed |= isinstance(e, NotPlacement)
            elif _only_shape_readers_besides(self.graph, t, reader):
                # reshape_as(t) with a dynamic batch: Shape(t) reads t's shape, not its values
                try:
                    f = self.form(t, depth + 1)
                    self.shape_read.append(t)
                    return f
                except (NotLinear, K.NotMergeable) as e:
                    self.stops.append(f"'{t.name}': {e}")
            else:
                self.stops.append(G.fan_out_reason(self.graph, t) or f"'{t.name}' is read by another node")
        return self.leaf(t)

    def _affine_or_sum(self, node: gs.Node, depth: int, axis: int | None = None) -> Form:
        """An Add/Sub/Mul/Div/BN as a per-channel affine on `axis` (None: the last), else, when every
        operand is computed, a sum of forms; Sum always the latter."""
        if node.op == "Sum":
            return self._sum(node, depth)
        aff = axis_affine(node, axis)
        if not isinstance(aff, str):
            return self._affine(node, aff, depth)
        if node.op in SUM_OPS and all(G.const(i) is None for i in node.inputs):
            return self._sum(node, depth)
        raise NotLinear(aff)

    @staticmethod
    def producer(t: gs.Tensor, depth: int) -> gs.Node:
        """The node the walk continues at, or NotLinear when the region is too deep or t is a leaf."""
        if depth > MAX_DEPTH:
            raise NotLinear("region too deep")
        node = G.producer(t)
        if node is None:
            raise NotLinear("no producer")
        return node

    def form(self, t: gs.Tensor, depth: int = 0) -> Form:
        node = self.producer(t, depth)
        op = node.op
        if op in MATRIX_OPS:
            m = matrix_of(node)
            if isinstance(m, str):
                raise NotLinear(m)
            return self._compose(node, *m, depth)
        if op in AFFINE_OPS or op == "Sum":
            return self._affine_or_sum(node, depth)
        if op in REGROUP_OPS:
            return self._regroup(node, depth)
        if op == "Transpose":
            return self._transposed_affines(node, depth)
        if op == "ScatterND":
            return self._scatter(node, depth)
        if op == "Expand":
            return self._expand(node, depth)
        if op == "Concat":
            return self._concat(node, depth)
        raise NotLinear(f"{op} is not linear")

    def _concat(self, node, depth) -> Form:
        """Concat on the last axis of linear terms of one tensor and zero blocks (`r + cat([y_q,
        zeros, y_v], -1)`): each term placed at its columns (a placement matrix), summed. Concat
        does not broadcast, so every piece has the output's rows."""
        out = node.outputs[0]
        r, width = G.rank(out), _last(out)
        if r is None or width is None or int(node.attrs.get("axis", 0)) % r != r - 1:
            raise NotLinear("Concat is not on the last axis")
        terms, specs, lo = [], [], 0
        for t in node.inputs:
            c = _last(t)
            if c is None:
                raise NotLinear(f"the last dim of '{t.name}' is unknown")
            v = G.const(t)
            if v is not None and np.any(v != 0):
                raise NotLinear(f"Concat of a non-zero constant '{t.name}'")
            if v is None and not _zeros(t):  # zeros: also ConstantOfShape(Shape(y)) with a symbolic batch
                f = self.operand(t, node, depth)
                terms.append(f)
                specs.append(K.compose(f.spec, K.placement_spec(np.arange(lo, lo + c), width)))
            lo += c
        if not terms:
            raise NotLinear("Concat of constants only")
        if len({id(f.source) for f in terms}) != 1:
            raise NotLinear("terms of the Concat read different tensors")
        nodes = [n for f in terms for n in f.nodes]
        if len({id(n) for n in nodes}) != len(nodes):
            raise NotLinear("terms of the Concat share nodes")
        return Form(terms[0].source, K.add(specs) if len(specs) > 1 else specs[0], nodes + [node],
                    all(f.tokens for f in terms))

    def _compose(self, node, spec: K.ConvSpec, x, depth) -> Form:
        if _last(x) != spec.cin:
            raise NotLinear(f"{node.op} reads {_last(x)} channels on the last axis, its weight {spec.cin}")
        inner = self.operand(x, node, depth)
        if not inner.nodes:
            return Form(inner.source, spec, [node], inner.tokens)
        return Form(inner.source, K.compose(inner.spec, spec), inner.nodes + [node], inner.tokens)

    def _affine(self, node, aff: L.Affine, depth) -> Form:
        inner = self.operand(aff.x, node, depth)
        cout = inner.spec.cout
        if aff.scale.size not in (1, cout) or aff.shift.size not in (1, cout):
            raise NotLinear("affine channel count mismatch")
        a, c = aff.broadcast(cout)
        return Form(inner.source, K.affine_after(inner.spec, a, c, inplace=True), inner.nodes + [node], inner.tokens)

    def _sum(self, node, depth) -> Form:
        out = node.outputs[0]
        signs = [1.0] * len(node.inputs)
        if node.op == "Sub":
            signs[1] = -1.0
        terms = [(self.operand(t, node, depth), s) for t, s in zip(node.inputs, signs)]
        if any(not _same_dims(i.shape, out.shape) and not f.tokens for i, (f, _) in zip(node.inputs, terms)):
            # a term without a Reshape, or whose last Reshape restores the source's token axes, has the
            # source's shape (MatMul and last-axis affines keep the leading axes); otherwise only
            # known equal shapes are safe
            raise NotLinear(f"{node.op} may broadcast its terms (shapes not provably equal)")
        if len({id(f.source) for f, _ in terms}) != 1:
            names = ", ".join(sorted({f"'{f.source.name}'" for f, _ in terms}))
            raise NotLinear(f"terms of the sum read different tensors ({names})")
        specs = [f.spec if s > 0 else K.affine_after(f.spec, -1.0, 0.0) for f, s in terms]
        seen, nodes = set(), []
        for f, _ in terms:
            for n in f.nodes:
                if id(n) not in seen:
                    seen.add(id(n))
                    nodes.append(n)
        return Form(terms[0][0].source, K.add(specs), nodes + [node], all(f.tokens for f, _ in terms))

    def _regroup(self, node, depth) -> Form:
        x, y = node.inputs[0], node.outputs[0]
        cx, cy = _last(x), _last(y)
        if cx is None or cy is None or cx != cy:
            raise NotLinear(f"{node.op} changes the last axis ({_last(x)} → {_last(y)}): it mixes channels and tokens")
        inner = self.operand(x, node, depth)
        return Form(inner.source, inner.spec, inner.nodes + [node], _restores(node, inner))

    def _transposed_affines(self, outer: gs.Node, depth) -> Form:
        """Transpose(p) → ops on the axis p took the last axis to → Transpose back: per-channel
        affines on that axis, a pointwise (1×1, stride 1, unpadded) Conv when it is axis 1, a
        ScatterND placing whole slices along it when it is axis 0 (zero-padding by index
        assignment), an Expand that keeps the shape. Each is a matrix on the channel axis."""
        r = G.rank(outer.inputs[0])
        perm2 = outer.attrs.get("perm")
        if r is None or perm2 is None:
            raise NotLinear("Transpose rank or perm unknown")
        chain, t = [], outer.inputs[0]
        while True:
            n = G.producer(t)
            if n is None or not G.private_to(self.graph, t, chain[-1] if chain else outer):
                raise NotLinear("Transpose is not the second of a private Transpose pair around affines")
            if n.op == "Transpose":
                inner_t = n
                break
            if n.op not in AFFINE_OPS + CHANNEL_OPS:
                raise NotLinear(f"{n.op} between a Transpose pair is not a per-channel affine")
            chain.append(n)
            if n.op in CHANNEL_OPS:
                t = n.inputs[2] if n.op == "ScatterND" else n.inputs[0]
                continue
            cd = _const_and_data(n) if n.op != "BatchNormalization" else (n.inputs[0], None, False)
            if cd is None:
                raise NotLinear(f"{n.op} between a Transpose pair has no constant operand")
            t = cd[0]
        perm1 = inner_t.attrs.get("perm")
        if perm1 is None or len(perm1) != r or any(perm1[p] != i for i, p in enumerate(perm2)):
            raise NotLinear("the Transpose pair does not undo itself")
        k = list(perm1).index(r - 1)  # where the channel axis lies between the two
        x = inner_t.inputs[0]
        c = _last(x)
        if c is None:
            raise NotLinear(f"channel count (last dim) of '{x.name}' is unknown")
        spec = K.identity(c, 0)
        for n in reversed(chain):  # innermost first
            if n.op in CHANNEL_OPS:
                m = channel_matrix(n, k)
                if isinstance(m, str):
                    raise (NotPlacement if n.op != "Conv" else NotLinear)(m)
                if m is not None:
                    if m.cin != spec.cout:
                        raise NotLinear(f"{n.op} reads {m.cin} channels, its input has {spec.cout}")
                    spec = K.compose(spec, m)
                continue
            aff = axis_affine(n, k)
            if isinstance(aff, str):
                raise NotLinear(aff)
            a, b = aff.broadcast(spec.cout)
            spec = K.affine_after(spec, a, b)
        inner = self.operand(x, inner_t, depth)
        spec = K.compose(inner.spec, spec)
        return Form(inner.source, spec, inner.nodes + [inner_t] + list(reversed(chain)) + [outer], inner.tokens)

    def _scatter(self, node, depth) -> Form:
        """ScatterND of whole last-axis rows into zeros (`z[..., cols] = y`): a placement matrix;
        or a whole-range copy (dynamo's `slice_scatter(z, y)` over Range(0, rows of z)): y itself."""
        copy = whole_copy(node)
        if copy is True:
            inner = self.operand(node.inputs[2], node, depth)
            return Form(inner.source, inner.spec, inner.nodes + [node], inner.tokens)
        m = channel_matrix(node, None)
        if isinstance(m, str) or m is None:
            raise NotPlacement(f"{m or 'ScatterND is not a placement'} (as a whole-range copy: {copy})")
        inner = self.operand(node.inputs[2], node, depth)
        if inner.spec.cout != m.cin:
            raise NotLinear(f"ScatterND places {m.cin} columns, its updates have {inner.spec.cout}")
        return Form(inner.source, K.compose(inner.spec, m), inner.nodes + [node], inner.tokens)

    def _expand(self, node, depth) -> Form:
        m = channel_matrix(node, None)
        if m is not None:
            raise NotPlacement(m if isinstance(m, str) else "Expand changes the shape")
        inner = self.operand(node.inputs[0], node, depth)
        return Form(inner.source, inner.spec, inner.nodes + [node], inner.tokens)


def _second_last(t: gs.Tensor) -> int | None:
    """The size of t's axis -2 (the rows a constant-left MatMul mixes): from its shape, or from the
    constant left operand of the MatMul that makes it."""
    shape = t.shape
    if shape and len(shape) >= 2 and isinstance(shape[-2], (int, np.integer)) and shape[-2] > 0:
        return int(shape[-2])
    n = G.producer(t)
    if n is not None and n.op == "MatMul" and isinstance(n.inputs[0], gs.Constant) and n.inputs[0].shape is not None \
            and len(n.inputs[0].shape) == 2:
        return int(n.inputs[0].shape[0])
    return None


def _left_matrix(node: gs.Node) -> gs.Constant | None:
    """W when node is MatMul(W, x) with a constant 2-D W and a tensor x (token mixing, W_tok·X)."""
    if node.op != "MatMul":
        return None
    w, x = node.inputs
    if not isinstance(w, gs.Constant) or w.shape is None or len(w.shape) != 2 or G.const(x) is not None:
        return None
    return w


class TokenWalker(Walker):
    """The walk on axis -2 (tokens of [B, N, C] mixed by a constant on the LEFT, MLP-Mixer's
    W_tok·X): MatMul(W[N', N], x) is the matrix W on that axis, a constant of shape [N', 1] (or a
    BatchNormalization on [B, N', C], whose axis 1 is then this axis, or the pointwise Conv1d that
    merge_linear_regions makes of such affines) is per row, sums add. No Reshape, Transpose or
    scatter is walked: a region of these keeps the source's other axes."""

    axis_size = staticmethod(_second_last)
    axis_name = "row count (axis -2)"

    def form(self, t: gs.Tensor, depth: int = 0) -> Form:
        node = self.producer(t, depth)
        op = node.op
        w = _left_matrix(node)
        if w is not None:
            x = node.inputs[1]
            if G.rank(x) is None or G.rank(x) < 2 or _second_last(x) != int(w.shape[1]):
                raise NotLinear(f"MatMul's constant left operand mixes {int(w.shape[1])} rows, its input has {_second_last(x)}")
            spec = K.ConvSpec(np.asarray(G.const(w), dtype=np.float64), None)
            inner = self.operand(x, node, depth)
            if not inner.nodes:
                return Form(inner.source, spec, [node])
            return Form(inner.source, K.compose(inner.spec, spec), inner.nodes + [node])
        if op == "Conv" and G.rank(t) == 3:  # [B, N, C]: the Conv's channel axis 1 is this axis
            m = channel_matrix(node, 1)
            if isinstance(m, str) or m is None:
                raise NotLinear(m or "Conv is not a matrix")
            inner = self.operand(node.inputs[0], node, depth)
            if inner.spec.cout != m.cin:
                raise NotLinear(f"Conv reads {m.cin} rows, its input has {inner.spec.cout}")
            return Form(inner.source, K.compose(inner.spec, m), inner.nodes + [node])
        if op in AFFINE_OPS or op == "Sum":
            return self._affine_or_sum(node, depth, -2)
        raise NotLinear(f"{op} is not linear on the token axis")


def _left_matmul_above(node: gs.Node, limit: int = 24) -> bool:
    """Whether a constant-left MatMul lies among the first `limit` data producers above `node`
    (the token walk is worth trying)."""
    seen, stack = set(), [node]
    while stack and len(seen) < limit:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if _left_matrix(n) is not None:
            return True
        stack.extend(G.producer(i) for i in n.inputs if G.producer(i) is not None and G.const(i) is None)
    return False


def _zeros(t: gs.Tensor, depth: int = 0) -> bool:
    """Whether t is all zeros (ScatterND's data when a tensor is zero-padded): a constant, a
    ConstantOfShape of 0 (its shape computed at run time), or a Transpose/Reshape/Expand of one."""
    v = G.const(t)
    if v is not None:
        return not np.any(v)
    n = G.producer(t)
    if n is None or depth > 4:
        return False
    if n.op == "ConstantOfShape":
        value = n.attrs.get("value")
        return value is None or not np.any(value.values if isinstance(value, gs.Constant) else value)
    return n.op in ("Transpose", "Reshape", "Expand", "Unsqueeze", "CastLike") and _zeros(n.inputs[0], depth + 1)


def _runtime_columns(node: gs.Node) -> np.ndarray | str:
    """The columns of a ScatterND into a 2-D [R, C'] whose (row, column) indices the legacy exporter
    computes at run time for `z[:, cols] = y` with a symbolic R (batch, or a token count H·W):

        Concat(Unsqueeze(Expand(Reshape(Range(0, Shape(z)[0], 1), [-1, 1]), ·), -1),
               Unsqueeze(Expand(cols, ·), -1), axis=-1)

    proven with onnxrep.symbolic for every value of the symbolic dims: indices[r, j] = (r, cols[j])
    for every row r < R, the indices and the updates having z's row count R (otherwise an Expand
    could broadcast a one-row Range and write every update into row 0). The reason otherwise."""
    data, idx, upd = node.inputs
    if G.rank(data) != 2 or G.rank(upd) != 2:
        return "ScatterND with run-time indices into a tensor that is not 2-D"
    ev = S.Evaluator()
    try:
        index, rows, urows = ev.value(idx), ev.shape(data)[0], ev.shape(upd)[0]
    except S.Unknown as e:
        return f"ScatterND's run-time indices cannot be followed ({e})"
    if index.rank != 3 or index.shape[2] != S.Poly(2) or index.shape[1].static is None:
        return "ScatterND's run-time indices are not one (row, column) pair per update"
    if index.shape[0] != rows or urows != rows:
        return (f"ScatterND's indices and updates have {index.shape[0]} and {urows} rows, its data {rows}: "
                "not provably the same for every value of the symbolic dims")
    try:
        row, col = index.component(0), index.component(1)
        if row.depends_on() != {0} or (rows.static is None and row.scalar() != (S.Poly(0), {0: 1})) or (
                rows.static is not None
                and [row.at({0: i}).scalar()[0] for i in range(rows.static)] != [S.Poly(i) for i in range(rows.static)]):
            return "ScatterND's run-time row index is not each row's own"
        if col.depends_on() - {1}:
            return "ScatterND's run-time column index varies with the row"
        cols = [col.at({1: j}).scalar()[0].static for j in range(index.shape[1].static)]
    except S.Unknown as e:
        return f"ScatterND's run-time indices cannot be followed ({e})"
    if any(c is None for c in cols):
        return "ScatterND's run-time columns depend on the symbolic dims"
    return np.asarray(cols, dtype=np.int64)


def whole_copy(node: gs.Node) -> bool | str:
    """Whether ScatterND(data, indices, updates) returns `updates`, for every value of the symbolic
    dims (onnxrep.symbolic): indices[i_0, ..., i_{k-1}] = (i_0, ..., i_{k-1}) over the whole of the
    data's first k axes, and updates provably of the data's shape. The reason otherwise."""
    if G.const(node.inputs[1]) is not None and G.static_shape(node.inputs[0]) is None:
        return "constant indices into a tensor of symbolic shape"
    ev = S.Evaluator()
    try:
        index, dims, udims = ev.value(node.inputs[1]), ev.shape(node.inputs[0]), ev.shape(node.inputs[2])
    except S.Unknown as e:
        return f"ScatterND's indices cannot be followed ({e})"
    if not S.whole_copy(index, dims):
        return "ScatterND does not write every element"
    if tuple(udims) != tuple(dims):
        return f"ScatterND's updates {[str(d) for d in udims]} are not provably of its data's shape {[str(d) for d in dims]}"
    return True


def _keeps_shape(node: gs.Node) -> bool:
    """An Expand whose target, computed at run time, provably broadcasts nothing: its input's dims
    for every value of the symbolic dims (onnxrep.symbolic), so it is the identity."""
    ev = S.Evaluator()
    try:
        dims = ev.shape(node.inputs[0])
        return S.broadcast_dims([dims, tuple(ev._target(node.inputs[1]))]) == tuple(dims)
    except S.Unknown:
        return False


def channel_matrix(node: gs.Node, axis: int | None) -> K.ConvSpec | str | None:
    """A Conv / ScatterND / Expand acting on channel `axis` (None: the last axis) as the rank-0
    spec it applies to every position, None for an Expand that keeps the shape (the identity),
    or the reason it is neither."""
    if node.op == "Expand":
        s_in, shape = G.static_shape(node.inputs[0]), G.const(node.inputs[1])
        if (s_in is None or shape is None) and _keeps_shape(node):
            return None
        if s_in is None or shape is None:
            return "Expand to a shape not provably its input's (it could broadcast)"
        want = [int(v) for v in shape.reshape(-1)]
        if len(want) > len(s_in) or any(w not in (1, d) for w, d in zip(want[::-1], s_in[::-1])):
            return "Expand changes the shape"
        return None
    if node.op == "Conv":
        r = G.rank(node.inputs[0])
        if axis is None or r is None or axis % r != 1:
            return "Conv acts on axis 1, not the channel axis"
        w = G.const(node.inputs[1])
        b = G.const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        if w is None or (len(node.inputs) > 2 and node.inputs[2].name and b is None):
            return "Conv weight or bias is not constant"
        if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET", "VALID", b"VALID"):
            return "Conv with auto_pad"
        try:
            return K.pointwise_spec(w, b, int(node.attrs.get("group", 1)), node.attrs.get("strides", ()),
                                    node.attrs.get("pads", ()))
        except K.NotMergeable as e:
            return str(e)
    if node.op == "ScatterND":
        red = node.attrs.get("reduction", "none")
        if (red.decode() if isinstance(red, bytes) else red) != "none":
            return "ScatterND with a reduction"
        data, idx = node.inputs[0], G.const(node.inputs[1])
        if not _zeros(data):
            return "ScatterND does not write into zeros"
        r = G.rank(data)
        if r is None:
            return "ScatterND's data has an unknown rank"
        if idx is None and not ((axis is None or axis % r == r - 1) and r == 2):
            return "ScatterND does not write into zeros at constant indices"
        if idx is None:
            cols = _runtime_columns(node)
            if isinstance(cols, str):
                return cols
            d1 = (data.shape or [None, None])[-1]
            cout = int(d1) if isinstance(d1, (int, np.integer)) and d1 > 0 else None
            if _last(node.inputs[2]) != len(cols):
                return f"ScatterND places {len(cols)} columns, its updates have {_last(node.inputs[2])}"
        elif axis is None or axis % r == r - 1:
            d_shape, u_shape = G.static_shape(data), G.static_shape(node.inputs[2])
            cols = None if d_shape is None or u_shape is None else K.scatter_columns(idx, u_shape, d_shape)
            cout = None if d_shape is None else d_shape[-1]
        elif axis % r == 0:
            # only the channel count has to be known (scatter_rows: ScatterND checks the rest)
            cols = K.scatter_rows(idx, G.rank(node.inputs[2]), r)
            d0 = (data.shape or [None])[0]
            cout = int(d0) if isinstance(d0, (int, np.integer)) and d0 > 0 else None
        else:
            cols = cout = None
        if cols is None or cout is None:
            return "ScatterND does not place whole slices along the channel axis"
        try:
            return K.placement_spec(cols, cout)
        except K.NotMergeable as e:
            return str(e)
    return f"{node.op} is not a channel map"


def _restores(node: gs.Node, inner: Form) -> bool:
    """Whether the Reshape `node` provably gives its output the source's token axes: a constant
    shape that restores them (_restores_token_axes; rows are never regrouped across a kept last
    axis, so its -1 is the source's dim)."""
    if node.op != "Reshape" or len(node.inputs) < 2 or int(node.attrs.get("allowzero", 0)):
        return False
    shape = G.const(node.inputs[1])
    if shape is None or shape.ndim != 1 or shape.size == 0 or np.any(shape == 0):
        return False
    return _restores_token_axes(inner.source, shape, int(shape[-1]))


def _escapes(graph, nodes, root_out, shape_read=()) -> str | None:
    """Whether an intermediate is a graph output or read outside the region (a Shape node reading
    a tensor of `shape_read` excepted: it is moved to the region's output, which has that shape)."""
    inside = {id(n) for n in nodes}
    shaped = {id(t) for t in shape_read}
    for n in nodes:
        for o in n.outputs:
            if o is root_out or not (o.outputs or G.is_graph_output(graph, o)):
                continue
            if G.is_graph_output(graph, o):
                return f"intermediate '{o.name}' is a graph output"
            if any(id(r) not in inside and not (_meta_reader(r, o) and id(o) in shaped) for r in o.outputs):
                return f"intermediate '{o.name}' is read outside the region"
    return None


def _feeds_only(graph, node: gs.Node, inside: set, limit: int = 64) -> bool:
    """Whether everything computed from `node` ends in nodes of the region (`inside`, by id): no
    graph output and no other node depends on it, so the region's removal leaves it dead."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if len(seen) > limit:
            return False
        for o in n.outputs:
            if G.is_graph_output(graph, o):
                return False
            stack.extend(r for r in o.outputs if id(r) not in inside)
    return True


def _only_shape_readers_besides(graph, t: gs.Tensor, reader: gs.Node) -> bool:
    others = [r for r in t.outputs if r is not reader]
    return (not G.is_graph_output(graph, t) and any(r is reader for r in t.outputs) and bool(others)
            and all(_meta_reader(r, t) for r in others))


def _meta_reader(r: gs.Node, t: gs.Tensor) -> bool:
    """A reader of t's shape (Shape) or dtype only (CastLike's target: dynamo-noopt's new_zeros is
    CastLike(ConstantOfShape(...), y)), none of its values."""
    return r.op == "Shape" or (r.op == "CastLike" and len(r.inputs) == 2 and r.inputs[1] is t and r.inputs[0] is not t)


def _shape_of(root: gs.Node) -> gs.Tensor | None:
    """t when `root` is Reshape(y, Shape(t)) (PyTorch's reshape_as(t), dynamic shapes)."""
    if root.op != "Reshape" or len(root.inputs) < 2:
        return None
    sh = G.producer(root.inputs[1])
    if sh is None or sh.op != "Shape" or sh.attrs.get("start") not in (None, 0) or "end" in sh.attrs:
        return None
    return sh.inputs[0]


def _same_shape_as_out(region, t: gs.Tensor) -> bool:
    """Whether `t` provably has the region output's shape, so Shape(t) may read the output instead."""
    return _shape_of(region.root) is t or (G.static_shape(t) is not None and _same_dims(t.shape, region.out.shape))


def _row_cost(n: gs.Node, axis: int = -1) -> int:
    """MACs plus elements read and written per row (token) of a region's node: every node of the
    region sees the same rows, regrouped, so per-row costs compare regions whatever the batch and
    token counts (which may be unknown here). As merge_linear_regions.node_cost, per row."""
    if n.op in REGROUP_OPS:
        return 0  # a view at run time
    chan = _last if axis == -1 else _second_last
    out = chan(n.outputs[0]) or 1
    if n.op in MATRIX_OPS:
        left = _left_matrix(n) if axis == -2 else None
        dims = (int(left.shape[1]), int(left.shape[0])) if left is not None else matrix_dims(n)
        cin = dims[0] if dims is not None else out
        return cin * out + cin + out
    reads = sum(chan(i) or out for i in n.inputs if not isinstance(i, gs.Constant))
    return out + out + reads


def _merged_row_cost(spec: K.ConvSpec) -> int:
    cost = spec.cin * spec.cout + spec.cin + spec.cout
    return cost + 3 * spec.cout if np.any(spec.bias != 0) else cost


@dataclass
class Region:
    root: gs.Node
    out: gs.Tensor
    form: Form | None
    why_not: str | None = None
    shape: np.ndarray | None = None  # what the merged MatMul's output is reshaped to (_out_shape)
    shape_read: list = field(default_factory=list)  # intermediates Shape nodes read (Walker.shape_read)
    dead_shape: list = field(default_factory=list)  # of those, the ones whose Shape only feeds the region
    axis: int = -1  # the channel axis: -1, or -2 for a token-mixing region (TokenWalker)


class FoldLinearAffine(Rule):
    name = "fold_linear_affine"
    description = ("fold per-channel affines (BN1d in Reshape/Transpose pairs, layer scale, bias), parallel "
                   "(LoRA) and sequential MatMuls on channel-last tokens into one MatMul")
    anchors = MATRIX_OPS + AFFINE_OPS + ("Sum", "Reshape", "Flatten", "Transpose", "Conv")
    outputs_first = True

    def match(self, node, ctx):
        out = node.outputs[0]
        if not out.shape or G.rank(out) is None or G.rank(out) < 2:
            return None
        if not any(G.producer(i) is not None and G.producer(i).op in WALKED for i in node.inputs):
            return None  # a region of one op
        if _plain_linear(ctx.graph, node):
            return None  # a Linear as exported, nothing foldable around it: skip reading its weight
        if _left_matmul_above(node):
            token = self._token_region(node, out, ctx)
            if token is not None or node.op == "Conv":
                return token
        if node.op == "Conv":
            return None  # a Conv ends a region only on the token axis (a pointwise Conv1d on [B, N, C])
        walker = Walker(ctx.graph)
        try:
            form = walker.form(out)
        except (NotLinear, K.NotMergeable) as e:
            # a zero padding the walk could not read as a placement (an adapter left unmerged) is
            # worth a decline line too, wherever the walk from the sum stopped
            if _near_miss(node) or "runtimes fuse" in str(e) or walker.placement_failed:
                stops = "; ".join(dict.fromkeys(walker.stops))
                return Region(node, out, None, f"{e}" + (f" (walk stopped: {stops})" if stops else ""))
            return None
        if len(form.nodes) < 2 or not any(n.op in MATRIX_OPS for n in form.nodes):
            fused = [s for s in walker.stops if "runtimes fuse" in s]
            return Region(node, out, None, fused[0]) if fused else None
        if _already_deploy(form.nodes):
            return None  # what this rule would write: a fixed point
        return Region(node, out, form, shape_read=list(walker.shape_read))

    def _token_region(self, node, out, ctx):
        walker = TokenWalker(ctx.graph)
        try:
            form = walker.form(out)
        except (NotLinear, K.NotMergeable) as e:
            return Region(node, out, None, f"{e}", axis=-2) if node.op == "BatchNormalization" else None
        if len(form.nodes) < 2 or not any(_left_matrix(n) is not None for n in form.nodes) or _already_deploy(form.nodes):
            return None
        return Region(node, out, form, axis=-2)

    def check(self, region: Region, ctx):
        if region.form is None:
            return region.why_not
        form = region.form
        inside = {id(n) for n in form.nodes}
        region.shape_read = [t for t in region.shape_read if id(G.producer(t)) in inside]
        reason = _escapes(ctx.graph, form.nodes, region.out, region.shape_read)
        if reason:
            return reason
        region.dead_shape = []
        for t in region.shape_read:
            if any(r.op == "CastLike" for r in t.outputs) and G.dtype_of(t) != G.dtype_of(form.source):
                return f"'{t.name}' is the dtype of a CastLike and not of the region's input's type"
            if not any(r.op == "Shape" for r in t.outputs) or _same_shape_as_out(region, t):
                continue
            if all(_feeds_only(ctx.graph, r, inside) for r in t.outputs if r.op == "Shape"):
                region.dead_shape.append(t)  # its shape only sizes the region's own zeros/indices
                continue
            return f"'{t.name}' is read by a Shape node and the region's output may differ in shape"
        for n in form.nodes:
            if n.op in MATRIX_OPS:
                r = G.shared_constant_reason(n.inputs[0 if _left_matrix(n) is not None else 1])
                if r:
                    return r
        region.shape = _out_shape(region)
        if region.shape is None and not _reshaped_again(ctx.graph, region.out):
            return "the region regroups the token axes and the output shape is not static"
        before = sum(_row_cost(n, region.axis) for n in form.nodes if not _free_affine(n, form.nodes, region.axis))
        after = _merged_row_cost(form.spec)
        if after > before and not ctx.options.aggressive:
            return (f"merged MatMul would cost more ({after:,} vs {before:,} MACs+elements moved per token); "
                    "--aggressive merges anyway")
        return None

    def rewrite(self, region: Region, ctx):
        form, out = region.form, region.out
        out_shape = region.shape if region.shape is not None else _out_shape(region)  # reads the root
        spec = K.regroup(form.spec, 1)
        src = form.source
        dtype = L.data_dtype(*[t for n in form.nodes for t in n.inputs[1:]], out)
        names = [n.name for n in form.nodes]
        main = next((n for n in form.nodes if n.op in MATRIX_OPS), form.nodes[-1]).name
        main = main or G.unique_node_name(ctx.graph, "onnxrep_matmul")
        dead = {id(t) for t in region.dead_shape}
        for t in region.shape_read:
            for r in [r for r in t.outputs if r.op == "CastLike" and _meta_reader(r, t)]:
                r.inputs[1] = src  # the same dtype (checked), and upstream of the region: no cycle
            for r in [r for r in t.outputs if r.op == "Shape"]:
                # same shape (_same_shape_as_out), or a value only the removed region used (it dies
                # with it; reading the source keeps the graph well formed until cleanup)
                r.inputs[0] = src if id(t) in dead else out
        for n in form.nodes:
            G.remove_node(n)
        g = ctx.graph
        if region.axis == -2:
            return _rewrite_token_mixing(g, spec, src, out, dtype, main, names)
        if G.rank(src) == 2 and G.rank(out) == 2:
            node = L.make_conv(g, spec, src, out, dtype, main)
            return Rewrite("", names, [node.name], f"{len(names)} ops → Gemm {spec.cin}→{spec.cout}")
        created = []
        reshape = out_shape is None or out_shape.size > 0
        has_bias = bool(np.any(spec.bias != 0))
        final_dims = list(src.shape[:-1]) + [spec.cout]
        mm_out = out if not (has_bias or reshape) else G.new_variable(g, f"{main}_mm", dtype=out.dtype, shape=final_dims)
        w = G.new_weight(g, f"{main}.weight", K.matmul_weight(spec), dtype)
        g.nodes.append(gs.Node("MatMul", main, {}, [src, w], [mm_out]))
        created.append(main)
        cur = mm_out
        if has_bias:
            nxt = out if not reshape else G.new_variable(g, f"{main}_biased", dtype=out.dtype, shape=final_dims)
            b = G.new_weight(g, f"{main}.bias", spec.bias, dtype)
            name = G.unique_node_name(g, f"{main}_bias")
            g.nodes.append(gs.Node("Add", name, {}, [cur, b], [nxt]))
            created.append(name)
            cur = nxt
        if reshape and _reshaped_again(g, out):
            out.outputs[0].inputs[0] = cur  # Reshape∘Reshape is the outer Reshape: no second one
        elif reshape:
            shape = G.new_constant(g, f"{main}_shape", out_shape)
            name = G.unique_node_name(g, f"{main}_reshape")
            g.nodes.append(gs.Node("Reshape", name, {}, [cur, shape], [out]))
            created.append(name)
        return Rewrite("", names, created, f"{len(names)} ops → MatMul {spec.cin}→{spec.cout}")


def _out_shape(region: Region) -> np.ndarray | None:
    """The shape to Reshape the merged MatMul's output to: empty when the source's token axes are
    the output's (no Reshape); the output's static shape; or, with dynamic dims, the constant shape
    of the region's own final Reshape (without 0s, which would copy dims of a different input).
    None when there is none."""
    src, out = region.form.source, region.out
    twin = _shape_of(region.root)
    if region.form.tokens:
        return np.zeros(0, dtype=np.int64)  # MatMul, last-axis affines and sums keep the token axes
    if _same_dims(src.shape[:-1], out.shape[:-1]) or (
            twin is not None and id(G.producer(twin)) in {id(n) for n in region.form.nodes}
            and G.producer(twin).op in ("MatMul", "Einsum") and _same_dims(src.shape[:-1], twin.shape[:-1])):
        # (reshape_as a MatMul output of the region: the output has the source's token axes)
        return np.zeros(0, dtype=np.int64)
    static = G.static_shape(out)
    if static is not None:
        return np.asarray(static, dtype=np.int64)
    root = region.root
    if root.op == "Reshape" and root.outputs[0] is out and not int(root.attrs.get("allowzero", 0)):
        shape = G.const(root.inputs[1])
        if shape is not None and shape.ndim == 1 and not np.any(shape == 0):
            if _restores_token_axes(src, shape, region.form.spec.cout):
                return np.zeros(0, dtype=np.int64)
            return np.asarray(shape, dtype=np.int64)
    return None


def _restores_token_axes(src: gs.Tensor, shape: np.ndarray, cout: int) -> bool:
    """Whether Reshape(·, shape) of the merged MatMul's output (src's token axes, then cout) leaves
    it as it is: same rank, last entry cout, one -1 (what a dynamic dim's shape arithmetic folds
    to) and every other entry equal to src's static dim there. The element count then makes the -1
    src's dim at that position. (LeViT's reshape_as after BN1d on [B·N, C], dynamic B.)"""
    dims = list(src.shape or [])[:-1]
    want = [int(v) for v in shape.reshape(-1)]
    if not want or want.pop() != cout or len(dims) != len(want) or want.count(-1) != 1:
        return False
    i = want.index(-1)
    return all(isinstance(d, (int, np.integer)) and d > 0 and int(d) == w
               for j, (d, w) in enumerate(zip(dims, want)) if j != i)


def _reshaped_again(graph, out: gs.Tensor) -> bool:
    """Whether `out`'s only reader is a Reshape to a constant shape without 0s (which would copy
    dims of its own input): reshaping to `out` first is then redundant (dynamo writes LeViT's
    reshape_as and the head split that follows it as one such Reshape)."""
    if G.is_graph_output(graph, out) or len(out.outputs) != 1:
        return False
    r = out.outputs[0]
    if r.op != "Reshape" or r.inputs[0] is not out or int(r.attrs.get("allowzero", 0)):
        return False
    shape = G.const(r.inputs[1]) if len(r.inputs) > 1 else None
    return shape is not None and shape.ndim == 1 and not np.any(shape == 0)


def _plain_linear(graph, node: gs.Node) -> bool:
    """Structurally, whether the walk from `node` can only find a Linear as exported: `node` is a
    MatMul/Gemm, or a bias Add (constant operand) right after one, and the matrix op's input is
    not something the walk could take in (its producer is not walked, or others read it)."""
    mm = node
    if node.op in ("Add",) and len(node.inputs) == 2:
        cd = _const_and_data(node)
        if cd is None:
            return False
        mm = G.producer(cd[0])
        if mm is None or not G.private_to(graph, cd[0], node):
            return False
    if mm.op not in ("MatMul", "Gemm"):
        return False
    x = mm.inputs[0]
    up = G.producer(x)
    return up is None or up.op not in WALKED or not G.private_to(graph, x, mm)


def _already_deploy(nodes) -> bool:
    """A chain [MatMul or Gemm] → [bias Add] → [Reshape]: the form this rule writes (a Linear as
    exporters write it), so rewriting it again would change nothing."""
    ops = [n.op for n in nodes]
    if ops[0] not in ("MatMul", "Gemm"):
        return False
    rest = ops[1:]
    if rest and rest[0] == "Add":
        rest = rest[1:]
    if rest and rest[0] == "Reshape":
        rest = rest[1:]
    if rest:
        return False
    return all(any(i is a.outputs[0] for i in b.inputs) for a, b in zip(nodes, nodes[1:]))


def _near_miss(node: gs.Node) -> bool:
    """Whether a failed walk from `node` is worth a decline line: a BN, an affine by a constant
    right after a matrix product or a regrouping, or a regrouping right after an affine. (A
    residual Add or an attention reshape failing is the normal case, not a near miss.)"""
    ups = [G.producer(i) for i in node.inputs[:1] if i is not None]
    up = ups[0] if ups else None
    if node.op == "BatchNormalization":  # on tokens (a conv's BN is other rules' business)
        return up is not None and up.op in MATRIX_OPS + REGROUP_OPS + ("Transpose",)
    if node.op in ("Add", "Sub") and len(node.inputs) == 2 and any(
            G.producer(i) is not None and G.producer(i).op == "Concat" for i in node.inputs):
        return True  # r + cat([y_q, zeros, y_v], -1): an adapter spelled out of place
    if node.op in ("Mul", "Add", "Sub", "Div"):
        cd = _const_and_data(node) if len(node.inputs) == 2 else None
        u = G.producer(cd[0]) if cd else None
        return u is not None and u.op in MATRIX_OPS + REGROUP_OPS + ("Transpose",)
    if node.op in REGROUP_OPS + ("Transpose",):
        return up is not None and up.op in AFFINE_OPS and (
            up.op == "BatchNormalization" or any(G.const(i) is not None for i in up.inputs))
    return False


def _free_affine(n: gs.Node, nodes, axis: int = -1) -> bool:
    """A per-channel affine (or regroup) right after a matrix product folds into it on its own."""
    if n.op not in AFFINE_OPS:
        return False
    aff = axis_affine(n, None if axis == -1 else axis)
    if isinstance(aff, str):
        return False
    up = G.producer(aff.x)
    return up is not None and up.op in MATRIX_OPS and any(u is up for u in nodes)


def _rewrite_token_mixing(g, spec: K.ConvSpec, src, out, dtype, main: str, names) -> Rewrite:
    """MatMul(W', src) (+ Add(b'[:, None])): the token-mixing region's deploy form."""
    created = []
    has_bias = bool(np.any(spec.bias != 0))
    mm_out = out if not has_bias else G.new_variable(g, f"{main}_mm", dtype=out.dtype, shape=out.shape)
    w = G.new_weight(g, f"{main}.weight", np.ascontiguousarray(spec.weight), dtype)
    g.nodes.append(gs.Node("MatMul", main, {}, [w, src], [mm_out]))
    created.append(main)
    if has_bias:
        b = G.new_weight(g, f"{main}.bias", spec.bias.reshape(-1, 1), dtype)
        name = G.unique_node_name(g, f"{main}_bias")
        g.nodes.append(gs.Node("Add", name, {}, [mm_out, b], [out]))
        created.append(name)
    return Rewrite("", names, created, f"{len(names)} ops → token-mixing MatMul {spec.cin}→{spec.cout}")
