"""Runtime-fusable patterns: the written-out activations and normalizations that runtimes fuse whole.

ONNX Runtime (and TensorRT, OpenVINO, QNN) replace a written-out GELU, LayerNorm, RMSNorm or SiLU
by one fused kernel at load time, but only when the whole subgraph is there. A rewrite that takes
one of its pieces (GELU's Mul(0.5) folded into the next conv: exact, one node fewer) leaves five
element-wise kernels where there was one. So these subgraphs are atomic: `find` names them, and
`linear.affine_of` refuses a Mul/Add/Sub/Div that belongs to one (the decline says which).

    pattern      function of x                                   written out, e.g.
    GELU         x·Φ(x) = ½x(1 + erf(x/√2))                      Div → Erf → Add → Mul → Mul
    tanh-GELU    ½x(1 + tanh(√(2/π)(x + 0.044715x³)))            Pow/Mul → Mul → Add → Mul → Tanh → ...
    SiLU         x·σ(x)                                          Sigmoid → Mul
    HardSwish    x·clip(x/6 + ½, 0, 1)                           HardSigmoid → Mul, Add → Clip → Mul → Div
    HardSigmoid  clip(x/6 + ½, 0, 1)                             Add → Clip → Div
    Mish         x·tanh(softplus(x))                             Softplus → Tanh → Mul
    LayerNorm    (x − E x)/√(Var x + ε) (· γ + β)                ReduceMean → Sub → Pow → ReduceMean → Add
                                                                 → Sqrt → Div (→ Mul → Add)
    RMSNorm      x/√(E x² + ε) (· γ)                             Pow → ReduceMean → Add → Sqrt → Div (→ Mul)
    Softmax      exp(x − max x)/Σ exp(x − max x)                 ReduceMax → Sub → Exp → ReduceSum → Div

Recognition is by what a subgraph computes, not by how it is spelled, so every operand order and
placement of the constants is one case (both orders of GELU's two Muls, `x*0.5` first, Mul by 1/√2
instead of Div by √2, Relu6 as Clip or as Max/Min, Reciprocal then Mul for Div, Cast/CastLike
around constants). Around each characteristic op (Erf, Tanh, Sigmoid, Clip, ReduceMean, Exp, ...)
the candidate inputs x (tensors above it) and ends (nodes below it) are tried, farthest first; a
candidate region is every node between x and the end, and it is taken when

  * it reads no tensor but x and constants (scalars; LayerNorm's γ and β are matched apart),
  * nothing outside it reads an intermediate and no intermediate is a graph output (a runtime
    cannot fuse a pattern whose pieces are used elsewhere, so neither is it protected), and
  * evaluated in float64 on probe inputs (a 1-D sweep over [−7, 7]; for reductions a random tensor
    of x's rank with different sizes per axis) it equals the reference function to 1e-5.

The engine computes the index once per sweep (it is invalidated when a rule changes the graph) and
makes it the active one while rules run (`protecting`); `claim(node)` answers from it.
"""
from __future__ import annotations

import collections
import contextlib
import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import graph as G

NAMES = {"gelu": "GELU", "gelu_tanh": "tanh-GELU", "silu": "SiLU", "hardswish": "HardSwish",
         "hardsigmoid": "HardSigmoid", "mish": "Mish", "layernorm": "LayerNorm", "rmsnorm": "RMSNorm",
         "softmax": "Softmax"}

# ops a pattern may contain (all evaluated by _eval); the characteristic ops a search starts at
EVAL_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Exp", "Log", "Erf", "Tanh",
                      "Sigmoid", "HardSigmoid", "Relu", "Clip", "Min", "Max", "Softplus", "Cast", "CastLike",
                      "Identity", "ReduceMean", "ReduceSum", "ReduceMax"})
CORE_OPS = frozenset({"Erf", "Tanh", "Sigmoid", "HardSigmoid", "Clip", "Relu", "Max", "Min", "Softplus", "Exp",
                      "ReduceMean"})
