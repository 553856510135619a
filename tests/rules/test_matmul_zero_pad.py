"""fold_linear_affine on loralib's MergedLinear: an adapter whose B is a grouped 1-wide conv1d
(between a Transpose pair) and whose output is zero-padded to the qkv width by index assignment
(ScatterND into zeros) merges with the qkv Linear into one MatMul."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import (GraphBuilder, assert_declined, assert_equivalent, assert_idempotent, declined_by, ops,
                           run_rules)

RULE = "fold_linear_affine"
B, N, C, R = 2, 5, 4, 2  # batch, tokens, channels per q/k/v group, rank
COLS = list(range(0, C)) + list(range(2 * C, 3 * C))  # q and v columns of the 3C-wide qkv


def full_coordinate_indices(cols, rows=B * N):
    """What `z[:, cols] = y` on a [rows, 3C] view exports as (legacy): (row, col) per element."""
    idx = np.zeros((rows, len(cols), 2), dtype=np.int64)
    idx[..., 0] = np.arange(rows)[:, None]
    idx[..., 1] = np.asarray(cols)[None, :]
    return idx


def merged_lora(form="legacy", *, conv=None, between=None, data=None, indices=None, scale=2.0,
                conv_reader=False, shared_a=False, seed=0):
    """x → qkv Linear (+ bias) + s · zero_pad(conv1d_g2(x·A)) → Relu, as loralib's MergedLinear.

    form "legacy": Reshape to [B·N, 2C] → ScatterND(zeros [B·N, 3C], (row, col) indices) → Reshape back;
    form "dynamo": Reshape → Transpose(1, 0) → ScatterND along axis 0 ([2C, 1] indices) → Transpose back."""
    b = GraphBuilder(seed)
    x = b.relu(b.input([B, N, C]))
    qkv = b.add(b.matmul(x, C, 3 * C), b.randn((3 * C,)))
    wa = b.randn((C, 2 * R), scale=0.5)
    a = b.op("MatMul", [x, wa])
    t = b.op("Transpose", [a], perm=[0, 2, 1])
    cattrs = dict(k=(1,), pad=(0,), group=2, bias=False)
    cattrs.update(conv or {})
    y = b.conv(t, 2 * R, 2 * C, **cattrs)
    if between is not None:
        y = between(b, y)
    y = b.op("Transpose", [y], perm=[0, 2, 1])
    flat = b.op("Reshape", [y, b.ints([-1, 2 * C])])
    if form == "legacy":
        z = b.const(np.zeros((B * N, 3 * C)) if data is None else data)
        idx = b.ints(full_coordinate_indices(COLS) if indices is None else indices)
        placed = b.op("ScatterND", [z, idx, flat])
    else:
        z = b.const(np.zeros((3 * C, B * N)) if data is None else data)
        idx = b.ints(np.asarray(COLS).reshape(-1, 1) if indices is None else indices)
        placed = b.op("Transpose", [b.op("ScatterND", [z, idx, b.op("Transpose", [flat], perm=[1, 0])])], perm=[1, 0])
    padded = b.op("Reshape", [placed, b.ints([B, N, 3 * C])])
    out = b.relu(b.add(qkv, b.mul(padded, b.const(np.float32(scale)))))
    extra = []
    if conv_reader:
        extra.append(b.relu(y))
    if shared_a:
        extra.append(b.relu(b.op("MatMul", [x, wa])))
    return b.build(out, *extra)


def assert_scatter_kept(m):
    """The scatter stays and the adapter stays apart from the qkv MatMul (A and the conv1d may
    still merge into one rank-2R MatMul: that sub-region is linear), with equal outputs."""
    out, _ = run_rules(m)
    h = ops(out)
    assert h.get("ScatterND") == 1 and h.get("MatMul") == 2
    assert_equivalent(m, out)


@pytest.mark.parametrize("form", ["legacy", "dynamo"])
def test_merged_linear_becomes_one_matmul(form):
    """A, the grouped conv1d, the zero-padding scatter and the scale fold into the qkv weight."""
    m = merged_lora(form)
    out, report = run_rules(m)
    h = ops(out)
    assert h.get("MatMul") == 1 and "Conv" not in h and "ScatterND" not in h and "Mul" not in h
    assert report.rule_counts.get(RULE) == 1
    assert_equivalent(m, out)
    assert_idempotent(out)


def test_conv_with_bias_folds_into_the_qkv_bias():
    """A conv1d bias lands in the placed columns of the qkv bias (zeros elsewhere)."""
    m = merged_lora(conv={"bias": True})
    out, _ = run_rules(m, RULE)
    assert ops(out).get("MatMul") == 1 and "ScatterND" not in ops(out)
    assert_equivalent(m, out)


def test_relu_between_declines():
    """A non-linearity between the conv1d and the scatter: nothing merges."""
    declined_by(RULE, merged_lora(between=lambda b, y: b.relu(y)))


def test_nonzero_scatter_data_declines():
    """ScatterND into a constant that is not zeros keeps that constant's other entries: declined."""
    data = np.ones((B * N, 3 * C))
    assert_scatter_kept(merged_lora(data=data))


