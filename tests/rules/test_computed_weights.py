"""Computed weights (DO-Conv, OREPA): kernels produced from initializers by Einsum / MatMul / Add /
Reshape are folded to constants first, so the branch rules apply to them."""
from __future__ import annotations

import numpy as np

from tests.helpers import GraphBuilder, assert_equivalent, ops, run_rules


def test_doconv_einsum_weight_merges_with_its_branch():
    """DO-Conv: W = einsum(D, W0) over a depthwise over-parameterization, plus a 1×1 branch → one Conv."""
    b = GraphBuilder(7)
    x = b.relu(b.input((1, 4, 8, 8)))
    # DO-Conv: D [Cin, k*k, Dmul], W0 [Cout, Cin, Dmul] → W[o, i, kk] = Σ_d W0[o, i, d] · D[i, kk, d]
    d = b.randn((4, 9, 9), scale=0.3)
    w0 = b.randn((6, 4, 9), scale=0.3)
    w_flat = b.op("Einsum", [w0, d], equation="oid,ikd->oik")
    w = b.op("Reshape", [w_flat, b.ints([6, 4, 3, 3])])
    main = b.op("Conv", [x, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y = b.add(b.bn(main, 6), b.bn(b.conv(x, 4, 6, k=1), 6))
    m = b.build(y)
    out, report = run_rules(m)
    assert ops(out) == {"Relu": 1, "Conv": 1}
    assert_equivalent(m, out)


def test_orepa_matmul_and_add_weights_merge():
    """OREPA-style: a kernel built as MatMul(basis, coeffs) + another initializer, in a sum with identity."""
    b = GraphBuilder(8)
    x = b.relu(b.input((1, 4, 8, 8)))
    basis = b.randn((4 * 4, 9), scale=0.3)
    coeff = b.randn((9, 9), scale=0.3)
    extra = b.randn((4, 4, 3, 3), scale=0.1)
    k = b.op("Reshape", [b.op("MatMul", [basis, coeff]), b.ints([4, 4, 3, 3])])
    w = b.add(k, extra)
    conv = b.op("Conv", [x, w, b.randn((4,), scale=0.2)], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y = b.add(conv, b.bn(x, 4))
    m = b.build(y)
    out, report = run_rules(m)
    assert ops(out) == {"Relu": 1, "Conv": 1}
    assert_equivalent(m, out)
