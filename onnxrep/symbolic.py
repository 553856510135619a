"""Symbolic evaluation of the exporters' shape and index arithmetic, for every value of the
symbolic dims at once (no sampling).

A slice assignment on a tensor with a symbolic batch (or H, W) is exported as index math over
Shape(...): Range(0, Shape(x)[0]) → Reshape → Expand → Unsqueeze → Concat → ScatterND indices,
Expand(c, Concat(Shape(x)[0:1], 16, 1, 18)) → ScatterND updates. `Evaluator.value(t)` computes such
a tensor as a function of the symbolic dims and of the element's own coordinates:

    t[i] = num[i] + Σ_m S_m[i]·m + Σ_a C_a[i]·i_a

where m runs over monomials of the symbols (products such as height·width; the symbols are the dim
names of the graph, every one an integer ≥ 0), i_a over the coordinates of the axes whose size is
symbolic, and num, S_m, C_a are NumPy integer (or, for num, float) arrays that broadcast to the
tensor's shape (size 1 on every symbolic axis, so they cannot depend on a symbolic coordinate
except through C_a). Dims are `Poly`s: polynomials with integer coefficients in the symbols, so a
token count height·width (a Reshape's -1 over [B, C, H, W], or Mul of two Shape entries) is a dim
like any other. A coordinate's coefficient C_a is a number, never a symbol: a product of a value
that varies along a symbolic axis and a symbol (i·W, row-major flattening) is refused.

Every op is evaluated exactly or refused with `Unknown(reason)`: a clamp, a comparison or a
broadcast is resolved only when it is provably the same for every value of the symbols (symbols
≥ 0; a constant ≥ 2**62, which is how exporters write "to the end", is taken as larger than any
dim). A value computed from data (a Conv output, a graph input's values) is Unknown; only the
*shapes* of such tensors are read, from `shape_of` (the caller's own knowledge, e.g. a padded
tensor's dims), from Slice/Transpose/Cast of a tensor of known shape, or from the dims the graph
declares (int or a named dim; onnx's `unk__N` placeholders are not symbols).

Supported ops: Shape, Size-free shape arithmetic (Gather, Slice, Concat, Unsqueeze, Squeeze,
Reshape, Expand, Transpose, Range, ConstantOfShape), Add/Sub/Mul/Neg/Div (Mul of two symbolic values
only when neither varies along a symbolic axis; Div only of numbers), Equal/Where (decided for all
symbol values), Cast/CastLike, Identity. A Reshape that regroups symbolic dims ([B, C, H, W] →
[B, C, H·W]) is followed when the value does not vary along the regrouped axes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import graph as G

#: exporters spell "to the end" as INT64_MAX (or INT32_MAX): at least this is "beyond any dim"
INFINITE = 1 << 62
#: largest array (elements) the evaluator materializes, and how many nodes it visits per query
MAX_ELEMENTS = 1 << 22
MAX_NODES = 4096


class Unknown(Exception):
    """The value cannot be computed for every value of the symbols; the message says why."""


Mono = tuple  # a monomial: sorted symbol names, with repeats (("height", "width") is height·width)


def _mono_value(mono: tuple, env: dict[str, int]) -> int:
    out = 1
    for s in mono:
        out *= env[s]
    return out


@dataclass(frozen=True)
class Poly:
    """const + Σ coef·monomial, a polynomial with integer coefficients in the symbols (integer dims
    ≥ 0): `height*width` is one term of degree 2. Equal polynomials are equal for every value of
    the symbols, so `==` compares dims; `nonneg` proves a sign for all of them or refuses."""

    const: int = 0
    coefs: tuple[tuple[Mono, int], ...] = ()

    @staticmethod
    def of(v) -> "Poly":
        if isinstance(v, Poly):
            return v
        if isinstance(v, str):
            return Poly(0, (((v,), 1),))
        return Poly(int(v))

    @staticmethod
    def make(const, coefs: dict) -> "Poly":
        return Poly(int(const), tuple(sorted((tuple(m), int(c)) for m, c in coefs.items() if c)))

    @staticmethod
    def monomial(mono, coef: int = 1) -> "Poly":
        mono = tuple(sorted(mono))
        return Poly(int(coef)) if not mono else Poly.make(0, {mono: coef})

    def terms(self) -> dict:
        """{monomial: coef}, the constant under ()."""
        out = dict(self.coefs)
        if self.const:
            out[()] = self.const
        return out

    @staticmethod
    def _from_terms(terms: dict) -> "Poly":
        const = terms.pop((), 0)
        return Poly.make(const, terms)

    def __add__(self, other) -> "Poly":
        o = Poly.of(other)
        d = dict(self.coefs)
        for s, c in o.coefs:
            d[s] = d.get(s, 0) + c
        return Poly.make(self.const + o.const, d)

    def __neg__(self) -> "Poly":
        return Poly(-self.const, tuple((s, -c) for s, c in self.coefs))

    def __sub__(self, other) -> "Poly":
        return self + (-Poly.of(other))

    def __mul__(self, other) -> "Poly":
        o = Poly.of(other)
        out: dict = {}
        for m1, c1 in self.terms().items():
            for m2, c2 in o.terms().items():
                m = tuple(sorted(m1 + m2))
                out[m] = out.get(m, 0) + c1 * c2
        return Poly._from_terms(out)

    def scale(self, k: int) -> "Poly":
        return Poly.make(self.const * k, {s: c * k for s, c in self.coefs})

    def divide(self, other) -> "Poly | None":
        """self / other when other is one term (c·monomial) dividing every term of self exactly,
        else None: the quotient is then exact for every value of the symbols."""
        o = Poly.of(other).terms()
        if len(o) != 1:
            return None
        ((m, c),) = o.items()
        out = {}
        for mono, k in self.terms().items():
            rest = list(mono)
            for s in m:
                if s not in rest:
                    return None
                rest.remove(s)
            if k % c:
                return None
            out[tuple(rest)] = out.get(tuple(rest), 0) + k // c
        return Poly._from_terms(out)

    @property
    def static(self) -> int | None:
        return None if self.coefs else self.const

    def nonneg(self) -> bool:
        """Provably ≥ 0 for every value of the symbols (all ≥ 0): every coefficient is. Sufficient,
        not necessary (H·W − H + 1 is refused): a proof never rests on a sample."""
        return self.const >= 0 and all(c >= 0 for _, c in self.coefs)

    def ge(self, other) -> bool:
        return (self - Poly.of(other)).nonneg()

    def subs(self, env: dict[str, int]) -> int:
        """The value for given symbol values."""
        return self.const + sum(c * _mono_value(m, env) for m, c in self.coefs)

    def __str__(self) -> str:
        parts = [("*".join(m) if c == 1 else f"{c}*{'*'.join(m)}") for m, c in self.coefs]
        if self.const or not parts:
            parts.append(str(self.const))
        return " + ".join(parts)


def product(dims) -> Poly:
    out = Poly(1)
    for d in dims:
        out = out * d
    return out


ONE = Poly(1)


def _is_int(a: np.ndarray) -> bool:
    return a.dtype.kind in "iub"


class Sym:
    """A tensor as num + Σ_s S_s·s + Σ_a C_a·i_a (see the module docstring). `terms` maps None to
    num, ("s", name) to S_name and ("i", axis) to C_axis; each array has the tensor's rank, size 1
    on symbolic axes and 1 or the dim on static ones."""

    def __init__(self, shape, terms: dict):
        self.shape = tuple(Poly.of(d) for d in shape)
        self.terms = {k: np.asarray(v) for k, v in terms.items()}
        self.terms.setdefault(None, np.zeros((1,) * len(self.shape), np.int64))
        for k, a in self.terms.items():
            if a.ndim != len(self.shape):
                raise Unknown(f"internal: term {k} has rank {a.ndim}, tensor rank {len(self.shape)}")
            if a.size > MAX_ELEMENTS:
                raise Unknown(f"a shape-arithmetic tensor of {a.size} elements is too large to follow")

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def num(self) -> np.ndarray:
        return self.terms[None]

    @property
    def numeric(self) -> bool:
        """No symbol and no coordinate terms: the value is a plain (broadcast) array."""
        return all(k is None or not np.any(a) for k, a in self.terms.items())

    def static_shape(self) -> tuple[int, ...] | None:
        dims = [d.static for d in self.shape]
        return None if any(d is None for d in dims) else tuple(dims)

    def array(self) -> np.ndarray:
        """The numeric value, full size (requires `numeric` and a static shape)."""
        shape = self.static_shape()
        if not self.numeric or shape is None:
            raise Unknown("value depends on the symbolic dims")
        return np.broadcast_to(self.num, shape)

    def instantiate(self, env: dict[str, int]) -> np.ndarray:
        """The concrete tensor for given symbol values (for tests: the proof never samples)."""
        shape = tuple(d.subs(env) for d in self.shape)
        out = np.broadcast_to(self.num, shape).astype(self.num.dtype)
        for k, a in self.terms.items():
            if k is None:
                continue
            if k[0] == "s":
                out = out + np.broadcast_to(a, shape) * _mono_value(k[1], env)
            else:
                ar = np.arange(shape[k[1]]).reshape([-1 if i == k[1] else 1 for i in range(len(shape))])
                out = out + np.broadcast_to(a, shape) * ar
        return np.broadcast_to(out, shape)

    def polys(self) -> list[Poly]:
        """A 1-D (or 0-D) static-length int tensor as its list of Polys (a shape vector)."""
        if self.rank > 1 or (self.rank == 1 and self.shape[0].static is None):
            raise Unknown("a shape vector of symbolic length")
        if any(k is not None and k[0] == "i" for k, a in self.terms.items() if np.any(a)):
            raise Unknown("internal: coordinate term on a static axis")
        n = 1 if self.rank == 0 else self.shape[0].static
        out = []
        for j in range(n):
            idx = (min(j, self.num.shape[0] - 1),) if self.rank else ()
            if not _is_int(self.num):
                raise Unknown("a shape vector that is not integer")
            coefs = {k[1]: int(a[(min(j, a.shape[0] - 1),) if self.rank else ()])
                     for k, a in self.terms.items() if k is not None}
            out.append(Poly.make(int(self.num[idx]), coefs))
        return out

    def component(self, j: int) -> "Sym":
        """Entry j of the last (static) axis, that axis removed: one index of a ScatterND's
        indices tensor as a function of the others."""
        last = self.rank - 1
        if self.shape[last].static is None or not 0 <= j < self.shape[last].static:
            raise Unknown("internal: component of a symbolic axis")
        terms = {k: np.take(a, min(j, a.shape[last] - 1), axis=last) for k, a in self.terms.items()}
        return Sym(self.shape[:last], terms)

    def depends_on(self) -> set[int]:
        """The axes along which the value varies (for some value of the symbols)."""
        axes = set()
        for k, a in self.terms.items():
            if k is not None and k[0] == "i" and np.any(a):
                axes.add(k[1])
            for ax in range(self.rank):
                if a.shape[ax] > 1 and np.any(np.diff(a, axis=ax)):
                    axes.add(ax)
        return axes

    def at(self, index: dict[int, int]) -> "Sym":
        """The value with the static axes in `index` fixed (kept with size 1)."""
        terms = {}
        for k, a in self.terms.items():
            sl = tuple(slice(min(index[ax], a.shape[ax] - 1), min(index[ax], a.shape[ax] - 1) + 1)
                       if ax in index else slice(None) for ax in range(self.rank))
            terms[k] = a[sl]
        shape = [ONE if ax in index else d for ax, d in enumerate(self.shape)]
        return Sym(shape, terms)

    def scalar(self) -> tuple[Poly, dict[int, int]]:
        """A value that varies along no static axis: its constant part and the (constant)
        coefficient of each symbolic coordinate it depends on."""
        const = {}
        coord = {}
        base = 0
        for k, a in self.terms.items():
            if a.size and np.any(a != a.reshape(-1)[0]):
                raise Unknown("internal: scalar() of a varying value")
            v = a.reshape(-1)[0] if a.size else 0
            if k is None:
                if not _is_int(a):
                    raise Unknown("an index that is not integer")
                base = int(v)
            elif k[0] == "s":
                const[k[1]] = int(v)
            elif int(v):
                coord[k[1]] = int(v)
        return Poly.make(base, const), coord


# -- array helpers ---------------------------------------------------------------------------------
def _zeros_like_terms(rank: int) -> np.ndarray:
    return np.zeros((1,) * rank, np.int64)


def _renumber(terms: dict, mapping) -> dict:
    """Move coordinate keys ("i", a) to ("i", mapping(a)) (mapping returns None to drop)."""
    out = {}
    for k, a in terms.items():
        if k is not None and k[0] == "i":
            m = mapping(k[1])
            if m is None:
                if np.any(a):
                    raise Unknown("internal: dropping a coordinate term")
                continue
            k = ("i", m)
        out[k] = a
    return out


def broadcast_dims(shapes: list[tuple[Poly, ...]]) -> tuple[Poly, ...]:
    r = max((len(s) for s in shapes), default=0)
    out = []
    for ax in range(r):
        ds = [s[ax - r + len(s)] for s in shapes if ax - r + len(s) >= 0]
        big = [d for d in ds if d != ONE]
        if not big:
            out.append(ONE)
        elif all(d == big[0] for d in big):
            out.append(big[0])
        else:
            raise Unknown(f"broadcast of dims {', '.join(map(str, ds))} is not the same for every value "
                          "of the symbols")
    return tuple(out)


def _align(s: Sym, shape: tuple[Poly, ...]) -> Sym:
    """s broadcast to `shape` (which broadcast_dims produced from s's shape and others)."""
    off = len(shape) - s.rank
    terms = {}
    for k, a in s.terms.items():
        terms[k] = a.reshape((1,) * off + a.shape)
    terms = _renumber(terms, lambda ax: ax + off)
    for ax in range(off, len(shape)):
        if s.shape[ax - off] != shape[ax]:  # a static 1 broadcast: nothing varies along it
            if s.shape[ax - off] != ONE:
                raise Unknown("internal: bad broadcast")
    return Sym(shape, terms)


def _combine(a: Sym, b: Sym, fn) -> Sym:
    shape = broadcast_dims([a.shape, b.shape])
    a, b = _align(a, shape), _align(b, shape)
    keys = set(a.terms) | set(b.terms)
    z = _zeros_like_terms(len(shape))
    return Sym(shape, {k: fn(a.terms.get(k, z), b.terms.get(k, z)) for k in keys})


def _fold_static_axis(terms: dict, ax: int, length: int) -> dict:
    """Turn the coordinate term of an axis that became static (length known) into numbers."""
    key = ("i", ax)
    if key not in terms:
        return terms
    c = terms.pop(key)
    shape = [1] * c.ndim
    shape[ax] = length
    ar = np.arange(length, dtype=np.int64).reshape(shape)
    terms[None] = terms[None] + c * ar
    return terms


def _shift_axis(terms: dict, ax: int, start: Poly) -> dict:
    """Coordinates along `ax` start at `start`: t_old = start + t_new."""
    key = ("i", ax)
    if key not in terms:
        return terms
    c = terms[key]
    terms = dict(terms)
    terms[None] = terms[None] + c * start.const
    for s, k in start.coefs:
        terms[("s", s)] = terms.get(("s", s), _zeros_like_terms(c.ndim)) + c * k
    return terms


def clamp_index(x: Poly, dim: Poly, what: str) -> Poly:
    """ONNX Slice's start/end resolution on an axis of size `dim`, for every symbol value."""
    if x.static is not None and x.static >= INFINITE:
        return dim
    if x.static is not None and x.static <= -INFINITE:
        return Poly(0)
    if x.static is not None and x.static < 0:
        x = x + dim
    if x.nonneg() and dim.ge(x):
        return x
    if (-x).nonneg():
        return Poly(0)
    if x.ge(dim):
        return dim
    raise Unknown(f"Slice {what} {x} on an axis of size {dim} depends on the symbolic dims")


def slice_dim(dim: Poly, start: Poly, end: Poly, step: int) -> tuple[Poly, Poly]:
    """(first index, length) of Slice(start, end, step) on an axis of size `dim`."""
    if step == 1:
        s = clamp_index(start, dim, "start")
        e = clamp_index(end, dim, "end")
        n = e - s
        if n.nonneg():
            return s, n
        if (-n).nonneg():
            return s, Poly(0)
        raise Unknown(f"Slice length {n} depends on the symbolic dims")
    d = dim.static
    if d is None or start.static is None or end.static is None:
        raise Unknown("a Slice with a step other than 1 on a symbolic axis")
    idx = range(d)[slice(start.static, end.static, step)]
    return Poly(idx.start if len(idx) else 0), Poly(len(idx))


def whole_copy(index: Sym, data_dims: tuple[Poly, ...]) -> bool:
    """Whether ScatterND indices are indices[i_0, ..., i_{k-1}] = (i_0, ..., i_{k-1}) over the whole
    of the data's first k axes, for every value of the symbols: the ScatterND then returns its
    updates, whatever the data (a slice_scatter over a full range, as torch writes `x[:, :] = y`)."""
    k = index.shape[-1].static if index.rank else None
    if k is None or index.rank - 1 != k or len(data_dims) < k:
        return False
    for j in range(k):
        c = index.component(j)
        deps = c.depends_on()
        if index.shape[j] != data_dims[j]:
            return False
        if not deps:  # an axis of size 1: its only index must be 0
            if data_dims[j] != ONE or c.scalar()[0] != Poly(0):
                return False
            continue
        if deps != {j}:
            return False
        if index.shape[j].static is not None:
            got = [c.at({j: i}).scalar()[0] for i in range(index.shape[j].static)]
            if got != [Poly(i) for i in range(index.shape[j].static)]:
                return False
        elif c.scalar() != (Poly(0), {j: 1}):
            return False
    return True


def declared_dims(t: gs.Tensor) -> tuple[Poly, ...] | None:
    if t.shape is None:
        return None
    out = []
    for d in t.shape:
        if isinstance(d, (int, np.integer)) and d >= 0:
            out.append(Poly(int(d)))
        elif isinstance(d, str) and d and not d.startswith("unk__"):
            out.append(Poly.of(d))
        else:
            return None
    return tuple(out)


def _attr(node: gs.Node, name: str, default=None):
    return node.attrs.get(name, default)


_INT_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
              onnx.TensorProto.UINT64, onnx.TensorProto.UINT32, onnx.TensorProto.UINT16, onnx.TensorProto.UINT8}




