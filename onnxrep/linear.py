"""The linear view of graph nodes: which ops are convolutions or per-channel affines in disguise.

    Conv / Gemm / MatMul (constant weight)          → ConvSpec on its data input
    BatchNormalization (inference), Mul/Add/Sub/Div
    by a per-channel constant                       → per-channel affine  y = a·x + c
    AveragePool (count_include_pad or no padding)   → depthwise ConvSpec of 1/k
    Pad (constant 0, spatial axes)                  → identity ConvSpec with padding

Each `*_of` function returns a value or a `Decline` carrying the reason, so rules can report why
they did not fire. Nothing here mutates the graph except `make_conv`, which builds the replacement.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from . import folding as F
from . import graph as G
from . import kernels as K
from .rewrite import Rewrite
from . import patterns as P


@dataclass(frozen=True)
class Decline:
    reason: str
    fused: bool = False  # the op belongs to a runtime-fusable pattern (onnxrep.patterns): not linear here

    def __bool__(self):  # a Decline is never a usable result
        return False


@dataclass
class Affine:
    """y = scale·x + shift along channel axis 1 of a tensor of rank `rank`."""

    scale: np.ndarray
    shift: np.ndarray
    x: gs.Tensor
    rank: int | None

    def broadcast(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        return (np.broadcast_to(self.scale, (channels,)).astype(np.float64),
                np.broadcast_to(self.shift, (channels,)).astype(np.float64))


@dataclass
class LinearOp:
    """A node seen as a ConvSpec applied to its data input x."""

    spec: K.ConvSpec
    x: gs.Tensor


AFFINE_OPS = {"BatchNormalization", "Mul", "Add", "Sub", "Div"}
CONV_OPS = {"Conv", "Gemm", "MatMul"}


# -- per-channel affines -------------------------------------------------------------------------
def affine_of(node: gs.Node) -> Affine | Decline:
    pattern = P.claim(node)  # a piece of a GELU, LayerNorm, ... that runtimes fuse whole
    if pattern is not None:
        return Decline(P.decline_reason(node, pattern), fused=True)
    if node.op == "BatchNormalization":
        return _bn_affine(node)
    if node.op in ("Mul", "Add", "Sub", "Div"):
        return _binary_affine(node)
    return Decline(f"{node.op} is not a per-channel affine op")


def _bn_affine(node: gs.Node) -> Affine | Decline:
    if int(node.attrs.get("training_mode", 0)) != 0:
        return Decline("BatchNormalization has training_mode=1 (batch statistics)")
    if any(o.outputs for o in node.outputs[1:]):
        return Decline("BatchNormalization's running-statistics outputs are used")
    params = [G.const(t) for t in node.inputs[1:5]]
    if len(params) < 4 or any(p is None for p in params):
        hint = "".join(F.overridable_hint(t) for t, p in zip(node.inputs[1:5], params) if p is None)
        return Decline(f"BatchNormalization parameters are not constant{hint}")
    eps = float(node.attrs.get("epsilon", 1e-5))
    a, c = K.bn_affine(*params, eps)
    return Affine(a.reshape(-1), c.reshape(-1), node.inputs[0], G.rank(node.inputs[0]))


def _binary_affine(node: gs.Node) -> Affine | Decline:
    if len(node.inputs) != 2:
        return Decline(f"{node.op} does not have two inputs")
    a, b = node.inputs
    ca, cb = G.const(a), G.const(b)
    if (ca is None) == (cb is None):
        return Decline(f"{node.op} needs exactly one constant operand")
    x, c = (b, ca) if ca is not None else (a, cb)
    const_first = ca is not None
    if not np.issubdtype(c.dtype, np.floating):
        return Decline(f"{node.op} constant is not floating point")
    r = G.rank(x)
    per_channel = _per_channel(c, r)
    if per_channel is None:
        return Decline(f"{node.op} constant of shape {list(c.shape)} is not per-channel on axis 1")
    if per_channel.size > 1:
        channels = x.shape[1] if x.shape is not None and len(x.shape) > 1 else None
        if not isinstance(channels, (int, np.integer)) or channels != per_channel.size:
            return Decline(f"{node.op} constant has {per_channel.size} channels, its input "
                           f"{'has ' + str(channels) if isinstance(channels, (int, np.integer)) else 'an unknown count'}"
                           " (it would broadcast)")
    v = per_channel.astype(np.float64)
    one, zero = np.ones_like(v), np.zeros_like(v)
    if node.op == "Mul":
        return Affine(v, zero, x, r)
    if node.op == "Add":
        return Affine(one, v, x, r)
    if node.op == "Sub":
        return Affine(-one, v, x, r) if const_first else Affine(one, -v, x, r)
    if const_first:
        return Decline("Div by a tensor is not linear")
    if np.any(v == 0):
        return Decline("Div by a constant containing zero")
    return Affine(1.0 / v, zero, x, r)


def _per_channel(c: np.ndarray, r: int | None) -> np.ndarray | None:
    """The 1-D per-channel vector (or a length-1 vector) of a constant broadcast against a tensor
    of rank r along axis 1; None if it varies along any other axis or would change the shape."""
    if c.size == 1:
        if r is not None and c.ndim > r:
            return None
        return c.reshape(1)
    if r is None or c.ndim > r or r < 2:
        return None
    shape = (1,) * (r - c.ndim) + c.shape
    if shape[0] != 1 or any(d != 1 for d in shape[2:]):
        return None
    return c.reshape(-1)


# -- convolutions --------------------------------------------------------------------------------
def conv_of(node: gs.Node) -> LinearOp | Decline:
    if node.op == "Conv":
        return _conv(node)
    if node.op == "Gemm":
        return _gemm(node)
    if node.op == "MatMul":
        return _matmul(node)
    if node.op == "AveragePool":
        return avgpool_of(node)
    if node.op == "Pad":
        return pad_of(node)
    return Decline(f"{node.op} is not a convolution")


def _conv(node: gs.Node) -> LinearOp | Decline:
    w = G.const(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None:
        return Decline(f"Conv weight is not constant{F.overridable_hint(node.inputs[1]) if len(node.inputs) > 1 else ''}")
    b = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        b = G.const(node.inputs[2])
        if b is None:
            return Decline(f"Conv bias is not constant{F.overridable_hint(node.inputs[2])}")
    geo = conv_geometry(node, w.shape)
    if not geo:
        return geo
    spec = K.ConvSpec(w, b, **geo)
    if spec.cin != w.shape[1] * spec.group:
        return Decline("Conv weight and group disagree")
    return LinearOp(spec, node.inputs[0])


def conv_geometry(node: gs.Node, weight_shape) -> dict | Decline:
    """A Conv's strides, pads (auto_pad resolved), dilations and group, as ConvSpec keywords, from
    its attributes and the weight's shape alone: whether conv_of can express the node is known
    without reading the weight."""
    x = node.inputs[0]
    r = len(weight_shape) - 2
    pads = node.attrs.get("pads")
    strides = tuple(node.attrs.get("strides") or (1,) * r)
    dil = tuple(node.attrs.get("dilations") or (1,) * r)
    ks = node.attrs.get("kernel_shape")
    if ks is not None and tuple(ks) != tuple(weight_shape[2:]):
        return Decline("Conv kernel_shape attribute disagrees with the weight")
    auto = node.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        spatial = G.spatial_shape(x)
        if spatial is None and all(st == 1 for st in strides):
            spatial = (1,) * r  # at stride 1 SAME pads total (k-1)·d whatever the size
        if spatial is None:
            return Decline(f"strided Conv auto_pad={auto} needs static spatial dims (use --input-shape)")
        pads = same_pads(spatial, weight_shape[2:], strides, dil, upper=auto == "SAME_UPPER")
    elif auto == "VALID":
        pads = (0,) * (2 * r)
    return dict(strides=strides, pads=tuple(pads or (0,) * (2 * r)), dilations=dil,
                group=int(node.attrs.get("group", 1)))


def taps_per_output(node: gs.Node) -> int | None:
    """Products summed into one output of a Conv/Gemm/MatMul with a constant weight, Cin/group ·
    prod(kernel): `conv_of(node).spec`'s weight.shape[1] · prod(kernel_shape), read off the weight's
    shape without loading or converting its values (the cost model needs no more)."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(w, gs.Constant) or w.shape is None:
        return None
    shape = tuple(int(d) for d in w.shape)
    if node.op == "Conv" and len(shape) >= 2:
        return shape[1] * math.prod(shape[2:])
    if node.op == "Gemm" and len(shape) == 2:
        return shape[1] if int(node.attrs.get("transB", 0)) else shape[0]
    if node.op == "MatMul" and len(shape) == 2:
        return shape[0]
    return None


