"""fold_conv_into_fc: a conv on a fixed-size map, added to an FC of the same map, joins the FC.

RepMLP's locality injection (RepMLPNet, Ding et al. 2022)::

    x ─┬─ Flatten ─ Gemm/MatMul(W, b) [─ Add(b)] ─ Reshape ─┐
       └──────────────── Conv(K, c) ─────────────────────────┴─ Add ─ y
  ⇒ x ── Flatten ─ Gemm/MatMul(W + M, b + repeat(c)) ─ Reshape ─ y

On a fixed input size h×w a conv is a linear map of flatten(x): the matrix
M = kernels.conv_as_matrix(K, (h, w)) of shape [O·oh·ow, C·h·w], with the bias c once per output
position.  Flatten/Reshape and the FC agree on row-major [C, h, w] order and the output Reshape
to [N, O, oh, ow] is the conv's [O, oh, ow] order, so  Reshape(W·flat(x) + b) + Conv(x)
= Reshape((W + M)·flat(x) + b + repeat(c)).  Exact for any group, stride, padding and dilation.
Costs nothing at run time: the dense FC already multiplies every input by every output.

1. The FC is a Gemm (transA=0, any transB, alpha, beta; alpha and beta are folded into the
   constants) or a MatMul, optionally followed by an Add of a constant bias.  A MatMul without
   bias becomes a Gemm when the conv has one.
2. The FC reads Flatten(x, axis=1) or Reshape(x) to [N, C·h·w], where x is the conv's input.
3. The output Reshape turns [N, O·oh·ow] into exactly the conv's output shape [N, O, oh, ow].
4. Either operand order of the Add; the Reshape then writes the Add's output tensor, so graph
   output names are kept.

Declines when a weight or bias is not constant or is shared, when the conv output or an FC
intermediate has another reader or is a graph output, when x's spatial size is not static, when
the flatten is not from axis 1, when the output Reshape does not give the conv's layout, or when
the FC does not read the flattened input of the conv.  Runs after merge_linear_regions, which
has already merged the conv branches (and BNs) into one Conv; chains Add(Add(fc, conv1), conv2)
fold one conv at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxrep import graph as G
from onnxrep import kernels as K
from onnxrep import linear as L
from onnxrep.engine import Rewrite, Rule

# batch sizes a symbolic batch is tried with when resolving Reshape targets
PROBE_BATCHES = (2, 3)


@dataclass
class ConvIntoFc:
    add: gs.Node
    conv: gs.Node
    reshape: gs.Node  # FC output → [N, O, oh, ow]
    fc: gs.Node  # Gemm or MatMul
    bias_add: gs.Node | None  # Add of a constant after a MatMul
    flatten: gs.Node | None  # producer of the FC's input
    # filled in by check
    lin: L.LinearOp | None = None  # the conv
    fc_affine: tuple[np.ndarray, np.ndarray] | None = None  # (W [F_out, F_in], b), float64


class FoldConvIntoFc(Rule):
    name = "fold_conv_into_fc"
    description = "fold a conv on a fixed-size map into the FC (Gemm/MatMul) it is added to (RepMLP)"
    anchors = ("Add",)

    def match(self, node, ctx):
        if len(node.inputs) != 2:
            return None
        ops = [G.producer(t) for t in node.inputs]
        for conv, reshape in (ops, ops[::-1]):
            if conv is None or reshape is None or conv.op != "Conv" or reshape.op != "Reshape":
                continue
            fc, bias_add = G.producer(reshape.inputs[0]), None
            if fc is not None and fc.op == "Add":
                bias_add = fc
                fc = next((p for p in map(G.producer, fc.inputs) if p is not None and p.op == "MatMul"), None)
            if fc is None or fc.op not in ("Gemm", "MatMul"):
                continue
            return ConvIntoFc(node, conv, reshape, fc, bias_add, G.producer(fc.inputs[0]))
        return None

    def check(self, m: ConvIntoFc, ctx):
        lin = L.conv_of(m.conv)
        if not lin:
            return lin.reason
        fc_w = _fc_affine(m)
        if isinstance(fc_w, str):
            return fc_w
        reason = _shared_or_escaping(m, ctx.graph) or _geometry(m, lin, *fc_w[0].shape)
        if reason:
            return reason
        m.lin, m.fc_affine = lin, fc_w
        return None

    def rewrite(self, m: ConvIntoFc, ctx):
        graph = ctx.graph
        w, b = m.fc_affine
        mat, rep = K.conv_as_matrix(m.lin.spec, tuple(int(d) for d in m.lin.x.shape[2:]))
        w, b = w + mat, b + rep  # b: broadcast against [F_out] as the FC's bias was
        dtype = L.data_dtype(m.fc.inputs[1])
        fc = m.fc
        transposed = fc.op == "Gemm" and int(fc.attrs.get("transB", 0))
        fc.inputs[1] = G.new_weight(graph, f"{fc.name}.weight", w if transposed else w.T, dtype)
        bias = G.new_weight(graph, f"{fc.name}.bias", b, dtype)
        if m.bias_add is not None:
            i = [k for k, t in enumerate(m.bias_add.inputs) if t is not m.fc.outputs[0]][0]
            m.bias_add.inputs[i] = bias
        elif fc.op == "Gemm":
            fc.attrs["alpha"], fc.attrs["beta"] = 1.0, 1.0
            if len(fc.inputs) > 2:
                fc.inputs[2] = bias
            else:
                fc.inputs.append(bias)
        elif np.any(b != 0):  # a MatMul has no bias input: the same product as a Gemm has one
            fc.op, fc.attrs = "Gemm", {"transB": 0}
            fc.inputs.append(bias)
        names = [m.add.name, m.conv.name, fc.name]
        out = m.add.outputs[0]
        G.remove_node(m.add)
        G.remove_node(m.conv)
        m.reshape.outputs[0] = out  # the Reshape now writes the sum (and keeps its name)
        k = "×".join(map(str, m.lin.spec.kernel_shape))
        return Rewrite("", names, [fc.name], f"Conv {k} g={m.lin.spec.group} → {fc.op} {w.shape[1]}→{w.shape[0]}")


def _shared_or_escaping(m: ConvIntoFc, graph: gs.Graph) -> str | None:
    """Weights read by anyone else, or intermediates seen by anyone else, forbid the rewrite."""
    for node in filter(None, (m.conv, m.fc, m.bias_add)):
        for t in node.inputs:
            reason = G.shared_constant_reason(t)
            if reason:
                return reason
    private = [m.conv.outputs[0], m.reshape.outputs[0], m.reshape.inputs[0]]
    if m.bias_add is not None:
        private.append(m.fc.outputs[0])
    for t in private:
        reason = G.fan_out_reason(graph, t)
        if reason:
            return reason
    return None


def _geometry(m: ConvIntoFc, lin: L.LinearOp, f_out: int, f_in: int) -> str | None:
    """The FC reads flatten(x) of the conv's x, on a static map, and its output Reshape gives
    exactly the conv's output shape [N, O, oh, ow]."""
    x = lin.x
    if m.flatten is None or m.flatten.op not in ("Flatten", "Reshape") or m.flatten.inputs[0] is not x:
        return f"the FC does not read a Flatten/Reshape of the Conv's input '{x.name}'"
    shape = x.shape
    if shape is None or len(shape) != lin.spec.rank + 2 or not _static(shape[1:]):
        return f"spatial size of '{x.name}' is not static ({_show(shape)})"
    dt = G.dtype_of(x)
    if dt is not None and not np.issubdtype(dt, np.floating):
        return f"'{x.name}' is not floating point"
    batch, chw = shape[0], tuple(int(d) for d in shape[1:])
    reason = _flattens_from_axis_1(m.flatten, batch, chw)
    if reason:
        return reason
    if f_in != math.prod(chw):
        return f"FC reads {f_in} features, the flattened input has {math.prod(chw)}"
    conv_out = (lin.spec.cout,) + lin.spec.output_shape(chw[1:])
    if min(conv_out) <= 0:
        return f"the Conv makes an empty output {_show(conv_out)}"
    if f_out != math.prod(conv_out):
        return f"FC makes {f_out} features, the Conv makes {math.prod(conv_out)} ({_show(conv_out)})"
    target = _reshape_target(m.reshape)
    if target is None:
        return "output Reshape's target shape is not constant"
    allowzero = int(m.reshape.attrs.get("allowzero", 0))
    for n in _batches(batch):
        got = _reshaped((n, f_out), target, allowzero)
        if got != (n,) + conv_out:
            return f"output Reshape gives {_show(got)} for batch {n}, the Conv makes {_show((n,) + conv_out)}"
    return None


