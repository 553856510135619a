"""fold_branch_into_slice, in-place form: `r = qkv(x); r[..., lo:hi] += s·B(A(x))`, written by the
exporters as Slice(r) → Add(branch) → ScatterND back into r (legacy: (row..., column) indices;
dynamo: a slice_scatter between Transposes), merges into the qkv weight's columns."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.helpers import (assert_declined, assert_equivalent, assert_idempotent, declined_by, GraphBuilder, ops,
                           run_model, run_rules)

RULE = "fold_branch_into_slice"
C = 8
ROWS = (2, 5)


def lora(b, x, cin, cout, rank=2, scale=0.5, relu=False):
    a = b.matmul(x, cin, rank)
    if relu:
        a = b.relu(a)
    return b.mul(b.matmul(a, rank, cout), b.const(np.float32(scale)))


def block_indices(lo, hi, rows=ROWS):
    """(row..., column) of every element of columns [lo, hi), as the legacy exporter writes them."""
    return np.stack(np.meshgrid(*[np.arange(n) for n in rows], np.arange(lo, hi), indexing="ij"), -1).astype(np.int64)


def scatter(b, form, data, updates, lo, hi, idx=None):
    """ScatterND of `updates` into columns [lo, hi) of `data` in the exporter's form."""
    if form == "legacy":
        idx = block_indices(lo, hi) if idx is None else idx
        return b.op("ScatterND", [data, b.const(idx), updates])
    perm = [2, 1, 0]
    rows = np.arange(lo, hi, dtype=np.int64).reshape(-1, 1) if idx is None else idx
    s = b.op("ScatterND", [b.op("Transpose", [data], perm=perm), b.const(rows),
                           b.op("Transpose", [updates], perm=perm)])
    return b.op("Transpose", [s], perm=perm)


def inplace_model(form="legacy", adapt=((0, C), (2 * C, 3 * C)), seed=0, twice=False, bias=True, x2=False,
                  idx=None, slice_cols=None, updates=None, relu_branch=False, slice_reader=False, shared=False,
                  split=True):
    """x → qkv Linear → for each adapted block: r = ScatterND(r, cols, Slice(r, cols) + lora(x)) → Split/Relu."""
    b = GraphBuilder(seed)
    x = b.relu(b.input([*ROWS, C]))
    w = b.randn((C, 3 * C))
    r = b.op("MatMul", [x, w])
    if bias:
        r = b.add(r, b.randn((3 * C,)))
    src = b.relu(b.input([*ROWS, C])) if x2 else x
    extra = []
    for lo, hi in adapt:
        slo, shi = slice_cols or (lo, hi)
        s = b.op("Slice", [r, b.ints([slo]), b.ints([shi]), b.ints([-1]), b.ints([1])])
        if slice_reader:
            extra.append(b.relu(s))
        a = b.add(s, lora(b, src, C, hi - lo, relu=relu_branch))
        u = updates(b, a) if updates is not None else a
        r = scatter(b, form, r, u, lo, hi, idx)
        if twice:  # each += is written twice: legacy scatters the same sum again, dynamo copies the
            # updated columns into themselves (Slice of the result, slice_scatter back)
            again = u if form == "legacy" else b.op("Slice", [r, b.ints([lo]), b.ints([hi]), b.ints([-1]), b.ints([1])])
            r = scatter(b, form, r, again, lo, hi, idx)
    if shared:
        extra.append(b.op("MatMul", [b.relu(b.input([*ROWS, C])), w]))
    outs = [b.relu(p) for p in b.op("Split", [r, b.ints([C, C, C])], n_out=3, axis=-1)] if split else [b.relu(r)]
    return b.build(*outs, *extra)


@pytest.mark.parametrize("form", ["legacy", "dynamo"])
@pytest.mark.parametrize("twice", [False, True])
def test_inplace_lora_on_q_and_v_merges_into_qkv(form, twice):
    """Both in-place adapters and every scatter vanish: one MatMul (the qkv) and its Split."""
    m = inplace_model(form, twice=twice)
    out, report = run_rules(m)
    assert ops(out).get("MatMul") == 1 and "ScatterND" not in ops(out) and "Mul" not in ops(out)
    assert ops(out)["Split"] == 1 and "Slice" not in ops(out)
    assert report.rule_counts.get(RULE) == 2 + 2 * (2 if twice else 1)
    assert_equivalent(m, out)
    assert_idempotent(out)


