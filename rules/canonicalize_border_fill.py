"""canonicalize_border_fill: a Pad whose border is then overwritten with per-channel constants.

    y → Pad(0) → ScatterND(c) → ScatterND(c) → … → z          (slice assignment out[:, :, :p] = c,
  ⇒ y → Sub(c) → Pad(0) → Add(c) → z                           as the exporters write it)

The legacy exporter writes the ScatterNDs directly; the dynamo exporter moves each sliced axis to
the front with Transposes around them. Transposes inside the chain are followed too, as long as
their net permutation is the identity. Without its optimizer the dynamo exporter also copies each
assignment back over the whole padded tensor (ScatterND(t, Range(0, N), assigned(t)): t feeds
both); such a copy is followed through its updates when its indices provably cover all of t.

Both compute "y in the interior, c[channel] on the border". The Sub/Pad/Add form is the one the
linear-region walk understands: when y = conv1×1(x) + b with b = c (DBB's BN-and-pad), the
Sub cancels the bias, the Pad moves onto x, and the Add restores the border, so a following K×K
conv composes exactly. The rewrite is exact for any y; it also replaces k ScatterNDs by two
element-wise ops.

Checked, on a static shape with constant indices and updates, by replaying the ScatterNDs on a
marker array of the padded shape: every border element must be written, with a value that depends
on the channel only, and no interior element may be written.

On symbolic dims (a dynamic batch, H or W) the exporters compute the indices and updates from
Shape(...) of the padded tensor or of the input. Then the proof holds for every value of the dims,
without sampling (onnxrep.symbolic): the index arithmetic is evaluated as affine functions of the
symbols and of the index's own coordinates; each ScatterND must write a grid (each index component
runs over one axis of the indices: a constant, a list, or a range b + i); the padded tensor's axes
are cut into pieces every write covers whole or not at all (a static axis element by element; a
symbolic padded axis of size D = X + p + q into its p leading positions, the interior [p, D - q) and
its q trailing positions; a symbolic unpadded axis, the batch, whole), and the chain is replayed on
one marker per piece. The fill must be a constant per channel (Expand of a constant to a symbolic
shape is). Nodes that only compute those indices and updates (Shape of the padded tensor, Range,
Expand, ...) may read the chain's tensors and are removed with it; any other reader is fan-out.
What cannot be shown for every value of the dims is declined, naming --input-shape.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from dataclasses import dataclass, field

from onnxrep import graph as G
from onnxrep import linear as L
from onnxrep import symbolic as S
from onnxrep.engine import Rewrite, Rule


@dataclass
class BorderFill:
    pad: gs.Node
    chain: list  # the ScatterND/Transpose nodes from the Pad to the anchor, in execution order
    layouts: dict = field(default_factory=dict)  # id(tensor) -> its axes as axes of the padded tensor
    values: np.ndarray | None = None  # per-channel border value, set by check
    support: list = field(default_factory=list)  # nodes that only compute the chain's indices/updates


class CanonicalizeBorderFill(Rule):
    name = "canonicalize_border_fill"
    description = "rewrite Pad + ScatterND border fills (slice assignment) as Sub → Pad → Add so branches can merge"
    anchors = ("ScatterND", "Transpose")

    def match(self, node, ctx):
        out = node.outputs[0]
        if any(_continues(r, out) for r in out.outputs):
            return None  # not the last of the chain
        found = _walk(node)
        if found is None:
            return None
        pad, chain = found
        if not any(n.op == "ScatterND" for n in chain):
            return None
        layouts = _layouts(pad, chain)
        if layouts is None or layouts[id(out)] != sorted(layouts[id(out)]):
            return None  # the chain ends in another layout: a real Transpose, not a border fill
        return BorderFill(pad, chain, layouts)

    def check(self, match, ctx):
        pad, chain = match.pad, match.chain
        lin = L.pad_of(pad)
        if not lin:
            return lin.reason
        if _constant_chain(match):
            return self._check_constant(match, lin, ctx)
        try:
            reason = _check_symbolic(match, lin, ctx)
        except _Reject as e:
            return str(e)
        except (ValueError, IndexError, KeyError, TypeError) as e:  # a pattern this analysis does not expect
            return f"cannot analyse the border fill ({type(e).__name__}: {e})"
        except S.Unknown as e:
            _hint_pin_shape(ctx)
            return (f"cannot prove the border fill for every value of the symbolic dims ({e}): "
                    "pin them with --input-shape")
        return reason

    def _check_constant(self, match, lin, ctx):
        """Constant indices and updates on a static shape: replay the chain on a marker array."""
        pad, chain = match.pad, match.chain
        links = [pad.outputs[0]] + [n.outputs[0] for n in chain[:-1]]
        for t in links:
            reason = G.fan_out_reason(ctx.graph, t)
            if reason:
                return reason
        for n in chain:
            if n.op == "ScatterND" and n.attrs.get("reduction", "none") not in ("none", b"none"):
                return "ScatterND with a reduction"
        shape = G.static_shape(pad.outputs[0])
        fill = _replay(shape, chain)
        r = len(shape)
        sp = lin.spec.pads
        interior = (slice(None), slice(None)) + tuple(
            slice(sp[a], shape[a + 2] - sp[a + r - 2]) for a in range(r - 2))
        inner_mask = np.zeros(shape, dtype=bool)
        inner_mask[interior] = True
        if np.any(~np.isnan(fill[inner_mask])):
            return "ScatterND writes inside the padded region"
        border = np.where(inner_mask, np.nan, fill)
        if np.any(np.isnan(border[~inner_mask])):
            return "ScatterND does not cover the whole border"
        per_channel = np.moveaxis(border, 1, 0).reshape(shape[1], -1)
        vals = np.nanmax(per_channel, axis=1)
        if np.any(np.nanmin(per_channel, axis=1) != vals):
            return "border values vary within a channel"
        match.values = vals
        return None

    def rewrite(self, match, ctx):
        pad, chain, vals = match.pad, match.chain, match.values
        rank = len(match.layouts[id(pad.outputs[0])])
        dtype = L.data_dtype(pad.outputs[0], *[n.inputs[2] for n in chain if n.op == "ScatterND"])
        c = G.new_constant(ctx.graph, f"{pad.name}/border_value",
                           vals.astype(dtype).reshape((1, -1) + (1,) * (rank - 2)))
        y = pad.inputs[0]
        out = chain[-1].outputs[0]
        shifted = G.new_variable(ctx.graph, f"{pad.name}/minus_border", dtype=out.dtype, shape=y.shape)
        padded = pad.outputs[0]
        names = [n.name for n in chain]
        for n in chain + match.support:
            G.remove_node(n)
        sub = gs.Node("Sub", G.unique_node_name(ctx.graph, f"{pad.name}/Sub"), inputs=[y, c], outputs=[shifted])
        pad.inputs[0] = shifted
        add = gs.Node("Add", G.unique_node_name(ctx.graph, f"{pad.name}/Add"), inputs=[padded, c], outputs=[out])
        ctx.graph.nodes.extend([sub, add])
        detail = f"{len(chain)} ScatterND/Transpose"
        if match.support:
            detail += f", {len(match.support)} nodes of index arithmetic"
        return Rewrite("", names, [sub.name, add.name], detail)


CHAIN_OPS = ("ScatterND", "Transpose")


def _continues(reader: gs.Node, t: gs.Tensor) -> bool:
    """Whether `reader` carries the border-filled tensor `t` on (as data, or as a ScatterND's updates)."""
    if reader.op == "Transpose":
        return reader.inputs[0] is t
    return reader.op == "ScatterND" and len(reader.inputs) == 3 and (reader.inputs[0] is t or reader.inputs[2] is t)


def _walk(anchor: gs.Node, limit: int = 64):
    """(Pad, chain) when every path that carries data back from `anchor` through Transposes and
    ScatterNDs (data, or updates when those come from the same padded tensor) ends at one Pad."""
    chain: list[gs.Node] = []
    pads: set[int] = set()
    found: dict[int, bool] = {}
    pad_node = None

    def derived(t: gs.Tensor) -> bool:
        nonlocal pad_node
        p = G.producer(t)
        if p is None:
            return False
        if p.op == "Pad":
            pads.add(id(p))
            pad_node = p
            return True
        if p.op not in CHAIN_OPS or len(chain) > limit:
            return False
        if id(p) not in found:
            found[id(p)] = False
            found[id(p)] = visit(p)
        return found[id(p)]

    def visit(n: gs.Node) -> bool:
        if n.op == "Transpose":
            ok = derived(n.inputs[0])
        elif len(n.inputs) == 3:
            ok = derived(n.inputs[0]) | derived(n.inputs[2])
        else:
            ok = False
        if ok:
            chain.append(n)
        return ok

    if not visit(anchor) or len(pads) != 1:
        return None
    return pad_node, chain


def _layouts(pad: gs.Node, chain: list) -> dict | None:
    """For each tensor of the chain, which axis of the padded tensor each of its axes is."""
    r = G.rank(pad.outputs[0]) or G.rank(pad.inputs[0])
    if not r:
        return None
    out = {id(pad.outputs[0]): list(range(r))}
    for n in chain:
        if n.op == "Transpose":
            p = n.attrs.get("perm") or list(range(r))[::-1]
            src = out.get(id(n.inputs[0]))
            if src is None or len(p) != r:
                return None
            out[id(n.outputs[0])] = [src[i] for i in p]
        else:  # a copy of the updates (checked to be a whole-tensor copy) or the data with writes
            src = out.get(id(n.inputs[2]), out.get(id(n.inputs[0])))
            if src is None:
                return None
            out[id(n.outputs[0])] = src
    return out


def _constant_chain(match) -> bool:
    """A linear chain with constant indices and updates on a static shape (the replay handles it)."""
    return (G.static_shape(match.pad.outputs[0]) is not None
            and all(id(n.inputs[2]) not in match.layouts and G.const(n.inputs[1]) is not None
                    and G.const(n.inputs[2]) is not None for n in match.chain if n.op == "ScatterND"))


# -- symbolic shapes: every value of the dims at once -------------------------------------------------
def _check_symbolic(match, lin, ctx) -> str | None:
    """Prove the chain writes exactly the border, with one value per channel, for every value of the
    symbolic dims: the padded tensor's axes are cut into atoms (each border row/column of a symbolic
    axis, its interior as one block; a static axis element by element; a symbolic unpadded axis
    whole), each ScatterND's write set is shown to be a product of whole atoms, and the chain is
    replayed on one marker per atom. Raises S.Unknown when the index arithmetic cannot be followed."""
    pad, chain, layouts = match.pad, match.chain, match.layouts
    padded = pad.outputs[0]
    for n in chain:
        if n.op == "ScatterND" and n.attrs.get("reduction", "none") not in ("none", b"none"):
            return "ScatterND with a reduction"
    dims = _pad_dims(pad, lin)
    if dims is None:
        return "the padded tensor's shape is not known"
    r = len(dims)
    sp = lin.spec.pads
    axes = [_Atoms(d, sp[a - 2], sp[a - 2 + r - 2], a) if a >= 2 else _Atoms(d, 0, 0, a, padded=False)
            for a, d in enumerate(dims)]
    if dims[1].static is None:
        return "the channel count is not known"
    if int(np.prod([ax.count for ax in axes])) > _MAX_ATOMS:
        return "the padded tensor is too large to check element by element"
    reason = _support(match, ctx)
    if reason:
        return reason

    def shape_of(t):
        lay = layouts.get(id(t))
        return None if lay is None else tuple(dims[a] for a in lay)

    ev = S.Evaluator(shape_of)
    marks = {id(padded): np.full([ax.count for ax in axes], np.nan)}
    for n in chain:
        src = marks[id(n.inputs[0])] if n.op == "Transpose" or id(n.inputs[2]) not in layouts else None
        if n.op == "Transpose":
            marks[id(n.outputs[0])] = src
            continue
        data, idx, upd = n.inputs
        index = ev.value(idx)
        k = index.shape[-1].static if index.rank else None
        if k is None or not 1 <= k <= r:
            return "ScatterND indices of unknown depth"
        fill = None
        if id(upd) not in layouts:
            try:
                fill = ev.value(upd)
            except S.Unknown as e:
                return f"ScatterND updates are not constant ({e})"
        comps = [index.component(j) for j in range(k)]
        deps = [c.depends_on() for c in comps]
        if any(len(d) > 1 for d in deps) or len(set().union(*deps)) != sum(map(len, deps)):
            return "ScatterND indices are not a grid of rows and columns"
        if id(upd) in layouts:  # updates carry the padded tensor: a copy of all of it
            if not S.whole_copy(index, ev.shape(data)):
                return "ScatterND copies a padded tensor into part of another"
            marks[id(n.outputs[0])] = marks[id(upd)]
            continue
        lay = layouts[id(data)]
        box = [list(range(ax.count)) for ax in axes]
        sets = {}
        for j, c in enumerate(comps):
            a = lay[j]
            sets[a] = _positions(c, deps[j], index)
            box[a] = axes[a].atoms(sets[a])
        values = _fill_values(fill, lay, k, index.rank - 1, deps, sets)
        if isinstance(values, str):
            return values
        out = src.copy()
        channels = box[1]
        v = np.array([values[axes[1].position(c)] for c in channels])
        out[np.ix_(*box)] = v.reshape((1, -1) + (1,) * (r - 2))
        marks[id(n.outputs[0])] = out
    final = marks[id(chain[-1].outputs[0])]
    inner = np.ones(final.shape, bool)
    for a, ax in enumerate(axes[2:], start=2):
        shape = [1] * r
        shape[a] = ax.count
        inner &= ax.interior_mask().reshape(shape)
    if np.any(~np.isnan(final[inner])):
        return "ScatterND writes inside the padded region"
    if np.any(np.isnan(final[~inner])):
        return "ScatterND does not cover the whole border"
    per_channel = np.moveaxis(np.where(inner, np.nan, final), 1, 0).reshape(final.shape[1], -1)
    vals = np.nanmax(per_channel, axis=1)
    if np.any(np.nanmin(per_channel, axis=1) != vals):
        return "border values vary within a channel"
    match.values = vals
    return None


_MAX_ATOMS = 1 << 24


def _pad_dims(pad: gs.Node, lin) -> list | None:
    """The padded tensor's dims as S.Poly: the Pad input's (symbolic) dims plus the pads."""
    from onnxrep.folding import symbolic_dims

    xd = symbolic_dims(pad.inputs[0])
    if xd is None or any(d is None for d in xd):
        xd = S.Evaluator()._data_shape(pad.inputs[0])
        if xd is None:
            return None
    else:  # folding's Dim: coef · Π symbols, the same monomial as onnxrep.symbolic's
        xd = [S.Poly.monomial(d.syms, d.coef) for d in xd]
    r = len(xd)
    return [x + lin.spec.pads[a - 2] + lin.spec.pads[a - 2 + r - 2] if a >= 2 else x for a, x in enumerate(xd)]


class _Atoms:
    """An axis of the padded tensor cut into pieces that every write covers whole or not at all.
    Static axes: one atom per element. A symbolic padded axis of size D = X + p + q: the p leading
    border positions, the interior [p, D - q) as one atom, the q trailing positions. A symbolic
    unpadded axis (the batch): one atom, written whole or not at all."""

    def __init__(self, dim, p: int, q: int, axis: int, padded: bool = True):
        self.dim, self.p, self.q, self.axis, self.padded = dim, p, q, axis, padded
        self.static = dim.static
        self.count = self.static if self.static is not None else (p + 1 + q if padded else 1)

    def interior_mask(self) -> np.ndarray:
        if self.static is not None:
            i = np.arange(self.static)
            return (i >= self.p) & (i < self.static - self.q)
        return np.arange(self.count) == self.p

    def position(self, atom: int) -> int:
        return atom  # channel atoms (static) are positions

    def _what(self) -> str:
        return "the batch" if self.axis == 0 else f"axis {self.axis}"

    def atoms(self, where) -> list[int]:
        """Atoms of a set of positions: ("points", [Lin]) or ("range", lo, hi) (hi exclusive)."""
        if where[0] == "range":
            lo, hi = where[1], where[2]
            if self.static is None and not self.padded:
                if lo == S.Poly(0) and hi == self.dim:
                    return [0]
                raise _Reject(f"ScatterND indices do not cover all of {self._what()} (positions {lo} to {hi} "
                              f"of {self.dim})")
            if self.static is not None:
                if lo.static is None or hi.static is None:
                    raise S.Unknown(f"index range {lo}..{hi} on an axis of static size {self.static}")
                return self.atoms(("points", [S.Poly(i) for i in range(lo.static, hi.static)]))
            b0, b1 = self._boundary(lo), self._boundary(hi)
            return list(range(b0, b1))
        out = []
        for e in where[1]:
            if not e.nonneg():
                raise S.Unknown(f"ScatterND index {e} may be negative")
            if self.static is not None:
                if e.static is None or not 0 <= e.static < self.static:
                    raise S.Unknown(f"ScatterND index {e} on an axis of size {self.static}")
                out.append(e.static)
            elif not self.padded:
                raise _Reject(f"ScatterND indices do not cover all of {self._what()} (index {e} of {self.dim})")
            elif e.static is not None and e.static < self.p:
                out.append(e.static)
            elif (e - self.dim).static is not None and -self.q <= (e - self.dim).static < 0:
                out.append(self.p + 1 + (e - self.dim).static + self.q)
            elif e.ge(self.p) and (self.dim - self.q - 1).ge(e):
                raise _Reject(f"ScatterND writes part of the interior of axis {self.axis} (not whole border rows)")
            else:
                raise S.Unknown(f"ScatterND index {e} on axis {self.axis} of size {self.dim}")
        return out

    def _boundary(self, x) -> int:
        if x.static is not None and 0 <= x.static <= self.p:
            return x.static
        off = (x - self.dim).static
        if off is not None and -self.q <= off <= 0:
            return self.p + 1 + self.q + off
        if x.ge(self.p + 1) and (self.dim - self.q - 1).ge(x):
            raise _Reject(f"ScatterND writes part of the interior of axis {self.axis} (not whole border rows)")
        raise S.Unknown(f"index bound {x} on axis {self.axis} of size {self.dim}")


class _Reject(S.Unknown):
    """A decline that holds for every value of the symbols (not a failure to prove)."""


def _positions(comp, deps: set, index) -> tuple:
    """The set of values one index component takes over the indices tensor."""
    if not deps:
        return ("points", [comp.scalar()[0]])
    (t,) = deps
    if index.shape[t].static is not None:
        return ("points", [comp.at({t: i}).scalar()[0] for i in range(index.shape[t].static)])
    base, coord = comp.scalar()
    step = coord.get(t, 0)
    d = index.shape[t]
    if step == 1:
        return ("range", base, base + d)
    if step == -1:
        return ("range", base - d + 1, base + 1)
    raise S.Unknown(f"ScatterND index {base} + {step}·i over a symbolic axis")


def _fill_values(upd, lay, k, q, deps, sets):
    """{channel: value} a fill ScatterND writes, or the reason it is not one value per channel."""
    if not upd.numeric or upd.num.dtype.kind != "f":
        return "ScatterND updates are not constant (they depend on the symbolic dims)"
    jc = lay.index(1)
    if jc >= k:  # channel is an axis of the updates
        u = q + jc - k
        if upd.depends_on() - {u}:
            return "border values vary within a channel"
        count = upd.shape[u].static
        if count is None:
            return "the channel count is not known"
        v = np.broadcast_to(np.moveaxis(upd.num, u, 0).reshape(upd.num.shape[u], -1)[:, 0], (count,))
        return {c: float(v[c]) for c in range(count)}
    # channel is one of the indices: its values pick the channel
    t = next(iter(deps[jc]), None)
    if upd.depends_on() - ({t} if t is not None else set()):
        return "border values vary within a channel"
    if sets[1][0] != "points":
        return "a channel index that runs over a symbolic axis"
    chans = sets[1][1]
    out = {}
    for i, ch in enumerate(chans):
        if ch.static is None:
            return "a channel index that depends on the symbolic dims"
        val = float(upd.at({t: i}).num.reshape(-1)[0]) if t is not None else float(upd.num.reshape(-1)[0])
        if out.get(ch.static, val) != val:
            return "border values vary within a channel"
        out[ch.static] = val
    return out


def _support(match, ctx) -> str | None:
    """Find the nodes that only compute this chain's indices and updates (Shape of the padded
    tensor, Range, Expand, ...: removed with it), and refuse if a tensor of the chain is read by
    anything else."""
    chain_ids = {id(n) for n in match.chain}
    links = [match.pad.outputs[0]] + [n.outputs[0] for n in match.chain[:-1]]
    link_ids = {id(t) for t in links}
    for t in links:
        if G.is_graph_output(ctx.graph, t):
            return f"intermediate '{t.name}' is a graph output"
    pool: dict[int, gs.Node] = {}
    stack = [t for n in match.chain if n.op == "ScatterND" for t in n.inputs if id(t) not in link_ids]
    while stack and len(pool) < 4096:
        t = stack.pop()
        p = G.producer(t)
        if p is None or id(p) in pool or id(p) in chain_ids:
            continue
        pool[id(p)] = p
        stack.extend(i for i in p.inputs if id(i) not in link_ids)
    changed = True
    while changed:
        changed = False
        for key, n in list(pool.items()):
            if any(G.is_graph_output(ctx.graph, o) or any(id(r) not in chain_ids and id(r) not in pool
                                                            for r in o.outputs) for o in n.outputs):
                del pool[key]
                changed = True
    for t in links:
        for r in t.outputs:
            if id(r) not in chain_ids and id(r) not in pool:
                return f"the padded tensor '{t.name}' is also read by {r.op} '{r.name}' (fan-out)"
    match.support = list(pool.values())
    return None


def _hint_pin_shape(ctx) -> None:
    """One note per run, in the summary (not only --explain): the user can fix this one."""
    dynamic = [t for t in ctx.graph.inputs if t.shape is not None and any(not isinstance(d, int) for d in t.shape)]
    if not dynamic:
        return  # nothing to pin: the decline reason says what failed
    example = ""
    if len(dynamic) == 1 and all(isinstance(d, int) for d in dynamic[0].shape[1:]):
        t = dynamic[0]
        example = f" {t.name}:{','.join(['1'] + [str(d) for d in t.shape[1:]])}"
    note = ("slice-assignment border fills (DBB / ECB-style BN-and-pad) whose index arithmetic onnxrep cannot "
            "follow for every value of the symbolic dims stay unmerged: pin the shape with "
            f"--input-shape{example} (input_shapes= in Python; the output then has that fixed shape)")
    if note not in ctx.notes:
        ctx.notes.append(note)


def _replay(shape, chain) -> np.ndarray:
    """The chain applied to NaN-filled padded data: NaN where the data survives, else the value."""
    fill = np.full(shape, np.nan)
    for n in chain:
        if n.op == "Transpose":
            fill = np.transpose(fill, n.attrs.get("perm") or None)
            shape = fill.shape
            continue
        idx = G.const(n.inputs[1]).astype(np.int64)
        upd = G.const(n.inputs[2]).astype(np.float64)
        k = idx.shape[-1]
        flat_idx = idx.reshape(-1, k)
        flat_upd = upd.reshape((flat_idx.shape[0],) + tuple(shape[k:]))
        fill[tuple(flat_idx.T)] = flat_upd  # later writes win, as in ScatterND
    return fill