def _fc_affine(m: ConvIntoFc) -> tuple[np.ndarray, np.ndarray] | str:
    """The FC as (W [F_out, F_in], b) in float64 with alpha and beta applied, b broadcastable
    against [F_out] without changing the output shape; or the reason it cannot be read."""
    fc = m.fc
    w = G.const(fc.inputs[1]) if len(fc.inputs) > 1 else None
    if w is None or w.ndim != 2:
        return f"{fc.op} weight is not a constant matrix"
    if not np.issubdtype(w.dtype, np.floating):
        return f"{fc.op} weight is not floating point"
    if fc.op == "MatMul":
        if G.rank(fc.inputs[0]) != 2:
            return "MatMul input is not 2-D"
        w = w.T.astype(np.float64)
        if m.bias_add is None:
            return w, np.zeros(w.shape[0])
        if len(m.bias_add.inputs) != 2:
            return "bias Add does not have two inputs"
        other = [t for t in m.bias_add.inputs if t is not fc.outputs[0]]
        b = G.const(other[0]) if len(other) == 1 else None
        if b is None:
            return "FC bias (the Add after the MatMul) is not constant"
        return _bias(w, b, 1.0)
    if int(fc.attrs.get("transA", 0)):
        return "Gemm with transA=1"
    alpha, beta = float(fc.attrs.get("alpha", 1.0)), float(fc.attrs.get("beta", 1.0))
    w = alpha * (w if int(fc.attrs.get("transB", 0)) else w.T).astype(np.float64)
    if len(fc.inputs) < 3 or not fc.inputs[2].name:
        return w, np.zeros(w.shape[0])
    c = G.const(fc.inputs[2])
    if c is None:
        return "Gemm bias is not constant"
    return _bias(w, c, beta)


