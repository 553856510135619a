"""Kernel algebra: every linear op between two non-linearities as one convolution.

Pure NumPy, no graph objects. A `ConvSpec` is the affine map

    y = W ⊛ x + b        W: [Cout, Cin/group, *kernel], b: [Cout]

with ONNX geometry: `strides`, `pads` (all begins, then all ends), `dilations`, `group`.
A spatial rank of 0 (kernel shape ``()``) is a fully connected layer, so Gemm/MatMul and BatchNorm1d
use the same functions. Everything is float64 inside; callers cast once to the model dtype.

Functions that cannot produce an exact result raise `NotMergeable` with the reason.

Conventions, for an output position n along one axis with stride s, begin pad p, dilation d and
kernel size k: the conv reads input positions ``n*s - p + j*d`` for ``j in range(k)``. Two convs read
the same positions (up to a kernel offset) iff they agree on stride and their windows nest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import reduce
from itertools import product

import numpy as np


class NotMergeable(ValueError):
    """The requested algebra has no exact single-conv result; str(e) says why."""


@dataclass
class ConvSpec:
    """An affine convolution. weight [Cout, Cin/group, *kernel] and bias [Cout], both float64."""

    weight: np.ndarray
    bias: np.ndarray
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    group: int = 1

    def __post_init__(self):
        self.weight = np.asarray(self.weight, dtype=np.float64)
        r = self.weight.ndim - 2
        if self.bias is None:
            self.bias = np.zeros(self.weight.shape[0])
        self.bias = np.asarray(self.bias, dtype=np.float64).reshape(-1)
        self.strides = tuple(int(v) for v in (self.strides or (1,) * r))
        self.pads = tuple(int(v) for v in (self.pads or (0,) * (2 * r)))
        self.dilations = tuple(int(v) for v in (self.dilations or (1,) * r))
        self.group = int(self.group)
        if len(self.strides) != r or len(self.pads) != 2 * r or len(self.dilations) != r:
            raise ValueError(f"geometry does not match kernel rank {r}")
        if self.bias.shape[0] != self.weight.shape[0]:
            raise ValueError("bias length != Cout")
        if self.weight.shape[0] % self.group:
            raise ValueError("Cout not divisible by group")

    # -- shape facts -------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.weight.ndim - 2

    @property
    def cout(self) -> int:
        return self.weight.shape[0]

    @property
    def cin(self) -> int:
        return self.weight.shape[1] * self.group

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def extent(self) -> tuple[int, ...]:
        """Span of input positions one output reads, per axis: (k-1)*d + 1."""
        return tuple((k - 1) * d + 1 for k, d in zip(self.kernel_shape, self.dilations))

    @property
    def pads_begin(self) -> tuple[int, ...]:
        return self.pads[: self.rank]

    @property
    def pads_end(self) -> tuple[int, ...]:
        return self.pads[self.rank :]

    def output_shape(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(
            (h + pb + pe - e) // s + 1
            for h, pb, pe, e, s in zip(spatial, self.pads_begin, self.pads_end, self.extent, self.strides)
        )

    def macs(self, out_spatial: tuple[int, ...]) -> int:
        """Multiply-accumulates for one sample producing `out_spatial`."""
        return int(self.cout * self.weight.shape[1] * math.prod(self.kernel_shape) * math.prod(out_spatial))

    def is_pointwise(self) -> bool:
        return all(k == 1 for k in self.kernel_shape) and not any(self.pads) and all(s == 1 for s in self.strides)


# -- constructors --------------------------------------------------------------------------------
def identity(channels: int, rank: int, group: int | None = None) -> ConvSpec:
    """x itself as a 1×…×1 conv. With group=channels (default) the kernel is depthwise:
    per group g the kernel is id[o, o mod (C/g)] = 1."""
    group = channels if group is None else group
    cg = channels // group
    w = np.zeros((channels, cg) + (1,) * rank)
    for o in range(channels):
        w[(o, o % cg) + (0,) * rank] = 1.0
    return ConvSpec(w, np.zeros(channels), group=group)


def bn_affine(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Inference BatchNormalization as y = a*x + c per channel."""
    a = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + float(eps))
    c = np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * a
    return a, c


def avgpool(channels: int, kernel_shape: tuple[int, ...], strides, pads) -> ConvSpec:
    """AveragePool with count_include_pad=1 (or no padding) as a depthwise conv of 1/prod(k)."""
    k = tuple(kernel_shape)
    w = np.full((channels, 1) + k, 1.0 / math.prod(k))
    return ConvSpec(w, np.zeros(channels), strides=strides, pads=pads, group=channels)


