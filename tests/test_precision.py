"""Half-precision models are rounded to their dtype once, however many rules rewrite a weight."""
from __future__ import annotations

import numpy as np
from onnx import numpy_helper

import onnxrep
from tests.helpers import GraphBuilder, assert_equivalent


def _fp16_repvgg():
    b = GraphBuilder(5, dtype=np.float16)
    x = b.relu(b.input((1, 8, 10, 10)))
    y = b.add(b.add(b.bn(b.conv(x, 8, 8, k=3), 8), b.bn(b.conv(x, 8, 8, k=1), 8)), b.bn(x, 8))
    return b.build(b.relu(y))


def _weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_fp16_chain_of_rewrites_rounds_once():
    """Conv→BN folded first and then merged gives bit-identical fp16 weights to merging directly."""
    model = _fp16_repvgg()
    chained = onnxrep.optimize(model)  # fuse_conv_bn, then merge_linear_regions
    direct = onnxrep.optimize(model, skip=["fuse_conv_bn"])  # merge_linear_regions alone
    wc, wd = _weights(chained), _weights(direct)
    assert len(wc) == len(wd) == 2
    for (_, a), (_, b) in zip(sorted(wc.items()), sorted(wd.items())):
        assert a.dtype == np.float16
        np.testing.assert_array_equal(a, b)
    assert_equivalent(model, chained, rtol=2e-3)
