"""canonicalize_border_fill: Pad(0) followed by ScatterNDs that write a per-channel constant on the
whole border (slice assignment as exported) becomes Sub(c) → Pad(0) → Add(c)."""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import onnx

from tests.helpers import (assert_equivalent, assert_idempotent, assert_untouched, declined_by,
                           GraphBuilder, ops, run_rules)

RULE = "canonicalize_border_fill"
N, C, H, W = 1, 4, 6, 7


def border_mask(shape, pads):
    """True on the padded border of a tensor of `shape` padded by ONNX `pads` (spatial, begins+ends)."""
    r = len(shape) - 2
    inner = np.zeros(shape, dtype=bool)
    inner[(slice(None), slice(None)) + tuple(slice(pads[a], shape[a + 2] - pads[a + r]) for a in range(r))] = True
    return ~inner


def scatter(b, data, mask, values, **attrs):
    """ScatterND writing values[channel] at every True element of `mask` (element indices, k = rank)."""
    idx = np.argwhere(mask).astype(np.int64)
    upd = np.asarray(values, dtype=np.float64)[idx[:, 1]]
    return b.op("ScatterND", [data, b.ints(idx), b.const(upd)], **attrs)


def scatter_rows(b, data, shape, rows, values):
    """ScatterND with k=3 indices (n, c, h): whole rows of width W' at once."""
    idx = np.array([(n, c, h) for n in range(shape[0]) for c in range(shape[1]) for h in rows], dtype=np.int64)
    upd = np.repeat(np.asarray(values, dtype=np.float64)[idx[:, 1]][:, None], shape[3], axis=1)
    return b.op("ScatterND", [data, b.ints(idx), b.const(upd)])


def padded(b, y, p):
    """y → Pad(0) on H and W by p = (top, left, bottom, right); returns (tensor, padded shape)."""
    t, l, bt, r = p
    out = b.pad(y, [0, 0, t, l, 0, 0, bt, r])
    return out, (N, C, H + t + bt, W + l + r)


def fill_model(seed=0, p=(1, 1, 1, 1), style="one", values=None, head="conv"):
    b = GraphBuilder(seed)
    x = b.input([N, C, H, W])
    y = b.conv(x, C, C, k=1) if head == "conv" else b.relu(x)
    vals = b.rng.standard_normal(C) if values is None else values
    t, shape = padded(b, y, p)
    sp = (p[0], p[1], p[2], p[3])
    mask = border_mask(shape, sp)
    if style == "one":
        t = scatter(b, t, mask, vals)
    elif style == "sides":  # top, bottom, left, right; the corners are written twice
        for side in ("top", "bottom", "left", "right"):
            m = np.zeros(shape, dtype=bool)
            if side == "top":
                m[:, :, : p[0]] = True
            elif side == "bottom":
                m[:, :, shape[2] - p[2]:] = True
            elif side == "left":
                m[:, :, :, : p[1]] = True
            else:
                m[:, :, :, shape[3] - p[3]:] = True
            if m.any():
                t = scatter(b, t, m, vals)
    elif style == "rows":  # whole rows (k=3 indices), then the left/right columns element-wise
        rows = list(range(p[0])) + list(range(shape[2] - p[2], shape[2]))
        t = scatter_rows(b, t, shape, rows, vals)
        cols = np.zeros(shape, dtype=bool)
        cols[:, :, :, : p[1]] = True
        cols[:, :, :, shape[3] - p[3]:] = True
        t = scatter(b, t, cols, vals)
    return b, t


def canonical(model, count=1):
    out, report = run_rules(model, RULE)
    assert ops(out) == {"Conv": 1, "Sub": 1, "Pad": 1, "Add": 1}
    assert report.rule_counts == {RULE: count}
    assert_equivalent(model, out)
    return out


# -- positive ------------------------------------------------------------------------------------
def test_single_scatter_whole_border():
    """One ScatterND writing every border element → Sub/Pad/Add."""
    b, t = fill_model(1, style="one")
    canonical(b.build(t))


def test_four_sides_overlapping_corners():
    """Four ScatterNDs (top, bottom, left, right; corners written twice) → Sub/Pad/Add."""
    b, t = fill_model(2, style="sides")
    canonical(b.build(t))


def test_rows_then_columns():
    """Row-slab ScatterND (k=3 indices) then column ScatterND (k=4) → Sub/Pad/Add."""
    b, t = fill_model(3, style="rows")
    canonical(b.build(t))