def _reusable(w: np.ndarray, *others: np.ndarray) -> bool:
    """Whether an `inplace` function may write its result into `w`: a writable float64 array that
    owns its memory (never a read-only graph constant or a view of one) and overlaps no other
    operand of the same call."""
    return (w.dtype == np.float64 and w.flags.writeable and w.flags.owndata and w.flags.c_contiguous
            and not any(np.may_share_memory(w, o) for o in others))


# -- per-channel affine on either side -----------------------------------------------------------
def affine_after(spec: ConvSpec, scale, shift, inplace: bool = False) -> ConvSpec:
    """a ⊙ conv(x) + c: scale output channels (Conv→BN, Conv→Mul/Add, layer scale).

    inplace=True: the caller gives `spec` up, and its weight is scaled where it lies when it is
    an array of its own (see _reusable): on large kernels each fresh float64 array costs more in
    page faults than the multiply itself."""
    a = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (spec.cout,))
    c = np.broadcast_to(np.asarray(shift, np.float64).reshape(-1), (spec.cout,))
    a_w = a.reshape((-1,) + (1,) * (spec.weight.ndim - 1))
    if inplace and _reusable(spec.weight):
        w = spec.weight
        w *= a_w
    else:
        w = spec.weight * a_w
    return replace(spec, weight=w, bias=spec.bias * a + c)


def affine_before(spec: ConvSpec, scale, shift) -> ConvSpec:
    """conv(a ⊙ x + c) as one conv: scale input channels and fold the shift into the bias.

    Exact only when the conv reads no padding or c == 0: a padded border holds 0, not c.
    """
    a = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (spec.cin,))
    c = np.broadcast_to(np.asarray(shift, np.float64).reshape(-1), (spec.cin,))
    if any(spec.pads) and np.any(c != 0):
        raise NotMergeable("a shift before a padded conv changes the border (padding holds 0, not the shift)")
    cg = spec.weight.shape[1]
    opg = spec.cout // spec.group
    # input channel read by (o, i) is (o // opg) * cg + i
    in_ch = (np.arange(spec.cout)[:, None] // opg) * cg + np.arange(cg)[None, :]
    bshape = in_ch.shape + (1,) * spec.rank
    w = spec.weight * a[in_ch].reshape(bshape)
    b = spec.bias + (spec.weight * c[in_ch].reshape(bshape)).reshape(spec.cout, -1).sum(axis=1)
    return replace(spec, weight=w, bias=b)


def affine_after_transposed(weight: np.ndarray, bias, group: int, scale, shift):
    """a ⊙ conv_transpose(x) + c. ConvTranspose weights are [Cin, Cout/group, *k]: output channel
    o = j·(Cout/g) + m lives at weight[j·(Cin/g):(j+1)·(Cin/g), m]."""
    cin, opg = weight.shape[0], weight.shape[1]
    cout = opg * group
    a = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (cout,))
    c = np.broadcast_to(np.asarray(shift, np.float64).reshape(-1), (cout,))
    b = np.zeros(cout) if bias is None else np.asarray(bias, np.float64)
    w = np.array(weight, dtype=np.float64)
    ipg = cin // group
    for j in range(group):
        w[j * ipg : (j + 1) * ipg] *= a[j * opg : (j + 1) * opg].reshape((1, opg) + (1,) * (w.ndim - 2))
    return w, b * a + c


# -- kernel reshaping ----------------------------------------------------------------------------
def pad_kernel(weight: np.ndarray, kernel_shape: tuple[int, ...], offset: tuple[int, ...]) -> np.ndarray:
    """Embed weight [..., *k] into zeros [..., *K] starting at `offset` per spatial axis."""
    r = len(kernel_shape)
    k = weight.shape[-r:] if r else ()
    if any(o < 0 or o + a > b for o, a, b in zip(offset, k, kernel_shape)):
        raise ValueError(f"kernel {k} at offset {offset} does not fit in {kernel_shape}")
    out = np.zeros(weight.shape[: weight.ndim - r] + tuple(kernel_shape), dtype=weight.dtype)
    out[(Ellipsis,) + tuple(slice(o, o + a) for o, a in zip(offset, k))] = weight
    return out