REDUCE_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax"})
FLOAT_TYPES = {1, 10, 11, 16}  # TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16
MAX_UP, MAX_DOWN, MAX_NODES = 6, 10, 24
TOL = 1e-5
HALF_TOL = 1e-2  # bfloat16 keeps 8 bits: its 1/√2 is off by 3e-3


@dataclass
class Pattern:
    kind: str  # a key of NAMES
    x: gs.Tensor
    out: gs.Tensor
    nodes: list  # producers first; the last one writes `out`
    axes: tuple = ()  # normalized / reduced axes (non-negative), for the normalizations
    epsilon: float = 0.0
    scale: gs.Tensor | None = None  # LayerNorm's γ / RMSNorm's weight, when written out after it
    bias: gs.Tensor | None = None  # LayerNorm's β

    @property
    def name(self) -> str:
        return NAMES[self.kind]

    @property
    def spelling(self) -> str:
        return "→".join(n.op for n in self.nodes)


class Index:
    """The patterns of a graph, computed on first use after `invalidate`."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self._by_node: dict | None = None
        self._patterns: list[Pattern] = []

    def invalidate(self) -> None:
        self._by_node = None

    def _build(self) -> dict:
        if self._by_node is None:
            self._patterns = find(self.graph)
            # the node is kept in the value so that its id cannot be reused while the index lives
            self._by_node = {id(n): (n, p) for p in self._patterns for n in p.nodes}
        return self._by_node

    def of(self, node: gs.Node) -> Pattern | None:
        hit = self._build().get(id(node))
        return hit[1] if hit is not None and hit[0] is node else None

    @property
    def patterns(self) -> list[Pattern]:
        self._build()
        return list(self._patterns)


_ACTIVE: list[Index] = []


@contextlib.contextmanager
def protecting(index: Index):
    """Within this block `claim` answers from `index` (engine.run sets it for its graph)."""
    _ACTIVE.append(index)
    try:
        yield
    finally:
        _ACTIVE.pop()


def claim(node: gs.Node) -> Pattern | None:
    """The runtime-fusable pattern `node` belongs to in the graph being rewritten, or None."""
    return _ACTIVE[-1].of(node) if _ACTIVE else None


def decline_reason(node: gs.Node, p: Pattern) -> str:
    return (f"{node.op}'s constant belongs to a {p.name} pattern ({p.spelling}) that runtimes fuse whole"
            if any(isinstance(t, gs.Constant) for t in node.inputs)
            else f"{node.op} belongs to a {p.name} pattern ({p.spelling}) that runtimes fuse whole")


# -- search ----------------------------------------------------------------------------------------
def find(graph: gs.Graph) -> list[Pattern]:
    """Every runtime-fusable pattern of the graph, none sharing a node."""
    found: list[Pattern] = []
    taken: set[int] = set()
    outputs = {id(t) for t in graph.outputs}
    for node in list(graph.nodes):
        if node.op not in CORE_OPS or id(node) in taken or not node.outputs:
            continue
        p = _match_at(node, outputs, taken)
        if p is not None:
            found.append(p)
            taken.update(id(n) for n in p.nodes)
    return found


def _match_at(core: gs.Node, outputs: set, taken: set) -> Pattern | None:
    xs = [(x, _below(x)) for x in _inputs_above(core)]
    for end in _nodes_below(core):
        for x, under_x in xs:
            if id(end) not in under_x or id(core) not in under_x:
                continue
            nodes = _region(x, end, core, outputs, taken, under_x)
            if nodes is None:
                continue
            kind, axes, eps = _identify(x, end, nodes)
            if kind is None:
                continue
            p = Pattern(kind, x, end.outputs[0], nodes, axes, eps)
            if kind in ("layernorm", "rmsnorm"):
                _take_affine_tail(p, outputs, taken)
            return p
    return None


def _inputs_above(core: gs.Node) -> list[gs.Tensor]:
    """Non-constant tensors above `core` through EVAL_OPS, farthest first."""
    seen: dict[int, tuple[int, gs.Tensor]] = {}
    frontier = [(t, 0) for t in core.inputs]
    while frontier:
        t, d = frontier.pop()
        if isinstance(t, gs.Constant) or not t.name or d > MAX_UP:
            continue
        if id(t) in seen and seen[id(t)][0] <= d:  # keep each tensor's shortest distance
            continue
        seen[id(t)] = (d, t)
        up = G.producer(t)
        if up is not None and up.op in EVAL_OPS:
            frontier.extend((i, d + 1) for i in up.inputs)
    return [t for _, t in sorted(seen.values(), key=lambda v: -v[0])]


def _below(x: gs.Tensor) -> set[int]:
    """ids of the EVAL_OPS nodes that compute a function of x alone (their inputs are x, constants
    or outputs of such nodes), at most MAX_UP + MAX_DOWN steps below x. Every node of a region on
    x is one, so only ends among them are tried, and a region walk stops at any other node."""
    pure: set[int] = set()
    depth = {id(x): 0}
    frontier = collections.deque(x.outputs)
    while frontier:  # a node is (re)checked whenever one of its inputs became a function of x
        n = frontier.popleft()
        if id(n) in pure or n.op not in EVAL_OPS:
            continue
        ds = []
        for t in n.inputs:
            if isinstance(t, gs.Constant) or not t.name:
                continue
            if id(t) not in depth:
                break
            ds.append(depth[id(t)])
        else:
            d = max(ds, default=0) + 1
            if d > MAX_UP + MAX_DOWN:
                continue
            pure.add(id(n))
            for o in n.outputs:
                depth[id(o)] = d
                frontier.extend(o.outputs)
    return pure


def _nodes_below(core: gs.Node) -> list[gs.Node]:
    """`core` and the EVAL_OPS nodes below it, farthest first."""
    depth = {id(core): (0, core)}
    frontier = [core]
    while frontier:
        n = frontier.pop(0)
        d = depth[id(n)][0]
        if d >= MAX_DOWN:
            continue
        for o in n.outputs:
            for r in o.outputs:
                if r.op in EVAL_OPS and id(r) not in depth:
                    depth[id(r)] = (d + 1, r)
                    frontier.append(r)
    return [n for _, n in sorted(depth.values(), key=lambda v: -v[0])]


def _region(x, end, core, outputs, taken, under_x) -> list | None:
    """The nodes between x and end (producers first), if they form a private region that reads
    only x and scalar constants, contains `core`, and has at least two nodes."""
    nodes: dict[int, gs.Node] = {}
    order: list[gs.Node] = []
    reads_x = False

    def visit(n) -> bool:
        nonlocal reads_x
        if id(n) in nodes:
            return True
        if id(n) not in under_x or id(n) in taken or len(nodes) >= MAX_NODES:
            return False
        nodes[id(n)] = n
        for t in n.inputs:
            if t is x:
                reads_x = True
            elif isinstance(t, gs.Constant):
                if t.shape is None or math.prod(t.shape) != 1:
                    if not (n.op in REDUCE_OPS and t is n.inputs[1]):  # a Reduce's axes input
                        return False
            elif t.name:
                up = G.producer(t)
                if up is None or not visit(up):
                    return False
        order.append(n)
        return True

    try:
        if not visit(end) or not reads_x or id(core) not in nodes or len(nodes) < 2:
            return None
    finally:
        del visit  # a recursive closure is a reference cycle (it holds the graph's nodes): refcounting frees it now
    for n in order:
        for o in n.outputs:
            if o is end.outputs[0]:
                continue
            if id(o) in outputs or any(id(r) not in nodes for r in o.outputs):
                return None
    return order


# -- identification --------------------------------------------------------------------------------
_SWEEP = np.concatenate([np.linspace(-7.0, 7.0, 57), [-2.9, -0.3, 0.1, 0.45, 2.6, 3.0, -3.0]])


def _references(x):
    erf = np.vectorize(math.erf)
    sig = 1.0 / (1.0 + np.exp(-x))
    hsig = np.clip(x / 6.0 + 0.5, 0.0, 1.0)
    return {
        "gelu": 0.5 * x * (1.0 + erf(x / math.sqrt(2.0))),
        "gelu_tanh": 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3))),
        "silu": x * sig,
        "hardswish": x * hsig,
        "hardsigmoid": hsig,
        "mish": x * np.tanh(np.logaddexp(0.0, x)),
    }


def _identify(x, end, nodes) -> tuple[str | None, tuple, float]:
    reduces = [n for n in nodes if n.op in REDUCE_OPS]
    try:
        tol = _tolerance(x, nodes)
        if not reduces:
            y = _eval(x, _SWEEP, end, nodes)
            return _closest(y, _references(_SWEEP), tol), (), 0.0
        r = G.rank(x)
        if r is None or r < 1:
            return None, (), 0.0
        axes = {_axes(n, r) for n in reduces}
        if len(axes) != 1 or None in axes:
            return None, (), 0.0
        ax = next(iter(axes))
        sizes = tuple((2, 5, 4, 3, 6, 7, 2, 3)[i % 8] for i in range(r))
        probe = np.random.default_rng(0).standard_normal(sizes) * 3.0 + 0.5
        y = _eval(x, probe, end, nodes)
        eps = _epsilon(nodes)
        m = probe.mean(axis=ax, keepdims=True)
        refs = {"layernorm": (probe - m) / np.sqrt(((probe - m) ** 2).mean(axis=ax, keepdims=True) + eps),
                "rmsnorm": probe / np.sqrt((probe ** 2).mean(axis=ax, keepdims=True) + eps)}
        if len(ax) == 1:
            e = np.exp(probe - probe.max(axis=ax, keepdims=True))
            refs["softmax"] = e / e.sum(axis=ax, keepdims=True)
        kind = _closest(y, {k: v for k, v in refs.items() if v.shape == np.shape(y)}, tol)
        if kind is not None:
            return kind, ax, eps if kind != "softmax" else 0.0
    except _NoEval:
        pass
    return None, (), 0.0


def _closest(y, refs: dict, tol: float) -> str | None:
    """The reference y is nearest to, if within tol (relative, at least 1): the nearest, because in
    half precision erf-GELU and tanh-GELU are both within the tolerance."""
    best, best_err = None, tol
    for kind, ref in refs.items():
        err = _error(y, ref)
        if err <= best_err:
            best, best_err = kind, err
    return best


def _error(y, ref) -> float:
    try:
        y, ref = np.broadcast_arrays(y, ref)
    except ValueError:
        return math.inf
    if not np.all(np.isfinite(y)):
        return math.inf
    return float(np.max(np.abs(y - ref) / np.maximum(1.0, np.abs(ref)), initial=0.0))


def _tolerance(x, nodes) -> float:
    """1e-5 for fp32/fp64 constants; half-precision constants (√2 is 1.4140625 in fp16) are only
    that close to the reference function."""
    dts = [G.dtype_of(x)] + [G.dtype_of(t) for n in nodes for t in n.inputs if isinstance(t, gs.Constant)]
    sizes = [d.itemsize for d in dts if d is not None and np.issubdtype(d, np.floating)]
    return TOL if not sizes or min(sizes) >= 4 else HALF_TOL


def _epsilon(nodes) -> float:
    """The scalar added to a reduction's output (the ε under the square root), 0 if none."""
    for n in nodes:
        if n.op == "Add":
            for a, b in (n.inputs, n.inputs[::-1]):
                up = G.producer(a)
                if up is not None and up.op in REDUCE_OPS and isinstance(b, gs.Constant):
                    v = G.const(b)
                    if v is not None and v.size == 1:
                        return float(np.asarray(v, dtype=np.float64).reshape(-1)[0])
    return 0.0


