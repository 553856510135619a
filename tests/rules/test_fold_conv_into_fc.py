"""fold_conv_into_fc (rules/fold_conv_into_fc.py): a conv added to an FC of the same fixed-size map joins it.

Positive cases are small graphs built with onnx.helper (Gemm transB 0/1 with alpha/beta, MatMul
with and without a bias Add, Flatten or Reshape, either Add order, symbolic batch, several conv
geometries) and the RepMLP block of models/repmlp.py exported by each exporter form. Each must
reach one Gemm/MatMul with no Conv left, pass the full checker, equal the original under ONNX
Runtime with its optimizations off (1e-5 of the output scale), and stay put on a second run.
Each negative case breaks one precondition: the graph stays as it was and report.declines says why.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import onnxrep.rules as R
from onnxrep.rules.fold_conv_into_fc import FoldConvIntoFc
from tests.helpers import (assert_declined, assert_equivalent, assert_idempotent, assert_untouched, attr,
                           nodes_of, ops, run_model, run_rules)

RULE = FoldConvIntoFc.name


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    """Run the rule right after merge_linear_regions, whether or not REGISTRY lists it yet."""
    if not any(cls.name == RULE for cls in R.REGISTRY):
        reg = list(R.REGISTRY)
        reg.insert(reg.index(R.MergeLinearRegions) + 1, FoldConvIntoFc)
        monkeypatch.setattr(R, "REGISTRY", reg)


# -- graph builder -------------------------------------------------------------------------------
@dataclass
class Block:
    """x ─┬─ Flatten ─ FC ─ Reshape ─┐
          └──────── Conv ────────────┴─ Add ─ Relu ─ y      (pieces editable before model())

    Tensors and nodes have fixed names (x, flat, W, b, fc, fc4d, K, c, conv, sum, y) so that tests
    can rewire them and decline reasons can be asserted by name."""

    nodes: list
    inits: dict
    inputs: list
    outputs: list

    def model(self, opset: int = 17) -> onnx.ModelProto:
        inits = [numpy_helper.from_array(v if v.dtype == np.int64 else v.astype(np.float32), k)
                 for k, v in self.inits.items()]
        graph = helper.make_graph(self.nodes, "repmlp", self.inputs, self.outputs, inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model

    def node(self, name: str):
        return next(n for n in self.nodes if n.name == name)

    def as_input(self, name: str) -> "Block":
        """Turn initializer `name` into a graph input (a non-constant weight)."""
        v = self.inits.pop(name)
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(v.shape)))
        return self

    def second_output(self, node, name: str, shape) -> "Block":
        """Add `node` and make its output `name` a graph output."""
        self.nodes.append(node)
        self.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        return self


def block(*, fc="gemm", trans_b=1, alpha=1.0, beta=1.0, gemm_bias="vector", bias_first=False,
          cin=4, cout=6, hw=(5, 6), kernel=(3, 3), pads=(1, 1, 1, 1), strides=(1, 1),
          dilations=(1, 1), group=2, conv_bias=True, flatten="flatten", swap=False, batch=1,
          relu=True, seed=0) -> Block:
    rng = np.random.default_rng(seed)
    h, w = hw
    ext = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    oh, ow = [(n + pads[a] + pads[a + 2] - ext[a]) // strides[a] + 1 for a, n in enumerate(hw)]
    f_in, f_out = cin * h * w, cout * oh * ow
    inits = {"K": rng.standard_normal((cout, cin // group, *kernel)) / 3,
             "out_shape": np.array([-1 if batch != 1 else 1, cout, oh, ow], np.int64)}
    nodes = []
    if flatten == "flatten":
        nodes.append(helper.make_node("Flatten", ["x"], ["flat"], "flatten", axis=1))
    else:
        inits["flat_shape"] = np.array(flatten, np.int64)
        nodes.append(helper.make_node("Reshape", ["x", "flat_shape"], ["flat"], "flatten"))
    weight = rng.standard_normal((f_out, f_in)) / np.sqrt(f_in)
    bias = rng.standard_normal(f_out)
    if fc == "gemm":
        inits["W"] = weight if trans_b else weight.T.copy()
        ins = ["flat", "W"]
        if gemm_bias == "vector":
            inits["b"], ins = bias, ins + ["b"]
        elif gemm_bias == "row":
            inits["b"], ins = bias.reshape(1, -1), ins + ["b"]
        nodes.append(helper.make_node("Gemm", ins, ["fc"], "fc", transB=trans_b, alpha=alpha, beta=beta))
    else:
        inits["W"] = weight.T.copy()
        nodes.append(helper.make_node("MatMul", ["flat", "W"], ["fc" if fc == "matmul" else "mm"], "fc"))
        if fc == "matmul_add":
            inits["b"] = bias.reshape(1, -1)
            nodes.append(helper.make_node("Add", ["b", "mm"] if bias_first else ["mm", "b"], ["fc"], "fc_bias"))
    nodes.append(helper.make_node("Reshape", ["fc", "out_shape"], ["fc4d"], "unflatten"))
    conv_in = ["x", "K"]
    if conv_bias:
        inits["c"] = rng.standard_normal(cout)
        conv_in.append("c")
    nodes.append(helper.make_node("Conv", conv_in, ["conv"], "conv", kernel_shape=list(kernel),
                                  pads=list(pads), strides=list(strides), dilations=list(dilations),
                                  group=group))
    sum_out = "sum" if relu else "y"
    nodes.append(helper.make_node("Add", ["conv", "fc4d"] if swap else ["fc4d", "conv"], [sum_out], "add"))
    if relu:
        nodes.append(helper.make_node("Relu", ["sum"], ["y"], "relu"))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, cin, h, w])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, cout, oh, ow])]
    return Block(nodes, inits, inputs, outputs)


# -- helpers -------------------------------------------------------------------------------------
def optimize(model, *rules, **kw):
    """onnxrep.optimize, its own verification on, restricted to `rules` (all rules when none)."""
    return run_rules(model, *rules, **{"verify": True, **kw})


def feeds(model, batch=1, seed=1):
    """Random inputs, symbolic dims set to `batch`."""
    rng = np.random.default_rng(seed)
    out = {}
    for vi in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return out


def assert_folded(before, after, report, fc=None, rules=(), batch=1):
    """No Conv left, the FC ops are `fc` (one Gemm unless told), outputs kept, idempotent."""
    h = ops(after)
    assert report.rule_counts.get(RULE, 0) >= 1
    assert "Conv" not in h
    assert {op: h[op] for op in ("Gemm", "MatMul", "Add") if op in h} == (fc or {"Gemm": 1})
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output]
    assert_equivalent(before, after, feeds=feeds(before, batch))
    assert_idempotent(after, *rules)


def declines(b: Block, *words, **kw):
    """This rule alone on the block: nothing changes and a decline mentions every one of `words`."""
    model = b.model()
    out, report = optimize(model, RULE, **kw)
    assert_untouched(model, out, report)
    orig = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for t in out.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), orig[t.name])
    assert_declined(report, RULE, *words)


# -- positive: hand-built graphs -----------------------------------------------------------------
@pytest.mark.parametrize("rules", [(), (RULE,)], ids=["all-rules", "only"])
@pytest.mark.parametrize("kw", [
    pytest.param({}, id="gemm-transB1"),
    pytest.param({"trans_b": 0, "alpha": 0.5, "beta": 2.0, "gemm_bias": "row"}, id="gemm-transB0-alpha-beta"),
    pytest.param({"gemm_bias": None}, id="gemm-no-bias"),
    pytest.param({"fc": "matmul_add"}, id="matmul-add"),
    pytest.param({"fc": "matmul_add", "bias_first": True, "swap": True}, id="matmul-add-swapped"),
    pytest.param({"swap": True}, id="add-conv-first"),
    pytest.param({"flatten": [0, -1]}, id="reshape-flatten-0-1"),
    pytest.param({"flatten": [1, 120]}, id="reshape-flatten-static"),
    pytest.param({"relu": False}, id="add-is-graph-output"),
    pytest.param({"kernel": (1, 1), "pads": (0, 0, 0, 0), "group": 1}, id="1x1"),
    pytest.param({"kernel": (3, 3), "strides": (2, 2), "dilations": (1, 2), "pads": (1, 0, 0, 2)},
                 id="strided-dilated-asym-pads"),
    pytest.param({"kernel": (5, 3), "pads": (2, 1, 2, 1), "group": 4, "cout": 8}, id="5x3-depthwise-mult"),
    pytest.param({"conv_bias": False}, id="conv-no-bias"),
    pytest.param({"batch": "N"}, id="symbolic-batch"),
])
def test_folds(kw, rules):
    """Gemm/MatMul(+Add) + Conv on the same flattened map → one FC; outputs unchanged."""
    model = block(**kw).model()
    out, report = optimize(model, *rules)
    # alone, the rule keeps a MatMul's bias Add (in the pipeline fuse_conv_bn makes the pair a Gemm)
    fc = {"MatMul": 1, "Add": 1} if kw.get("fc") == "matmul_add" and rules else None
    assert_folded(model, out, report, fc, rules, batch=3 if kw.get("batch") == "N" else 1)
    if kw.get("relu") is False:
        assert out.graph.node[-1].op_type == "Reshape" and out.graph.node[-1].output[0] == "y"


def test_matmul_without_bias_becomes_gemm_when_the_conv_has_one():
    """A bias-free MatMul takes the conv's bias by becoming a Gemm (transB=0, same weight layout)."""
    model = block(fc="matmul").model()
    out, report = optimize(model, RULE)
    assert_folded(model, out, report, rules=[RULE])
    (gemm,) = nodes_of(out, "Gemm")
    assert len(gemm.input) == 3 and attr(gemm, "transB") == 0


