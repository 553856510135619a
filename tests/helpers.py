"""Shared helpers for the rule tests: a small ONNX graph builder and equivalence checks.

    b = GraphBuilder(seed=0)
    x = b.input([1, 4, 8, 8])
    y = b.add(b.bn(b.conv(x, 4, 4, 3), 4), b.bn(b.conv(x, 4, 4, 1), 4))
    model = b.build(b.relu(y))
    out, report = run_rules(model, "merge_linear_regions")
    assert ops(out) == {"Conv": 1, "Relu": 1}
    assert_equivalent(model, out)

Weights are random (numpy default_rng with the builder's seed), shapes static, opset 17 unless
told. ONNX Runtime runs with its own graph optimizations off, so its fusions cannot hide a wrong
fold; tolerance is 1e-5 of the reference's largest magnitude (fp32).
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxrep

RTOL = 1e-5
_ELEM = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE,
         np.dtype(np.float16): TensorProto.FLOAT16,
         np.dtype(np.int64): TensorProto.INT64, np.dtype(np.bool_): TensorProto.BOOL}
_NP = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.INT64: np.int64,
       TensorProto.FLOAT16: np.float16,
       TensorProto.BOOL: np.bool_}


class GraphBuilder:
    """Builds a small ONNX model node by node; every method returns the output tensor name(s)."""

    def __init__(self, seed: int = 0, opset: int = 17, dtype=np.float32):
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.dtype = np.dtype(dtype)
        self.inputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []
        self._count: Counter = Counter()

    # -- names, inputs, constants ----------------------------------------------------------------
    def _name(self, hint: str) -> str:
        self._count[hint] += 1
        return f"{hint}_{self._count[hint]}"

    def input(self, shape, name: str | None = None, dtype=None) -> str:
        name = name or self._name("x")
        elem = _ELEM[np.dtype(dtype or self.dtype)]
        self.inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        return name

    def const(self, value, name: str | None = None, dtype=None) -> str:
        """An initializer holding `value` (in the builder's float dtype unless told)."""
        arr = np.asarray(value)
        if dtype is not None:
            arr = arr.astype(dtype)
        elif np.issubdtype(arr.dtype, np.floating) or arr.dtype == np.float64:
            arr = arr.astype(self.dtype)
        name = name or self._name("c")
        self.initializers.append(numpy_helper.from_array(np.array(arr, order="C"), name))  # keeps 0-d
        return name

    def ints(self, values, name: str | None = None) -> str:
        return self.const(np.asarray(values, dtype=np.int64), name, dtype=np.int64)

    def randn(self, shape, scale: float = 1.0, name: str | None = None) -> str:
        return self.const(self.rng.standard_normal(shape) * scale, name)

    def channel(self, values, rank: int = 4) -> str:
        """A per-channel constant shaped [1, C, 1, ...] for a tensor of `rank`."""
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        return self.const(v.reshape((1, -1) + (1,) * (rank - 2)))

    # -- nodes -----------------------------------------------------------------------------------
    def op(self, op_type: str, inputs, n_out: int = 1, name: str | None = None, outputs=None, **attrs):
        name = name or self._name(op_type)
        outs = outputs or ([f"{name}_out"] if n_out == 1 else [f"{name}_out{i}" for i in range(n_out)])
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outs), name=name, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def conv(self, x, cin, cout, k=3, stride=1, pad=None, dil=1, group=1, bias=True, pads=None,
             weight=None, bias_name=None, name=None, **attrs) -> str:
        """ONNX Conv with a random weight. `k`, `stride`, `dil` are ints (2-D) or tuples (any rank);
        padding: `pads` (ONNX order) or symmetric `pad` (default: 'same' for odd k at stride 1)."""
        k = tuple(k) if isinstance(k, (tuple, list)) else (k, k)
        r = len(k)
        stride = tuple(stride) if isinstance(stride, (tuple, list)) else (stride,) * r
        dil = tuple(dil) if isinstance(dil, (tuple, list)) else (dil,) * r
        if pads is None:
            if pad is None:
                pad = tuple(((kk - 1) * d) // 2 for kk, d in zip(k, dil))
            pad = tuple(pad) if isinstance(pad, (tuple, list)) else (pad,) * r
            pads = list(pad) + list(pad)
        fan_in = cin // group * int(np.prod(k))
        w = weight or self.randn((cout, cin // group) + k, scale=1 / np.sqrt(fan_in))
        ins = [x, w]
        if bias:
            ins.append(bias_name or self.randn((cout,), scale=0.5))
        return self.op("Conv", ins, name=name, kernel_shape=list(k), strides=list(stride), pads=list(pads),
                       dilations=list(dil), group=group, **attrs)

    def bn_params(self, c):
        return (self.const(self.rng.uniform(0.5, 1.5, c)), self.const(self.rng.standard_normal(c) * 0.5),
                self.const(self.rng.standard_normal(c) * 0.5), self.const(self.rng.uniform(0.5, 2.0, c)))

    def bn(self, x, c, eps=1e-5, params=None, name=None, **attrs) -> str:
        g, b, m, v = params or self.bn_params(c)
        return self.op("BatchNormalization", [x, g, b, m, v], name=name, epsilon=eps, **attrs)

    def gemm(self, x, cin, cout, trans_b=1, bias=True, alpha=1.0, beta=1.0, name=None) -> str:
        shape = (cout, cin) if trans_b else (cin, cout)
        ins = [x, self.randn(shape, scale=1 / np.sqrt(cin))]
        if bias:
            ins.append(self.randn((cout,), scale=0.5))
        return self.op("Gemm", ins, name=name, transB=trans_b, alpha=alpha, beta=beta)

    def matmul(self, x, cin, cout, name=None) -> str:
        return self.op("MatMul", [x, self.randn((cin, cout), scale=1 / np.sqrt(cin))], name=name)

    def pad(self, x, pads, value=None, mode="constant", name=None) -> str:
        ins = [x, self.ints(pads)]
        if value is not None:
            ins.append(self.const(np.asarray(value)))
        return self.op("Pad", ins, name=name, mode=mode)

    def add(self, a, b, name=None) -> str:
        return self.op("Add", [a, b], name=name)

    def sub(self, a, b, name=None) -> str:
        return self.op("Sub", [a, b], name=name)

    def mul(self, a, b, name=None) -> str:
        return self.op("Mul", [a, b], name=name)

    def relu(self, x, name=None) -> str:
        return self.op("Relu", [x], name=name)

    # -- model -----------------------------------------------------------------------------------
    def build(self, *outputs: str, check: bool = True) -> onnx.ModelProto:
        """The model with `outputs` as graph outputs, their types and shapes from shape inference."""
        graph = helper.make_graph(self.nodes, "test", self.inputs, [], self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  producer_name="onnxrep-tests")
        model.ir_version = 8
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        known = {vi.name: vi for vi in inferred.graph.value_info}
        for o in outputs:
            vi = known.get(o)
            model.graph.output.append(vi if vi is not None else
                                      helper.make_tensor_value_info(o, _ELEM[self.dtype], None))
        if check:
            onnx.checker.check_model(model, full_check=True)
        return model


# -- running ONNX Runtime ------------------------------------------------------------------------
def session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded normal inputs. Written apart from onnxrep.verify on purpose: the tests' oracle must
    not share code with what it checks."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value for d in tt.shape.dim]
        feeds[vi.name] = rng.standard_normal(shape).astype(_NP[tt.elem_type])
    return feeds


def run_model(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def assert_equivalent(original: onnx.ModelProto, optimized: onnx.ModelProto, seed: int = 0, rtol: float = RTOL,
                      feeds: dict | None = None) -> None:
    """The optimized model passes the full checker and computes the original's outputs."""
    onnx.checker.check_model(optimized, full_check=True)
    feeds = feeds if feeds is not None else random_feeds(original, seed)
    ref = run_model(original, feeds)
    got = run_model(optimized, feeds)
    assert list(ref) == list(got), f"outputs differ: {list(ref)} vs {list(got)}"
    for name, r in ref.items():
        g = got[name]
        assert g.shape == r.shape, f"{name}: shape {g.shape}, expected {r.shape}"
        assert g.dtype == r.dtype, f"{name}: dtype {g.dtype}, expected {r.dtype}"
        err = float(np.max(np.abs(g.astype(np.float64) - r.astype(np.float64)), initial=0.0))
        scale = float(np.max(np.abs(r.astype(np.float64)), initial=0.0))
        assert err <= rtol * scale, f"{name}: max abs error {err:.3g} > {rtol:g} × {scale:.3g}"


# -- running onnxrep -----------------------------------------------------------------------------
def run_rules(model: onnx.ModelProto, *rules: str, verify: bool = False, **kw):
    """onnxrep.optimize restricted to `rules` (all default rules when none given) → (model, report)."""
    return onnxrep.optimize(model, rules=list(rules) or None, verify=verify, return_report=True, **kw)


def ops(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node))


def node_names(model: onnx.ModelProto) -> list[str]:
    return sorted(n.name for n in model.graph.node)


def nodes_of(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def declines(report, rule: str | None = None) -> list[str]:
    return [d["reason"] for d in report.declines if rule is None or d["rule"] == rule]


def assert_untouched(original: onnx.ModelProto, optimized: onnx.ModelProto, report=None) -> None:
    """Same nodes by name and op type; no rule fired."""
    assert ops(optimized) == ops(original)
    assert node_names(optimized) == node_names(original)
    if report is not None:
        assert report.rule_counts == {}, report.rule_counts


def assert_declined(report, rule: str, *words: str) -> None:
    """`rule` reported a decline whose reason mentions every one of `words` (case-insensitive)."""
    reasons = declines(report, rule)
    assert any(all(w.lower() in r.lower() for w in words) for r in reasons), \
        f"no decline of {rule} mentions {words}; reasons: {reasons}"


def declined_by(rule: str, model: onnx.ModelProto, *words: str):
    """Run `rule` alone: the graph must come back untouched, and when `words` are given a decline
    reason of that rule must mention them all. Returns the report."""
    out, report = run_rules(model, rule)
    assert_untouched(model, out, report)
    if words:
        assert_declined(report, rule, *words)
    return report


def assert_idempotent(optimized: onnx.ModelProto, *rules: str, **kw) -> None:
    """Optimizing the optimized model again changes nothing."""
    again, report = run_rules(optimized, *rules, **kw)
    assert report.rule_counts == {}, report.rule_counts
    assert ops(again) == ops(optimized)
    assert node_names(again) == node_names(optimized)


def without_default_locations(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with each tensor's data_location left unset where it says DEFAULT: the
    field is optional, and a reader that fills a tensor in cannot know whether the file spelled
    the default out. Compare models read different ways through this."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in onnx.external_data_helper._get_all_tensors(m):
        if t.data_location == TensorProto.DEFAULT:
            t.ClearField("data_location")
    return m


def break_fuse_conv_bn(monkeypatch) -> None:
    """Make fuse_conv_bn (and only it) fold a wrong bias (+0.5), for the verification-failure and
    culprit tests: merge_linear_regions folds Conv → BN with the same kernels.affine_after, so
    breaking that function for everyone would leave no single rule to blame."""
    import types

    from onnxrep import kernels as K
    from onnxrep.rules import fuse_conv_bn as rule_module

    def broken(spec, scale, shift, **kw):
        res = K.affine_after(spec, scale, shift, **kw)
        res.bias = res.bias + 0.5
        return res

    class BrokenKernels(types.ModuleType):
        def __getattr__(self, name):
            return broken if name == "affine_after" else getattr(K, name)

    monkeypatch.setattr(rule_module, "K", BrokenKernels("broken_kernels"))
