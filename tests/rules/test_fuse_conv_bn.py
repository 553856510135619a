"""fuse_conv_bn: a per-channel affine after Conv/ConvTranspose/Gemm/MatMul folds into it."""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from tests.helpers import (assert_equivalent, assert_idempotent, attr, declined_by, GraphBuilder,
                           nodes_of, ops, run_rules)

RULE = "fuse_conv_bn"


def fused(model, expected_ops):
    out, report = run_rules(model, RULE)
    assert ops(out) == expected_ops
    assert report.rule_counts == {RULE: 1}
    assert_equivalent(model, out)
    return out


def conv_bn(seed=0, cin=4, cout=8, shape=(1, 4, 9, 9), eps=1e-5, **conv):
    b = GraphBuilder(seed)
    x = b.input(shape)
    return b.build(b.bn(b.conv(x, cin, cout, **conv), cout, eps=eps))


# -- positive: Conv → BN -------------------------------------------------------------------------
def test_conv_bn_with_bias():
    """Conv 3×3 with bias → BN becomes one Conv."""
    fused(conv_bn(), {"Conv": 1})


def test_conv_bn_without_bias():
    """Conv without bias → BN gets a bias from the BN shift."""
    out = fused(conv_bn(bias=False), {"Conv": 1})
    assert len(nodes_of(out, "Conv")[0].input) == 3


def test_conv_bn_grouped():
    """Grouped Conv (group 2) → BN."""
    fused(conv_bn(group=2), {"Conv": 1})


def test_conv_bn_depthwise():
    """Depthwise Conv (group = channels) → BN."""
    fused(conv_bn(cin=4, cout=4, group=4), {"Conv": 1})


def test_conv_bn_stride2():
    """Stride-2 Conv → BN keeps stride and output size."""
    out = fused(conv_bn(stride=2), {"Conv": 1})
    assert attr(nodes_of(out, "Conv")[0], "strides") == [2, 2]


def test_conv_bn_dilated():
    """Dilated Conv (d=2, pad 2) → BN."""
    fused(conv_bn(dil=2), {"Conv": 1})


def test_conv_bn_asymmetric_pads():
    """Conv with asymmetric pads (0,1,2,1) → BN."""
    out = fused(conv_bn(pads=[0, 1, 2, 1]), {"Conv": 1})
    assert attr(nodes_of(out, "Conv")[0], "pads") == [0, 1, 2, 1]


def test_conv_bn_epsilon_1e3():
    """BN with epsilon 1e-3 (YOLO) is folded with its own epsilon."""
    fused(conv_bn(eps=1e-3), {"Conv": 1})


def test_conv1d_bn():
    """Conv1d → BN."""
    b = GraphBuilder(1)
    x = b.input([2, 4, 16])
    fused(b.build(b.bn(b.conv(x, 4, 6, k=(3,)), 6)), {"Conv": 1})


def test_conv3d_bn():
    """Conv3d → BN."""
    b = GraphBuilder(2)
    x = b.input([1, 3, 5, 6, 7])
    fused(b.build(b.bn(b.conv(x, 3, 4, k=(3, 3, 3)), 4)), {"Conv": 1})


def test_conv_bn_graph_output():
    """BN output that is a graph output keeps its name on the fused Conv."""
    b = GraphBuilder(3)
    x = b.input([1, 4, 8, 8])
    y = b.bn(b.conv(x, 4, 4), 4)
    model = b.build(y)
    out = fused(model, {"Conv": 1})
    assert [o.name for o in out.graph.output] == [y]


def test_conv_bn_verified_by_optimize():
    """optimize()'s own ORT verification passes on a fused Conv → BN."""
    model = conv_bn(seed=4)
    out, report = run_rules(model, RULE, verify=True)
    assert report.verification["ok"]
    assert ops(out) == {"Conv": 1}


