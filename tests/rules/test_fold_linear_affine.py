"""fold_linear_affine: affines, regroupings and branches around MatMul/Gemm on channel-last tokens."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import (assert_declined, assert_equivalent, assert_idempotent, declined_by, GraphBuilder, ops,
                           run_rules)

RULE = "fold_linear_affine"


def folded(model, expected_ops, rules=(RULE,), count=None):
    out, report = run_rules(model, *rules)
    assert ops(out) == expected_ops, report.declines
    if count is not None:
        assert report.rule_counts == {RULE: count}
    assert_equivalent(model, out)
    return out


def linear(b, x, cin, cout, bias=True):
    h = b.matmul(x, cin, cout)
    return b.add(h, b.randn((cout,), scale=0.5)) if bias else h


def levit(b, x, cin, cout, flatten=True, bias=False, tokens=(2, 5)):
    """LeViT's Linear + BatchNorm1d: MatMul → Flatten(axis=2)/Reshape → BN → Reshape back."""
    h = linear(b, x, cin, cout, bias)
    if flatten:
        f = b.op("Flatten", [h], axis=2)
    else:
        f = b.op("Reshape", [h, b.ints([-1, cout])])
    return b.op("Reshape", [b.bn(f, cout), b.ints(list(tokens) + [cout])])


# -- positive: BN1d after a Linear on tokens (LeViT) --------------------------------------------
def test_levit_flatten_bn_reshape():
    """MatMul → Flatten(axis=2) → BN → Reshape: one MatMul + bias Add, no BN, no Flatten/Reshape."""
    b = GraphBuilder(0)
    x = b.input([2, 5, 8])
    folded(b.build(b.relu(levit(b, x, 8, 16))), {"MatMul": 1, "Add": 1, "Relu": 1}, count=1)


def test_levit_reshape_bn_reshape_with_bias():
    """Linear with bias → Reshape[-1, C] (dynamo's view) → BN → Reshape back."""
    b = GraphBuilder(1)
    x = b.input([2, 5, 8])
    folded(b.build(b.relu(levit(b, x, 8, 12, flatten=False, bias=True))), {"MatMul": 1, "Add": 1, "Relu": 1})


def test_levit_chain_of_two_linear_bn():
    """Two Linear+BN1d with a Relu between: each folds, the Relu stays."""
    b = GraphBuilder(2)
    x = b.input([2, 5, 8])
    y = levit(b, b.relu(levit(b, x, 8, 16)), 16, 8)
    folded(b.build(b.relu(y)), {"MatMul": 2, "Add": 2, "Relu": 2}, count=2)


def test_bn_in_transpose_pair():
    """MatMul → Transpose(0,2,1) → BN (on [B, C, N]) → Transpose back folds."""
    b = GraphBuilder(3)
    x = b.input([2, 5, 8])
    t = b.op("Transpose", [b.matmul(x, 8, 12)], perm=[0, 2, 1])
    y = b.op("Transpose", [b.bn(t, 12)], perm=[0, 2, 1])
    folded(b.build(b.relu(y)), {"MatMul": 1, "Add": 1, "Relu": 1})


def test_levit_via_all_rules_and_idempotent():
    """The whole pipeline reaches the same form, and a second run applies nothing."""
    b = GraphBuilder(4)
    x = b.input([1, 4, 16])
    out = folded(b.build(b.relu(levit(b, x, 16, 32, tokens=(1, 4)))), {"MatMul": 1, "Add": 1, "Relu": 1}, rules=())
    assert_idempotent(out)


def test_2d_gemm_bn_reshape():
    """A 2-D Linear (Gemm) reshaped to tokens after its BN: Gemm folds the BN, the Reshape stays."""
    b = GraphBuilder(5)
    x = b.input([6, 8])
    h = b.bn(b.gemm(x, 8, 4), 4)
    y = b.op("Reshape", [h, b.ints([2, 3, 4])])
    folded(b.build(b.relu(y)), {"Gemm": 1, "Reshape": 1, "Relu": 1}, rules=())


