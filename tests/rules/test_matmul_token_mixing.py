"""fold_linear_affine on token mixing: MatMul(W_tok, X) with the constant on the LEFT (MLP-Mixer)
mixes axis -2 of X [B, N, C]; affines per row ([N, 1], BatchNorm1d on [B, N, C]) fold into W's rows."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import GraphBuilder, assert_equivalent, assert_idempotent, declined_by, ops, run_rules

RULE = "fold_linear_affine"
B, N, C, M = 2, 6, 4, 5  # batch, tokens, channels, token-hidden


def left(b, x, rows_out, rows_in, name=None):
    return b.op("MatMul", [b.randn((rows_out, rows_in), scale=rows_in ** -0.5), x], name=name)


def mixer(after="bn", between=None, extra=None, seed=0):
    """x → W·x + b[M, 1] → `after` (bn: BatchNorm1d over the M rows; mul: a per-row Mul [M, 1];
    channel: a per-channel Mul [C]; none) → Relu."""
    b = GraphBuilder(seed)
    x = b.relu(b.input([B, N, C]))
    y = b.add(left(b, x, M, N), b.randn((M, 1)))
    if between is not None:
        y = between(b, y)
    if after == "bn":
        y = b.bn(y, M)
    elif after == "mul":
        y = b.mul(y, b.const(np.linspace(0.5, 1.5, M).reshape(M, 1)))
    elif after == "channel":
        y = b.mul(y, b.const(np.linspace(0.5, 1.5, C)))
    outs = [b.relu(y)]
    if extra is not None:
        outs.append(extra(b, x))
    return b.build(*outs)


@pytest.mark.parametrize("after", ["bn", "mul"])
def test_row_affine_folds_into_the_left_weight(after):
    """BatchNorm1d on [B, M, C] (axis 1 = the rows W makes) or a [M, 1] Mul: W's rows and the bias."""
    m = mixer(after)
    out, report = run_rules(m)
    h = ops(out)
    assert h.get("MatMul") == 1 and h.get("Add") == 1
    assert "BatchNormalization" not in h and "Mul" not in h and "Conv" not in h
    assert report.rule_counts.get(RULE) == 1
    assert_equivalent(m, out)
    assert_idempotent(out)


def test_sequential_and_parallel_left_matmuls_merge():
    """W2·(W1·x) + W3·x: one MatMul by W2·W1 + W3 (N×N rows, cheaper than the three)."""
    b = GraphBuilder(2)
    x = b.relu(b.input([B, N, C]))
    y = b.add(left(b, left(b, x, N, N), N, N), left(b, x, N, N))
    m = b.build(b.relu(y))
    out, _ = run_rules(m, RULE)
    assert ops(out).get("MatMul") == 1
    assert_equivalent(m, out)


def test_per_channel_constant_after_token_mixing_stays():
    """A [C] constant scales the columns of W·x: not a row affine, W cannot take it."""
    m = mixer("channel")
    out, _ = run_rules(m, RULE)
    assert ops(out).get("Mul") == 1 and ops(out).get("MatMul") == 1
    assert_equivalent(m, out)


def test_nonlinearity_between_declines():
    """A Relu between W·x + b and the BN: the BN has nothing linear above it to fold into."""
    m = mixer(between=lambda b, y: b.relu(y))
    out, _ = run_rules(m, RULE)
    assert ops(out).get("BatchNormalization") == 1
    assert_equivalent(m, out)


def test_token_mixing_output_read_elsewhere_declines():
    """Fan-out: W·x + b is also read by another node, which must not see the BN."""
    b = GraphBuilder(3)
    x = b.relu(b.input([B, N, C]))
    y = b.add(left(b, x, M, N), b.randn((M, 1)))
    m = b.build(b.relu(b.bn(y, M)), b.relu(y))
    declined_by(RULE, m)


def test_shared_left_weight_declines():
    """W is read by two MatMuls: folding the BN into it would change the other one."""
    b = GraphBuilder(4)
    x = b.relu(b.input([B, N, C]))
    w = b.randn((M, N))
    y = b.bn(b.add(b.op("MatMul", [w, x]), b.randn((M, 1))), M)
    m = b.build(b.relu(y), b.relu(b.op("MatMul", [w, b.relu(x)])))
    declined_by(RULE, m, "shared")


def test_reshape_mixing_rows_and_channels_declines():
    """W·x + b reshaped [B, M, C] → [B, C, M] before a BN over axis 1: that axis holds pieces of
    rows and channels, not W's rows; nothing folds."""
    b = GraphBuilder(5)
    x = b.relu(b.input([B, N, C]))
    y = b.op("Reshape", [b.add(left(b, x, M, N), b.randn((M, 1))), b.ints([B, C, M])])
    m = b.build(b.relu(b.bn(y, C)))
    out, _ = run_rules(m, RULE)
    assert ops(out).get("BatchNormalization") == 1 or ops(out).get("Conv") == 1
    assert ops(out).get("MatMul") == 1 and ops(out).get("Add") == 1
    assert_equivalent(m, out)