# -- positive: ConvTranspose → BN ----------------------------------------------------------------
@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_bn(group):
    """ConvTranspose (stride 2, groups 1 and 2) → BN becomes one ConvTranspose."""
    b = GraphBuilder(5 + group)
    x = b.input([1, 4, 5, 5])
    w = b.randn((4, 6 // group, 3, 3), scale=0.3)
    y = b.op("ConvTranspose", [x, w, b.randn((6,))], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
             output_padding=[1, 1], group=group)
    out = fused(b.build(b.bn(y, 6)), {"ConvTranspose": 1})
    assert attr(nodes_of(out, "ConvTranspose")[0], "group") == group


def test_conv_transpose_no_bias_bn():
    """ConvTranspose without bias → BN."""
    b = GraphBuilder(8)
    x = b.input([1, 4, 5, 5])
    y = b.op("ConvTranspose", [x, b.randn((4, 3, 2, 2), scale=0.3)], kernel_shape=[2, 2], strides=[2, 2])
    fused(b.build(b.bn(y, 3)), {"ConvTranspose": 1})


# -- positive: Gemm / MatMul → BN1d -------------------------------------------------------------
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_bn(trans_b):
    """Gemm (transB 0 and 1) → BN1d becomes one Gemm."""
    b = GraphBuilder(10 + trans_b)
    x = b.input([3, 6])
    fused(b.build(b.bn(b.gemm(x, 6, 5, trans_b=trans_b), 5)), {"Gemm": 1})


def test_gemm_alpha_beta_bn():
    """Gemm with alpha=0.5, beta=2 → BN: alpha and beta end up in the weights."""
    b = GraphBuilder(12)
    x = b.input([3, 6])
    fused(b.build(b.bn(b.gemm(x, 6, 5, trans_b=0, alpha=0.5, beta=2.0), 5)), {"Gemm": 1})


def test_gemm_no_bias_bn():
    """Gemm without C → BN."""
    b = GraphBuilder(13)
    x = b.input([3, 6])
    fused(b.build(b.bn(b.gemm(x, 6, 5, bias=False), 5)), {"Gemm": 1})


def test_matmul_bn1d():
    """MatMul (2-D) → BN1d becomes a Gemm."""
    b = GraphBuilder(14)
    x = b.input([3, 6])
    fused(b.build(b.bn(b.matmul(x, 6, 5), 5)), {"Gemm": 1})


def test_matmul_add_bias():
    """MatMul → Add(bias vector) (a Linear layer) becomes a Gemm."""
    b = GraphBuilder(15)
    x = b.input([3, 6])
    fused(b.build(b.add(b.matmul(x, 6, 5), b.randn((5,)))), {"Gemm": 1})


# -- positive: Conv → per-channel Mul/Add/Sub/Div -----------------------------------------------
def conv_then(op, seed, const_first=False, shape=(1, 4, 1, 1)):
    b = GraphBuilder(seed)
    x = b.input([1, 4, 8, 8])
    y = b.conv(x, 4, 4)
    c = b.const(b.rng.uniform(0.5, 2.0, shape))
    return b.build(b.op(op, [c, y] if const_first else [y, c]))


@pytest.mark.parametrize("op", ["Mul", "Add", "Sub", "Div"])
def test_conv_per_channel_binary(op):
    """Conv → Mul/Add/Sub/Div by a per-channel [1,C,1,1] constant."""
    fused(conv_then(op, 20), {"Conv": 1})


@pytest.mark.parametrize("op", ["Mul", "Add", "Sub"])
def test_conv_constant_first(op):
    """Constant on the left (c·y, c+y, c−y) folds with the right sign."""
    fused(conv_then(op, 21, const_first=True), {"Conv": 1})


def test_conv_scalar_mul():
    """Conv → Mul by a scalar."""
    fused(conv_then("Mul", 22, shape=()), {"Conv": 1})


def test_conv_mul_rank3_constant():
    """Conv → Mul by a [C,1,1] constant (broadcast from the right)."""
    fused(conv_then("Mul", 23, shape=(4, 1, 1)), {"Conv": 1})


def test_conv_bn_then_mul_chain():
    """Conv → BN → Mul(layer scale): both fold (two rewrites), one Conv left."""
    b = GraphBuilder(24)
    x = b.input([1, 4, 8, 8])
    y = b.mul(b.bn(b.conv(x, 4, 4), 4), b.channel(b.rng.uniform(0.1, 1, 4)))
    model = b.build(y)
    out, report = run_rules(model, RULE)
    assert ops(out) == {"Conv": 1}
    assert report.rule_counts == {RULE: 2}
    assert_equivalent(model, out)


# -- negative ------------------------------------------------------------------------------------
declined = partial(declined_by, RULE)


def test_shared_weight_declined():
    """Two Convs sharing one weight initializer, each → BN: declined (weight shared)."""
    b = GraphBuilder(30)
    x = b.input([1, 4, 8, 8])
    w = b.randn((4, 4, 3, 3), scale=0.3)
    y1 = b.bn(b.conv(x, 4, 4, weight=w, bias=False), 4)
    y2 = b.bn(b.conv(b.relu(x), 4, 4, weight=w, bias=False), 4)
    declined(b.build(y1, y2), "shared")


def test_shared_bias_declined():
    """Two Convs sharing one bias initializer: declined (bias shared)."""
    b = GraphBuilder(31)
    x = b.input([1, 4, 8, 8])
    bias = b.randn((4,))
    y1 = b.bn(b.conv(x, 4, 4, bias_name=bias), 4)
    y2 = b.conv(b.relu(x), 4, 4, bias_name=bias)
    declined(b.build(y1, y2), "shared")


def test_fan_out_declined():
    """Conv output read by BN and by a Relu: declined (fan-out)."""
    b = GraphBuilder(32)
    x = b.input([1, 4, 8, 8])
    y = b.conv(x, 4, 4)
    declined(b.build(b.bn(y, 4), b.relu(y)), "fan-out")


def test_conv_output_is_graph_output_declined():
    """Conv output is itself a graph output: declined."""
    b = GraphBuilder(33)
    x = b.input([1, 4, 8, 8])
    y = b.conv(x, 4, 4)
    declined(b.build(b.bn(y, 4), y), "graph output")


def test_weight_graph_input_declined():
    """Conv weight is a graph input (not constant): declined."""
    b = GraphBuilder(34)
    x = b.input([1, 4, 8, 8])
    w = b.input([4, 4, 3, 3], name="w")
    y = b.op("Conv", [x, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    declined(b.build(b.bn(y, 4)), "not constant")


def test_bn_params_graph_input_declined():
    """BN scale is a graph input: declined."""
    b = GraphBuilder(35)
    x = b.input([1, 4, 8, 8])
    g = b.input([4], name="gamma")
    _, beta, mean, var = b.bn_params(4)
    y = b.op("BatchNormalization", [b.conv(x, 4, 4), g, beta, mean, var])
    declined(b.build(y), "not constant")


def test_training_mode_bn_declined():
    """BN with training_mode=1 (batch statistics): declined."""
    b = GraphBuilder(36)
    x = b.input([2, 4, 8, 8])
    y = b.op("BatchNormalization", [b.conv(x, 4, 4), *b.bn_params(4)], outputs=["y", "running_mean", "running_var"],
             training_mode=1)[0]
    declined(b.build(y), "training_mode")


def test_mul_not_per_channel_declined():
    """Conv → Mul by a [1,1,H,W] constant (spatial, not per-channel): declined."""
    declined(conv_then("Mul", 37, shape=(1, 1, 8, 8)), "per-channel")


def test_div_constant_by_conv_declined():
    """c / Conv(x) is not linear: declined."""
    declined(conv_then("Div", 38, const_first=True), "not linear")


def test_div_by_zero_channel_declined():
    """Conv → Div by a per-channel constant containing 0: declined."""
    b = GraphBuilder(42)
    x = b.input([1, 4, 8, 8])
    declined(b.build(b.op("Div", [b.conv(x, 4, 4), b.channel([1.0, 0.0, 2.0, 3.0])])), "zero")


def test_mul_broadcasts_channels_declined():
    """Conv with 1 output channel → Mul by a [1,4,1,1] constant (broadcasts to 4 channels): declined."""
    b = GraphBuilder(39)
    x = b.input([1, 4, 8, 8])
    y = b.mul(b.conv(x, 4, 1), b.channel([0.5, 1.0, 1.5, 2.0]))
    declined(b.build(y), "channels")


def test_gemm_trans_a_declined():
    """Gemm with transA=1 → BN: declined."""
    b = GraphBuilder(40)
    x = b.input([6, 3])
    y = b.op("Gemm", [x, b.randn((5, 6))], transA=1, transB=1)
    declined(b.build(b.bn(y, 5)), "transA")


def test_matmul_rank3_declined():
    """MatMul on a [B,T,C] tensor → Add: channels are not on axis 1, declined."""
    b = GraphBuilder(41)
    x = b.input([2, 3, 6])
    declined(b.build(b.add(b.matmul(x, 6, 5), b.randn((5,)))))


# -- branches left to merge_linear_regions -------------------------------------------------------
def _weights(model):
    from onnx import numpy_helper

    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [init[i] for n in model.graph.node for i in n.input if i in init]


def test_branch_left_to_merge_linear_regions():
    """RepVGG block, default rules: the Conv → BN branches are not folded here first; the block is
    merged from the original weights in one float64 pass, bit-identical to skipping this rule."""
    b = GraphBuilder(60)
    x = b.relu(b.input((1, 4, 8, 8)))
    y = b.add(b.add(b.bn(b.conv(x, 4, 4, 3, bias=False), 4), b.bn(b.conv(x, 4, 4, 1, bias=False), 4)), b.bn(x, 4))
    model = b.build(b.relu(y))
    out, report = run_rules(model, verify=True)
    assert ops(out) == {"Relu": 2, "Conv": 1}
    assert report.rule_counts == {"merge_linear_regions": 1}
    direct, _ = run_rules(model, skip=["fuse_conv_bn"])
    for u, v in zip(_weights(out), _weights(direct), strict=True):
        np.testing.assert_array_equal(u, v)


def test_branch_of_declined_join_still_folds():
    """Branches whose sum merge_linear_regions declines (they read different tensors; a dense 1×1
    with a depthwise 3×3 would cost more) still lose their BNs in the same run."""
    b = GraphBuilder(61)
    x, z = b.input((1, 4, 8, 8)), b.input((1, 4, 8, 8))
    model = b.build(b.add(b.bn(b.conv(x, 4, 4, 3), 4), b.bn(b.conv(z, 4, 4, 1), 4)))
    out, report = run_rules(model, verify=True)
    assert ops(out) == {"Conv": 2, "Add": 1}
    assert report.rule_counts == {"merge_linear_regions": 2}  # each Conv → BN on its own
    assert report.verification["ok"]

    b = GraphBuilder(62)
    x = b.relu(b.input((1, 16, 8, 8)))
    model = b.build(b.add(b.bn(b.conv(x, 16, 16, 3, group=16), 16), b.bn(b.conv(x, 16, 16, 1), 16)))
    out, report = run_rules(model, verify=True)
    assert ops(out) == {"Relu": 1, "Conv": 2, "Add": 1}
    assert report.rule_counts == {"merge_linear_regions": 2}
    assert any("cost more" in d["reason"] for d in report.declines)
    assert report.verification["ok"]


def test_branch_whose_conv_input_is_walked_is_fused_here():
    """A branch conv reading a private linear op (DBB's 1×1 → Pad → 3×3) is not left to
    merge_linear_regions: a walk would go on above it, and that longer region may be declined."""
    b = GraphBuilder(63)
    x = b.relu(b.input((1, 4, 8, 8)))
    inner = b.pad(b.conv(x, 4, 4, 1, bias=False), [0, 0, 1, 1, 0, 0, 1, 1])
    model = b.build(b.relu(b.add(b.bn(b.conv(inner, 4, 4, 3, pad=0), 4), b.bn(b.conv(x, 4, 4, 3), 4))))
    out, report = run_rules(model, verify=True)
    assert report.rule_counts.get(RULE) == 1  # the 3×3 after the Pad; the other branch is left
    assert "BatchNormalization" not in ops(out)
    assert report.verification["ok"]


def test_branch_fused_here_without_merge_linear_regions():
    """Without merge_linear_regions in the run nothing is left to it: every Conv → BN folds here."""
    b = GraphBuilder(64)
    x = b.relu(b.input((1, 4, 8, 8)))
    model = b.build(b.add(b.bn(b.conv(x, 4, 4, 3), 4), b.bn(b.conv(x, 4, 4, 1), 4)))
    out, report = run_rules(model, skip=["merge_linear_regions"])
    assert report.rule_counts == {RULE: 2}
    assert ops(out) == {"Relu": 1, "Conv": 2, "Add": 1}
    assert_equivalent(model, out)


# -- idempotence ---------------------------------------------------------------------------------
def test_idempotent():
    """A second run over the fused graph changes nothing."""
    out, _ = run_rules(conv_bn(seed=50), RULE)
    assert_idempotent(out, RULE)


def test_idempotent_default_rules():
    """Default rule set over the fused graph changes nothing."""
    out, _ = run_rules(conv_bn(seed=51))
    assert_idempotent(out)
