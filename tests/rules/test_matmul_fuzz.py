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
