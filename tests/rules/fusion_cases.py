"""Written-out activation and normalization patterns for the pattern and fuse_activations tests.

Each builder writes one pattern with tests.helpers.GraphBuilder the way an exporter or a model's
own code spells it, between two linear layers that the BN-folding rules would otherwise feed on:

    x → Conv 1×1 (4→8) → PATTERN → Conv 1×1 (8→4) → y        NCHW, channels on axis 1
    x → Gemm (8→8)     → PATTERN → Gemm (8→6)     → y        tokens [N, C] (the normalizations)

`ort_fused(model)` is the op histogram of ONNX Runtime's own optimized graph (ORT_ENABLE_ALL,
written through SessionOptions.optimized_model_filepath): what the model runs as when deployed.
"""
from __future__ import annotations

import math
import os
import tempfile
from collections import Counter

import onnx
import onnxruntime as ort

from tests.helpers import GraphBuilder

SQRT2 = math.sqrt(2.0)
# ops ONNX Runtime (or the opset) has for a whole pattern
FUSED_OPS = {"Gelu", "FastGelu", "BiasGelu", "QuickGelu", "LayerNormalization", "SimplifiedLayerNormalization",
             "SkipLayerNormalization", "RMSNormalization", "HardSwish", "Mish", "Softmax", "Swish"}


# -- element-wise activations (one scalar-constant pattern on x) ----------------------------------
def gelu_legacy(b, x):
    """Legacy exporter: Div(√2) → Erf → Add(1) → Mul(x, ·) → Mul(·, 0.5)."""
    a = b.add(b.op("Erf", [b.op("Div", [x, b.const(SQRT2)])]), b.const(1.0))
    return b.mul(b.mul(x, a), b.const(0.5))


def gelu_dynamo(b, x):
    """Dynamo exporter: Div(√2) → Erf → Add(1) → Mul(·, 0.5) → Mul(x, ·)."""
    a = b.add(b.op("Erf", [b.op("Div", [x, b.const(SQRT2)])]), b.const(1.0))
    return b.mul(x, b.mul(a, b.const(0.5)))


def gelu_half_first(b, x):
    """`x * 0.5 * (1 + erf(x * 1/√2))`: Mul(x, 0.5) first, Mul by 1/√2, constants as first operands."""
    h = b.mul(b.const(0.5), x)
    a = b.add(b.const(1.0), b.op("Erf", [b.mul(b.const(1 / SQRT2), x)]))
    return b.mul(h, a)


def gelu_tanh(b, x):
    """tanh approximation: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), x³ as Pow."""
    inner = b.add(x, b.mul(b.op("Pow", [x, b.const(3.0)]), b.const(0.044715)))
    t = b.add(b.op("Tanh", [b.mul(inner, b.const(math.sqrt(2 / math.pi)))]), b.const(1.0))
    return b.mul(b.mul(x, b.const(0.5)), t)


def silu(b, x):
    return b.mul(x, b.op("Sigmoid", [x]))


def hardswish_hsig(b, x):
    """x · HardSigmoid(x) with HardSwish's constants (α = 1/6, β = 1/2)."""
    return b.mul(x, b.op("HardSigmoid", [x], alpha=1 / 6, beta=0.5))


def hardswish_clip(b, x):
    """x · Relu6(x + 3) / 6 with Relu6 as Clip(0, 6)."""
    r6 = b.op("Clip", [b.add(x, b.const(3.0)), b.const(0.0), b.const(6.0)])
    return b.op("Div", [b.mul(x, r6), b.const(6.0)])


def hardswish_maxmin(b, x):
    """x · min(max(x + 3, 0), 6) / 6 (the dynamo exporter's Relu6)."""
    r6 = b.op("Min", [b.op("Max", [b.add(x, b.const(3.0)), b.const(0.0)]), b.const(6.0)])
    return b.op("Div", [b.mul(x, r6), b.const(6.0)])


def hardsigmoid(b, x):
    """Relu6(x + 3) / 6."""
    return b.op("Div", [b.op("Clip", [b.add(x, b.const(3.0)), b.const(0.0), b.const(6.0)]), b.const(6.0)])


def mish(b, x):
    return b.mul(x, b.op("Tanh", [b.op("Softplus", [x])]))


