"""The patterns of PP-LCNetV3, OREPA and ECBSR's ECB through the default rule set.

- PP-LCNetV3: a learnable *scalar* affine (Mul/Add by a [1] or 0-d constant) after a sum of
  conv-BN branches folds into the merged conv; the one after HardSwish folds only forward into
  an unpadded conv.
- OREPA: a kernel computed by Einsum / Gather / Pad / Add over initializers, one Conv, then a BN:
  folded to one biased Conv.
- ECB: 1x1 (biased) -> border filled with that bias by slice assignment -> 3x3 pad 0 (dense, or
  depthwise with a computed scale * mask kernel), summed with a 3x3 and the identity, PReLU.

Each has positive cases (ops after, full checker, outputs equal with ORT optimizations off) and
negative ones: a non-linearity between (HardSwish, PReLU), a shared weight, fan-out, an affine on
a non-channel axis, a weight that is not constant.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.helpers import (GraphBuilder, assert_declined, assert_equivalent, assert_idempotent, assert_untouched,
                           nodes_of, ops, run_rules)

C = 4
X = [1, C, 8, 8]


def _scalar(b, value, shape):
    return b.const(np.full(shape, value))


def lcnet_layer(b, x, scale_shape=(1,), affine=None):
    """PP-LCNetV3 layer on x: 2 3x3 conv-BN + 1x1 conv-BN + identity BN, summed, then
    `affine(sum)` (default: the learnable scalar Mul/Add)."""
    terms = [b.bn(b.conv(x, C, C, 3, bias=False), C), b.bn(b.conv(x, C, C, 3, bias=False), C),
             b.bn(b.conv(x, C, C, 1, pad=0, bias=False), C), b.bn(x, C)]
    y = terms[0]
    for t in terms[1:]:
        y = b.add(y, t)
    if affine is None:
        return b.add(b.mul(_scalar(b, 1.3, scale_shape), y), _scalar(b, -0.2, scale_shape))
    return affine(y)


def initializer(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


# -- PP-LCNetV3: learnable scalar affine -----------------------------------------------------------
@pytest.mark.parametrize("scale_shape", [(1,), ()], ids=["shape1", "0d"])
def test_lcnet_scalar_affine_after_sum_folds_into_the_merged_conv(scale_shape):
    """Branch sum -> scalar Mul/Add -> HardSwish -> scalar Mul/Add -> 1x1 conv: Conv, HardSwish, Conv."""
    b = GraphBuilder(1)
    x = b.relu(b.input(X))
    h = b.op("HardSwish", [lcnet_layer(b, x, scale_shape)])
    a = b.add(b.mul(h, _scalar(b, 0.7, scale_shape)), _scalar(b, 0.3, scale_shape))
    m = b.build(b.conv(a, C, 8, 1, pad=0))
    out, report = run_rules(m)
    assert ops(out) == {"Relu": 1, "Conv": 2, "HardSwish": 1}, report.declines
    assert_equivalent(m, out)
    assert_idempotent(out)


def test_lcnet_scalar_affine_behind_hardswish_is_left():
    """HardSwish between the conv and a scalar Mul: nothing moves through the non-linearity."""
    b = GraphBuilder(2)
    x = b.relu(b.input(X))
    h = b.op("HardSwish", [b.conv(x, C, C, 3)])
    m = b.build(b.mul(h, _scalar(b, 0.7, (1,))))
    out, report = run_rules(m)
    assert_untouched(m, out, report)


def test_lcnet_scalar_affine_before_padded_conv_stays_apart():
    """HardSwish -> scalar Mul/Add -> 3x3 pad 1 conv: the shift is not exact at the zero border, so
    the affine does not fold into that conv (it may become its own per-channel op)."""
    b = GraphBuilder(3)
    x = b.relu(b.input(X))
    h = b.op("HardSwish", [b.conv(x, C, C, 3)])
    a = b.add(b.mul(h, _scalar(b, 0.7, (1,))), _scalar(b, 0.3, (1,)))
    m = b.build(b.conv(a, C, C, 3))
    out, report = run_rules(m)
    assert_equivalent(m, out)
    last = out.graph.node[-1]
    assert last.op_type == "Conv"
    assert initializer(out, last.input[1]).shape == (C, C, 3, 3)
    # the padded conv still reads an affine of the HardSwish output, not the HardSwish itself
    producer = {o: n for n in out.graph.node for o in n.output}
    assert producer[last.input[0]].op_type != "HardSwish"


def test_lcnet_shared_scalar_still_folds():
    """The scale initializer is read by a second Mul elsewhere: the layer folds, the other Mul keeps it."""
    b = GraphBuilder(4)
    x = b.relu(b.input(X))
    s = _scalar(b, 1.3, (1,))
    y = lcnet_layer(b, x, affine=lambda t: b.add(b.mul(s, t), _scalar(b, -0.2, (1,))))
    other = b.mul(b.relu(b.input(X)), s)
    m = b.build(b.op("HardSwish", [y]), other)
    out, report = run_rules(m)
    assert ops(out) == {"Relu": 2, "Conv": 1, "HardSwish": 1, "Mul": 1}, report.declines
    (mul,) = nodes_of(out, "Mul")
    assert s in mul.input and initializer(out, s).tolist() == pytest.approx([1.3])
    assert_equivalent(m, out)


def test_lcnet_fan_out_keeps_the_affine_apart():
    """The branch sum is also a graph output: the branches merge, the scalar Mul stays after them."""
    b = GraphBuilder(5)
    x = b.relu(b.input(X))
    holder = {}

    def affine(t):
        holder["sum"] = t
        return b.mul(t, _scalar(b, 1.3, (1,)))

    y = lcnet_layer(b, x, affine=affine)
    m = b.build(y, holder["sum"])
    out, report = run_rules(m)
    assert ops(out) == {"Relu": 1, "Conv": 1, "Mul": 1}, report.declines
    (conv,), (mul,) = nodes_of(out, "Conv"), nodes_of(out, "Mul")
    assert conv.output[0] in mul.input
    assert_equivalent(m, out)


@pytest.mark.parametrize("shape", [(1, 1, 8, 1), (1, 1, 1, 8)], ids=["rows", "cols"])
def test_lcnet_affine_on_a_spatial_axis_is_not_folded(shape):
    """A Mul by a constant that varies along H or W is no per-channel affine: it stays, unchanged."""
    b = GraphBuilder(6)
    x = b.relu(b.input(X))
    c = b.const(np.linspace(0.5, 1.5, int(np.prod(shape))).reshape(shape))
    m = b.build(lcnet_layer(b, x, affine=lambda t: b.mul(t, c)))
    out, report = run_rules(m)
    assert ops(out) == {"Relu": 1, "Conv": 1, "Mul": 1}, report.declines
    (mul,) = nodes_of(out, "Mul")
    assert c in mul.input
    np.testing.assert_array_equal(initializer(out, c), initializer(m, c))
    assert_equivalent(m, out)


# -- OREPA: computed kernel, one conv, trailing BN --------------------------------------------------
def orepa_weight(b, vector=None, cin=C, cout=8, k=3):
    """W = Einsum(v0 * W_origin) + v1 * (1x1 x avg) + v2 * pad(1x1), as the exporters write it."""
    v = vector or b.randn((3, cout), scale=0.5)
    rows = [b.op("Gather", [v, b.ints(i)], axis=0) for i in range(3)]
    w0 = b.op("Einsum", [b.randn((cout, cin, k, k), scale=0.3), rows[0]], equation="oihw,o->oihw")
    avg = b.op("Einsum", [b.randn((cout, cin), scale=0.3), b.const(np.full((k, k), 1 / k ** 2))],
               equation="oi,hw->oihw")
    w1 = b.op("Einsum", [avg, rows[1]], equation="oihw,o->oihw")
    one = b.op("Pad", [b.randn((cout, cin, 1, 1), scale=0.3), b.ints([0, 0, 1, 1, 0, 0, 1, 1])])
    w2 = b.op("Einsum", [one, rows[2]], equation="oihw,o->oihw")
    return b.add(b.add(w0, w1), w2)


def test_orepa_computed_kernel_and_trailing_bn_fold():
    """Einsum/Gather/Pad/Add kernel -> Conv -> BN -> Relu: one biased Conv + Relu."""
    b = GraphBuilder(7)
    x = b.relu(b.input(X))
    y = b.relu(b.bn(b.op("Conv", [x, orepa_weight(b)], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), 8))
    m = b.build(y)
    out, report = run_rules(m)
    assert ops(out) == {"Relu": 2, "Conv": 1}, report.declines
    (conv,) = nodes_of(out, "Conv")
    assert len(conv.input) == 3
    assert_equivalent(m, out)
    assert_idempotent(out)


def test_orepa_shared_computed_kernel_two_bns():
    """One computed kernel read by two convs, each with its own BN: each conv gets its own folded kernel."""
    b = GraphBuilder(8)
    x = b.relu(b.input(X))
    w = orepa_weight(b)
    ys = [b.relu(b.bn(b.op("Conv", [x, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), 8)) for _ in range(2)]
    m = b.build(*ys)
    out, report = run_rules(m)
    assert ops(out) == {"Relu": 3, "Conv": 2}, report.declines
    a, c = nodes_of(out, "Conv")
    assert not np.array_equal(initializer(out, a.input[1]), initializer(out, c.input[1]))
    assert_equivalent(m, out)


def test_orepa_kernel_from_a_graph_input_keeps_conv_and_bn():
    """The branch vector is a graph input (not constant): the kernel is not, so the BN stays a node."""
    b = GraphBuilder(9)
    x = b.relu(b.input(X))
    v = b.input((3, 8), name="vector")
    y = b.relu(b.bn(b.op("Conv", [x, orepa_weight(b, vector=v)], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), 8))
    m = b.build(y)
    out, report = run_rules(m)
    got = ops(out)
    assert got["Conv"] == 1 and got["BatchNormalization"] == 1, report.declines
    (conv,) = nodes_of(out, "Conv")
    assert conv.input[1] not in {t.name for t in out.graph.initializer}
    assert_equivalent(m, out)


def test_orepa_fan_out_before_the_bn():
    """The conv output is also a graph output: the BN cannot fold into it and stays."""
    b = GraphBuilder(10)
    x = b.relu(b.input(X))
    conv = b.op("Conv", [x, orepa_weight(b)], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    m = b.build(b.relu(b.bn(conv, 8)), conv)
    out, report = run_rules(m)
    assert ops(out) == {"Relu": 2, "Conv": 1, "BatchNormalization": 1}, report.declines
    assert_equivalent(m, out)


def test_orepa_affine_on_a_spatial_axis_after_the_conv_stays():
    """A Mul by a [1, 1, H, 1] constant after the computed-kernel conv is not folded into it."""
    b = GraphBuilder(11)
    x = b.relu(b.input(X))
    conv = b.op("Conv", [x, orepa_weight(b)], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    c = b.const(np.linspace(0.5, 1.5, 8).reshape(1, 1, 8, 1))
    m = b.build(b.relu(b.mul(conv, c)))
    out, report = run_rules(m)
    assert ops(out) == {"Relu": 2, "Conv": 1, "Mul": 1}, report.declines
    (mul,) = nodes_of(out, "Mul")
    assert c in mul.input
    assert_equivalent(m, out)


# -- ECB: bias-filled border, fixed-mask depthwise kernels, PReLU ------------------------------------
def _export_ecb(tmp_path, cin=2, cout=4, with_idt=False, fill=None, seed=0, form="legacy"):
    """Export one ECB (models/ecb.py) with torch; `fill` replaces its border value (b0) if given."""
    torch = pytest.importorskip("torch")
    import models.ecb as ecb
    from models.export import export_onnx

    torch.manual_seed(seed)
    block = ecb.ECB(cin, cout, with_idt=with_idt).eval()
    if fill is not None:
        original = ecb._fill_border

        def patched(y0, b0):
            return original(y0, fill(b0))

        ecb._fill_border = patched
    try:
        path = export_onnx(block, (1, cin, 8, 8), tmp_path / "ecb.onnx", form)
    finally:
        if fill is not None:
            ecb._fill_border = original
    return onnx.load(str(path))


@pytest.mark.parametrize("with_idt", [False, True], ids=["plain", "identity"])
def test_ecb_block_is_one_conv_and_prelu(tmp_path, with_idt):
    """ECB (3x3, 1x1->3x3, 1x1->Sobel-x/y, 1x1->Laplacian [+ x]) -> PReLU: one 3x3 Conv + PRelu."""
    cin = 4 if with_idt else 2
    m = _export_ecb(tmp_path, cin=cin, with_idt=with_idt)
    assert ops(m)["ScatterND"] == 16
    out, report = run_rules(m)
    assert ops(out) == {"Conv": 1, "PRelu": 1}, report.declines
    (conv,) = nodes_of(out, "Conv")
    assert initializer(out, conv.input[1]).shape == (4, cin, 3, 3)
    assert_equivalent(m, out)


def test_ecb_border_not_the_bias_is_not_merged(tmp_path):
    """The border filled with 2*b0 instead of the 1x1's bias b0: the four sequential branches are
    not convs of the input, so they do not merge (outputs still equal)."""
    m = _export_ecb(tmp_path, fill=lambda b0: 2 * b0 + 0.5)
    out, report = run_rules(m)
    assert ops(out)["Conv"] > 1, ops(out)
    assert_equivalent(m, out)


def test_ecb_prelu_is_a_non_linearity():
    """Conv -> PRelu -> per-channel Mul: the Mul does not move through the PReLU."""
    b = GraphBuilder(12)
    x = b.relu(b.input(X))
    y = b.op("PRelu", [b.conv(x, C, C, 3), b.const(np.full((C, 1, 1), 0.25))])
    m = b.build(b.mul(y, b.channel([0.5, 1.5, -1.0, 2.0])))
    out, report = run_rules(m)
    assert_untouched(m, out, report)


def test_ecb_mask_kernel_scaled_by_a_graph_input_is_not_merged():
    """Depthwise kernel Mul(scale, mask) with the scale a graph input: that branch is no constant
    conv, so the sum with the 3x3 branch is not merged into it."""
    b = GraphBuilder(13)
    x = b.relu(b.input(X))
    scale = b.input((C, 1, 1, 1), name="scale")
    mask = b.const(np.tile(np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], float), (C, 1, 1, 1)))
    dw = b.op("Conv", [x, b.mul(scale, mask)], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=C)
    m = b.build(b.add(b.conv(x, C, C, 3), dw))
    out, report = run_rules(m)
    assert ops(out) == {"Relu": 1, "Conv": 2, "Mul": 1, "Add": 1}, report.declines
    assert_equivalent(m, out)


def ecb_edge_branch(b, x, k0=None, b0=None):
    """ECB's 1x1 -> bias-filled border -> depthwise Sobel-x (scale * mask) branch, with the border
    written Sub(b0) -> Pad -> Add(b0) (what canonicalize_border_fill makes of the slice
    assignments). Returns (branch output, the 1x1's output)."""
    k0 = k0 or b.randn((C, C, 1, 1), scale=0.5)
    b0 = b0 or b.randn((C,), scale=0.5)
    y0 = b.op("Conv", [x, k0, b0], kernel_shape=[1, 1], pads=[0, 0, 0, 0])
    fill = b.const(initializer_of(b, b0).reshape(1, C, 1, 1))
    padded = b.add(b.pad(b.sub(y0, fill), [0, 0, 1, 1, 0, 0, 1, 1]), fill)
    scale = b.randn((C, 1, 1, 1), scale=0.5)
    mask = b.const(np.tile(np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], float), (C, 1, 1, 1)))
    dw = b.op("Conv", [padded, b.mul(scale, mask), b.randn((C,), scale=0.1)], kernel_shape=[3, 3],
              pads=[0, 0, 0, 0], group=C)
    return dw, y0


