"""respell_gelu: write an erf-GELU in the spelling ONNX Runtime fuses into one Gelu kernel.

    x ─┬─ Div(√2) → Erf → Add(1) → Mul(0.5, ·) ─┐                 x ─┬─ Mul(0.5) ────────────────────┐
       └──────────────────────────────────────── Mul → y    ⇒        └─ Div(√2) → Erf → Add(1) ──── Mul → y

ORT's GeluFusion (at its default level, CPU and GPU providers alike) matches two spellings of
½x(1 + erf(x/√2)): the legacy exporter's `Div → Erf → Add → Mul(x, ·) → Mul(·, 0.5)` and the
`x·0.5` first form on the right. The dynamo exporter writes `x · (0.5 · (1 + erf(x/√2)))`
(the 0.5 times the Erf branch, then x), which it does not match: that GELU then runs as five
element-wise kernels, in the input and in the network's own deploy export alike (ORT 1.32,
measured in docs/fusion.md). Any other spelling `onnxrep.patterns` recognizes as GELU (Mul by
1/√2, constants first, Cast/CastLike around them) is rewritten the same way.

Exactness: the respelled graph computes (0.5·x)·(1 + erf(x/√2)). When only the place of the 0.5
changes (the dynamo spelling) that is the same float result bit for bit -- scaling by 0.5 is exact
for normal numbers, so x·(0.5·s) = (0.5·x)·s -- and the `x·0.5` first form cannot overflow where
the original did not. Replacing a Mul by 1/√2 with a Div by √2 moves the Erf argument by at most
one ulp. Verification compares the outputs like every rule's.

The pattern is recognized by what it computes (onnxrep.patterns); a GELU already in one of the two
fusable spellings is not a match, so the rule is idempotent and leaves exporters' legacy output
alone. tanh-GELU is left as written: ORT fused neither exporter's spelling of it in our tests, and
which respelling it fuses in every context was not worked out.
"""
from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import graph as G
from onnxrep.engine import Rewrite, Rule

SQRT2 = math.sqrt(2.0)
_TOL = 1e-6


class RespellGelu(Rule):
    name = "respell_gelu"
    description = "write an erf-GELU in the spelling ONNX Runtime fuses into one Gelu kernel"
    anchors = ("Erf",)

    def match(self, node, ctx):
        p = ctx.patterns.of(node) if ctx.patterns is not None else None
        if p is None or p.kind != "gelu" or fusable(p):
            return None
        return p

    def check(self, p, ctx):
        dt = G.dtype_of(p.x)
        if dt is None or np.dtype(dt) not in (np.float16, np.float32, np.float64):
            return f"GELU input '{p.x.name}' is not float16/32/64: its spelling is left as written"
        return None

    def rewrite(self, p, ctx):
        graph, x, out = ctx.graph, p.x, p.out
        dtype = G.dtype_of(x)
        end = p.nodes[-1]
        base = end.name or G.unique_node_name(graph, "Gelu")

        def const(hint, value):
            return G.new_weight(graph, f"{base}.{hint}", np.array(value, dtype=np.float64), dtype)

        def var(hint):
            return G.new_variable(graph, f"{base}.{hint}", dtype=x.dtype, shape=x.shape)

        half, scaled, erf, one_plus = var("half_x"), var("div"), var("erf"), var("one_plus_erf")
        new = [gs.Node("Mul", G.unique_node_name(graph, f"{base}.half"), {}, [x, const("half", 0.5)], [half]),
               gs.Node("Div", G.unique_node_name(graph, f"{base}.div"), {}, [x, const("sqrt2", SQRT2)], [scaled]),
               gs.Node("Erf", G.unique_node_name(graph, f"{base}.erf"), {}, [scaled], [erf]),
               gs.Node("Add", G.unique_node_name(graph, f"{base}.add"), {}, [erf, const("one", 1.0)], [one_plus])]
        names = [n.name for n in p.nodes]
        spelling = p.spelling
        for n in p.nodes:
            G.remove_node(n)
        new.append(gs.Node("Mul", base, {}, [half, one_plus], [out]))
        graph.nodes.extend(new)
        return Rewrite("", names, [n.name for n in new],
                       f"GELU ({spelling}) respelled x·0.5·(1 + erf(x/√2)), the form ONNX Runtime fuses")


# -- the two spellings ORT's GeluFusion matches -------------------------------------------------------
def fusable(p) -> bool:
    """Whether the GELU pattern `p` is written exactly as ORT fuses it (see the module docstring)."""
    ops = [n.op for n in p.nodes]
    if sorted(ops) != ["Add", "Div", "Erf", "Mul", "Mul"]:
        return False
    by_op = {}
    for n in p.nodes:
        by_op.setdefault(n.op, []).append(n)
    div, erf, add = by_op["Div"][0], by_op["Erf"][0], by_op["Add"][0]
    if not (_reads(div, p.x, SQRT2) and erf.inputs[0] is div.outputs[0] and _reads(add, erf.outputs[0], 1.0)):
        return False
    end = p.nodes[-1]
    if end.op != "Mul":
        return False
    other = next(n for n in by_op["Mul"] if n is not end)
    legacy = (other.inputs[0] is p.x and other.inputs[1] is add.outputs[0]
              and _reads(end, other.outputs[0], 0.5))
    half_first = (_reads(other, p.x, 0.5) and end.inputs[0] is other.outputs[0]
                  and end.inputs[1] is add.outputs[0])
    return legacy or half_first


def _reads(node, first: gs.Tensor, value: float) -> bool:
    """`node` reads (first, scalar constant `value`) in this operand order."""
    if len(node.inputs) != 2 or node.inputs[0] is not first:
        return False
    c = G.const(node.inputs[1]) if isinstance(node.inputs[1], gs.Constant) else None
    if c is None or c.size != 1:
        return False
    # the value as the model's dtype holds it: √2 in float16 is 1.414, off by 1.4e-4 relative
    tol = max(_TOL, 2 * float(np.finfo(c.dtype).eps)) if np.issubdtype(c.dtype, np.floating) else _TOL
    return abs(float(c.reshape(-1)[0]) - value) <= tol * value
