"""merge_linear_regions: collapse a region of linear ops on one tensor into a single conv.

Everything between two non-linearities is linear, so a whole multi-branch block is one conv:

          x ─┬─ Conv3×3 ─ BN ─┐                       RepVGG, ACNet, DBB, MobileOne,
             ├─ Conv1×1 ─ BN ─┼─ Add ─ Relu     ⇒     RepLKNet, RepGhost, FastViT's
             └──── BN ────────┘                       RepMixer, RepViT, ExpandNet,
                                                      Split→convs→Concat, ...
          x ── Conv3×3' ── Relu

The region is found by walking up from a root tensor through ops whose intermediate tensors
nobody else reads, expressing each tensor as `ConvSpec ⊛ source`:

    Conv / Gemm / MatMul / AveragePool / Pad(0)   compose(form(input), op)         sequential
    BN, Mul/Add/Sub/Div by per-channel constants  affine_after(form(input))        scale, shift
    Add / Sub / Sum of tensors                    add(form(t) for t in terms)      parallel
    Concat on channels                            concat(forms)                    stacked
    Split / Slice on channels                     channel selection (1×1 of 0/1)   → groups
    anything else, or a tensor with other readers a leaf: the source itself

All terms must reach the same source; kernel algebra (onnxrep.kernels) enforces exactness
(stride and padding alignment, border conditions, group compatibility) and raises NotMergeable
otherwise. A Sub→Pad→Add border fill whose value equals the preceding bias (DBB's BN-and-pad)
composes because a 1×1 conv of zero-padded x produces exactly that border.

Cost model: MACs plus elements read and written, over the region *as deployed* versus the one
merged conv. A runtime fuses Conv+BN/affine and Conv+Add(+Relu) at load, so those cost what the
fused kernel costs (region_cost has the details); a runtime-fusable pattern (onnxrep.patterns:
GELU, SiLU, LayerNorm, ...) is never inside a region. A merge that would cost more (a dense 1×1
into a depthwise K×K, say) is declined with the figures, unless --aggressive.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import graph as G
from onnxrep import kernels as K
from onnxrep import linear as L
from onnxrep.engine import Rewrite, Rule

SUM_OPS = ("Add", "Sub", "Sum")
# every op Walker.form goes through; any other producer makes its output a leaf
WALKED_OPS = frozenset(SUM_OPS + ("Mul", "Div", "BatchNormalization", "Conv", "Gemm", "MatMul", "AveragePool",
                                  "Pad", "Concat", "Split", "Slice"))
MAX_DEPTH = 64
# Bias residue accepted as zero when a border fill equals the bias up to rounding.
BORDER_RTOL = 1e-6


@dataclass
class Form:
    """tensor = spec ⊛ source, computed by `nodes`."""

    source: gs.Tensor
    spec: K.ConvSpec
    nodes: list = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.nodes)


class NotLinear(Exception):
    """The tensor is not a linear function of a single source through private ops."""


class Walker:
    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.stops: list[str] = []  # why the walk did not go further, for decline reasons

    # -- leaves ----------------------------------------------------------------------------------
    def leaf(self, t: gs.Tensor) -> Form:
        reason = _not_a_source(t)
        if reason:
            raise NotLinear(reason)
        return Form(t, K.identity(int(t.shape[1]), len(t.shape) - 2), [])

    def operand(self, t: gs.Tensor, reader: gs.Node, depth: int) -> Form:
        """Form of an operand of `reader`: walk through it only when reader is its sole user."""
        if G.private_to(self.graph, t, reader) and G.producer(t) is not None:
            try:
                return self.form(t, depth + 1)
            except NotLinear as e:
                self.stops.append(f"'{t.name}': {e}")
        elif G.producer(t) is not None:
            self.stops.append(G.fan_out_reason(self.graph, t) or f"'{t.name}' is read by another node")
        return self.leaf(t)

    # -- the walk --------------------------------------------------------------------------------
    def form(self, t: gs.Tensor, depth: int = 0) -> Form:
        if depth > MAX_DEPTH:
            raise NotLinear("region too deep")
        node = G.producer(t)
        if node is None:
            raise NotLinear("no producer")
        op = node.op
        if op in ("Add", "Sub", "Mul", "Div", "BatchNormalization"):
            aff = L.affine_of(node)
            if aff:
                return self._affine(node, aff, depth)
            if op in SUM_OPS and not aff.fused:
                return self._sum(node, depth)
            raise NotLinear(aff.reason)
        if op == "Sum":
            return self._sum(node, depth)
        if op in ("Conv", "Gemm", "MatMul", "AveragePool", "Pad"):
            lin = L.conv_of(node)
            if not lin:
                raise NotLinear(lin.reason)
            return self._compose(node, lin, depth)
        if op == "Concat":
            return self._concat(node, t, depth)
        if op in ("Split", "Slice"):
            return self._select(node, t, depth)
        raise NotLinear(f"{op} is not linear")

    def _affine(self, node, aff: L.Affine, depth) -> Form:
        inner = self.operand(aff.x, node, depth)
        if aff.scale.size not in (1, inner.spec.cout) or aff.shift.size not in (1, inner.spec.cout):
            raise NotLinear("affine channel count mismatch")
        a, c = aff.broadcast(inner.spec.cout)
        # inplace: the walk made inner's spec and hands it on; the kernel is scaled where it lies
        return Form(inner.source, K.affine_after(inner.spec, a, c, inplace=True), inner.nodes + [node])

    def _compose(self, node, lin: L.LinearOp, depth) -> Form:
        inner = self.operand(lin.x, node, depth)
        if inner.size == 0:
            return Form(inner.source, lin.spec, [node])
        # only a Pad can be a border fill's pad: a conv's own padding after a biased conv must
        # meet an exactly-zero bias
        border = _border_fill(inner, lin) if node.op == "Pad" else 0.0
        try:
            spec = K.compose(inner.spec, lin.spec, bias_tol=border)
        except K.NotMergeable as e:
            self.stops.append(f"{node.name}: {e}")
            return Form(lin.x, lin.spec, [node])  # stop here: lin.x becomes the source
        return Form(inner.source, spec, inner.nodes + [node])

    def _sum(self, node, depth) -> Form:
        terms = self.sum_terms(node, depth)
        sources = {id(f.source) for f, _ in terms}
        if len(sources) != 1:
            names = ", ".join(sorted({f"'{f.source.name}'" for f, _ in terms}))
            raise NotLinear(f"terms of the sum read different tensors ({names})")
        specs = [f.spec if sign > 0 else K.affine_after(f.spec, -1.0, 0.0, inplace=True) for f, sign in terms]
        try:  # inplace: the terms' specs are the walk's own, used only here
            spec = K.add(specs, G.spatial_shape(terms[0][0].source), inplace=True)
        except K.NotMergeable as e:
            raise NotLinear(str(e)) from e
        return Form(terms[0][0].source, spec, _union([f.nodes for f, _ in terms]) + [node])

    def sum_terms(self, node, depth) -> list[tuple[Form, float]]:
        if any(G.const(t) is not None for t in node.inputs):
            raise NotLinear(f"{node.op} has a constant operand that is not per-channel")
        signs = [1.0] * len(node.inputs)
        if node.op == "Sub":
            signs[1] = -1.0
        return [(self.operand(t, node, depth), s) for t, s in zip(node.inputs, signs)]

    def _concat(self, node, t, depth) -> Form:
        r = G.rank(t)
        axis = int(node.attrs.get("axis", 1))
        if r is None or axis % r != 1:
            raise NotLinear("Concat is not on the channel axis")
        forms = [self.operand(i, node, depth) for i in node.inputs]
        if len({id(f.source) for f in forms}) != 1:
            raise NotLinear("Concat inputs read different tensors")
        try:
            spec = K.concat([f.spec for f in forms])
        except K.NotMergeable as e:
            raise NotLinear(str(e)) from e
        return Form(forms[0].source, spec, _union([f.nodes for f in forms]) + [node])

    def _select(self, node, t, depth) -> Form:
        x = node.inputs[0]
        c = G.channels(x)
        if c is None:
            raise NotLinear(f"{node.op} input channel count unknown")
        shape = x.shape  # only its rank and channel count are used: the batch may be dynamic
        lo, hi = _channel_range(node, t, shape)
        r = len(shape) - 2
        w = np.zeros((hi - lo, c) + (1,) * r)
        for i in range(hi - lo):
            w[(i, lo + i) + (0,) * r] = 1.0
        if not all(G.private_to(self.graph, o, o.outputs[0]) if o.outputs else True for o in node.outputs):
            raise NotLinear(f"{node.op} outputs are read by several nodes")
        if G.private_to(self.graph, x, node) and G.producer(x) is not None:
            inner = self.operand(x, node, depth)
        else:
            inner = self.leaf(x)
        sel = K.ConvSpec(w, None)
        spec = K.compose(inner.spec, sel) if inner.size else sel
        return Form(inner.source, spec, inner.nodes + [node])


def _not_a_source(t: gs.Tensor) -> str | None:
    """Why a region cannot read `t` as its source, or None."""
    shape = t.shape
    if shape is None or len(shape) < 2 or not isinstance(shape[1], (int, np.integer)):
        return f"channel count of '{t.name}' is unknown"
    if int(shape[1]) == 0:
        return f"'{t.name}' has no channels"
    dt = G.dtype_of(t)
    if dt is not None and not np.issubdtype(dt, np.floating):
        return f"'{t.name}' is not floating point"
    return None


def _channel_range(node, t, shape) -> tuple[int, int]:
    r = len(shape)
    if node.op == "Split":
        axis = int(node.attrs.get("axis", 0)) % r
        if axis != 1:
            raise NotLinear("Split is not on the channel axis")
        split = G.const(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else node.attrs.get("split")
        n = len(node.outputs)
        if split is None:
            if shape[1] % n:
                raise NotLinear("uneven Split without sizes")
            split = [shape[1] // n] * n
        split = [int(s) for s in np.asarray(split).reshape(-1)]
        k = [i for i, o in enumerate(node.outputs) if o is t][0]
        lo = sum(split[:k])
        return lo, lo + split[k]
    vals = [G.const(i) for i in node.inputs[1:]]
    if len(node.inputs) < 3 or any(v is None for v in vals):
        raise NotLinear("Slice bounds are not constant")
    starts, ends = vals[0].reshape(-1), vals[1].reshape(-1)
    axes = vals[2].reshape(-1) if len(vals) > 2 else np.arange(len(starts))
    steps = vals[3].reshape(-1) if len(vals) > 3 else np.ones(len(starts), dtype=np.int64)
    if len(axes) != 1 or int(axes[0]) % r != 1 or int(steps[0]) != 1:
        raise NotLinear("Slice is not a unit-step slice of the channel axis alone")
    c = shape[1]
    lo, hi = int(starts[0]), int(ends[0])
    lo = max(0, min(c, lo + c if lo < 0 else lo))
    hi = max(0, min(c, hi + c if hi < 0 else hi))
    if hi <= lo:
        raise NotLinear("empty Slice")
    return lo, hi


def _border_fill(inner: Form, lin: L.LinearOp) -> float:
    """Tolerance for the first conv's bias when `lin` pads it: a Sub(c)→Pad→Add(c) border fill
    leaves inner's bias as (b − c); rounding makes that ~1e-7·|c| rather than exactly 0."""
    scale = max((abs(float(v)) for n in inner.nodes for v in _consts(n)), default=0.0)
    return BORDER_RTOL * scale