# -- normalizations over the last axis ------------------------------------------------------------
def _mean(b, t, axes=(-1,)):
    if b.opset >= 18:
        return b.op("ReduceMean", [t, b.ints(list(axes))], keepdims=1)
    return b.op("ReduceMean", [t], axes=list(axes), keepdims=1)


def layernorm(b, x, c=8, affine=True, axes=(-1,)):
    """ReduceMean → Sub → Pow(2) → ReduceMean → Add(ε) → Sqrt → Div (→ Mul γ → Add β)."""
    d = b.sub(x, _mean(b, x, axes))
    s = b.op("Sqrt", [b.add(_mean(b, b.op("Pow", [d, b.const(2.0)]), axes), b.const(1e-5))])
    y = b.op("Div", [d, s])
    if affine:
        y = b.add(b.mul(y, b.const(b.rng.uniform(0.5, 1.5, c))), b.const(b.rng.standard_normal(c)))
    return y


def rmsnorm(b, x, c=8, affine=True):
    """x / √(mean(x·x) + ε) (· γ), the reciprocal-then-Mul spelling."""
    r = b.op("Reciprocal", [b.op("Sqrt", [b.add(_mean(b, b.mul(x, x)), b.const(1e-6))])])
    y = b.mul(x, r)
    return b.mul(y, b.const(b.rng.uniform(0.5, 1.5, c))) if affine else y


def softmax(b, x):
    """ReduceMax → Sub → Exp → ReduceSum → Div."""
    if b.opset >= 18:
        m = b.op("ReduceMax", [x, b.ints([-1])], keepdims=1)
    else:
        m = b.op("ReduceMax", [x], axes=[-1], keepdims=1)
    e = b.op("Exp", [b.sub(x, m)])
    return b.op("Div", [e, b.op("ReduceSum", [e, b.ints([-1])], keepdims=1)])


ELEMENTWISE = {
    "gelu_legacy": (gelu_legacy, "gelu"), "gelu_dynamo": (gelu_dynamo, "gelu"),
    "gelu_half_first": (gelu_half_first, "gelu"), "gelu_tanh": (gelu_tanh, "gelu_tanh"), "silu": (silu, "silu"),
    "hardswish_hsig": (hardswish_hsig, "hardswish"), "hardswish_clip": (hardswish_clip, "hardswish"),
    "hardswish_maxmin": (hardswish_maxmin, "hardswish"), "hardsigmoid": (hardsigmoid, "hardsigmoid"),
    "mish": (mish, "mish"),
}
NORMS = {"layernorm": (layernorm, "layernorm"), "rmsnorm": (rmsnorm, "rmsnorm"), "softmax": (softmax, "softmax")}
ALL = {**ELEMENTWISE, **NORMS}


def sandwich(case: str, opset: int = 17, seed: int = 0):
    """(model, names of the pattern's nodes) for a case of ALL, between two linear layers."""
    fn, _ = ALL[case]
    b = GraphBuilder(seed, opset=opset)
    if case in ELEMENTWISE:
        x = b.input([1, 4, 6, 6])
        h = b.conv(x, 4, 8, k=1)
        start = len(b.nodes)
        y = fn(b, h)
        names = [n.name for n in b.nodes[start:]]
        return b.build(b.conv(y, 8, 4, k=1)), names
    x = b.input([5, 8])
    h = b.gemm(x, 8, 8)
    start = len(b.nodes)
    y = fn(b, h)
    names = [n.name for n in b.nodes[start:]]
    return b.build(b.gemm(y, 8, 6)), names


# -- ONNX Runtime as deployed ---------------------------------------------------------------------
def ort_fused(model: onnx.ModelProto) -> Counter:
    """Op histogram of ORT's optimized graph at ORT_ENABLE_ALL (CPU)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "fused.onnx")
        so.optimized_model_filepath = path
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        fused = onnx.load(path)
    return Counter(n.op_type for n in fused.graph.node)


def fused_ops(model: onnx.ModelProto) -> dict[str, int]:
    """The whole-pattern ops in ORT's optimized graph."""
    return {op: n for op, n in ort_fused(model).items() if op in FUSED_OPS}


