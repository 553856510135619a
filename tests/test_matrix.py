"""The support matrix: opsets 10–21, fp32 / fp16 / fp16-inside-fp32-I/O, Conv auto_pad, Pad forms,
static / dynamic batch / dynamic spatial dims, with and without --input-shape.

Two training-time graphs, built with onnx.helper for each combination:

    repvgg:   x ─┬─ [Pad] ─ Conv3×3 ─ BN ─┐
                 ├─ Conv1×1 ──────── BN ─┼─ Add ─ Add ─ Relu ─ y     ⇒  Conv3×3 ─ Relu
                 └───────────────────  BN ┘
    conv_bn:  x ─ Conv3×3 stride 2 ─ BN ─ y                          ⇒  Conv3×3

Each case optimizes (which verifies in ORT), then checks on its own that the result computes the
same as the input in ONNX Runtime (optimizations off) at a size the verification did not use, that
no BatchNormalization is left and the branches are merged, and that symbolic dims stay symbolic.
fp16 runs on ORT's CPU kernels (Conv, BatchNormalization, Add, Relu, Pad all have them in ORT 1.16+).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxrep
from onnxrep import verify as V

C = 8
OPSETS = [11, 12, 13, 14, 15, 17, 18, 19, 21]
DTYPES = ["fp32", "fp16", "mixed"]  # mixed: fp16 weights and compute, fp32 graph I/O (Cast in and out)
AUTO_PADS = ["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]
# dims of x: static, dynamic batch, dynamic batch and spatial
DIMS = {"static": [1, C, 8, 8], "batch": ["N", C, 8, 8], "spatial": ["N", C, "H", "W"]}
PINNED = [2, C, 8, 8]  # --input-shape for the dynamic cases
# relative tolerance, of the output's max |value|, by the precision the graph computes in
RTOL = {"fp32": 1e-5, "fp16": 2e-3, "mixed": 2e-3}

# -- builders ------------------------------------------------------------------------------------
class Builder:
    def __init__(self, opset: int, dtype: str, seed: int = 0):
        self.opset, self.dtype = opset, dtype
        self.np = np.float16 if dtype in ("fp16", "mixed") else np.float32
        self.elem = TensorProto.FLOAT16 if dtype in ("fp16", "mixed") else TensorProto.FLOAT
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []
        self.n = 0

    def name(self, hint):
        self.n += 1
        return f"{hint}{self.n}"

    def const(self, arr, hint="c", dtype=None):
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(arr, dtype or self.np), name))
        return name

    def node(self, op, inputs, **attrs):
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out

    def conv(self, x, k, stride=1, auto_pad="NOTSET", pads=None):
        w = self.const(self.rng.standard_normal((C, C, k, k)) / np.sqrt(C * k * k), "w")
        attrs = {"kernel_shape": [k, k], "strides": [stride, stride]}
        if auto_pad != "NOTSET":
            attrs["auto_pad"] = auto_pad
        elif pads:
            attrs["pads"] = pads
        return self.node("Conv", [x, w], **attrs)

    def bn(self, x):
        r = self.rng
        params = [self.const(r.uniform(0.5, 1.5, C)), self.const(r.standard_normal(C) * 0.1),
                  self.const(r.standard_normal(C) * 0.1), self.const(r.uniform(0.5, 1.5, C))]
        attrs = {"epsilon": 1e-3}  # not the default: the fold must read it
        if self.opset >= 14:
            attrs["training_mode"] = 0
        return self.node("BatchNormalization", [x, *params], **attrs)

    def pad(self, x, amount=1):
        pads = [0, 0, amount, amount, 0, 0, amount, amount]
        if self.opset < 11:
            return self.node("Pad", [x], pads=pads, mode="constant", value=0.0)
        inputs = [x, self.const(pads, "pads", np.int64), self.const(0.0, "value")]  # scalar constant_value
        if self.opset >= 18:  # Pad-18: explicit axes, only the spatial ones
            inputs[1] = self.const([amount, amount, amount, amount], "pads", np.int64)
            inputs.append(self.const([2, 3], "axes", np.int64))
        return self.node("Pad", inputs, mode="constant")

    def model(self, dims, body) -> onnx.ModelProto:
        io_elem = TensorProto.FLOAT if self.dtype == "mixed" else self.elem
        x = "x"
        if self.dtype == "mixed":
            x = self.node("Cast", [x], to=TensorProto.FLOAT16)
        y = body(self, x)
        if self.dtype == "mixed":
            y = self.node("Cast", [y], to=TensorProto.FLOAT)
        size = getattr(body, "out_size", lambda h: h)
        out_dims = [d if i < 2 else f"out_{d}" if isinstance(d, str) else size(d) for i, d in enumerate(dims)]
        g = helper.make_graph(self.nodes, "matrix", [helper.make_tensor_value_info("x", io_elem, dims)],
                              [helper.make_tensor_value_info(y, io_elem, out_dims)], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)], producer_name="test_matrix")
        m.ir_version = helper.find_min_ir_version_for(list(m.opset_import))
        onnx.checker.check_model(m, full_check=True)
        return m


def repvgg(auto_pad: str):
    """3×3-BN + 1×1-BN + identity-BN → Relu. VALID pads the 3×3 branch with a Pad node instead."""
    def body(b: Builder, x):
        if auto_pad == "VALID":
            b3 = b.bn(b.conv(b.pad(x), 3, auto_pad="VALID"))
            b1 = b.bn(b.conv(x, 1, auto_pad="VALID"))
        else:
            b3 = b.bn(b.conv(x, 3, auto_pad=auto_pad, pads=[1, 1, 1, 1]))
            b1 = b.bn(b.conv(x, 1, auto_pad=auto_pad))
        s = b.node("Add", [b3, b1])
        return b.node("Relu", [b.node("Add", [s, b.bn(x)])])
    return body


def conv_bn(auto_pad: str):
    """Conv3×3 stride 2 → BN: on 8×8, SAME_UPPER pads (0, 1) and SAME_LOWER (1, 0)."""
    def body(b: Builder, x):
        return b.bn(b.conv(x, 3, stride=2, auto_pad=auto_pad, pads=[1, 1, 1, 1] if auto_pad == "NOTSET" else None))
    body.out_size = (lambda h: (h - 3) // 2 + 1) if auto_pad == "VALID" else (lambda h: (h + 1) // 2)
    return body


# -- checks --------------------------------------------------------------------------------------
def _session(model):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(model, x):
    return _session(model).run(None, {"x": x})[0]


def _ops(model):
    hist = {}
    for n in model.graph.node:
        hist[n.op_type] = hist.get(n.op_type, 0) + 1
    return hist


def _dims(vi):
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def check(model, dims, dtype, expect_ops, pinned=None, size=None):
    shapes = {"x": pinned} if pinned else None
    out, report = onnxrep.optimize(model, input_shapes=shapes, return_report=True)
    assert report.verification["ok"]
    assert _ops(out) == expect_ops, (report.rule_counts, report.declines)
    # symbolic dims stay symbolic unless pinned (then the output has the pinned shape, as onnxsim's
    # --overwrite-input-shape does)
    want = pinned if pinned else dims
    assert _dims(out.graph.input[0]) == want
    if not pinned:
        assert [d for d in _dims(out.graph.output[0]) if isinstance(d, str)] == \
               [d for d in _dims(model.graph.output[0]) if isinstance(d, str)]
    # equivalence at a size verification did not use (it takes batch 1, spatial 32 or the pin)
    shape = pinned or [3 if isinstance(d, str) and i == 0 else (size or 12) if isinstance(d, str) else d
                       for i, d in enumerate(dims)]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32 if dtype != "fp16" else np.float16)
    a, b = _run(model, x).astype(np.float64), _run(out, x).astype(np.float64)
    assert a.shape == b.shape
    err, scale = np.abs(a - b).max(), np.abs(a).max()
    assert err <= RTOL[dtype] * scale, f"max error {err:.3g} vs scale {scale:.3g} (relative {err / scale:.2e})"
    return out, report


def _merged(dtype, kind="repvgg"):
    ops = {"Conv": 1, "Relu": 1} if kind == "repvgg" else {"Conv": 1}
    if dtype == "mixed":
        ops["Cast"] = 2
    return ops


# -- the matrix ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opset", OPSETS)
def test_repvgg_block_opsets(opset, dtype):
    """BatchNormalization-9 (opset ≤ 13), -14 and -15; Pad-11, -13, -18 (axes), -19, -21."""
    model = Builder(opset, dtype).model(DIMS["static"], repvgg("NOTSET"))
    check(model, DIMS["static"], dtype, _merged(dtype))
    model = Builder(opset, dtype, seed=1).model(DIMS["static"], repvgg("VALID"))  # with a Pad node
    check(model, DIMS["static"], dtype, _merged(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opset", OPSETS)
def test_conv_bn_opsets(opset, dtype):
    model = Builder(opset, dtype).model(DIMS["static"], conv_bn("NOTSET"))
    check(model, DIMS["static"], dtype, _merged(dtype, "conv_bn"))


def _dim_cases():
    for dims in DIMS:
        for pinned in ([False] if dims == "static" else [False, True]):
            yield dims, pinned


def _params(kind, dtypes):
    for dtype in dtypes:
        for auto_pad in AUTO_PADS:
            for dims, pinned in _dim_cases():
                yield pytest.param(dtype, auto_pad, dims, pinned,
                                   id=f"{dtype}-{auto_pad}-{dims}{'-pinned' if pinned else ''}")


@pytest.mark.parametrize("dtype,auto_pad,dims,pinned", list(_params("repvgg", ["fp32", "fp16"])))
def test_repvgg_block_auto_pad_and_dims(dtype, auto_pad, dims, pinned):
    model = Builder(17, dtype).model(DIMS[dims], repvgg(auto_pad))
    check(model, DIMS[dims], dtype, _merged(dtype), PINNED if pinned else None)


@pytest.mark.parametrize("dtype,auto_pad,dims,pinned", list(_params("conv_bn", ["fp32", "mixed"])))
def test_conv_bn_auto_pad_and_dims(dtype, auto_pad, dims, pinned):
    """Stride 2 on an even size: SAME_UPPER and SAME_LOWER differ, and the fold must keep which."""
    model = Builder(17, dtype).model(DIMS[dims], conv_bn(auto_pad))
    out, _ = check(model, DIMS[dims], dtype, _merged(dtype, "conv_bn"), PINNED if pinned else None)
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    want = {"SAME_UPPER": [0, 0, 1, 1], "SAME_LOWER": [1, 1, 0, 0], "VALID": [0, 0, 0, 0], "NOTSET": [1, 1, 1, 1]}
    if "auto_pad" in attrs and attrs["auto_pad"] not in (b"NOTSET", "NOTSET"):
        assert attrs["auto_pad"] in (auto_pad, auto_pad.encode())
    else:
        assert list(attrs.get("pads", [0, 0, 0, 0])) == want[auto_pad]


@pytest.mark.parametrize("opset", [10, 11, 13, 18, 21])
def test_pad_then_conv_forms(opset):
    """Pad→Conv(VALID)→BN on its own: attribute pads (opset 10), constant pads input (11+),
    pads + axes inputs (18+); the Pad folds into the conv's padding."""
    def body(b: Builder, x):
        return b.bn(b.conv(b.pad(x), 3, pads=[0, 0, 0, 0]))
    model = Builder(opset, "fp32").model(DIMS["static"], body)
    out, report = check(model, DIMS["static"], "fp32", {"Conv": 1})
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert [a for a in conv.attribute if a.name == "pads"][0].ints == [1, 1, 1, 1]


