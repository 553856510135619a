"""Detector blocks, hand-built: QARepVGG's BN after the branch sum, YOLO RepConv with SiLU and
YOLO's BN epsilon, RepConvN (no identity); and the preconditions around them.

Positive cases run the default rules and check the op histogram, the full checker, outputs equal
to fp32 tolerance in ONNX Runtime (optimizations off) and that a second run changes nothing.
Negative cases change one precondition (a non-linearity between, a shared weight, fan-out, an
affine on a non-channel axis, training-mode BN) and check that the affected node stays.
"""
from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from tests.helpers import (GraphBuilder, assert_declined, assert_equivalent, assert_idempotent, attr, nodes_of, ops,
                           run_rules)

C = 4
X = [1, C, 8, 8]
YOLO_EPS = 1e-3


def optimized(model, expected):
    """Default rules: the expected histogram, equivalent outputs, idempotent. Returns (out, report)."""
    out, report = run_rules(model)
    assert ops(out) == expected, (ops(out), report.declines)
    assert_equivalent(model, out)
    assert_idempotent(out)
    return out, report


def block_input(b, shape=X):
    return b.relu(b.input(shape))


def qarep_sum(b, x, c=C, stride=1, identity=True, bn_on_3x3=True, w1=None):
    """QARepVGG's branch sum: BN(conv3x3) + conv1x1 (no BN, no bias) [+ x].  ``bn_on_3x3=False``
    is the legacy/dynamo spelling, where the exporter already fused that BN into a biased conv."""
    k3 = (b.bn(b.conv(x, c, c, 3, stride=stride, bias=False), c, eps=YOLO_EPS) if bn_on_3x3
          else b.conv(x, c, c, 3, stride=stride))
    y = b.add(k3, b.conv(x, c, c, 1, stride=stride, pad=0, bias=False, weight=w1))
    return b.add(y, x) if identity else y


def silu(b, t):
    return b.mul(t, b.op("Sigmoid", [t]))


# -- positive -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bn_on_3x3", [True, False], ids=["nofold", "folded"])
def test_qarepvgg_block(bn_on_3x3):
    """QARepVGG: BN(BN(3×3) + 1×1 + x) → ReLU becomes one 3×3 Conv + Relu (BN eps 1e-3)."""
    b = GraphBuilder(1)
    x = block_input(b)
    model = b.build(b.relu(b.bn(qarep_sum(b, x, bn_on_3x3=bn_on_3x3), C, eps=YOLO_EPS)))
    out, _ = optimized(model, {"Conv": 1, "Relu": 2})
    assert attr(nodes_of(out, "Conv")[0], "kernel_shape") == [3, 3]


def test_qarepvgg_stride2_no_identity():
    """QARepVGG downsampling: BN(BN(3×3 s2) + 1×1 s2) → one 3×3 stride-2 Conv."""
    b = GraphBuilder(2)
    x = block_input(b)
    model = b.build(b.relu(b.bn(qarep_sum(b, x, stride=2, identity=False), C, eps=YOLO_EPS)))
    out, _ = optimized(model, {"Conv": 1, "Relu": 2})
    assert attr(nodes_of(out, "Conv")[0], "strides") == [2, 2]


def test_yolo_repconv_silu_identity():
    """YOLOv7 RepConv: SiLU(BN(3×3) + BN(1×1) + BN(x)), eps 1e-3 → one Conv + Sigmoid + Mul."""
    b = GraphBuilder(3)
    x = block_input(b)
    s = b.add(b.add(b.bn(b.conv(x, C, C, 3, bias=False), C, eps=YOLO_EPS),
                    b.bn(b.conv(x, C, C, 1, pad=0, bias=False), C, eps=YOLO_EPS)), b.bn(x, C, eps=YOLO_EPS))
    optimized(b.build(silu(b, s)), {"Conv": 1, "Relu": 1, "Sigmoid": 1, "Mul": 1})


def test_repconvn_residual_bottleneck():
    """YOLOv9 RepNBottleneck: x + SiLU(conv3(SiLU(3×3 + 1×1))): one Conv per RepConvN / Conv, the
    residual Add and both SiLUs stay."""
    b = GraphBuilder(4)
    x = block_input(b)
    r = silu(b, b.add(b.conv(x, C, C, 3), b.conv(x, C, C, 1, pad=0)))
    y = b.add(x, silu(b, b.conv(r, C, C, 3)))
    optimized(b.build(y), {"Conv": 2, "Relu": 1, "Sigmoid": 2, "Mul": 2, "Add": 1})


