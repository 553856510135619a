"""Structural checks (onnxrep/validate.py): models onnx.checker lets through exit 3, naming the node."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxrep
from onnxrep import validate
from onnxrep.errors import InputError

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _f(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def conv_model(cin=4, cout=6, group=4, wshape=None, x_shape=None, bias=None, **attrs):
    w = _f(*(wshape or (cout, cin // group, 3, 3)))
    inits = {"W": w}
    ins = ["x", "W"]
    if bias is not None:
        inits["B"] = _f(bias)
        ins.append("B")
    node = helper.make_node("Conv", ins, ["y"], name="the_conv", group=group, pads=[1, 1, 1, 1], **attrs)
    return _model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape or [1, cin, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, 8, 8])], inits)


def bn_model(c=4, stats=4):
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="the_bn")
    inits = {"s": _f(stats), "b": _f(stats), "m": _f(stats), "v": np.abs(_f(stats)) + 1}
    return _model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 8, 8])], inits)


def gemm_model(k_a=8, k_b=6):
    node = helper.make_node("Gemm", ["x", "W"], ["y"], name="the_gemm", transB=1)
    return _model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k_a])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], {"W": _f(5, k_b)})


def reshape_model(target, x_shape=(2, 6), out_shape=(3, 4), allowzero=0):
    nodes = [helper.make_node("Reshape", ["x", "t"], ["y"], name="the_reshape", allowzero=allowzero)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
                  {"t": np.array(target, np.int64)})


# (model, node it names, words of onnxrep's own message or None where ONNX shape inference already
# refuses the model, with the node named, before onnxrep's checks run)
INVALID = {
    "conv group does not divide output channels": (conv_model(cin=4, cout=6, group=4), "the_conv", "does not divide"),
    "conv input channels disagree with weight": (conv_model(cin=4, cout=8, group=1, x_shape=[1, 3, 8, 8]), "the_conv", "channels"),
    "conv bias length": (conv_model(cin=4, cout=8, group=1, bias=5), "the_conv", "bias"),
    "conv weight rank differs from input": (conv_model(cin=4, cout=8, group=1, wshape=(8, 4, 3)), "the_conv", None),
    "batchnorm statistics length": (bn_model(c=4, stats=3), "the_bn", None),
    "gemm inner dims": (gemm_model(k_a=8, k_b=6), "the_gemm", None),
    "reshape to another element count": (reshape_model([5, 2], out_shape=(5, 2)), "the_reshape", "cannot reshape"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_model_exits_3_naming_the_node(tmp_path, case):
    """The CLI exits 3 with one line naming the node, with and without verification."""
    model, node, words = INVALID[case]
    onnx.checker.check_model(model)  # the checker lets it through: that is the point
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    for extra in ([], ["--no-verify"]):
        proc = subprocess.run([sys.executable, "-m", "onnxrep", "optimize", str(path), str(tmp_path / "out.onnx"), *extra],
                              capture_output=True, text=True)
        assert proc.returncode == 3, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr
        assert node in lines[0] and (words is None or words in lines[0])
        assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("case", sorted(INVALID))
def test_api_raises_input_error(case):
    model, node, _ = INVALID[case]
    with pytest.raises(InputError, match=node):
        onnxrep.optimize(model, verify=False)


def test_valid_models_have_no_problems():
    """The same builders with consistent shapes pass the checks and optimize (negative case)."""
    from onnxrep import graph as G

    for model in (conv_model(cin=4, cout=8, group=4), conv_model(cin=4, cout=8, group=1, bias=8), bn_model(), gemm_model(6, 6),
                  reshape_model([3, -1]), reshape_model([0, 6], out_shape=(2, 6)), reshape_model([4, 3], out_shape=(4, 3))):
        graph = G.import_graph(onnx.shape_inference.infer_shapes(model))
        assert validate.problems(graph) == []
        onnxrep.optimize(model)


def test_conv_transpose_group_checked():
    """ConvTranspose reads W[0] channels; a group that does not divide them is refused."""
    w = _f(6, 2, 3, 3)
    node = helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="the_deconv", group=4)
    model = _model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 8, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 10, 10])], {"W": w})
    with pytest.raises(InputError, match="the_deconv.*(does not divide|divisible)"):
        onnxrep.optimize(model, verify=False)


def test_failed_fold_in_an_untaken_branch_is_silent(tmp_path):
    """A constant subgraph ORT cannot evaluate (in an If branch ORT never takes) stays a node, and
    ORT's own coloured error log does not reach stderr."""
    bad = helper.make_graph([helper.make_node("Reshape", ["c3", "t22"], ["r"])], "then", [],
                            [helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 2])],
                            [numpy_helper.from_array(np.arange(3, dtype=np.float32), "c3"),
                             numpy_helper.from_array(np.array([2, 2], np.int64), "t22")])
    good = helper.make_graph([helper.make_node("Identity", ["x"], ["r2"])], "else", [],
                             [helper.make_tensor_value_info("r2", TensorProto.FLOAT, [2, 2])])
    nodes = [helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0), helper.make_node("Greater", ["mx", "huge"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=bad, else_branch=good)]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])], {"huge": np.array(1e30, np.float32)})
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    proc = subprocess.run([sys.executable, "-m", "onnxrep", "optimize", str(path), str(tmp_path / "o.onnx"), "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