def test_scatter_that_moves_rows_declines():
    """Indices whose row coordinate is not the element's own row mix tokens: declined."""
    idx = full_coordinate_indices(COLS)
    idx[..., 0] = idx[::-1, :, 0]
    assert_scatter_kept(merged_lora(indices=idx))


def test_scatter_with_per_row_columns_declines():
    """Each row placed in other columns is not one matrix on the channel axis: declined."""
    idx = full_coordinate_indices(COLS)
    idx[0, :, 1] = list(range(C, 3 * C))
    assert_scatter_kept(merged_lora(indices=idx))


def test_repeated_column_declines():
    """Two updates written to one column (ScatterND leaves the winner undefined): declined."""
    cols = np.asarray(COLS).reshape(-1, 1).copy()
    cols[1] = cols[0]
    assert_scatter_kept(merged_lora("dynamo", indices=cols))


@pytest.mark.parametrize("conv", [{"k": (3,), "pad": (1,)}, {"stride": (2,)}])
def test_conv_that_mixes_positions_declines(conv):
    """A 3-wide kernel or a stride mixes or drops tokens: not a channel matrix."""
    m = merged_lora(conv=conv, indices=None) if "stride" not in conv else None
    if m is None:  # a stride halves the tokens: build the chain without the scatter's shapes
        b = GraphBuilder(3)
        x = b.relu(b.input([B, N, C]))
        t = b.op("Transpose", [b.matmul(x, C, 2 * R)], perm=[0, 2, 1])
        y = b.op("Transpose", [b.conv(t, 2 * R, 2 * C, k=(1,), pad=(0,), stride=(2,), group=2)], perm=[0, 2, 1])
        m = b.build(b.relu(b.add(b.matmul(y, 2 * C, C), b.randn((C,)))))
    out, _ = run_rules(m, RULE)
    assert ops(out).get("Conv") == 1
    assert_equivalent(m, out)


def test_conv_output_read_elsewhere_declines():
    """Fan-out: the conv1d's output is also a graph output's input."""
    declined_by(RULE, merged_lora(conv_reader=True))


def test_shared_adapter_weight_declines():
    """A's weight is read by another MatMul too: folding it would change that one."""
    declined_by(RULE, merged_lora(shared_a=True))


def test_conv_on_a_token_axis_declines():
    """Transpose pair that puts the channel axis at 2 while the Conv acts on axis 1 (tokens)."""
    b = GraphBuilder(4)
    x = b.relu(b.input([B, N, C, C]))  # [B, N, C, C]: the conv's axis 1 is N after (0, 1, 3, 2)
    t = b.op("Transpose", [b.matmul(x, C, C)], perm=[0, 1, 3, 2])
    y = b.op("Transpose", [b.conv(t, N, N, k=(1, 1), pad=(0, 0), bias=False)], perm=[0, 1, 3, 2])
    m = b.build(b.relu(b.add(b.matmul(y, C, C), b.randn((C,)))))
    out, _ = run_rules(m, RULE)
    assert ops(out).get("Conv") == 1 and ops(out).get("MatMul") == 2
    assert_equivalent(m, out)