def dilate_kernel(weight: np.ndarray, dilations: tuple[int, ...]) -> np.ndarray:
    """A dilated kernel as the dense kernel with d-1 zeros inserted between taps."""
    r = len(dilations)
    if all(d == 1 for d in dilations):
        return weight
    k = weight.shape[-r:]
    dense = tuple((a - 1) * d + 1 for a, d in zip(k, dilations))
    out = np.zeros(weight.shape[:-r] + dense, dtype=weight.dtype)
    out[(Ellipsis,) + tuple(slice(None, None, d) for d in dilations)] = weight
    return out


def densify(spec: ConvSpec) -> ConvSpec:
    """Same conv with dilation 1."""
    if all(d == 1 for d in spec.dilations):
        return spec
    return replace(spec, weight=dilate_kernel(spec.weight, spec.dilations), dilations=(1,) * spec.rank)


def regroup(spec: ConvSpec, group: int) -> ConvSpec:
    """Express a conv with group g1 as an equal conv with a coarser `group` (g1 % group == 0):
    the extra structure becomes zero blocks of the kernel."""
    g1 = spec.group
    if group == g1:
        return spec
    if g1 % group:
        raise ValueError(f"cannot regroup group={g1} to group={group}")
    cg1 = spec.weight.shape[1]
    opg1 = spec.cout // g1
    cg = spec.cin // group
    w = np.zeros((spec.cout, cg) + spec.kernel_shape)
    for o in range(spec.cout):
        j1 = o // opg1  # fine group of this output
        start = (j1 * cg1) % cg  # its input slice inside the coarse group
        w[o, start : start + cg1] = spec.weight[o]
    return replace(spec, weight=w, group=group)