def test_matmul_stays_matmul_without_any_bias():
    """MatMul and a bias-free conv: only the weight changes."""
    model = block(fc="matmul", conv_bias=False).model()
    out, report = optimize(model, RULE)
    assert_folded(model, out, report, {"MatMul": 1}, [RULE])


def test_two_conv_branches_in_a_chain():
    """Add(Add(fc, conv3×3), conv1×1): each conv folds in turn."""
    b = block()
    b.inits["K1"] = np.random.default_rng(7).standard_normal((6, 4, 1, 1))
    b.node("relu").input[0] = "sum2"
    b.nodes.insert(-1, helper.make_node("Conv", ["x", "K1"], ["conv1"], "conv1", kernel_shape=[1, 1]))
    b.nodes.insert(-1, helper.make_node("Add", ["sum", "conv1"], ["sum2"], "add2"))
    model = b.model()
    out, report = optimize(model, RULE)
    assert report.rule_counts[RULE] == 2
    assert_folded(model, out, report, rules=[RULE])


def test_dynamic_spatial_folds_once_shapes_are_pinned():
    """Symbolic h, w with --input-shape pinning them: the map is fixed, so the conv folds."""
    b = block()
    b.inputs[0] = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, "h", "w"])
    b.outputs[0] = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, "h", "w"])
    out, report = optimize(b.model(), RULE, input_shapes={"x": [1, 4, 5, 6]})
    assert report.rule_counts == {RULE: 1}
    assert "Conv" not in ops(out)


