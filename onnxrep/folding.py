"""Constant folding you can trust: the prepare step's folding loop.

Folding is a rewrite like any other: it can be wrong and it can explode. So:

1. Shapes are folded here, not by onnx-graphsurgeon (whose shape folding reads `Shape(x)` as the
   full shape whatever its `start`/`end`): `Shape`, `Size`, and `Gather`/`Slice` of a `Shape` whose
   selected dims are static become constants; a `Shape` of a constant is read from its dims
   without loading the weight.
2. Exporter spellings that hide a constant are canonicalized: `CastLike(c, x)` with a constant `c`
   and a known dtype of `x` is `Cast(c, to=dtype(x))` (the dynamo exporter's bias-free convs carry
   `Expand(CastLike(0, x), Shape(W))` as bias); `SplitToSequence` with constant splits read only
   by `SequenceAt` at constant positions is a `Split`; a Reshape target computed from shapes
   becomes a constant (a symbolic dim carried at its position → 0; one computed entry among
   positive constants → -1; a -1 beside a computed entry is first resolved from the input's
   element count, followed as a product of symbolic dims, `symbolic_dims`), and allowzero=1 is
   dropped from a constant target without a 0 (it only changes what a 0 means);
   `Transpose(Transpose(x))` is one Transpose (or none).
3. Everything else is evaluated by ONNX Runtime (through graphsurgeon), node by node only when
   the node's output size is bounded before it runs: by its inferred static shape, by the values
   that set it (`ConstantOfShape`, `Expand`, `Tile`, `Range`) or by its inputs' shapes. A tensor
   over the fold limit (ORT's own default: 1 GiB) is not materialized; a node whose size cannot
   be bounded yet waits for the next round (its inputs are constants by then). Random ops never fold.
4. Initializers that are also graph inputs (IR >= 4) are defaults a caller may override, not
   constants: they are kept out of the graph's constants and put back, input and initializer,
   when the graph is exported. `freeze_inputs` folds them as constants (and drops them from the
   inputs), which changes the model's signature.

    before                                   after
    Shape(x, start=1, end=2) ──► Reshape     Constant([C]) ──► Reshape
    Expand(CastLike(0, x), Shape(W))         Constant(zeros(Cout))
"""
from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import graph as G
from .lean import point_stub, stub_index

log = logging.getLogger("onnxrep")

#: ONNX Runtime's own cap on a constant-folded output (optimization.constant_folding_max_output_size_in_bytes)
DEFAULT_FOLD_LIMIT = 1 << 30

#: rounds of fold → infer shapes → fold; each round folds what the previous one made constant
MAX_ROUNDS = 8

_RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
# ops whose output size is set by the values of an input, not by input shapes
_SIZE_FROM_VALUES = {"ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot",
                     "CenterCropPad", "Col2Im", "NonZero", "Compress", "Unique", "TopK", "Loop", "Scan", "If",
                     "Einsum", "SequenceConstruct", "SplitToSequence", "ConcatFromSequence", "StringSplit"}
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Mod", "Equal", "Less", "Greater", "LessOrEqual",
                "GreaterOrEqual", "And", "Or", "Xor", "Where", "Max", "Min", "Sum", "Mean", "BitShift",
                "PRelu", "BitwiseAnd", "BitwiseOr", "BitwiseXor"}


@dataclass
class FoldOptions:
    """How prepare folds. freeze_inputs: fold initializers that are also graph inputs (changes the
    model's signature). fold_limit: largest tensor folding may materialize, in bytes."""

    freeze_inputs: bool = False
    fold_limit: int = DEFAULT_FOLD_LIMIT


@dataclass
class FoldLog:
    """What folding declined, for the report."""

    too_large: dict[str, int] = field(default_factory=dict)  # tensor -> bytes it would take
    kept_inputs: list[str] = field(default_factory=list)  # overridable initializers kept as inputs

    def notes(self, limit: int) -> list[str]:
        out = []
        if self.kept_inputs:
            names = ", ".join(f"'{n}'" for n in self.kept_inputs[:5]) + (" ..." if len(self.kept_inputs) > 5 else "")
            out.append(f"{len(self.kept_inputs)} initializer(s) are also graph inputs (defaults a caller may "
                       f"override), kept as inputs, not folded: {names}; --freeze-inputs treats them as constants")
        for name, nbytes in self.too_large.items():
            out.append(f"not folded: '{name}' would take {_size(nbytes)}, over the fold limit of {_size(limit)} "
                       "(--fold-limit raises it)")
        return out


def _size(n: int) -> str:
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def fold_log(graph: gs.Graph) -> FoldLog:
    log_ = vars(graph).get("_onnxrep_fold_log")  # gs.Graph.__getattr__ would look up a graph function
    if log_ is None:
        log_ = graph._onnxrep_fold_log = FoldLog()
    return log_