class Evaluator:
    """Values (`value`) and shapes (`shape`) of tensors, memoized per instance. `shape_of(t)` may
    give the shape of tensors the caller knows better than the graph (None: not one of those)."""

    def __init__(self, shape_of=None):
        self._shape_of = shape_of or (lambda t: None)
        self._values: dict[int, Sym | Unknown] = {}
        self._visits = 0

    # -- shapes --------------------------------------------------------------------------------
    def shape(self, t: gs.Tensor) -> tuple[Poly, ...]:
        known = self._shape_of(t)
        if known is not None:
            return tuple(known)
        c = G.const(t) if isinstance(t, gs.Constant) else None
        if c is not None:
            return tuple(Poly(int(d)) for d in np.shape(c))
        n = G.producer(t)
        if n is not None and n.outputs and n.outputs[0] is t:
            if n.op in ("Cast", "CastLike", "Identity", "Relu", "Neg") or n.op == "ScatterND":
                return self.shape(n.inputs[0])
            if n.op == "Slice":
                return self._slice_shape(n)
            if n.op == "Transpose":
                dims = self.shape(n.inputs[0])
                perm = _attr(n, "perm") or list(range(len(dims)))[::-1]
                return tuple(dims[p] for p in perm)
        try:
            return self.value(t).shape
        except Unknown:
            pass
        dims = declared_dims(t)
        if dims is None:
            dims = self._data_shape(t)
        if dims is None:
            raise Unknown(f"the shape of '{t.name}' is not known")
        return dims

    def _data_shape(self, t: gs.Tensor, depth: int = 0) -> tuple[Poly, ...] | None:
        """Dims of a data tensor whose declared shape has unknowns (onnx infers no dim for a Conv
        over symbolic H, W), derived from its producer: same-shape ops, broadcasting, Pad by
        constants, Conv/pooling with stride 1 (X + pads - dilation·(k-1)) or on static dims,
        Transpose, MatMul, and Expand / Reshape to a target this evaluator computes."""
        n = G.producer(t)
        declared = [None] * len(t.shape) if t.shape is not None else None
        if t.shape is not None:
            declared = [Poly(int(d)) if isinstance(d, (int, np.integer)) and d >= 0 else
                        Poly.of(d) if isinstance(d, str) and d and not d.startswith("unk__") else None
                        for d in t.shape]
            if all(d is not None for d in declared):
                return tuple(declared)
        if n is None or depth > 64 or n.outputs[0] is not t:
            return None
        got = None
        try:
            if n.op in G.SAME_SHAPE_OPS:
                got = self._data_shape(n.inputs[0], depth + 1)
            elif n.op in ("Add", "Sub", "Mul", "Div"):
                shapes = [self._shape_any(i, depth + 1) for i in n.inputs]
                got = None if None in shapes else broadcast_dims(shapes)
            elif n.op == "Pad":
                got = self._pad_shape(n, depth)
            elif n.op in ("Conv", "AveragePool", "MaxPool"):
                got = self._window_shape(n, depth)
            elif n.op == "Transpose":
                x = self._shape_any(n.inputs[0], depth + 1)
                perm = _attr(n, "perm")
                if x is not None:
                    perm = list(range(len(x)))[::-1] if perm is None else [int(p) for p in perm]
                    got = tuple(x[p] for p in perm) if sorted(perm) == list(range(len(x))) else None
            elif n.op == "MatMul":
                got = self._matmul_shape(n, depth)
            elif n.op == "Expand":
                x = self._shape_any(n.inputs[0], depth + 1)
                got = None if x is None else broadcast_dims([x, tuple(self._target(n.inputs[1]))])
            elif n.op == "Reshape":
                got = self._reshape_shape(n, depth)
        except Unknown:
            got = None
        if got is None or (declared is not None and len(declared) != len(got)):
            return None
        if declared is not None:
            got = tuple(d if d is not None else g for d, g in zip(declared, got))
        return tuple(got)

    def _matmul_shape(self, n: gs.Node, depth: int):
        """MatMul: [..., M, K] · [K, N] (numpy's rules; batch axes broadcast)."""
        a, b = (self._shape_any(i, depth + 1) for i in n.inputs[:2])
        if a is None or b is None or len(a) < 2 or len(b) < 2 or a[-1] != b[-2]:
            return None
        return broadcast_dims([a[:-2], b[:-2]]) + (a[-2], b[-1])

    def _reshape_shape(self, n: gs.Node, depth: int):
        """Reshape to a target the evaluator computes (a constant, or shape arithmetic), its 0s
        copied and its -1 inferred for every value of the symbols."""
        x = self._shape_any(n.inputs[0], depth + 1)
        if x is None:
            return None
        target = self._target(n.inputs[1])
        if not int(_attr(n, "allowzero", 0)):
            if any(d.static == 0 and i >= len(x) for i, d in enumerate(target)):
                return None
            target = [x[i] if d.static == 0 else d for i, d in enumerate(target)]
        if any(d.static is not None and d.static < -1 for d in target) or any(
                d.static is None and not d.nonneg() for d in target):
            return None
        if [d.static for d in target].count(-1) > 1:
            return None
        if -1 in [d.static for d in target]:
            target[[d.static for d in target].index(-1)] = self._infer_minus_one(x, target, n)
        elif product(x) != product(target):
            return None
        return tuple(target)

    def _shape_any(self, t: gs.Tensor, depth: int) -> tuple[Poly, ...] | None:
        if isinstance(t, gs.Constant):
            return tuple(Poly(int(d)) for d in t.shape)
        known = self._shape_of(t)
        if known is not None:
            return tuple(known)
        n = G.producer(t)
        if n is not None and n.op == "Slice" and n.outputs[0] is t and depth <= 64:
            try:
                return self._slice_shape(n)
            except Unknown:
                return None
        try:  # shape arithmetic, or a tensor built from it (ConstantOfShape zeros)
            return self.value(t).shape
        except Unknown:
            return self._data_shape(t, depth)

    def _pad_shape(self, n: gs.Node, depth: int):
        x = self._data_shape(n.inputs[0], depth + 1)
        if x is None or len(n.inputs) < 2 or len(n.inputs) > 3 and n.inputs[3].name:
            return None
        pads = G.const(n.inputs[1])
        if pads is None or len(pads) != 2 * len(x):
            return None
        return tuple(d + int(pads[a]) + int(pads[a + len(x)]) for a, d in enumerate(x))

    def _window_shape(self, n: gs.Node, depth: int):
        x = self._data_shape(n.inputs[0], depth + 1)
        if x is None or _attr(n, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET") or _attr(n, "ceil_mode", 0):
            return None
        r = len(x) - 2
        if n.op == "Conv":
            w = n.inputs[1].shape
            if w is None or any(not isinstance(d, (int, np.integer)) for d in w):
                return None
            channels, kernel = Poly(int(w[0])), [int(d) for d in w[2:]]
        else:
            channels, kernel = x[1], list(_attr(n, "kernel_shape"))
        pads = list(_attr(n, "pads", [0] * 2 * r))
        strides = list(_attr(n, "strides", [1] * r))
        dil = list(_attr(n, "dilations", [1] * r))
        out = [x[0], channels]
        for a in range(r):
            span = x[a + 2] + pads[a] + pads[a + r] - dil[a] * (kernel[a] - 1)
            if span.static is not None:
                out.append(Poly((span.static - 1) // strides[a] + 1))
            elif strides[a] == 1:
                out.append(span)
            else:
                return None
        return tuple(out)

    def _slice_shape(self, n: gs.Node) -> tuple[Poly, ...]:
        dims = list(self.shape(n.inputs[0]))
        for ax, start, end, step in self._slice_params(n, len(dims)):
            _, length = slice_dim(dims[ax], start, end, step)
            dims[ax] = length
        return tuple(dims)

    def _slice_params(self, n: gs.Node, rank: int):
        if len(n.inputs) >= 3:
            starts = self.value(n.inputs[1]).polys()
            ends = self.value(n.inputs[2]).polys()
            axes = (self._ints(n.inputs[3]) if len(n.inputs) > 3 and n.inputs[3].name
                    else list(range(len(starts))))
            steps = (self._ints(n.inputs[4]) if len(n.inputs) > 4 and n.inputs[4].name else [1] * len(starts))
        else:
            starts = [Poly(int(v)) for v in _attr(n, "starts", [])]
            ends = [Poly(int(v)) for v in _attr(n, "ends", [])]
            axes = list(_attr(n, "axes", range(len(starts))))
            steps = [1] * len(starts)
        if not (len(starts) == len(ends) == len(axes) == len(steps)):
            raise Unknown("Slice with inconsistent starts/ends/axes/steps")
        for ax, s, e, st in zip(axes, starts, ends, steps):
            if st == 0:
                raise Unknown("Slice step 0")
            yield int(ax) % rank, s, e, int(st)

    def _ints(self, t: gs.Tensor) -> list[int]:
        out = []
        for x in self.value(t).polys():
            if x.static is None:
                raise Unknown(f"'{t.name}' depends on the symbolic dims where a constant is needed")
            out.append(x.static)
        return out

    # -- values --------------------------------------------------------------------------------
    def value(self, t: gs.Tensor) -> Sym:
        got = self._values.get(id(t))
        if got is None:
            try:
                got = self._value(t)
            except Unknown as e:
                got = e
            except (ValueError, IndexError, TypeError, KeyError, AttributeError, OverflowError) as e:
                got = Unknown(f"cannot follow '{t.name}': {type(e).__name__}: {e}")
            self._values[id(t)] = got
        if isinstance(got, Unknown):
            raise got
        return got

    def _value(self, t: gs.Tensor) -> Sym:
        self._visits += 1
        if self._visits > MAX_NODES:
            raise Unknown("the index arithmetic is too large to follow")
        if isinstance(t, gs.Constant):
            c = G.const(t)
            if c is None:
                raise Unknown(f"'{t.name}' is not readable")
            c = np.asarray(c)
            if c.size > MAX_ELEMENTS:
                raise Unknown(f"constant '{t.name}' is too large to follow")
            return Sym(c.shape, {None: c.astype(np.int64) if c.dtype.kind in "iu" else c})
        n = G.producer(t)
        if n is None:
            raise Unknown(f"'{t.name}' is a graph input: its value is data")
        fn = getattr(self, f"_op_{n.op}", None)
        if fn is None or (n.domain or "") not in ("", "ai.onnx"):
            raise Unknown(f"'{t.name}' is computed by {n.op} '{n.name}', which is not shape arithmetic")
        if n.outputs[0] is not t:
            raise Unknown(f"'{t.name}' is a second output of {n.op} '{n.name}'")
        return fn(n)

    def _op_ScatterND(self, n):
        if _attr(n, "reduction", "none") not in ("none", b"none"):
            raise Unknown(f"ScatterND '{n.name}' with a reduction")
        if not whole_copy(self.value(n.inputs[1]), self.shape(n.inputs[0])):
            raise Unknown(f"ScatterND '{n.name}' writes part of a tensor")
        return self.value(n.inputs[2])

    def _op_Identity(self, n):
        return self.value(n.inputs[0])

    def _op_Shape(self, n):
        dims = list(self.shape(n.inputs[0]))
        r = len(dims)
        start = int(_attr(n, "start", 0))
        end = int(_attr(n, "end", r))
        start = min(max(start + r if start < 0 else start, 0), r)
        end = min(max(end + r if end < 0 else end, 0), r)
        dims = dims[start:end]
        terms = {None: np.array([d.const for d in dims], np.int64)}
        for s in sorted({s for d in dims for s, _ in d.coefs}):
            terms[("s", s)] = np.array([dict(d.coefs).get(s, 0) for d in dims], np.int64)
        return Sym([len(dims)], terms)

    def _cast(self, x: Sym, to: int) -> Sym:
        if to in _INT_TYPES:
            if _is_int(x.num):
                return Sym(x.shape, {**x.terms, None: x.num.astype(np.int64)})
            if x.numeric:
                return Sym(x.shape, {None: np.trunc(x.num).astype(np.int64)})
            raise Unknown("a float with symbolic terms cast to int")
        if to == onnx.TensorProto.BOOL:
            if x.numeric:
                return Sym(x.shape, {None: x.num != 0})
            raise Unknown("a symbolic value cast to bool")
        if not x.numeric:
            raise Unknown("a value that depends on the symbolic dims cast to float")
        np_type = onnx.helper.tensor_dtype_to_np_dtype(to)
        return Sym(x.shape, {None: x.num.astype(np_type).astype(np.float64)})

    def _op_Cast(self, n):
        return self._cast(self.value(n.inputs[0]), int(_attr(n, "to")))

    def _op_CastLike(self, n):
        dt = G.dtype_of(n.inputs[1])
        if dt is None:
            raise Unknown(f"CastLike '{n.name}': target type unknown")
        return self._cast(self.value(n.inputs[0]), onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dt)))

    def _op_Add(self, n):
        return _combine(self.value(n.inputs[0]), self.value(n.inputs[1]), np.add)

    def _op_Sub(self, n):
        return _combine(self.value(n.inputs[0]), self.value(n.inputs[1]), np.subtract)

    def _op_Neg(self, n):
        x = self.value(n.inputs[0])
        return Sym(x.shape, {k: -a for k, a in x.terms.items()})

    def _op_Mul(self, n):
        a, b = self.value(n.inputs[0]), self.value(n.inputs[1])
        if not a.numeric:
            a, b = b, a
        shape = broadcast_dims([a.shape, b.shape])
        a, b = _align(a, shape), _align(b, shape)
        if a.numeric:
            return Sym(shape, {k: v * a.num for k, v in b.terms.items()})
        # both depend on the symbols: a polynomial product, term by term
        for x in (a, b):
            if any(k is not None and k[0] == "i" and np.any(v) for k, v in x.terms.items()):
                raise Unknown(f"Mul '{n.name}' of a symbol and a value that varies along a symbolic axis")
            if not _is_int(x.num):
                raise Unknown(f"Mul '{n.name}' of a float that depends on the symbolic dims")
        out: dict = {}
        ta = {k: v for k, v in a.terms.items() if k is None or k[0] == "s"}
        tb = {k: v for k, v in b.terms.items() if k is None or k[0] == "s"}
        for ka, va in ta.items():
            for kb, vb in tb.items():
                mono = tuple(sorted((ka[1] if ka else ()) + (kb[1] if kb else ())))
                key = ("s", mono) if mono else None
                prod = va.astype(np.int64) * vb.astype(np.int64)
                out[key] = out[key] + prod if key in out else prod
        return Sym(shape, out)

    def _op_Div(self, n):
        a, b = self.value(n.inputs[0]), self.value(n.inputs[1])
        if not (a.numeric and b.numeric):
            raise Unknown(f"Div '{n.name}' of values that depend on the symbolic dims")
        shape = broadcast_dims([a.shape, b.shape])
        x, y = _align(a, shape).num, _align(b, shape).num
        if _is_int(x) and _is_int(y):
            if np.any(y == 0):
                raise Unknown("integer division by zero")
            q = np.abs(x) // np.abs(y) * np.sign(x) * np.sign(y)  # ONNX truncates toward zero
        else:
            q = x / y
        return Sym(shape, {None: q})

    def _op_Equal(self, n):
        d = _combine(self.value(n.inputs[0]), self.value(n.inputs[1]), np.subtract)
        if any(k is not None and k[0] == "i" and np.any(a) for k, a in d.terms.items()):
            raise Unknown(f"Equal '{n.name}' compares values that vary with a symbolic coordinate")
        bshape = np.broadcast_shapes(*[a.shape for a in d.terms.values()])
        out = np.zeros(bshape, bool)
        full = {k: np.broadcast_to(a, bshape) for k, a in d.terms.items()}
        for idx in np.ndindex(bshape):
            poly = Poly.make(0, {k[1]: int(a[idx]) for k, a in full.items() if k is not None})
            v = full[None][idx]
            if poly.static == 0:
                out[idx] = v == 0
            elif not _is_int(full[None]):
                raise Unknown(f"Equal '{n.name}' on a float that depends on the symbolic dims")
            elif (poly + int(v) - 1).nonneg() or (-(poly + int(v)) - 1).nonneg():
                out[idx] = False
            else:
                raise Unknown(f"Equal '{n.name}': {poly + int(v)} == 0 depends on the symbolic dims")
        return Sym(d.shape, {None: out})

    def _op_Where(self, n):
        c = self.value(n.inputs[0])
        if not c.numeric:
            raise Unknown(f"Where '{n.name}' with a condition that depends on the symbolic dims")
        x, y = self.value(n.inputs[1]), self.value(n.inputs[2])
        shape = broadcast_dims([c.shape, x.shape, y.shape])
        c, x, y = _align(c, shape), _align(x, shape), _align(y, shape)
        z = _zeros_like_terms(len(shape))
        keys = set(x.terms) | set(y.terms)
        return Sym(shape, {k: np.where(c.num.astype(bool), x.terms.get(k, z), y.terms.get(k, z)) for k in keys})

    def _op_Gather(self, n):
        data = self.value(n.inputs[0])
        idx = self.value(n.inputs[1]).array().astype(np.int64)
        ax = int(_attr(n, "axis", 0)) % max(data.rank, 1)
        size = data.shape[ax].static
        if size is None:
            raise Unknown(f"Gather '{n.name}' along a symbolic axis")
        if np.any((idx < -size) | (idx >= size)):
            raise Unknown(f"Gather '{n.name}' index out of range")
        idx = np.where(idx < 0, idx + size, idx)
        terms = {}
        for k, a in data.terms.items():
            terms[k] = np.take(a, idx if a.shape[ax] > 1 else np.zeros_like(idx), axis=ax)
        shape = data.shape[:ax] + tuple(Poly(d) for d in idx.shape) + data.shape[ax + 1:]
        terms = _renumber(terms, lambda a: a if a < ax else (None if a == ax else a + idx.ndim - 1))
        return Sym(shape, terms)

    def _op_Unsqueeze(self, n):
        x = self.value(n.inputs[0])
        axes = self._ints(n.inputs[1]) if len(n.inputs) > 1 else list(_attr(n, "axes"))
        r = x.rank + len(axes)
        axes = sorted(a % r for a in axes)
        keep = [a for a in range(r) if a not in axes]
        shape = [ONE] * r
        for new, old in zip(keep, range(x.rank)):
            shape[new] = x.shape[old]
        terms = {k: np.expand_dims(a, tuple(axes)) for k, a in x.terms.items()}
        terms = _renumber(terms, lambda a: keep[a])
        return Sym(shape, terms)

    def _op_Squeeze(self, n):
        x = self.value(n.inputs[0])
        if len(n.inputs) > 1 and n.inputs[1].name:
            axes = [a % x.rank for a in self._ints(n.inputs[1])]
        elif _attr(n, "axes") is not None:
            axes = [a % x.rank for a in _attr(n, "axes")]
        else:
            if any(d.static is None for d in x.shape):
                raise Unknown(f"Squeeze '{n.name}' without axes on symbolic dims")
            axes = [a for a, d in enumerate(x.shape) if d == ONE]
        if any(x.shape[a] != ONE for a in axes):
            raise Unknown(f"Squeeze '{n.name}' of an axis not provably 1")
        keep = [a for a in range(x.rank) if a not in axes]
        terms = {k: a.reshape([a.shape[i] for i in keep]) for k, a in x.terms.items()}
        terms = _renumber(terms, lambda a: keep.index(a) if a in keep else None)
        return Sym([x.shape[a] for a in keep], terms)

    def _op_Transpose(self, n):
        x = self.value(n.inputs[0])
        perm = list(_attr(n, "perm") or list(range(x.rank))[::-1])
        terms = {k: np.transpose(a, perm) for k, a in x.terms.items()}
        terms = _renumber(terms, lambda a: perm.index(a))
        return Sym([x.shape[p] for p in perm], terms)

    def _op_Concat(self, n):
        xs = [self.value(i) for i in n.inputs]
        r = xs[0].rank
        ax = int(_attr(n, "axis")) % r
        if any(x.rank != r for x in xs):
            raise Unknown(f"Concat '{n.name}' of different ranks")
        if any(x.shape[ax].static is None for x in xs):
            raise Unknown(f"Concat '{n.name}' along a symbolic axis")
        others = [x.shape[:ax] + x.shape[ax + 1:] for x in xs]
        if any(o != others[0] for o in others):
            raise Unknown(f"Concat '{n.name}': the other dims are not the same for every value of the symbols")
        keys = set().union(*[x.terms for x in xs])
        if any(k is not None and k[0] == "i" and k[1] == ax for k in keys):
            raise Unknown("internal: coordinate term on a static axis")
        terms = {}
        for k in keys:
            arrays = [x.terms.get(k, _zeros_like_terms(r)) for x in xs]
            common = list(np.broadcast_shapes(*[a.shape[:ax] + (1,) + a.shape[ax + 1:] for a in arrays]))
            parts = []
            for x, a in zip(xs, arrays):
                common[ax] = x.shape[ax].static
                parts.append(np.broadcast_to(a, common))
            terms[k] = np.concatenate(parts, axis=ax)
        shape = list(xs[0].shape)
        shape[ax] = Poly(sum(x.shape[ax].static for x in xs))
        return Sym(shape, terms)

    def _target(self, t: gs.Tensor) -> list[Poly]:
        return self.value(t).polys()

    def _op_Expand(self, n):
        x = self.value(n.inputs[0])
        target = tuple(self._target(n.inputs[1]))
        shape = broadcast_dims([x.shape, target])
        return _align(x, shape)

    def _op_ConstantOfShape(self, n):
        dims = self._target(n.inputs[0])
        v = _attr(n, "value")
        v = np.zeros(1, np.float32) if v is None else np.asarray(v.values if hasattr(v, "values") else v)
        v = v.reshape(-1)[0]
        arr = np.full((1,) * len(dims), v)
        return Sym(dims, {None: arr.astype(np.int64) if arr.dtype.kind in "iu" else arr})

    def _op_Range(self, n):
        start, limit, delta = (self.value(i).polys() for i in n.inputs[:3])
        start, limit, delta = start[0], limit[0], delta[0]
        if delta.static is None or delta.static == 0:
            raise Unknown(f"Range '{n.name}' with a symbolic or zero step")
        if start.static is not None and limit.static is not None:
            return Sym([len(range(start.static, limit.static, delta.static))],
                       {None: np.arange(start.static, limit.static, delta.static, dtype=np.int64)})
        if delta.static != 1:
            raise Unknown(f"Range '{n.name}' with a step other than 1 on symbolic bounds")
        length = limit - start
        if not length.nonneg():
            raise Unknown(f"Range '{n.name}': its length {length} may be negative")
        terms = {None: np.array([start.const], np.int64), ("i", 0): np.ones(1, np.int64)}
        terms.update({("s", s): np.array([c], np.int64) for s, c in start.coefs})
        if length.static is not None:
            terms = _fold_static_axis(terms, 0, length.static)
        return Sym([length], terms)

    def _op_Slice(self, n):
        x = self.value(n.inputs[0])
        shape = list(x.shape)
        terms = dict(x.terms)
        for ax, start, end, step in self._slice_params(n, x.rank):
            if shape[ax].static is not None:
                if start.static is None or end.static is None:
                    raise Unknown(f"Slice '{n.name}' with symbolic bounds on a static axis")
                idx = np.arange(shape[ax].static)[slice(start.static, end.static, step)]
                terms = {k: np.take(a, idx, axis=ax) if a.shape[ax] > 1 else a for k, a in terms.items()}
                shape[ax] = Poly(len(idx))
                continue
            first, length = slice_dim(shape[ax], start, end, step)
            terms = _shift_axis(terms, ax, first)
            if length.static is not None:
                terms = _fold_static_axis(terms, ax, length.static)
            shape[ax] = length
        return Sym(shape, terms)

    def _op_Reshape(self, n):
        x = self.value(n.inputs[0])
        target = self._target(n.inputs[1])
        allowzero = int(_attr(n, "allowzero", 0))
        dims = []
        for i, d in enumerate(target):
            if d.static == 0 and not allowzero:
                if i >= x.rank:
                    raise Unknown(f"Reshape '{n.name}': 0 beyond the input's rank")
                d = x.shape[i]
            dims.append(d)
        if sum(d.static == -1 for d in dims) > 1:
            raise Unknown(f"Reshape '{n.name}' with two -1")
        if any(d.static is not None and d.static < -1 for d in dims) or any(
                d.static is None and not d.nonneg() for d in dims):
            raise Unknown(f"Reshape '{n.name}': a target dim that may be negative")
        if -1 in [d.static for d in dims]:
            dims[[d.static for d in dims].index(-1)] = self._infer_minus_one(x.shape, dims, n)
        static_in, static_out = x.static_shape(), [d.static for d in dims]
        if static_in is not None and None not in static_out:
            if int(np.prod(static_in)) != int(np.prod(static_out)):
                raise Unknown(f"Reshape '{n.name}': element counts differ")
            return Sym(static_out, {k: np.broadcast_to(a, static_in).reshape(static_out) for k, a in x.terms.items()})
        # symbolic dims: the non-1 dims are cut into groups of equal products (row-major, such a
        # group keeps its elements together and every other coordinate unchanged); a group of one
        # dim on each side is the same axis, any other group ([H, W] → [H·W]) must not vary
        groups = _reshape_groups([d for d in x.shape if d != ONE], [d for d in dims if d != ONE])
        if groups is None:
            raise Unknown(f"Reshape '{n.name}' regroups symbolic dims into dims of different products")
        src_axes = [a for a, d in enumerate(x.shape) if d != ONE]
        dst_axes = [a for a, d in enumerate(dims) if d != ONE]
        mapping, flat = {}, set()
        for (i0, i1), (j0, j1) in groups:
            if i1 - i0 == 1 and j1 - j0 == 1:
                mapping[src_axes[i0]] = dst_axes[j0]
                continue
            for a in src_axes[i0:i1]:
                flat.add(a)
        for k, a in x.terms.items():
            for ax in flat:
                if (k is not None and k[0] == "i" and k[1] == ax and np.any(a)) or (
                        a.shape[ax] > 1 and np.any(np.diff(a, axis=ax))):
                    raise Unknown(f"Reshape '{n.name}' regroups symbolic dims of a value that varies along them")
        terms = {}
        for k, a in x.terms.items():
            if k is not None and k[0] == "i" and k[1] in flat:
                continue  # all zeros (checked above)
            shape = [1] * len(dims)
            sl = tuple(slice(0, 1) if ax in flat else slice(None) for ax in range(x.rank))
            a = a[sl]
            for old, new in mapping.items():
                shape[new] = a.shape[old]
            terms[k] = a.reshape(shape)
        return Sym(dims, _renumber(terms, lambda a: mapping.get(a)))

    @staticmethod
    def _infer_minus_one(src: tuple[Poly, ...], dims: list[Poly], n) -> Poly:
        """The -1 of a Reshape target: the input's element count over the other entries', exact
        for every value of the symbols (equal dims cancel first; what is left of the divisor must
        be one term c·monomial dividing every term of the dividend), or Unknown."""
        known = [d for d in dims if d.static != -1]
        rest = [d for d in src if d != ONE]
        divisor = []
        for d in known:
            if d == ONE:
                continue
            if d in rest:
                rest.remove(d)
            else:
                divisor.append(d)
        q = product(rest).divide(product(divisor))
        if q is None:
            raise Unknown(f"Reshape '{n.name}': cannot infer its -1 for every value of the symbols")
        return q


def _reshape_groups(src: list[Poly], dst: list[Poly]):
    """[((i0, i1), (j0, j1)), ...]: src[i0:i1] and dst[j0:j1] have equal products (as polynomials,
    so for every value of the symbols), each group the shortest such from where the last ended;
    None when no cut covers both lists."""
    out, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        found = None
        for size in range(2, len(src) - i + len(dst) - j + 1):
            for a in range(1, size):
                b = size - a
                if i + a <= len(src) and j + b <= len(dst) and product(src[i:i + a]) == product(dst[j:j + b]):
                    found = (a, b)
                    break
            if found:
                break
        if found is None:
            return None
        out.append(((i, i + found[0]), (j, j + found[1])))
        i, j = i + found[0], j + found[1]
    return out
