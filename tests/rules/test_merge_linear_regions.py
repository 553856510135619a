"""merge_linear_regions: a region of linear ops between non-linearities becomes one Conv/Gemm."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import (GraphBuilder, assert_declined, assert_equivalent, assert_idempotent,
                           assert_untouched, attr, nodes_of, ops, run_rules)

RULE = "merge_linear_regions"
X = [1, 4, 8, 8]


def merged(model, expected_ops, count=1, **kw):
    out, report = run_rules(model, RULE, **kw)
    assert ops(out) == expected_ops, report.declines
    assert report.rule_counts == {RULE: count}
    assert_equivalent(model, out)
    return out


def only_conv(out):
    (conv,) = nodes_of(out, "Conv")
    return conv


def block(seed=0, shape=X):
    b = GraphBuilder(seed)
    return b, b.relu(b.input(shape))


def sum_all(b, terms):
    y = terms[0]
    for t in terms[1:]:
        y = b.add(y, t)
    return y


def repvgg(seed=0, c=4, stride=1, bn_identity=True, shape=X):
    b, x = block(seed, shape)
    terms = [b.bn(b.conv(x, c, c, 3, stride=stride, bias=False), c),
             b.bn(b.conv(x, c, c, 1, stride=stride, pad=0, bias=False), c)]
    if bn_identity:
        terms.append(b.bn(x, c))
    return b.build(sum_all(b, terms))


# -- positive: parallel branches -----------------------------------------------------------------
def test_repvgg_block():
    """RepVGG: 3×3-BN + 1×1-BN + BN(identity) → one 3×3 Conv."""
    out = merged(repvgg(1), {"Conv": 1, "Relu": 1})
    assert attr(only_conv(out), "kernel_shape") == [3, 3]


def test_repvgg_block_default_rules():
    """RepVGG block with the default rule set → one Conv; a second run changes nothing."""
    model = repvgg(2)
    out, report = run_rules(model, verify=True)
    assert ops(out) == {"Conv": 1, "Relu": 1}
    assert report.verification["ok"]
    assert_equivalent(model, out)
    assert_idempotent(out)


def test_repvgg_stride2_no_identity():
    """RepVGG downsampling block: 3×3 pad 1 s2 + 1×1 pad 0 s2 → one 3×3 s2 Conv."""
    out = merged(repvgg(3, stride=2, bn_identity=False), {"Conv": 1, "Relu": 1})
    assert attr(only_conv(out), "strides") == [2, 2]


def test_acnet_block():
    """ACNet: 3×3-BN + 1×3-BN + 3×1-BN → one 3×3 Conv."""
    b, x = block(4)
    terms = [b.bn(b.conv(x, 4, 4, (3, 3), bias=False), 4), b.bn(b.conv(x, 4, 4, (1, 3), bias=False), 4),
             b.bn(b.conv(x, 4, 4, (3, 1), bias=False), 4)]
    out = merged(b.build(sum_all(b, terms)), {"Conv": 1, "Relu": 1})
    assert attr(only_conv(out), "kernel_shape") == [3, 3]


def test_dilated_3x3_plus_5x5():
    """3×3 d=2 pad 2 + 5×5 pad 2 → one 5×5 Conv."""
    b, x = block(5)
    y = b.add(b.conv(x, 4, 4, 3, dil=2), b.conv(x, 4, 4, 5))
    out = merged(b.build(y), {"Conv": 1, "Relu": 1})
    assert attr(only_conv(out), "kernel_shape") == [5, 5]


def test_depthwise_plus_identity():
    """Depthwise 3×3 + identity → one depthwise Conv (group = channels)."""
    b, x = block(6)
    out = merged(b.build(b.add(b.conv(x, 4, 4, 3, group=4), x)), {"Conv": 1, "Relu": 1})
    assert attr(only_conv(out), "group") == 4


def test_grouped_plus_identity_is_per_group():
    """Group-2 3×3 (C=8) + identity → one group-2 Conv with a per-group identity kernel."""
    b, x = block(7, [1, 8, 6, 6])
    out = merged(b.build(b.add(b.conv(x, 8, 8, 3, group=2), b.bn(x, 8))), {"Conv": 1, "Relu": 1})
    assert attr(only_conv(out), "group") == 2


def test_sub_of_branches():
    """3×3(x) − 1×1(x) → one Conv."""
    b, x = block(8)
    y = b.sub(b.conv(x, 4, 4, 3), b.conv(x, 4, 4, 1))
    merged(b.build(y), {"Conv": 1, "Relu": 1})


def test_sum_of_three():
    """Sum(3×3, 1×1, BN(x)) → one Conv."""
    b, x = block(9)
    y = b.op("Sum", [b.conv(x, 4, 4, 3), b.conv(x, 4, 4, 1), b.bn(x, 4)])
    merged(b.build(y), {"Conv": 1, "Relu": 1})


def test_nested_adds():
    """(3×3 + 1×1) + (1×3 + identity) → one Conv."""
    b, x = block(10)
    y = b.add(b.add(b.conv(x, 4, 4, 3), b.conv(x, 4, 4, 1)), b.add(b.conv(x, 4, 4, (1, 3)), x))
    merged(b.build(y), {"Conv": 1, "Relu": 1})


def test_avgpool_branch_count_include_pad():
    """AveragePool 3×3 pad 1 count_include_pad=1 branch + 3×3 Conv → one Conv."""
    b, x = block(11)
    pool = b.op("AveragePool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)
    merged(b.build(b.add(b.conv(x, 4, 4, 3), b.bn(pool, 4))), {"Conv": 1, "Relu": 1})


def test_avgpool_ceil_mode_same_size():
    """AveragePool ceil_mode=1 where ceil and floor sizes agree (H=7, k3 s2 p1) + 3×3 s2 → one Conv."""
    b, x = block(12, [1, 4, 7, 7])
    pool = b.op("AveragePool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                count_include_pad=1, ceil_mode=1)
    merged(b.build(b.add(b.conv(x, 4, 4, 3, stride=2), pool)), {"Conv": 1, "Relu": 1})


def test_layer_scale_residual():
    """x + γ·Conv3×3(x) (layer scale Mul) → one Conv."""
    b, x = block(13)
    y = b.add(x, b.mul(b.conv(x, 4, 4, 3), b.channel(b.rng.uniform(0.01, 0.1, 4))))
    merged(b.build(y), {"Conv": 1, "Relu": 1})


def test_same_branch_twice():
    """Conv(x) + Conv(x) (one tensor read twice by the Add) → one Conv."""
    b, x = block(14)
    c = b.conv(x, 4, 4, 3)
    merged(b.build(b.add(c, c)), {"Conv": 1, "Relu": 1})


def test_repvgg_conv1d():
    """RepVGG-style Conv1d: k3 + k1 + identity → one Conv1d."""
    b, x = block(15, [2, 4, 10])
    y = sum_all(b, [b.conv(x, 4, 4, (3,)), b.conv(x, 4, 4, (1,)), x])
    merged(b.build(y), {"Conv": 1, "Relu": 1})


def test_branch_sum_is_graph_output():
    """The merged sum is a graph output and keeps its name."""
    b, x = block(16)
    y = b.add(b.conv(x, 4, 4, 3), b.conv(x, 4, 4, 1))
    out = merged(b.build(y), {"Conv": 1, "Relu": 1})
    assert [o.name for o in out.graph.output] == [y]


def test_shared_weight_still_merges():
    """A branch weight shared with a Conv outside the region: the region merges, the other Conv keeps it."""
    b, x = block(17)
    w = b.randn((4, 4, 3, 3), scale=0.3)
    y = b.add(b.conv(x, 4, 4, 3, weight=w), b.conv(x, 4, 4, 1))
    other = b.conv(b.relu(y), 4, 4, 3, weight=w)
    merged(b.build(other), {"Conv": 2, "Relu": 2})


# -- positive: sequential ------------------------------------------------------------------------
def test_expandnet_1x1_3x3_1x1():
    """ExpandNet: 1×1 (no bias) → 3×3 pad 1 → 1×1 → one 3×3 Conv."""
    b, x = block(20)
    y = b.conv(b.conv(b.conv(x, 4, 16, 1, bias=False), 16, 16, 3), 16, 4, 1)
    out = merged(b.build(y), {"Conv": 1, "Relu": 1})
    assert attr(only_conv(out), "kernel_shape") == [3, 3]


def test_conv_bn_sequence():
    """3×3 → BN → 1×1 → BN (no padding after a bias) → one Conv."""
    b, x = block(21)
    y = b.bn(b.conv(b.bn(b.conv(x, 4, 8, 3), 8), 8, 4, 1), 4)
    merged(b.build(y), {"Conv": 1, "Relu": 1})


def test_dbb_sub_pad_add_border():
    """DBB: 1×1-BN → Sub(c) → Pad → Add(c) → 3×3 pad 0, c = BN shift → one 3×3 pad 1 Conv."""
    b, x = block(22)
    gamma, beta, mean, var = (b.rng.uniform(0.5, 1.5, 4), b.rng.standard_normal(4), b.rng.standard_normal(4),
                              b.rng.uniform(0.5, 2.0, 4))
    y = b.bn(b.conv(x, 4, 4, 1, bias=False), 4, params=[b.const(v) for v in (gamma, beta, mean, var)])
    shift = beta - mean * gamma / np.sqrt(var + 1e-5)
    c = b.channel(shift)
    y = b.add(b.pad(b.sub(y, c), [0, 0, 1, 1, 0, 0, 1, 1]), c)
    out = merged(b.build(b.bn(b.conv(y, 4, 4, 3, pad=0, bias=False), 4)), {"Conv": 1, "Relu": 1})
    assert attr(only_conv(out), "pads") == [1, 1, 1, 1]


def test_pad_then_conv():
    """Pad(0) → Conv 3×3 pad 0 → one Conv with the padding."""
    b, x = block(23)
    out = merged(b.build(b.conv(b.pad(x, [0, 0, 1, 2, 0, 0, 2, 1]), 4, 4, 3, pad=0)), {"Conv": 1, "Relu": 1})
    assert attr(only_conv(out), "pads") == [1, 2, 2, 1]


def avgpool_then_conv1x1(seed):
    b, x = block(seed)
    pool = b.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2])
    return b.build(b.conv(pool, 4, 8, 1))


def test_avgpool_then_conv1x1_aggressive():
    """AveragePool 2×2 s2 → Conv 1×1 with aggressive=True → one 2×2 s2 Conv."""
    out = merged(avgpool_then_conv1x1(24), {"Conv": 1, "Relu": 1}, aggressive=True)
    assert attr(only_conv(out), "strides") == [2, 2]


def test_residual_of_intermediate():
    """y = Conv(x); z = y + BN(y) (y read twice inside the region) → one Conv after two merges."""
    b, x = block(25)
    y = b.conv(x, 4, 4, 3)
    merged(b.build(b.add(y, b.bn(y, 4))), {"Conv": 1, "Relu": 1}, count=2)


@pytest.mark.parametrize("g1,g2", [(1, 2), (2, 1), (2, 2), (2, 4), (4, 2)])
def test_grouped_1x1_then_grouped_3x3(g1, g2):
    """1×1 (group g1, no bias) → 3×3 pad 1 (group g2) → one Conv with group gcd(g1, g2) (aggressive:
    a coarser group can cost more)."""
    b, x = block(26, [1, 8, 6, 6])
    y = b.conv(b.conv(x, 8, 8, 1, group=g1, bias=False), 8, 8, 3, group=g2)
    out = merged(b.build(y), {"Conv": 1, "Relu": 1}, aggressive=True)
    assert attr(only_conv(out), "group") == np.gcd(g1, g2)


def test_grouped_1x1_bias_then_unpadded_grouped_3x3():
    """1×1 group 4 with bias → 3×3 pad 0 group 2: the bias passes through the grouped kernel."""
    b, x = block(27, [1, 8, 6, 6])
    merged(b.build(b.conv(b.conv(x, 8, 8, 1, group=4), 8, 8, 3, pad=0, group=2)), {"Conv": 1, "Relu": 1})


def test_stride2_then_unpadded_3x3_aggressive():
    """3×3 s2 pad 1 → 3×3 pad 0 (aggressive) → one 7×7 s2 Conv."""
    b, x = block(28, [1, 4, 9, 9])
    out = merged(b.build(b.conv(b.conv(x, 4, 4, 3, stride=2), 4, 4, 3, pad=0)), {"Conv": 1, "Relu": 1},
                 aggressive=True)
    assert attr(only_conv(out), "kernel_shape") == [7, 7]


def test_pad_then_avgpool_exclude_pad():
    """Pad(0) → AveragePool without pads (count_include_pad irrelevant) + 3×3 → one Conv."""
    b, x = block(29)
    pool = b.op("AveragePool", [b.pad(x, [0, 0, 1, 1, 0, 0, 1, 1])], kernel_shape=[3, 3])
    merged(b.build(b.add(pool, b.conv(x, 4, 4, 3))), {"Conv": 1, "Relu": 1})


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_auto_pad_branch(auto_pad):
    """2×2 Conv with auto_pad SAME_* + 1×1: the implied asymmetric pads nest, one Conv."""
    b, x = block(30)
    c2 = b.op("Conv", [x, b.randn((4, 4, 2, 2), 0.5), b.randn((4,))], kernel_shape=[2, 2], auto_pad=auto_pad)
    merged(b.build(b.add(c2, b.conv(x, 4, 4, 1))), {"Conv": 1, "Relu": 1})


def test_conv3d_repvgg():
    """Conv3d 3×3×3 + 1×1×1 + identity → one Conv3d."""
    b, x = block(31, [1, 4, 5, 5, 5])
    y = sum_all(b, [b.conv(x, 4, 4, (3, 3, 3)), b.conv(x, 4, 4, (1, 1, 1)), x])
    merged(b.build(y), {"Conv": 1, "Relu": 1})


def test_dbb_full_block_default_rules():
    """Full DBB: 3×3-BN + 1×1-BN + 1×1-BNpad-3×3-BN + 1×1-BNpad-AvgPool-BN → one Conv (default rules)."""
    b, x = block(32)

    def bn_and_pad(t):
        p = [b.rng.uniform(0.5, 1.5, 4), b.rng.standard_normal(4), b.rng.standard_normal(4), b.rng.uniform(0.5, 2, 4)]
        y = b.bn(t, 4, params=[b.const(v) for v in p])
        c = b.channel(p[1] - p[2] * p[0] / np.sqrt(p[3] + 1e-5))
        return b.add(b.pad(b.sub(y, c), [0, 0, 1, 1, 0, 0, 1, 1]), c)

    br1 = b.bn(b.conv(x, 4, 4, 3, bias=False), 4)
    br2 = b.bn(b.conv(x, 4, 4, 1, bias=False), 4)
    br3 = b.bn(b.conv(bn_and_pad(b.conv(x, 4, 4, 1, bias=False)), 4, 4, 3, pad=0, bias=False), 4)
    br4 = b.bn(b.op("AveragePool", [bn_and_pad(b.conv(x, 4, 4, 1, bias=False))], kernel_shape=[3, 3]), 4)
    model = b.build(b.add(b.add(br1, br2), b.add(br3, br4)))
    out, report = run_rules(model, verify=True)
    assert ops(out) == {"Conv": 1, "Relu": 1}
    assert_equivalent(model, out)
    assert_idempotent(out)


# -- positive: channel structure -----------------------------------------------------------------
def test_split_convs_concat_grouped():
    """Split(4,4) → 3×3 convs → Concat → one group-2 Conv."""
    b, x = block(30, [1, 8, 6, 6])
    a, c = b.op("Split", [x, b.ints([4, 4])], n_out=2, axis=1)
    y = b.op("Concat", [b.conv(a, 4, 4, 3), b.conv(c, 4, 4, 3)], axis=1)
    out = merged(b.build(y), {"Conv": 1, "Relu": 1})
    assert attr(only_conv(out), "group") == 2


def split_uneven(seed):
    b, x = block(seed, [1, 8, 6, 6])
    a, c = b.op("Split", [x, b.ints([2, 6])], n_out=2, axis=1)
    y = b.op("Concat", [b.conv(a, 2, 3, 3), b.conv(c, 6, 5, 1)], axis=1)
    return b.build(y)


def test_split_uneven_convs_concat_aggressive():
    """Split(2,6) → 3×3 and 1×1 convs → Concat with aggressive=True → one dense Conv."""
    merged(split_uneven(31), {"Conv": 1, "Relu": 1}, aggressive=True)


def test_slice_convs_concat():
    """Slice [0:4] and [4:8] (ends INT64_MAX) on channels → convs → Concat → one group-2 Conv."""
    b, x = block(32, [1, 8, 6, 6])
    s1 = b.op("Slice", [x, b.ints([0]), b.ints([4]), b.ints([1])])
    s2 = b.op("Slice", [x, b.ints([4]), b.ints([np.iinfo(np.int64).max]), b.ints([1])])
    y = b.op("Concat", [b.conv(s1, 4, 4, 3), b.conv(s2, 4, 4, 3)], axis=1)
    out = merged(b.build(y), {"Conv": 1, "Relu": 1})
    assert attr(only_conv(out), "group") == 2


def test_concat_of_convs_on_one_input():
    """Concat(3×3(x), 3×3 d1 pad (1,1)(x)) on channels (axis −3) → one Conv with the summed channels."""
    b, x = block(33)
    y = b.op("Concat", [b.conv(x, 4, 3, 3), b.conv(x, 4, 5, 3, bias=False)], axis=-3)
    out = merged(b.build(y), {"Conv": 1, "Relu": 1})
    weights = {t.name: list(t.dims) for t in out.graph.initializer}
    assert weights[only_conv(out).input[1]] == [8, 4, 3, 3]


@pytest.mark.parametrize("average", ["Mul", "Div"])
def test_parallel_gemm_heads_averaged(average):
    """Two Gemm heads on one input, Add, then Mul 0.5 / Div 2 → one Gemm."""
    b = GraphBuilder(34)
    x = b.relu(b.input([3, 6]))
    y = b.add(b.gemm(x, 6, 5, trans_b=1), b.gemm(x, 6, 5, trans_b=0, alpha=0.5))
    y = b.op(average, [y, b.const(np.float32(0.5 if average == "Mul" else 2.0))])
    merged(b.build(y), {"Gemm": 1, "Relu": 1})


def test_gemm_residual():
    """x + Gemm(x) on [N, C] → one Gemm."""
    b = GraphBuilder(36)
    x = b.relu(b.input([3, 6]))
    merged(b.build(b.add(x, b.gemm(x, 6, 6))), {"Gemm": 1, "Relu": 1})


def test_matmul_then_matmul():
    """MatMul → MatMul (no non-linearity between) → one Gemm."""
    b = GraphBuilder(37)
    x = b.relu(b.input([3, 6]))
    merged(b.build(b.matmul(b.matmul(x, 6, 8), 8, 5)), {"Gemm": 1, "Relu": 1})


def test_matmul_add_heads():
    """MatMul + MatMul → Add(bias) on a 2-D input → one Gemm."""
    b = GraphBuilder(35)
    x = b.relu(b.input([3, 6]))
    y = b.add(b.add(b.matmul(x, 6, 5), b.matmul(x, 6, 5)), b.randn((5,)))
    merged(b.build(y), {"Gemm": 1, "Relu": 1})


# -- negative ------------------------------------------------------------------------------------
def declined(model, *words, **kw):
    out, report = run_rules(model, RULE, **kw)
    assert_untouched(model, out, report)
    if words:
        assert_declined(report, RULE, *words)
    return report


def test_branch_fan_out_untouched():
    """3×3 output read by the BN of the sum and by another graph output: untouched."""
    b, x = block(40)
    c3 = b.conv(x, 4, 4, 3)
    y = b.add(b.bn(c3, 4), b.conv(x, 4, 4, 1))
    declined(b.build(b.relu(y), b.relu(c3)))


def test_branch_is_graph_output_untouched():
    """A branch output that is also a graph output: untouched."""
    b, x = block(41)
    c1 = b.conv(x, 4, 4, 1)
    declined(b.build(b.relu(b.add(b.conv(x, 4, 4, 3), c1)), c1))


def test_split_output_read_outside_declined():
    """Split → (conv, Relu graph output): the Split cannot be absorbed, declined as read outside."""
    b, x = block(42, [1, 8, 6, 6])
    a, c = b.op("Split", [x, b.ints([4, 4])], n_out=2, axis=1)
    declined(b.build(b.relu(b.conv(a, 4, 4, 3)), b.relu(c)), "outside")


def test_weight_graph_input_untouched():
    """A branch whose Conv weight is a graph input: untouched."""
    b, x = block(43)
    w = b.input([4, 4, 3, 3], name="w")
    c3 = b.op("Conv", [x, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    declined(b.build(b.relu(b.add(c3, b.conv(x, 4, 4, 1)))))


def test_training_mode_bn_untouched():
    """A branch with training_mode=1 BN: untouched."""
    b, x = block(44, [2, 4, 8, 8])
    t = b.op("BatchNormalization", [b.conv(x, 4, 4, 1), *b.bn_params(4)], outputs=["t", "rm", "rv"],
             training_mode=1)[0]
    declined(b.build(b.relu(b.add(b.conv(x, 4, 4, 3), t))))


def test_1x1_pad1_plus_3x3_pad1_untouched():
    """1×1 pad 1 (3×3 out) + 3×3 pad 1 (1×1 out, broadcast by Add) on a 1×1 input: untouched."""
    b, x = block(45, [1, 4, 1, 1])
    y = b.add(b.conv(x, 4, 4, 1, pad=1), b.conv(x, 4, 4, 3, pad=1))
    declined(b.build(b.relu(y)))


def test_avgpool_count_exclude_pad_untouched():
    """AveragePool pad 1 with count_include_pad=0 (ONNX default) + 3×3: untouched."""
    b, x = block(46)
    pool = b.op("AveragePool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    declined(b.build(b.relu(b.add(b.conv(x, 4, 4, 3), pool))))


def test_avgpool_ceil_mode_changes_size_untouched():
    """AveragePool ceil_mode=1 that adds an output row (H=8, k3 s2 p1) → Conv 1×1: untouched."""
    b, x = block(47)
    pool = b.op("AveragePool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                count_include_pad=1, ceil_mode=1)
    declined(b.build(b.relu(b.conv(pool, 4, 4, 1))))


def test_biased_1x1_then_padded_3x3_untouched():
    """1×1 with bias → 3×3 pad 1: the border would see the bias, untouched."""
    b, x = block(48)
    declined(b.build(b.relu(b.conv(b.conv(x, 4, 8, 1), 8, 4, 3))))


def test_tiny_bias_1x1_then_padded_3x3_untouched():
    """A 1×1 bias of 1e-9 before a 3×3 pad 1 is still a bias: only a Pad border fill gets tolerance."""
    b, x = block(50)
    h = b.conv(x, 4, 8, 1, bias=True, bias_name=b.const(np.full(8, 1e-9)))
    declined(b.build(b.relu(b.conv(h, 8, 4, 3))))


def test_pad_nonzero_value_untouched():
    """Pad with value 1 → 3×3 pad 0: untouched."""
    b, x = block(49)
    declined(b.build(b.relu(b.conv(b.pad(x, [0, 0, 1, 1, 0, 0, 1, 1], value=np.float32(1)), 4, 4, 3, pad=0))))


def test_different_strides_untouched():
    """1×1 s2 + 5×5 s1 pad 0 (both 4×4 out on 8×8) summed: different strides, untouched."""
    b, x = block(50)
    y = b.add(b.conv(x, 4, 4, 1, stride=2, pad=0), b.conv(x, 4, 4, 5, pad=0))
    declined(b.build(b.relu(y)))


def test_branches_read_different_tensors_untouched():
    """Conv(x1) + Conv(x2) from two graph inputs: untouched."""
    b = GraphBuilder(51)
    x1, x2 = b.input(X), b.input(X)
    declined(b.build(b.relu(b.add(b.conv(x1, 4, 4, 3), b.conv(x2, 4, 4, 1)))))


def test_dbb_fill_mismatch_stops_at_pad():
    """1×1(bias b) → Sub(c) → Pad → Add(c) → 3×3 pad 0 with c ≠ b: no merge across the Pad; the two sides
    merge separately (1×1+Sub, Pad+Add+3×3) into two exact Convs."""
    b, x = block(52)
    y = b.conv(x, 4, 4, 1)
    c = b.channel(b.rng.standard_normal(4))
    y = b.add(b.pad(b.sub(y, c), [0, 0, 1, 1, 0, 0, 1, 1]), c)
    out = merged(b.build(b.conv(y, 4, 4, 3, pad=0)), {"Conv": 2, "Relu": 1}, count=2)
    assert sorted(attr(n, "kernel_shape")[0] for n in nodes_of(out, "Conv")) == [1, 3]


def dense_plus_depthwise(seed):
    b, x = block(seed, [1, 16, 8, 8])
    return b.build(b.add(b.conv(x, 16, 16, 3, group=16), b.conv(x, 16, 16, 1)))


def test_avgpool_then_conv1x1_declined_for_cost():
    """AveragePool 2×2 s2 → Conv 1×1 4→8: a dense 2×2 conv costs more, declined."""
    declined(avgpool_then_conv1x1(56), "cost more")


def test_split_uneven_declined_for_cost():
    """Split(2,6) → 3×3 / 1×1 → Concat: the block-diagonal result is dense 3×3, declined for cost."""
    declined(split_uneven(57), "cost more")


def test_concat_3x3_and_1x1_declined_for_cost():
    """Concat(3×3(x), 1×1(x)): the 1×1 grows to 3×3 in the merged conv, declined for cost."""
    b, x = block(58)
    declined(b.build(b.relu(b.op("Concat", [b.conv(x, 4, 3, 3), b.conv(x, 4, 5, 1)], axis=1))), "cost more")


def test_dense_1x1_plus_depthwise_declined_for_cost():
    """Dense 1×1 + depthwise 3×3: the merged dense 3×3 costs more, declined with the figures."""
    declined(dense_plus_depthwise(53), "cost more")


def test_dense_1x1_plus_depthwise_aggressive():
    """Dense 1×1 + depthwise 3×3 with aggressive=True → one dense 3×3 Conv."""
    out = merged(dense_plus_depthwise(54), {"Conv": 1, "Relu": 1}, aggressive=True)
    assert attr(only_conv(out), "group") == 1


# -- known bugs and missed merges (strict xfail: each turns into a failure once fixed) ----------
def test_mul_broadcasting_channels_untouched():
    """Conv with 1 output channel → Mul by [1,4,1,1] (broadcasts to 4 channels): untouched, no crash."""
    b, x = block(55)
    y = b.mul(b.conv(x, 4, 1, 3), b.channel([0.5, 1.0, 1.5, 2.0]))
    model = b.build(b.relu(y))
    out, report = run_rules(model, RULE)
    assert_equivalent(model, out)


@pytest.mark.parametrize("form", ["bn_then_mul", "x_plus_bn"])
def test_rank2_affine_only_region(form):
    """BN1d → Mul(per-channel), or x + BN1d(x), on [N, C]: merged exactly or left alone, no error."""
    b = GraphBuilder(59)
    x = b.relu(b.input([3, 6]))
    y = b.mul(b.bn(x, 6), b.randn((6,))) if form == "bn_then_mul" else b.add(x, b.bn(x, 6))
    model = b.build(b.relu(y))
    out, report = run_rules(model, RULE)
    assert_equivalent(model, out)


def test_dilated_3x3_plus_1x1():
    """3×3 d=2 pad 2 + 1×1 + identity → one 3×3 d=2 Conv."""
    b, x = block(62)
    y = sum_all(b, [b.conv(x, 4, 4, 3, dil=2), b.conv(x, 4, 4, 1), x])
    out = merged(b.build(y), {"Conv": 1, "Relu": 1})
    assert attr(only_conv(out), "dilations") == [2, 2]


def test_dilated_3x3_then_1x1():
    """3×3 d=2 pad 2 → 1×1 → one 3×3 d=2 Conv."""
    b, x = block(63)
    out = merged(b.build(b.conv(b.conv(x, 4, 4, 3, dil=2), 4, 4, 1)), {"Conv": 1, "Relu": 1})
    assert attr(only_conv(out), "dilations") == [2, 2]


def test_even_kernel_stride2_plus_1x1():
    """2×2 s2 (auto_pad SAME_UPPER, i.e. pad 0 on 8×8) + 1×1 s2 → one 2×2 s2 Conv."""
    b, x = block(64)
    c2 = b.op("Conv", [x, b.randn((4, 4, 2, 2), 0.5)], kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER")
    merged(b.build(b.add(c2, b.conv(x, 4, 4, 1, stride=2, pad=0))), {"Conv": 1, "Relu": 1})


# -- idempotence ---------------------------------------------------------------------------------
def test_idempotent():
    """A second run over a merged RepVGG block changes nothing."""
    out, _ = run_rules(repvgg(60), RULE)
    assert_idempotent(out, RULE)


def test_idempotent_split_concat():
    """A second run over a merged Split→convs→Concat (now a grouped Conv) changes nothing."""
    b, x = block(61, [1, 8, 6, 6])
    a, c = b.op("Split", [x, b.ints([4, 4])], n_out=2, axis=1)
    out, _ = run_rules(b.build(b.relu(b.op("Concat", [b.conv(a, 4, 4, 3), b.conv(c, 4, 4, 3)], axis=1))), RULE)
    assert_idempotent(out, RULE)


def test_lone_op_is_not_walked(monkeypatch):
    """A Conv or BN whose inputs come from ops the walk does not enter (Relu, a graph input) is a
    region of one op: match skips the walk, so no weight is read or converted to float64."""
    from onnxrep import linear as L

    def boom(node):
        raise AssertionError(f"walked into lone {node.op} {node.name}")

    b, x = block(62)
    y = b.relu(b.conv(x, 4, 4, 3))
    model = b.build(b.bn(b.relu(b.conv(y, 4, 4, 1)), 4))
    monkeypatch.setattr(L, "conv_of", boom)
    monkeypatch.setattr(L, "affine_of", boom)
    out, report = run_rules(model, RULE)
    assert_untouched(model, out, report)


def test_cost_uses_weight_shapes():
    """The cost model's MACs per output (taps_per_output, from the weight's shape alone) agree with
    the ConvSpec conv_of builds, for a grouped Conv, Gemm with transB 0 and 1, and MatMul."""
    import onnx_graphsurgeon as gs

    from onnxrep import linear as L

    b = GraphBuilder(63)
    x = b.input([1, 6, 5, 5])
    c = b.conv(x, 6, 4, (3, 2), group=2)
    v = b.input([1, 6])
    heads = [b.gemm(v, 6, 3, trans_b=1), b.gemm(v, 6, 5, trans_b=0), b.matmul(v, 6, 2)]
    graph = gs.import_onnx(b.build(c, *heads))
    n = 0
    for node in graph.nodes:
        if node.op in ("Conv", "Gemm", "MatMul"):
            spec = L.conv_of(node).spec
            assert L.taps_per_output(node) == spec.weight.shape[1] * int(np.prod(spec.kernel_shape)), node.op
            n += 1
    assert n == 4
