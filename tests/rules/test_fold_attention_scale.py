"""fold_attention_scale: the attention's constant q·kᵀ scale folds into q's (or k's) projection."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import GraphBuilder, assert_equivalent, assert_idempotent, declined_by, ops, run_rules

RULE = "fold_attention_scale"
B, N, H, D = 2, 5, 2, 4
C = H * D


def heads(b, t, perm=(0, 2, 1, 3)):
    return b.op("Transpose", [b.op("Reshape", [t, b.ints([B, N, H, D])])], perm=list(perm))


def attention(where="scores", const=None, op="Mul", fused=False, q_reader=False, q_relu=False, shared=False,
              raw_reshape=False, seed=0):
    """Multi-head attention on x [B, N, C]; the scale `const` (default the scalar d^-½) on
    `where` ∈ {scores, q, k}; q/k/v separate Linears with bias, or one fused qkv split in three."""
    b = GraphBuilder(seed)
    x = b.relu(b.input([B, N, C]))
    extra = []
    if fused:
        qkv = b.add(b.matmul(x, C, 3 * C), b.randn((3 * C,)))
        q, k, v = b.op("Split", [qkv, b.ints([C, C, C])], n_out=3, axis=-1)
    else:
        wq = b.randn((C, C), scale=C ** -0.5)
        q = b.add(b.op("MatMul", [x, wq]), b.randn((C,)))
        k = b.add(b.matmul(x, C, C), b.randn((C,)))
        v = b.add(b.matmul(x, C, C), b.randn((C,)))
        if shared:
            extra.append(b.relu(b.op("MatMul", [x, wq])))
    if q_reader:
        extra.append(b.relu(q))
    if q_relu:
        q = b.relu(q)
    c = b.const(np.float32(D ** -0.5) if const is None else const)
    qh = b.op("Reshape", [q, b.ints([B, H, N, D])]) if raw_reshape else heads(b, q)
    kh = heads(b, k, (0, 2, 3, 1))
    if where == "q":
        qh = b.op(op, [qh, c])
    if where == "k":
        kh = b.op(op, [kh, c])
    s = b.op("MatMul", [qh, kh])
    if where == "scores":
        s = b.op(op, [s, c])
    a = b.op("Softmax", [s], axis=-1)
    y = b.op("MatMul", [a, heads(b, v)])
    y = b.op("Reshape", [b.op("Transpose", [y], perm=[0, 2, 1, 3]), b.ints([B, N, C])])
    return b.build(b.add(b.matmul(y, C, C), b.randn((C,))), *extra)


def folded(m, rules=(RULE,)):
    out, report = run_rules(m, *rules)
    assert "Mul" not in ops(out) and "Div" not in ops(out)
    assert report.rule_counts.get(RULE) == 1
    assert_equivalent(m, out)
    assert_idempotent(out, *rules)
    return out


@pytest.mark.parametrize("where", ["scores", "q", "k"])
@pytest.mark.parametrize("op", ["Mul", "Div"])
def test_scalar_scale_folds(where, op):
    """A scalar Mul/Div on the scores, on q's heads or on kᵀ's heads folds into that projection."""
    folded(attention(where, op=op, const=np.float32(D ** 0.5) if op == "Div" else None))


def test_scale_on_fused_qkv_scales_only_q_columns():
    """With a fused qkv Linear split in three, the scale lands on q's columns [0, C) only."""
    out = folded(attention(fused=True))
    assert ops(out)["Split"] == 1 and ops(out)["MatMul"] == 4


@pytest.mark.parametrize("where, shape", [("q", (1, H, 1, 1)), ("scores", (H, 1, 1)), ("k", (1, H, 1, 1))])
def test_per_head_scale_folds_into_the_head_columns(where, shape):
    """A constant per head after the head split scales head h's d columns."""
    const = np.arange(1, H + 1, dtype=np.float32).reshape(shape) * 0.3
    folded(attention(where, const=const))


def test_per_head_scale_through_fused_qkv():
    folded(attention("scores", const=np.array([0.5, 2.0], dtype=np.float32).reshape(1, H, 1, 1), fused=True))


def test_with_every_default_rule():
    """The whole pipeline: the scale is gone and the MatMuls stay."""
    m = attention()
    out, report = run_rules(m)
    assert "Mul" not in ops(out) and ops(out)["MatMul"] == 6
    assert_equivalent(m, out)


def test_q_projection_read_elsewhere_declines():
    """Fan-out: q's Linear output is read by another node, which must not see the scale."""
    declined_by(RULE, attention("q", q_reader=True), "fan-out")


def test_scores_scale_goes_to_k_when_q_is_read_elsewhere():
    """On the scores the scale may go to either side: q's projection is read elsewhere, so k's
    weight takes it (q's Linear, and its other reader, unchanged)."""
    m = attention(q_reader=True)
    out = folded(m)
    q_weight = lambda model: next(i for i in model.graph.initializer if i.name == "c_2")  # noqa: E731
    assert q_weight(out) == q_weight(m)


def test_nonlinearity_between_declines():
    """A Relu between q's Linear and the scale on q's heads."""
    declined_by(RULE, attention("q", q_relu=True), "Relu")


def test_scale_declines_when_neither_side_folds():
    """Scores scale, q behind a Relu and k's weight shared: nothing to fold into."""
    b = GraphBuilder(1)
    x = b.relu(b.input([B, N, C]))
    wk = b.randn((C, C))
    q = b.relu(b.add(b.matmul(x, C, C), b.randn((C,))))
    k = b.op("MatMul", [x, wk])
    s = b.op("Mul", [b.op("MatMul", [heads(b, q), heads(b, k, (0, 2, 3, 1))]), b.const(np.float32(0.5))])
    m = b.build(b.op("Softmax", [s], axis=-1), b.relu(b.op("MatMul", [x, wk])))
    declined_by(RULE, m, "Relu", "shared")


def test_shared_weight_declines():
    """q's weight is shared with another MatMul (a scale on q's heads has no other side to go to)."""
    declined_by(RULE, attention("q", shared=True), "shared")


@pytest.mark.parametrize("shape", [(1, 1, N, 1), (1, 1, 1, N)])
def test_scale_on_a_token_axis_declines(shape):
    """One value per query or key token is not a scale of q's columns."""
    const = np.linspace(0.5, 1.5, N).astype(np.float32).reshape(shape)
    declined_by(RULE, attention("scores", const=const), "last two axes")


def test_per_token_scale_on_q_heads_declines():
    const = np.linspace(0.5, 1.5, N).astype(np.float32).reshape(1, 1, N, 1)
    declined_by(RULE, attention("q", const=const), "token axis")


def test_reshape_mixing_tokens_and_channels_declines_a_per_head_scale():
    """q reshaped straight to [B, H, N, d] (no transpose) mixes tokens into the 'heads': a per-head
    scale is not per column. (A scalar commutes with it and still folds.)"""
    const = np.array([0.5, 2.0], dtype=np.float32).reshape(1, H, 1, 1)
    declined_by(RULE, attention("q", const=const, raw_reshape=True), "split the last axis")
    folded(attention("q", raw_reshape=True))