def test_provenance_and_detail():
    """The FC keeps its name, is tagged with the rule, and the report says what was folded."""
    out, report = optimize(block().model(), RULE)
    (fc,) = nodes_of(out, "Gemm")
    assert fc.name == "fc" and fc.doc_string == f"onnxrep:{RULE}"
    (rw,) = [r for r in report.rewrites if r["rule"] == RULE]
    assert rw["replaced"] == ["add", "conv", "fc"] and "Conv 3×3 g=2" in rw["detail"]


def test_rule_is_on_by_default_after_merge_linear_regions():
    """Registered (or patched in) right after merge_linear_regions, enabled by default."""
    from onnxrep import engine as E

    names = [r.name for r in E.select_rules()]
    assert names.index(RULE) == names.index("merge_linear_regions") + 1


# -- positive: the RepMLP block of models/repmlp.py ----------------------------------------------
def _repmlp(**kw):
    from models.common import calibrate
    from models.repmlp import RepMLPBlock

    torch.manual_seed(0)
    shape = (1, kw.get("channels", 8), kw.get("h", 8), kw.get("w", 8))
    return calibrate(RepMLPBlock(**kw), shape), shape


@pytest.mark.parametrize("form,dynamic_batch", [
    ("legacy", False), ("legacy-nofold", False), ("dynamo", False), ("legacy", True), ("dynamo", True),
])
def test_repmlp_block_exports_fold(tmp_path, form, dynamic_batch):
    """RepMLP block (FC+BN1d, 1×1 and 3×3 conv-BN g=2), each exporter → Flatten, Gemm, Reshape, Relu."""
    from models.export import export_onnx

    net, shape = _repmlp()
    path = export_onnx(net, shape, tmp_path / "m.onnx", form, dynamic_batch=dynamic_batch)
    before = onnx.load(str(path))
    out, report = optimize(str(path))
    assert report.rule_counts[RULE] == 1
    flatten = {"Reshape": 2} if form == "dynamo" else {"Flatten": 1, "Reshape": 1}
    assert ops(out) == {"Gemm": 1, "Relu": 1, **flatten}
    for batch in (1, 3) if dynamic_batch else (1,):
        assert_equivalent(before, out, feeds=feeds(before, batch))
    x = feeds(before)["input"]
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    assert np.abs(run_model(out, {"input": x})["output"] - ref).max() <= 3e-5 * np.abs(ref).max()
    assert_idempotent(out)


