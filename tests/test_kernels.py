"""onnxrep.kernels against torch's own ops, in float64.

Every merged ConvSpec is run through torch (F.conv1d/2d/3d, or F.linear for rank 0) and compared with
the original ops computed by torch directly (conv, batch_norm(training=False), avg_pool with
count_include_pad=True, linear). ONNX asymmetric pads are applied with F.pad, then conv with padding 0.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace
from itertools import product

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from onnxrep import kernels as K
from onnxrep.kernels import ConvSpec, NotMergeable

ATOL = 1e-10
BATCH = 2
CIN = 4

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


# -- torch reference helpers ---------------------------------------------------------------------
def t(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def torch_pads(pads) -> list[int]:
    """ONNX pads (all begins, then all ends) → F.pad order (last axis first)."""
    r = len(pads) // 2
    out: list[int] = []
    for a in reversed(range(r)):
        out += [pads[a], pads[r + a]]
    return out


def tconv(x, w, b=None, strides=None, pads=None, dils=None, group=1) -> torch.Tensor:
    """ONNX Conv (or grouped Gemm for rank 0) computed by torch."""
    w = t(w)
    b = None if b is None else t(b)
    r = w.dim() - 2
    if r == 0:
        bs = [None] * group if b is None else list(b.chunk(group))
        return torch.cat([F.linear(xi, wi, bi) for xi, wi, bi in zip(x.chunk(group, 1), w.chunk(group, 0), bs)], 1)
    strides = tuple(strides or (1,) * r)
    dils = tuple(dils or (1,) * r)
    pads = tuple(pads or (0,) * (2 * r))
    if pads[:r] == pads[r:]:
        padding = pads[:r]  # symmetric: torch's own padding
    else:
        x = F.pad(x, torch_pads(pads))
        padding = 0
    return CONV[r](x, w, b, stride=strides, padding=padding, dilation=dils, groups=group)


def run(spec: ConvSpec, x) -> torch.Tensor:
    """Apply a ConvSpec with torch; always through F.pad + padding 0 for the merged side."""
    if spec.rank == 0:
        return tconv(x, spec.weight, spec.bias, group=spec.group)
    xp = F.pad(x, torch_pads(spec.pads))
    return CONV[spec.rank](xp, t(spec.weight), t(spec.bias), stride=spec.strides, padding=0,
                           dilation=spec.dilations, groups=spec.group)


def assert_close(got: torch.Tensor, want: torch.Tensor, case="", atol: float = ATOL):
    assert tuple(got.shape) == tuple(want.shape), (str(case), tuple(got.shape), tuple(want.shape))
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= atol, f"{case}: max abs error {err:.3g}"


def bcast(v, rank) -> torch.Tensor:
    """Per-channel vector shaped to broadcast against [N, C, *spatial]."""
    return t(v).reshape((1, -1) + (1,) * rank)


def bn_params(rng, c):
    return (rng.standard_normal(c), rng.standard_normal(c), rng.standard_normal(c),
            rng.uniform(0.5, 2.0, c), 1e-5)


def tbn(y, gamma, beta, mean, var, eps):
    return F.batch_norm(y, t(mean), t(var), t(gamma), t(beta), training=False, eps=eps)


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny float64 convs: one torch thread is fastest and robust on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- geometry cross product ----------------------------------------------------------------------
KERNELS = {0: [()], 1: [(1,), (3,), (5,)], 2: [(1, 1), (3, 3), (5, 5), (1, 3), (3, 1)],
           3: [(1, 1, 1), (3, 3, 3), (1, 3, 3)]}
PADS = {0: [()], 1: [(0, 0), (1, 1), (0, 1)], 2: [(0, 0, 0, 0), (1, 1, 1, 1), (0, 1, 1, 0)],
        3: [(0,) * 6, (1,) * 6, (0, 1, 1, 1, 0, 0)]}
SPATIAL = {0: [()], 1: [(10,), (11,)], 2: [(11, 10)], 3: [(7, 6, 7)]}


@dataclass(frozen=True)
class Geom:
    rank: int
    kernel: tuple
    strides: tuple
    pads: tuple
    dils: tuple
    groups: str  # "1", "2" or "dw"
    bias: bool
    spatial: tuple

    def group(self, cin: int) -> int:
        return cin if self.groups == "dw" else int(self.groups)

    def cout(self, cin: int = CIN) -> int:
        return 2 * cin if self.groups == "dw" else 6  # depthwise with multiplier 2

    @property
    def extent(self):
        return tuple((k - 1) * d + 1 for k, d in zip(self.kernel, self.dils))

    def __str__(self):
        if self.rank == 0:
            return f"r0-g{self.groups}-{'b' if self.bias else 'nb'}"
        j = lambda v: "x".join(map(str, v))  # noqa: E731
        return (f"r{self.rank}-k{j(self.kernel)}-s{self.strides[0]}-p{''.join(map(str, self.pads))}"
                f"-d{self.dils[0]}-g{self.groups}-{'b' if self.bias else 'nb'}-in{j(self.spatial)}")


def bases(ranks=(0, 1, 2, 3)) -> list[Geom]:
    """Kernel × stride × pads × dilation per rank; groups, bias and input size vary inside each test."""
    out = []
    for r in ranks:
        if r == 0:
            out.append(Geom(0, (), (), (), (), "1", False, ()))
            continue
        for k, s, p, d in product(KERNELS[r], (1, 2), PADS[r], (1, 2)):
            out.append(Geom(r, k, (s,) * r, p, (d,) * r, "1", False, SPATIAL[r][0]))
    return out


def variants(base: Geom):
    """base × bias (no/yes) × groups (1, 2, depthwise) × input sizes (odd and even)."""
    for b, grp, sp in product((False, True), ("1", "2", "dw"), SPATIAL[base.rank]):
        yield replace(base, groups=grp, bias=b, spatial=sp)


def base_id(g: Geom) -> str:
    return str(g).rsplit("-g", 1)[0]


def each_variant(bases_: list[Geom], keep=lambda g: True):
    """Parametrize a test over `bases_` and run its body for every kept variant (few pytest items,
    the whole cross product checked)."""

    def deco(fn):
        def test(rng, base):
            n = 0
            for g in variants(base):
                if keep(g):
                    try:
                        fn(rng, g)
                    except Exception as e:
                        if hasattr(e, "add_note"):  # Python ≥ 3.11: name the failing variant
                            e.add_note(f"variant: {g}")
                        raise
                    n += 1
            assert n, "no variant ran"

        test.__name__, test.__doc__ = fn.__name__, fn.__doc__
        return pytest.mark.parametrize("base", bases_, ids=base_id)(test)

    return deco


ALL = bases()
RANK2 = bases((2,))
NONZERO_RANK = bases((1, 2, 3))


def make_conv(rng, g: Geom, cin: int = CIN, cout: int | None = None, bias: bool | None = None):
    """Random weight/bias for geometry g; returns (w, b_or_None, spec)."""
    cout = g.cout(cin) if cout is None else cout
    grp = g.group(cin)
    w = rng.standard_normal((cout, cin // grp) + g.kernel)
    b = rng.standard_normal(cout) if (g.bias if bias is None else bias) else None
    return w, b, ConvSpec(w, b, strides=g.strides, pads=g.pads, dilations=g.dils, group=grp)


def orig_conv(x, w, b, g: Geom, cin: int = CIN):
    return tconv(x, w, b, g.strides, g.pads, g.dils, g.group(cin))


def make_x(rng, g: Geom, cin: int = CIN, spatial=None):
    return t(rng.standard_normal((BATCH, cin) + tuple(g.spatial if spatial is None else spatial)))


# -- ConvSpec ------------------------------------------------------------------------------------
@each_variant(ALL)
def test_convspec_geometry_matches_torch(rng, g):
    """ConvSpec shape facts (output_shape, cin/cout, extent, macs) agree with torch's conv output."""
    w, b, spec = make_conv(rng, g)
    x = make_x(rng, g)
    y = orig_conv(x, w, b, g)
    assert spec.output_shape(g.spatial) == tuple(y.shape[2:])
    assert spec.cin == CIN and spec.cout == g.cout() and spec.kernel_shape == g.kernel
    assert spec.extent == g.extent
    assert spec.macs(tuple(y.shape[2:])) == g.cout() * (CIN // g.group(CIN)) * math.prod(g.kernel) * math.prod(y.shape[2:])
    assert_close(run(spec, x), y)
    if not g.bias:
        assert np.all(spec.bias == 0) and spec.bias.shape == (g.cout(),)


def test_convspec_validation():
    """ConvSpec rejects geometry of the wrong rank, bad bias length and Cout not divisible by group."""
    w = np.zeros((4, 2, 3, 3))
    with pytest.raises(ValueError):
        ConvSpec(w, None, strides=(1,))
    with pytest.raises(ValueError):
        ConvSpec(w, None, pads=(1, 1))
    with pytest.raises(ValueError):
        ConvSpec(w, np.zeros(3))
    with pytest.raises(ValueError):
        ConvSpec(w, None, group=3)
    s = ConvSpec(w.astype(np.float32), None)
    assert s.weight.dtype == np.float64 and s.strides == (1, 1) and s.pads == (0,) * 4 and s.dilations == (1, 1)
    assert issubclass(NotMergeable, ValueError)


def test_is_pointwise():
    """is_pointwise is true only for 1×…×1, stride 1, unpadded convs."""
    w1 = np.ones((2, 2, 1, 1))
    assert ConvSpec(w1, None).is_pointwise()
    assert ConvSpec(np.ones((2, 2)), None).is_pointwise()
    assert not ConvSpec(w1, None, strides=(2, 1)).is_pointwise()
    assert not ConvSpec(w1, None, pads=(0, 1, 0, 0)).is_pointwise()
    assert not ConvSpec(np.ones((2, 2, 1, 3)), None).is_pointwise()


# -- constructors --------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [0, 1, 2, 3])
@pytest.mark.parametrize("group", [None, 1, 2, 4, 8])
def test_identity(rng, rank, group):
    """identity(C, rank, group) returns x exactly, with kernel id[o, o mod (C/g)] for every group."""
    c = 8
    spec = K.identity(c, rank, group)
    grp = c if group is None else group
    assert spec.group == grp and spec.kernel_shape == (1,) * rank and not any(spec.pads)
    cg = c // grp
    want = np.zeros((c, cg) + (1,) * rank)
    for o in range(c):
        want[(o, o % cg) + (0,) * rank] = 1.0
    np.testing.assert_array_equal(spec.weight, want)
    x = t(rng.standard_normal((BATCH, c) + (5, 4, 3)[:rank]))
    assert torch.equal(run(spec, x), x)


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_affine_on_identity(rng, rank):
    """affine_after on the identity (how the region walk expresses a per-channel affine) equals
    x*scale + shift per channel."""
    c = 5
    a, sh = rng.standard_normal(c), rng.standard_normal(c)
    x = t(rng.standard_normal((BATCH, c) + (5, 4, 3)[:rank]))
    spec = K.sparsest_group(K.affine_after(K.identity(c, rank), a, sh))
    assert spec.group == c
    assert_close(run(spec, x), x * bcast(a, rank) + bcast(sh, rank))
    # scalar shift broadcasts over channels
    assert_close(run(K.affine_after(K.identity(c, rank), a, 0.5), x), x * bcast(a, rank) + 0.5)


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_bn_affine(rng, rank):
    """bn_affine as an affine on the identity equals F.batch_norm(training=False)."""
    c = 5
    p = bn_params(rng, c)
    x = t(rng.standard_normal((BATCH, c) + (5, 4, 3)[:rank]))
    a, sh = K.bn_affine(*p)
    assert_close(run(K.affine_after(K.identity(c, rank), a, sh), x), tbn(x, *p))


POOL_CASES = [(r, k, s, p) for r in (1, 2, 3) for k, s, p in product(KERNELS[r], (1, 2), PADS[r])]


@pytest.mark.parametrize("r,k,s,p", POOL_CASES, ids=[f"r{r}-k{k}-s{s}-p{p}" for r, k, s, p in POOL_CASES])
def test_avgpool(rng, r, k, s, p):
    """avgpool equals F.avg_pool with count_include_pad=True (ONNX pads via F.pad, and torch padding)."""
    c = 3
    x = t(rng.standard_normal((BATCH, c) + (11, 10, 9)[:r]))
    spec = K.avgpool(c, k, (s,) * r, p)
    want = POOL[r](F.pad(x, torch_pads(p)), k, (s,) * r, 0, count_include_pad=True)
    assert_close(run(spec, x), want)
    if p[:r] == p[r:] and all(2 * q <= kk for q, kk in zip(p[:r], k)):
        assert_close(run(spec, x), POOL[r](x, k, (s,) * r, p[:r], count_include_pad=True))


# -- per-channel affine on either side -----------------------------------------------------------
@each_variant(ALL)
def test_affine_after(rng, g):
    """affine_after: a ⊙ conv(x) + c as one conv."""
    w, b, spec = make_conv(rng, g)
    x = make_x(rng, g)
    a, c = rng.standard_normal(spec.cout), rng.standard_normal(spec.cout)
    want = orig_conv(x, w, b, g) * bcast(a, g.rank) + bcast(c, g.rank)
    got = K.affine_after(spec, a, c)
    assert got.group == spec.group and got.pads == spec.pads and got.strides == spec.strides
    assert_close(run(got, x), want)


@each_variant(ALL)
def test_bn_after_conv(rng, g):
    """affine_after(bn_affine): BatchNorm(conv(x)) as one conv."""
    w, b, spec = make_conv(rng, g)
    x = make_x(rng, g)
    p = bn_params(rng, spec.cout)
    assert_close(run(K.affine_after(spec, *K.bn_affine(*p)), x), tbn(orig_conv(x, w, b, g), *p))


@each_variant(ALL)
def test_affine_before(rng, g):
    """affine_before: conv(a ⊙ x + c) as one conv (c = 0 when the conv is padded)."""
    w, b, spec = make_conv(rng, g)
    x = make_x(rng, g)
    a = rng.standard_normal(CIN)
    c = np.zeros(CIN) if any(g.pads) else rng.standard_normal(CIN)
    want = orig_conv(x * bcast(a, g.rank) + bcast(c, g.rank), w, b, g)
    assert_close(run(K.affine_before(spec, a, c), x), want)


@each_variant(ALL)
def test_bn_before_conv(rng, g):
    """affine_before(bn_affine): conv(BatchNorm(x)) as one conv (mean = beta = 0, i.e. zero shift, when padded)."""
    w, b, spec = make_conv(rng, g)
    x = make_x(rng, g)
    gamma, beta, mean, var, eps = bn_params(rng, CIN)
    if any(g.pads):
        beta, mean = np.zeros(CIN), np.zeros(CIN)
    want = orig_conv(tbn(x, gamma, beta, mean, var, eps), w, b, g)
    assert_close(run(K.affine_before(spec, *K.bn_affine(gamma, beta, mean, var, eps)), x), want)


@each_variant([g for g in NONZERO_RANK if any(g.pads) and g.dils[0] == 1], keep=lambda g: g.bias)
def test_affine_before_shift_padded_raises(rng, g):
    """affine_before (also of a BN) with a nonzero shift before a padded conv raise NotMergeable."""
    _, _, spec = make_conv(rng, g)
    c = np.zeros(CIN)
    c[1] = 0.25
    with pytest.raises(NotMergeable):
        K.affine_before(spec, np.ones(CIN), c)
    with pytest.raises(NotMergeable):
        K.affine_before(spec, *K.bn_affine(*bn_params(rng, CIN)))


def test_bn_before_padded_conv_zero_shift_exact(rng):
    """affine_before(bn_affine) with beta = mean·gamma/sqrt(var+eps) (shift exactly 0) before a 3×3 pad-1 conv is exact."""
    g = Geom(2, (3, 3), (1, 1), (1, 1,1, 1), (1, 1), "2", True, (7, 8))
    w, b, spec = make_conv(rng, g)
    gamma, _, mean, var, eps = bn_params(rng, CIN)
    beta = mean * (gamma / np.sqrt(var + eps))
    x = make_x(rng, g)
    want = orig_conv(tbn(x, gamma, beta, mean, var, eps), w, b, g)
    assert_close(run(K.affine_before(spec, *K.bn_affine(gamma, beta, mean, var, eps)), x), want)


TRANSPOSED = [(r, grp, s, bias) for r in (1, 2, 3) for grp, s, bias in product(("1", "2", "dw"), (1, 2), (False, True))]


@pytest.mark.parametrize("r,groups,stride,bias", TRANSPOSED,
                         ids=[f"r{r}-g{g}-s{s}-{'b' if b else 'nb'}" for r, g, s, b in TRANSPOSED])
def test_affine_after_transposed(rng, r, groups, stride, bias):
    """affine_after_transposed: a ⊙ conv_transpose(x) + c with ConvTranspose's [Cin, Cout/g, *k] weight."""
    grp = CIN if groups == "dw" else int(groups)
    cout = 2 * CIN if groups == "dw" else 6
    k = (3, 2, 3)[:r]
    w = rng.standard_normal((CIN, cout // grp) + k)
    b = rng.standard_normal(cout) if bias else None
    a, c = rng.standard_normal(cout), rng.standard_normal(cout)
    x = t(rng.standard_normal((BATCH, CIN) + (5, 4, 3)[:r]))
    convt = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[r]
    kw = dict(stride=(stride,) * r, padding=(1,) * r, groups=grp)
    want = convt(x, t(w), None if b is None else t(b), **kw) * bcast(a, r) + bcast(c, r)
    w2, b2 = K.affine_after_transposed(w, b, grp, a, c)
    assert w2.shape == w.shape and b2.shape == (cout,)
    assert_close(convt(x, t(w2), t(b2), **kw), want)


# -- kernel reshaping ----------------------------------------------------------------------------
def test_pad_kernel_values():
    """pad_kernel embeds the kernel at the offset and raises when it does not fit."""
    w = np.arange(2 * 3 * 1 * 3, dtype=np.float64).reshape(2, 3, 1, 3) + 1
    out = K.pad_kernel(w, (3, 5), (2, 1))
    assert out.shape == (2, 3, 3, 5)
    np.testing.assert_array_equal(out[:, :, 2:3, 1:4], w)
    assert out.sum() == w.sum()
    with pytest.raises(ValueError):
        K.pad_kernel(w, (3, 5), (0, 3))
    with pytest.raises(ValueError):
        K.pad_kernel(w, (3, 5), (-1, 0))
    np.testing.assert_array_equal(K.pad_kernel(np.ones((2, 3)), (), ()), np.ones((2, 3)))


@each_variant(NONZERO_RANK)
def test_pad_kernel_conv(rng, g):
    """A kernel zero-embedded at an offset, with pads grown by offset·dilation, computes the same conv."""
    w, b, spec = make_conv(rng, g)
    x = make_x(rng, g)
    r = g.rank
    grow = (1, 2, 2)[:r]
    off = (1, 0, 2)[:r]
    big = tuple(k + e for k, e in zip(g.kernel, grow))
    wp = K.pad_kernel(w, big, off)
    pads = tuple(p + o * d for p, o, d in zip(g.pads[:r], off, g.dils)) + tuple(
        p + (e - o) * d for p, e, o, d in zip(g.pads[r:], grow, off, g.dils))
    got = ConvSpec(wp, b, strides=g.strides, pads=pads, dilations=g.dils, group=spec.group)
    assert_close(run(got, x), orig_conv(x, w, b, g))


def test_dilate_kernel_values():
    """dilate_kernel inserts d-1 zeros between taps per axis, and is a no-op for dilation 1."""
    w = np.arange(1, 7, dtype=np.float64).reshape(1, 1, 2, 3)
    out = K.dilate_kernel(w, (3, 2))
    assert out.shape == (1, 1, 4, 5)
    np.testing.assert_array_equal(out[0, 0, ::3, ::2], w[0, 0])
    assert out.sum() == w.sum()
    assert K.dilate_kernel(w, (1, 1)) is w


@each_variant(NONZERO_RANK)
def test_densify(rng, g):
    """densify: a dilated conv as a dense conv with dilation 1 and kernel = extent."""
    w, b, spec = make_conv(rng, g)
    x = make_x(rng, g)
    d = K.densify(spec)
    assert d.dilations == (1,) * g.rank and d.kernel_shape == g.extent
    assert_close(run(d, x), orig_conv(x, w, b, g))
    if g.dils[0] == 1:
        assert d is spec


@each_variant(ALL)
def test_regroup(rng, g):
    """regroup to every coarser group (2→1, dw→2, dw→1) keeps every output; to the same group is a no-op."""
    w, b, spec = make_conv(rng, g)
    x = make_x(rng, g)
    want = orig_conv(x, w, b, g)
    assert K.regroup(spec, spec.group) is spec
    for target in {"1": (), "2": (1,), "dw": (2, 1)}[g.groups]:
        got = K.regroup(spec, target)
        assert got.group == target and got.weight.shape == (spec.cout, CIN // target) + g.kernel
        assert_close(run(got, x), want, f"{g}->group {target}")


def test_regroup_invalid():
    """regroup to a group that does not divide the current one raises ValueError."""
    spec = ConvSpec(np.ones((8, 1, 3, 3)), None, group=4)
    with pytest.raises(ValueError):
        K.regroup(spec, 3)
    with pytest.raises(ValueError):
        K.regroup(ConvSpec(np.ones((8, 2, 3, 3)), None, group=2), 4)


# -- add -----------------------------------------------------------------------------------------
def companion(g: Geom, groups: str, bias: bool = True) -> Geom | None:
    """A differently shaped conv (dilation 1) producing the same output grid as g on the same input:
    per axis the smallest kernel whose pads are ≥ 0, pads split towards g's begin pad."""
    if g.rank == 0:
        return Geom(0, (), (), (), (), groups, bias, ())
    r = g.rank
    ks, pb, pe = [], [], []
    for a in range(r):
        c = g.pads[a] + g.pads[r + a] - g.extent[a]
        k = max(1, -c)
        tot = c + k
        b0 = min(g.pads[a], tot)
        ks.append(k)
        pb.append(b0)
        pe.append(tot - b0)
    return Geom(r, tuple(ks), g.strides, tuple(pb + pe), (1,) * r, groups, bias, g.spatial)


@each_variant(ALL)
def test_add(rng, g):
    """add: conv + differently shaped/grouped conv (+ identity when same-size) equals the sum of torch convs."""
    cout = CIN  # same channels so an identity can join
    w1, b1, s1 = make_conv(rng, g, cout=cout)
    g2 = companion(g, {"1": "1", "2": "2", "dw": "2"}[g.groups])
    w2, b2, s2 = make_conv(rng, g2, cout=cout)
    x = make_x(rng, g)
    terms = [s1, s2]
    want = orig_conv(x, w1, b1, g) + orig_conv(x, w2, b2, g2)
    r = g.rank
    same = r == 0 or (all(s == 1 for s in g.strides) and all(
        g.pads[a] + g.pads[r + a] - g.extent[a] == -1 for a in range(r)))
    if same:
        terms.append(K.identity(CIN, r, group=g.group(CIN)))
        want = want + x
    got = K.add(terms)
    assert got.group == math.gcd(g.group(CIN), g2.group(CIN))
    assert_close(run(got, x), want)


def test_add_acnet():
    """add: ACNet 3×3 pad 1 + 1×3 pad (0,1) + 3×1 pad (1,0) + identity → one 3×3 pad 1 conv."""
    rng = np.random.default_rng(1)
    x = t(rng.standard_normal((BATCH, CIN, 9, 8)))
    ws = [rng.standard_normal((CIN, CIN) + k) for k in ((3, 3), (1, 3), (3, 1))]
    bs = [rng.standard_normal(CIN) for _ in ws]
    pads = [(1, 1, 1, 1), (0, 1, 0, 1), (1, 0, 1, 0)]
    specs = [ConvSpec(w, b, pads=p) for w, b, p in zip(ws, bs, pads)] + [K.identity(CIN, 2)]
    got = K.add(specs)
    assert got.kernel_shape == (3, 3) and got.pads == (1, 1, 1, 1) and got.group == 1
    want = sum(tconv(x, w, b, pads=p) for w, b, p in zip(ws, bs, pads)) + x
    assert_close(run(got, x), want)


@pytest.mark.parametrize("stride", [1, 2])
def test_add_repvgg(rng, stride):
    """add: RepVGG 3×3 pad 1 + 1×1 pad 0 (+ identity at stride 1), grouped, → one 3×3 pad 1."""
    x = t(rng.standard_normal((BATCH, CIN, 10, 9)))
    w3, b3 = rng.standard_normal((CIN, 2, 3, 3)), rng.standard_normal(CIN)
    w1, b1 = rng.standard_normal((CIN, 2, 1, 1)), rng.standard_normal(CIN)
    st = (stride, stride)
    terms = [ConvSpec(w3, b3, strides=st, pads=(1,) * 4, group=2), ConvSpec(w1, b1, strides=st, group=2)]
    want = tconv(x, w3, b3, st, (1,) * 4, group=2) + tconv(x, w1, b1, st, group=2)
    if stride == 1:
        terms.append(K.identity(CIN, 2, group=2))
        want = want + x
    got = K.add(terms)
    assert got.kernel_shape == (3, 3) and got.pads == (1,) * 4 and got.group == 2
    assert_close(run(got, x), want)


def test_add_mixed_dilations(rng):
    """add: 3×3 d2 pad 2 + 3×3 d1 pad 1 densifies to 5×5 pad 2; 3×3 d2 pad 2 + 1×1 d2 keeps dilation 2."""
    x = t(rng.standard_normal((BATCH, CIN, 11, 12)))
    wa, wb, wc = (rng.standard_normal((6, CIN) + k) for k in ((3, 3), (3, 3), (1, 1)))
    a = ConvSpec(wa, None, pads=(2,) * 4, dilations=(2, 2))
    b = ConvSpec(wb, None, pads=(1,) * 4)
    c = ConvSpec(wc, None)
    want_a = tconv(x, wa, None, pads=(2,) * 4, dils=(2, 2))
    got = K.add([a, b])
    assert got.dilations == (1, 1) and got.kernel_shape == (5, 5) and got.pads == (2,) * 4
    assert_close(run(got, x), want_a + tconv(x, wb, None, pads=(1,) * 4))
    # a 1×1 (dilation 1) at offset 2 beside it: exact (densified, since the dilations differ)
    got = K.add([a, c])
    assert_close(run(got, x), want_a + tconv(x, wc, None))
    # the same 1×1 declared with dilation 2 sits one dilation step in: dilation 2 and 3×3 are kept
    got = K.add([a, replace(c, dilations=(2, 2))])
    assert got.dilations == (2, 2) and got.kernel_shape == (3, 3) and got.pads == (2,) * 4
    assert_close(run(got, x), want_a + tconv(x, wc, None))


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_add_other_ranks(rng, rank):
    """add over rank 0 (Gemm + Gemm + identity), 1 and 3 (k3 pad 1 + k1 + identity)."""
    k3, k1 = (3,) * rank, (1,) * rank
    x = t(rng.standard_normal((BATCH, CIN) + (7, 6, 5)[:rank]))
    wa, ba = rng.standard_normal((CIN, CIN) + k3), rng.standard_normal(CIN)
    wb, bb = rng.standard_normal((CIN, CIN) + k1), rng.standard_normal(CIN)
    pads = (1,) * (2 * rank)
    got = K.add([ConvSpec(wa, ba, pads=pads), ConvSpec(wb, bb), K.identity(CIN, rank)])
    want = tconv(x, wa, ba, pads=pads) + tconv(x, wb, bb) + x
    assert_close(run(got, x), want)


def test_add_not_nesting_raises():
    """add: 1×1 pad 1 with 3×3 pad 1 (different output sizes) raises NotMergeable."""
    a = ConvSpec(np.ones((4, 4, 1, 1)), None, pads=(1,) * 4)
    b = ConvSpec(np.ones((4, 4, 3, 3)), None, pads=(1,) * 4)
    with pytest.raises(NotMergeable):
        K.add([a, b])
    with pytest.raises(NotMergeable):
        K.add([ConvSpec(np.ones((4, 4, 3, 3)), None), ConvSpec(np.ones((4, 4, 1, 1)), None)])


def test_add_mismatch_raises():
    """add: different strides, channel counts or ranks raise NotMergeable; no terms raises ValueError."""
    w = np.ones((4, 4, 1, 1))
    with pytest.raises(NotMergeable):
        K.add([ConvSpec(w, None), ConvSpec(w, None, strides=(2, 2))])
    with pytest.raises(NotMergeable):
        K.add([ConvSpec(w, None), ConvSpec(np.ones((4, 2, 1, 1)), None)])
    with pytest.raises(NotMergeable):
        K.add([ConvSpec(w, None), ConvSpec(np.ones((2, 4, 1, 1)), None)])
    with pytest.raises(NotMergeable):
        K.add([ConvSpec(w, None), ConvSpec(np.ones((4, 4, 1)), None)])
    with pytest.raises(ValueError):
        K.add([])


# -- concat --------------------------------------------------------------------------------------
@each_variant(ALL)
def test_concat(rng, g):
    """concat: a conv and a differently shaped/grouped conv on the same input, outputs concatenated."""
    w1, b1, s1 = make_conv(rng, g)
    g2 = companion(g, "1", bias=not g.bias)
    w2, b2, s2 = make_conv(rng, g2, cout=3)
    x = make_x(rng, g)
    got = K.concat([s1, s2])
    assert got.group == 1 and got.cout == s1.cout + 3
    assert_close(run(got, x), torch.cat([orig_conv(x, w1, b1, g), orig_conv(x, w2, b2, g2)], 1))


@pytest.mark.parametrize("stride", [1, 2])
def test_concat_kernel_sizes(rng, stride):
    """concat: 1×1, 3×3 pad 1, 5×5 pad 2, 1×3 pad (0,1), 3×3 d2 pad 2 (dw) branches → one conv."""
    x = t(rng.standard_normal((BATCH, CIN, 11, 10)))
    cfg = [((1, 1), (0,) * 4, (1, 1), 1, 3), ((3, 3), (1,) * 4, (1, 1), 2, 4), ((5, 5), (2,) * 4, (1, 1), 1, 2),
           ((1, 3), (0, 1, 0, 1), (1, 1), 1, 5), ((3, 3), (2,) * 4, (2, 2), CIN, 8)]
    specs, outs = [], []
    st = (stride, stride)
    for k, p, d, grp, co in cfg:
        w, b = rng.standard_normal((co, CIN // grp) + k), rng.standard_normal(co)
        specs.append(ConvSpec(w, b, strides=st, pads=p, dilations=d, group=grp))
        outs.append(tconv(x, w, b, st, p, d, grp))
    got = K.concat(specs)
    assert got.group == 1 and got.kernel_shape == (5, 5) and got.pads == (2,) * 4
    assert_close(run(got, x), torch.cat(outs, 1))


def test_concat_mismatch_raises():
    """concat: branches with different output sizes raise NotMergeable."""
    with pytest.raises(NotMergeable):
        K.concat([ConvSpec(np.ones((4, 4, 1, 1)), None, pads=(1,) * 4), ConvSpec(np.ones((4, 4, 3, 3)), None)])


# -- block_diagonal (test-side constructor for sparsest_group's inputs) ----------------------------
@each_variant(ALL)
def test_block_diagonal_equal(rng, g):
    """block_diagonal: Split → 3 equal convs (group g) → Concat is one conv with group 3·g."""
    n = 3
    convs = [make_conv(rng, g) for _ in range(n)]
    x = make_x(rng, g, cin=n * CIN)
    got = block_diagonal([s for _, _, s in convs])
    assert got.group == n * g.group(CIN) and got.cin == n * CIN
    want = torch.cat([orig_conv(xi, w, b, g) for xi, (w, b, _) in zip(x.split(CIN, 1), convs)], 1)
    assert_close(run(got, x), want)


@each_variant(ALL)
def test_block_diagonal_unequal(rng, g):
    """block_diagonal: Split → unequal convs (other channels, kernel, group) → Concat is one dense conv."""
    g2 = companion(g, "1", bias=True)
    g3 = companion(g, "dw", bias=False)
    parts = [(g, CIN, None), (g2, 2, 3), (g3, 3, 6)]
    convs = [make_conv(rng, gg, cin=ci, cout=co) for gg, ci, co in parts]
    x = make_x(rng, g, cin=sum(ci for _, ci, _ in parts))
    got = block_diagonal([s for _, _, s in convs])
    assert got.group == 1 and got.cin == CIN + 5 and got.cout == sum(s.cout for _, _, s in convs)
    want = torch.cat([orig_conv(xi, w, b, gg, cin=ci) for xi, (w, b, _), (gg, ci, _)
                      in zip(x.split([ci for _, ci, _ in parts], 1), convs, parts)], 1)
    assert_close(run(got, x), want)


def test_block_diagonal_mixed_dilation(rng):
    """block_diagonal: 3×3 d2 pad 2 block beside a 3×3 pad 1 block → dense, dilation 1."""
    x = t(rng.standard_normal((BATCH, 5, 9, 10)))
    wa, wb = rng.standard_normal((3, 2, 3, 3)), rng.standard_normal((4, 3, 3, 3))
    a = ConvSpec(wa, None, pads=(2,) * 4, dilations=(2, 2))
    b = ConvSpec(wb, None, pads=(1,) * 4)
    got = block_diagonal([a, b])
    assert got.group == 1 and got.dilations == (1, 1)
    xa, xb = x.split([2, 3], 1)
    want = torch.cat([tconv(xa, wa, None, pads=(2,) * 4, dils=(2, 2)), tconv(xb, wb, None, pads=(1,) * 4)], 1)
    assert_close(run(got, x), want)


# -- compose -------------------------------------------------------------------------------------
SECONDS = [((3, 3), (1, 1), (1, 1), "1"), ((1, 1), (2, 2), (1, 1), "2"), ((3, 1), (2, 1), (1, 1), "dw"),
           ((3, 3), (1, 1), (2, 2), "1"), ((1, 3), (1, 2), (1, 1), "dw"), ((2, 2), (2, 2), (1, 1), "2")]


def fit_input(g1: Geom, ext2: tuple, extra: tuple) -> tuple:
    """Smallest input so first's output just covers second's extent, plus `extra` per axis."""
    r = g1.rank
    return tuple(max(1, (e2 - 1) * s + e1 - (g1.pads[a] + g1.pads[r + a])) + x
                 for a, (e1, e2, s, x) in enumerate(zip(g1.extent, ext2, g1.strides, extra)))


@pytest.mark.parametrize("base", RANK2, ids=base_id)
def test_compose_unpadded_second(rng, base):
    """compose: any first conv (stride, pads, dilation, groups, bias) then an unpadded second conv."""
    for i, g in enumerate(variants(base)):
        _check_compose_unpadded(rng, g, SECONDS[i % len(SECONDS)])


def _check_compose_unpadded(rng, g, second):
    k2, st2, d2, grp2 = second
    w1, b1, s1 = make_conv(rng, g)
    mid = s1.cout
    g2 = Geom(2, k2, st2, (0,) * 4, d2, grp2, True, ())
    w2, b2, s2 = make_conv(rng, g2, cin=mid, cout=2 * mid if grp2 == "dw" else 5 if grp2 == "1" else 4)
    ext2 = tuple((k - 1) * d + 1 for k, d in zip(k2, d2))
    # tight fit (the last output of second just fits) and a looser odd/even one
    for extra in ((0, 0), (2, 3)):
        x = make_x(rng, g, spatial=fit_input(g, ext2, extra))
        want = tconv(orig_conv(x, w1, b1, g), w2, b2, st2, None, d2, s2.group)
        got = K.compose(s1, s2)
        # a 1×1 second conv keeps the first's dilation, a 1×1 stride-1 first conv the second's;
        # anything else is composed densely
        if all(k == 1 for k in k2):
            assert got.dilations == s1.dilations
        elif s1.is_pointwise():
            assert got.dilations == s2.dilations
        else:
            assert got.dilations == (1, 1)
        assert got.strides == tuple(a * b for a, b in zip(g.strides, st2))
        assert got.group == math.gcd(s1.group, s2.group)
        assert_close(run(got, x), want, f"{g} then {second}")


@each_variant(bases((1, 3)), keep=lambda g: g.groups != "2")
def test_compose_other_ranks(rng, g):
    """compose: first conv of rank 1/3 then an unpadded 3-tap, stride-1 second conv."""
    r = g.rank
    w1, b1, s1 = make_conv(rng, g)
    w2, b2 = rng.standard_normal((5, s1.cout) + (3,) * r), rng.standard_normal(5)
    x = make_x(rng, g, spatial=fit_input(g, (3,) * r, (1, 0, 2)[:r]))
    got = K.compose(s1, ConvSpec(w2, b2))
    assert_close(run(got, x), tconv(orig_conv(x, w1, b1, g), w2, b2), g)


@pytest.mark.parametrize("g1bias", [False, True])
def test_compose_rank0(rng, g1bias):
    """compose: Gemm then Gemm (rank 0), grouped and dense, equals F.linear twice."""
    x = t(rng.standard_normal((BATCH, 6)))
    w1, b1 = rng.standard_normal((8, 3)), (rng.standard_normal(8) if g1bias else None)
    w2, b2 = rng.standard_normal((5, 8)), rng.standard_normal(5)
    got = K.compose(ConvSpec(w1, b1, group=2), ConvSpec(w2, b2))
    assert_close(run(got, x), tconv(tconv(x, w1, b1, group=2), w2, b2))



@each_variant(RANK2)
def test_compose_padded_second_after_pointwise(rng, g):
    """compose: 1×1 first (bias per variant) then second g; biased first + padded second needs border_is_bias."""
    first_bias = g.bias
    g1 = Geom(2, (1, 1), (1, 1), (0,) * 4, (1, 1), "2" if g.groups == "1" else "1", first_bias, g.spatial)
    w1, b1, s1 = make_conv(rng, g1, cout=8)
    w2, b2, s2 = make_conv(rng, g, cin=8, bias=True)
    x = make_x(rng, g)
    y1 = tconv(x, w1, b1, group=s1.group)
    if not first_bias or not any(g.pads):
        got = K.compose(s1, s2)
        assert_close(run(got, x), orig_conv(y1, w2, b2, g, cin=8), g)
        return
    with pytest.raises(NotMergeable):
        K.compose(s1, s2)
    # reference: second(pad(first(x)) with the border filled with first's bias), padding done explicitly
    r = g.rank
    shape = (BATCH, 8) + tuple(h + g.pads[a] + g.pads[r + a] for a, h in enumerate(y1.shape[2:]))
    yp = bcast(b1, r).expand(shape).clone()
    yp[(slice(None), slice(None)) + tuple(slice(g.pads[a], g.pads[a] + y1.shape[2 + a]) for a in range(r))] = y1
    want = CONV[r](yp, t(w2), t(b2), stride=g.strides, padding=0, dilation=g.dils, groups=s2.group)
    got = K.compose(s1, s2, border_is_bias=True)
    assert got.pads == g.pads and got.strides == g.strides
    assert_close(run(got, x), want, g)


@pytest.mark.parametrize("first", [((3, 3), (1, 1), (0,) * 4), ((1, 1), (2, 2), (0,) * 4), ((1, 1), (1, 1), (0, 1, 0, 0)),
                                   ((3, 3), (1, 1), (1,) * 4)],
                         ids=["3x3", "1x1-stride2", "1x1-padded", "3x3-pad1"])
@pytest.mark.parametrize("border_is_bias", [False, True])
def test_compose_padded_second_after_non_pointwise_raises(rng, first, border_is_bias):
    """compose: a padded second conv after a first that is not 1×1/stride 1/unpadded raises NotMergeable."""
    k, s, p = first
    s1 = ConvSpec(rng.standard_normal((4, 4) + k), np.zeros(4), strides=s, pads=p)
    s2 = ConvSpec(rng.standard_normal((4, 4, 3, 3)), None, pads=(1,) * 4)
    with pytest.raises(NotMergeable):
        K.compose(s1, s2, border_is_bias=border_is_bias)


@pytest.mark.parametrize("second_stride", [1, 2])
def test_compose_first_stride2(rng, second_stride):
    """compose: 3×3 stride-2 pad-1 first then 3×3 stride-s second → 7×7 stride 2s pad 1 conv."""
    x = t(rng.standard_normal((BATCH, CIN, 13, 14)))
    w1, b1 = rng.standard_normal((6, CIN, 3, 3)), rng.standard_normal(6)
    w2, b2 = rng.standard_normal((5, 6, 3, 3)), rng.standard_normal(5)
    s1 = ConvSpec(w1, b1, strides=(2, 2), pads=(1,) * 4)
    s2 = ConvSpec(w2, b2, strides=(second_stride,) * 2)
    got = K.compose(s1, s2)
    assert got.kernel_shape == (7, 7) and got.strides == (2 * second_stride,) * 2 and got.pads == (1,) * 4
    assert_close(run(got, x), tconv(tconv(x, w1, b1, (2, 2), (1,) * 4), w2, b2, (second_stride,) * 2))


def test_compose_bias_tol(rng):
    """compose: a first bias within bias_tol counts as zero before a padded second conv; above it raises."""
    w1, w2 = rng.standard_normal((6, CIN, 1, 1)), rng.standard_normal((5, 6, 3, 3))
    second = ConvSpec(w2, None, pads=(1,) * 4)
    tiny = ConvSpec(w1, np.full(6, 1e-9))
    with pytest.raises(NotMergeable):
        K.compose(tiny, second)
    got = K.compose(tiny, second, bias_tol=1e-8)
    x = t(rng.standard_normal((BATCH, CIN, 6, 7)))
    # only the border differs, by at most Σ|W2|·1e-9 (the ignored bias meeting the zero padding)
    bound = 1e-9 * np.abs(w2).sum(axis=(1, 2, 3)).max() + ATOL
    assert_close(run(got, x), tconv(tconv(x, w1, np.full(6, 1e-9)), w2, None, pads=(1,) * 4), atol=bound)
    with pytest.raises(NotMergeable):
        K.compose(ConvSpec(w1, np.full(6, 1e-6)), second, bias_tol=1e-8)


def test_compose_mismatch_raises():
    """compose: channel or rank mismatch raises NotMergeable."""
    with pytest.raises(NotMergeable):
        K.compose(ConvSpec(np.ones((4, 4, 1, 1)), None), ConvSpec(np.ones((4, 3, 1, 1)), None))
    with pytest.raises(NotMergeable):
        K.compose(ConvSpec(np.ones((4, 4, 1, 1)), None), ConvSpec(np.ones((4, 4, 1)), None))


def test_compose_dbb_1x1_bn_pad_3x3(rng):
    """compose: DBB branch 1×1 conv → BN → pad with BN's bias → 3×3 (pad 1 on the chain) equals torch."""
    x = t(rng.standard_normal((BATCH, CIN, 8, 9)))
    w1 = rng.standard_normal((6, CIN, 1, 1))
    p = bn_params(rng, 6)
    w2, b2 = rng.standard_normal((5, 6, 3, 3)), rng.standard_normal(5)
    first = K.affine_after(ConvSpec(w1, None), *K.bn_affine(*p))
    got = K.compose(first, ConvSpec(w2, b2, pads=(1,) * 4), border_is_bias=True)
    # DBB's BNAndPad: bn(conv(x)), then pad with the BN's value for a zero input
    y = tbn(tconv(x, w1), *p)
    pad_val = t(p[1] - p[2] * p[0] / np.sqrt(p[3] + p[4])).reshape(1, -1, 1, 1)
    yp = F.pad(y, [1, 1, 1, 1])
    yp[:, :, 0, :] = pad_val[:, :, 0, :]
    yp[:, :, -1, :] = pad_val[:, :, 0, :]
    yp[:, :, :, 0] = pad_val[:, :, :, 0]
    yp[:, :, :, -1] = pad_val[:, :, :, 0]
    assert_close(run(got, x), F.conv2d(yp, t(w2), t(b2)))


# -- sparsest_group ------------------------------------------------------------------------------
@pytest.mark.parametrize("n,grp", [(2, 1), (3, 2), (4, 1), (2, CIN)], ids=["2x-g1", "3x-g2", "4x-g1", "2x-dw"])
def test_sparsest_group_recovers_blocks(rng, n, grp):
    """sparsest_group: a dense block-diagonal kernel (n blocks of group g) becomes group n·g, same outputs."""
    blocks = [ConvSpec(rng.standard_normal((6 if grp != CIN else 2 * CIN, CIN // grp, 3, 3)), rng.standard_normal(
        6 if grp != CIN else 2 * CIN), pads=(1, 0, 1, 2), group=grp) for _ in range(n)]
    dense = K.regroup(block_diagonal(blocks), 1)
    x = t(rng.standard_normal((BATCH, n * CIN, 7, 6)))
    got = K.sparsest_group(dense)
    assert got.group == n * grp
    assert_close(run(got, x), run(dense, x))


def test_sparsest_group_keeps_dense_and_grouped(rng):
    """sparsest_group: a kernel with an off-diagonal tap stays dense; grouped or rank-0 specs are returned as is."""
    blocks = [ConvSpec(rng.standard_normal((4, 4, 3, 3)), None) for _ in range(2)]
    dense = K.regroup(block_diagonal(blocks), 1)
    dense.weight[0, 7, 2, 2] = 0.5  # one tap reading the other block's input
    assert K.sparsest_group(dense).group == 1
    grouped = ConvSpec(rng.standard_normal((4, 2, 3, 3)), None, group=2)
    assert K.sparsest_group(grouped) is grouped
    fc = ConvSpec(np.eye(4), None)
    assert K.sparsest_group(fc) is fc


@pytest.mark.parametrize("row", [0, 5, 11], ids=["first", "middle", "last"])
def test_sparsest_group_sees_an_off_diagonal_tap_in_any_row(rng, row):
    """sparsest_group: one tap off the block diagonal, in the first, a middle or the last output
    row, keeps the kernel dense (group 1), never a wrong grouping; without it 3 blocks of a 12×12
    kernel (gcd 12, smallest divisor 2) come back as group 3."""
    blocks = [ConvSpec(rng.standard_normal((4, 4, 3, 3)), None) for _ in range(3)]
    dense = K.regroup(block_diagonal(blocks), 1)
    assert K.sparsest_group(dense).group == 3
    col = 11 if row < 8 else 0  # an input of another block
    dense.weight[row, col, 1, 1] = 0.25
    assert K.sparsest_group(dense).group == 1


def test_sparsest_group_odd_divisor(rng):
    """sparsest_group with 9 channels (gcd 9, smallest divisor 3): three 3-channel blocks → group 3."""
    blocks = [ConvSpec(rng.standard_normal((3, 3, 1, 1)), None) for _ in range(3)]
    dense = K.regroup(block_diagonal(blocks), 1)
    got = K.sparsest_group(dense)
    assert got.group == 3
    x = t(rng.standard_normal((BATCH, 9, 5, 5)))
    assert_close(run(got, x), run(dense, x))


def test_add_starts_from_a_spanning_first_term_without_aliasing_it(rng):
    """add: when the first term spans the merged window the sum starts from a copy of it, with the
    bits accumulation from zeros gives (−0 → +0), and never writes into the term's own arrays."""
    w = rng.standard_normal((4, 4, 3, 3))
    w[0, 0, 0, 0] = -0.0
    a = ConvSpec(w, rng.standard_normal(4), pads=(1, 1, 1, 1))
    b = ConvSpec(rng.standard_normal((4, 4, 1, 1)), rng.standard_normal(4))
    keep_w, keep_b = a.weight.copy(), a.bias.copy()
    got = K.add([a, b])
    ref = np.zeros((4, 4, 3, 3))
    ref += a.weight
    ref[:, :, 1:2, 1:2] += b.weight
    np.testing.assert_array_equal(got.weight, ref)
    assert not np.signbit(got.weight[0, 0, 0, 0])
    np.testing.assert_array_equal(got.bias, (np.zeros(4) + a.bias) + b.bias)
    np.testing.assert_array_equal(a.weight, keep_w)
    np.testing.assert_array_equal(a.bias, keep_b)
    assert not np.shares_memory(got.weight, a.weight)


def test_inplace_reuses_only_arrays_a_caller_gave_up(rng):
    """affine_after/add with inplace=True compute the same values as without it; they write into a
    term's weight only when it is a writable float64 array of its own, never into a read-only
    constant (a graph weight), a view, or an array another operand shares."""
    w = rng.standard_normal((4, 4, 3, 3))
    a, c = rng.standard_normal(4), rng.standard_normal(4)
    want = K.affine_after(ConvSpec(w.copy(), None, pads=(1, 1, 1, 1)), a, c)
    own = ConvSpec(w.copy(), None, pads=(1, 1, 1, 1))
    got = K.affine_after(own, a, c, inplace=True)
    np.testing.assert_array_equal(got.weight, want.weight)
    np.testing.assert_array_equal(got.bias, want.bias)
    assert got.weight is own.weight  # scaled where it lay

    frozen = w.copy()
    frozen.flags.writeable = False  # as graph.const hands out weights
    kept = frozen.copy()
    spec = ConvSpec(frozen, None, pads=(1, 1, 1, 1))
    assert spec.weight is frozen
    got = K.affine_after(spec, a, c, inplace=True)
    np.testing.assert_array_equal(frozen, kept)
    np.testing.assert_array_equal(got.weight, want.weight)
    view = ConvSpec(w.copy()[:, :, :, :], None, pads=(1, 1, 1, 1))
    view = replace(view, weight=view.weight[::1])  # a view: not its own memory
    assert K.affine_after(view, a, c, inplace=True).weight is not view.weight

    one = ConvSpec(rng.standard_normal((4, 4, 1, 1)), rng.standard_normal(4))
    base = ConvSpec(w.copy(), rng.standard_normal(4), pads=(1, 1, 1, 1))
    want = K.add([base, one])
    got = K.add([base, one], inplace=True)
    np.testing.assert_array_equal(got.weight, want.weight)
    assert got.weight is base.weight
    # the same array as two terms: it must not be accumulated into while it is still being read
    twice = ConvSpec(w.copy(), None, pads=(1, 1, 1, 1))
    got = K.add([twice, twice, twice], inplace=True)
    np.testing.assert_allclose(got.weight, 3 * w, rtol=1e-15)


def test_add_on_known_size_when_padding_does_not_nest(rng):
    """2×2 s2 p0 + 1×1 s2 p0 agree on 4×4 outputs for an 8×8 input: exact for that size only."""
    a = ConvSpec(rng.standard_normal((3, 2, 2, 2)), rng.standard_normal(3), strides=(2, 2))
    b = ConvSpec(rng.standard_normal((3, 2, 1, 1)), rng.standard_normal(3), strides=(2, 2))
    with pytest.raises(K.NotMergeable):
        K.add([a, b])  # without a size: the output sizes differ for odd inputs
    m = K.add([a, b], spatial=(8, 8))
    x = torch.from_numpy(rng.standard_normal((1, 2, 8, 8)))
    assert_close(run(m, x), run(a, x) + run(b, x), "2x2 s2 + 1x1 s2 on 8x8")
    with pytest.raises(K.NotMergeable):
        K.add([a, b], spatial=(9, 9))  # 4×4 vs 5×5

# -- test-side constructors (the product merges Split → convs → Concat through the region walk) --
def block_diagonal(specs: list[ConvSpec]) -> ConvSpec:
    """Convs each reading its own consecutive channel slice of one input, outputs concatenated in
    the same order (Split → convs → Concat) → one grouped conv.

    When all blocks have the same shape and group g the result has group n*g; otherwise the
    blocks are placed on the diagonal of a dense kernel (group 1)."""
    n = len(specs)
    first = specs[0]
    same = all(
        s.weight.shape == first.weight.shape and s.group == first.group and s.strides == first.strides
        and s.pads == first.pads and s.dilations == first.dilations
        for s in specs
    )
    if same:
        return ConvSpec(
            np.concatenate([s.weight for s in specs]), np.concatenate([s.bias for s in specs]),
            strides=first.strides, pads=first.pads, dilations=first.dilations, group=n * first.group,
        )
    # different shapes: align geometry against a common input, then place blocks densely
    aligned, kernel, pb, pe, offsets, dil = _common_geometry_blocks(specs)
    cin = sum(s.cin for s in specs)
    cout = sum(s.cout for s in specs)
    w = np.zeros((cout, cin) + kernel)
    b = np.zeros(cout)
    o0 = i0 = 0
    for s, off in zip(aligned, offsets):
        d = K.regroup(s, 1)
        w[o0 : o0 + s.cout, i0 : i0 + s.cin] = K.pad_kernel(d.weight, kernel, off)
        b[o0 : o0 + s.cout] = s.bias
        o0 += s.cout
        i0 += s.cin
    return ConvSpec(w, b, strides=first.strides, pads=pb + pe, dilations=dil, group=1)



def _common_geometry_blocks(specs):
    # channel counts may differ per block; geometry alone must agree
    probe = [replace(s, weight=s.weight[:1, :1], bias=s.bias[:1], group=1) for s in specs]
    _, kernel, pb, pe, offsets, dil = K._common_geometry(probe)
    if any(s.dilations != dil for s in specs):
        specs = [K.densify(s) for s in specs]
    return specs, kernel, pb, pe, offsets, dil