def test_dynamic_batch_stays_symbolic_through_cli(tmp_path):
    """A symbolic batch dim (as torch.onnx dynamic_axes writes it) is symbolic in the output file."""
    from onnxrep import cli

    model = Builder(17, "fp32").model(["batch", C, 8, 8], repvgg("NOTSET"))
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    assert cli.main(["optimize", str(src), str(dst), "-q"]) == 0
    out = onnx.load(str(dst))
    assert _dims(out.graph.input[0]) == ["batch", C, 8, 8]
    assert _dims(out.graph.output[0])[0] == "batch"
    for n in (1, 4):
        x = np.random.default_rng(n).standard_normal((n, C, 8, 8)).astype(np.float32)
        a, b = _run(model, x), _run(out, x)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    # the report counts MACs per sample for a symbolic batch (it said "?" before)
    _, report = onnxrep.optimize(model, return_report=True)
    assert report.after["macs"] == 8 * 8 * C * C * 9
    assert report.before["macs"] == 8 * 8 * C * C * 10


def test_fp16_tolerance_is_a_few_ulps():
    """verify.DEFAULT_RTOL[fp16] = 2e-3 is about 2 ulps of fp16 (2^-10 = 9.8e-4) at the output's
    largest magnitude: an exact merge lands within it, a wrong one (a BN folded with the wrong
    epsilon) does not."""
    assert V.DEFAULT_RTOL[np.float16] == pytest.approx(2e-3)
    model = Builder(17, "fp16").model(DIMS["static"], repvgg("NOTSET"))
    out, report = check(model, DIMS["static"], "fp16", _merged("fp16"))
    assert report.verification["max_rel_error"] < 2e-3
    # a 1e-2 relative change of one BN scale shows up well above the tolerance
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    bn = next(n for n in bad.graph.node if n.op_type == "BatchNormalization")
    scale = next(t for t in bad.graph.initializer if t.name == bn.input[1])
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float16(1.01), scale.name))
    x = np.random.default_rng(0).standard_normal((1, C, 8, 8)).astype(np.float16)
    a, b = _run(model, x).astype(np.float64), _run(bad, x).astype(np.float64)
    assert np.abs(a - b).max() > 2e-3 * np.abs(a).max()