def initializer_of(b, name):
    return next(numpy_helper.to_array(t) for t in b.initializers if t.name == name)


def test_ecb_edge_branch_merges_with_the_3x3():
    """3x3(x) + dw Sobel(fill_b0(1x1(x))) -> PRelu: one 3x3 Conv + PRelu."""
    b = GraphBuilder(14)
    x = b.relu(b.input(X))
    dw, _ = ecb_edge_branch(b, x)
    m = b.build(b.op("PRelu", [b.add(b.conv(x, C, C, 3), dw), b.const(np.full((C, 1, 1), 0.25))]))
    out, report = run_rules(m)
    assert ops(out) == {"Relu": 1, "Conv": 1, "PRelu": 1}, report.declines
    assert_equivalent(m, out)


def test_ecb_fan_out_of_the_1x1_keeps_the_branch():
    """The 1x1's output is also a graph output: the edge branch cannot become a conv of x."""
    b = GraphBuilder(15)
    x = b.relu(b.input(X))
    dw, y0 = ecb_edge_branch(b, x)
    m = b.build(b.op("PRelu", [b.add(b.conv(x, C, C, 3), dw), b.const(np.full((C, 1, 1), 0.25))]), y0)
    out, report = run_rules(m)
    # the 1x1, the 3x3 and the edge branch's own conv (its Pad and fill shift folded in) stay three,
    # summed by an Add
    assert ops(out)["Conv"] == 3 and ops(out)["Add"] == 1, ops(out)
    assert_declined(report, "merge_linear_regions", "graph output")
    assert_equivalent(m, out)


def test_ecb_shared_1x1_weight_still_merges():
    """The 1x1's weight is also read by a conv outside the block: the block merges, the other conv
    keeps the original weight."""
    b = GraphBuilder(16)
    x = b.relu(b.input(X))
    k0 = b.randn((C, C, 1, 1), scale=0.5)
    dw, _ = ecb_edge_branch(b, x, k0=k0)
    other = b.op("Conv", [b.relu(b.input(X)), k0], kernel_shape=[1, 1], pads=[0, 0, 0, 0])
    m = b.build(b.add(b.conv(x, C, C, 3), dw), other)
    out, report = run_rules(m)
    assert ops(out) == {"Relu": 2, "Conv": 2}, report.declines
    assert any(k0 == n.input[1] for n in nodes_of(out, "Conv"))
    np.testing.assert_array_equal(initializer(out, k0), initializer(m, k0))
    assert_equivalent(m, out)