# -- negative: the BN after the sum stays where folding it would change the outputs --------------
def test_nonlinearity_between_sum_and_bn():
    """BN(Relu(sum)): the branches merge, the BN cannot move through the Relu and stays."""
    b = GraphBuilder(10)
    x = block_input(b)
    model = b.build(b.relu(b.bn(b.relu(qarep_sum(b, x)), C, eps=YOLO_EPS)))
    optimized(model, {"Conv": 1, "Relu": 3, "BatchNormalization": 1})


def test_nonlinearity_inside_a_branch():
    """BN(BN(3×3) + Relu(1×1) + x): the Relu'd 1×1 stays apart, so does the BN after the sum."""
    b = GraphBuilder(11)
    x = block_input(b)
    k3 = b.bn(b.conv(x, C, C, 3, bias=False), C)
    s = b.add(b.add(k3, b.relu(b.conv(x, C, C, 1, pad=0, bias=False))), x)
    model = b.build(b.relu(b.bn(s, C)))
    out, report = optimized(model, {"Conv": 2, "Relu": 3, "Add": 2, "BatchNormalization": 1})
    assert_declined(report, "merge_linear_regions", "Relu is not linear")


def test_shared_weight_with_a_conv_outside():
    """The 1×1's weight is shared with a Conv after the block: the block still becomes one Conv
    (its weight is a new tensor) and the other Conv keeps the shared weight unchanged."""
    b = GraphBuilder(12)
    x = block_input(b)
    w1 = b.randn((C, C, 1, 1), scale=0.5)
    y = b.relu(b.bn(qarep_sum(b, x, w1=w1), C, eps=YOLO_EPS))
    model = b.build(b.conv(y, C, C, 1, pad=0, bias=False, weight=w1))
    out, _ = optimized(model, {"Conv": 2, "Relu": 2})
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    readers = [n for n in out.graph.node if n.op_type == "Conv" and n.input[1] == w1]
    assert len(readers) == 1 and np.array_equal(after[w1], before[w1])
    merged = [n for n in out.graph.node if n.op_type == "Conv" and n.input[1] != w1]
    assert attr(merged[0], "kernel_shape") == [3, 3]


@pytest.mark.parametrize("reader", ["graph_output", "relu"])
def test_sum_fan_out(reader):
    """The branch sum is also read before the BN (a graph output, or another Relu): the sum becomes
    one Conv, but the BN cannot fold into it and stays."""
    b = GraphBuilder(13)
    x = block_input(b)
    s = qarep_sum(b, x)
    y = b.relu(b.bn(s, C, eps=YOLO_EPS))
    model = b.build(y, s) if reader == "graph_output" else b.build(y, b.relu(s))
    relus = 2 if reader == "graph_output" else 3
    out, _ = optimized(model, {"Conv": 1, "Relu": relus, "BatchNormalization": 1})
    if reader == "graph_output":
        assert [o.name for o in out.graph.output] == [y, s]


@pytest.mark.parametrize("axis", [2, 3])
def test_affine_on_a_spatial_axis(axis):
    """A Mul/Add after the sum whose constant varies along H or W (not the channel axis) is no
    per-channel affine: it stays a Mul and an Add after the merged Conv."""
    b = GraphBuilder(14)
    x = block_input(b)
    shape = [1, 1, 1, 1]
    shape[axis] = X[axis]
    scale = b.const(np.linspace(0.5, 1.5, X[axis]).reshape(shape))
    shift = b.const(np.linspace(-0.3, 0.3, X[axis]).reshape(shape))
    model = b.build(b.relu(b.add(b.mul(qarep_sum(b, x), scale), shift)))
    optimized(model, {"Conv": 1, "Relu": 2, "Mul": 1, "Add": 1})


def test_bn_on_a_transposed_axis():
    """BN over H of the sum (Transpose, BN, Transpose back: its 'channels' are rows): not the
    conv's output channels, so it stays with its Transposes."""
    b = GraphBuilder(15)
    x = block_input(b, [1, C, 6, 6])
    t = b.op("Transpose", [qarep_sum(b, x)], perm=[0, 2, 1, 3])
    y = b.op("Transpose", [b.bn(t, 6, eps=YOLO_EPS)], perm=[0, 2, 1, 3])
    optimized(b.build(b.relu(y)), {"Conv": 1, "Relu": 2, "Transpose": 2, "BatchNormalization": 1})


def test_training_mode_bn_after_sum():
    """A training-mode BN after the sum (batch statistics) folds nowhere; the branches still merge."""
    b = GraphBuilder(16)
    x = block_input(b, [2, C, 8, 8])
    t = b.op("BatchNormalization", [qarep_sum(b, x), *b.bn_params(C)], outputs=["t", "rm", "rv"],
             training_mode=1)[0]
    model = b.build(b.relu(t))
    out, _ = run_rules(model)
    assert ops(out).get("BatchNormalization") == 1
    assert ops(out)["Conv"] == 1
