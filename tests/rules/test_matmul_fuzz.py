"""Seeded random token blocks through every default rule: outputs must not change.

Each case stacks a few random linear pieces on channel-last tokens — Linear with/without bias,
BN1d in a Flatten or Reshape pair or in a Transpose pair, layer scale (possibly per token: a
poison), LoRA branches, Einsum, residual sums — with random non-linearities and fan-out in
between, then optimizes with all default rules and compares in ONNX Runtime (optimizations off)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import assert_equivalent, GraphBuilder, run_rules

CASES = 100


def piece(b: GraphBuilder, rng, x, c, shape):
    """One random linear-ish piece on x ([..., c]); returns (y, c_out)."""
    kind = rng.integers(0, 9)
    cout = int(rng.choice([c, 4, 8, 12]))
    if kind == 0:  # Linear, optional bias
        y = b.matmul(x, c, cout)
        return (b.add(y, b.randn((cout,))) if rng.random() < 0.6 else y), cout
    if kind == 1:  # Linear + BN1d in a Flatten/Reshape pair (LeViT)
        y = b.matmul(x, c, cout)
        f = b.op("Flatten", [y], axis=len(shape) - 1) if rng.random() < 0.5 else b.op("Reshape", [y, b.ints([-1, cout])])
        return b.op("Reshape", [b.bn(f, cout), b.ints(list(shape[:-1]) + [cout])]), cout
    if kind == 2 and len(shape) == 3:  # BN in a Transpose pair
        t = b.op("Transpose", [x], perm=[0, 2, 1])
        return b.op("Transpose", [b.bn(t, c)], perm=[0, 2, 1]), c
    if kind == 3:  # layer scale; sometimes per token (must not fold as per-channel)
        g = b.randn((c,)) if rng.random() < 0.7 else b.randn(tuple(shape[:-1]) [-1:] + (1,))
        return b.mul(x, g), c
    if kind == 4:  # LoRA on a Linear
        r = int(rng.choice([2, 4]))
        base = b.add(b.matmul(x, c, cout), b.randn((cout,)))
        lo = b.mul(b.matmul(b.matmul(x, c, r), r, cout), b.const(np.float32(rng.uniform(0.5, 2))))
        return b.add(base, lo), cout
    if kind == 5:  # non-linearity
        return b.relu(x), c
    if kind == 6:  # residual sum with a Linear of the same input
        if c == cout:
            return b.add(x, b.matmul(x, c, c)), c
        return b.matmul(x, c, cout), cout
    if kind == 7:  # Einsum Linear
        return b.op("Einsum", [x, b.randn((cout, c))], equation="bni,oi->bno" if len(shape) == 3 else "ni,oi->no"), cout
    return b.sub(x, b.randn((c,))), c  # affine shift


@pytest.mark.parametrize("seed", range(CASES))
def test_random_token_block(seed):
    """Random linear pieces on tokens, optimized with every default rule, compute the same outputs."""
    rng = np.random.default_rng(1000 + seed)
    b = GraphBuilder(seed)
    shape = [2, 5] if rng.random() < 0.25 else [2, 5, 0]
    c = 8
    shape[-1] = c
    x = b.input(shape)
    outs, y = [], x
    for _ in range(int(rng.integers(2, 6))):
        y, c = piece(b, rng, y, c, shape[:-1] + [c])
        if rng.random() < 0.1:
            outs.append(y)  # fan-out: an intermediate is also a graph output
    model = b.build(y, *[o for o in outs if o != y])
    out, _ = run_rules(model)
    assert_equivalent(model, out)


def mixing_piece(b: GraphBuilder, rng, x, c, shape):
    """piece(), plus token mixing (a constant on the left, per-row affines and BN on axis 1 of
    [B, N, C]), loralib's zero-padded grouped adapter, and scalar or per-row scales between."""
    kind = rng.integers(0, 13)
    n = shape[-2] if len(shape) == 3 else None
    if kind == 9 and n:  # token mixing W·x (+ b[n, 1])
        y = b.op("MatMul", [b.randn((n, n), scale=n ** -0.5), x])
        return (b.add(y, b.randn((n, 1))) if rng.random() < 0.6 else y), c
    if kind == 10 and n:  # a per-row affine: [n, 1] Mul, or BN over axis 1 (tokens); poison: [1, c] per column
        r = rng.random()
        if r < 0.4:
            return b.mul(x, b.randn((n, 1))), c
        if r < 0.8:
            return b.bn(x, n), c
        return b.mul(x, b.randn((1, c))), c
    if kind == 11 and n:  # MergedLinear-style adapter: A, grouped conv1d B, zero padding by ScatterND
        g, r = 2, 2
        cw = 2 * c
        t = b.op("Transpose", [b.matmul(x, c, g * r)], perm=[0, 2, 1])
        y = b.op("Transpose", [b.conv(t, g * r, g * 4, k=(1,), pad=(0,), group=g, bias=rng.random() < 0.5)],
                 perm=[0, 2, 1])
        rows = int(np.prod(shape[:-1]))
        flat = b.op("Reshape", [y, b.ints([-1, g * 4])])
        cols = rng.choice(cw, size=g * 4, replace=rng.random() < 0.2)  # a repeat: must not fold wrong
        idx = np.stack(np.broadcast_arrays(np.arange(rows)[:, None], cols[None, :]), axis=-1)
        placed = b.op("ScatterND", [b.const(np.zeros((rows, cw))), b.ints(idx), flat])
        padded = b.op("Reshape", [placed, b.ints(list(shape[:-1]) + [cw])])
        return b.add(b.add(b.matmul(x, c, cw), b.randn((cw,))), padded), cw
    if kind == 12:  # a scalar scale
        return b.mul(x, b.const(np.float32(rng.uniform(0.2, 2.0)))), c
    return piece(b, rng, x, c, shape)


@pytest.mark.parametrize("seed", range(40))
def test_random_token_block_with_mixing(seed):
    """As test_random_token_block, with token mixing, zero-padded adapters and scalar scales."""
    rng = np.random.default_rng(5000 + seed)
    b = GraphBuilder(seed)
    c = 8
    shape = [2, 5, c]
    x = b.input(shape)
    outs, y = [], x
    for _ in range(int(rng.integers(2, 7))):
        y, c = mixing_piece(b, rng, y, c, shape[:-1] + [c])
        if rng.random() < 0.1:
            outs.append(y)
    model = b.build(y, *[o for o in outs if o != y])
    out, _ = run_rules(model)
    assert_equivalent(model, out)