def _axes(n: gs.Node, r: int) -> tuple | None:
    if int(n.attrs.get("keepdims", 1)) != 1:
        return None
    axes = n.attrs.get("axes")
    if len(n.inputs) > 1 and n.inputs[1].name:
        v = G.const(n.inputs[1])
        if v is None:
            return None
        axes = v.reshape(-1).tolist()
    if axes is None or len(axes) == 0:
        if int(n.attrs.get("noop_with_empty_axes", 0)):
            return None
        return tuple(range(r))
    return tuple(sorted({int(a) % r for a in axes}))


class _NoEval(Exception):
    pass


def _eval(x: gs.Tensor, probe: np.ndarray, end: gs.Node, nodes: list) -> np.ndarray:
    """The region's output for x = probe, in float64 (nodes are producers first)."""
    values = {id(x): probe}

    def val(t):
        if id(t) in values:
            return values[id(t)]
        v = G.const(t)
        if v is None:
            raise _NoEval(t.name)
        return np.asarray(v, dtype=np.float64)

    with np.errstate(all="ignore"):
        for n in nodes:
            values[id(n.outputs[0])] = _apply(n, val, len(probe.shape))
    return values[id(end.outputs[0])]


def _apply(n: gs.Node, val, rank: int) -> np.ndarray:
    op = n.op
    ins = [val(t) if t.name else None for t in n.inputs]
    a = ins[0]
    if op in ("Add", "Sub", "Mul", "Div", "Pow"):
        b = ins[1]
        return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power}[op](a, b)
    unary = {"Sqrt": np.sqrt, "Reciprocal": lambda v: 1.0 / v, "Neg": np.negative, "Exp": np.exp, "Log": np.log,
             "Erf": np.vectorize(math.erf, otypes=[np.float64]), "Tanh": np.tanh,
             "Sigmoid": lambda v: 1.0 / (1.0 + np.exp(-v)), "Relu": lambda v: np.maximum(v, 0.0),
             "Softplus": lambda v: np.logaddexp(0.0, v), "Identity": lambda v: v}
    if op in unary:
        return unary[op](a)
    if op == "HardSigmoid":
        alpha, beta = float(n.attrs.get("alpha", 0.2)), float(n.attrs.get("beta", 0.5))
        return np.clip(alpha * a + beta, 0.0, 1.0)
    if op == "Clip":
        lo = ins[1] if len(ins) > 1 and ins[1] is not None else n.attrs.get("min", -np.inf)
        hi = ins[2] if len(ins) > 2 and ins[2] is not None else n.attrs.get("max", np.inf)
        return np.minimum(np.maximum(a, lo), hi)
    if op in ("Min", "Max"):
        f = np.minimum if op == "Min" else np.maximum
        out = ins[0]
        for v in ins[1:]:
            out = f(out, v)
        return out
    if op in ("Cast", "CastLike"):  # only casts that change nothing: a pattern keeps its dtype
        src = G.dtype_of(n.inputs[0])
        if op == "Cast":
            to = int(n.attrs.get("to", 0))
            dst = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(to)) if to in FLOAT_TYPES - {16} else None
        else:
            dst = G.dtype_of(n.inputs[1])
        if src is None or dst is None or src != dst:
            raise _NoEval(f"{op} that changes the type")
        return a
    if op in REDUCE_OPS:
        axes = _axes(n, np.ndim(a))
        if axes is None:
            raise _NoEval("reduction without keepdims")
        f = {"ReduceMean": np.mean, "ReduceSum": np.sum, "ReduceMax": np.max}[op]
        return f(a, axis=axes, keepdims=True)
    raise _NoEval(op)


# -- LayerNorm's γ/β, RMSNorm's weight ---------------------------------------------------------------
def _take_affine_tail(p: Pattern, outputs: set, taken: set) -> None:
    """Extend a normalization by the Mul(γ) and Add(β) that follow it, when their constants vary
    along the normalized axes only (what LayerNormalization's Scale and B express)."""
    r = G.rank(p.x)
    for op, attr in (("Mul", "scale"), ("Add", "bias")):
        if p.kind == "rmsnorm" and op == "Add":
            return
        t = p.out
        if id(t) in outputs or len(t.outputs) != 1:
            return
        n = t.outputs[0]
        if n.op != op or id(n) in taken or len(n.inputs) != 2:
            continue
        c = n.inputs[1] if n.inputs[0] is t else n.inputs[0]
        if not isinstance(c, gs.Constant) or c.shape is None or r is None or len(c.shape) > r:
            continue
        shape = (1,) * (r - len(c.shape)) + tuple(c.shape)
        if any(d != 1 for i, d in enumerate(shape) if i not in p.axes):
            continue
        setattr(p, attr, c)
        p.nodes.append(n)
        p.out = n.outputs[0]