# -- overridable initializers ----------------------------------------------------------------------
def take_overridable(work: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Remove from `work` (a payload-free copy) the initializers that are also graph inputs and
    return them (copies: stubs keep their payload index). IR < 4 lists every initializer as an
    input, so there they are constants as before."""
    if work.ir_version < 4:
        return []
    inputs = {i.name for i in work.graph.input}
    kept, rest = [], []
    for t in work.graph.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(t)  # payload-free (a stub) above PAYLOAD_MIN: cheap
        (kept if t.name in inputs else rest).append(copy)
    if kept:
        del work.graph.initializer[:]
        work.graph.initializer.extend(rest)
    return kept


def keep_overridable(graph: gs.Graph, kept: list[onnx.TensorProto], sources: list) -> None:
    """Remember `kept` (take_overridable) on the graph, each with the payload its stub points at, and
    mark their input Variables so a rule's decline can say why they are not constant."""
    graph._onnxrep_overridable = [(t, sources[stub_index(t)] if stub_index(t) is not None else None) for t in kept]
    names = {t.name for t in kept}
    for v in graph.inputs:
        if v.name in names:
            v._onnxrep_overridable = True
    fold_log(graph).kept_inputs = [t.name for t in kept]


def restore_overridable(graph: gs.Graph, lean) -> None:
    """Put the kept initializers back into an export of `graph` (a LeanModel), as initializers of
    the inputs they default, so the model's signature is unchanged."""
    kept = vars(graph).get("_onnxrep_overridable") or []
    inputs = {i.name for i in lean.proto.graph.input}
    for t, payload in kept:
        if t.name not in inputs:
            continue
        copy = onnx.TensorProto()
        copy.CopyFrom(t)
        if payload is not None:
            lean.payloads.append(payload)
            point_stub(copy, len(lean.payloads) - 1)
        lean.proto.graph.initializer.append(copy)


def overridable_hint(t: gs.Tensor) -> str:
    """' (...)' naming --freeze-inputs when `t` is an overridable input, else ''."""
    if getattr(t, "_onnxrep_overridable", False):
        return f" ('{t.name}' is a graph input with a default value a caller may override; --freeze-inputs folds it)"
    return ""


# -- shapes ----------------------------------------------------------------------------------------
def _dims(t: gs.Tensor) -> list | None:
    if isinstance(t, gs.Constant):
        return [int(d) for d in t.shape]
    return None if t.shape is None else list(t.shape)


def _static(d) -> bool:
    return isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0


def shape_slice(rank: int, start: int = 0, end: int | None = None) -> tuple[int, int]:
    """Shape's start/end (opset 15) clamped to [0, rank] after adding rank to negatives."""
    end = rank if end is None else end
    start, end = (v + rank if v < 0 else v for v in (start, end))
    return min(max(start, 0), rank), min(max(end, 0), rank)


def _to_constant(graph: gs.Graph, t: gs.Tensor, values: np.ndarray) -> bool:
    if G.is_graph_output(graph, t) or not isinstance(t, gs.Variable):
        return False
    t.to_constant(values)
    t.inputs.clear()
    return True


def _const_ints(t) -> np.ndarray | None:
    if not isinstance(t, gs.Constant) or t.dtype not in (np.int64, np.int32):
        return None
    return np.asarray(G.const(t)).astype(np.int64)


def fold_shapes(graph: gs.Graph) -> int:
    """Shape, Size, and Gather/Slice(axis 0) of a Shape, where the dims they select are static."""
    done = 0
    for node in list(graph.nodes):
        if node.op not in ("Shape", "Size") or not node.outputs or not node.inputs:
            continue
        dims = _dims(node.inputs[0])
        if dims is None:
            continue
        out = node.outputs[0]
        if node.op == "Size":
            if all(_static(d) for d in dims) and _to_constant(graph, out, np.array(math.prod(dims), np.int64)):
                done += 1
            continue
        start, end = shape_slice(len(dims), int(node.attrs.get("start", 0)),
                                 None if node.attrs.get("end") is None else int(node.attrs["end"]))
        sel = dims[start:end]
        if all(_static(d) for d in sel):
            if _to_constant(graph, out, np.array(sel, np.int64)):
                done += 1
            continue
        for reader in list(out.outputs):  # part of a dynamic shape: the static dims a reader picks
            picked = _pick(reader, out, sel)
            if picked is not None and all(_static(d) for d in picked.reshape(-1)) and \
                    _to_constant(graph, reader.outputs[0], picked.astype(np.int64)):
                reader.inputs.clear()
                done += 1
    return done


def _pick(reader: gs.Node, shape_t: gs.Tensor, sel: list) -> np.ndarray | None:
    if not reader.inputs or reader.inputs[0] is not shape_t or len(reader.outputs) != 1:
        return None
    n = len(sel)
    if reader.op == "Gather" and int(reader.attrs.get("axis", 0)) in (0, -1):
        idx = _const_ints(reader.inputs[1]) if len(reader.inputs) > 1 else None
        if idx is None or np.any((idx < -n) | (idx >= n)):
            return None
        return np.array([sel[int(i)] for i in idx.reshape(-1)], dtype=object).reshape(idx.shape)
    if reader.op == "Slice" and len(reader.inputs) >= 3:
        bounds = [_const_ints(t) if t.name else None for t in reader.inputs[1:]]
        if any(b is None for b in bounds[:2]):
            return None
        if len(bounds) > 2 and reader.inputs[3].name and (bounds[2] is None or bounds[2].reshape(-1).tolist() not in ([0], [-1])):
            return None
        step = 1
        if len(bounds) > 3 and reader.inputs[4].name:
            if bounds[3] is None or bounds[3].size != 1 or int(bounds[3].reshape(-1)[0]) == 0:
                return None
            step = int(bounds[3].reshape(-1)[0])
        if bounds[0].size != 1 or bounds[1].size != 1:
            return None
        s, e = int(bounds[0].reshape(-1)[0]), int(bounds[1].reshape(-1)[0])
        return np.array(sel[slice(*_slice_bounds(n, s, e, step))], dtype=object)
    return None


def _slice_bounds(n: int, start: int, end: int, step: int) -> tuple[int, int | None, int]:
    """ONNX Slice's clamping of one axis as Python slice arguments."""
    start = start + n if start < 0 else start
    end = end + n if end < 0 else end
    if step > 0:
        return min(max(start, 0), n), min(max(end, 0), n), step
    start = min(max(start, 0), n - 1)
    end = min(max(end, -1), n - 1)
    return start, (None if end < 0 else end), step


# -- exporter spellings ----------------------------------------------------------------------------
def canonicalize(graph: gs.Graph) -> int:
    """CastLike of a constant → Cast; SplitToSequence + SequenceAt with constant splits → Split;
    Reshape targets computed from shapes → constants; Transpose of a Transpose → one Transpose;
    identical Splits of one tensor → one Split."""
    done = 0
    for node in list(graph.nodes):
        if node.op == "CastLike" and len(node.inputs) == 2 and isinstance(node.inputs[0], gs.Constant):
            dt = G.dtype_of(node.inputs[1])
            if dt is None:
                continue
            try:
                to = int(onnx.helper.np_dtype_to_tensor_dtype(dt))
            except Exception:
                continue
            attrs = {"to": to}
            if "saturate" in node.attrs:
                attrs["saturate"] = node.attrs["saturate"]
            node.op, node.attrs = "Cast", attrs
            del node.inputs[1]
            done += 1
        elif node.op == "SplitToSequence":
            done += _sequence_to_split(graph, node)
        elif node.op == "Reshape":
            done += _reshape_copying_dims(graph, node) or _reshape_one_unknown_dim(graph, node)
            done += _allowzero_without_zeros(node)
        elif node.op == "Transpose":
            done += _transpose_of_transpose(graph, node)
        elif node.op == "Slice":
            done += _whole_slice(graph, node)
    return done + _merge_identical_splits(graph)


def _merge_identical_splits(graph: gs.Graph) -> int:
    """Splits of one tensor on the same axis into the same constant sizes compute the same pieces
    (dynamo-noopt writes `q, k, v = r.split(C, -1)` of an in-place-updated r as one
    SplitToSequence per piece): the later ones' readers read the first one's outputs."""
    done, seen = 0, {}
    for node in list(graph.nodes):
        if node.op != "Split" or not node.inputs or not node.outputs:
            continue
        has_sizes = len(node.inputs) > 1 and node.inputs[1].name
        sizes = _const_ints(node.inputs[1]) if has_sizes else None
        if has_sizes and sizes is None:
            continue
        rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
        axis = int(node.attrs.get("axis", 0))
        axis = axis % rank if rank else axis
        key = (id(node.inputs[0]), axis, None if sizes is None else tuple(sizes.tolist()),
               tuple(node.attrs.get("split", ()) or ()), node.attrs.get("num_outputs"), len(node.outputs))
        first = seen.setdefault(key, node)
        if first is node or any(G.is_graph_output(graph, o) for o in node.outputs):
            continue
        for mine, theirs in zip(node.outputs, first.outputs):
            for reader in list(mine.outputs):
                for i, t in enumerate(reader.inputs):
                    if t is mine:
                        reader.inputs[i] = theirs
        node.inputs.clear()
        node.outputs.clear()
        done += 1
    return done


def _whole_slice(graph: gs.Graph, node: gs.Node) -> int:
    """Slice(x, 0, INT_MAX) with step 1 on every axis it names is x (the exporters' `x[:, ...]` of a
    slice assignment): its readers read x. Exact for any size of x, symbolic dims included."""
    if len(node.inputs) < 3 or len(node.outputs) != 1 or G.is_graph_output(graph, node.outputs[0]):
        return 0
    starts, ends = (_const_ints(t) for t in node.inputs[1:3])
    steps = _const_ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4].name else None
    if starts is None or ends is None or (len(node.inputs) > 4 and node.inputs[4].name and steps is None):
        return 0
    if len(node.inputs) > 3 and node.inputs[3].name and _const_ints(node.inputs[3]) is None:
        return 0
    dims = _dims(node.inputs[0])
    axes = _const_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else np.arange(starts.size)
    for i, (a, b) in enumerate(zip(starts.reshape(-1), ends.reshape(-1))):
        d = None
        if dims is not None and -len(dims) <= int(axes.reshape(-1)[i]) < len(dims):
            d = dims[int(axes.reshape(-1)[i])]
        whole = b >= np.iinfo(np.int32).max or (_static(d) and b >= d)
        if a != 0 or not whole or (steps is not None and int(steps.reshape(-1)[i]) != 1):
            return 0
    G.bypass(node, node.inputs[0], graph)  # not a graph output (checked above): readers read x
    return 1