def test_inplace_into_bias_free_qkv_read_whole():
    """No bias Add and the updated r read whole (no split): still exact."""
    m = inplace_model(bias=False, split=False, adapt=((C, 2 * C),))
    out, _ = run_rules(m, RULE)
    assert ops(out).get("MatMul") == 1 and "ScatterND" not in ops(out)
    assert_equivalent(m, out)


def test_updates_through_shape_keeping_reshape_and_expand():
    """The legacy exporter's Expand + Reshape of the sum to its own shape pass it through."""
    shape = [*ROWS, C]
    m = inplace_model(updates=lambda b, a: b.op("Reshape", [b.op("Expand", [a, b.ints(shape)]), b.ints(shape)]),
                      twice=True)
    out, _ = run_rules(m, RULE)
    assert "ScatterND" not in ops(out) and ops(out).get("MatMul") == 1
    assert_equivalent(m, out)


def test_scatter_to_other_columns_than_the_slice_declines():
    """Slice [0:8) + branch written into columns [8:16): not an in-place add."""
    m = inplace_model(adapt=((C, 2 * C),), slice_cols=(0, C))
    report = declined_by(RULE, m)
    assert_declined(report, RULE, "writes columns (8, 16)", "not the sum into (0, 8)")


@pytest.mark.parametrize("form", ["legacy", "dynamo"])
def test_indices_covering_part_of_the_rows_decline(form):
    """Indices whose rows all point at row 0 (legacy), or a non-contiguous column list (dynamo)."""
    if form == "legacy":
        idx = block_indices(0, C)
        idx[..., 1] = 0
        words = ("index on axis 1",)
    else:
        idx = np.array([0, 1, 2, 3, 4, 5, 7, 6], np.int64).reshape(-1, 1)
        words = ("not one contiguous range",)
    m = inplace_model(form, adapt=((0, C),), idx=idx)
    report = declined_by(RULE, m)
    assert_declined(report, RULE, *words)


def test_updates_from_another_tensor_declines():
    """The scatter writes Relu(sum), not the sum: r's columns would not be Slice(r') after the merge."""
    m = inplace_model(adapt=((0, C),), updates=lambda b, a: b.relu(a))
    declined_by(RULE, m, "not the sum")


def test_branch_reading_another_x_declines():
    """The adapter reads another tensor than the qkv Linear's input."""
    declined_by(RULE, inplace_model(adapt=((0, C),), x2=True), "the branch reads")


def test_fan_out_of_the_slice_declines():
    """The slice of r is also read by a Relu (fan-out)."""
    declined_by(RULE, inplace_model(adapt=((0, C),), slice_reader=True), "fan-out")


def test_nonlinear_branch_declines():
    """A Relu between the adapter's A and B."""
    declined_by(RULE, inplace_model(adapt=((0, C),), relu_branch=True), "the branch reads")


def test_shared_qkv_weight_declines():
    """The qkv weight is also read by another MatMul."""
    declined_by(RULE, inplace_model(adapt=((0, C),), shared=True), "shared")


def test_scatter_of_other_columns_into_themselves_is_kept():
    """A scatter writing r's columns [0:8) into [8:16) is a move, not a self-copy: left alone."""
    b = GraphBuilder(3)
    r = b.relu(b.input([*ROWS, 3 * C]))
    s = b.op("Slice", [r, b.ints([0]), b.ints([C]), b.ints([-1]), b.ints([1])])
    m = b.build(b.relu(scatter(b, "legacy", r, s, C, 2 * C)))
    out, report = run_rules(m, RULE)
    assert ops(out) == ops(m) and report.rule_counts == {}