def test_asymmetric_padding():
    """Pad (1,2,2,0) with its border filled."""
    b, t = fill_model(4, p=(1, 2, 2, 0), style="sides")
    canonical(b.build(t))


def test_wide_padding():
    """Pad 2 on every side, border filled by one ScatterND."""
    b, t = fill_model(5, p=(2, 2, 2, 2), style="one")
    canonical(b.build(t))


def test_fill_is_graph_output():
    """The filled tensor is a graph output: the Add writes it under the same name."""
    b, t = fill_model(6, style="one")
    model = b.build(t)
    out, report = run_rules(model, RULE)
    assert ops(out) == {"Conv": 1, "Sub": 1, "Pad": 1, "Add": 1}
    assert [o.name for o in out.graph.output] == [t]
    assert_equivalent(model, out)


def test_dbb_bias_fill_merges_with_default_rules():
    """DBB BN-and-pad: Conv1×1(bias b) → Pad → ScatterND(b) → Conv3×3 pad 0; default rules give one Conv."""
    b = GraphBuilder(7)
    x = b.input([N, C, H, W])
    bias = b.rng.standard_normal(C)
    y = b.conv(x, C, C, k=1, bias_name=b.const(bias))
    t, shape = padded(b, y, (1, 1, 1, 1))
    t = scatter(b, t, border_mask(shape, (1, 1, 1, 1)), bias)
    model = b.build(b.conv(t, C, 6, k=3, pad=0))
    out, report = run_rules(model)
    assert ops(out) == {"Conv": 1}
    assert report.rule_counts[RULE] == 1
    assert_equivalent(model, out)
    assert_idempotent(out)


def test_dbb_bn_fill_merges_with_default_rules():
    """Conv1×1 → BN → Pad → ScatterND(BN shift) → Conv3×3 pad 0; default rules give one Conv."""
    b = GraphBuilder(8)
    x = b.input([N, C, H, W])
    gamma, beta, mean, var = (b.rng.uniform(0.5, 1.5, C), b.rng.standard_normal(C), b.rng.standard_normal(C),
                              b.rng.uniform(0.5, 2.0, C))
    y = b.bn(b.conv(x, C, C, k=1, bias=False), C, params=[b.const(v) for v in (gamma, beta, mean, var)])
    shift = (beta.astype(np.float32) - mean.astype(np.float32) * gamma.astype(np.float32)
             / np.sqrt(var.astype(np.float32) + np.float32(1e-5)))
    t, shape = padded(b, y, (1, 1, 1, 1))
    t = scatter(b, t, border_mask(shape, (1, 1, 1, 1)), shift)
    model = b.build(b.conv(t, C, 6, k=3, pad=0))
    out, report = run_rules(model)
    assert ops(out) == {"Conv": 1}
    assert_equivalent(model, out)


# -- negative ------------------------------------------------------------------------------------
declined = partial(declined_by, RULE)


def test_scatter_writes_interior_declined():
    """ScatterND that also writes one interior element: declined."""
    b, t = fill_model(20, style="one")
    m = np.zeros((N, C, H + 2, W + 2), dtype=bool)
    m[:, :, 3, 3] = True
    t = scatter(b, t, m, np.ones(C))
    declined(b.build(b.relu(t)), "inside")


def test_partial_border_declined():
    """ScatterND covering only the top row of the border: declined."""
    b = GraphBuilder(21)
    x = b.input([N, C, H, W])
    t, shape = padded(b, b.relu(x), (1, 1, 1, 1))
    m = np.zeros(shape, dtype=bool)
    m[:, :, 0] = True
    declined(b.build(b.relu(scatter(b, t, m, np.ones(C)))), "cover")


def test_values_vary_within_channel_declined():
    """Border values that differ between top and bottom of one channel: declined."""
    b, t = fill_model(22, style="sides", head="relu")  # top/bottom/left/right with vals
    m = np.zeros((N, C, H + 2, W + 2), dtype=bool)
    m[:, :, -1] = True
    t = scatter(b, t, m, np.full(C, 5.0))  # bottom row overwritten with another value
    declined(b.build(b.relu(t)), "vary")