def test_repmlp_block_other_geometry(tmp_path):
    """Non-square map, C ≠ O, dense 1×1 + 3×3 + 5×5 branches."""
    from models.export import export_onnx

    net, shape = _repmlp(channels=4, out_channels=6, h=4, w=7, kernels=(1, 3, 5), groups=1)
    before = onnx.load(str(export_onnx(net, shape, tmp_path / "m.onnx", "legacy-nofold")))
    out, report = optimize(before)
    assert_folded(before, out, report)


# -- negative: one broken precondition each --------------------------------------------------------
def test_declines_non_constant_fc_weight():
    """Gemm weight is a graph input."""
    declines(block().as_input("W"), "Gemm weight is not a constant matrix")


def test_declines_non_constant_matmul_weight():
    """MatMul weight is a graph input."""
    declines(block(fc="matmul_add").as_input("W"), "MatMul weight is not a constant matrix")


def test_declines_non_constant_conv_weight():
    """Conv weight is a graph input."""
    declines(block().as_input("K"), "Conv weight is not constant")


def test_declines_non_constant_conv_bias():
    """Conv bias is a graph input."""
    declines(block().as_input("c"), "Conv bias is not constant")


def test_declines_non_constant_gemm_bias():
    """Gemm bias is a graph input."""
    declines(block().as_input("b"), "Gemm bias is not constant")


def test_declines_non_constant_matmul_bias():
    """The Add after the MatMul adds a graph input."""
    declines(block(fc="matmul_add").as_input("b"), "FC bias", "not constant")


def test_declines_gemm_trans_a():
    """Gemm with transA=1 reads its input transposed."""
    b = block(flatten=[120, 1])
    b.nodes[1] = helper.make_node("Gemm", ["flat", "W", "b"], ["fc"], "fc", transA=1, transB=1)
    declines(b, "transA=1")


def test_declines_shared_fc_weight():
    """The FC weight is also read by another Gemm."""
    b = block()
    b.inputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 120]))
    b.second_output(helper.make_node("Gemm", ["z", "W"], ["z2"], "other", transB=1), "z2", [1, 180])
    declines(b, "weight 'W' is shared by 2 nodes")


def test_declines_shared_conv_weight():
    """The conv weight is also read by another Conv."""
    node = helper.make_node("Conv", ["x", "K"], ["x2"], "other", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=2)
    declines(block().second_output(node, "x2", [1, 6, 5, 6]), "weight 'K' is shared by 2 nodes")


def test_declines_conv_output_fan_out():
    """The conv output is also read by another node."""
    b = block().second_output(helper.make_node("Relu", ["conv"], ["r"], "other"), "r", [1, 6, 5, 6])
    declines(b, "intermediate 'conv' has 2 readers")