def _consts(node):
    for t in node.inputs:
        v = G.const(t)
        if v is not None and v.size and np.issubdtype(v.dtype, np.floating):
            yield float(np.abs(v).max())


def _may_grow(graph, node) -> bool:
    """Whether the walk from `node` can take in a second op: some input of it is private to it and
    made by an op the walk goes through. Without one the region is `node` alone, whatever the
    weights are, so this structural test spares reading them (a merged Conv is an anchor again in
    the next sweep)."""
    for t in node.inputs:
        up = G.producer(t)
        if up is not None and up.op in WALKED_OPS and G.private_to(graph, t, node):
            return True
    return False


def _union(lists) -> list:
    seen, out = set(), []
    for lst in lists:
        for n in lst:
            if id(n) not in seen:
                seen.add(id(n))
                out.append(n)
    return out


# -- cost model ----------------------------------------------------------------------------------
def _numel(t: gs.Tensor) -> int:
    """Elements of a tensor for one sample; symbolic spatial dims count as 32."""
    shape = t.shape or ()
    dims = [d if isinstance(d, (int, np.integer)) and d > 0 else (1 if i == 0 else 32) for i, d in enumerate(shape)]
    if dims:
        dims[0] = 1
    return int(math.prod(dims))


def node_cost(n: gs.Node) -> int:
    """MACs plus elements read and written (a proxy for memory traffic)."""
    out = _numel(n.outputs[0])
    moved = out + sum(_numel(t) for t in n.inputs if not isinstance(t, gs.Constant) and t.shape is not None)
    macs = out
    if n.op in ("Conv", "Gemm", "MatMul"):
        taps = L.taps_per_output(n)
        if taps is not None:
            macs = out * taps
    elif n.op == "AveragePool":
        macs = out * math.prod(n.attrs.get("kernel_shape", [1]))
    return macs + moved


