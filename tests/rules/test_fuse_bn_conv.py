"""fuse_bn_conv: a per-channel affine before an unpadded Conv (or Gemm/MatMul) folds into it."""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from tests.helpers import (assert_equivalent, assert_idempotent, declined_by, GraphBuilder,
                           nodes_of, ops, run_rules)

RULE = "fuse_bn_conv"


def fused(model, expected_ops, count=1):
    out, report = run_rules(model, RULE)
    assert ops(out) == expected_ops
    assert report.rule_counts == {RULE: count}
    assert_equivalent(model, out)
    return out


def bn_conv(seed=0, cin=4, cout=8, shape=(1, 4, 9, 9), **conv):
    b = GraphBuilder(seed)
    x = b.input(shape)
    return b.build(b.conv(b.bn(b.relu(x), cin), cin, cout, **conv))


# -- positive ------------------------------------------------------------------------------------
def test_bn_conv3x3_unpadded():
    """BN → Conv 3×3 pad 0 becomes one Conv."""
    fused(bn_conv(k=3, pad=0), {"Conv": 1, "Relu": 1})


def test_bn_conv1x1():
    """BN → Conv 1×1."""
    fused(bn_conv(k=1), {"Conv": 1, "Relu": 1})


def test_bn_conv_no_bias():
    """BN → Conv without bias: the shift becomes a new bias."""
    out = fused(bn_conv(k=3, pad=0, bias=False), {"Conv": 1, "Relu": 1})
    assert len(nodes_of(out, "Conv")[0].input) == 3


def test_bn_conv_grouped():
    """BN → grouped Conv (group 2), unpadded: per-group input channels are scaled."""
    fused(bn_conv(k=3, pad=0, group=2), {"Conv": 1, "Relu": 1})


def test_bn_conv_depthwise():
    """BN → depthwise Conv 3×3, unpadded."""
    fused(bn_conv(cout=4, k=3, pad=0, group=4), {"Conv": 1, "Relu": 1})


def test_bn_conv_stride2_dilated():
    """BN → Conv 3×3 stride 2 dilation 2, unpadded."""
    fused(bn_conv(k=3, pad=0, stride=2, dil=2), {"Conv": 1, "Relu": 1})


def test_bn_conv1d():
    """BN → Conv1d, unpadded."""
    b = GraphBuilder(1)
    x = b.input([2, 4, 12])
    fused(b.build(b.conv(b.bn(x, 4), 4, 6, k=(3,), pad=0)), {"Conv": 1})


@pytest.mark.parametrize("trans_b", [0, 1])
def test_bn1d_gemm(trans_b):
    """BN1d → Gemm (transB 0 and 1), the RepViT/LeViT head."""
    b = GraphBuilder(2 + trans_b)
    x = b.input([3, 6])
    fused(b.build(b.gemm(b.bn(x, 6), 6, 5, trans_b=trans_b, alpha=0.7, beta=1.3)), {"Gemm": 1})


def test_bn1d_matmul():
    """BN1d → MatMul becomes a Gemm."""
    b = GraphBuilder(4)
    x = b.input([3, 6])
    fused(b.build(b.matmul(b.bn(x, 6), 6, 5)), {"Gemm": 1})


def test_mul_scale_padded_conv():
    """Mul by a per-channel scale (no shift) → padded Conv 3×3: a zero shift is exact with padding."""
    b = GraphBuilder(5)
    x = b.input([1, 4, 8, 8])
    y = b.mul(b.relu(x), b.channel(b.rng.uniform(0.5, 2.0, 4)))
    fused(b.build(b.conv(y, 4, 6, k=3, pad=1)), {"Conv": 1, "Relu": 1})


def test_scalar_mul_padded_grouped_conv():
    """Mul by a scalar → padded grouped Conv."""
    b = GraphBuilder(6)
    x = b.input([1, 4, 8, 8])
    y = b.mul(b.relu(x), b.const(np.float32(0.25)))
    fused(b.build(b.conv(y, 4, 4, k=3, pad=1, group=2)), {"Conv": 1, "Relu": 1})


@pytest.mark.parametrize("op", ["Add", "Sub", "Div"])
def test_per_channel_binary_conv1x1(op):
    """Add/Sub/Div by a per-channel constant → Conv 1×1."""
    b = GraphBuilder(7)
    x = b.input([1, 4, 8, 8])
    y = b.op(op, [b.relu(x), b.channel(b.rng.uniform(0.5, 2.0, 4))])
    fused(b.build(b.conv(y, 4, 6, k=1)), {"Conv": 1, "Relu": 1})


def test_constant_minus_x_conv():
    """c − x (Sub with the constant first) → Conv 1×1: scale −1."""
    b = GraphBuilder(8)
    x = b.input([1, 4, 8, 8])
    y = b.sub(b.channel(b.rng.uniform(0.5, 2.0, 4)), b.relu(x))
    fused(b.build(b.conv(y, 4, 6, k=1)), {"Conv": 1, "Relu": 1})


