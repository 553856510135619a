"""onnxrep.symbolic: shape and index arithmetic evaluated for every value of the symbolic dims.

The evaluator's results are checked against ONNX Runtime at several concrete sizes (the tests
sample; the evaluator itself never does), and the cases it must refuse are refused."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxrep import symbolic as S
from tests.helpers import GraphBuilder, run_model

END = np.iinfo(np.int64).max
SIZES = [{"N": 1, "H": 1, "W": 1}, {"N": 3, "H": 5, "W": 2}, {"N": 2, "H": 0, "W": 7}]


def evaluate(model, name):
    graph = gs.import_onnx(model)
    t = graph.tensors()[name]
    return S.Evaluator().value(t)


def check_against_ort(b, x, *outs):
    """Each output, evaluated symbolically then instantiated, equals ONNX Runtime's at SIZES."""
    model = b.build(*outs)
    syms = {o: evaluate(model, o) for o in outs}
    for env in SIZES:
        feeds = {x: np.zeros((env["N"], 3, env["H"], env["W"]), np.float32)}
        got = run_model(model, feeds)
        for o in outs:
            want = got[o]
            have = syms[o].instantiate(env)
            assert have.shape == want.shape, (o, env, have.shape, want.shape)
            assert np.array_equal(have, want), (o, env)


def shape_of(b, x, axis):
    return b.op("Gather", [b.op("Shape", [x]), b.ints(np.array(axis))], axis=0)


def test_poly_arithmetic_and_proofs():
    """Poly: integer polynomials in symbols ≥ 0; nonneg is proven, not guessed."""
    n, h, w = S.Poly.of("N"), S.Poly.of("H"), S.Poly.of("W")
    assert (n + 2 - n).static == 2
    assert (h + 2).nonneg() and not (h - 1).nonneg() and not (-h).nonneg()
    assert (h + 2).ge(1) and not n.ge(1)
    assert (n.scale(3) + h).subs({"N": 2, "H": 5}) == 11
    hw = h * w
    assert hw == w * h and hw != h + w and str(hw) == "H*W"
    assert (hw * 3 + h).subs({"H": 4, "W": 5}) == 64
    assert (hw + 1).ge(1) and hw.nonneg() and not (hw - h).nonneg()  # H·W − H ≥ 0 holds for W ≥ 1 only
    assert ((n * hw).scale(16)).divide(hw.scale(4)) == n.scale(4)
    assert hw.divide(h + w) is None and (h * 3).divide(2) is None and h.divide(w) is None
    assert S.product([n, h, S.Poly(2), w]) == (n * hw).scale(2)
    assert S.Poly.monomial(("W", "H"), 2) == hw.scale(2)


def test_products_of_shape_dims():
    """Mul of two Shape entries (H·W), a Range over it, shape vectors holding it, ConstantOfShape
    and Expand to [N, H·W, 3], and a Reshape of a value constant along H, W to [N, H·W]: all equal
    ONNX Runtime at every size."""
    b = GraphBuilder(7)
    x = b.input(["N", 3, "H", "W"])
    n, h, w = (shape_of(b, x, a) for a in (0, 2, 3))
    hw = b.mul(h, w)
    rng = b.op("Range", [b.ints(np.array(0)), hw, b.ints(np.array(1))])
    rows = b.op("Reshape", [rng, b.ints([-1, 1])])
    vec = b.op("Concat", [b.op("Unsqueeze", [n, b.ints([0])]), b.op("Unsqueeze", [hw, b.ints([0])]), b.ints([3])], axis=0)
    zeros = b.op("ConstantOfShape", [vec])
    grid = b.add(b.op("Expand", [b.ints(np.arange(3).reshape(1, 1, 3)), vec]), rows)
    cube = b.mul(b.mul(hw, n), b.add(h, b.ints(np.array(2))))  # N·H²·W + 2·N·H·W
    flat = b.op("Reshape", [b.op("Expand", [b.ints(np.arange(3).reshape(1, 3, 1, 1)), b.op("Shape", [x])]),
                            b.ints([0, 3, -1])])
    check_against_ort(b, x, hw, rng, rows, vec, zeros, grid, cube, flat)
    model = b.build(rng)
    hw_poly = S.Poly.of("H") * S.Poly.of("W")
    assert evaluate(model, rng).shape == (hw_poly,)
    assert evaluate(b.build(flat), flat).shape == (S.Poly.of("N"), S.Poly(3), hw_poly)


