#!/usr/bin/env python
"""Differential fuzzer for onnxrep's merges: random linear multi-branch blocks, checked against
ONNX Runtime before and after ``onnxrep.optimize``.

Usage::

    python tools/fuzz_merge.py --cases 2000 --seed 0 [--jobs N] [--out DIR]
    python tools/fuzz_merge.py --seed 0 --case 17 [--out DIR]       # replay one case (verbose)

Every case is generated from ``numpy.random.default_rng([seed, case])`` alone, so ``--seed S
--case I`` rebuilds exactly the graph that case I of campaign S ran; failing models are also
written to ``DIR/s{S}_c{I}.orig.onnx`` (and ``.opt.onnx`` when optimize returned one) with a
``.json`` describing the failure.

What a case is (graphs built with onnx.helper, fp32, static shapes, opset 17):

* ``block``: a source tensor (the graph input, or Relu/Conv of it) feeding 1–5 branch terms —
  Conv (kernels 1–7, 1×K/K×1, stride 1/2, groups up to depthwise, dilation, bias or not,
  symmetric or asymmetric pads) with optional BN / per-channel Mul/Add/Sub/Div after it, a BN-only
  branch, identity, AveragePool (count_include_pad 0/1, ceil_mode, pads), 1×1→K×K sequential convs
  with/without bias and with the padding on either conv, DBB's Sub→Pad→Add border fill, Pad→Conv,
  BN→Conv, nested sub-blocks (a sum followed by an affine or a conv) — combined by a random tree of
  Add/Sub/Sum, optionally followed by BN, a layer scale and Relu.
* ``split_concat``: Split (or Slices) on channels → a conv (or nothing) per part → Concat,
  in order or permuted.
* ``concat``: convs / identity / pools on one input concatenated on channels (or, as poison, on a
  spatial axis).

Poison mixed in at random: an intermediate that is also a graph output or is read by a second
branch, shared weight initializers, paddings that give the same output size but do not nest
(stride 2), mismatched strides with equal output sizes, broadcasting terms (1×1 spatial or one
channel), spatial (non-per-channel) Mul constants, non-zero / reflect Pad, a border fill with the
wrong value, Add(t, t).

Oracle: ORT (graph optimizations disabled) on the original and on the optimized model with the
same seeded input; every output must satisfy max|ref − got| ≤ RTOL·max|ref| + ATOL, and
``onnx.checker.check_model(full_check=True)`` must accept the optimized model. A generated graph
that the checker or ORT refuses is not a case: the generator draws again (same rng stream).

Classification by the optimized op histogram ("linear ops" = every op except Relu and Constant):
  merged    — the linear ops left are all Conv and there are at most 1 + (prologue Convs) of them;
  partial   — fewer linear ops than before, but not "merged";
  untouched — as many linear ops as before.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RTOL = 1e-5
ATOL = 1e-6
OPSET = 17
IR_VERSION = 8
MAX_TRIES = 64
ROUNDING_FACTOR = 4.0  # generator redraws per case before giving up


# ------------------------------------------------------------------------------------------------
# graph builder
# ------------------------------------------------------------------------------------------------
class Builder:
    """Nodes and initializers with the shape of every tensor tracked as the graph is built."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.producer_op: dict[str, str] = {}
        self.n = 0
        self.tags: Counter = Counter()
        self.internal: list[str] = []  # tensors produced inside the block (fan-out candidates)

    def fresh(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n}"

    def const(self, arr, prefix: str = "c", dtype=np.float32) -> str:
        name = self.fresh(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(arr).astype(dtype), name))
        return name

    def node(self, op: str, inputs: list[str], shape, internal: bool = True, **attrs) -> str:
        out = self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"n_{out}", **attrs))
        self.shapes[out] = tuple(int(v) for v in shape)
        self.producer_op[out] = op
        if internal:
            self.internal.append(out)
        return out

    # -- parameter draws -------------------------------------------------------------------------
    def weight(self, cout: int, cin_g: int, kernel) -> np.ndarray:
        fan_in = cin_g * math.prod(kernel)
        return (self.rng.standard_normal((cout, cin_g) + tuple(kernel)) / math.sqrt(fan_in)).astype(np.float32)

    def bn_params(self, c: int):
        r = self.rng
        gamma = r.normal(1.0, 0.4, c)
        if r.random() < 0.1:
            gamma[r.integers(c)] = 0.0  # a dead channel
        beta = r.normal(0.0, 0.5, c)
        mean = r.normal(0.0, 0.5, c)
        var = r.uniform(0.2, 2.0, c)
        eps = float(r.choice([1e-5, 1e-3, 1e-1]))
        return [p.astype(np.float32) for p in (gamma, beta, mean, var)], eps

    # -- ops -------------------------------------------------------------------------------------
    def conv(self, x: str, cout: int, kernel, strides, pads, dils, group: int, bias: bool | np.ndarray = True,
             weight_name: str | None = None) -> str:
        shape = self.shapes[x]
        r = len(kernel)
        cin = shape[1]
        w = weight_name or self.const(self.weight(cout, cin // group, kernel), "w")
        ins = [x, w]
        if bias is not False and bias is not None:
            b = bias if isinstance(bias, np.ndarray) else self.rng.normal(0, 0.5, cout)
            ins.append(self.const(b, "b"))
        elif self.rng.random() < 0.1:
            ins.append("")  # an omitted optional input
        out_sp = conv_out(shape[2:], kernel, strides, pads, dils)
        attrs = dict(kernel_shape=list(kernel), strides=list(strides), pads=list(pads), group=group)
        if any(d != 1 for d in dils) or self.rng.random() < 0.5:
            attrs["dilations"] = list(dils)
        if self.rng.random() < 0.15:
            del attrs["kernel_shape"]  # optional in ONNX: inferred from the weight
        if self.rng.random() < 0.5:
            for mode in ("SAME_UPPER", "SAME_LOWER", "VALID"):
                if tuple(pads) == auto_pads(mode, shape[2:], kernel, strides, dils):
                    del attrs["pads"]
                    attrs["auto_pad"] = mode
                    self.tags[f"conv_auto_pad_{mode}"] += 1
                    break
        self.tags["conv"] += 1
        if group > 1:
            self.tags["conv_grouped" if group < cin else "conv_depthwise"] += 1
        if any(d > 1 for d in dils):
            self.tags["conv_dilated"] += 1
        if any(s > 1 for s in strides):
            self.tags["conv_stride2"] += 1
        if pads[:r] != pads[r:]:
            self.tags["conv_asym_pads"] += 1
        if r == 2 and kernel[0] != kernel[1]:
            self.tags["conv_1xK"] += 1
        return self.node("Conv", ins, (shape[0], cout) + out_sp, **attrs)

    def bn(self, x: str, params=None) -> str:
        c = self.shapes[x][1]
        (g, b, m, v), eps = params or self.bn_params(c)
        ins = [x] + [self.const(p, "bn") for p in (g, b, m, v)]
        self.tags["bn"] += 1
        return self.node("BatchNormalization", ins, self.shapes[x], epsilon=eps)

    def per_channel_shape(self, c: int, rank: int):
        """A constant shape that broadcasts per channel against [N, C, *spatial]."""
        r = self.rng.random()
        if r < 0.15:
            return (1,)
        if r < 0.3:
            return ()
        if r < 0.6:
            return (c,) + (1,) * rank
        return (1, c) + (1,) * rank

    def affine(self, x: str, poison: bool = False, widen: int | None = None) -> str:
        """BN or a per-channel Mul/Add/Sub/Div (layer scale) on x. `widen` (x has one channel):
        a [1, widen, 1, ...] constant that broadcasts x to `widen` channels."""
        shape = self.shapes[x]
        c, rank = shape[1], len(shape) - 2
        kind = self.rng.choice(["bn", "mul", "mul", "add", "sub", "rsub", "div"])
        if kind == "bn" and not widen:
            return self.bn(x)
        if widen:
            assert c == 1
            kind = "mul" if kind == "bn" else kind
            cshape = (1, widen) + (1,) * rank if self.rng.random() < 0.7 else (widen,) + (1,) * rank
            shape = (shape[0], widen) + shape[2:]
            self.tags["poison_channel_widening_affine"] += 1
        elif poison and rank and self.rng.random() < 0.3:
            cshape = (1, 1) + shape[2:]  # a spatial constant: not a per-channel affine
            self.tags["poison_spatial_const"] += 1
        elif poison and rank and self.rng.random() < 0.3:
            # varies along the last axis (or the one before): looks per-channel when W == C
            cshape = (shape[-1],) if rank == 1 or self.rng.random() < 0.5 else (shape[-2], 1)
            self.tags["poison_misaligned_const"] += 1
        else:
            cshape = self.per_channel_shape(c, rank)
        if kind in ("mul", "div"):
            v = self.rng.uniform(0.3, 1.5, cshape) * self.rng.choice([-1, 1], cshape)
        else:
            v = self.rng.normal(0, 0.5, cshape)
        cname = self.const(v, "ls")
        self.tags[f"affine_{kind}"] += 1
        if kind == "mul":
            ins = [x, cname] if self.rng.random() < 0.7 else [cname, x]
            return self.node("Mul", ins, shape)
        if kind == "add":
            ins = [x, cname] if self.rng.random() < 0.7 else [cname, x]
            return self.node("Add", ins, shape)
        if kind == "sub":
            return self.node("Sub", [x, cname], shape)
        if kind == "rsub":
            return self.node("Sub", [cname, x], shape)
        return self.node("Div", [x, cname], shape)

    def pad(self, x: str, pads_sp, mode: str = "constant", value: float = 0.0) -> str:
        shape = self.shapes[x]
        r = len(shape) - 2
        full = [0, 0] + list(pads_sp[:r]) + [0, 0] + list(pads_sp[r:])
        ins = [x, self.const(np.array(full, np.int64), "pads", np.int64)]
        if value != 0.0 or self.rng.random() < 0.3:
            ins.append(self.const(np.array(value, np.float32), "pv"))
        out = tuple(shape[:2]) + tuple(h + a + b for h, a, b in zip(shape[2:], pads_sp[:r], pads_sp[r:]))
        attrs = {"mode": mode} if mode != "constant" or self.rng.random() < 0.3 else {}
        self.tags["pad"] += 1
        return self.node("Pad", ins, out, **attrs)


def auto_pads(mode, spatial, kernel, strides, dils) -> tuple[int, ...]:
    """The explicit pads ONNX's auto_pad `mode` stands for."""
    r = len(kernel)
    if mode == "VALID":
        return (0,) * (2 * r)
    begins, ends = [], []
    for h, k, s, d in zip(spatial, kernel, strides, dils):
        total = max((-(-h // s) - 1) * s + (k - 1) * d + 1 - h, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else big)
        ends.append(big if mode == "SAME_UPPER" else small)
    return tuple(begins + ends)


def noise(b: Builder, t: str) -> str:
    """An op that computes its input unchanged, as exporters leave behind."""
    rng = b.rng
    shape = b.shapes[t]
    kind = str(rng.choice(["Identity", "Dropout", "add0", "mul1", "sub0", "div1", "pad0"]))
    b.tags[f"noise_{kind}"] += 1
    if kind == "Identity":
        return b.node("Identity", [t], shape)
    if kind == "Dropout":
        ins = [t]
        if rng.random() < 0.5:
            ins += [b.const(np.array(0.3, np.float32), "ratio"), b.const(np.array(False), "train", np.bool_)]
        return b.node("Dropout", ins, shape)
    if kind == "pad0":
        if len(shape) < 3:
            return b.node("Identity", [t], shape)
        return b.node("Pad", [t, b.const(np.zeros(2 * len(shape), np.int64), "pads", np.int64)], shape)
    op = {"add0": "Add", "mul1": "Mul", "sub0": "Sub", "div1": "Div"}[kind]
    v = 0.0 if op in ("Add", "Sub") else 1.0
    cshape = (1,) * len(shape) if rng.random() < 0.5 else ()
    return b.node(op, [t, b.const(np.full(cshape, v), "neutral")], shape)


def conv_out(spatial, kernel, strides, pads, dils, ceil: bool = False):
    r = len(kernel)
    out = []
    for a in range(r):
        ext = (kernel[a] - 1) * dils[a] + 1
        num = spatial[a] + pads[a] + pads[r + a] - ext
        out.append((-(-num // strides[a]) if ceil else num // strides[a]) + 1)
    return tuple(out)


# ------------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------------
@dataclass
class Block:
    """What all terms of one sum share: the source, channel counts and the output grid."""

    src: str
    cin: int
    cout: int
    rank: int
    in_sp: tuple
    stride: tuple
    delta: tuple  # total pad − (extent − 1) per axis for the canonical (mergeable) geometry
    out_sp: tuple = ()
    poison: float = 0.0  # probability of a poisoned choice at each opportunity

    def __post_init__(self):
        self.out_sp = tuple((h - 1 + d) // s + 1 for h, d, s in zip(self.in_sp, self.delta, self.stride))

    @property
    def identity_ok(self) -> bool:
        return self.cin == self.cout and all(s == 1 for s in self.stride) and all(d == 0 for d in self.delta)


def draw_kernel(rng, rank: int, small: bool = False):
    sizes = [1, 2, 3, 3, 3, 4, 5, 5, 6, 7] if not small else [1, 1, 2, 3, 3]
    if rank == 2 and rng.random() < 0.2:  # 1×K / K×1
        k = int(rng.choice([3, 5, 7] if not small else [3]))
        return (1, k) if rng.random() < 0.5 else (k, 1)
    if rank == 3:
        sizes = [1, 1, 2, 3, 3]
    k = int(rng.choice(sizes))
    if rank >= 2 and rng.random() < 0.08:
        return tuple(int(rng.choice(sizes)) for _ in range(rank))
    return (k,) * rank


def split_pad(rng, total: int) -> tuple[int, int]:
    if total <= 0:
        return 0, 0
    if rng.random() < 0.25:
        pb = int(rng.integers(0, total + 1))
    else:
        pb = total // 2 if rng.random() < 0.7 else total - total // 2
    return pb, total - pb


def solve_pads(rng, in_sp, target, kernel, strides, dils, canonical_delta=None, poison: bool = False):
    """Pads (begins + ends) that make a conv of this geometry produce `target`; None if impossible.
    With a canonical delta the total pad is extent−1+delta when that works (mergeable alignment);
    `poison` prefers another total with the same output size (stride > 1 only)."""
    r = len(kernel)
    begins, ends = [], []
    for a in range(r):
        ext = (kernel[a] - 1) * dils[a] + 1
        s = strides[a]
        t_min = (target[a] - 1) * s + ext - in_sp[a]
        options = [t for t in range(t_min, t_min + s) if t >= 0]
        if not options:
            return None
        want = ext - 1 + canonical_delta[a] if canonical_delta is not None else None
        if poison and len(options) > 1:
            others = [t for t in options if t != want]
            total = int(rng.choice(others))
        elif want in options:
            total = want
        else:
            total = int(rng.choice(options))
        pb, pe = split_pad(rng, total)
        begins.append(pb)
        ends.append(pe)
    return tuple(begins + ends)


def draw_dils(rng, rank: int):
    if rng.random() < 0.15:
        d = int(rng.choice([2, 2, 3]))
        if rank >= 2 and rng.random() < 0.2:
            return tuple(int(rng.choice([1, 2])) for _ in range(rank))
        return (d,) * rank
    return (1,) * rank


def groups_for(rng, cin: int, cout: int) -> int:
    g_max = math.gcd(cin, cout)
    divs = [d for d in range(1, g_max + 1) if g_max % d == 0]
    r = rng.random()
    if r < 0.55 or len(divs) == 1:
        return 1
    if r < 0.8:
        return g_max  # depthwise when cin == cout
    return int(rng.choice(divs))


# ------------------------------------------------------------------------------------------------
# terms
# ------------------------------------------------------------------------------------------------
def conv_geom(b: Builder, blk: Block, x: str, cout: int, stride=None, small=False, poison=None):
    """A conv on x that lands on blk.out_sp: (kernel, strides, pads, dils) or None."""
    rng = b.rng
    in_sp = b.shapes[x][2:]
    poison = rng.random() < blk.poison if poison is None else poison
    for _ in range(20):
        kernel = draw_kernel(rng, blk.rank, small)
        dils = draw_dils(rng, blk.rank) if max(kernel) > 1 else (1,) * blk.rank
        strides = tuple(stride) if stride is not None else blk.stride
        if poison and stride is None and rng.random() < 0.5:
            strides = tuple(int(rng.choice([1, 2])) for _ in range(blk.rank)) if rng.random() < 0.3 else \
                (int(rng.choice([1, 2])),) * blk.rank
        delta = blk.delta if in_sp == blk.in_sp else None
        pads = solve_pads(rng, in_sp, blk.out_sp, kernel, strides, dils, delta, poison)
        if pads is None:
            continue
        if strides != blk.stride:
            b.tags["poison_stride"] += 1
        return kernel, strides, pads, dils
    return None


def term_conv(b: Builder, blk: Block) -> str | None:
    rng = b.rng
    geom = conv_geom(b, blk, blk.src, blk.cout)
    if geom is None:
        return None
    kernel, strides, pads, dils = geom
    cout = blk.cout
    if blk.cout > 1 and rng.random() < 0.3 * blk.poison:
        cout = 1  # broadcasts over channels
        b.tags["poison_channel_broadcast"] += 1
    widen = cout > 1 and rng.random() < 0.02
    if widen:
        cout = 1
    g = groups_for(rng, blk.cin, cout)
    y = b.conv(blk.src, cout, kernel, strides, pads, dils, g, bias=rng.random() < 0.5)
    if rng.random() < 0.6:
        y = b.bn(y)
    if widen:
        y = b.affine(y, widen=blk.cout)
    elif rng.random() < 0.25:
        y = b.affine(y, poison=rng.random() < blk.poison)
    return y


def term_widen(b: Builder, blk: Block) -> str | None:
    """A per-channel constant that broadcasts a one-channel source to cout channels."""
    if blk.cin != 1 or blk.cout == 1 or not all(s == 1 for s in blk.stride) or any(blk.delta):
        return None
    return b.affine(blk.src, widen=blk.cout)


def term_other_source(b: Builder, blk: Block) -> str | None:
    """A conv on the graph input x while the other terms read src = f(x): mergeable only when the
    walk can compose through f (src private to one reader), never when src is shared."""
    if blk.src == "x" or b.shapes["x"][2:] != blk.in_sp:
        return None
    cin = b.shapes["x"][1]
    geom = conv_geom(b, blk, "x", blk.cout)
    if geom is None:
        return None
    b.tags["other_source"] += 1
    kernel, strides, pads, dils = geom
    return b.conv("x", blk.cout, kernel, strides, pads, dils, groups_for(b.rng, cin, blk.cout), bias=b.rng.random() < 0.5)


def term_identity(b: Builder, blk: Block) -> str | None:
    if not blk.identity_ok:
        return None
    b.tags["identity"] += 1
    return blk.src


def term_bn(b: Builder, blk: Block) -> str | None:
    if not blk.identity_ok:
        return None
    b.tags["bn_branch"] += 1
    return b.bn(blk.src) if b.rng.random() < 0.8 else b.affine(blk.src)


def term_avgpool(b: Builder, blk: Block) -> str | None:
    rng = b.rng
    if blk.cin != blk.cout:
        return None
    in_sp = b.shapes[blk.src][2:]
    for _ in range(20):
        k = tuple([int(rng.choice([1, 2, 3, 3, 4, 5]))] * blk.rank)
        if blk.rank == 2 and rng.random() < 0.15:
            k = (int(rng.integers(1, 6)), int(rng.integers(1, 6)))
        strides = blk.stride
        poison = rng.random() < blk.poison
        if poison and rng.random() < 0.5:
            strides = (int(rng.choice([1, 2])),) * blk.rank
        pads = solve_pads(rng, in_sp, blk.out_sp, k, strides, (1,) * blk.rank, blk.delta, poison)
        if pads is None or any(p >= kk for p, kk in zip(pads, k + k)):
            continue
        ceil = rng.random() < 0.1
        if conv_out(in_sp, k, strides, pads, (1,) * blk.rank, ceil) != blk.out_sp:
            ceil = False
        cip = int(rng.random() < 0.6)
        attrs = dict(kernel_shape=list(k), strides=list(strides), pads=list(pads))
        if cip or rng.random() < 0.5:
            attrs["count_include_pad"] = cip
        if ceil:
            attrs["ceil_mode"] = 1
            b.tags["avgpool_ceil"] += 1
        b.tags[f"avgpool_cip{cip}" + ("_padded" if any(pads) else "")] += 1
        x = blk.src
        if any(pads) and not ceil and rng.random() < 0.2:  # the padding as a Pad op before the pool
            x = b.pad(x, pads)
            attrs["pads"] = [0] * len(pads)
            b.tags["pad_then_pool"] += 1
        y = b.node("AveragePool", [x], (b.shapes[blk.src][0], blk.cin) + blk.out_sp, **attrs)
        if rng.random() < 0.5:
            y = b.bn(y)
        return y
    return None


def term_seq(b: Builder, blk: Block) -> str | None:
    """1×1 → K×K (padding on the second, or on the first), K×K → 1×1, with/without bias and BN."""
    rng = b.rng
    x = blk.src
    cmid = int(rng.choice([blk.cin, blk.cout, 2 * blk.cout, max(1, blk.cin // 2), 3]))
    variant = rng.choice(["pad_second", "pad_second", "pad_first", "kxk_then_1x1", "stride_first", "conv_then_pool"])
    b.tags[f"seq_{variant}"] += 1
    one = (1,) * blk.rank
    zero = (0,) * (2 * blk.rank)
    if variant == "conv_then_pool":
        geom = conv_geom(b, blk, x, blk.cout)
        if geom is None:
            return None
        k, s, p, d = geom
        y = b.conv(x, blk.cout, k, s, p, d, groups_for(rng, blk.cin, blk.cout), bias=rng.random() < 0.5)
        kp = int(rng.choice([2, 3, 3, 5]))
        tot = kp - 1
        pb, pe = split_pad(rng, tot)
        r = blk.rank
        cip = int(rng.random() < 0.7)
        y = b.node("AveragePool", [y], b.shapes[y], kernel_shape=[kp] * r, pads=[pb] * r + [pe] * r,
                   count_include_pad=cip)
        b.tags[f"avgpool_cip{cip}_padded"] += 1
    elif variant == "kxk_then_1x1":
        geom = conv_geom(b, blk, x, cmid)
        if geom is None:
            return None
        k, s, p, d = geom
        y = b.conv(x, cmid, k, s, p, d, groups_for(rng, blk.cin, cmid), bias=rng.random() < 0.6)
        if rng.random() < 0.5:
            y = b.bn(y)
        y = b.conv(y, blk.cout, one, one, zero, one, groups_for(rng, cmid, blk.cout), bias=rng.random() < 0.6)
    elif variant == "pad_first":
        # ExpandNet-style: the first (1×1) conv carries the padding, the K×K reads no padding
        kernel = draw_kernel(rng, blk.rank, small=True)
        dils = draw_dils(rng, blk.rank) if max(kernel) > 1 else one
        ext = tuple((kk - 1) * dd + 1 for kk, dd in zip(kernel, dils))
        mid_target = tuple((o - 1) * s + e for o, s, e in zip(blk.out_sp, blk.stride, ext))
        pads1 = []
        for a in range(blk.rank):
            total = mid_target[a] - blk.in_sp[a]
            if total < 0:
                return None
            pads1.append(split_pad(rng, total))
        pads1 = tuple(p[0] for p in pads1) + tuple(p[1] for p in pads1)
        y = b.conv(x, cmid, one, one, pads1, one, groups_for(rng, blk.cin, cmid), bias=rng.random() < 0.4)
        if rng.random() < 0.3:
            y = b.bn(y)
        y = b.conv(y, blk.cout, kernel, blk.stride, zero, dils, groups_for(rng, cmid, blk.cout), bias=rng.random() < 0.5)
        if b.shapes[y][2:] != blk.out_sp:
            return None
    else:
        s1 = blk.stride if variant == "stride_first" else one
        y = b.conv(x, cmid, one, s1, zero, one, groups_for(rng, blk.cin, cmid), bias=rng.random() < 0.5)
        if rng.random() < 0.5:
            y = b.bn(y)
        s2 = one if variant == "stride_first" else blk.stride
        geom = conv_geom(b, blk, y, blk.cout, stride=s2, poison=False)
        if geom is None:
            return None
        k, s, p, d = geom
        y = b.conv(y, blk.cout, k, s, p, d, groups_for(rng, cmid, blk.cout), bias=rng.random() < 0.5)
    if rng.random() < 0.4:
        y = b.bn(y)
    return y


def term_border_fill(b: Builder, blk: Block) -> str | None:
    """DBB's 1×1-BN → BN-and-pad → K×K: Sub(c) → Pad(0) → Add(c) with c = the bias before it."""
    rng = b.rng
    x = blk.src
    one = (1,) * blk.rank
    zero = (0,) * (2 * blk.rank)
    cmid = int(rng.choice([blk.cin, blk.cout, 2 * blk.cout]))
    with_bn = rng.random() < 0.7
    conv_bias = rng.random() < (0.3 if with_bn else 1.0)
    bias = rng.normal(0, 0.5, cmid).astype(np.float32) if conv_bias else False
    y = b.conv(x, cmid, one, one, zero, one, groups_for(rng, blk.cin, cmid), bias=bias)
    shift = np.zeros(cmid) if bias is False else bias.astype(np.float64)
    if with_bn:
        params, eps = b.bn_params(cmid)
        g, be, m, v = (p.astype(np.float64) for p in params)
        a = g / np.sqrt(v + eps)
        shift = shift * a + be - m * a
        y = b.bn(y, (params, eps))
    wrong = rng.random() < blk.poison
    c = shift + (rng.normal(0, 0.3, cmid) if wrong else 0.0)
    b.tags["border_fill" + ("_wrong" if wrong else "")] += 1
    kernel = draw_kernel(rng, blk.rank, small=True)
    kernel = tuple(max(kk, 2) for kk in kernel)
    pads = solve_pads(rng, b.shapes[y][2:], blk.out_sp, kernel, blk.stride, one, blk.delta)
    if pads is None:
        return None
    cshape = (1, cmid) + one
    if rng.random() < 0.35:
        y = _scatter_fill(b, y, pads, c, wrong)
    else:
        cname = b.const(c.reshape(cshape), "fill")
        y = b.node("Sub", [y, cname], b.shapes[y])
        y = b.pad(y, pads)
        y = b.node("Add", [y, cname], b.shapes[y])
    y = b.conv(y, blk.cout, kernel, blk.stride, zero, one, groups_for(rng, cmid, blk.cout), bias=rng.random() < 0.5)
    if rng.random() < 0.5:
        y = b.bn(y)
    return y


def _scatter_fill(b: Builder, y: str, pads, c: np.ndarray, wrong: bool) -> str:
    """Pad(0) then ScatterND chunks writing c[channel] on the border (slice assignment as exported)."""
    rng = b.rng
    y = b.pad(y, pads)
    shape = b.shapes[y]
    r = len(shape) - 2
    border = np.ones(shape, dtype=bool)
    border[(slice(None), slice(None)) + tuple(slice(pads[a], shape[a + 2] - pads[a + r]) for a in range(r))] = False
    idx = np.argwhere(border)
    if wrong and len(idx) > 1 and rng.random() < 0.5:  # leave one border element unwritten
        idx = np.delete(idx, int(rng.integers(len(idx))), axis=0)
        b.tags["poison_scatter_gap"] += 1
    upd = c[idx[:, 1]] if len(idx) else np.zeros(0)
    if not len(idx):
        return y
    chunks = np.array_split(np.arange(len(idx)), int(rng.integers(1, 5)))
    b.tags["scatter_fill"] += 1
    for ch in chunks:
        if not len(ch):
            continue
        y = b.node("ScatterND", [y, b.const(idx[ch], "idx", np.int64), b.const(upd[ch], "upd")], shape)
    return y


def term_pad_conv(b: Builder, blk: Block) -> str | None:
    rng = b.rng
    geom = conv_geom(b, blk, blk.src, blk.cout)
    if geom is None:
        return None
    kernel, strides, pads, dils = geom
    mode, value = "constant", 0.0
    crop = False
    if rng.random() < blk.poison:
        if rng.random() < 0.25:
            crop = True
            b.tags["poison_pad_crop"] += 1
        elif rng.random() < 0.5:
            value = float(rng.normal(0, 1))
            b.tags["poison_pad_value"] += 1
        else:
            mode = str(rng.choice(["reflect", "edge"]))
            if any(p >= h for p, h in zip(pads, blk.in_sp + blk.in_sp)):
                mode = "edge"
            b.tags[f"poison_pad_{mode}"] += 1
    split = rng.random() < 0.3  # part of the padding on the Pad, the rest on the Conv
    pad_part = tuple(int(rng.integers(0, p + 1)) for p in pads) if split else pads
    if crop:  # crop one pixel somewhere, pad the conv by one more there: same size, other values
        i = int(rng.integers(len(pads)))
        pad_part = tuple(-1 if j == i else 0 for j in range(len(pads)))
        if any(h < 3 for h in blk.in_sp):
            return None
    conv_part = tuple(p - q for p, q in zip(pads, pad_part))
    y = b.pad(blk.src, pad_part, mode, value)
    g = groups_for(rng, blk.cin, blk.cout)
    y = b.conv(y, blk.cout, kernel, strides, conv_part, dils, g, bias=rng.random() < 0.5)
    if rng.random() < 0.4:
        y = b.bn(y)
    return y


def term_bn_conv(b: Builder, blk: Block) -> str | None:
    """BN (or a per-channel affine) before a conv: folds only when the conv reads no padding."""
    rng = b.rng
    geom = conv_geom(b, blk, blk.src, blk.cout)
    if geom is None:
        return None
    kernel, strides, pads, dils = geom
    if blk.cin == 1 and rng.random() < 0.3:
        x = b.affine(blk.src, widen=int(rng.choice([2, 3, 4])))
    else:
        x = b.bn(blk.src) if rng.random() < 0.7 else b.affine(blk.src)
    b.tags["pre_affine"] += 1
    cin = b.shapes[x][1]
    y = b.conv(x, blk.cout, kernel, strides, pads, dils, groups_for(rng, cin, blk.cout), bias=rng.random() < 0.5)
    return y


def term_nested(b: Builder, blk: Block, depth: int) -> str | None:
    """A sub-block: a sum of terms followed by an affine, or by a conv (sequential after parallel)."""
    rng = b.rng
    b.tags["nested"] += 1
    if rng.random() < 0.5 or depth >= 1:
        y = build_sum(b, blk, depth + 1, n_terms=int(rng.integers(2, 4)))
        if y is None:
            return None
        return b.affine(y, poison=rng.random() < blk.poison) if rng.random() < 0.7 else y
    # sum on a mid tensor, then a conv to the block output
    one = (1,) * blk.rank
    mid = Block(blk.src, blk.cin, int(rng.choice([blk.cin, blk.cout])), blk.rank, blk.in_sp, one, (0,) * blk.rank,
                poison=blk.poison)
    y = build_sum(b, mid, depth + 1, n_terms=int(rng.integers(2, 4)))
    if y is None:
        return None
    if rng.random() < 0.5:
        k, s, p, d = one, one, (0,) * (2 * blk.rank), one
        if blk.out_sp != mid.out_sp or blk.stride != one:
            return None
    else:
        geom = conv_geom(b, blk, y, blk.cout, poison=False)
        if geom is None:
            return None
        k, s, p, d = geom
    b.tags["nested_then_conv"] += 1
    return b.conv(y, blk.cout, k, s, p, d, groups_for(rng, mid.cout, blk.cout), bias=rng.random() < 0.5)


TERMS = [
    (term_conv, 6), (term_identity, 2), (term_bn, 2), (term_avgpool, 2), (term_seq, 3),
    (term_border_fill, 1.5), (term_pad_conv, 1.5), (term_bn_conv, 1.5), (term_widen, 0.3),
    (term_other_source, 0.7),
]


def draw_term(b: Builder, blk: Block, depth: int) -> str | None:
    rng = b.rng
    if depth == 0 and rng.random() < 0.08:
        return term_nested(b, blk, depth)
    fns, w = zip(*TERMS)
    p = np.array(w) / sum(w)
    for _ in range(8):
        fn = fns[int(rng.choice(len(fns), p=p))]
        y = fn(b, blk)
        if y is not None:
            return y
    return None


def combine(b: Builder, items: list[str], blk: Block) -> str:
    """A random tree of Add/Sub/Sum over the items, with an occasional affine on inner sums."""
    rng = b.rng
    items = list(items)
    if len(items) == 1 and rng.random() < 0.1:
        b.tags["sum_of_one"] += 1
        return b.node("Sum", items, b.shapes[items[0]])
    while len(items) > 1:
        op = str(rng.choice(["Add", "Add", "Add", "Sub", "Sum"]))
        k = 2 if op != "Sum" else int(rng.integers(2, min(4, len(items)) + 1))
        idx = sorted(rng.choice(len(items), size=k, replace=False), reverse=True)
        picked = [items.pop(int(i)) for i in idx]
        shape = np.broadcast_shapes(*[b.shapes[t] for t in picked])
        y = b.node(op, picked, shape)
        b.tags[op.lower()] += 1
        if len(items) >= 1 and rng.random() < 0.15:
            y = b.affine(y)
            b.tags["inner_affine"] += 1
        if rng.random() < 0.04:
            y = noise(b, y)
        items.insert(int(rng.integers(0, len(items) + 1)), y)
    return items[0]


def build_sum(b: Builder, blk: Block, depth: int = 0, n_terms: int | None = None) -> str | None:
    rng = b.rng
    n = n_terms or int(rng.choice([1, 2, 2, 3, 3, 3, 4, 4, 5]))
    terms = []
    for _ in range(n):
        t = draw_term(b, blk, depth)
        if t is not None:
            if b.rng.random() < 0.06:
                t = noise(b, t)
            terms.append(t)
    if not terms:
        return None
    # poison: a term read twice (Add(t, t)) or read by a second branch
    if rng.random() < 0.5 * blk.poison:
        t = terms[int(rng.integers(len(terms)))]
        if t != blk.src:
            if rng.random() < 0.4:
                terms.append(t)
                b.tags["poison_same_term_twice"] += 1
            else:
                terms.append(b.affine(t))
                b.tags["poison_second_reader"] += 1
    return combine(b, terms, blk)


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------
@dataclass
class Case:
    case_seed: tuple
    kind: str
    model: onnx.ModelProto
    tags: Counter
    prologue_convs: int
    feeds: dict = field(default_factory=dict)


def _source(b: Builder, rank: int, rng) -> tuple[str, int, tuple, int]:
    n = int(rng.choice([1, 1, 1, 2]))
    c = int(rng.choice([1, 2, 3, 4, 4, 6, 8, 8, 12, 16]))
    if rank == 1:
        sp = (int(rng.integers(3, 20)),)
    elif rank == 2:
        h = int(rng.integers(3, 14))
        sp = (h, h) if rng.random() < 0.6 else (h, int(rng.integers(3, 14)))
    else:
        sp = tuple(int(rng.integers(3, 7)) for _ in range(3))
    b.shapes["x"] = (n, c) + sp
    prologue = rng.random()
    convs = 0
    x = "x"
    if prologue < 0.35:
        x = b.node("Relu", [x], b.shapes[x], internal=False)
        b.tags["src_relu"] += 1
    elif prologue < 0.5:
        one = (1,) * rank
        cc = int(rng.choice([c, 2 * c]))
        x = b.conv(x, cc, (3,) * rank, one, (1,) * (2 * rank), one, 1, bias=rng.random() < 0.5)
        b.internal.remove(x)
        convs = 1
        b.tags["src_conv"] += 1
    return x, b.shapes[x][1], b.shapes[x][2:], convs


def gen_block(b: Builder, rng, rank: int) -> tuple[list[str], int]:
    src, c, sp, convs = _source(b, rank, rng)
    cout = c if rng.random() < 0.6 else int(rng.choice([1, 2, 4, 6, 8, 12]))
    if rng.random() < 0.7:
        stride = (1,) * rank
    elif rank == 2 and rng.random() < 0.15:
        stride = (1, 2) if rng.random() < 0.5 else (2, 1)
    elif rng.random() < 0.08:
        stride = (3,) * rank
    else:
        stride = (2,) * rank
    delta = (0,) * rank if rng.random() < 0.6 else tuple(int(v) for v in rng.choice([-2, -1, 0, 1, 2], size=rank))
    if rng.random() < 0.3:
        delta = (int(rng.choice([-2, -1, 1, 2])),) * rank
    if rng.random() < 0.3:  # RepVGG-like: identity-compatible, so BN-only / identity / pool terms appear
        cout, stride, delta = c, (1,) * rank, (0,) * rank
    blk = Block(src, c, cout, rank, sp, stride, delta, poison=float(rng.choice([0.0, 0.0, 0.15, 0.4])))
    if any(o < 1 for o in blk.out_sp):
        return None, 0
    y = build_sum(b, blk)
    if y is None:
        return None, 0
    if rng.random() < 0.15:  # a second block straight on the first: one linear region, sequential of parallel
        b.tags["chained_block"] += 1
        if rng.random() < 0.5:
            y = b.affine(y)
        c2 = b.shapes[y][1]
        blk2 = Block(y, c2, c2 if rng.random() < 0.6 else int(rng.choice([2, 4, 8])), rank, b.shapes[y][2:],
                     (1,) * rank, (0,) * rank, poison=blk.poison)
        y = build_sum(b, blk2, n_terms=int(rng.integers(1, 4)))
        if y is None:
            return None, 0
    if rng.random() < 0.35:
        y = b.bn(y)
    if rng.random() < 0.15:
        y = b.affine(y)
    if rng.random() < 0.6:
        y = b.node("Relu", [y], b.shapes[y], internal=False)
    if rng.random() < 0.05:
        y = noise(b, y)
    return [y], convs


def gen_split_concat(b: Builder, rng, rank: int):
    src, c, sp, convs = _source(b, rank, rng)
    if c < 2:
        return None, 0
    n = int(rng.integers(2, min(4, c) + 1))
    if c % n == 0 and rng.random() < 0.7:
        sizes = [c // n] * n
    else:
        cuts = sorted(rng.choice(np.arange(1, c), size=n - 1, replace=False))
        sizes = list(np.diff([0] + [int(v) for v in cuts] + [c]))
    sizes = [int(v) for v in sizes]
    stride = (1,) * rank if rng.random() < 0.7 else (2,) * rank
    delta = (0,) * rank if rng.random() < 0.7 else (int(rng.choice([-2, 2])),) * rank
    use_slice = rng.random() < 0.25
    shape = b.shapes[src]
    if use_slice:
        parts, lo = [], 0
        big = 2**62
        for s in sizes:
            st, en = lo, lo + s
            if rng.random() < 0.25:
                st = lo - c  # negative start, same channel
            if en == c and rng.random() < 0.5:
                en = big  # "to the end"
            elif rng.random() < 0.2:
                en = en - c if en < c else big
            ax = 1 if rng.random() < 0.7 else 1 - len(shape)  # negative axis
            ins = [src, b.const([st], "st", np.int64), b.const([en], "en", np.int64), b.const([ax], "ax", np.int64)]
            if rng.random() < 0.3:
                ins.append(b.const([1], "step", np.int64))
            parts.append(b.node("Slice", ins, (shape[0], s) + sp))
            lo += s
        b.tags["slice"] += 1
    else:
        outs = [b.fresh("split") for _ in sizes]
        ins = [src]
        if len(set(sizes)) > 1 or rng.random() < 0.5:
            ins.append(b.const(np.array(sizes, np.int64), "sizes", np.int64))
        axis = 1 if rng.random() < 0.75 else 1 - len(shape)
        b.nodes.append(helper.make_node("Split", ins, outs, name=f"n_{outs[0]}", axis=axis))
        for o, s in zip(outs, sizes):
            b.shapes[o] = (shape[0], s) + sp
            b.internal.append(o)
        parts = outs
        b.tags["split"] += 1
    same = rng.random() < 0.5
    shared = None
    ys = []
    for part, s in zip(parts, sizes):
        blk = Block(part, s, s, rank, sp, stride, delta, poison=0.1)
        if blk.identity_ok and rng.random() < 0.15:
            ys.append(part)
            b.tags["split_identity"] += 1
            continue
        cout = s if rng.random() < 0.6 else int(rng.choice([1, 2, 4]))
        if same and shared is not None:
            kernel, strides, pads, dils = shared
        else:
            geom = conv_geom(b, blk, part, cout, poison=rng.random() < 0.1)
            if geom is None:
                return None, 0
            kernel, strides, pads, dils = shared = geom
        y = b.conv(part, cout, kernel, strides, pads, dils, groups_for(rng, s, cout), bias=rng.random() < 0.5)
        if rng.random() < 0.5:
            y = b.bn(y)
        ys.append(y)
    if rng.random() < 0.15:
        perm = rng.permutation(len(ys))
        ys = [ys[int(i)] for i in perm]
        b.tags["concat_permuted"] += 1
    out_c = sum(b.shapes[y][1] for y in ys)
    y = b.node("Concat", ys, (shape[0], out_c) + b.shapes[ys[0]][2:], axis=1 if rng.random() < 0.8 else 1 - len(shape))
    if rng.random() < 0.3:
        y = b.bn(y)
    if rng.random() < 0.5:
        y = b.node("Relu", [y], b.shapes[y], internal=False)
    return [y], convs


def gen_concat(b: Builder, rng, rank: int):
    src, c, sp, convs = _source(b, rank, rng)
    stride = (1,) * rank if rng.random() < 0.7 else (2,) * rank
    delta = (0,) * rank if rng.random() < 0.7 else (int(rng.choice([-2, 2])),) * rank
    blk = Block(src, c, c, rank, sp, stride, delta, poison=float(rng.choice([0.0, 0.2])))
    ys = []
    for _ in range(int(rng.integers(2, 5))):
        r = rng.random()
        if r < 0.15 and blk.identity_ok:
            ys.append(src)
            b.tags["concat_identity"] += 1
            continue
        if r < 0.25:
            y = term_avgpool(b, blk)
            if y is not None:
                ys.append(y)
                continue
        cout = int(rng.choice([1, 2, c, 2 * c]))
        geom = conv_geom(b, blk, src, cout)
        if geom is None:
            continue
        kernel, strides, pads, dils = geom
        y = b.conv(src, cout, kernel, strides, pads, dils, groups_for(rng, c, cout), bias=rng.random() < 0.5)
        if rng.random() < 0.5:
            y = b.bn(y)
        ys.append(y)
    if len(ys) < 2:
        return None, 0
    if rng.random() < 0.1:
        ys.insert(int(rng.integers(len(ys) + 1)), ys[int(rng.integers(len(ys)))])
        b.tags["concat_duplicate_input"] += 1
    axis = 1
    if rng.random() < 0.1 and len({b.shapes[y] for y in ys}) == 1:
        axis = int(rng.integers(2, 2 + rank))
        b.tags["poison_concat_spatial"] += 1
    shp = list(b.shapes[ys[0]])
    shp[axis] = sum(b.shapes[y][axis] for y in ys)
    y = b.node("Concat", ys, shp, axis=axis)
    b.tags["concat"] += 1
    if rng.random() < 0.3:
        y = b.bn(y)
    if rng.random() < 0.5:
        y = b.node("Relu", [y], b.shapes[y], internal=False)
    return [y], convs


def _fc_term(b: Builder, rng, src: str, cin: int, cout: int, poison: float) -> str | None:
    n = b.shapes[src][0]
    kind = str(rng.choice(["gemm", "gemm", "matmul", "bn", "identity", "scale", "pre_affine", "seq"]))
    if kind == "pre_affine":  # BN / affine before a Gemm: folds (no padding on a Gemm)
        b.tags["fc_pre_affine"] += 1
        src = b.bn(src) if rng.random() < 0.6 else b.affine(src)
        kind = "gemm"
    elif kind == "seq":  # Gemm → (BN) → Gemm
        b.tags["fc_seq"] += 1
        mid = int(rng.choice([1, 2, cin, 2 * cout]))
        src = _fc_term(b, rng, src, cin, mid, 0.0)
        if src is None:
            return None
        cin = mid
        kind = "gemm"
    if kind == "scale" and cin == 1 and cout > 1:
        return b.affine(src, widen=cout)
    if kind in ("bn", "identity", "scale") and cin != cout:
        kind = "gemm"
    b.tags[f"fc_{kind}"] += 1
    if kind == "identity":
        return src
    if kind == "bn":
        return b.bn(src)
    if kind == "scale":
        return b.affine(src)
    w = (rng.standard_normal((cin, cout)) / math.sqrt(cin)).astype(np.float32)
    if kind == "matmul":
        y = b.node("MatMul", [src, b.const(w, "w")], (n, cout))
        if rng.random() < 0.6:
            y = b.node("Add", [y, b.const(rng.normal(0, 0.5, (cout,) if rng.random() < 0.5 else (1, cout)), "b")], (n, cout))
    else:
        trans_b = int(rng.random() < 0.6)
        attrs = {}
        if trans_b or rng.random() < 0.3:
            attrs["transB"] = trans_b
        if rng.random() < 0.3:
            attrs["alpha"] = float(rng.uniform(0.5, 2.0))
        ins = [src, b.const(w.T if trans_b else w, "w")]
        if rng.random() < 0.7:
            shapes = [(cout,), (1, cout), (1,)]
            if rng.random() < poison and n > 1:
                shapes = [(n, cout)]  # a per-sample bias: not a per-output vector
                b.tags["poison_gemm_full_bias"] += 1
            ins.append(b.const(rng.normal(0, 0.5, shapes[int(rng.integers(len(shapes)))]), "b"))
            if rng.random() < 0.3:
                attrs["beta"] = float(rng.uniform(0.5, 2.0))
        y = b.node("Gemm", ins, (n, cout), **attrs)
    if rng.random() < 0.5:
        y = b.bn(y)
    return y


def gen_fc(b: Builder, rng, rank: int):
    """Fully connected (rank 0): Gemm / MatMul+Add / BN / identity / scale branches on [N, C]."""
    n = int(rng.choice([1, 2, 3]))
    c = int(rng.choice([1, 2, 4, 8, 16]))
    b.shapes["x"] = (n, c)
    x, convs = "x", 0
    r = rng.random()
    if r < 0.35:
        x = b.node("Relu", [x], (n, c), internal=False)
    elif r < 0.5:
        x = b.node("Gemm", [x, b.const(rng.standard_normal((c, c)) / math.sqrt(c), "w")], (n, c))
        b.internal.remove(x)
        convs = 1
    cout = c if rng.random() < 0.6 else int(rng.choice([1, 2, 4, 8]))
    poison = float(rng.choice([0.0, 0.2]))
    terms = [t for t in (_fc_term(b, rng, x, c, cout, poison) for _ in range(int(rng.integers(1, 5)))) if t is not None]
    if not terms:
        return None, 0
    y = combine(b, terms, None)
    if rng.random() < 0.3:
        y = b.bn(y)
    if rng.random() < 0.5:
        y = b.node("Relu", [y], b.shapes[y], internal=False)
    return [y], convs


def _poison_graph(b: Builder, rng, outputs: list[str]) -> list[str]:
    """Graph-level poison: fan-out to a graph output, an extra reader, shared weights."""
    cands = [t for t in b.internal if t not in outputs]
    if cands and rng.random() < 0.12:
        t = cands[int(rng.integers(len(cands)))]
        outputs = outputs + [t]
        b.tags["poison_fanout_output"] += 1
    if cands and rng.random() < 0.08:
        t = cands[int(rng.integers(len(cands)))]
        outputs = outputs + [b.node("Relu", [t], b.shapes[t], internal=False)]
        b.tags["poison_fanout_reader"] += 1
    if rng.random() < 0.12:
        by_shape: dict = {}
        for n in b.nodes:
            if n.op_type in ("Conv", "Gemm", "MatMul"):
                w = n.input[1]
                shape = next(tuple(i.dims) for i in b.inits if i.name == w)
                by_shape.setdefault(shape, []).append(n)
        pairs = [v for v in by_shape.values() if len(v) > 1]
        if pairs:
            grp = pairs[int(rng.integers(len(pairs)))]
            for n in grp[1:]:
                n.input[1] = grp[0].input[1]
            b.tags["poison_shared_weight"] += 1
    if rng.random() < 0.05:
        outputs = outputs + ["x"]
        b.tags["x_is_output"] += 1
    return outputs


GENERATORS = {"block": (gen_block, 0.70), "split_concat": (gen_split_concat, 0.11), "concat": (gen_concat, 0.11),
              "fc": (gen_fc, 0.08)}


def generate(seed: int, case: int) -> Case:
    """Case `case` of campaign `seed`: a valid model (checker and ORT accept it) and its feeds."""
    rng = np.random.default_rng([seed, case])
    kinds = list(GENERATORS)
    probs = np.array([GENERATORS[k][1] for k in kinds])
    last = None
    for _ in range(MAX_TRIES):
        kind = kinds[int(rng.choice(len(kinds), p=probs / probs.sum()))]
        rank = int(rng.choice([1, 2, 3], p=[0.1, 0.85, 0.05]))
        b = Builder(rng)
        outs, convs = GENERATORS[kind][0](b, rng, rank)
        if not outs or not b.nodes:  # a graph of no nodes is a usage error, not a case
            continue
        outs = _poison_graph(b, rng, outs)
        model = _to_model(b, outs)
        ok, why, feeds = _valid(model, rng)
        if not ok:
            last = why
            continue
        b.tags[f"rank{rank}" if kind != "fc" else "rank0"] += 1
        return Case((seed, case), kind, model, b.tags, convs, feeds)
    raise RuntimeError(f"generator could not make a valid graph for case {(seed, case)}: {last}")


def _to_model(b: Builder, outputs: list[str]) -> onnx.ModelProto:
    seen, outs = set(), []
    for o in outputs:
        if o not in seen:
            seen.add(o)
            outs.append(o)
    used = {i for n in b.nodes for i in n.input}
    inits = [t for t in b.inits if t.name in used]
    nodes = list(b.nodes)
    if b.rng.random() < 0.15:  # exporters also write weights as Constant nodes
        frac = b.rng.uniform(0.2, 1.0)
        as_nodes = [t for t in inits if b.rng.random() < frac]
        inits = [t for t in inits if t not in as_nodes]
        nodes = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t) for t in as_nodes] + nodes
        b.tags["constant_nodes"] += 1
    graph = helper.make_graph(
        nodes, "fuzz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(b.shapes["x"]))],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, list(b.shapes[o])) for o in outs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxrep-fuzz")
    model.ir_version = IR_VERSION
    return model


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_ort(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    sess = _session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def _valid(model, rng) -> tuple[bool, str, dict]:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # noqa: BLE001 - any refusal means "not a case"
        return False, f"checker: {str(e).splitlines()[0][:200]}", {}
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
    try:
        ref = run_ort(model, feeds)
    except Exception as e:  # noqa: BLE001
        return False, f"ort: {str(e).splitlines()[0][:200]}", {}
    for o in model.graph.output:
        want = tuple(d.dim_value for d in o.type.tensor_type.shape.dim)
        if ref[o.name].shape != want:
            return False, f"shape of {o.name}: ORT {ref[o.name].shape}, builder {want}", {}
        if not np.all(np.isfinite(ref[o.name])):
            return False, "non-finite output", {}
    return True, "", feeds


# ------------------------------------------------------------------------------------------------
# oracle
# ------------------------------------------------------------------------------------------------
LINEAR_OPS_IGNORED = {"Relu", "Constant"}


def linear_ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node if n.op_type not in LINEAR_OPS_IGNORED)


@dataclass
class Result:
    case_seed: tuple
    kind: str
    status: str  # ok | mismatch | crash
    klass: str = ""  # merged | partial | untouched
    rel_err: float = 0.0
    detail: str = ""
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    aggressive: bool = False
    seconds: float = 0.0
    rounding: bool = False  # failed the fixed tolerance, passed the float64 rounding check


def describe(model: onnx.ModelProto) -> str:
    """The graph, one node a line, constants as shapes (weights would drown the structure)."""
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            shapes[n.output[0]] = list(n.attribute[0].t.dims)
    io = lambda vi: f"{vi.name}{[d.dim_value for d in vi.type.tensor_type.shape.dim]}"  # noqa: E731
    lines = ["inputs: " + ", ".join(io(i) for i in model.graph.input),
             "outputs: " + ", ".join(io(o) for o in model.graph.output)]
    for n in model.graph.node:
        if n.op_type == "Constant":
            continue
        args = ", ".join(f"{i}{shapes[i]}" if i in shapes else i for i in n.input)
        attrs = ", ".join(f"{a.name}={helper.get_attribute_value(a)}" for a in n.attribute)
        lines.append(f"  {', '.join(n.output)} = {n.op_type}({args})" + (f"  [{attrs}]" if attrs else ""))
    return "\n".join(lines)


def to_double(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph in float64 (initializers, inputs, outputs; every op here is type-generic)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for init in m.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    for vi in list(m.graph.input) + list(m.graph.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    del m.graph.value_info[:]
    return m


def rounding_verdict(case: Case, ref: dict, got: dict) -> tuple[bool, str]:
    """Is a difference above the fixed tolerance fp32 rounding? Compare both fp32 results with the
    original graph evaluated in float64 (onnx.reference): the optimized model passes when its
    error is at most ROUNDING_FACTOR × the original's own fp32 error (plus the fixed tolerance)."""
    from onnx.reference import ReferenceEvaluator

    try:
        ev = ReferenceEvaluator(to_double(case.model))
        names = [o.name for o in case.model.graph.output]
        exact = dict(zip(names, ev.run(None, {k: v.astype(np.float64) for k, v in case.feeds.items()})))
    except Exception as e:  # noqa: BLE001
        return False, f"reference evaluator failed: {e}"
    ok, parts = True, []
    for name, r in ref.items():
        e64 = exact[name]
        scale = float(np.max(np.abs(e64), initial=0.0))
        e_orig = float(np.max(np.abs(r - e64), initial=0.0))
        e_opt = float(np.max(np.abs(got[name] - e64), initial=0.0))
        if not e_opt <= ROUNDING_FACTOR * e_orig + RTOL * scale + ATOL:
            ok = False
        parts.append(f"{name}: |orig32-f64| {e_orig:.3g}, |opt32-f64| {e_opt:.3g}, max|f64| {scale:.3g}")
    return ok, ("rounding" if ok else "NOT rounding") + " (" + "; ".join(parts) + ")"


def check_case(case: Case, aggressive: bool, out_dir: str | None = None) -> Result:
    import onnxrep

    t0 = time.perf_counter()
    before = linear_ops(case.model)
    res = Result(case.case_seed, case.kind, "ok", before=dict(before), tags=dict(case.tags), aggressive=aggressive)
    opt = None
    try:
        ref = run_ort(case.model, case.feeds)
        opt = onnxrep.optimize(case.model, verify=False, aggressive=aggressive)
        onnx.checker.check_model(opt, full_check=True)
        got = run_ort(opt, case.feeds)
    except Exception as e:  # noqa: BLE001 - every failure is a finding
        res.status = "crash"
        res.detail = "".join(traceback.format_exception_only(type(e), e)).strip()[-2000:]
        res.seconds = time.perf_counter() - t0
        _save(case, opt, res, out_dir)
        return res
    after = linear_ops(opt)
    res.after = dict(after)
    worst = 0.0
    problems = []
    for name, r in ref.items():
        g = got.get(name)
        if g is None or g.shape != r.shape:
            problems.append(f"output {name}: shape {None if g is None else g.shape} vs {r.shape}")
            continue
        err = float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)), initial=0.0))
        scale = float(np.max(np.abs(r), initial=0.0))
        rel = err / scale if scale else (0.0 if err == 0 else math.inf)
        worst = max(worst, rel)
        if not err <= RTOL * scale + ATOL:
            problems.append(f"output {name}: max abs err {err:.3g}, max|ref| {scale:.3g} (rel {rel:.3g})")
    res.rel_err = worst
    if problems:
        res.status = "mismatch"
        res.detail = "; ".join(problems)
        verdict = rounding_verdict(case, ref, got)
        res.detail += f" | float64 check: {verdict[1]}"
        if verdict[0]:
            res.status = "ok"
            res.rounding = True
    n_before, n_after = sum(before.values()), sum(after.values())
    if set(after) <= {"Conv", "Gemm"} and n_after <= 1 + case.prologue_convs and n_after < n_before:
        res.klass = "merged"
    elif n_after < n_before:
        res.klass = "partial"
    else:
        res.klass = "untouched"
    res.seconds = time.perf_counter() - t0
    if res.status != "ok":
        _save(case, opt, res, out_dir)
    return res


def _save(case: Case, opt, res: Result, out_dir: str | None) -> None:
    if not out_dir:
        return
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    stem = d / f"s{case.case_seed[0]}_c{case.case_seed[1]}"
    onnx.save(case.model, f"{stem}.orig.onnx")
    if opt is not None:
        onnx.save(opt, f"{stem}.opt.onnx")
    np.save(f"{stem}.input.npy", case.feeds["x"])
    info = {k: v for k, v in res.__dict__.items()}
    info["case_seed"] = list(case.case_seed)
    info["replay"] = f"python tools/fuzz_merge.py --seed {case.case_seed[0]} --case {case.case_seed[1]}"
    Path(f"{stem}.json").write_text(json.dumps(info, indent=2, default=str))


def aggressive_for(seed: int, case: int) -> bool:
    """Three cases in four run with --aggressive (more merges, more to get wrong)."""
    return bool(np.random.default_rng([seed, case, 1]).random() < 0.75)


def run_case(seed: int, case: int, out_dir: str | None = None) -> Result:
    try:
        c = generate(seed, case)
    except Exception as e:  # noqa: BLE001 - a generator bug is reported, not fatal
        return Result((seed, case), "?", "generator_error", detail=str(e)[:500])
    return check_case(c, aggressive_for(seed, case), out_dir)


def _worker(args):
    seed, case, out_dir = args
    import logging

    logging.getLogger("onnxrep").setLevel(logging.ERROR)
    return run_case(seed, case, out_dir)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def signature(r: Result) -> str:
    """A failure's kind without case-specific numbers, to group findings."""
    import re

    text = r.detail.split(" | float64")[0].splitlines()[-1] if r.detail else ""
    text = re.sub(r"'[^']*'", "'…'", text)
    text = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", text)
    return f"{r.status}: {text[:160]}"


def summarize(results: list[Result]) -> dict:
    status = Counter(r.status for r in results)
    ok = [r for r in results if r.status in ("ok", "mismatch")]
    klass = Counter(r.klass for r in ok)
    worst = max(results, key=lambda r: r.rel_err if r.status == "ok" else -1.0, default=None)
    return {
        "cases": len(results),
        "merged_to_one_conv": klass.get("merged", 0),
        "partially_merged": klass.get("partial", 0),
        "untouched": klass.get("untouched", 0),
        "mismatches": status.get("mismatch", 0),
        "rounding_accepted": sum(r.rounding for r in results),
        "crashes": status.get("crash", 0),
        "generator_errors": status.get("generator_error", 0),
        "worst_rel_err_passing": worst.rel_err if worst else 0.0,
        "worst_case": list(worst.case_seed) if worst else None,
        "kinds": dict(Counter(r.kind for r in results)),
        "aggressive": sum(r.aggressive for r in results),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first case index")
    ap.add_argument("--case", type=int, default=None, help="replay this one case, verbosely")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default="/tmp/fuzz_failures/campaign", help="where failing models are saved")
    ap.add_argument("--json", default=None, help="write the summary and every non-ok result here")
    ap.add_argument("--tags", action="store_true", help="print how often each feature was generated")
    args = ap.parse_args(argv)

    if args.case is not None:
        c = generate(args.seed, args.case)
        print(f"case {c.case_seed} kind={c.kind} aggressive={aggressive_for(args.seed, args.case)}")
        print("tags:", dict(c.tags))
        print(describe(c.model))
        r = check_case(c, aggressive_for(args.seed, args.case), args.out)
        print(f"status={r.status} class={r.klass} rel_err={r.rel_err:.3g}\nbefore={r.before}\nafter={r.after}")
        if r.detail:
            print(r.detail)
        return 0 if r.status == "ok" else 1

    t0 = time.perf_counter()
    todo = [(args.seed, i, args.out) for i in range(args.start, args.start + args.cases)]
    results: list[Result] = []
    if args.jobs > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for r in pool.imap_unordered(_worker, todo, chunksize=4):
                results.append(r)
                _progress(r, len(results), args.cases)
    else:
        for t in todo:
            r = _worker(t)
            results.append(r)
            _progress(r, len(results), args.cases)
    elapsed = time.perf_counter() - t0
    s = summarize(results)
    s["seconds"] = round(elapsed, 1)
    s["seed"] = args.seed
    print(f"\ncases: {s['cases']}  (seed {args.seed}, cases {args.start}..{args.start + args.cases - 1}, "
          f"{s['aggressive']} with --aggressive)")
    print(f"  merged to one conv: {s['merged_to_one_conv']}")
    print(f"  partially merged:   {s['partially_merged']}")
    print(f"  untouched:          {s['untouched']}")
    print(f"  mismatches:         {s['mismatches']}")
    if s["rounding_accepted"]:
        print(f"  over the fixed tolerance but within fp32 rounding of the float64 result: {s['rounding_accepted']}")
    print(f"  crashes:            {s['crashes']}")
    if s["generator_errors"]:
        print(f"  generator errors:   {s['generator_errors']}")
    print(f"  kinds: {s['kinds']}")
    print(f"  worst relative error (passing cases): {s['worst_rel_err_passing']:.3g} at {s['worst_case']}")
    print(f"  time: {elapsed:.1f} s")
    for r in sorted((r for r in results if r.rounding), key=lambda r: r.case_seed):
        print(f"  rounding-accepted seed={r.case_seed[0]} case={r.case_seed[1]}: {r.detail}")
    bad = sorted((r for r in results if r.status != "ok"), key=lambda r: r.case_seed)
    groups: dict[str, list[Result]] = {}
    for r in bad:
        groups.setdefault(signature(r), []).append(r)
    for sig, rs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        cases = ", ".join(str(r.case_seed[1]) for r in rs[:12]) + (" …" if len(rs) > 12 else "")
        print(f"  {len(rs):4d} × {sig}\n         kinds {dict(Counter(r.kind for r in rs))}; cases {cases}")
    if bad:
        print(f"  failing models saved under {args.out}/")
    if args.tags:
        tags = Counter()
        for r in results:
            tags.update(r.tags)
        print("  features:", ", ".join(f"{k}={v}" for k, v in sorted(tags.items())))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": s, "failures": [r.__dict__ for r in bad]}, indent=2, default=str))
    return 1 if bad else 0


def _progress(r: Result, done: int, total: int) -> None:
    if r.status != "ok":
        print(f"[{done}/{total}] {r.status} {r.case_seed}: {r.detail.splitlines()[-1][:200] if r.detail else ''}",
              file=sys.stderr, flush=True)
    elif done % 100 == 0:
        print(f"[{done}/{total}]", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