# -- parallel: sum and concat --------------------------------------------------------------------
def _common_geometry(specs: list[ConvSpec], spatial: tuple[int, ...] | None = None):
    """Stride, dilation, merged kernel shape, begin pads, end pads and per-spec offsets for convs
    that read the same input and produce the same output grid; NotMergeable otherwise.

    Terms whose padding does not nest produce different output sizes for most input sizes; when
    the input's `spatial` size is known and they agree on it, the merge is exact for that size."""
    r = specs[0].rank
    if any(s.rank != r for s in specs):
        raise NotMergeable("terms have different spatial rank")
    if any(s.cin != specs[0].cin for s in specs):
        raise NotMergeable("terms read different channel counts")
    if len({s.strides for s in specs}) > 1:
        raise NotMergeable(f"terms have different strides {sorted({s.strides for s in specs})}")
    # a kernel of size 1 along an axis reads the same taps whatever its dilation there: adopt
    # the dilation of the others so a dilated K×K and a 1×1 merge without densifying
    specs = [_adopt_dilation(s, specs) for s in specs]
    dil = specs[0].dilations
    if len({s.dilations for s in specs}) > 1:
        specs = [densify(s) for s in specs]
        dil = (1,) * r
    pb = [max(s.pads_begin[a] for s in specs) for a in range(r)]
    unit = list(dil)
    # the window of each term, in input positions relative to n*s: [-pb_i, -pb_i + extent_i - 1]
    for a in range(r):
        if any((pb[a] - s.pads_begin[a]) % unit[a] for s in specs):
            specs = [densify(s) for s in specs]
            return _common_geometry(specs, spatial)
    ext = [max(s.extent[a] - s.pads_begin[a] for s in specs) + pb[a] for a in range(r)]
    kernel = tuple((e - 1) // unit[a] + 1 for a, e in enumerate(ext))
    c = {tuple(s.pads_begin[a] + s.pads_end[a] - s.extent[a] for a in range(r)) for s in specs}
    if len(c) == 1:
        (c,) = c
        pe = tuple(c[a] + ext[a] - pb[a] for a in range(r))
    else:
        pe = _end_pads_for_size(specs, spatial, ext, pb)
    offsets = [tuple((pb[a] - s.pads_begin[a]) // unit[a] for a in range(r)) for s in specs]
    return specs, kernel, tuple(pb), pe, offsets, dil


def _end_pads_for_size(specs, spatial, ext, pb) -> tuple[int, ...]:
    """End pads giving the merged window the terms' common output size on a known input size."""
    outs = {s.output_shape(spatial) for s in specs} if spatial is not None else set()
    if len(outs) != 1:
        raise NotMergeable("terms produce different output sizes (padding does not nest)")
    (out,) = outs
    stride = specs[0].strides
    pe = []
    for a, (h, o, e, b, st) in enumerate(zip(spatial, out, ext, pb, stride)):
        need = (o - 1) * st + e - h - b  # smallest end pad that still yields o outputs
        p = max(need, 0)
        if (h + b + p - e) // st + 1 != o:
            raise NotMergeable("terms' windows cannot share one output grid")
        pe.append(p)
    return tuple(pe)


def _adopt_dilation(spec: ConvSpec, specs: list[ConvSpec]) -> ConvSpec:
    dil = list(spec.dilations)
    for a in range(spec.rank):
        if spec.kernel_shape[a] == 1:
            others = {s.dilations[a] for s in specs if s.kernel_shape[a] > 1}
            if len(others) == 1:
                dil[a] = others.pop()
    return spec if tuple(dil) == spec.dilations else replace(spec, dilations=tuple(dil))


def add(specs: list[ConvSpec], spatial: tuple[int, ...] | None = None, inplace: bool = False) -> ConvSpec:
    """Sum of convs on the same input: embed each kernel at its offset in the largest window, bring
    all to the coarsest common group, add kernels and biases.

    Example: 3×3 pad 1 + 1×3 pad (0,1) + 3×1 pad (1,0) + identity → one 3×3 pad 1.

    inplace=True: the caller gives `specs` up; a first term that spans the window accumulates
    the others in its own weight when it may (see _reusable and affine_after).
    """
    if not specs:
        raise ValueError("add() needs at least one term")
    specs, kernel, pb, pe, offsets, dil = _common_geometry(list(specs), spatial)
    if len({s.cout for s in specs}) > 1:
        raise NotMergeable("terms have different output channel counts")
    g = reduce(math.gcd, (s.group for s in specs))
    w = b = None
    for i, (s, off) in enumerate(zip(specs, offsets)):
        s = regroup(s, g)
        if w is None and s.kernel_shape == kernel:
            # the first term spans the window: start from it rather than from zeros (one pass over
            # the kernel, not two); + 0.0 gives the very bits 0 + W would (−0 becomes +0)
            own = inplace and _reusable(s.weight, *(t.weight for j, t in enumerate(specs) if j != i))
            w, b = (s.weight if own else s.weight + 0.0), s.bias + 0.0
            continue
        if w is None:
            w, b = np.zeros((specs[0].cout, specs[0].cin // g) + kernel), np.zeros(specs[0].cout)
        # accumulate into the term's window in place: no full-size padded copy per term
        w[(slice(None), slice(None)) + tuple(slice(o, o + k) for o, k in zip(off, s.kernel_shape))] += s.weight
        b += s.bias
    return ConvSpec(w, b, strides=specs[0].strides, pads=pb + pe, dilations=dil, group=g)


def concat(specs: list[ConvSpec]) -> ConvSpec:
    """Convs on the same input whose outputs are concatenated on channels → one conv (group 1
    in general: concatenation does not keep grouped order)."""
    specs, kernel, pb, pe, offsets, dil = _common_geometry(list(specs))
    # concatenation interleaves groups, so the result is dense
    ws, bs = [], []
    for s, off in zip(specs, offsets):
        s = regroup(s, 1)
        ws.append(pad_kernel(s.weight, kernel, off))
        bs.append(s.bias)
    return ConvSpec(np.concatenate(ws), np.concatenate(bs), strides=specs[0].strides, pads=pb + pe, dilations=dil, group=1)


# -- sequential ----------------------------------------------------------------------------------
def compose(first: ConvSpec, second: ConvSpec, border_is_bias: bool = False, bias_tol: float = 0.0) -> ConvSpec:
    """second(first(x)) as one conv.

    W[o, i, u] = Σ_m Σ_v W2[o, m, v] · W1[m, i, u − s1·v]   (stride s1·s2, extent E1 + (E2−1)·s1)
    b[o]       = b2[o] + Σ_m Σ_v W2[o, m, v] · b1[m]

    Exactness at the border: the second conv's zero padding surrounds first(x). Moving it onto x
    is exact only when first maps a zero border to zero — a 1×1, stride-1, unpadded first conv
    with zero bias — or when the graph filled that border with first's bias (DBB's BN-and-pad:
    `border_is_bias=True`), which is exactly first applied to zero-padded x for a 1×1 first conv.
    `bias_tol` treats a first bias that small as zero (a border filled with a constant that equals
    the bias up to fp32 rounding leaves such a residue).
    """
    if first.cout != second.cin:
        raise NotMergeable(f"channel mismatch: first makes {first.cout}, second reads {second.cin}")
    if first.rank != second.rank:
        raise NotMergeable("different spatial rank")
    r = first.rank
    if any(second.pads):
        pointwise_first = first.is_pointwise()
        if not pointwise_first:
            raise NotMergeable("second conv pads the output of a conv that is not 1×1/stride 1/unpadded")
        if not border_is_bias and np.any(np.abs(first.bias) > bias_tol):
            raise NotMergeable("second conv's zero padding would meet the first conv's nonzero bias")
    if all(k == 1 for k in second.kernel_shape) and not any(second.pads):
        return _compose_pointwise_after(first, second)
    if first.is_pointwise():
        return _compose_pointwise_before(first, second)
    f, s = densify(first), densify(second)
    g = math.gcd(f.group, s.group)
    f, s = regroup(f, g), regroup(s, g)
    s1 = f.strides
    k1, k2 = f.kernel_shape, s.kernel_shape
    kernel = tuple(a + (b - 1) * st for a, b, st in zip(k1, k2, s1))
    cg_in = f.weight.shape[1]
    opg2 = s.cout // g
    opg1 = f.cout // g  # = second's in-channels per group
    w = np.zeros((s.cout, cg_in) + kernel)
    for j in range(g):
        w1 = f.weight[j * opg1 : (j + 1) * opg1]  # [M, I, *k1]
        w2 = s.weight[j * opg2 : (j + 1) * opg2]  # [O, M, *k2]
        blk = w[j * opg2 : (j + 1) * opg2]
        for v in product(*(range(k) for k in k2)):
            sl = tuple(slice(vv * st, vv * st + a) for vv, st, a in zip(v, s1, k1))
            blk[(slice(None), slice(None)) + sl] += np.tensordot(w2[(slice(None), slice(None)) + v], w1, axes=(1, 0))
    b = s.bias + (s.weight.reshape(s.cout, s.weight.shape[1], -1).sum(axis=2) * _grouped_bias(f, s, g)).sum(axis=1)
    pads = tuple(f.pads_begin[a] + s1[a] * s.pads_begin[a] for a in range(r)) + tuple(
        f.pads_end[a] + s1[a] * s.pads_end[a] for a in range(r)
    )
    strides = tuple(a * b_ for a, b_ in zip(s1, s.strides))
    return ConvSpec(w, b, strides=strides, pads=pads, group=g)


def _mix_channels(outer: np.ndarray, inner: np.ndarray, g: int) -> np.ndarray:
    """Per group j: Σ_m outer[o, m] · inner[m, i, *k] for outer [O, M/g] and inner [M, I/g, *k]."""
    o_g, m_g = outer.shape[0] // g, inner.shape[0] // g
    blocks = [np.tensordot(outer[j * o_g : (j + 1) * o_g], inner[j * m_g : (j + 1) * m_g], axes=(1, 0)) for j in range(g)]
    return np.concatenate(blocks)


def _compose_pointwise_after(first: ConvSpec, second: ConvSpec) -> ConvSpec:
    """1×1 unpadded second conv: mix first's output channels; first's geometry (dilation too) stays,
    strides multiply."""
    g = math.gcd(first.group, second.group)
    f, s = regroup(first, g), regroup(second, g)
    w2 = s.weight.reshape(s.cout, -1)
    w = _mix_channels(w2, f.weight, g)
    b = s.bias + (w2 * _grouped_bias(f, s, g)).sum(axis=1)
    strides = tuple(a * b_ for a, b_ in zip(f.strides, s.strides))
    return ConvSpec(w, b, strides=strides, pads=f.pads, dilations=f.dilations, group=g)


def _compose_pointwise_before(first: ConvSpec, second: ConvSpec) -> ConvSpec:
    """1×1, stride-1, unpadded first conv: mix second's input channels; second's geometry stays.
    (compose() has already checked the border condition for a padded second conv.)"""
    g = math.gcd(first.group, second.group)
    f, s = regroup(first, g), regroup(second, g)
    w1 = f.weight.reshape(f.cout, -1)  # [M, I/g]
    # W[o, i, k] = Σ_m W2[o, m, k] · W1[m, i] within each group
    w2t = np.moveaxis(s.weight, 1, -1)  # [O, *k, M/g]
    o_g, m_g = s.cout // g, f.cout // g
    blocks = [np.moveaxis(w2t[j * o_g : (j + 1) * o_g] @ w1[j * m_g : (j + 1) * m_g], -1, 1) for j in range(g)]
    w = np.concatenate(blocks)
    b = s.bias + (s.weight.reshape(s.cout, s.weight.shape[1], -1).sum(axis=2) * _grouped_bias(f, s, g)).sum(axis=1)
    return ConvSpec(w, b, strides=s.strides, pads=s.pads, dilations=s.dilations, group=g)


def _grouped_bias(f: ConvSpec, s: ConvSpec, g: int) -> np.ndarray:
    """first's bias as seen by each output of second: [Cout2, M/g]."""
    opg2 = s.cout // g
    mg = s.weight.shape[1]
    idx = (np.arange(s.cout)[:, None] // opg2) * mg + np.arange(mg)[None, :]
    return f.bias[idx]


def sparsest_group(spec: ConvSpec) -> ConvSpec:
    """The same conv with the largest group its kernel's zero pattern allows.

    A dense kernel that is block-diagonal (Split → convs → Concat, merged through channel
    selections) is a grouped conv; writing it so saves the zero MACs."""
    cout, cin = spec.cout, spec.cin
    if spec.group != 1 or spec.rank == 0:
        return spec
    g_max = math.gcd(cout, cin)
    if g_max == 1:
        return spec
    # A group g ≥ 2 dividing g_max is at least g_max's smallest divisor p > 1, so under it the
    # first output reads only inputs [0, cin/p) and the last only [cin − cin/p, cin). Those two
    # rows settle the common case, a dense kernel, without scanning the whole kernel.
    p = next(d for d in range(2, g_max + 1) if g_max % d == 0)
    w = spec.weight.reshape(cout, cin, -1)
    if np.any(w[0, cin // p :]) or np.any(w[-1, : cin - cin // p]):
        return spec
    nz = np.any(w != 0, axis=2)
    if nz.all():
        return spec
    for g in sorted((d for d in range(2, g_max + 1) if g_max % d == 0), reverse=True):
        og, ig = cout // g, cin // g
        blocks = np.zeros_like(nz)
        for j in range(g):
            blocks[j * og : (j + 1) * og, j * ig : (j + 1) * ig] = True
        if not np.any(nz & ~blocks):
            w = np.stack([spec.weight[j * og : (j + 1) * og, j * ig : (j + 1) * ig] for j in range(g)])
            return replace(spec, weight=w.reshape((cout, ig) + spec.kernel_shape), group=g)
    return spec


# -- a conv on a fixed input size as a matrix ----------------------------------------------------
def conv_as_matrix(spec: ConvSpec, in_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The conv applied to inputs of spatial shape `in_shape` as one dense affine map of the
    flattened input (RepMLP's locality injection: a conv is a sparse, weight-shared FC):

        flatten(conv(x)) = M @ flatten(x) + b      M: [Cout·prod(out), Cin·prod(in_shape)]
                                                   b: [Cout·prod(out)], the bias once per position

    with out = spec.output_shape(in_shape) and row-major flattening of [C, *spatial] (what
    Flatten(axis=1) and Reshape do). For output position n, kernel tap u, stride s, begin pad p
    and dilation d the input position read is q = n·s − p + u·d per axis; taps with q outside the
    input read zero padding and contribute nothing:

        M[o·P + n, c·Q + q] = W[o, c − (o // (Cout/group))·(Cin/group), u]

    Built one kernel tap at a time, vectorized over channels and positions.
    """
    in_shape = tuple(int(v) for v in in_shape)
    if len(in_shape) != spec.rank:
        raise ValueError(f"input shape {in_shape} does not match kernel rank {spec.rank}")
    out_shape = spec.output_shape(in_shape)
    if any(v <= 0 for v in out_shape) or any(v <= 0 for v in in_shape):
        raise ValueError(f"conv on {in_shape} produces an empty output {out_shape}")
    npos_out, npos_in = math.prod(out_shape), math.prod(in_shape)
    cout, cg = spec.cout, spec.weight.shape[1]
    m = np.zeros((cout, npos_out, spec.cin, npos_in))
    rows = np.arange(cout)[:, None, None]
    chans = ((np.arange(cout) // (cout // spec.group)) * cg)[:, None, None] + np.arange(cg)[None, :, None]
    grid = np.indices(out_shape).reshape(spec.rank, npos_out)  # output position n, per axis
    for u in np.ndindex(*spec.kernel_shape):
        q = (grid * np.array(spec.strides)[:, None] - np.array(spec.pads_begin)[:, None]
             + (np.array(u) * np.array(spec.dilations))[:, None]).astype(np.int64)
        inside = np.all((q >= 0) & (q < np.array(in_shape)[:, None]), axis=0)
        n = np.flatnonzero(inside)
        qflat = np.ravel_multi_index(tuple(q[:, inside]), in_shape) if spec.rank else np.zeros(n.size, np.int64)
        tap = spec.weight[(slice(None), slice(None)) + u]  # [Cout, Cin/group]
        m[rows, n[None, None, :], chans, qflat[None, None, :]] += tap[:, :, None]
    return m.reshape(cout * npos_out, spec.cin * npos_in), np.repeat(spec.bias, npos_out)


# -- matrices: MatMul / Gemm / Einsum on the last axis ---------------------------------------------
# A Linear on tokens [..., Cin] → [..., Cout] is the rank-0 ConvSpec y = W·x + b with W [Cout, Cin]:
# the same object BatchNorm1d heads already use, so affine_after / affine_before / add / compose
# apply unchanged. Only the reading (MatMul keeps its weight as [Cin, Cout], Gemm may transpose and
# scale it) and the writing differ.
def matmul_spec(weight, bias=None) -> ConvSpec:
    """MatMul(x, weight) (+ bias) with weight [Cin, Cout], as the rank-0 ConvSpec W [Cout, Cin]."""
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2:
        raise NotMergeable(f"MatMul weight has rank {w.ndim}, not 2")
    return ConvSpec(w.T, bias)


def gemm_spec(b, c=None, trans_b: bool = False, alpha: float = 1.0, beta: float = 1.0) -> ConvSpec:
    """Gemm(x, b, c) = alpha·x·op(b) + beta·c with transA=0, op(b) = bᵀ if trans_b: W [Cout, Cin]
    = alpha·(b if trans_b else bᵀ); c must be a scalar or a per-output vector ([Cout] or [1, Cout])."""
    w = np.asarray(b, dtype=np.float64) * float(alpha)
    if w.ndim != 2:
        raise NotMergeable(f"Gemm weight has rank {w.ndim}, not 2")
    w = w if trans_b else w.T
    bias = None
    if c is not None:
        c = np.asarray(c, dtype=np.float64)
        if c.size not in (1, w.shape[0]) or (c.ndim == 2 and c.shape[0] != 1) or c.ndim > 2:
            raise NotMergeable(f"Gemm bias of shape {list(c.shape)} is not a per-output vector")
        bias = np.broadcast_to(c.reshape(-1) * float(beta), (w.shape[0],))
    return ConvSpec(w, bias)


def matmul_weight(spec: ConvSpec) -> np.ndarray:
    """The [Cin, Cout] right operand of the MatMul computing the rank-0 `spec` (groups expanded)."""
    if spec.rank != 0:
        raise NotMergeable("not a matrix (spatial kernel)")
    return np.ascontiguousarray(regroup(spec, 1).weight.T)


def last_axis_vector(c: np.ndarray, rank: int | None) -> np.ndarray | None:
    """The per-channel vector of a constant broadcast against a tensor of `rank` whose channels lie
    on the LAST axis (tokens [B, N, C], a Linear's output): c must be 1 on every other axis and
    must not raise the tensor's rank. A scalar (or all-ones shape) gives a length-1 vector. None when
    it varies along another axis (a per-token constant is not a per-channel affine)."""
    c = np.asarray(c)
    if c.size == 1:
        if rank is not None and c.ndim > rank:
            return None
        return c.reshape(1)
    if rank is None or c.ndim > rank or c.ndim == 0:
        return None
    if any(d != 1 for d in c.shape[:-1]):
        return None
    return c.reshape(-1)


def axis_vector(c: np.ndarray, rank: int, axis: int) -> np.ndarray | None:
    """As last_axis_vector for channels on `axis` of a rank-`rank` tensor (numpy broadcasting:
    c's shape is right-aligned)."""
    c = np.asarray(c)
    if c.size == 1:
        return None if c.ndim > rank else c.reshape(1)
    if c.ndim > rank:
        return None
    shape = (1,) * (rank - c.ndim) + tuple(c.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != axis % rank):
        return None
    return c.reshape(-1)


def einsum_matrix(equation: str, weight_rank: int = 2) -> bool | None:
    """Whether Einsum `equation` with a constant second operand is a plain matrix product on the
    last axis, x[..., i]·W → y[..., o]: returns whether W is written [o, i] (transposed) rather
    than [i, o]; None when it is not such a product. Accepted: '...i,io->...o', 'bni,io->bno', 'bni,oi->bno'
    (any letters; the left operand's labels other than i pass through in order)."""
    eq = equation.replace(" ", "")
    if "->" not in eq or weight_rank != 2:
        return None
    lhs, out = eq.split("->")
    ops_ = lhs.split(",")
    if len(ops_) != 2:
        return None
    a, w = ops_
    if len(w) != 2 or "." in w or not a or len(set(w)) != 2:
        return None
    i = a[-1]
    if i == "." or i not in w or a.count(i) != 1:
        return None
    o = w[1] if w[0] == i else w[0]
    if o in a or out != a[:-1] + o:
        return None
    if len(set(a.replace(".", ""))) != len(a.replace(".", "")):
        return None  # a repeated label on x (a diagonal) is not a matrix product
    return w[0] == o


def pointwise_spec(weight, bias=None, group: int = 1, strides=(), pads=()) -> ConvSpec:
    """A Conv whose kernel is 1 on every spatial axis, stride 1 and unpadded, as the rank-0 spec it
    is on the channel axis alone: every position's channel vector goes through the same matrix
    (block-diagonal for group > 1). weight [Cout, Cin/group, 1, ..., 1]. NotMergeable otherwise
    (a larger kernel or a stride mixes positions; padding adds positions)."""
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim < 2 or any(int(k) != 1 for k in w.shape[2:]):
        raise NotMergeable(f"Conv kernel {list(w.shape[2:])} is not 1 on every spatial axis")
    if any(int(s) != 1 for s in strides) or any(int(p) != 0 for p in pads):
        raise NotMergeable("pointwise Conv with a stride or padding changes the positions")
    return ConvSpec(w.reshape(w.shape[0], w.shape[1]), bias, group=group)


def placement_spec(cols, cout: int) -> ConvSpec:
    """y[..., cols[j]] = x[..., j], every other output channel 0 (zero-padding by index assignment,
    `z = zeros(..., cout); z[..., cols] = x`), as the rank-0 spec W [cout, len(cols)] with W[cols[j], j]
    = 1. NotMergeable when a column repeats (ScatterND leaves the winner undefined) or is out of range."""
    cols = np.asarray(cols, dtype=np.int64).reshape(-1)
    cols = np.where(cols < 0, cols + cout, cols)
    if np.any(cols < 0) or np.any(cols >= cout):
        raise NotMergeable(f"placement column out of range [0, {cout})")
    if len(np.unique(cols)) != len(cols):
        raise NotMergeable("placement writes one column twice")
    w = np.zeros((cout, len(cols)))
    w[cols, np.arange(len(cols))] = 1.0
    return ConvSpec(w, None)


def scatter_columns(indices, updates_shape, data_shape) -> np.ndarray | None:
    """The columns c of ScatterND(data, indices, updates) when it only places whole last-axis rows:
    indices [*data_shape[:-1], m, rank] with indices[p, j] = (p, c[j]) for every leading position p
    (what `z[..., cols] = y` exports as). None for any other scatter."""
    idx = np.asarray(indices)
    r = len(data_shape)
    if idx.ndim != r + 1 or idx.shape[-1] != r or tuple(updates_shape) != tuple(idx.shape[:-1]):
        return None
    if tuple(updates_shape[:-1]) != tuple(data_shape[:-1]):
        return None
    lead = np.stack(np.meshgrid(*[np.arange(d) for d in data_shape[:-1]], indexing="ij"), axis=-1) if r > 1 \
        else np.zeros((0,), dtype=np.int64)
    if r > 1 and not np.array_equal(idx[..., :-1], np.broadcast_to(lead[..., None, :], idx[..., :-1].shape)):
        return None
    cols = idx[..., -1].reshape(-1, idx.shape[-2])
    if not np.all(cols == cols[:1]):
        return None
    return cols[0].astype(np.int64)


def scatter_rows(indices, updates_rank: int, data_rank: int) -> np.ndarray | None:
    """The rows c of ScatterND(data, indices, updates) when it places whole slices along axis 0
    (`z[cols] = y`): indices [m, 1] and updates of data's rank. ScatterND itself requires updates
    to be [m, *data.shape[1:]] (a run-time error otherwise), so the shapes need not be known. None
    for any other scatter."""
    idx = np.asarray(indices)
    if idx.ndim != 2 or idx.shape[1] != 1 or updates_rank != data_rank:
        return None
    return idx[:, 0].astype(np.int64)