def test_data_shape_of_tokens():
    """The tokens of a [N, C, H, W] map, Reshape(x, [0, C, -1]) → Transpose → MatMul, have
    [N, H·W, C'] rows: derived where onnx names no dim, and equal to ONNX Runtime's at every size."""
    b = GraphBuilder(8)
    x = b.input(["N", 3, "H", "W"])
    tokens = b.op("Transpose", [b.op("Reshape", [x, b.ints([0, 3, -1])])], perm=[0, 2, 1])
    y = b.matmul(tokens, 3, 5)
    model = b.build(y)
    graph = gs.import_onnx(model)
    got = S.Evaluator().shape(graph.tensors()[y])
    n, h, w = S.Poly.of("N"), S.Poly.of("H"), S.Poly.of("W")
    assert got == (n, h * w, S.Poly(5))
    for env in SIZES:
        feeds = {x: np.zeros((env["N"], 3, env["H"], env["W"]), np.float32)}
        assert run_model(model, feeds)[y].shape == tuple(d.subs(env) for d in got)


def test_dynamo_row_index():
    """Range(0, Shape(x)[2] + 2)[-1:] and [0:1], unsqueezed: the last and first row of a padded map."""
    b = GraphBuilder(0)
    x = b.input(["N", 3, "H", "W"])
    d = b.add(shape_of(b, x, 2), b.ints(np.array(2)))
    rng = b.op("Range", [b.ints(np.array(0)), d, b.ints(np.array(1))])
    last = b.op("Unsqueeze", [b.op("Slice", [rng, b.ints([-1]), b.ints([END]), b.ints([0]), b.ints([1])]),
                              b.ints([-1])])
    first = b.op("Unsqueeze", [b.op("Slice", [rng, b.ints([0]), b.ints([1]), b.ints([0]), b.ints([1])]), b.ints([-1])])
    check_against_ort(b, x, last, first, rng)
    model = b.build(last)
    assert evaluate(model, last).shape == (S.Poly(1), S.Poly(1))


def test_legacy_index_grid():
    """The legacy exporter's k=4 grid: Range(0, N) reshaped, broadcast by Add, Expand to
    Where(Equal(Shape, -1), 1, Shape), Unsqueeze, Concat on the last axis."""
    b = GraphBuilder(1)
    x = b.input(["N", 3, "H", "W"])
    n = shape_of(b, x, 0)
    batch = b.op("Reshape", [b.op("Range", [b.ints(np.array(0)), n, b.ints(np.array(1))]), b.ints([-1, 1, 1, 1])])
    chans = b.ints(np.arange(3).reshape(3, 1, 1))
    cols = b.ints(np.arange(4))
    grid = b.add(b.add(batch, chans), cols)
    shape = b.op("Shape", [grid])
    target = b.op("Where", [b.op("Equal", [shape, b.ints([-1] * 4)]), b.ints([1] * 4), shape])
    parts = [b.op("Unsqueeze", [b.op("Expand", [a, target]), b.ints([-1])])
             for a in (batch, chans, b.ints(np.zeros((1, 1), np.int64)), cols)]
    idx = b.op("Concat", parts, axis=-1)
    check_against_ort(b, x, idx, grid, target)


def test_shape_vector_ops():
    """Concat of Shape slices and constants, ConstantOfShape, Expand of a constant, Squeeze, Transpose,
    Reshape that inserts 1s, Sub, Mul and Cast."""
    b = GraphBuilder(2)
    x = b.input(["N", 3, "H", "W"])
    s = b.op("Shape", [x])
    nw = b.op("Concat", [b.op("Slice", [s, b.ints([0]), b.ints([1]), b.ints([0]), b.ints([1])]), b.ints([2]),
                         b.op("Shape", [x], start=3)], axis=0)
    zeros = b.op("ConstantOfShape", [nw])
    ex = b.op("Expand", [b.ints(np.arange(2).reshape(1, 2, 1)), nw])
    tr = b.op("Transpose", [ex], perm=[2, 0, 1])
    flat = b.op("Reshape", [b.op("Range", [b.ints(np.array(0)), shape_of(b, x, 3), b.ints(np.array(1))]),
                            b.ints([1, -1, 1])])
    sq = b.op("Squeeze", [flat, b.ints([0, 2])])
    arith = b.op("Cast", [b.sub(b.mul(nw, b.ints([2, 1, 3])), b.ints([1, 1, 1]))], to=7)
    check_against_ort(b, x, nw, zeros, ex, tr, flat, sq, arith)


def test_whole_copy_scatter():
    """ScatterND over Range(0, N) of updates the shape of the data returns the updates."""
    b = GraphBuilder(3)
    x = b.input(["N", 3, "H", "W"])
    n = shape_of(b, x, 0)
    idx = b.op("Unsqueeze", [b.op("Range", [b.ints(np.array(0)), n, b.ints(np.array(1))]), b.ints([-1])])
    upd = b.op("Expand", [b.ints(np.arange(3).reshape(1, 3, 1, 1)), b.op("Shape", [x])])
    out = b.op("ScatterND", [b.op("Expand", [b.ints(np.zeros((1, 1, 1, 1), np.int64)), b.op("Shape", [x])]), idx, upd])
    check_against_ort(b, x, out)