def runtime_index_lora(range_of="rows", shape_reader=False, seed=0):
    """The legacy exporter's form with a symbolic batch: the zeros and the (row, col) indices are
    computed from run-time shapes (ConstantOfShape; Range over the zeros' rows, Expanded)."""
    b = GraphBuilder(seed)
    x = b.relu(b.input(["batch", N, C]))
    qkv = b.add(b.matmul(x, C, 3 * C), b.randn((3 * C,)))
    t = b.op("Transpose", [b.matmul(x, C, 2 * R)], perm=[0, 2, 1])
    y = b.op("Transpose", [b.conv(t, 2 * R, 2 * C, k=(1,), pad=(0,), group=2, bias=False)], perm=[0, 2, 1])
    u = b.op("Reshape", [y, b.ints([-1, 2 * C])])
    batch = b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", [y]), b.ints(0)], axis=0), b.ints([0])])
    zshape = b.op("Concat", [batch, b.ints([N]), b.ints([3 * C])], axis=0)
    z = b.op("Reshape", [b.op("ConstantOfShape", [zshape]), b.ints([-1, 3 * C])])
    limit_of = {"rows": z, "columns": u}[range_of]
    limit = b.op("Gather", [b.op("Shape", [limit_of]), b.ints(0 if range_of == "rows" else 1)], axis=0)
    rows = b.op("Reshape", [b.op("Range", [b.ints(0), limit, b.ints(1)]), b.ints([-1, 1])])
    target = b.op("Shape", [u])
    i0 = b.op("Unsqueeze", [b.op("Expand", [rows, target]), b.ints([-1])])
    i1 = b.op("Unsqueeze", [b.op("Expand", [b.ints(COLS), target]), b.ints([-1])])
    placed = b.op("ScatterND", [z, b.op("Concat", [i0, i1], axis=-1), u])
    padded = b.op("Reshape", [placed, b.ints([-1, N, 3 * C])])
    outs = [b.relu(b.add(qkv, b.mul(padded, b.const(np.float32(2.0)))))]
    if shape_reader:
        outs.append(b.op("Shape", [y]))
    return b.build(*outs)


def test_runtime_indices_of_a_symbolic_batch_merge():
    """Range over the zeros' own rows, Expanded, with constant columns: the same placement."""
    m = runtime_index_lora()
    out, report = run_rules(m)
    h = ops(out)
    assert h.get("MatMul") == 1 and "ScatterND" not in h and "Conv" not in h and "Range" not in h
    assert report.rule_counts.get(RULE) == 1
    for batch in (1, 3):
        feeds = {m.graph.input[0].name: np.random.default_rng(batch).standard_normal((batch, N, C)).astype(np.float32)}
        assert_equivalent(m, out, feeds=feeds)


def test_runtime_indices_over_other_rows_decline():
    """A Range over another length (the updates' columns) is not each row's own index."""
    m = runtime_index_lora(range_of="columns")
    out, _ = run_rules(m)
    assert ops(out).get("ScatterND") == 1 and ops(out).get("MatMul") == 2


def test_shape_of_an_intermediate_read_elsewhere_declines():
    """The conv1d output's Shape also feeds a graph output: the region cannot drop it."""
    m = runtime_index_lora(shape_reader=True)
    out, _ = run_rules(m)
    assert ops(out).get("ScatterND") == 1 and ops(out).get("MatMul") == 2
    feeds = {m.graph.input[0].name: np.ones((2, N, C), dtype=np.float32)}
    assert_equivalent(m, out, feeds=feeds)