def test_pad_nonzero_value_declined():
    """Pad with constant value 1 under the fill: declined."""
    b = GraphBuilder(23)
    x = b.input([N, C, H, W])
    t = b.pad(b.relu(x), [0, 0, 1, 1, 0, 0, 1, 1], value=np.float32(1.0))
    shape = (N, C, H + 2, W + 2)
    declined(b.build(b.relu(scatter(b, t, border_mask(shape, (1, 1, 1, 1)), np.arange(C)))), "value")


def test_pad_reflect_declined():
    """Reflect Pad under the fill: declined."""
    b = GraphBuilder(24)
    x = b.input([N, C, H, W])
    t = b.pad(b.relu(x), [0, 0, 1, 1, 0, 0, 1, 1], mode="reflect")
    shape = (N, C, H + 2, W + 2)
    declined(b.build(b.relu(scatter(b, t, border_mask(shape, (1, 1, 1, 1)), np.arange(C)))), "mode")


def test_padded_tensor_fan_out_declined():
    """The padded tensor is also read by another node: declined (fan-out)."""
    b = GraphBuilder(25)
    x = b.input([N, C, H, W])
    t, shape = padded(b, b.relu(x), (1, 1, 1, 1))
    y = scatter(b, t, border_mask(shape, (1, 1, 1, 1)), np.arange(C))
    declined(b.build(b.relu(y), b.relu(t)), "fan-out")


def test_middle_of_chain_is_graph_output_declined():
    """A tensor between two ScatterNDs of the chain is a graph output: declined."""
    b = GraphBuilder(26)
    x = b.input([N, C, H, W])
    t, shape = padded(b, b.relu(x), (1, 1, 1, 1))
    top = np.zeros(shape, dtype=bool)
    top[:, :, 0] = True
    t1 = scatter(b, t, top, np.arange(C))
    t2 = scatter(b, t1, border_mask(shape, (1, 1, 1, 1)) & ~top, np.arange(C))
    declined(b.build(b.relu(t2), t1), "graph output")


def test_scatter_reduction_declined():
    """ScatterND with reduction='add': declined."""
    b = GraphBuilder(27)
    x = b.input([N, C, H, W])
    t, shape = padded(b, b.relu(x), (1, 1, 1, 1))
    y = scatter(b, t, border_mask(shape, (1, 1, 1, 1)), np.arange(C), reduction="add")
    declined(b.build(b.relu(y)), "reduction")


def test_updates_not_constant_declined():
    """ScatterND updates are a graph input: declined."""
    b = GraphBuilder(28)
    x = b.input([N, C, H, W])
    t, shape = padded(b, b.relu(x), (1, 1, 1, 1))
    idx = np.argwhere(border_mask(shape, (1, 1, 1, 1))).astype(np.int64)
    u = b.input([len(idx)], name="updates")
    declined(b.build(b.relu(b.op("ScatterND", [t, b.ints(idx), u]))), "not constant")


def test_scatter_without_pad_untouched():
    """ScatterND on an unpadded tensor is not a border fill: untouched, nothing reported."""
    b = GraphBuilder(29)
    x = b.input([N, C, H, W])
    m = border_mask((N, C, H, W), (1, 1, 1, 1))
    model = b.build(b.relu(scatter(b, b.relu(x), m, np.arange(C))))
    out, report = run_rules(model, RULE)
    assert_untouched(model, out, report)
    assert report.declines == []


# -- idempotence ---------------------------------------------------------------------------------
def test_idempotent():
    """A second run over the canonical Sub/Pad/Add form changes nothing."""
    b, t = fill_model(40, style="sides")
    out = canonical(b.build(t), count=1)
    assert_idempotent(out, RULE)


