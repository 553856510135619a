"""The matrix part of onnxrep.kernels (MatMul / Gemm / Einsum on the last axis) against torch, in
float64: tokens [B, N, C] through torch's own linear, batch_norm, matmul and einsum, compared with
the merged rank-0 ConvSpec applied as x @ matmul_weight(spec) + bias."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from onnxrep import kernels as K

ATOL = 1e-10
RNG = np.random.default_rng(0)


def t(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def apply(spec: K.ConvSpec, x: np.ndarray) -> np.ndarray:
    """The spec as the deploy graph computes it: MatMul(x, W[Cin, Cout]) + b."""
    return x @ K.matmul_weight(spec) + spec.bias


def tokens(b=2, n=5, c=6):
    return RNG.standard_normal((b, n, c))


def test_matmul_spec_is_torch_matmul():
    """matmul_spec(W[Cin, Cout]) applied to [B, N, Cin] is torch.matmul(x, W)."""
    x, w = tokens(), RNG.standard_normal((6, 4))
    np.testing.assert_allclose(apply(K.matmul_spec(w), x), torch.matmul(t(x), t(w)).numpy(), atol=ATOL)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [None, (4,), (1, 4), ()])
def test_gemm_spec_is_torch_addmm(trans_b, bias_shape):
    """gemm_spec covers transB, alpha, beta and every per-output bias shape Gemm allows."""
    x = RNG.standard_normal((3, 6))
    w = RNG.standard_normal((4, 6) if trans_b else (6, 4))
    c = None if bias_shape is None else RNG.standard_normal(bias_shape)
    spec = K.gemm_spec(w, c, bool(trans_b), alpha=0.7, beta=1.3)
    wt = t(w).T if trans_b else t(w)
    ref = 0.7 * t(x) @ wt + (0 if c is None else 1.3 * t(c))
    np.testing.assert_allclose(apply(spec, x), ref.numpy(), atol=ATOL)


def test_gemm_spec_rejects_a_per_row_bias():
    """A Gemm bias that varies along rows ([M, N]) is not per output channel."""
    with pytest.raises(K.NotMergeable):
        K.gemm_spec(RNG.standard_normal((6, 4)), RNG.standard_normal((3, 4)))


def test_bn1d_after_linear_on_flattened_tokens():
    """LeViT: BN1d(Linear(x).flatten(0, 1)).reshape_as → affine_after on the matrix."""
    x, w = tokens(), RNG.standard_normal((8, 6))
    g, b, m, v = RNG.uniform(0.5, 1.5, 8), RNG.standard_normal(8), RNG.standard_normal(8), RNG.uniform(0.5, 2, 8)
    h = F.linear(t(x), t(w))
    ref = F.batch_norm(h.flatten(0, 1), t(m), t(v), t(g), t(b), False, 0.0, 1e-5).reshape(h.shape)
    spec = K.affine_after(K.ConvSpec(w, None), *K.bn_affine(g, b, m, v, 1e-5))
    np.testing.assert_allclose(apply(spec, x), ref.numpy(), atol=ATOL)


def test_layer_scale_after_linear_with_bias():
    """CaiT/DeiT-III: gamma * Linear(x) folds into the weight columns and the bias."""
    x, w, bias, gamma = tokens(), RNG.standard_normal((6, 6)), RNG.standard_normal(6), RNG.standard_normal(6)
    ref = t(gamma) * F.linear(t(x), t(w), t(bias))
    spec = K.affine_after(K.ConvSpec(w, bias), gamma, 0.0)
    np.testing.assert_allclose(apply(spec, x), ref.numpy(), atol=ATOL)


def test_bn1d_before_linear():
    """BN1d then Linear (a pre-BN head) folds into the Linear's input columns."""
    x, w, bias = tokens(n=1).reshape(2, 6), RNG.standard_normal((3, 6)), RNG.standard_normal(3)
    g, b, m, v = RNG.uniform(0.5, 1.5, 6), RNG.standard_normal(6), RNG.standard_normal(6), RNG.uniform(0.5, 2, 6)
    ref = F.linear(F.batch_norm(t(x), t(m), t(v), t(g), t(b), False, 0.0, 1e-3), t(w), t(bias))
    spec = K.affine_before(K.ConvSpec(w, bias), *K.bn_affine(g, b, m, v, 1e-3))
    np.testing.assert_allclose(apply(spec, x), ref.numpy(), atol=ATOL)