def same_pads(spatial, kernel, strides, dilations, upper: bool) -> tuple[int, ...]:
    begins, ends = [], []
    for h, k, s, d in zip(spatial, kernel, strides, dilations):
        e = (k - 1) * d + 1
        total = max((math.ceil(h / s) - 1) * s + e - h, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if upper else big)
        ends.append(big if upper else small)
    return tuple(begins + ends)


def _gemm(node: gs.Node) -> LinearOp | Decline:
    a, bt = node.inputs[0], node.inputs[1]
    w = G.const(bt)
    if w is None:
        return Decline(f"Gemm weight is not constant{F.overridable_hint(bt)}")
    if int(node.attrs.get("transA", 0)):
        return Decline("Gemm with transA=1")
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    w = w.astype(np.float64) * alpha
    w = w if int(node.attrs.get("transB", 0)) else w.T  # now [Cout, Cin]
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        c = G.const(node.inputs[2])
        if c is None:
            return Decline(f"Gemm bias is not constant{F.overridable_hint(node.inputs[2])}")
        if c.size not in (1, w.shape[0]) or (c.ndim == 2 and c.shape[0] != 1):
            return Decline("Gemm bias is not a per-output vector")
        bias = np.broadcast_to(c.reshape(-1).astype(np.float64) * beta, (w.shape[0],))
    return LinearOp(K.ConvSpec(w, bias), a)