def test_mixed_precision_uses_fp16_tolerance():
    """fp32 outputs computed in fp16 get the fp16 tolerance: the output dtype alone would ask for
    1e-5, which fp16 arithmetic cannot meet."""
    model = Builder(17, "mixed").model(DIMS["static"], repvgg("NOTSET"))
    assert V.model_rtol(model) == pytest.approx(2e-3)
    assert V.model_rtol(Builder(17, "fp32").model(DIMS["static"], repvgg("NOTSET"))) == pytest.approx(1e-5)


@pytest.mark.parametrize("opset", [15, 21])
def test_bn15_fp32_parameters_on_fp16_data(opset):
    """BatchNormalization-15 lets scale/bias (T1) and mean/var (T2) differ from the data type: fp32
    statistics on an fp16 conv fold into fp16 weights (computed in float64, rounded once)."""
    def body(b: Builder, x):
        r = b.rng
        params = [b.const(r.uniform(0.5, 1.5, C), dtype=np.float32), b.const(r.standard_normal(C) * 0.1, dtype=np.float32),
                  b.const(r.standard_normal(C) * 0.1, dtype=np.float32), b.const(r.uniform(0.5, 1.5, C), dtype=np.float32)]
        return b.node("BatchNormalization", [b.conv(x, 3, pads=[1, 1, 1, 1]), *params], epsilon=1e-3, training_mode=0)
    model = Builder(opset, "fp16").model(DIMS["static"], body)
    out, _ = check(model, DIMS["static"], "fp16", {"Conv": 1})
    assert {t.data_type for t in out.graph.initializer} == {TensorProto.FLOAT16}