# -- positive: layer scale -----------------------------------------------------------------------
@pytest.mark.parametrize("gamma_shape", [(8,), (1, 1, 8)])
def test_layer_scale_on_residual_branch(gamma_shape):
    """x + gamma * proj(t): the Mul(gamma) folds into proj's weight and bias; no Mul left."""
    b = GraphBuilder(6)
    x = b.input([2, 5, 8])
    t = b.relu(b.input([2, 5, 8]))
    branch = b.mul(linear(b, t, 8, 8), b.randn(gamma_shape))
    folded(b.build(b.add(x, branch)), {"MatMul": 1, "Add": 2, "Relu": 1}, count=1)


def test_layer_scale_gamma_first_operand():
    """Mul(gamma, h) with the constant first."""
    b = GraphBuilder(7)
    x = b.input([2, 5, 8])
    branch = b.mul(b.randn((8,)), b.matmul(b.relu(x), 8, 8))
    folded(b.build(b.add(x, branch)), {"MatMul": 1, "Add": 1, "Relu": 1})


def test_layer_scale_4d_tokens():
    """Batched MatMul on [B, H, W, C] (ConvNeXt's channels-last MLP) with a 2-D weight + gamma."""
    b = GraphBuilder(8)
    x = b.input([1, 3, 3, 8])
    branch = b.mul(linear(b, b.relu(x), 8, 8), b.randn((8,)))
    folded(b.build(b.add(x, branch)), {"MatMul": 1, "Add": 2, "Relu": 1})


def test_affine_before_linear_on_tokens():
    """BN1d-style Mul/Add by per-channel constants before a Linear fold into its input columns."""
    b = GraphBuilder(9)
    x = b.input([2, 5, 8])
    a = b.add(b.mul(b.relu(x), b.randn((8,))), b.randn((8,)))
    folded(b.build(linear(b, a, 8, 4)), {"MatMul": 1, "Add": 1, "Relu": 1})


def test_bn1d_in_a_flatten_pair_before_a_linear():
    """Flatten → BN → Reshape (BN1d on tokens) before a Linear folds into its input columns."""
    b = GraphBuilder(19)
    x = b.relu(b.input([2, 5, 8]))
    n = b.op("Reshape", [b.bn(b.op("Flatten", [x], axis=2), 8), b.ints([2, 5, 8])])
    folded(b.build(b.relu(linear(b, n, 8, 4))), {"MatMul": 1, "Add": 1, "Relu": 2})


def test_conv_bn_gets_no_token_decline():
    """A BN after a Conv is not a token affine: this rule stays silent about it."""
    b = GraphBuilder(34)
    x = b.input([1, 4, 6, 6])
    c = b.conv(x, 4, 4, 3)
    m = b.build(b.relu(b.bn(c, 4)), c)
    out, report = run_rules(m, RULE)
    assert report.declines == []


def test_transposed_weight_is_constant_folded():
    """MatMul(x, Transpose(W)) (x·Wᵀ as exporters write nn.Linear) folds after constant folding."""
    b = GraphBuilder(10)
    x = b.input([2, 5, 8])
    wt = b.op("Transpose", [b.randn((6, 8))], perm=[1, 0])
    h = b.mul(b.op("MatMul", [x, wt]), b.randn((6,)))
    folded(b.build(b.relu(h)), {"MatMul": 1, "Relu": 1})


def test_einsum_linear_with_layer_scale():
    """Einsum('bni,oi->bno') is a matrix product: with its gamma it becomes one MatMul."""
    b = GraphBuilder(11)
    x = b.input([2, 5, 8])
    h = b.op("Einsum", [b.relu(x), b.randn((6, 8))], equation="bni,oi->bno")
    folded(b.build(b.relu(b.mul(h, b.randn((6,))))), {"MatMul": 1, "Relu": 2})


# -- positive: parallel (LoRA) and sequential ------------------------------------------------------
@pytest.mark.parametrize("rank", [4, 8])
def test_lora_merges_to_the_base_matmul_count(rank):
    """x·W + b + s·(x·A)·B: as many MatMuls as without the adapter (one)."""
    b = GraphBuilder(12)
    x = b.input([2, 5, 16])
    t = b.relu(x)
    lo = b.mul(b.matmul(b.matmul(t, 16, rank), rank, 16), b.const(np.float32(0.5)))
    folded(b.build(b.relu(b.add(linear(b, t, 16, 16), lo))), {"MatMul": 1, "Add": 1, "Relu": 2}, count=1)