@dataclass(frozen=True)
class Dim:
    """A dim known as coef · Π syms (the symbolic dims of graph inputs, e.g. height·width): what
    the exporters' shape arithmetic computes from Shape ops, compared and divided exactly."""

    coef: int
    syms: tuple[str, ...] = ()  # sorted, with repeats

    def plain(self):
        """An int when no symbol is left, the name when it is one symbol, else the Dim."""
        if not self.syms:
            return self.coef
        return self.syms[0] if self.coef == 1 and len(self.syms) == 1 else self


def _as_dim(v) -> Dim | None:
    if isinstance(v, Dim):
        return v
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0:
        return Dim(int(v))
    if isinstance(v, str) and v:
        return Dim(1, (v,))
    return None


def _dim_mul(a: Dim | None, b: Dim | None) -> Dim | None:
    if a is None or b is None:
        return None
    return Dim(a.coef * b.coef, tuple(sorted(a.syms + b.syms)))


def _dim_div(a: Dim | None, b: Dim | None) -> Dim | None:
    """a / b when it is exact (b's symbols among a's, coefficients divide), else None."""
    if a is None or b is None or b.coef == 0 or a.coef % b.coef:
        return None
    rest = list(a.syms)
    for sym in b.syms:
        if sym not in rest:
            return None
        rest.remove(sym)
    return Dim(a.coef // b.coef, tuple(rest))


def _dims_product(dims) -> Dim | None:
    out = Dim(1)
    for d in dims:
        out = _dim_mul(out, d)
    return out


_BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min", "PRelu"}


def symbolic_dims(t: gs.Tensor, depth: int = 0, memo: dict | None = None) -> list[Dim | None] | None:
    """t's dims as Dims (None where unknown); None when its rank is unknown. Static and named dims
    come from t's inferred shape; a dim shape inference lost (the -1 of a Reshape on symbolic
    dims, named unk__N by onnx) is recomputed from the producer: Reshape to a constant target (its
    -1 is the element count over the other entries), Flatten, Transpose, Split, MatMul,
    broadcasting and shape-preserving ops."""
    memo = {} if memo is None else memo  # a DAG (attention reads its tokens thrice): each tensor once
    if id(t) in memo:
        return memo[id(t)]
    memo[id(t)] = None  # a cycle reads as unknown
    memo[id(t)] = _symbolic_dims(t, depth, memo)
    return memo[id(t)]


def _symbolic_dims(t: gs.Tensor, depth: int, memo: dict) -> list[Dim | None] | None:
    dims = _dims(t)
    # onnx names a dim it could not compute unk__N: a placeholder, not a symbol of the inputs
    known = None if dims is None else [None if isinstance(d, str) and d.startswith("unk__") else _as_dim(d)
                                       for d in dims]
    if known is not None and all(d is not None for d in known) or depth > 32:
        return known
    n = G.producer(t)
    derived = None
    if n is not None and n.op == "Split" and n.inputs:
        derived = _split_dims(n, t, depth, memo)
    elif n is not None and n.inputs and n.outputs[0] is t:
        derived = _derive_dims(n, depth, memo)
    if derived is None or (known is not None and len(derived) != len(known)):
        return known
    if known is None:
        return derived
    return [k if k is not None else d for k, d in zip(known, derived)]


def _broadcast_dims(shapes: list[list[Dim | None]]) -> list[Dim | None]:
    """Numpy broadcasting of symbolic dims: a dim of 1 broadcasts; among the others, one known
    static size wins (the rest are 1 or equal to it, or the op fails), else they must all be the
    same known Dim (a symbol that happens to be 1 then still gives the right size)."""
    r = max((len(sh) for sh in shapes), default=0)
    out: list[Dim | None] = []
    for axis in range(r):
        ds = [sh[axis - r + len(sh)] for sh in shapes if axis - r + len(sh) >= 0]
        big = [d for d in ds if d != Dim(1)]
        static = {d for d in big if d is not None and not d.syms}
        if not big:
            out.append(Dim(1))
        elif len(static) == 1:
            out.append(static.pop())
        elif not static and all(d is not None and d == big[0] for d in big):
            out.append(big[0])
        else:
            out.append(None)
    return out


def _split_dims(n: gs.Node, t: gs.Tensor, depth: int, memo: dict) -> list[Dim | None] | None:
    """Output t of a Split: its input's dims, with the split axis's size taken from the sizes."""
    xd = symbolic_dims(n.inputs[0], depth + 1, memo)
    k = next((i for i, o in enumerate(n.outputs) if o is t), None)
    if xd is None or k is None:
        return None
    axis = int(n.attrs.get("axis", 0))
    if not -len(xd) <= axis < len(xd):
        return None
    sizes = _const_ints(n.inputs[1]) if len(n.inputs) > 1 and n.inputs[1].name else None
    if sizes is None and n.attrs.get("split") is not None:
        sizes = np.asarray(n.attrs["split"], np.int64)
    if sizes is None or sizes.ndim != 1 or sizes.size != len(n.outputs):
        return None  # equal parts: t's inferred shape has them already when the axis is static
    return [Dim(int(sizes[k])) if i == axis % len(xd) else d for i, d in enumerate(xd)]


def _derive_dims(n: gs.Node, depth: int, memo: dict) -> list[Dim | None] | None:
    x = n.inputs[0]
    if n.op in G.SAME_SHAPE_OPS:
        return symbolic_dims(x, depth + 1, memo)
    if n.op == "Transpose":
        xd = symbolic_dims(x, depth + 1, memo)
        perm = n.attrs.get("perm")
        if xd is None:
            return None
        perm = list(range(len(xd)))[::-1] if perm is None else [int(p) for p in perm]
        return [xd[p] for p in perm] if sorted(perm) == list(range(len(xd))) else None
    if n.op == "MatMul" and len(n.inputs) == 2 and isinstance(n.inputs[1], gs.Constant) and len(n.inputs[1].shape) == 2:
        xd = symbolic_dims(x, depth + 1, memo)
        return None if xd is None or len(xd) < 2 else xd[:-1] + [Dim(int(n.inputs[1].shape[1]))]
    if n.op == "Flatten":
        xd = symbolic_dims(x, depth + 1, memo)
        if xd is None:
            return None
        axis = int(n.attrs.get("axis", 1))
        axis = axis + len(xd) if axis < 0 else axis
        if not 0 <= axis <= len(xd):
            return None
        lead, rest = xd[:axis], xd[axis:]
        return [None if None in lead else _dims_product(lead), None if None in rest else _dims_product(rest)]
    if n.op == "Reshape" and len(n.inputs) == 2:
        target = _const_ints(n.inputs[1])
        if target is None:  # a target computed from shapes at run time: onnxrep.symbolic follows it
            return _evaluated_dims(n.outputs[0])
        xd = symbolic_dims(x, depth + 1, memo)
        if target.ndim != 1:
            return None
        if xd is None:
            return _evaluated_dims(n.outputs[0])
        out: list[Dim | None] = []
        for i, v in enumerate(int(v) for v in target):
            if v == 0 and not int(n.attrs.get("allowzero", 0)):
                out.append(xd[i] if i < len(xd) else None)
            else:
                out.append(Dim(v) if v >= 0 else None)
        if target.tolist().count(-1) == 1:
            i = target.tolist().index(-1)
            others = out[:i] + out[i + 1:]
            out[i] = None if any(d is None for d in others) else _dim_div(_dims_product(xd), _dims_product(others))
        if None in out:  # the input's dims come from shape arithmetic (zeros of a run-time shape)
            ev = _evaluated_dims(n.outputs[0])
            out = out if ev is None or len(ev) != len(out) else [d if d is not None else e for d, e in zip(out, ev)]
        return out
    if n.op in _BROADCASTING:
        shapes = [symbolic_dims(i, depth + 1, memo) if i.name else None for i in n.inputs]
        return None if any(sh is None for sh in shapes) else _broadcast_dims(shapes)
    if n.op == "MatMul" and len(n.inputs) == 2:  # both operands computed: batch axes broadcast
        a, b = (symbolic_dims(i, depth + 1, memo) for i in n.inputs)
        if a is None or b is None or len(a) < 2 or len(b) < 2:
            return None
        return _broadcast_dims([a[:-2], b[:-2]]) + [a[-2], b[-1]]
    return None


def _evaluated_dims(t: gs.Tensor) -> list[Dim | None] | None:
    """t's dims from onnxrep.symbolic's evaluator (exact for every value of the symbols), those of
    the form coef · Π symbols as Dims, the others None; None when it cannot tell."""
    from . import symbolic as S

    try:
        dims = S.Evaluator().shape(t)
    except (S.Unknown, ValueError, TypeError, IndexError, KeyError, AttributeError):
        return None  # a helper of constant folding: never its failure
    out: list[Dim | None] = []
    for d in dims:
        terms = d.terms()
        if len(terms) == 1 and next(iter(terms.values())) > 0:
            (mono, coef), = terms.items()
            out.append(Dim(int(coef), tuple(mono)))
        else:
            out.append(Dim(0) if not terms else None)
    return out


_SYMBOLIC_LEN = 8  # shape values longer than this are not shape arithmetic


def shape_value(t: gs.Tensor, depth: int = 0) -> list | None:
    """The value of a small int tensor computed from shapes, per element: an int, the name of a
    symbolic dim (str), or None (unknown); None when it is not shape arithmetic of this kind."""
    if depth > 16:
        return None
    if isinstance(t, gs.Constant):
        v = _const_ints(t)
        return None if v is None or v.size > _SYMBOLIC_LEN else [int(x) for x in v.reshape(-1)]
    n = G.producer(t)
    if n is not None and n.op == "Constant":
        v = n.attrs.get("value")
        if isinstance(v, gs.Constant):
            return shape_value(v, depth + 1)
        ints = n.attrs.get("value_ints", n.attrs.get("value_int"))
        return None if ints is None else [int(x) for x in np.asarray(ints).reshape(-1)][:_SYMBOLIC_LEN + 1]
    if n is None or not n.inputs:
        return None
    if n.op == "Shape":
        dims = _dims(n.inputs[0])
        if dims is None:
            return None
        start, end = shape_slice(len(dims), int(n.attrs.get("start", 0)),
                                 None if n.attrs.get("end") is None else int(n.attrs["end"]))
        out = [int(d) if _static(d) else (d if isinstance(d, str) and d else None) for d in dims[start:end]]
        if any(v is None or (isinstance(v, str) and v.startswith("unk__")) for v in out):
            # a dim onnx could not compute: followed as a product of the inputs' symbolic dims
            derived = symbolic_dims(n.inputs[0], depth + 1)
            if derived is not None and len(derived) == len(dims):
                out = [d.plain() if d is not None else v for v, d in zip(out, derived[start:end])]
        return out
    if n.op in ("Squeeze", "Unsqueeze", "Reshape", "Identity", "Flatten"):
        v = shape_value(n.inputs[0], depth + 1)
        return v if v is not None and len(v) == 1 else None  # one element keeps its value
    if n.op == "Cast" and int(n.attrs.get("to", 0)) in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
        return shape_value(n.inputs[0], depth + 1)
    if n.op == "Concat" and int(n.attrs.get("axis", 0)) in (0, -1):
        parts = [shape_value(i, depth + 1) for i in n.inputs]
        return None if any(p is None for p in parts) else [x for p in parts for x in p]
    if n.op in ("Mul", "Add", "Sub") and len(n.inputs) == 2:  # arithmetic on one dim (H·W): unknown
        a, b = (shape_value(i, depth + 1) for i in n.inputs)
        if a is None or b is None or len(a) != 1 or len(b) != 1:
            return None
        if all(isinstance(v, (int, np.integer)) for v in (a[0], b[0])):
            return [int({"Mul": a[0] * b[0], "Add": a[0] + b[0], "Sub": a[0] - b[0]}[n.op])]
        if n.op == "Mul":
            prod = _dim_mul(_as_dim(a[0]), _as_dim(b[0]))
            return [None if prod is None else prod.plain()]
        return [None]
    if n.op in ("Gather", "Slice"):
        v = shape_value(n.inputs[0], depth + 1)
        if v is None:
            return None
        picked = _pick(n, n.inputs[0], v)
        return None if picked is None else list(picked.reshape(-1))
    return None


def _reshape_copying_dims(graph: gs.Graph, node: gs.Node) -> int:
    """Reshape(x, Concat(Shape(x)[i], c)) with a symbolic dim i carried over at the same position →
    Reshape(x, [0, c]): 0 copies x's dim i (allowzero=0), which is what the shape arithmetic computed.
    allowzero=1 (the dynamo exporter's) becomes 0 when no entry is a literal 0."""
    if len(node.inputs) < 2 or isinstance(node.inputs[1], gs.Constant):
        return 0
    vals = shape_value(node.inputs[1])
    dims = _dims(node.inputs[0])
    if vals is None or dims is None:
        return 0
    if int(node.attrs.get("allowzero", 0)) and 0 in vals:
        return 0
    target = []
    for i, v in enumerate(vals):
        if isinstance(v, (int, np.integer)):
            target.append(int(v))
        elif isinstance(v, str) and i < len(dims) and dims[i] == v:
            target.append(0)
        else:
            return 0
    if target.count(-1) > 1 or 0 not in target:
        return 0  # nothing carried over: ordinary folding's business
    if "allowzero" in node.attrs:
        node.attrs["allowzero"] = 0
    node.inputs[1] = G.new_constant(graph, f"{node.name or 'reshape'}_shape", np.array(target, np.int64))
    return 1


def _reshape_one_unknown_dim(graph: gs.Graph, node: gs.Node) -> int:
    """Reshape(x, Concat(c0, .., e, .., ck)) with every entry a positive constant but one computed
    entry e (the exporters' `x.flatten(2)` as Concat(1, C, H·W) on a symbolic H, W) →
    Reshape(x, [c0, .., -1, .., ck]). Exact: a Reshape keeps the element count, so once the other
    entries are fixed, that count alone sets the remaining one, whatever e computed (allowzero too:
    no entry is 0)."""
    if len(node.inputs) < 2 or isinstance(node.inputs[1], gs.Constant):
        return 0
    vals = shape_value(node.inputs[1])
    if vals is None:
        return 0
    vals = _resolve_minus_one(node, vals)
    known = [v for v in vals if isinstance(v, (int, np.integer))]
    if len(known) != len(vals) - 1 or any(v <= 0 for v in known):
        return 0  # two unknowns (or a -1 beside one), or a 0 that copies / allows an empty dim
    target = [int(v) if isinstance(v, (int, np.integer)) else -1 for v in vals]
    node.inputs[1] = G.new_constant(graph, f"{node.name or 'reshape'}_shape", np.array(target, np.int64))
    return 1


def _resolve_minus_one(node: gs.Node, vals: list) -> list:
    """vals with its -1 replaced by the dim it stands for, when every other entry is known (ints,
    or products of symbolic dims) and the element count of the Reshape's input is known as such a
    product: `x.reshape(B, N, heads, -1)` on symbolic N is [B, N, heads, C/heads]. Else vals."""
    ints = [v for v in vals if isinstance(v, (int, np.integer))]
    if ints.count(-1) != 1 or any(v == 0 for v in ints):
        return vals
    i = next(j for j, v in enumerate(vals) if isinstance(v, (int, np.integer)) and v == -1)
    others = [_as_dim(v) for j, v in enumerate(vals) if j != i]
    xd = symbolic_dims(node.inputs[0])
    if xd is None or any(d is None for d in xd) or any(d is None for d in others):
        return vals
    d = _dim_div(_dims_product(xd), _dims_product(others))
    if d is None or (not d.syms and d.coef <= 0):
        return vals
    return vals[:i] + [d.plain()] + vals[i + 1:]


def _allowzero_without_zeros(node: gs.Node) -> int:
    """Reshape(allowzero=1) to a constant target without a 0 → allowzero=0: the attribute only
    says what a 0 entry means, so both read the same; rules then see one spelling of a Reshape."""
    if not int(node.attrs.get("allowzero", 0)) or len(node.inputs) < 2:
        return 0
    target = _const_ints(node.inputs[1])
    if target is None or np.any(target == 0):
        return 0
    node.attrs["allowzero"] = 0
    return 1


def _transpose_of_transpose(graph: gs.Graph, node: gs.Node) -> int:
    """Transpose(Transpose(x, p1), p2) → Transpose(x, p1[p2]) when the inner one has no other reader
    (the dynamo exporter's `k.transpose(1, 2)` then `.transpose(-2, -1)` in attention); readers
    read x directly when the composition is the identity. Exact: both only move elements."""
    inner = G.producer(node.inputs[0]) if node.inputs else None
    if inner is None or inner.op != "Transpose" or not inner.inputs:
        return 0
    mid = node.inputs[0]
    if len(mid.outputs) != 1 or G.is_graph_output(graph, mid):
        return 0
    x = inner.inputs[0]
    dims = _dims(x)
    rank = len(dims) if dims is not None else None

    def perm(n: gs.Node) -> list[int] | None:
        p = n.attrs.get("perm")
        if p is None:
            return None if rank is None else list(range(rank))[::-1]
        return [int(a) for a in p]

    p1, p2 = perm(inner), perm(node)
    if p1 is None or p2 is None or len(p1) != len(p2) or sorted(p1) != list(range(len(p1))) \
            or sorted(p2) != list(range(len(p2))):
        return 0
    composed = [p1[a] for a in p2]
    out = node.outputs[0] if node.outputs else None
    if composed == list(range(len(composed))) and out is not None and not G.is_graph_output(graph, out):
        G.bypass(node, x, graph)  # the pair cancels: readers read x
    else:
        node.inputs[0] = x
        node.attrs["perm"] = composed
    inner.inputs.clear()
    inner.outputs.clear()
    return 1


def _sequence_to_split(graph: gs.Graph, node: gs.Node) -> int:
    seq = node.outputs[0]
    if len(node.inputs) < 2 or not node.inputs[1].name or G.is_graph_output(graph, seq) or not seq.outputs:
        return 0
    x = node.inputs[0]
    split = _const_ints(node.inputs[1])
    axis = int(node.attrs.get("axis", 0))
    dims = _dims(x)
    if split is None or dims is None or not -len(dims) <= axis < len(dims):
        return 0
    axis %= len(dims)
    if split.ndim == 0:  # chunks of this size, the last one smaller
        d = dims[axis]
        if not _static(d) or int(split) <= 0:
            return 0
        size = int(split)
        sizes = [size] * (d // size) + ([d % size] if d % size else [])
    elif split.ndim == 1 and np.all(split >= 0):
        sizes = [int(s) for s in split]
        if _static(dims[axis]) and sum(sizes) != dims[axis]:
            return 0
    else:
        return 0
    k = len(sizes)
    taken: dict[int, gs.Tensor] = {}
    for reader in seq.outputs:
        if reader.op != "SequenceAt" or reader.inputs[0] is not seq or len(reader.inputs) < 2:
            return 0
        pos = _const_ints(reader.inputs[1])
        if pos is None or pos.size != 1 or not -k <= int(pos.reshape(-1)[0]) < k:
            return 0
        p = int(pos.reshape(-1)[0]) % k
        if p in taken:
            return 0
        taken[p] = reader.outputs[0]
    outs = [taken.get(p) or G.new_variable(graph, f"{seq.name}_part{p}", dtype=x.dtype) for p in range(k)]
    for reader in list(seq.outputs):
        reader.inputs.clear()
        reader.outputs.clear()
    inputs = [x]
    attrs = {"axis": axis}
    if G.opset(graph) >= 13:
        inputs.append(G.new_constant(graph, f"{seq.name}_split", np.array(sizes, np.int64)))
    else:
        attrs["split"] = sizes
    split_node = gs.Node("Split", name=G.unique_node_name(graph, node.name or "split"), attrs=attrs,
                         inputs=inputs, outputs=outs)
    graph.nodes.append(split_node)
    node.inputs.clear()
    node.outputs.clear()
    return 1


# -- size guard ------------------------------------------------------------------------------------
def _itemsize(dtype) -> int:
    try:
        return max(np.dtype(dtype).itemsize, 1)
    except TypeError:
        return 8


def _numel(dims) -> int | None:
    if dims is None or not all(_static(d) for d in dims):
        return None
    return math.prod(int(d) for d in dims)


def _broadcast(*shapes) -> list[int] | None:
    if any(s is None or not all(_static(d) for d in s) for s in shapes):
        return None
    r = max(len(s) for s in shapes)
    out = []
    for i in range(r):
        ds = [int(s[i - r + len(s)]) for s in shapes if i - r + len(s) >= 0]
        big = max(ds)
        if any(d not in (1, big) for d in ds):
            return None
        out.append(0 if 0 in ds else big)
    return out


def estimate_bytes(node: gs.Node) -> int | None:
    """An upper bound on the bytes `node`'s outputs take, known before it runs, or None."""
    outs = [o for o in node.outputs if o.name]
    shapes = [_numel(o.shape) for o in outs]
    if outs and all(n is not None for n in shapes):
        return sum(n * _itemsize(o.dtype) for n, o in zip(shapes, outs))
    item = max((_itemsize(o.dtype) for o in outs if o.dtype is not None), default=8)
    ins = [t for t in node.inputs if t.name]
    op = node.op
    if op == "ConstantOfShape":
        shape = _const_ints(ins[0]) if ins else None
        if shape is None or np.any(shape < 0):
            return None
        value = node.attrs.get("value")
        item = _itemsize(value.dtype) if isinstance(value, gs.Constant) else 4
        return math.prod(int(d) for d in shape.reshape(-1)) * item
    if op == "Expand" and len(ins) == 2:
        shape = _const_ints(ins[1])
        b = _broadcast(_dims(ins[0]), None if shape is None else shape.reshape(-1).tolist())
        return None if b is None else math.prod(b) * _itemsize(ins[0].dtype)
    if op == "Tile" and len(ins) == 2:
        reps, dims = _const_ints(ins[1]), _dims(ins[0])
        if reps is None or dims is None or not all(_static(d) for d in dims) or np.any(reps < 0):
            return None
        return math.prod(int(d) for d in dims) * math.prod(int(r) for r in reps.reshape(-1)) * _itemsize(ins[0].dtype)
    if op == "Range" and len(ins) == 3:
        vals = [G.const(t) for t in ins]
        if any(v is None or np.asarray(v).size != 1 for v in vals):
            return None
        start, limit, delta = (float(np.asarray(v).reshape(-1)[0]) for v in vals)
        if delta == 0 or not all(map(math.isfinite, (start, limit, delta))):
            return None
        return max(0, math.ceil((limit - start) / delta)) * _itemsize(ins[0].dtype)
    if op == "NonZero" and ins:  # [rank, count] int64 indices, count at most the input's size
        dims = _dims(ins[0])
        n = _numel(dims)
        return None if n is None else n * max(len(dims), 1) * 8
    if op in _SIZE_FROM_VALUES or node.subgraphs():
        return None
    sizes = [_numel(_dims(t)) for t in ins]
    if any(s is None for s in sizes):
        return None
    if op in _ELEMENTWISE:
        b = _broadcast(*[_dims(t) for t in ins])
        return None if b is None else math.prod(b) * item * max(len(outs), 1)
    # everything else (reshape, slice, gather, concat, matmul, ...) writes at most this much
    return max(sum(sizes), math.prod(sizes)) * item * max(len(outs), 1)


def _guard(limit: int, flog: FoldLog):
    def exclude(node: gs.Node) -> bool:
        if node.op in _RANDOM:
            return True
        try:
            est = estimate_bytes(node)
        except Exception:  # a malformed node: let graphsurgeon/ORT decide it cannot fold
            return True
        if est is None:
            return True  # next round, once the values that set its size are constants
        if est > limit:
            name = next((o.name for o in node.outputs if o.name), node.name)
            flog.too_large[name] = est
            return True
        return False

    return exclude


# -- the folding step ------------------------------------------------------------------------------
def _silence_onnxruntime() -> None:
    """The sessions graphsurgeon builds to fold log a failed evaluation at ERROR, in colour, on
    stderr: a node that cannot fold just stays a node, and a model that cannot run is reported by
    onnxrep in one line. (The one place onnxrep sets ORT's default logger.)"""
    try:
        import onnxruntime as ort

        ort.set_default_logger_severity(4)
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        pass



def fold_constants(graph: gs.Graph, options: FoldOptions | None = None) -> None:
    """One round: canonicalize exporter spellings, fold shapes, then let ORT (via graphsurgeon)
    evaluate every node whose inputs are constant and whose output is bounded by the fold limit."""
    options = options or FoldOptions()
    _silence_onnxruntime()
    canonicalize(graph)
    fold_shapes(graph)
    G.tidy(graph)
    G.read_folded_weights(graph)
    guard = _guard(options.fold_limit, fold_log(graph))
    _fold_subgraphs(graph, guard, options.fold_limit)
    if not _graphsurgeon_would_fold(graph, guard):  # its pass would copy the whole graph to change nothing
        if any(True for node in graph.nodes for _ in node.subgraphs()):
            G.tidy(graph)  # subgraphs _fold_subgraphs may have folded; the main graph is tidy already
        return
    try:
        with G.cycle_collection_paused():
            graph.fold_constants(fold_shapes=False, recurse_subgraphs=False, error_ok=True,
                                 size_threshold=options.fold_limit, should_exclude_node=guard)
    except Exception as e:  # folding is an optimization; a graph it cannot fold stays as it is
        log.debug("constant folding stopped: %s", e)
    finally:
        # its copy of the whole graph is garbage in reference cycles now, and the pipeline runs
        # with the collector paused (graph.cycle_collection_paused): free it before the next copy
        gc.collect()
    G.tidy(graph)


_NEVER_FOLDED = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}  # graphsurgeon's own list


def _graphsurgeon_would_fold(graph: gs.Graph, guard) -> bool:
    """Whether graphsurgeon's fold_constants (as fold_constants calls it) could change `graph`.
    It starts by copying the whole graph (every node and tensor), then evaluates the nodes whose
    inputs are all constants, and their descendants. Where no node qualifies it changes nothing,
    except in three cases it handles on the graph itself, answered True here: Constant nodes (it
    lowers them into constant tensors), an If with a constant condition (flattened) and local
    functions (folded in turn). A node qualifies as in graphsurgeon 0.6.1's is_foldable: not a
    (de)quantize op, every non-empty input a constant, every tensor its subgraphs read from
    outside constant, no attribute reference, and not excluded by `guard` (asked, as graphsurgeon
    asks it, only for nodes that pass the rest, so its notes of tensors over the fold limit are
    the same)."""
    if graph.functions:
        return True
    for node in graph.nodes:
        if node.op == "Constant":
            return True
        if node.op == "If" and node.inputs and isinstance(node.inputs[0], gs.Constant):
            return True
    for node in graph.nodes:
        if node.op in _NEVER_FOLDED:
            continue
        if not all(isinstance(t, gs.Constant) for t in node.inputs if not t.is_empty()):
            continue
        if not all(isinstance(t, gs.Constant) for sub in node.subgraphs()
                   for t in sub._foreign_tensors().values() if not t.is_empty()):
            continue
        if any(isinstance(v, gs.Node.AttributeRef) for v in node.attrs.values()):
            continue
        if not guard(node):
            return True
    return False


def _fold_subgraphs(graph: gs.Graph, guard, limit: int, depth: int = 0) -> None:
    """graphsurgeon's own recursion into If/Loop/Scan bodies drops should_exclude_node (0.6.1): a
    ConstantOfShape of 3e9 floats in a branch ORT never takes would be materialized. Recurse here,
    with the guard."""
    if depth > 16:
        return
    for node in graph.nodes:
        for sub in node.subgraphs():
            _fold_subgraphs(sub, guard, limit, depth + 1)
            try:
                sub.fold_constants(fold_shapes=False, recurse_subgraphs=False, flatten_subgraphs=False,
                                   error_ok=True, size_threshold=limit, should_exclude_node=guard,
                                   recurse_functions=False)
            except Exception as e:
                log.debug("constant folding of subgraph %s stopped: %s", sub.name, e)


def fold(graph: gs.Graph, work: onnx.ModelProto, infer, options: FoldOptions | None = None) -> None:
    """Fold to a fixed point (at most MAX_ROUNDS): folding turns computed Pad amounts, Reshape
    targets, ... into constants; inferring shapes again gives the tensors behind them static
    shapes, which lets the next round fold the Shape ops that read them."""
    for _ in range(MAX_ROUNDS):
        before = (len(graph.nodes), sum(isinstance(t, gs.Constant) for t in G.tensor_map(graph).values()))
        fold_constants(graph, options)
        after = (len(graph.nodes), sum(isinstance(t, gs.Constant) for t in G.tensor_map(graph).values()))
        if after == before:
            break
        skeleton = G.export_skeleton(graph, work).proto
        del skeleton.graph.value_info[:]
        G.update_shapes(graph, infer(skeleton))