@pytest.mark.parametrize("rank", [4, 8])
def test_lora_branch_merges_into_the_base(rank):
    """x·W + b + s·(x·A)·B = x·(W + s·A·B) + b: add(base, affine_after(compose(A, B), s))."""
    x = tokens(c=16)
    w, bias = RNG.standard_normal((16, 12)), RNG.standard_normal(12)
    a, bb, s = RNG.standard_normal((16, rank)), RNG.standard_normal((rank, 12)), 0.25
    ref = torch.matmul(t(x), t(w)) + t(bias) + s * torch.matmul(torch.matmul(t(x), t(a)), t(bb))
    lora = K.affine_after(K.compose(K.matmul_spec(a), K.matmul_spec(bb)), s, 0.0)
    spec = K.add([K.matmul_spec(w, bias), lora])
    np.testing.assert_allclose(apply(spec, x), ref.numpy(), atol=ATOL)
    assert spec.weight.shape == (12, 16)


def test_sequential_linears_with_biases():
    """Linear2(Linear1(x)) = x·W1·W2 + b1·W2 + b2 (no non-linearity between)."""
    x = tokens()
    w1, b1, w2, b2 = RNG.standard_normal((5, 6)), RNG.standard_normal(5), RNG.standard_normal((7, 5)), RNG.standard_normal(7)
    ref = F.linear(F.linear(t(x), t(w1), t(b1)), t(w2), t(b2))
    spec = K.compose(K.ConvSpec(w1, b1), K.ConvSpec(w2, b2))
    np.testing.assert_allclose(apply(spec, x), ref.numpy(), atol=ATOL)


@pytest.mark.parametrize("eq, transposed", [("...i,io->...o", False), ("bni,io->bno", False),
                                            ("bni,oi->bno", True), ("nc,dc->nd", True)])
def test_einsum_matrix_products(eq, transposed):
    """Einsum forms that are x[..., i]·W are recognized, with W's orientation."""
    assert K.einsum_matrix(eq) is transposed
    x = tokens()[0] if eq.startswith("nc") else tokens()
    w = RNG.standard_normal((4, 6) if transposed else (6, 4))
    ref = torch.einsum(eq, t(x), t(w)).numpy()
    spec = K.ConvSpec(w if transposed else w.T, None)
    np.testing.assert_allclose(apply(spec, x), ref, atol=ATOL)


@pytest.mark.parametrize("eq", ["bni,io->boi", "bni,in->bno", "bii,io->bio", "bni,io->bo", "bni,bio->bno",
                                "bn,io->bno", "i,io->o,", "bni,jo->bno"])
def test_einsum_non_matrix_forms_are_refused(eq):
    """Reductions, token mixing, diagonals and batched weights are not matrix products on the last axis."""
    assert K.einsum_matrix(eq) is None


@pytest.mark.parametrize("shape, rank, expected", [
    ((6,), 3, 6), ((1, 1, 6), 3, 6), ((1, 6), 2, 6), ((), 3, 1), ((1, 1, 1), 3, 1),
    ((5, 1), 3, None), ((1, 5, 6), 3, None), ((1, 1, 1, 6), 3, None), ((6, 1), 2, None)])
def test_last_axis_vector(shape, rank, expected):
    """Only constants that are 1 on every axis but the last (and do not raise the rank) are per-channel."""
    v = K.last_axis_vector(np.ones(shape), rank)
    assert (v is None) if expected is None else (v.size == expected)