def test_rows_placement_into_runtime_zeros_merges():
    """dynamo's form with a symbolic batch: the zeros are a ConstantOfShape of run-time dims
    (transposed), the [m, 1] indices constant: the placement needs only the channel count."""
    b = GraphBuilder(5)
    x = b.relu(b.input(["batch", N, C]))
    qkv = b.add(b.matmul(x, C, 3 * C), b.randn((3 * C,)))
    t = b.op("Transpose", [b.matmul(x, C, 2 * R)], perm=[0, 2, 1])
    y = b.op("Transpose", [b.conv(t, 2 * R, 2 * C, k=(1,), pad=(0,), group=2, bias=False)], perm=[0, 2, 1])
    u = b.op("Transpose", [b.op("Reshape", [y, b.ints([-1, 2 * C])])], perm=[1, 0])
    dims = b.op("Concat", [b.op("Shape", [x], start=0, end=1), b.ints([N]), b.ints([3 * C])], axis=0)
    z = b.op("Transpose", [b.op("Reshape", [b.op("ConstantOfShape", [dims]), b.ints([-1, 3 * C])])], perm=[1, 0])
    placed = b.op("Transpose", [b.op("ScatterND", [z, b.ints(np.asarray(COLS).reshape(-1, 1)), u])], perm=[1, 0])
    out = b.relu(b.add(qkv, b.mul(b.op("Reshape", [placed, b.ints([-1, N, 3 * C])]), b.const(np.float32(0.5)))))
    m = b.build(out)
    opt, _ = run_rules(m)
    assert ops(opt).get("MatMul") == 1 and "ScatterND" not in ops(opt)
    for batch in (1, 4):
        feeds = {m.graph.input[0].name: np.random.default_rng(batch).standard_normal((batch, N, C)).astype(np.float32)}
        assert_equivalent(m, opt, feeds=feeds)


def test_runtime_indices_with_other_rows_than_the_updates_decline():
    """The zeros come from another input's rows: with one row there, the Expand broadcasts the
    Range and every update lands in row 0 (valid ONNX, not a placement), and the sum broadcasts
    that row. Not provably the updates' rows: declined, and the outputs stay equal."""
    b = GraphBuilder(6)
    x = b.relu(b.input(["rows", C]))
    other = b.input(["other", 3 * C])
    u = b.matmul(x, C, 2 * C)
    z = b.op("ConstantOfShape", [b.op("Shape", [other])])
    limit = b.op("Gather", [b.op("Shape", [z]), b.ints(0)], axis=0)
    rows = b.op("Reshape", [b.op("Range", [b.ints(0), limit, b.ints(1)]), b.ints([-1, 1])])
    target = b.op("Shape", [u])
    i0 = b.op("Unsqueeze", [b.op("Expand", [rows, target]), b.ints([-1])])
    i1 = b.op("Unsqueeze", [b.op("Expand", [b.ints(COLS), target]), b.ints([-1])])
    placed = b.mul(b.op("ScatterND", [z, b.op("Concat", [i0, i1], axis=-1), u]), b.const(np.float32(2.0)))
    qkv = b.add(b.matmul(x, C, 3 * C), b.randn((3 * C,)))
    m = b.build(b.relu(b.add(qkv, placed)))
    out, _ = run_rules(m)
    assert ops(out).get("ScatterND") == 1
    declined_by(RULE, m, "run-time indices", "not the same for every value of the symbols")
    feeds = {m.graph.input[0].name: np.random.default_rng(0).standard_normal((4, C)).astype(np.float32),
             m.graph.input[1].name: np.zeros((1, 3 * C), dtype=np.float32)}
    assert_equivalent(m, out, feeds=feeds)