def _matmul(node: gs.Node) -> LinearOp | Decline:
    a, bt = node.inputs
    w = G.const(bt)
    if w is None or w.ndim != 2:
        return Decline("MatMul's right operand is not a constant matrix")
    if G.rank(a) != 2:
        return Decline("MatMul input is not 2-D (channels not on axis 1)")
    return LinearOp(K.ConvSpec(w.T.astype(np.float64), None), a)


def avgpool_of(node: gs.Node) -> LinearOp | Decline:
    x = node.inputs[0]
    r = G.rank(x)
    c = G.channels(x)
    if r is None or c is None:
        return Decline("AveragePool input rank or channel count is unknown")
    k = tuple(node.attrs["kernel_shape"])
    rr = len(k)
    pads = tuple(node.attrs.get("pads") or (0,) * (2 * rr))
    strides = tuple(node.attrs.get("strides") or (1,) * rr)
    auto = node.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto != "NOTSET" and auto != "VALID":
        return Decline(f"AveragePool auto_pad={auto}")
    if auto == "VALID":
        pads = (0,) * (2 * rr)
    if any(d != 1 for d in node.attrs.get("dilations") or ()):
        return Decline("dilated AveragePool")
    if any(pads) and not int(node.attrs.get("count_include_pad", 0)):
        return Decline("AveragePool with padding and count_include_pad=0 divides border pixels by fewer taps")
    spec = K.avgpool(c, k, strides, pads)
    if int(node.attrs.get("ceil_mode", 0)):
        spatial = G.spatial_shape(x)
        if spatial is None:
            return Decline("AveragePool ceil_mode=1 with dynamic spatial dims may change the output size")
        floor_out = spec.output_shape(spatial)
        ceil_out = tuple(
            -(-(h + pb + pe - kk) // s) + 1
            for h, pb, pe, kk, s in zip(spatial, pads[:rr], pads[rr:], k, strides)
        )
        if floor_out != ceil_out:
            return Decline("AveragePool ceil_mode=1 changes the output size")
    return LinearOp(spec, x)


def pad_of(node: gs.Node) -> LinearOp | Decline:
    """Constant-zero padding of the spatial axes as an identity conv with pads."""
    x = node.inputs[0]
    mode = node.attrs.get("mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        return Decline(f"Pad mode {mode}")
    r = G.rank(x)
    c = G.channels(x)
    if r is None or r < 3 or c is None:
        return Decline("Pad input rank or channel count unknown")
    if len(node.inputs) > 1:
        pads = G.const(node.inputs[1])
        if pads is None:
            return Decline("Pad amounts are not constant")
        value = 0.0
        if len(node.inputs) > 2 and node.inputs[2].name:
            v = G.const(node.inputs[2])
            if v is None:
                return Decline("Pad value is not constant")
            value = float(np.asarray(v).reshape(-1)[0]) if np.asarray(v).size else 0.0
        if len(node.inputs) > 3 and node.inputs[3].name:
            axes = G.const(node.inputs[3])
            if axes is None:
                return Decline("Pad axes are not constant")
            full = np.zeros(2 * r, dtype=np.int64)
            for i, ax in enumerate(np.asarray(axes).reshape(-1)):
                ax = int(ax) % r
                full[ax] = pads[i]
                full[r + ax] = pads[len(axes) + i]
            pads = full
    else:  # opset < 11
        pads = np.asarray(node.attrs.get("pads"))
        value = float(node.attrs.get("value", 0.0))
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    if value != 0.0:
        return Decline("Pad value is not zero")
    if any(p < 0 for p in pads):
        return Decline("negative Pad (crop)")
    if pads[0] or pads[1] or pads[r] or pads[r + 1]:
        return Decline("Pad on batch or channel axis")
    sp = tuple(pads[2:r]) + tuple(pads[r + 2 :])
    ident = K.identity(c, r - 2)
    return LinearOp(K.ConvSpec(ident.weight, ident.bias, pads=sp, group=c), x)


# -- patterns runtimes fuse ----------------------------------------------------------------------
# ops a runtime fuses with their neighbours into LayerNorm / RMSNorm / GELU kernels
# -- building the replacement --------------------------------------------------------------------
def make_conv(graph: gs.Graph, spec: K.ConvSpec, x: gs.Tensor, out: gs.Tensor, dtype, name: str) -> gs.Node:
    """A Conv (or Gemm for rank 0) computing `spec` on x into `out`, weights cast once to dtype.
    `name` is used as given: callers pass the name of a node they are replacing."""
    if spec.rank == 0 and spec.group != 1:
        spec = K.regroup(spec, 1)  # Gemm has no groups
    wt = G.new_weight(graph, f"{name}.weight", spec.weight, dtype)
    bt = G.new_weight(graph, f"{name}.bias", spec.bias, dtype)
    if spec.rank == 0:
        node = gs.Node("Gemm", name, {"transB": 1}, [x, wt, bt], [out])
    else:
        attrs = {
            "kernel_shape": list(spec.kernel_shape),
            "strides": list(spec.strides),
            "pads": list(spec.pads),
            "dilations": list(spec.dilations),
            "group": spec.group,
        }
        node = gs.Node("Conv", name, attrs, [x, wt, bt], [out])
    graph.nodes.append(node)
    return node


def replace_with_conv(graph: gs.Graph, spec: K.ConvSpec, x: gs.Tensor, out: gs.Tensor,
                      removed: list[gs.Node], dtype, detail: str = ""):
    """Detach `removed` (a region ending in `out`) and compute `out` from `x` with one conv named
    after the region's last node. Returns the engine's Rewrite record."""

    names = [n.name for n in removed]
    main = next((n for n in removed if n.op in ("Conv", "ConvTranspose", "Gemm", "MatMul")), None)
    main = main or next((n for n in removed if any(o is out for o in n.outputs)), removed[-1])
    name = main.name or G.unique_node_name(graph, "onnxrep_conv")
    for n in removed:
        G.remove_node(n)
    node = make_conv(graph, spec, x, out, dtype, name)
    return Rewrite("", names, [node.name], detail)


def data_dtype(*tensors: gs.Tensor):
    """The float dtype to write new weights in: that of the first known weight/tensor."""
    for t in tensors:
        d = G.dtype_of(t)
        if d is not None and np.issubdtype(d, np.floating):
            return d
    return np.dtype(np.float32)