def test_lora_on_2d_gemm():
    """The same on a 2-D Gemm base (a Linear on [N, C])."""
    b = GraphBuilder(13)
    x = b.relu(b.input([4, 16]))
    lo = b.mul(b.matmul(b.matmul(x, 16, 4), 4, 12), b.const(np.float32(2.0)))
    folded(b.build(b.relu(b.add(b.gemm(x, 16, 12), lo))), {"Gemm": 1, "Relu": 2}, rules=())


def test_sequential_linears_cheaper_merged():
    """Linear(8→16) then Linear(16→8), nothing between: one 8→8 MatMul is cheaper."""
    b = GraphBuilder(14)
    x = b.input([2, 5, 8])
    y = linear(b, linear(b, b.relu(x), 8, 16), 16, 8)
    folded(b.build(b.relu(y)), {"MatMul": 1, "Add": 1, "Relu": 2})


def test_low_rank_chain_alone_is_declined_by_cost_and_merged_when_aggressive():
    """x·A·B (rank 2, no base): two thin MatMuls are cheaper than one 16×16: declined; --aggressive merges."""
    b = GraphBuilder(15)
    x = b.input([2, 5, 16])
    m = b.build(b.relu(b.matmul(b.matmul(b.relu(x), 16, 2), 2, 16)))
    declined_by(RULE, m, "cost more")
    out, report = run_rules(m, RULE, aggressive=True)
    assert ops(out) == {"MatMul": 1, "Relu": 2}
    assert_equivalent(m, out)


def test_dynamic_batch_bn_pair():
    """Symbolic batch: Reshape[-1, C] → BN → Reshape[-1, N, C] folds with the batch kept symbolic."""
    b = GraphBuilder(16)
    x = b.input(["batch", 5, 8])
    h = b.op("Reshape", [b.matmul(x, 8, 8), b.ints([-1, 8])])
    y = b.op("Reshape", [b.bn(h, 8), b.ints([-1, 5, 8])])
    m = b.build(b.relu(y))
    out, report = run_rules(m, RULE)
    assert report.rule_counts == {RULE: 1}
    assert "BatchNormalization" not in ops(out)
    feeds = {"x_1": np.random.default_rng(0).standard_normal((3, 5, 8)).astype(np.float32)}
    assert_equivalent(m, out, feeds=feeds)


def test_reshape_as_via_shape_node():
    """reshape_as(h) written as Reshape(BN(Flatten(h)), Shape(h)): Shape reads h's shape only; the
    fold moves it to the output (same shape) and the BN goes."""
    b = GraphBuilder(17)
    x = b.input(["batch", 5, 8])
    h = b.matmul(x, 8, 8)
    y = b.op("Reshape", [b.bn(b.op("Flatten", [h], axis=2), 8), b.op("Shape", [h])])
    m = b.build(b.relu(y))
    out, report = run_rules(m, RULE)
    assert ops(out) == {"MatMul": 1, "Add": 1, "Relu": 1}
    feeds = {"x_1": np.random.default_rng(0).standard_normal((3, 5, 8)).astype(np.float32)}
    assert_equivalent(m, out, feeds=feeds)


def _dynamic_batch_bn(back):
    b = GraphBuilder(23)
    x = b.input(["batch", 5, 8])
    h = b.op("Reshape", [b.matmul(x, 8, 8), b.ints([-1, 8])])
    return b.build(b.relu(b.op("Reshape", [b.bn(h, 8), b.ints(back)])))


def test_dynamic_batch_reshape_back_to_the_token_axes_goes():
    """Reshape[-1, C] → BN → Reshape[-1, N, C] on [batch, N, C] (dynamo's flatten(0, 1) and
    reshape_as once their shape arithmetic is folded): the -1 is the batch, so the merged MatMul
    already has that shape and no Reshape is written."""
    m = _dynamic_batch_bn([-1, 5, 8])
    out, report = run_rules(m, RULE)
    assert ops(out) == {"MatMul": 1, "Add": 1, "Relu": 1}, report.declines
    for n in (1, 3):
        assert_equivalent(m, out, feeds={"x_1": np.random.default_rng(n).standard_normal((n, 5, 8)).astype(np.float32)})