def region_cost(nodes) -> int:
    """Cost of a region's ops (walk order: producers first) as deployed: after the fusions a runtime
    makes at load (ONNX Runtime's ConvBN/ConvMul/ConvAdd and ConvAddActivation fusions; TensorRT
    and OpenVINO make the same), so that a merge is judged against what would really run:

      * a per-channel affine right after a Conv/Gemm/MatMul, or after such an affine, folds into
        that conv (fuse_conv_bn, or this rule on the pair): it costs nothing;
      * an Add (or two-input Sum) of a Conv's private output — after its folded affines — and
        another tensor runs inside the conv (FusedConv's Sum input; a Relu after it fuses too,
        outside the region): it costs reading the other operand, not a write and two reads;
      * a runtime-fusable pattern (GELU, LayerNorm, SiLU, ..., onnxrep.patterns) is never part of
        a region: linear.affine_of declines its members, so a merge neither breaks nor counts it.

    The merge decision is then the same whether fuse_conv_bn ran first or left the pair to this
    rule."""
    inside = {id(n) for n in nodes}
    folded: set[int] = set()  # affines folded into the conv that made their input
    conv_made: set[int] = set()  # nodes whose output a Conv computes (the Conv, its folded affines)
    summed: set[int] = set()  # such nodes whose output an Add already took into the conv
    total = 0
    for n in nodes:
        if n.op in L.AFFINE_OPS:
            aff = L.affine_of(n)
            up = G.producer(aff.x) if aff else None
            if up is not None and id(up) in inside and (up.op in L.CONV_OPS or id(up) in folded):
                folded.add(id(n))
                if id(up) in conv_made and id(up) not in summed:
                    conv_made.add(id(n))
                continue
        if n.op == "Conv":
            conv_made.add(id(n))
        elif n.op in ("Add", "Sum") and len(n.inputs) == 2 and not any(isinstance(t, gs.Constant) for t in n.inputs):
            fused = _fused_term(n, inside, conv_made, summed)
            if fused is not None:
                summed.add(id(G.producer(fused)))
                other = n.inputs[1] if n.inputs[0] is fused else n.inputs[0]
                total += _numel(other)
                continue
        total += node_cost(n)
    return total