def _bias(w: np.ndarray, c: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray] | str:
    """(W, scale·c) with c one value per output feature (or one for all), as [F] or [1, F]."""
    f = w.shape[0]
    if c.ndim > 2 or (c.ndim and c.shape[-1] not in (1, f)) or (c.ndim == 2 and c.shape[0] != 1):
        return f"FC bias of shape {list(c.shape)} is not one value per output feature"
    return w, np.broadcast_to(scale * c.astype(np.float64), (1, f) if c.ndim == 2 else (f,)).copy()


def _flattens_from_axis_1(node: gs.Node, batch, chw: tuple[int, ...]) -> str | None:
    if node.op == "Flatten":
        axis = int(node.attrs.get("axis", 1)) % (len(chw) + 1)
        return None if axis == 1 else f"Flatten on axis {axis}, not 1"
    target = _reshape_target(node)
    if target is None:
        return "input Reshape's target shape is not constant"
    allowzero = int(node.attrs.get("allowzero", 0))
    for n in _batches(batch):
        got = _reshaped((n,) + chw, target, allowzero)
        if got != (n, math.prod(chw)):
            return f"Reshape of the input to {_show(got)} for batch {n} does not flatten from axis 1"
    return None


def _reshaped(in_shape: tuple[int, ...], target: np.ndarray, allowzero: int) -> tuple[int, ...] | None:
    """ONNX Reshape's output shape, or None where the target is invalid for in_shape."""
    dims = [int(d) for d in np.asarray(target).reshape(-1)]
    out = []
    for i, d in enumerate(dims):
        if d == 0 and not allowzero:
            if i >= len(in_shape):
                return None
            d = in_shape[i]
        out.append(d)
    total = math.prod(in_shape)
    if out.count(-1) > 1:
        return None
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        if known == 0 or total % known:
            return None
        out[out.index(-1)] = total // known
    return tuple(out) if math.prod(out) == total else None


def _reshape_target(node: gs.Node) -> np.ndarray | None:
    if len(node.inputs) > 1:
        return G.const(node.inputs[1])
    shape = node.attrs.get("shape")  # Reshape-1
    return None if shape is None else np.asarray(shape)


def _batches(batch) -> tuple[int, ...]:
    return (int(batch),) if isinstance(batch, (int, np.integer)) and batch > 0 else PROBE_BATCHES


def _static(dims) -> bool:
    return all(isinstance(d, (int, np.integer)) and d > 0 for d in dims)


def _show(shape) -> str:
    return "unknown" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"