def test_dynamic_batch_reshape_that_regroups_tokens_stays():
    """Negative: Reshape[-1, 10, C] of [batch·5, C] pairs tokens of two batch rows: not the token
    axes, so the merged MatMul's output keeps a Reshape."""
    m = _dynamic_batch_bn([-1, 10, 8])
    out, report = run_rules(m, RULE)
    assert ops(out) == {"MatMul": 1, "Add": 1, "Reshape": 1, "Relu": 1}, report.declines
    assert_equivalent(m, out, feeds={"x_1": np.random.default_rng(0).standard_normal((4, 5, 8)).astype(np.float32)})


def test_head_split_reshape_absorbs_the_regroup():
    """Dynamo's Reshape [B·N, C] → [B, N, heads, d] right after the BN: the fold feeds it directly,
    with no second Reshape."""
    b = GraphBuilder(18)
    x = b.input([2, 5, 8])
    f = b.op("Reshape", [b.matmul(x, 8, 8), b.ints([-1, 8])])
    y = b.op("Reshape", [b.bn(f, 8), b.ints([2, 5, 2, 4])])
    folded(b.build(b.relu(y)), {"MatMul": 1, "Add": 1, "Reshape": 1, "Relu": 1})


# -- negative --------------------------------------------------------------------------------------
def test_nonlinearity_between_lora_matmuls():
    """x·W + Relu(x·A)·B: the adapter is not linear; nothing merges."""
    b = GraphBuilder(20)
    x = b.relu(b.input([2, 5, 16]))
    lo = b.matmul(b.relu(b.matmul(x, 16, 4)), 4, 16)
    m = b.build(b.add(b.matmul(x, 16, 16), lo))
    declined_by(RULE, m)


def test_nonlinearity_between_linear_and_bn():
    """MatMul → Relu → Flatten → BN → Reshape: the BN is not after the Linear; declined with a reason."""
    b = GraphBuilder(21)
    x = b.input([2, 5, 8])
    f = b.op("Flatten", [b.relu(b.matmul(x, 8, 8))], axis=2)
    m = b.build(b.op("Reshape", [b.bn(f, 8), b.ints([2, 5, 8])]))
    declined_by(RULE, m)


def test_shared_weight_declines():
    """The LoRA base weight is also read by another MatMul (tied): declined, graph untouched."""
    b = GraphBuilder(22)
    x = b.relu(b.input([2, 5, 16]))
    w = b.randn((16, 16))
    lo = b.matmul(b.matmul(x, 16, 4), 4, 16)
    other = b.op("MatMul", [b.relu(b.input([2, 5, 16])), w])
    m = b.build(b.add(b.op("MatMul", [x, w]), lo), other)
    declined_by(RULE, m, "shared")


def test_fan_out_of_the_linear_output():
    """The MatMul output is also a graph output: the BN after it cannot fold."""
    b = GraphBuilder(23)
    x = b.input([2, 5, 8])
    h = b.matmul(x, 8, 8)
    y = b.op("Reshape", [b.bn(b.op("Flatten", [h], axis=2), 8), b.ints([2, 5, 8])])
    declined_by(RULE, b.build(y, h))


def test_fan_out_of_the_scaled_tensor():
    """proj output read by the layer scale and by another node: the Mul stays."""
    b = GraphBuilder(24)
    x = b.input([2, 5, 8])
    h = linear(b, b.relu(x), 8, 8)
    m = b.build(b.add(x, b.mul(h, b.randn((8,)))), b.relu(h))
    out, report = run_rules(m, RULE)
    assert ops(out)["Mul"] == 1
    assert_equivalent(m, out)


@pytest.mark.parametrize("shape", [(5, 1), (1, 5, 1), (2, 1, 1)])
def test_constant_on_a_token_axis_declines(shape):
    """A Mul by a constant that varies along tokens or batch is not a per-channel affine."""
    b = GraphBuilder(25)
    x = b.input([2, 5, 8])
    m = b.build(b.relu(b.mul(b.matmul(x, 8, 8), b.randn(shape))))
    declined_by(RULE, m, "not per-channel on the last axis")


def test_bn_on_3d_tokens_declines():
    """BN straight on [B, N, C] normalizes axis 1 (tokens), not the Linear's channels."""
    b = GraphBuilder(26)
    x = b.input([2, 5, 8])
    m = b.build(b.relu(b.bn(b.matmul(x, 8, 8), 5)))
    declined_by(RULE, m, "not its channel axis")