def hw_runtime_index_lora(rows_of="zeros", seed=7):
    """The legacy exporter's form on the tokens of a map with symbolic H, W: x [1, C, H, W] →
    Reshape [0, C, -1] → Transpose gives [1, H·W, C]; the zeros are ConstantOfShape([1, Shape(y)[1],
    3C]) viewed as [H·W, 3C], and the row index a Range over their rows (rows_of="height": over
    Shape(x)[2], H rows, which an Expand could broadcast when H = 1)."""
    b = GraphBuilder(seed)
    x = b.input([1, C, "H", "W"], name="x")
    tokens = b.op("Transpose", [b.op("Reshape", [x, b.ints([0, C, -1])])], perm=[0, 2, 1])
    qkv = b.add(b.matmul(tokens, C, 3 * C), b.randn((3 * C,)))
    t = b.op("Transpose", [b.matmul(tokens, C, 2 * R)], perm=[0, 2, 1])
    y = b.op("Transpose", [b.conv(t, 2 * R, 2 * C, k=(1,), pad=(0,), group=2, bias=False)], perm=[0, 2, 1])
    u = b.op("Reshape", [y, b.ints([-1, 2 * C])])
    n_tok = b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", [y]), b.ints(1)], axis=0), b.ints([0])])
    z = b.op("Reshape", [b.op("ConstantOfShape", [b.op("Concat", [b.ints([1]), n_tok, b.ints([3 * C])], axis=0)]),
                         b.ints([-1, 3 * C])])
    limit = b.op("Gather", [b.op("Shape", [z if rows_of == "zeros" else x]), b.ints(0 if rows_of == "zeros" else 2)],
                 axis=0)
    rows = b.op("Reshape", [b.op("Range", [b.ints(0), limit, b.ints(1)]), b.ints([-1, 1])])
    target = b.op("Shape", [u])
    i0 = b.op("Unsqueeze", [b.op("Expand", [rows, target]), b.ints([-1])])
    i1 = b.op("Unsqueeze", [b.op("Expand", [b.ints(COLS), target]), b.ints([-1])])
    placed = b.op("ScatterND", [z, b.op("Concat", [i0, i1], axis=-1), u])
    padded = b.op("Reshape", [placed, b.op("Shape", [qkv])])
    return b.build(b.relu(b.add(qkv, b.mul(padded, b.const(np.float32(2.0))))))


def test_runtime_indices_over_a_token_count_merge():
    """Rows H·W (a product of symbols): the Range covers the zeros' rows, which are the updates',
    for every H, W: one MatMul, outputs equal at two map sizes."""
    m = hw_runtime_index_lora()
    out, report = run_rules(m)
    h = ops(out)
    assert h.get("MatMul") == 1 and "ScatterND" not in h and "Conv" not in h and "Range" not in h
    assert report.rule_counts.get(RULE) == 1
    for hw in ((4, 4), (2, 7)):
        feeds = {"x": np.random.default_rng(hw[1]).standard_normal((1, C, *hw)).astype(np.float32)}
        assert_equivalent(m, out, feeds=feeds)
    assert_idempotent(out)


def test_runtime_indices_over_another_row_count_decline():
    """A Range over H rows where the zeros have H·W: the Expand to the updates' [H·W, 2C] broadcasts
    it only for H = 1 (else the model fails): not the same for every value, declined with the reason."""
    m = hw_runtime_index_lora(rows_of="height")
    out, report = run_rules(m, RULE)
    assert ops(out).get("ScatterND") == 1 and ops(out).get("MatMul") == 2  # A∘conv1d alone may merge
    assert_declined(report, RULE, "run-time indices", "not the same for every value of the symbols")
    feeds = {"x": np.random.default_rng(0).standard_normal((1, C, 1, 5)).astype(np.float32)}  # H = 1: valid
    assert_equivalent(m, out, feeds=feeds)