def test_refusals():
    """What is not the same for every value of the symbols is Unknown, with a reason."""
    b = GraphBuilder(4)
    x = b.input(["N", 3, "H", "W"])
    n, h = shape_of(b, x, 0), shape_of(b, x, 2)
    rng_n = b.op("Range", [b.ints(np.array(0)), n, b.ints(np.array(1))])
    nh = b.op("Concat", [b.ints([1]), b.op("Unsqueeze", [n, b.ints([0])]), b.op("Unsqueeze", [h, b.ints([0])])], axis=0)
    grid_nh = b.op("Expand", [b.op("Reshape", [rng_n, b.ints([1, -1, 1])]), nh])
    cases = {
        # the last sample: a clamp that differs for N = 0
        "slice": b.op("Slice", [rng_n, b.ints([-1]), b.ints([END]), b.ints([0]), b.ints([1])]),
        # a coordinate times a symbol (i·H, row-major flattening): coefficients of coordinates are numbers
        "coordinate product": b.mul(rng_n, h),
        "product equal": b.op("Equal", [b.mul(n, h), n]),  # N·H == N for H = 1 only
        # 3·H·W / 2 rows: not an integer polynomial, so the -1 is not inferred
        "uneven -1": b.op("Shape", [b.op("Reshape", [x, b.ints([0, 2, -1])])]),
        # regrouping [1, N, H] → [N·H] of a value that varies along N
        "varying regroup": b.op("Reshape", [grid_nh, b.ints([-1])]),
        "equal": b.op("Equal", [n, h]),  # true for some sizes, false for others
        "range": b.op("Range", [b.ints(np.array(0)), b.sub(n, h), b.ints(np.array(1))]),  # length may be < 0
        "data": b.op("ReduceMax", [x], keepdims=0),  # a value of the input
        "partial": b.op("ScatterND", [b.op("Expand", [b.ints(np.zeros((1, 1), np.int64)), b.ints([4, 2])]),
                                      b.ints(np.zeros((1, 1), np.int64)), b.ints(np.ones((1, 2), np.int64))]),
    }
    model = b.build(*cases.values(), check=False)
    for what, name in cases.items():
        with pytest.raises(S.Unknown):
            evaluate(model, name)


def test_data_shapes_onnx_leaves_unnamed():
    """onnx names no dim for a Conv over symbolic H, W; the evaluator derives it (stride 1: X + pads
    - dilation·(k-1)), through Pad and same-shape ops, and gives up on a stride-2 symbolic dim."""
    b = GraphBuilder(5)
    x = b.input(["N", 3, "H", "W"])
    c1 = b.conv(x, 3, 5, k=3, pad=1)
    c2 = b.conv(b.relu(c1), 5, 4, k=3, pad=0, dil=2)
    p = b.pad(c2, [0, 0, 1, 2, 0, 0, 3, 0])
    s2 = b.conv(p, 4, 4, k=1, stride=2)
    model = b.build(p, s2)
    graph = gs.import_onnx(model)
    ev = S.Evaluator()
    n, h, w = S.Poly.of("N"), S.Poly.of("H"), S.Poly.of("W")
    assert ev._data_shape(graph.tensors()[c1]) == (n, S.Poly(5), h, w)
    assert ev._data_shape(graph.tensors()[p]) == (n, S.Poly(4), h - 4 + 4, w - 4 + 2)
    assert ev._data_shape(graph.tensors()[s2]) is None


def test_data_shapes_through_prelu():
    """PRelu's output has its input's shape (the slope broadcasts to it): ECB's second block pads the
    output of a 1x1 conv over the first block's PRelu, whose dims onnx leaves unnamed."""
    b = GraphBuilder(6)
    x = b.input(["N", 3, "H", "W"])
    act = b.op("PRelu", [b.conv(x, 3, 4, k=3, pad=1), b.const(np.full((4, 1, 1), 0.25))])
    p = b.pad(b.conv(act, 4, 4, k=1), [0, 0, 1, 1, 0, 0, 1, 1])
    model = b.build(p)
    graph = gs.import_onnx(model)
    n, h, w = S.Poly.of("N"), S.Poly.of("H"), S.Poly.of("W")
    assert S.Evaluator()._data_shape(graph.tensors()[p]) == (n, S.Poly(4), h + 2, w + 2)