@pytest.fixture(scope="module")
def torch_mod():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("form", ["legacy", "legacy-nofold", "legacy18", "dynamo", "dynamo-noopt"])
@pytest.mark.parametrize("axes", ["static", "batch", "hw"])
def test_torch_inplace_lora_exports_merge(torch_mod, tmp_path, form, axes):
    """LoRAInplaceAttention exported in each form: 4 MatMul (as without adapters), no ScatterND, equal
    (with symbolic H, W at a map size other than the traced 4x4)."""
    from models.export import export_onnx
    from models.transformers import LoRAInplaceAttention
    torch_mod.manual_seed(0)
    model = LoRAInplaceAttention()
    m = onnx.load(str(export_onnx(model, (1, 16, 4, 4), tmp_path / "m.onnx", form, axes=axes)))
    out, report = run_rules(m)
    assert ops(out)["MatMul"] == 4 and "ScatterND" not in ops(out)
    assert report.rule_counts.get(RULE, 0) >= 4
    x = np.random.default_rng(0).standard_normal((2 if axes == "batch" else 1, 16, *((3, 5) if axes == "hw" else (4, 4))))
    feeds = {"input": x.astype(np.float32)}
    assert_equivalent(m, out, feeds=feeds)
    with torch_mod.no_grad():
        ref = model(torch_mod.from_numpy(feeds["input"])).numpy()
    got = run_model(out, feeds)["output"]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


# -- the out-of-place spelling: r + cat([y_q, zeros, y_v], -1) (fold_linear_affine's walk) ----------
def cat_model(zero=0.0, x2=False, axis=-1, seed=1):
    b = GraphBuilder(seed)
    x = b.relu(b.input([*ROWS, C]))
    src = b.relu(b.input([*ROWS, C])) if x2 else x
    if axis == -1:
        r = b.add(b.matmul(x, C, 3 * C), b.randn((3 * C,)))
        fill = b.const(np.full((*ROWS, C), zero, np.float32))
        cat = b.op("Concat", [lora(b, x, C, C), fill, lora(b, src, C, C, rank=3)], axis=-1)
    else:  # a Concat of rows: [2, 5, 8] pieces stacked on axis 1 into [2, 15, 8], added to a [2, 15, 8] Linear
        r = b.add(b.matmul(b.relu(b.input([ROWS[0], 3 * ROWS[1], C])), C, C), b.randn((C,)))
        cat = b.op("Concat", [lora(b, x, C, C), b.const(np.zeros((*ROWS, C), np.float32)), lora(b, x, C, C)], axis=1)
    return b.build(b.relu(b.add(r, cat)))


def test_cat_with_zeros_merges_into_qkv():
    """r + cat([s·B_q(A_q(x)), 0, s·B_v(A_v(x))], -1) is one MatMul x·W' + b'."""
    m = cat_model()
    out, report = run_rules(m, "fold_linear_affine")
    assert ops(out).get("MatMul") == 1 and "Concat" not in ops(out) and "Mul" not in ops(out)
    assert report.rule_counts.get("fold_linear_affine") == 1
    assert_equivalent(m, out)
    assert_idempotent(out, "fold_linear_affine")


def test_cat_with_a_nonzero_block_declines():
    """The middle block is 0.5, not zeros: it is a constant shift of k, not a placement."""
    declined_by("fold_linear_affine", cat_model(zero=0.5), "Concat of a non-zero constant")


def test_cat_of_branches_reading_other_tensors_declines():
    """v's adapter reads another tensor: the Concat is no matrix of x."""
    declined_by("fold_linear_affine", cat_model(x2=True), "Concat read different tensors")


def test_cat_on_a_token_axis_declines():
    """Concat on axis 1 stacks rows (tokens), not columns."""
    declined_by("fold_linear_affine", cat_model(axis=1), "Concat is not on the last axis")


@pytest.mark.parametrize("form", ["legacy", "legacy-nofold", "dynamo", "dynamo-noopt"])
@pytest.mark.parametrize("axes", ["static", "batch"])
def test_torch_cat_lora_exports_merge(torch_mod, tmp_path, form, axes):
    """LoRAInplaceAttention(cat=True): 4 MatMul, no Concat, equal to torch."""
    from models.export import export_onnx
    from models.transformers import LoRAInplaceAttention
    torch_mod.manual_seed(1)
    model = LoRAInplaceAttention(cat=True)
    m = onnx.load(str(export_onnx(model, (1, 16, 4, 4), tmp_path / "m.onnx", form, axes=axes)))
    out, _ = run_rules(m)
    assert ops(out)["MatMul"] == 4 and "Concat" not in ops(out)
    x = np.random.default_rng(0).standard_normal((2 if axes == "batch" else 1, 16, *((3, 5) if axes == "hw" else (4, 4))))
    feeds = {"input": x.astype(np.float32)}
    assert_equivalent(m, out, feeds=feeds)