def test_declines_conv_output_is_graph_output():
    """The conv output is a graph output."""
    b = block()
    b.outputs.append(helper.make_tensor_value_info("conv", TensorProto.FLOAT, [1, 6, 5, 6]))
    declines(b, "intermediate 'conv' is a graph output")


@pytest.mark.parametrize("tensor,shape", [("fc", [1, 180]), ("fc4d", [1, 6, 5, 6])])
def test_declines_fc_intermediate_is_graph_output(tensor, shape):
    """The FC output or the reshaped FC output is a graph output."""
    b = block()
    b.outputs.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, shape))
    declines(b, f"intermediate '{tensor}' is a graph output")


def test_declines_fc_output_fan_out():
    """The reshaped FC output is also read by another node."""
    b = block().second_output(helper.make_node("Relu", ["fc4d"], ["r"], "other"), "r", [1, 6, 5, 6])
    declines(b, "intermediate 'fc4d' has 2 readers")


def test_declines_matmul_output_fan_out():
    """The MatMul output (before its bias Add) is also read elsewhere."""
    b = block(fc="matmul_add").second_output(helper.make_node("Relu", ["mm"], ["r"], "other"), "r", [1, 180])
    declines(b, "intermediate 'mm' has 2 readers")


def test_declines_dynamic_spatial_size():
    """x's spatial size is symbolic: the conv is no fixed matrix."""
    b = block()
    b.inputs[0] = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, "h", "w"])
    b.outputs[0] = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, "h", "w"])
    declines(b, "spatial size of 'x' is not static", verify=False)  # runs only at 5×6


def _fc_30_to_45(b: Block) -> Block:
    rng = np.random.default_rng(3)
    b.inits["W"], b.inits["b"] = rng.standard_normal((45, 30)), rng.standard_normal(45)
    return b


def test_declines_flatten_on_another_axis():
    """Flatten(axis=2) gives [C, h·w] rows: the FC mixes positions of one channel only."""
    b = _fc_30_to_45(block())
    b.nodes[0] = helper.make_node("Flatten", ["x"], ["flat"], "flatten", axis=2)
    declines(b, "Flatten on axis 2, not 1")


def test_declines_reshape_that_does_not_flatten_from_axis_1():
    """Reshape x to [C, h·w]: not a flatten from axis 1."""
    declines(_fc_30_to_45(block(flatten=[4, 30])), "does not flatten from axis 1")


def test_declines_output_reshape_without_batch_axis():
    """Output Reshape to [O, oh, ow] (broadcast against the conv's [1, O, oh, ow])."""
    b = block()
    b.inits["out_shape"] = np.array([6, 5, 6], np.int64)
    declines(b, "output Reshape gives [6, 5, 6]")


def test_declines_output_reshape_fixed_batch_on_symbolic_batch():
    """A batch-1 output Reshape on a symbolic batch is not the conv's layout for other batches."""
    b = block(batch="N")
    b.inits["out_shape"] = np.array([1, 6, 5, 6], np.int64)
    declines(b, "output Reshape gives unknown for batch 2")


def test_declines_fc_output_broadcast_over_channels():
    """FC output reshaped to [1, 1, oh, ow] and broadcast against the conv: not its layout."""
    b = block()
    rng = np.random.default_rng(3)
    b.inits["W"], b.inits["b"] = rng.standard_normal((30, 120)), rng.standard_normal(30)
    b.inits["out_shape"] = np.array([1, 1, 5, 6], np.int64)
    declines(b, "FC makes 30 features, the Conv makes 180")


def test_declines_fc_reading_another_tensor():
    """The FC flattens z, not the conv's input x."""
    b = block()
    b.inputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 5, 6]))
    b.nodes[0] = helper.make_node("Flatten", ["z"], ["flat"], "flatten", axis=1)
    declines(b, "the FC does not read a Flatten/Reshape of the Conv's input 'x'")


def test_declines_fc_reading_a_graph_input_directly():
    """The FC's input is a 2-D graph input, not a flatten of x."""
    b = block()
    b.inputs.append(helper.make_tensor_value_info("flat", TensorProto.FLOAT, [1, 120]))
    del b.nodes[0]
    declines(b, "the FC does not read a Flatten/Reshape of the Conv's input 'x'")