def noopt_lora(expand_rows="zeros", copy_rows="zeros", seed=8):
    """dynamo-noopt's zero padding with a symbolic batch: zeros = CastLike(ConstantOfShape([batch,
    N, 3C]), y) viewed twice as [batch·N, 3C]; index_put along the transposed first view with its
    updates Expanded to [2C, Shape(view)[0]]; then slice_scatter of that into the second view over
    Unsqueeze(Range(0, Shape(view)[0])), a whole-range copy. expand_rows / copy_rows="other": the
    Expand's rows, or the copy's Range, come from another input's rows instead."""
    b = GraphBuilder(seed)
    x = b.relu(b.input(["batch", N, C], name="x"))
    other = b.input(["other", 3 * C], name="other")
    qkv = b.add(b.matmul(x, C, 3 * C), b.randn((3 * C,)))
    t = b.op("Transpose", [b.matmul(x, C, 2 * R)], perm=[0, 2, 1])
    y = b.op("Transpose", [b.conv(t, 2 * R, 2 * C, k=(1,), pad=(0,), group=2, bias=False)], perm=[0, 2, 1])
    u = b.op("Transpose", [b.op("Reshape", [y, b.ints([-1, 2 * C])])], perm=[1, 0])
    dims = b.op("Concat", [b.op("Shape", [x], start=0, end=1), b.ints([N]), b.ints([3 * C])], axis=0)
    zeros = b.op("CastLike", [b.op("ConstantOfShape", [dims]), y])
    view1, view2 = (b.op("Reshape", [zeros, b.ints([-1, 3 * C])]) for _ in range(2))
    rows_of = {"zeros": view1, "other": other}
    target = b.op("Concat", [b.ints([2 * C]), b.op("Shape", [rows_of[expand_rows]], start=0, end=1)], axis=0)
    placed = b.op("ScatterND", [b.op("Transpose", [view1], perm=[1, 0]), b.ints(np.asarray(COLS).reshape(-1, 1)),
                                b.op("Expand", [u, target])])
    index_put = b.op("Transpose", [placed], perm=[1, 0])
    limit = b.op("Gather", [b.op("Shape", [{"zeros": view2, "other": other}[copy_rows]]), b.ints(0)], axis=0)
    rng = b.op("Unsqueeze", [b.op("Range", [b.ints(0), limit, b.ints(1)]), b.ints([-1])])
    copied = b.op("ScatterND", [view2, rng, index_put])
    padded = b.op("Reshape", [copied, b.ints([-1, N, 3 * C])])
    return b.build(b.relu(b.add(qkv, b.mul(padded, b.const(np.float32(2.0))))))


def noopt_feeds(batch, other=None):
    rng = np.random.default_rng(batch)
    return {"x": rng.standard_normal((batch, N, C)).astype(np.float32),
            "other": np.zeros((batch * N if other is None else other, 3 * C), np.float32)}


def test_noopt_expanded_updates_and_whole_range_copy_merge():
    """The Expand provably keeps the updates' shape and the slice_scatter writes every row (so it
    returns its updates): the same placement, one MatMul, outputs equal at two batch sizes."""
    m = noopt_lora()
    out, report = run_rules(m)
    h = ops(out)
    assert h.get("MatMul") == 1 and "ScatterND" not in h and "Conv" not in h and "Expand" not in h
    assert report.rule_counts.get(RULE) == 1
    for batch in (1, 3):
        assert_equivalent(m, out, feeds=noopt_feeds(batch))
    assert_idempotent(out)


def test_noopt_expand_that_could_broadcast_declines():
    """The Expand's rows come from another input: with one row of updates it would broadcast them to
    every row (valid ONNX, not a placement). Declined with the reason; outputs equal."""
    m = noopt_lora(expand_rows="other")
    out, report = run_rules(m, RULE)
    assert ops(out).get("ScatterND") == 2 and ops(out).get("Expand") == 1
    assert_declined(report, RULE, "Expand", "could broadcast")
    assert_equivalent(m, out, feeds=noopt_feeds(2))


def test_noopt_copy_over_another_range_declines():
    """The slice_scatter's Range runs over another input's rows: not provably every row of the data
    (with fewer rows it writes part of it). Declined with the reason; outputs equal."""
    m = noopt_lora(copy_rows="other")
    out, report = run_rules(m, RULE)
    assert ops(out).get("ScatterND") == 2
    assert_declined(report, RULE, "ScatterND")
    assert_equivalent(m, out, feeds=noopt_feeds(2, other=2 * N))