def test_cat_of_the_input_itself_with_zeros_merges():
    """r + cat([0, x], -1): the term is x itself (an identity placed at columns 8:16)."""
    b = GraphBuilder(5)
    x = b.relu(b.input([*ROWS, C]))
    r = b.add(b.matmul(x, C, 2 * C), b.randn((2 * C,)))
    m = b.build(b.relu(b.add(r, b.op("Concat", [b.const(np.zeros((*ROWS, C), np.float32)), x], axis=-1))))
    out, report = run_rules(m, "fold_linear_affine")
    assert ops(out) == {"Relu": 2, "MatMul": 1, "Add": 1} and report.rule_counts == {"fold_linear_affine": 1}
    assert_equivalent(m, out)


# -- tokens of a map with symbolic H, W: the legacy exporter sizes the indices by H·W -----------------
def hw_inplace_model(rows="own", seed=4):
    """x [1, C, H, W] → tokens [1, H·W, C] → qkv; r[..., 0:C] += lora(tokens) written as the legacy
    exporter does with symbolic H, W: ScatterND indices (0, row, column) computed at run time from
    Range(0, Shape(r)[1]) (the token count H·W). rows="zero": every index row is 0 (a Mul by 0)."""
    b = GraphBuilder(seed)
    x = b.input([1, C, "H", "W"], name="x")
    tokens = b.op("Transpose", [b.op("Reshape", [x, b.ints([0, C, -1])])], perm=[0, 2, 1])
    r = b.add(b.op("MatMul", [tokens, b.randn((C, 3 * C))]), b.randn((3 * C,)))
    s = b.op("Slice", [r, b.ints([0]), b.ints([C]), b.ints([-1]), b.ints([1])])
    a = b.add(s, lora(b, tokens, C, C))
    n_tok = b.op("Gather", [b.op("Shape", [r]), b.ints(np.array(1))], axis=0)
    rng = b.op("Range", [b.ints(np.array(0)), n_tok, b.ints(np.array(1))])
    if rows == "zero":
        rng = b.mul(rng, b.ints(np.array(0)))
    row = b.op("Reshape", [rng, b.ints([1, -1, 1])])
    batch, col = b.ints(np.zeros((1, 1, 1), np.int64)), b.ints(np.arange(C).reshape(1, 1, C))
    grid = b.op("Shape", [b.add(b.add(batch, row), col)])
    idx = b.op("Concat", [b.op("Unsqueeze", [b.op("Expand", [t, grid]), b.ints([-1])]) for t in (batch, row, col)],
               axis=-1)
    r = b.op("ScatterND", [r, idx, a])
    return b.build(*[b.relu(p) for p in b.op("Split", [r, b.ints([C, C, C])], n_out=3, axis=-1)])


def test_indices_sized_by_the_token_count_merge():
    """Run-time indices over H·W rows cover every row for every H, W: the adapter merges, no
    ScatterND left, outputs equal at two map sizes."""
    m = hw_inplace_model()
    out, report = run_rules(m)
    assert ops(out).get("MatMul") == 1 and "ScatterND" not in ops(out)
    assert report.rule_counts.get(RULE) == 2
    for hw in ((4, 4), (3, 5)):
        feeds = {"x": np.random.default_rng(1).standard_normal((1, C, *hw)).astype(np.float32)}
        assert_equivalent(m, out, feeds=feeds)
    assert_idempotent(out)


def test_indices_over_the_token_count_that_repeat_a_row_decline():
    """Every index row 0 (Range(0, H·W)·0): only part of the rows is written; the graph is untouched."""
    m = hw_inplace_model(rows="zero")
    declined_by(RULE, m, "index on axis 1")