def test_axis_vector_middle_axis():
    """BN-style [1, C, 1] on axis 1; a [C] vector broadcasts on the last axis, not axis 1."""
    assert K.axis_vector(np.ones((1, 6, 1)), 3, 1).size == 6
    assert K.axis_vector(np.ones((6,)), 3, 1) is None
    assert K.axis_vector(np.ones((6, 1)), 3, 1).size == 6


def test_matmul_weight_expands_groups():
    """A grouped rank-0 spec (from a depthwise affine) is written as its dense [Cin, Cout] matrix."""
    spec = K.affine_after(K.identity(4, 0), np.arange(1.0, 5.0), np.zeros(4))
    np.testing.assert_allclose(K.matmul_weight(spec), np.diag(np.arange(1.0, 5.0)))


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_pointwise_spec_is_torch_conv1d(group, bias):
    """A 1-wide grouped conv1d on [B, C, N] is the block-diagonal matrix pointwise_spec gives,
    applied to the tokens [B, N, C] (loralib's MergedLinear B)."""
    x = tokens(c=8)
    w = RNG.standard_normal((12, 8 // group, 1))
    b = RNG.standard_normal(12) if bias else None
    ref = F.conv1d(t(x).transpose(1, 2), t(w), None if b is None else t(b), groups=group).transpose(1, 2)
    np.testing.assert_allclose(apply(K.pointwise_spec(w, b, group), x), ref.numpy(), atol=ATOL)


@pytest.mark.parametrize("kernel, strides, pads", [((3,), (), ()), ((1,), (2,), ()), ((1,), (), (1, 1))])
def test_pointwise_spec_refuses_position_mixing(kernel, strides, pads):
    """A wider kernel, a stride or padding is not a per-position matrix."""
    with pytest.raises(K.NotMergeable):
        K.pointwise_spec(RNG.standard_normal((4, 4) + kernel), None, 1, strides, pads)


def test_placement_spec_is_torch_index_assignment():
    """z = zeros(..., 12); z[..., cols] = y is y through placement_spec(cols, 12); negative
    columns count from the end, as torch's indexing does."""
    y = tokens(c=5)
    cols = [0, 3, 4, -2, 7]
    z = torch.zeros(y.shape[:-1] + (12,), dtype=torch.float64)
    z[..., torch.tensor(cols)] = t(y)
    np.testing.assert_allclose(apply(K.placement_spec(cols, 12), y), z.numpy(), atol=ATOL)


@pytest.mark.parametrize("cols", [[0, 0, 1], [0, 12]])
def test_placement_spec_refuses_repeats_and_out_of_range(cols):
    with pytest.raises(K.NotMergeable):
        K.placement_spec(cols, 12)


def test_scatter_columns_and_rows_read_index_assignment():
    """The (row, col) indices of `z[:, cols] = y` on [R, C] and the [m, 1] indices of
    `z[cols] = y` give back cols; a scatter that moves rows or varies the columns per row gives None."""
    cols = np.array([1, 4, 5])
    full = np.stack(np.broadcast_arrays(np.arange(6)[:, None], cols[None, :]), axis=-1)
    assert K.scatter_columns(full, (6, 3), (6, 8)).tolist() == cols.tolist()
    moved = full.copy()
    moved[..., 0] = moved[::-1, :, 0]
    assert K.scatter_columns(moved, (6, 3), (6, 8)) is None
    varied = full.copy()
    varied[2, :, 1] = [0, 2, 3]
    assert K.scatter_columns(varied, (6, 3), (6, 8)) is None
    assert K.scatter_rows(cols.reshape(-1, 1), 2, 2).tolist() == cols.tolist()
    assert K.scatter_rows(cols.reshape(-1, 1), 1, 2) is None  # elements, not slices
    assert K.scatter_rows(full.reshape(-1, 2), 1, 2) is None