def test_reshape_that_mixes_channels_declines():
    """Reshape [2, 5, 8] → [20, 4] splits channels across rows: BN(4) is not a per-channel affine of the Linear."""
    b = GraphBuilder(27)
    x = b.input([2, 5, 8])
    h = b.op("Reshape", [b.matmul(x, 8, 8), b.ints([20, 4])])
    m = b.build(b.relu(b.op("Reshape", [b.bn(h, 4), b.ints([2, 5, 8])])))
    declined_by(RULE, m, "changes the last axis")


def test_transpose_pair_that_does_not_undo_itself_declines():
    """Transpose(0,2,1) → BN → Transpose(1,0,2) is not the identity on the tokens."""
    b = GraphBuilder(28)
    x = b.input([2, 4, 4])
    t = b.op("Transpose", [b.matmul(x, 4, 4)], perm=[0, 2, 1])
    m = b.build(b.relu(b.op("Transpose", [b.bn(t, 4)], perm=[1, 0, 2])))
    declined_by(RULE, m, "does not undo")


def test_shape_read_of_a_tensor_with_another_shape_declines():
    """Shape(h) where h is [B, 5, 8] but the region's output is [B·5, 8]: Shape cannot be moved."""
    b = GraphBuilder(33)
    x = b.input(["batch", 5, 8])
    h = b.matmul(x, 8, 8)
    y = b.bn(b.op("Reshape", [h, b.ints([-1, 8])]), 8)
    m = b.build(b.relu(y), b.op("Shape", [h]))
    declined_by(RULE, m, "Shape")


def test_sum_with_broadcast_terms_declines():
    """x·W1 + (x·W2 on one token, broadcast): terms of different shapes do not merge."""
    b = GraphBuilder(29)
    x = b.relu(b.input([2, 5, 8]))
    first = b.op("Slice", [x, b.ints([0]), b.ints([1]), b.ints([1])])
    m = b.build(b.relu(b.add(b.matmul(x, 8, 8), b.matmul(first, 8, 8))))
    declined_by(RULE, m)


def layer_norm(b, x, c):
    mean = b.op("ReduceMean", [x], axes=[-1])
    d = b.sub(x, mean)
    var = b.op("ReduceMean", [b.op("Pow", [d, b.const(np.float32(2.0))])], axes=[-1])
    den = b.op("Sqrt", [b.add(var, b.const(np.float32(1e-5)))])
    return b.add(b.mul(b.op("Div", [d, den]), b.randn((c,))), b.randn((c,)))


def test_layernorm_gamma_beta_are_not_folded_into_the_next_linear():
    """Written-out LayerNorm → Linear: LN's Mul/Add stay for the runtime's LayerNorm fusion."""
    b = GraphBuilder(30)
    x = b.input([2, 5, 8])
    m = b.build(b.relu(linear(b, layer_norm(b, x, 8), 8, 8)))
    out, report = run_rules(m)
    assert ops(out) == ops(m)
    assert_declined(report, RULE, "LayerNorm")


def test_rmsnorm_scale_is_not_folded():
    """RMSNorm (x / sqrt(mean(x²) + eps) · g) → Linear keeps its Mul."""
    b = GraphBuilder(31)
    x = b.input([2, 5, 8])
    ms = b.op("ReduceMean", [b.mul(x, x)], axes=[-1])
    n = b.mul(b.op("Div", [x, b.op("Sqrt", [b.add(ms, b.const(np.float32(1e-6)))])]), b.randn((8,)))
    m = b.build(b.relu(b.matmul(n, 8, 8)))
    declined_by(RULE, m, "RMSNorm")


def test_gelu_half_is_not_folded():
    """GELU's Mul(0.5) before a Linear stays: runtimes fuse Div→Erf→Add→Mul→Mul whole."""
    b = GraphBuilder(32)
    x = b.input([2, 5, 8])
    h = linear(b, x, 8, 16)
    e = b.add(b.op("Erf", [b.op("Div", [h, b.const(np.float32(1.4142135))])]), b.const(np.float32(1.0)))
    g = b.mul(b.mul(h, e), b.const(np.float32(0.5)))
    m = b.build(b.relu(b.matmul(g, 16, 8)))
    declined_by(RULE, m, "GELU")