# -- symbolic dims: proven for every value, not pinned ------------------------------------------------
def test_symbolic_batch_slice_assignment_merges(tmp_path):
    """Legacy export of DBB with a dynamic batch (ScatterND indices computed from Shape(batch)):
    the CLI merges it into one Conv that keeps the symbolic batch, with no note to pin it."""
    import subprocess
    import sys

    import models
    from models.export import export_onnx

    entry = models.ZOO["dbb_slice"]
    src = export_onnx(entry.build(), entry.input_shape, tmp_path / "dbb.onnx", "legacy", dynamic_batch=True)
    out = subprocess.run([sys.executable, "-m", "onnxrep", "optimize", str(src), str(tmp_path / "a.onnx")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "note:" not in out.stdout
    model = onnx.load(tmp_path / "a.onnx")
    assert ops(model) == {"Conv": 1}
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_constant_indices_give_no_batch_hint():
    """A border fill with constant indices that is declined for another reason adds no note."""
    b = GraphBuilder(9)
    x = b.input([N, C, H, W])
    t, shape = padded(b, x, (1, 1, 1, 1))
    mask = border_mask(shape, (1, 1, 1, 1))
    mask[0, 0, 2, 2] = True  # also writes an interior element
    model = b.build(scatter(b, t, mask, np.ones(C)))
    out, report = run_rules(model, RULE)
    assert ops(out) == ops(model)
    assert report.notes == []


# -- symbolic dims, built by hand as the exporters write them -----------------------------------------
END = np.iinfo(np.int64).max


def assign(b, t, axis, start, end, values):
    """t[:, :, start:end, :] = values[channel] on `axis`, as the dynamo exporter writes a slice
    assignment: the axis moved to the front, indices Range(0, Shape(t)[axis])[start:end], updates
    Expand(values, Shape(the slice)), and back."""
    perm = [0, 1, 2, 3]
    perm[0], perm[axis] = axis, 0
    tt = b.op("Transpose", [t], perm=perm)
    d = b.op("Gather", [b.op("Shape", [t]), b.ints(np.array(axis))], axis=0)
    rng = b.op("Range", [b.ints(np.array(0)), d, b.ints(np.array(1))])
    idx = b.op("Unsqueeze", [b.op("Slice", [rng, b.ints([start]), b.ints([end]), b.ints([0]), b.ints([1])]),
                             b.ints([-1])])
    sel = b.op("Slice", [tt, b.ints([start]), b.ints([end]), b.ints([0]), b.ints([1])])
    upd = b.op("Expand", [b.channel(values), b.op("Shape", [sel])])
    return b.op("Transpose", [b.op("ScatterND", [tt, idx, upd])], perm=perm)


def assign_by_copy(b, t, axis, start, end, values):
    """The same, then copied over the whole of t (ScatterND over Range(0, N)): what the dynamo
    exporter writes with optimize=False, where t feeds both."""
    inner = assign(b, t, axis, start, end, values)
    n = b.op("Gather", [b.op("Shape", [t]), b.ints(np.array(0))], axis=0)
    idx = b.op("Unsqueeze", [b.op("Range", [b.ints(np.array(0)), n, b.ints(np.array(1))]), b.ints([-1])])
    return b.op("ScatterND", [t, idx, inner])


def fill_sides(b, t, p, values, write=assign, widths=None):
    """Top, bottom, left and right border of width p (or `widths`) set to values[channel]."""
    top, bottom, left, right = widths or (p, p, p, p)
    t = write(b, t, 2, 0, top, values)
    t = write(b, t, 2, -bottom, END, values)
    t = write(b, t, 3, 0, left, values)
    return write(b, t, 3, -right, END, values)


def symbolic_block(seed, dims=("N", C, "H", "W"), p=1, write=assign, widths=None, values=None):
    """DBB's 1×1 → BN-and-pad → 3×3 (pad 0) on an input with symbolic dims."""
    b = GraphBuilder(seed)
    x = b.input(list(dims))
    bias = b.rng.standard_normal(C)
    y = b.conv(x, C, C, k=1, bias_name=b.const(bias))
    t = b.pad(y, [0, 0, p, p, 0, 0, p, p])
    t = fill_sides(b, t, p, bias if values is None else values, write, widths)
    return b, t


def declined_folded(model, *words):
    """declined_by, against the model as folded before any rule runs (static dims fold part of
    the index arithmetic): the rule leaves that graph untouched and says why."""
    from onnxrep.engine import all_rules

    folded, _ = run_rules(model, skip=[r.name for r in all_rules()])
    return declined(folded, *words)


def assert_equivalent_at(model, out, *shapes):
    name = model.graph.input[0].name
    for s in shapes:
        assert_equivalent(model, out, feeds={name: np.random.default_rng(1).standard_normal(s).astype(np.float32)})


def test_symbolic_batch_height_width_merges():
    """Slice assignments on symbolic N, H, W (indices from Range(Shape)): one Conv, equal at several sizes."""
    b, t = symbolic_block(50)
    model = b.build(b.conv(t, C, 6, k=3, pad=0))
    out, report = run_rules(model)
    assert ops(out) == {"Conv": 1}
    assert report.rule_counts[RULE] == 1
    assert [d.dim_param for d in out.graph.input[0].type.tensor_type.shape.dim] == ["N", "", "H", "W"]
    assert_equivalent_at(model, out, (1, C, 5, 7), (3, C, 2, 9), (2, C, 1, 1))
    assert_idempotent(out)


def test_symbolic_wide_border_merges():
    """Border of width 2 on symbolic H, W, then a 5×5 conv: one Conv."""
    b, t = symbolic_block(51, p=2)
    model = b.build(b.conv(t, C, 3, k=5, pad=0))
    out, _ = run_rules(model)
    assert ops(out) == {"Conv": 1}
    assert_equivalent_at(model, out, (1, C, 4, 6), (2, C, 1, 3))


def test_whole_copy_assignments_merge():
    """Each assignment copied back over the whole padded tensor (ScatterND over Range(0, N), the
    padded tensor read by both): one Conv."""
    b, t = symbolic_block(52, write=assign_by_copy)
    model = b.build(b.conv(t, C, 6, k=3, pad=0))
    out, _ = run_rules(model)
    assert ops(out) == {"Conv": 1}
    assert_equivalent_at(model, out, (1, C, 5, 7), (3, C, 3, 2))


def test_symbolic_batch_static_map_canonical():
    """Symbolic batch, static H, W: the rule alone gives Sub/Pad/Add and drops the index arithmetic."""
    b, t = symbolic_block(53, dims=("N", C, H, W))
    model = b.build(t)
    out, report = run_rules(model, RULE)
    assert ops(out) == {"Conv": 1, "Sub": 1, "Pad": 1, "Add": 1}
    assert report.rule_counts == {RULE: 1}
    assert_equivalent_at(model, out, (1, C, H, W), (4, C, H, W))


def test_symbolic_partial_batch_declined():
    """Indices that cover only sample 0 of a symbolic batch: declined."""
    b = GraphBuilder(60)
    x = b.input(["N", C, H, W])
    t = b.pad(b.relu(x), [0, 0, 1, 1, 0, 0, 1, 1])
    vals = np.arange(C, dtype=np.float64)
    t = fill_sides(b, t, 1, vals)
    tt = b.op("Transpose", [t], perm=[2, 1, 0, 3])  # [H+2, C, N, W+2]
    idx = np.array([[[(0, c, 0)] for c in range(C)]], dtype=np.int64)  # row 0, every channel, sample 0
    upd = b.const(np.repeat(vals.reshape(1, C, 1, 1), W + 2, axis=3))
    t = b.op("Transpose", [b.op("ScatterND", [tt, b.ints(idx), upd])], perm=[2, 1, 0, 3])
    declined_folded(b.build(b.relu(t)), "do not cover all of the batch")


def test_symbolic_border_too_narrow_declined():
    """Pad 2 but the top assignment writes one row: declined (border not covered)."""
    b, t = symbolic_block(61, dims=("N", C, H, W), p=2, widths=(1, 2, 2, 2))
    declined_folded(b.build(b.relu(t)), "does not cover the whole border")


def test_symbolic_border_too_wide_declined():
    """Pad 1 but the top assignment writes two rows: declined, on a static map (row 1 is interior)
    and on a symbolic one (row 1 is interior unless H = 0: not provable for every H)."""
    b, t = symbolic_block(62, dims=("N", C, H, W), widths=(2, 1, 1, 1))
    declined_folded(b.build(b.relu(t)), "inside the padded region")
    b, t = symbolic_block(63, widths=(2, 1, 1, 1))
    declined_folded(b.build(b.relu(t)), "every value of the symbolic dims")


def test_symbolic_fill_from_data_declined():
    """Updates computed from the input's values (not a constant fill): declined."""
    b = GraphBuilder(64)
    x = b.input(["N", C, "H", "W"])
    t = b.pad(b.relu(x), [0, 0, 1, 1, 0, 0, 1, 1])
    tt = b.op("Transpose", [t], perm=[2, 1, 0, 3])
    d = b.op("Gather", [b.op("Shape", [t]), b.ints(np.array(2))], axis=0)
    rng = b.op("Range", [b.ints(np.array(0)), d, b.ints(np.array(1))])
    idx = b.op("Unsqueeze", [b.op("Slice", [rng, b.ints([0]), b.ints([1]), b.ints([0]), b.ints([1])]), b.ints([-1])])
    sel = b.op("Slice", [tt, b.ints([0]), b.ints([1]), b.ints([0]), b.ints([1])])
    level = b.op("ReduceMax", [x], keepdims=0)  # a data value
    upd = b.op("Expand", [b.mul(b.channel(np.ones(C)), level), b.op("Shape", [sel])])
    t = b.op("Transpose", [b.op("ScatterND", [tt, idx, upd])], perm=[2, 1, 0, 3])
    declined_folded(b.build(b.relu(t)), "not constant")


def test_symbolic_fill_varies_along_height_declined():
    """Left column filled with values that change along H (per channel and row): declined."""
    b = GraphBuilder(65)
    x = b.input(["N", C, H, W])
    t = b.pad(b.relu(x), [0, 0, 1, 1, 0, 0, 1, 1])
    vals = np.arange(C, dtype=np.float64)
    t = assign(b, t, 2, 0, 1, vals)
    t = assign(b, t, 2, -1, END, vals)
    t = assign(b, t, 3, -1, END, vals)
    tt = b.op("Transpose", [t], perm=[3, 1, 2, 0])  # [W+2, C, H+2, N]
    idx = b.ints(np.zeros((1, 1), np.int64))
    ramp = vals.reshape(1, C, 1, 1) + np.arange(H + 2).reshape(1, 1, H + 2, 1)
    sel = b.op("Slice", [tt, b.ints([0]), b.ints([1]), b.ints([0]), b.ints([1])])
    upd = b.op("Expand", [b.const(ramp), b.op("Shape", [sel])])
    t = b.op("Transpose", [b.op("ScatterND", [tt, idx, upd])], perm=[3, 1, 2, 0])
    declined_folded(b.build(b.relu(t)), "vary within a channel")


def test_symbolic_padded_tensor_read_elsewhere_declined():
    """The padded tensor is also a graph output (read outside the fill): declined, untouched."""
    b = GraphBuilder(66)
    x = b.input(["N", C, "H", "W"])
    t0 = b.pad(b.relu(x), [0, 0, 1, 1, 0, 0, 1, 1])
    t = fill_sides(b, t0, 1, np.arange(C, dtype=np.float64))
    declined_folded(b.build(b.relu(t), b.relu(t0)), "also read by")


@pytest.mark.parametrize("seed", range(12))
def test_symbolic_fill_variants_fire_only_when_exact(seed):
    """Seeded variants (pads 1–2 per side, assignment widths off by one, one side with other values,
    symbolic or static N/H/W, assignments in any order, copied back or not): the rule fires exactly
    when the assignments fill the border with one value per channel, and the result then equals
    the input model at several sizes."""
    rng = np.random.default_rng(100 + seed)
    pads = [int(v) for v in rng.integers(1, 3, 4)]  # top, left, bottom, right
    widths = [p + int(rng.choice([0, 0, 0, 1, -1])) if p > 1 else p + int(rng.choice([0, 0, 0, 1]))
              for p in pads]
    dims = ["N" if rng.random() < 0.7 else 2, C, "H" if rng.random() < 0.6 else H, "W" if rng.random() < 0.6 else W]
    vals = rng.standard_normal(C)
    odd = int(rng.integers(0, 4)) if rng.random() < 0.25 else -1  # a side written with other values
    b = GraphBuilder(seed)
    x = b.input(dims)
    t = b.pad(b.relu(x), [0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]])
    sides = [(2, 0, widths[0]), (3, 0, widths[1]), (2, -widths[2], END), (3, -widths[3], END)]
    write = assign_by_copy if rng.random() < 0.3 else assign
    for i in rng.permutation(4):
        axis, start, end = sides[i]
        t = write(b, t, axis, start, end, vals + (1.0 if i == odd else 0.0))
    model = b.build(b.relu(t))
    out, report = run_rules(model, RULE)
    exact = widths == pads and odd < 0
    assert report.rule_counts.get(RULE, 0) == (1 if exact else 0), (pads, widths, odd, dims, report.declines)
    if exact:
        assert "ScatterND" not in ops(out)
        for n, h, w in [(1, 1, 1), (3, 4, 2), (2, 7, 5)]:
            shape = [n if d == "N" else d for d in dims]
            shape = [shape[0], C, h if dims[2] == "H" else H, w if dims[3] == "W" else W]
            assert_equivalent(model, out, feeds={model.graph.input[0].name:
                                                 np.random.default_rng(n).standard_normal(shape).astype(np.float32)})