def _fused_term(add: gs.Node, inside: set, conv_made: set, summed: set) -> gs.Tensor | None:
    """The operand of `add` that a Conv in the region computes and nobody else reads: the runtime
    adds the other operand inside that conv."""
    for t in add.inputs:
        up = G.producer(t)
        if up is not None and id(up) in inside and id(up) in conv_made and id(up) not in summed \
                and len(t.outputs) == 1 and t.shape is not None:
            return t
    return None


def merged_cost(spec: K.ConvSpec, source: gs.Tensor, out: gs.Tensor) -> int:
    o = _numel(out)
    return o * spec.weight.shape[1] * math.prod(spec.kernel_shape) + o + _numel(source)


# -- the rule ------------------------------------------------------------------------------------
@dataclass
class Region:
    root: gs.Node
    out: gs.Tensor
    form: Form | None
    why_not: str | None = None  # a sum/concat whose branches do not merge: the reason
    final: K.ConvSpec | None = None  # form.spec as it will be written (_final), once computed


class MergeLinearRegions(Rule):
    name = "merge_linear_regions"
    description = "collapse parallel branches, sequential convs, Concat and Split regions of linear ops into one Conv/Gemm"
    anchors = ("Add", "Sub", "Sum", "Conv", "Gemm", "MatMul", "Concat", "BatchNormalization", "Mul", "Div", "AveragePool", "Pad")
    outputs_first = True

    def match(self, node, ctx):
        out = node.outputs[0]
        if not out.shape:
            return None
        if node.op not in SUM_OPS + ("Concat",) and not _may_grow(ctx.graph, node):
            return None  # a region of one op: skip the walk (it would read the weights in float64)
        walker = Walker(ctx.graph)
        try:
            form = walker.form(out)
        except (NotLinear, K.NotMergeable) as e:
            if node.op in SUM_OPS + ("Concat",):
                stops = "; ".join(dict.fromkeys(walker.stops))
                return Region(node, out, None, f"{e}" + (f" (walk stopped: {stops})" if stops else ""))
            return None
        if form.size < 2:
            return None
        return Region(node, out, form)

    def check(self, region: Region, ctx):
        if region.form is None:
            return region.why_not
        form = region.form
        reason = _escapes(ctx.graph, form.nodes, region.out)
        if reason:
            return reason
        region.final = _final(form.spec)
        return self._cost(region.final, form.source, region.out, form.nodes, ctx)

    def _cost(self, spec, source, out, nodes, ctx):
        before = region_cost(nodes)
        after = merged_cost(spec, source, out)
        if after > before and not ctx.options.aggressive:
            return f"merged conv would cost more ({after:,} vs {before:,} MACs+elements moved); --aggressive merges anyway"
        return None

    def rewrite(self, region: Region, ctx):
        form = region.form
        spec = region.final if region.final is not None else _final(form.spec)
        dtype = L.data_dtype(*[t for n in form.nodes for t in n.inputs[1:]], region.out)
        return L.replace_with_conv(ctx.graph, spec, form.source, region.out, form.nodes, dtype,
                                   f"{len(form.nodes)} ops → {_describe(spec)}")