def test_bn_on_graph_input():
    """BN reading a graph input → Conv: the fused Conv reads the graph input."""
    b = GraphBuilder(9)
    x = b.input([1, 4, 8, 8])
    fused(b.build(b.conv(b.bn(x, 4), 4, 4, k=1)), {"Conv": 1})


def test_mul_broadcasting_channels_before_conv():
    """x with 1 channel → Mul by a [1,4,1,1] constant → Conv 4→4: declined or folded exactly."""
    b = GraphBuilder(10)
    x = b.input([1, 1, 8, 8])
    y = b.mul(x, b.channel([0.5, 1.0, 1.5, 2.0]))
    model = b.build(b.conv(y, 4, 4, k=1))
    out, report = run_rules(model, RULE)
    assert_equivalent(model, out)


def test_mul_broadcasting_channels_before_gemm():
    """x [3,1] → Mul by a [6] constant → Gemm 6→5: declined or folded exactly."""
    b = GraphBuilder(11)
    x = b.input([3, 1])
    model = b.build(b.gemm(b.mul(x, b.randn((6,))), 6, 5))
    out, report = run_rules(model, RULE)
    assert_equivalent(model, out)


# -- negative ------------------------------------------------------------------------------------
declined = partial(declined_by, RULE)


def test_bn_before_padded_conv_declined():
    """BN (nonzero shift) → Conv 3×3 pad 1: border would hold 0 instead of the shift, declined."""
    declined(bn_conv(k=3, pad=1), "padded conv")


def test_add_before_padded_conv_declined():
    """Add(per-channel c) → Conv with asymmetric padding: declined."""
    b = GraphBuilder(20)
    x = b.input([1, 4, 8, 8])
    y = b.add(b.relu(x), b.channel([0.5, 1.0, 1.5, 2.0]))
    declined(b.build(b.conv(y, 4, 4, k=3, pads=[0, 0, 1, 0])), "padded conv")


def test_fan_out_declined():
    """BN output read by the Conv and by a Relu: declined (fan-out)."""
    b = GraphBuilder(21)
    x = b.input([1, 4, 8, 8])
    y = b.bn(x, 4)
    declined(b.build(b.conv(y, 4, 4, k=1), b.relu(y)), "fan-out")


def test_bn_output_is_graph_output_declined():
    """BN output is a graph output: declined."""
    b = GraphBuilder(22)
    x = b.input([1, 4, 8, 8])
    y = b.bn(x, 4)
    declined(b.build(b.conv(y, 4, 4, k=1), y), "graph output")


def test_shared_weight_declined():
    """BN → Conv whose weight is shared with another Conv: declined."""
    b = GraphBuilder(23)
    x = b.input([1, 4, 8, 8])
    w = b.randn((4, 4, 1, 1))
    y1 = b.conv(b.bn(x, 4), 4, 4, k=1, weight=w, bias=False)
    y2 = b.conv(b.relu(x), 4, 4, k=1, weight=w, bias=False)
    declined(b.build(y1, y2), "shared")


def test_weight_graph_input_declined():
    """BN → Conv whose weight is a graph input: declined."""
    b = GraphBuilder(24)
    x = b.input([1, 4, 8, 8])
    w = b.input([4, 4, 1, 1], name="w")
    declined(b.build(b.op("Conv", [b.bn(x, 4), w], kernel_shape=[1, 1])), "not constant")


def test_training_mode_bn_declined():
    """BN with training_mode=1 → Conv: declined."""
    b = GraphBuilder(25)
    x = b.input([2, 4, 8, 8])
    y = b.op("BatchNormalization", [x, *b.bn_params(4)], outputs=["y", "rm", "rv"], training_mode=1)[0]
    declined(b.build(b.conv(y, 4, 4, k=1)), "training_mode")


def test_spatial_mul_declined():
    """Mul by a [1,1,H,W] constant → Conv 1×1: not per-channel, declined."""
    b = GraphBuilder(26)
    x = b.input([1, 4, 8, 8])
    y = b.mul(b.relu(x), b.randn((1, 1, 8, 8)))
    declined(b.build(b.conv(y, 4, 4, k=1)), "per-channel")


# -- idempotence ---------------------------------------------------------------------------------
def test_idempotent():
    """A second run over the fused graph changes nothing."""
    out, _ = run_rules(bn_conv(seed=40, k=3, pad=0), RULE)
    assert_idempotent(out, RULE)


def test_idempotent_default_rules():
    """Default rules over a BN → Conv → BN graph, then again: nothing changes the second time."""
    b = GraphBuilder(41)
    x = b.input([1, 4, 8, 8])
    out, _ = run_rules(b.build(b.relu(b.bn(b.conv(b.bn(b.relu(x), 4), 4, 4, k=3, pad=0), 4))))
    assert ops(out) == {"Conv": 1, "Relu": 2}
    assert_idempotent(out)
