"""fuse_activations (opt-in): write a runtime-fusable pattern as the standard op the opset has.

    x ─┬─ Div(√2) → Erf → Add(1) ─┐
       └──────────────────────── Mul → Mul(0.5) → y      ⇒     x → Gelu → y

    pattern (onnxrep.patterns)  standard op                                     from opset
    GELU / tanh-GELU            Gelu(approximate="none" / "tanh")               20
    LayerNorm (· γ + β)         LayerNormalization(axis, epsilon; Scale, B)     17
    HardSwish                   HardSwish                                       14
    HardSigmoid                 HardSigmoid(alpha=1/6, beta=1/2)                6
    Mish                        Mish                                            18
    Softmax                     Softmax(axis)                                   13
    RMSNorm (· γ)               RMSNormalization(axis, epsilon; scale)          23
    SiLU                        Swish(alpha=1)                                  24

The pattern was recognized by evaluating it against the op's definition (patterns module), so the
rewrite computes the same function; ONNX Runtime's verification checks the result like any rule's.
LayerNormalization and RMSNormalization normalize the trailing axes from `axis` on, so a pattern
that reduces other axes (channels-first LayerNorm of an NCHW tensor) is declined, as is one whose
normalized dims are not static (γ and β are written at the normalized shape).

Off by default: it raises no opset and keeps the op set the input had unless asked (`--fuse-activations`,
or `enable=["fuse_activations"]`). Declines name the opset the op needs.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import graph as G
from onnxrep.engine import Rewrite, Rule

# pattern kind -> (op, first opset that has it)
STANDARD_OPS = {
    "gelu": ("Gelu", 20), "gelu_tanh": ("Gelu", 20), "layernorm": ("LayerNormalization", 17),
    "hardswish": ("HardSwish", 14), "hardsigmoid": ("HardSigmoid", 6), "mish": ("Mish", 18),
    "softmax": ("Softmax", 13), "rmsnorm": ("RMSNormalization", 23), "silu": ("Swish", 24),
}


class FuseActivations(Rule):
    name = "fuse_activations"
    description = "rewrite written-out GELU, LayerNorm, HardSwish, Mish, Softmax, ... as the opset's standard op"
    default = False

    def match(self, node, ctx):
        p = ctx.patterns.of(node) if ctx.patterns is not None else None
        if p is None or p.out is not node.outputs[0]:
            return None
        return p

    def check(self, p, ctx):
        op, since = STANDARD_OPS[p.kind]
        opset = G.opset(ctx.graph)
        if opset < since:
            return f"{p.name} pattern kept: opset {opset} has no {op} (it needs opset ≥ {since})"
        dt = G.dtype_of(p.x)
        if dt is None or not np.issubdtype(dt, np.floating):
            return f"{p.name} pattern input '{p.x.name}' has an unknown or non-float type"
        if p.kind in ("layernorm", "rmsnorm"):
            r = G.rank(p.x)
            if r is None or p.axes != tuple(range(p.axes[0], r)):
                return f"{p.name} normalizes axes {list(p.axes)}, not the trailing ones {op} normalizes"
            if _normalized_shape(p) is None:
                return f"{p.name} normalized dims of '{p.x.name}' are not static"
        return None

    def rewrite(self, p, ctx):
        op, _ = STANDARD_OPS[p.kind]
        graph = ctx.graph
        dtype = G.dtype_of(p.x)
        end = p.nodes[-1]
        inputs, attrs = [p.x], {}
        if p.kind in ("gelu", "gelu_tanh"):
            attrs["approximate"] = "tanh" if p.kind == "gelu_tanh" else "none"
        elif p.kind == "hardsigmoid":
            attrs.update(alpha=1.0 / 6.0, beta=0.5)
        elif p.kind == "silu":
            attrs["alpha"] = 1.0
        elif p.kind == "softmax":
            attrs["axis"] = p.axes[0]
        elif p.kind in ("layernorm", "rmsnorm"):
            shape = _normalized_shape(p)
            attrs.update(axis=p.axes[0], epsilon=float(p.epsilon))
            scale = _full(p.scale, shape, 1.0)
            inputs.append(G.new_weight(graph, f"{end.name}.scale", scale, dtype))
            if p.kind == "layernorm":
                inputs.append(G.new_weight(graph, f"{end.name}.bias", _full(p.bias, shape, 0.0), dtype))
        names = [n.name for n in p.nodes]
        out, name = p.out, end.name or G.unique_node_name(graph, op)
        for n in p.nodes:
            G.remove_node(n)
        graph.nodes.append(gs.Node(op, name, attrs, inputs, [out]))
        return Rewrite("", names, [name], f"{p.name} ({len(names)} ops) → {op}")


def _normalized_shape(p) -> tuple[int, ...] | None:
    shape = p.x.shape
    if shape is None:
        return None
    dims = [shape[a] for a in p.axes]
    if not all(isinstance(d, (int, np.integer)) and d > 0 for d in dims):
        return None
    return tuple(int(d) for d in dims)


def _full(t, shape, fill: float) -> np.ndarray:
    """γ or β (or the identity value when the pattern had none) at the normalized shape."""
    if t is None:
        return np.full(shape, fill, dtype=np.float64)
    v = np.asarray(G.const(t), dtype=np.float64)
    v = v.reshape(v.shape[max(0, v.ndim - len(shape)):]) if v.ndim > len(shape) else v
    return np.array(np.broadcast_to(v, shape))