def takes_branch(graph: gs.Graph, conv: gs.Node, affine: gs.Node) -> bool:
    """Whether this rule, applied later in the same sweep, is sure to fold `conv` → `affine` (a
    Conv and a per-channel affine reading its private output) when the affine is one branch of a
    sum or Concat. fuse_conv_bn then leaves the pair alone: folding it first would have this rule
    read the folded kernel back in float64, two passes over each kernel where one does.

    Sure, because no walk can leave the pair half in: the affine's output is private to the join
    and its shape known; the conv's input is where every walk through the conv stops (read by
    others too, or a graph input) and is a valid source; conv_of can express the conv. So the
    walk from the affine's own anchor is exactly {conv, affine}, which merges whenever the region
    at the join is declined: one conv costs no more than the conv with its (free) affine."""
    out = affine.outputs[0]
    if conv.op != "Conv" or not out.shape or G.is_graph_output(graph, out) or len(out.outputs) != 1:
        return False
    join = out.outputs[0]
    if not (join.op == "Concat" or (join.op in SUM_OPS and all(G.const(t) is None for t in join.inputs))):
        return False
    mid = conv.outputs[0]
    if mid.shape is None or tuple(mid.shape) != tuple(out.shape) or not G.private_to(graph, mid, affine):
        return False
    x, w = conv.inputs[0], conv.inputs[1] if len(conv.inputs) > 1 else None
    if G.producer(x) is not None and G.private_to(graph, x, conv):
        return False  # a walk goes on above the conv, and that longer region may be declined
    if _not_a_source(x) or not isinstance(w, gs.Constant) or w.shape is None:
        return False
    return bool(L.conv_geometry(conv, tuple(w.shape)))


def _final(spec: K.ConvSpec) -> K.ConvSpec:
    """The spec as it will be written: Gemm has no groups; a block-diagonal conv gets its groups."""
    return K.regroup(spec, 1) if spec.rank == 0 else K.sparsest_group(spec)


def _escapes(graph, nodes, root_out) -> str | None:
    """A region may be replaced only if nothing outside it reads its intermediates."""
    inside = {id(n) for n in nodes}
    for n in nodes:
        for o in n.outputs:
            if o is root_out:
                continue
            if G.is_graph_output(graph, o):
                return f"intermediate '{o.name}' is a graph output"
            if any(id(r) not in inside for r in o.outputs):
                return f"intermediate '{o.name}' is read outside the region"
    return None


def _describe(spec: K.ConvSpec) -> str:
    if spec.rank == 0:
        return f"Gemm {spec.cin}→{spec.cout}"
    k = "×".join(map(str, spec.kernel_shape))
    g = f" g={spec.group}" if spec.group > 1 else ""
    s = f" s={spec.strides[0]}" if any(v > 1 for v in spec.strides) else ""
    return f"Conv {k} {spec.cin}→{spec.cout}{g}{s}"
