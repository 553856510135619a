"""kernels.conv_as_matrix against torch's own convolutions, in float64.

For a conv on a fixed input size, flatten(conv(x)) must equal M @ flatten(x) + b for every x:
checked over bias × groups × kernel × stride × padding (symmetric and ONNX-asymmetric) ×
dilation in 2-D, plus 1-D, 3-D and the rank-0 (fully connected) case.
"""
from __future__ import annotations

import zlib
from itertools import product

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from onnxrep import kernels as K
from onnxrep.kernels import ConvSpec

ATOL = 1e-10
BATCH = 3
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def _torch_conv(x: np.ndarray, spec: ConvSpec, with_bias: bool) -> np.ndarray:
    """ONNX Conv semantics by torch: asymmetric pads applied with F.pad (last axis first)."""
    r = spec.rank
    pads = []
    for a in reversed(range(r)):
        pads += [spec.pads_begin[a], spec.pads_end[a]]
    xp = F.pad(_t(x), pads)
    b = _t(spec.bias) if with_bias else None
    y = CONV[r](xp, _t(spec.weight), b, stride=spec.strides, dilation=spec.dilations, groups=spec.group)
    return y.numpy()


def _check(spec: ConvSpec, in_shape: tuple[int, ...], with_bias: bool, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, spec.cin) + in_shape)
    m, b = K.conv_as_matrix(spec, in_shape)
    out = spec.output_shape(in_shape)
    assert m.shape == (spec.cout * int(np.prod(out)), spec.cin * int(np.prod(in_shape)))
    assert b.shape == (m.shape[0],)
    want = _torch_conv(x, spec, with_bias).reshape(BATCH, -1)
    got = x.reshape(BATCH, -1) @ m.T + b
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def _spec(rng, cin, cout, kernel, group, with_bias, **geom) -> ConvSpec:
    w = rng.standard_normal((cout, cin // group) + tuple(kernel))
    b = rng.standard_normal(cout) if with_bias else None
    return ConvSpec(w, b, group=group, **geom)


KERNELS_2D = [(1, 1), (3, 3), (1, 3), (2, 3)]
STRIDES_2D = [(1, 1), (2, 2), (2, 1)]
PADS_2D = [(0, 0, 0, 0), (1, 1, 1, 1), (1, 0, 0, 2)]  # ONNX: begins then ends
DILATIONS_2D = [(1, 1), (2, 1)]
GROUPS = [1, 2, 4]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("kernel,strides,pads,dilations", [
    pytest.param(*c, id="k{}-s{}-p{}-d{}".format(*("x".join(map(str, v)) for v in c)))
    for c in product(KERNELS_2D, STRIDES_2D, PADS_2D, DILATIONS_2D)])
def test_conv2d_matches_torch(with_bias, group, kernel, strides, pads, dilations):
    """2-D: every bias × groups × kernel × stride × padding × dilation combination."""
    rng = np.random.default_rng(zlib.crc32(repr((with_bias, group, kernel, strides, pads, dilations)).encode()))
    spec = _spec(rng, 4, 8, kernel, group, with_bias, strides=strides, pads=pads, dilations=dilations)
    _check(spec, (7, 6), with_bias)


@pytest.mark.parametrize("kernel,stride,pads,dilation,group", [
    (3, 1, (1, 1), 1, 1), (5, 2, (2, 1), 1, 2), (3, 3, (0, 2), 2, 4), (1, 1, (0, 0), 1, 4),
])
def test_conv1d_matches_torch(kernel, stride, pads, dilation, group):
    """1-D convs, including asymmetric padding and depthwise groups."""
    rng = np.random.default_rng(kernel * 10 + stride)
    spec = _spec(rng, 4, 4, (kernel,), group, True, strides=(stride,), pads=pads, dilations=(dilation,))
    _check(spec, (11,), True)


def test_conv3d_matches_torch():
    """3-D: mixed stride, asymmetric padding, dilation and groups at once."""
    rng = np.random.default_rng(3)
    spec = _spec(rng, 4, 6, (3, 2, 3), 2, True, strides=(1, 2, 2), pads=(1, 0, 1, 1, 1, 0),
                 dilations=(1, 1, 2))
    _check(spec, (4, 5, 6), True)


def test_input_spatial_extent_equal_to_kernel():
    """A kernel covering the whole (unpadded) input gives one output position: M is the kernel."""
    rng = np.random.default_rng(4)
    spec = _spec(rng, 3, 5, (4, 4), 1, True)
    m, b = K.conv_as_matrix(spec, (4, 4))
    np.testing.assert_array_equal(m, spec.weight.reshape(5, -1))
    np.testing.assert_array_equal(b, spec.bias)


@pytest.mark.parametrize("group", [1, 3])
def test_rank0_is_the_block_diagonal_weight(group):
    """Rank 0 (Gemm/MatMul as a ConvSpec): the matrix is the weight, block-diagonal per group."""
    rng = np.random.default_rng(5)
    spec = _spec(rng, 6, 9, (), group, True)
    m, b = K.conv_as_matrix(spec, ())
    x = rng.standard_normal((BATCH, 6))
    want = torch.cat([F.linear(xi, wi, bi) for xi, wi, bi in
                      zip(_t(x).chunk(group, 1), _t(spec.weight).chunk(group, 0), _t(spec.bias).chunk(group))], 1)
    np.testing.assert_allclose(x @ m.T + b, want.numpy(), rtol=0, atol=ATOL)


def test_bias_repeats_per_output_position():
    """The bias vector is channel-major: b[o·P + n] = bias[o]."""
    spec = ConvSpec(np.zeros((2, 1, 1, 1)), np.array([1.5, -2.0]))
    _, b = K.conv_as_matrix(spec, (2, 3))
    np.testing.assert_array_equal(b, [1.5] * 6 + [-2.0] * 6)


def test_rejects_wrong_rank_and_empty_output():
    """The input shape is spatial only, and the conv must produce at least one position."""
    spec = ConvSpec(np.ones((2, 2, 3, 3)), None)
    with pytest.raises(ValueError, match="rank"):
        K.conv_as_matrix(spec, (2, 5, 5))
    with pytest.raises(ValueError, match="empty"):
        K.conv_as_matrix(spec, (2, 2))
