"""Structural checks that onnx.checker lets through: a model the rules would trip over.

onnx.checker (even with full_check) accepts a Conv whose group does not divide its channels, a
BatchNormalization whose statistics have the wrong length, a Gemm whose inner dims disagree, ...
ONNX Runtime may or may not refuse them, and with --no-verify nothing runs them at all. Checked
once, on the prepared graph (shapes inferred, constants folded), by optimizer.prepare; each
failure is an InputError (exit 3) naming the node.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from . import graph as G
from .errors import InputError


def _dims(t: gs.Tensor | None) -> list | None:
    if t is None or not t.name:
        return None
    return None if t.shape is None else list(t.shape)


def _known(d) -> bool:
    return isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0


def _ints(node: gs.Node, name: str) -> list[int] | None:
    v = node.attrs.get(name)
    return None if v is None else [int(x) for x in v]


def _conv(node: gs.Node) -> str | None:
    x, w = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
    wd, xd = _dims(w), _dims(x)
    if wd is None:
        return None
    if len(wd) < 3:
        return f"weight '{w.name}' has rank {len(wd)}, a Conv needs 3 or more"
    if xd is not None and len(xd) != len(wd):
        return f"input '{x.name}' has rank {len(xd)} but weight '{w.name}' has rank {len(wd)}"
    group = int(node.attrs.get("group", 1))
    spatial = len(wd) - 2
    if group < 1:
        return f"group is {group}"
    transpose = node.op == "ConvTranspose"
    # Conv: W[M, C/g, k...] reads C = W[1]*g channels; ConvTranspose: W[C, M/g, k...] reads C = W[0]
    cin = wd[0] if transpose else (wd[1] * group if _known(wd[1]) else None)
    if not transpose and _known(wd[0]) and wd[0] % group:
        return f"group {group} does not divide the {wd[0]} output channels of weight '{w.name}'"
    if transpose and _known(wd[0]) and wd[0] % group:
        return f"group {group} does not divide the {wd[0]} input channels of weight '{w.name}'"
    if xd is not None and cin is not None and _known(xd[1]) and xd[1] != cin:
        return (f"input '{x.name}' has {xd[1]} channels but weight '{w.name}' {list(wd)} with group {group} "
                f"reads {cin}")
    kernel = _ints(node, "kernel_shape")
    if kernel is not None and all(_known(d) for d in wd[2:]) and kernel != [int(d) for d in wd[2:]]:
        return f"kernel_shape {kernel} disagrees with weight '{w.name}' {list(wd)}"
    for name, n in (("strides", spatial), ("dilations", spatial), ("pads", 2 * spatial)):
        v = _ints(node, name)
        if v is None:
            continue
        if len(v) != n:
            return f"{name} has {len(v)} values, the {spatial}-D kernel needs {n}"
        if name != "pads" and any(s < 1 for s in v):
            return f"{name} {v} must be >= 1"
        if name == "pads" and any(p < 0 for p in v):
            return f"pads {v} must be >= 0"
    if len(node.inputs) > 2 and node.inputs[2].name:
        bd = _dims(node.inputs[2])
        cout = wd[1] * group if transpose and _known(wd[1]) else (None if transpose else wd[0])
        if bd is not None and (len(bd) != 1 or (_known(bd[0]) and _known(cout) and bd[0] != cout)):
            return f"bias '{node.inputs[2].name}' has shape {bd}, the conv has {cout} output channels"
    return None


def _batchnorm(node: gs.Node) -> str | None:
    xd = _dims(node.inputs[0])
    if xd is not None and len(xd) < 2:
        return f"input '{node.inputs[0].name}' has rank {len(xd)}, BatchNormalization needs 2 or more"
    c = xd[1] if xd is not None and _known(xd[1]) else None
    for t in node.inputs[1:5]:
        d = _dims(t)
        if d is None:
            continue
        if len(d) != 1:
            return f"'{t.name}' has shape {d}, BatchNormalization needs a vector"
        if c is not None and _known(d[0]) and d[0] != c:
            return f"'{t.name}' has {d[0]} values for {c} channels"
    return None


def _gemm(node: gs.Node) -> str | None:
    a, b = (_dims(t) for t in node.inputs[:2])
    for t, d in zip(node.inputs[:2], (a, b)):
        if d is not None and len(d) != 2:
            return f"'{t.name}' has rank {len(d)}, Gemm needs 2"
    if a is None or b is None:
        return None
    k_a = a[0] if int(node.attrs.get("transA", 0)) else a[1]
    k_b = b[1] if int(node.attrs.get("transB", 0)) else b[0]
    if _known(k_a) and _known(k_b) and k_a != k_b:
        return f"inner dims disagree: A {a} and B {b} (transA={node.attrs.get('transA', 0)}, transB={node.attrs.get('transB', 0)})"
    return None


def _matmul(node: gs.Node) -> str | None:
    a, b = (_dims(t) for t in node.inputs[:2])
    if a is None or b is None or not a or not b:
        return None
    k_a, k_b = a[-1], b[0] if len(b) == 1 else b[-2]
    if _known(k_a) and _known(k_b) and k_a != k_b:
        return f"inner dims disagree: {a} @ {b}"
    return None


def _reshape(node: gs.Node) -> str | None:
    """A constant target whose element count cannot be the input's (static) one."""
    xd, target = _dims(node.inputs[0]), G.const(node.inputs[1]) if len(node.inputs) > 1 else None
    if xd is None or target is None or not all(_known(d) for d in xd) or target.ndim != 1:
        return None
    allowzero = int(node.attrs.get("allowzero", 0))
    dims = [int(d) for d in target]
    if not allowzero:
        if any(d == 0 and i >= len(xd) for i, d in enumerate(dims)):
            return f"target {dims} copies dim {len(xd)} or later of a rank-{len(xd)} input"
        dims = [int(xd[i]) if d == 0 else d for i, d in enumerate(dims)]
    if dims.count(-1) > 1 or any(d < -1 for d in dims):
        return f"target {[int(d) for d in target]} is not a shape"
    numel = int(np.prod([int(d) for d in xd]))
    if numel == 0:
        return None
    known = int(np.prod([d for d in dims if d != -1]))
    if (-1 not in dims and known != numel) or (-1 in dims and (known == 0 or numel % known)):
        return f"cannot reshape {list(xd)} ({numel} elements) to {[int(d) for d in target]}"
    return None


CHECKS = {"Conv": _conv, "ConvTranspose": _conv, "BatchNormalization": _batchnorm, "Gemm": _gemm, "MatMul": _matmul,
          "Reshape": _reshape}


def problems(graph: gs.Graph) -> list[str]:
    """'<op> '<node>': <what is wrong>' for every node that fails its structural check."""
    out = []
    for node in graph.nodes:
        check = CHECKS.get(node.op)
        if check is None or len(node.inputs) < (1 if node.op == "BatchNormalization" else 2):
            continue
        reason = check(node)
        if reason:
            who = f"'{node.name}'" if node.name else f"(unnamed, output '{node.outputs[0].name}')"
            out.append(f"{node.op} {who}: {reason}")
    return out


def check_graph(graph: gs.Graph) -> None:
    """Raise InputError (exit 3) naming the first structurally invalid node."""
    found = problems(graph)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise InputError(f"invalid model: {found[0]}{more}")
