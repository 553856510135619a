"""Constant folding (onnxrep/folding.py): differential against ONNX Runtime op by op, the size cap,
overridable initializers, and the dynamo exporter's optimize=False spellings."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxrep
from onnxrep import folding as F
from onnxrep import graph as G
from onnxrep import optimizer as O
from onnxrep import verify as V

RNG = np.random.default_rng(0)
INT64_MAX = np.iinfo(np.int64).max


def _model(nodes, inputs, outputs, inits=None, opset=18, ir=8):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    onnx.checker.check_model(model, full_check=True)
    return model


def fold_only(model: onnx.ModelProto, **options) -> onnx.ModelProto:
    """The prepare step alone (shape inference + folding), exported as a model: no rule runs."""
    work, graph = O.prepare(model, folding=F.FoldOptions(**options))
    lean = G.export_skeleton(graph, work)
    F.restore_overridable(graph, lean)
    return lean.materialize()


def ops(model) -> list[str]:
    return sorted(n.op_type for n in model.graph.node)


def assert_same_in_ort(a, b, feeds):
    """Both models in ORT, graph optimizations off: bit-identical outputs (folding only moves work)."""
    ra, rb = V.run(a, feeds), V.run(b, feeds)
    assert ra.keys() == rb.keys()
    for k in ra:
        assert ra[k].dtype == rb[k].dtype and ra[k].shape == rb[k].shape, k
        np.testing.assert_array_equal(ra[k], rb[k], err_msg=k)


def _x(shape, name="x"):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _probe():
    return helper.make_tensor_value_info("z", TensorProto.INT64, [1])


def shape_probe(build, x_shape=(2, 3, 5, 7)):
    """x → [shape arithmetic built by `build`] → Add(·, z) → out, with z an int64 input: the Add
    keeps the folded value away from the graph output, so the fold itself is what is compared."""
    nodes, out = build()
    nodes.append(helper.make_node("Add", [out, "z"], ["out"]))
    return _model(nodes, [_x(list(x_shape)), _probe()],
                  [helper.make_tensor_value_info("out", TensorProto.INT64, ["k"])])


def _c(name, values):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64), name))


SHAPE_CASES = {
    f"Shape start={s} end={e}": (lambda s=s, e=e: ([helper.make_node("Shape", ["x"], ["s"], **{k: v for k, v in (("start", s), ("end", e)) if v is not None})], "s"))
    for s, e in [(None, None), (1, 2), (1, None), (-2, None), (-3, -1), (2, 100), (-100, 1), (3, 1), (0, -4), (None, -1)]
}
SHAPE_CASES.update({
    "Size": lambda: ([helper.make_node("Size", ["x"], ["s0"]), _c("one", [1]),
                      helper.make_node("Reshape", ["s0", "one"], ["s"])], "s"),
    "Gather scalar": lambda: ([helper.make_node("Shape", ["x"], ["sh"]), _c("i", -1),
                               helper.make_node("Gather", ["sh", "i"], ["g"]), _c("one", [1]),
                               helper.make_node("Reshape", ["g", "one"], ["s"])], "s"),
    "Gather vector of Shape(start)": lambda: ([helper.make_node("Shape", ["x"], ["sh"], start=1), _c("i", [2, 0, -1]),
                                               helper.make_node("Gather", ["sh", "i"], ["s"])], "s"),
    **{f"Slice {a}:{b}:{c} of Shape(end=-1)": (lambda a=a, b=b, c=c: (
        [helper.make_node("Shape", ["x"], ["sh"], end=-1), _c("a", [a]), _c("b", [b]), _c("ax", [0]), _c("st", [c]),
         helper.make_node("Slice", ["sh", "a", "b", "ax", "st"], ["s"])], "s"))
       for a, b, c in [(0, 2, 1), (-2, INT64_MAX, 1), (2, -INT64_MAX, -1), (-1, 0, -1), (5, -5, -2), (0, 3, 2)]},
})


@pytest.mark.parametrize("case", sorted(SHAPE_CASES))
def test_shape_folds_like_onnxruntime(case):
    """Each shape op the folding step evaluates itself gives what ORT computes, and is gone."""
    model = shape_probe(SHAPE_CASES[case])
    folded = fold_only(model)
    assert ops(folded) == ["Add"]
    assert_same_in_ort(model, folded, {"x": RNG.standard_normal((2, 3, 5, 7)).astype(np.float32),
                                       "z": np.array([5], np.int64)})


def test_dims_picked_from_a_dynamic_shape_fold():
    """Gather/Slice pick static dims out of a shape whose batch is symbolic: folded, batch stays."""
    def build():
        return ([helper.make_node("Shape", ["x"], ["sh"]), _c("i", [1, 3]), helper.make_node("Gather", ["sh", "i"], ["g"]),
                 _c("a", [2]), _c("b", [4]), helper.make_node("Slice", ["sh", "a", "b"], ["sl"]),
                 helper.make_node("Concat", ["g", "sl"], ["s"], axis=0)], "s")

    model = shape_probe(build, x_shape=("N", 3, 5, 7))
    folded = fold_only(model)
    assert ops(folded) == ["Add"]
    for n in (1, 4):
        assert_same_in_ort(model, folded, {"x": np.zeros((n, 3, 5, 7), np.float32), "z": np.array([0], np.int64)})


def test_dynamic_dim_is_not_folded():
    """Negative: Shape(x, start=0, end=1) of a symbolic batch stays a Shape."""
    model = shape_probe(lambda: ([helper.make_node("Shape", ["x"], ["s"], start=0, end=1)], "s"), x_shape=("N", 3, 5, 7))
    folded = fold_only(model)
    assert "Shape" in ops(folded)
    assert_same_in_ort(model, folded, {"x": np.zeros((3, 3, 5, 7), np.float32), "z": np.array([0], np.int64)})


def test_shape_start_end_feeds_a_reshape_end_to_end():
    """Issue 12 item 2: Reshape(scale, Concat(1, Shape(x, 1, 2), 1, 1)) * x — graphsurgeon folded the
    Shape as the full shape (rank 4), the checker then failed; now it optimizes and verifies."""
    nodes = [helper.make_node("Shape", ["x"], ["c"], start=1, end=2), _c("one", [1]), _c("ones", [1, 1]),
             helper.make_node("Concat", ["one", "c", "ones"], ["shape"], axis=0),
             helper.make_node("Reshape", ["scale", "shape"], ["s4"]),
             helper.make_node("Mul", ["x", "s4"], ["y"])]
    model = _model(nodes, [_x([1, 3, 5, 7])], [_x([1, 3, 5, 7], "y")], {"scale": RNG.standard_normal(3).astype(np.float32)})
    out, report = onnxrep.optimize(model, return_report=True)
    assert report.verification["ok"]
    onnx.checker.check_model(out, full_check=True)
    assert "Shape" not in ops(out)
    x = RNG.standard_normal((1, 3, 5, 7)).astype(np.float32)
    np.testing.assert_allclose(V.run(out, {"x": x})["y"], V.run(model, {"x": x})["y"], rtol=1e-6)


VALUE_CASES = {  # ops graphsurgeon hands to ORT under the size guard: small sizes fold
    "ConstantOfShape": lambda: ([_c("n", [2, 3]), helper.make_node("ConstantOfShape", ["n"], ["v"], value=numpy_helper.from_array(np.array([2.5], np.float32)))], "v", (2, 3)),
    "Expand": lambda: ([_c("n", [4, 3]), helper.make_node("Expand", ["c3", "n"], ["v"])], "v", (4, 3)),
    "Tile": lambda: ([_c("r", [2, 2]), helper.make_node("Tile", ["c23", "r"], ["v"])], "v", (4, 6)),
    "Range": lambda: ([helper.make_node("Range", ["f0", "f5", "fhalf"], ["v"])], "v", (10,)),
    "CastLike": lambda: ([helper.make_node("CastLike", ["i3", "x"], ["v"])], "v", (3,)),
}


@pytest.mark.parametrize("case", sorted(VALUE_CASES))
def test_value_ops_fold_like_onnxruntime(case):
    nodes, out, shape = VALUE_CASES[case]()
    nodes.append(helper.make_node("Add", [out, "w"], ["out"]))
    inits = {"c3": np.arange(3, dtype=np.float32), "c23": np.arange(6, dtype=np.float32).reshape(2, 3),
             "f0": np.array(0, np.float32), "f5": np.array(5, np.float32), "fhalf": np.array(0.5, np.float32),
             "i3": np.array([1, -2, 7], np.int64)}
    model = _model(nodes, [_x([3]), _x(list(shape), "w")], [_x(list(shape), "out")],
                   {k: v for k, v in inits.items() if any(k in n.input for n in nodes)})
    folded = fold_only(model)
    assert ops(folded) == ["Add"]
    assert_same_in_ort(model, folded, {"x": np.ones(3, np.float32), "w": RNG.standard_normal(shape).astype(np.float32)})


def test_cast_like_of_an_int_to_half():
    """CastLike(c, x) with fp16 x: the Cast it becomes rounds like ORT's CastLike."""
    nodes = [helper.make_node("CastLike", ["c", "x"], ["v"]), helper.make_node("Add", ["v", "x"], ["out"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [3])],
                   [helper.make_tensor_value_info("out", TensorProto.FLOAT16, [3])],
                   # not 65519: ORT 1.32's CastLike kernel rounds it to inf, its Cast (and IEEE) to 65504
                   {"c": np.array([0.1, 1000.3, -1e-8], np.float32)})
    folded = fold_only(model)
    assert ops(folded) == ["Add"]
    assert_same_in_ort(model, folded, {"x": np.ones(3, np.float16)})


def _split_model(split, positions, axis=1, shape=(1, 7, 4)):
    nodes = [helper.make_node("SplitToSequence", ["x", "split"], ["seq"], axis=axis)]
    outs = []
    for k, p in enumerate(positions):
        nodes += [_c(f"p{k}", p), helper.make_node("SequenceAt", ["seq", f"p{k}"], [f"part{k}"]),
                  helper.make_node("Relu", [f"part{k}"], [f"out{k}"])]
        outs.append(_x(["a", "b", "c"], f"out{k}"))
    return _model(nodes, [_x(list(shape))], outs, {"split": np.array(split, np.int64)})


@pytest.mark.parametrize("split,positions", [([2, 5], [0, 1]), ([3, 3, 1], [-1, 0]), (3, [0, 1, 2]), (2, [-1])])
def test_split_to_sequence_becomes_split(split, positions):
    """SplitToSequence with constant splits read by SequenceAt at constant positions is a Split."""
    model = _split_model(split, positions)
    folded = fold_only(model)
    assert "SplitToSequence" not in ops(folded) and "SequenceAt" not in ops(folded) and "Split" in ops(folded)
    assert_same_in_ort(model, folded, {"x": RNG.standard_normal((1, 7, 4)).astype(np.float32)})


def test_split_to_sequence_with_a_repeated_position_stays():
    """Negative: two readers of one position (or a non-constant split) are left alone."""
    model = _split_model([2, 5], [1, 1])
    assert "SplitToSequence" in ops(fold_only(model))


def test_reshape_carrying_a_symbolic_dim_gets_a_constant_target():
    """Reshape(x, Concat(Shape(x, 0, 1), [-1])) with allowzero=1 (the dynamo exporter's flatten) →
    Reshape(x, [0, -1]); a dim taken from another position is left alone (negative)."""
    def build(start, end):
        nodes = [helper.make_node("Shape", ["x"], ["b"], start=start, end=end), _c("m1", [-1]),
                 helper.make_node("Concat", ["b", "m1"], ["t"], axis=0),
                 helper.make_node("Reshape", ["x", "t"], ["y"], allowzero=1)]
        return _model(nodes, [_x(["N", "C", 2, 2])], [_x(["a", "b"], "y")])

    model = build(0, 1)
    folded = fold_only(model)
    assert ops(folded) == ["Reshape"]
    for n in (1, 3):
        assert_same_in_ort(model, folded, {"x": RNG.standard_normal((n, 5, 2, 2)).astype(np.float32)})
    assert "Shape" in ops(fold_only(build(1, 2)))  # C at position 0: not the same dim


def _flatten_hw_model(fixed_c):
    """x [1, C, H, W] → Reshape(x, Concat([1], C, H·W)) with H·W computed from Shape, as the dynamo
    exporter (optimize=False) spells `x.flatten(2)` on symbolic H, W; C a constant or Shape(x)[1]."""
    nodes = [helper.make_node("Shape", ["x"], ["h"], start=2, end=3), helper.make_node("Shape", ["x"], ["w"], start=3, end=4),
             helper.make_node("Squeeze", ["h"], ["hs"]), helper.make_node("Squeeze", ["w"], ["ws"]),
             helper.make_node("Mul", ["hs", "ws"], ["hw"]), _c("m1", [-1]),
             helper.make_node("Reshape", ["hw", "m1"], ["hw1"]), _c("one", [1])]
    if fixed_c:
        nodes.append(_c("c", [4]))
    else:
        nodes.append(helper.make_node("Shape", ["x"], ["c"], start=1, end=2))
    nodes += [helper.make_node("Concat", ["one", "c", "hw1"], ["t"], axis=0),
              helper.make_node("Reshape", ["x", "t"], ["y"], allowzero=1)]
    return _model(nodes, [_x([1, "C" if not fixed_c else 4, "H", "W"])], [_x([1, "c", "n"], "y")])


def test_reshape_with_one_computed_entry_gets_minus_one():
    """Reshape(x, Concat(1, 4, H·W)) (dynamo noopt's flatten(2) on symbolic H, W) → Reshape(x, [1, 4, -1]):
    the element count sets the one computed entry; the shape arithmetic goes away."""
    model = _flatten_hw_model(fixed_c=True)
    folded = fold_only(model)
    assert ops(folded) == ["Reshape"]
    target = numpy_helper.to_array(next(t for t in folded.graph.initializer if t.name == folded.graph.node[0].input[1]))
    assert target.tolist() == [1, 4, -1]
    for hw in ((3, 5), (1, 1)):
        assert_same_in_ort(model, folded, {"x": RNG.standard_normal((1, 4, *hw)).astype(np.float32)})


def test_reshape_with_two_computed_entries_keeps_its_shape_arithmetic():
    """Negative: C and H·W both computed (symbolic C) leave two unknowns: not one -1, untouched."""
    model = _flatten_hw_model(fixed_c=False)
    folded = fold_only(model)
    assert "Concat" in ops(folded) and "Mul" in ops(folded)
    assert_same_in_ort(model, folded, {"x": RNG.standard_normal((1, 4, 3, 5)).astype(np.float32)})


def _heads_model(variant):
    """Attention's head split on symbolic H, W as dynamo (optimize=False) writes it: tokens
    t = Reshape(x, Concat(1, 4, H·W)) → Transpose → MatMul(W) [1, H·W, 8] (or one 8-wide part of
    a Split, lora_qkv), then Reshape(·, Concat(1, H·W, 2, -1)) with H·W from Shape(x) again.
    "weight_input": W is a graph input [4, K]: the MatMul's output has H·W·K elements, and K / 2
    is not a product of known dims."""
    nodes = [helper.make_node("Shape", ["x"], ["h"], start=2, end=3), helper.make_node("Shape", ["x"], ["w"], start=3, end=4),
             helper.make_node("Squeeze", ["h"], ["hs"]), helper.make_node("Squeeze", ["w"], ["ws"]),
             helper.make_node("Mul", ["hs", "ws"], ["hw"]), _c("m1", [-1]),
             helper.make_node("Reshape", ["hw", "m1"], ["hw1"]), _c("one", [1]), _c("c", [4]), _c("two", [2]),
             helper.make_node("Concat", ["one", "c", "hw1"], ["t"], axis=0),
             helper.make_node("Reshape", ["x", "t"], ["tok"], allowzero=1),
             helper.make_node("Transpose", ["tok"], ["tokT"], perm=[0, 2, 1])]
    inputs, inits = [_x([1, 4, "H", "W"])], {}
    if variant == "split":
        inits = {"W": RNG.standard_normal((4, 16)).astype(np.float32), "sizes": np.array([8, 8], np.int64)}
        nodes += [helper.make_node("MatMul", ["tokT", "W"], ["qk"]),
                  helper.make_node("Split", ["qk", "sizes"], ["q", "k"], axis=2)]
    elif variant == "weight_input":
        inputs.append(_x([4, "K"], "W"))
        nodes.append(helper.make_node("MatMul", ["tokT", "W"], ["q"]))
    else:
        inits = {"W": RNG.standard_normal((4, 8)).astype(np.float32)}
        nodes.append(helper.make_node("MatMul", ["tokT", "W"], ["q"]))
    nodes += [helper.make_node("Concat", ["one", "hw1", "two", "m1"], ["t2"], axis=0),
              helper.make_node("Reshape", ["q", "t2"], ["y"], allowzero=1)]
    return _model(nodes, inputs, [_x(["a", "b", "c", "d"], "y")], inits)


def _feeds(variant, h, w):
    feeds = {"x": RNG.standard_normal((1, 4, h, w)).astype(np.float32)}
    if variant == "weight_input":
        feeds["W"] = RNG.standard_normal((4, 8)).astype(np.float32)
    return feeds


@pytest.mark.parametrize("variant", ["matmul", "split"])
def test_head_split_on_symbolic_tokens_gets_constant_targets(variant):
    """Reshape(q, Concat(1, H·W, 2, -1)): q's element count H·W·8 (followed from x through the
    token Reshape, Transpose, the constant-weight MatMul and the Split) makes the -1 a 4, and then
    H·W is the one unknown: [1, -1, 2, 4]. No shape arithmetic is left."""
    model = _heads_model(variant)
    folded = fold_only(model)
    assert not {"Shape", "Concat", "Mul", "Squeeze"} & set(ops(folded)), ops(folded)
    targets = {tuple(numpy_helper.to_array(t).tolist()) for t in folded.graph.initializer if t.data_type == TensorProto.INT64}
    assert (1, -1, 2, 4) in targets and (1, 4, -1) in targets
    for h, w in ((3, 5), (2, 2), (1, 1)):
        assert_same_in_ort(model, folded, _feeds(variant, h, w))


def test_head_split_whose_token_count_is_unknown_keeps_its_shape_arithmetic():
    """Negative: q = tokens · W with W [4, K] a graph input: the -1 of [1, H·W, 2, -1] is K/2,
    which no product of the inputs' dims spells, so the target keeps two unknowns and stays."""
    model = _heads_model("weight_input")
    folded = fold_only(model)
    assert "Concat" in ops(folded)
    assert_same_in_ort(model, folded, _feeds("weight_input", 3, 5))


def test_head_merge_after_attention_gets_a_constant_target():
    """The legacy exporter's merge of the heads, reshape(B, N, -1) with N = Shape(tokens)[1] on
    symbolic H, W: N (a dim onnx names unk__) is followed to H·W, the attention output's
    [1, 2, H·W, 4] through both computed MatMuls and the Transposes, so the -1 is 8: [1, -1, 8]."""
    model = _heads_model("matmul")
    g = model.graph
    del g.node[-2:]  # the head split, rebuilt below with the merge after it
    g.node.extend([
        _c("four", [4]), helper.make_node("Concat", ["one", "hw1", "two", "four"], ["t2"], axis=0),
        helper.make_node("Reshape", ["q", "t2"], ["q4"]),
        helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["q4"], ["kh"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["qh", "kh"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "qh"], ["o"]),
        helper.make_node("Transpose", ["o"], ["oT"], perm=[0, 2, 1, 3]),
        helper.make_node("Shape", ["tokT"], ["ts"]), _c("i1", 1), helper.make_node("Gather", ["ts", "i1"], ["n"], axis=0),
        _c("zero", [0]), helper.make_node("Unsqueeze", ["n", "zero"], ["n1"]),
        helper.make_node("Concat", ["one", "n1", "m1"], ["t3"], axis=0),
        helper.make_node("Reshape", ["oT", "t3"], ["y"])])
    del g.output[:]
    g.output.append(_x(["a", "b", "c"], "y"))
    onnx.checker.check_model(model, full_check=True)
    folded = fold_only(model)
    assert not {"Shape", "Concat", "Mul", "Squeeze", "Gather", "Unsqueeze"} & set(ops(folded)), ops(folded)
    targets = {tuple(numpy_helper.to_array(t).tolist()) for t in folded.graph.initializer if t.data_type == TensorProto.INT64}
    assert (1, -1, 8) in targets
    for h, w in ((3, 5), (1, 2)):
        assert_same_in_ort(model, folded, _feeds("matmul", h, w))


@pytest.mark.parametrize("target,shape,dropped", [([-1, 4], (3, 2, 2), True), ([0, 5], (2, 0), False)])
def test_allowzero_is_dropped_from_a_target_without_zeros(target, shape, dropped):
    """Reshape(allowzero=1) to [-1, 4] reads as allowzero=0 (the attribute only matters for a 0
    entry): one spelling for the rules; a target with a 0 (an empty dim, not a copy) keeps it."""
    nodes = [_c("t", target), helper.make_node("Reshape", ["x", "t"], ["y"], allowzero=1),
             helper.make_node("Relu", ["y"], ["z"])]
    model = _model(nodes, [_x(list(shape))], [_x(["a", "b"], "z")])
    folded = fold_only(model)
    reshape = next(n for n in folded.graph.node if n.op_type == "Reshape")
    allowzero = next((a.i for a in reshape.attribute if a.name == "allowzero"), 0)
    assert allowzero == (0 if dropped else 1)
    assert_same_in_ort(model, folded, {"x": RNG.standard_normal(shape).astype(np.float32)})


def _transposes(p1, p2, fan_out=False):
    nodes = [helper.make_node("Transpose", ["x"], ["t1"], perm=p1), helper.make_node("Transpose", ["t1"], ["t2"], perm=p2),
             helper.make_node("Relu", ["t2"], ["y"])]
    outs = [_x(["a", "b", "c", "d"], "y")]
    if fan_out:
        nodes.append(helper.make_node("Neg", ["t1"], ["z"]))
        outs.append(_x(["a", "b", "c", "d"], "z"))
    return _model(nodes, [_x([2, 3, 4, 5])], outs)


@pytest.mark.parametrize("p1,p2,left", [([0, 2, 1, 3], [0, 1, 3, 2], 1), ([0, 2, 1, 3], [0, 2, 1, 3], 0),
                                        ([3, 0, 2, 1], [1, 3, 0, 2], 1)])
def test_transpose_of_transpose_is_one_transpose(p1, p2, left):
    """Transpose(Transpose(x, p1), p2) → Transpose(x, p1[p2]) (attention's k.transpose(1, 2).transpose(-2, -1)
    as the dynamo exporter writes it without its optimizer); none when that is the identity."""
    model = _transposes(p1, p2)
    folded = fold_only(model)
    assert ops(folded).count("Transpose") == left
    assert_same_in_ort(model, folded, {"x": RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)})


def test_transpose_whose_inner_result_is_read_twice_stays():
    """Negative: the inner Transpose's result has another reader: both Transposes stay."""
    model = _transposes([0, 2, 1, 3], [0, 1, 3, 2], fan_out=True)
    folded = fold_only(model)
    assert ops(folded).count("Transpose") == 2
    assert_same_in_ort(model, folded, {"x": RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)})


def _splits(second_sizes):
    """Three Splits of one tensor, each with one piece read (dynamo-noopt's q, k, v of one r)."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), _c("s1", [4, 4, 4]), _c("s2", second_sizes)]
    outs = []
    for k, sizes in enumerate(["s1", "s2", "s1"]):
        pieces = [f"p{k}_{j}" for j in range(3)]
        nodes += [helper.make_node("Split", ["r", sizes], pieces, axis=-1 if k else 2),
                  helper.make_node("Neg", [pieces[k]], [f"y{k}"])]
        outs.append(_x([2, 3, 4], f"y{k}"))
    return _model(nodes, [_x([2, 3, 12])], outs)


@pytest.mark.parametrize("second,left", [([4, 4, 4], 1), ([2, 4, 6], 2)])
def test_identical_splits_of_one_tensor_are_one_split(second, left):
    """Splits of one tensor on the same axis (2 and -1 alike) into the same sizes → one Split; a Split
    into other sizes stays."""
    model = _splits(second)
    folded = fold_only(model)
    assert ops(folded).count("Split") == left
    assert_same_in_ort(model, folded, {"x": RNG.standard_normal((2, 3, 12)).astype(np.float32)})


# -- size cap -------------------------------------------------------------------------------------
def bomb_model(n=3_200_000_000):
    """A few hundred bytes: If(max(x) > 1e30) then ReduceSum(ConstantOfShape([n])) else ReduceSum(x).
    ORT never takes the then-branch on ordinary inputs; folding it would materialize n floats."""
    big = helper.make_graph(
        [_c("n", [n]), helper.make_node("ConstantOfShape", ["n"], ["zeros"], value=numpy_helper.from_array(np.array([1.0], np.float32))),
         helper.make_node("ReduceSum", ["zeros"], ["r"], keepdims=0)], "then", [],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, [])])
    small = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["r2"], keepdims=0)], "else", [],
                              [helper.make_tensor_value_info("r2", TensorProto.FLOAT, [])])
    nodes = [helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0),
             helper.make_node("Greater", ["mx", "huge"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=big, else_branch=small)]
    return _model(nodes, [_x([4, 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
                  {"huge": np.array(1e30, np.float32)})


def test_huge_constant_in_an_untaken_branch_is_not_materialized(tmp_path):
    """Issue 12 item 4: optimize stays small in memory and says what it did not fold."""
    path = tmp_path / "bomb.onnx"
    onnx.save(bomb_model(), str(path))
    assert path.stat().st_size < 1024
    proc = subprocess.Popen([sys.executable, "-m", "onnxrep", "optimize", str(path), str(tmp_path / "out.onnx"),
                             "--report", str(tmp_path / "r.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, err
    assert usage.ru_maxrss < 1_500_000  # KiB: the interpreter, onnx, ORT and numpy take ~300-500 MB
    assert "not folded" in out and "fold limit" in out


def test_fold_limit_keeps_large_constants_unfolded():
    """A 4 KiB ConstantOfShape folds by default and stays a node under a 1 KiB limit."""
    nodes = [_c("n", [1024]), helper.make_node("ConstantOfShape", ["n"], ["v"], value=numpy_helper.from_array(np.array([1.5], np.float32))),
             helper.make_node("Add", ["v", "x"], ["y"])]
    model = _model(nodes, [_x([1024])], [_x([1024], "y")])
    assert ops(fold_only(model)) == ["Add"]
    capped = fold_only(model, fold_limit=1024)
    assert ops(capped) == ["Add", "ConstantOfShape"]
    x = RNG.standard_normal(1024).astype(np.float32)
    assert_same_in_ort(model, capped, {"x": x})
    _, report = onnxrep.optimize(model, fold_limit=1024, return_report=True)
    assert any("fold limit" in n for n in report.notes)


def test_estimate_bounds_value_dependent_sizes():
    """The guard's estimate reads the values that set a size; it knows nothing before they are constants."""
    import onnx_graphsurgeon as gs

    shape = gs.Constant("n", np.array([1000, 1000], np.int64))
    out = gs.Variable("v", dtype=np.float32)
    node = gs.Node("ConstantOfShape", inputs=[shape], outputs=[out])
    assert F.estimate_bytes(node) == 4_000_000
    node2 = gs.Node("ConstantOfShape", inputs=[gs.Variable("m", dtype=np.int64, shape=[2])], outputs=[gs.Variable("w")])
    assert F.estimate_bytes(node2) is None
    tile = gs.Node("Tile", inputs=[gs.Constant("a", np.zeros((2, 3), np.float32)), gs.Constant("r", np.array([10, 10], np.int64))],
                   outputs=[gs.Variable("t", dtype=np.float32)])
    assert F.estimate_bytes(tile) == 2 * 3 * 100 * 4


def test_random_ops_never_fold():
    """Negative: RandomNormal has no inputs, so 'all inputs constant' holds; it must still run each time."""
    nodes = [helper.make_node("RandomNormal", [], ["r"], shape=[4], dtype=TensorProto.FLOAT),
             helper.make_node("Add", ["r", "x"], ["y"])]
    model = _model(nodes, [_x([4])], [_x([4], "y")])
    assert "RandomNormal" in ops(fold_only(model))


# -- overridable initializers ---------------------------------------------------------------------
def overridable_conv_bn(ir=8):
    """Conv(x, W) → BN, where W is an initializer *and* a graph input (a default the caller may override)."""
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    c = 4
    bn = {"s": RNG.uniform(0.5, 2, c), "b": RNG.standard_normal(c), "m": RNG.standard_normal(c), "v": RNG.uniform(0.5, 2, c)}
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"], name="bn")]
    inputs = [_x([1, 3, 8, 8]), helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 3, 3, 3])]
    if ir < 4:  # every initializer is an input
        inputs += [helper.make_tensor_value_info(k, TensorProto.FLOAT, [c]) for k in bn]
    return _model(nodes, inputs, [_x([1, 4, 8, 8], "y")], {"W": w, **{k: v.astype(np.float32) for k, v in bn.items()}}, ir=ir)


def test_overridable_weight_is_not_folded_and_the_signature_stays():
    """Issue 12 item 5: by default W stays an input with its default, the Conv+BN is not fused,
    the decline names --freeze-inputs, and the optimized model honours an overriding W."""
    model = overridable_conv_bn()
    out, report = onnxrep.optimize(model, return_report=True)
    assert [i.name for i in out.graph.input] == ["x", "W"]
    assert "W" in {t.name for t in out.graph.initializer}
    assert ops(out) == ["BatchNormalization", "Conv"]
    assert any("--freeze-inputs" in d["reason"] for d in report.declines)
    assert any("--freeze-inputs" in n for n in report.notes)
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    w2 = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    np.testing.assert_array_equal(V.run(out, {"x": x, "W": w2})["y"], V.run(model, {"x": x, "W": w2})["y"])
    np.testing.assert_array_equal(V.run(out, {"x": x})["y"], V.run(model, {"x": x})["y"])


def test_freeze_inputs_folds_them():
    model = overridable_conv_bn()
    out = onnxrep.optimize(model, freeze_inputs=True)
    assert [i.name for i in out.graph.input] == ["x"]
    assert ops(out) == ["Conv"]
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(V.run(out, {"x": x})["y"], V.run(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)


def test_ir3_initializers_are_constants():
    """Before IR 4 every initializer had to be listed as an input: there they are constants."""
    model = overridable_conv_bn(ir=3)
    assert ops(onnxrep.optimize(model)) == ["Conv"]


def test_freeze_inputs_cli(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(overridable_conv_bn(), str(path))
    for flags, inputs in (([], ["x", "W"]), (["--freeze-inputs"], ["x"])):
        out = tmp_path / f"out{len(flags)}.onnx"
        proc = subprocess.run([sys.executable, "-m", "onnxrep", "optimize", str(path), str(out), *flags, "--explain"],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert [i.name for i in onnx.load(str(out)).graph.input] == inputs
        assert ("--freeze-inputs" in proc.stdout) == (not flags)


@pytest.mark.parametrize("value", ["abc", "-1", "1X"])
def test_fold_limit_flag_usage_error(tmp_path, value):
    path = tmp_path / "m.onnx"
    onnx.save(overridable_conv_bn(), str(path))
    proc = subprocess.run([sys.executable, "-m", "onnxrep", "optimize", str(path), str(tmp_path / "o.onnx"), "--fold-limit", value],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


# -- the dynamo exporter with optimize=False ------------------------------------------------------
def test_bias_free_conv_spelled_by_dynamo_noopt_merges():
    """Conv(x, W, Expand(CastLike(0, x), Shape(W, 0, 1))) → BN folds into one Conv."""
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    c = 4
    nodes = [helper.make_node("CastLike", ["zero", "x"], ["z"]), helper.make_node("Shape", ["W"], ["cout"], start=0, end=1),
             helper.make_node("Expand", ["z", "cout"], ["bias"]),
             helper.make_node("Conv", ["x", "W", "bias"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])]
    inits = {"W": w, "zero": np.array(0.0, np.float32), "s": np.full(c, 2, np.float32), "b": np.ones(c, np.float32),
             "m": np.zeros(c, np.float32), "v": np.ones(c, np.float32)}
    model = _model(nodes, [_x([1, 3, 8, 8])], [_x([1, 4, 8, 8], "y")], inits)
    out, report = onnxrep.optimize(model, return_report=True)
    assert ops(out) == ["Conv"] and report.verification["ok"]


def test_batchnorm_without_affine_from_dynamo_noopt(tmp_path):
    """Issue 12 item 2: BatchNorm2d(affine=False) exported by dynamo with optimize=False spells its
    scale and shift as Expand(CastLike(1, x), Shape(x, 1, 2)); the Shape used to fold as the full
    shape (rank 4) and optimize exited 1. Now conv + BN fold into one Conv."""
    torch = pytest.importorskip("torch")
    from models.export import export_onnx

    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4, affine=False)).eval()
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
        m[1].running_var.uniform_(0.5, 2, generator=torch.Generator().manual_seed(1))
    path = export_onnx(m, (1, 3, 8, 8), tmp_path / "bn.onnx", "dynamo-noopt")
    assert {"CastLike", "Shape"} <= {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    proc = subprocess.run([sys.executable, "-m", "onnxrep", "optimize", str(path), str(tmp_path / "out.onnx"), "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert ops(out) == ["Conv"]
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = m(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(V.run(out, {"input": x})["output"], ref, rtol=1e-5, atol=1e-5)


def test_dbb_dynamic_batch_pinned_with_input_shape(tmp_path):
    """Issue 12 item 2: a dynamic-batch DBB (dynamo exporter) pinned with --input-shape exited 4
    with ORT's coloured log on stderr; now it becomes one Conv, silently."""
    pytest.importorskip("torch")
    import models
    from models.export import export_onnx

    entry = models.ZOO["dbb_slice"]
    path = export_onnx(entry.build(), entry.input_shape, tmp_path / "dbb.onnx", "dynamo", axes="batch")
    out = tmp_path / "out.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxrep", "optimize", str(path), str(out), "-q",
                           "--input-shape", "input:1,8,16,16"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert ops(onnx.load(str(out))) == ["Conv"]


@pytest.mark.parametrize("start,end,step,removed", [(0, INT64_MAX, 1, True), (0, 2**31 - 1, 1, True), (0, 3, 1, True),
                                                    (1, INT64_MAX, 1, False), (0, 2, 1, False), (0, INT64_MAX, 2, False)])
def test_whole_slice_is_its_input(start, end, step, removed):
    """Slice(x, 0, INT_MAX) on a symbolic axis (an exporter's `x[:, ...]`) reads all of x: its
    readers read x. A slice that drops anything stays (negative cases)."""
    nodes = [_c("a", [start]), _c("b", [end]), _c("ax", [1]), _c("st", [step]),
             helper.make_node("Slice", ["x", "a", "b", "ax", "st"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    model = _model(nodes, [_x(["N", 3, 4])], [_x(["N", "C", 4], "y")])
    folded = fold_only(model)
    assert ("Slice" not in ops(folded)) == removed
    assert_same_in_ort(model, folded, {"x": RNG.standard_normal((2, 3, 4)).astype(np.float32)})


def test_overridable_weight_with_external_data_keeps_its_payload(tmp_path):
    """A kept initializer of 9 KiB in external data (a payload stub inside onnxrep) is written back
    with its bytes: the output runs with its default and with an overriding value, like the input."""
    import onnxruntime as ort

    w = RNG.standard_normal((16, 16, 3, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])], "g",
                              [_x([1, 16, 8, 8]), helper.make_tensor_value_info("W", TensorProto.FLOAT, [16, 16, 3, 3])],
                              [_x([1, 16, 8, 8], "y")], [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    src, dst = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    report = onnxrep.optimize_file(src, dst)
    assert report.verification["ok"]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4
    a, b = (ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for p in (src, dst))
    assert [i.name for i in onnx.load(str(dst), load_external_data=False).graph.input] == ["x", "W"]
    assert [i.name for i in b.get_overridable_initializers()] == ["W"]
    x = RNG.standard_normal((1, 16, 8, 8)).astype(np.float32)
    w2 = RNG.standard_normal((16, 16, 3, 3)).astype(np.float32)
    for feeds in ({"x": x}, {"x": x, "W": w2}):
        np.testing.assert_array_equal(a.run(None, feeds)[0], b.run(None, feeds)[0])


def test_nonzero_of_a_constant_mask_folds():
    """loralib's zero_pad writes `result[..., mask] = y` with a constant boolean mask, which the
    exporters spell NonZero(mask) → Transpose → ScatterND/GatherND indices. NonZero's output size
    depends on the values, so the guard needs a bound before it runs: [rank, count] int64 with count
    at most the mask's size. Without one it was never folded and the adapter stayed unmerged."""
    import onnx_graphsurgeon as gs

    mask = np.array([True, False, True, True, False, False], bool)
    node = gs.Node("NonZero", inputs=[gs.Constant("m", mask)], outputs=[gs.Variable("i", dtype=np.int64)])
    assert F.estimate_bytes(node) == mask.size * 1 * 8
    nodes = [helper.make_node("NonZero", ["mask"], ["nz"]),
             helper.make_node("Transpose", ["nz"], ["idx"], perm=[1, 0]),
             helper.make_node("ScatterND", ["x", "idx", "upd"], ["y"])]
    model = _model(nodes, [_x([6]), _x([3], "upd")], [_x([6], "y")], inits={"mask": mask})
    folded = fold_only(model)
    assert ops(folded) == ["ScatterND"]
    feeds = {"x": RNG.standard_normal(6).astype(np.float32), "upd": RNG.standard_normal(3).astype(np.float32)}
    assert_same_in_ort(model, folded, feeds)


def test_symbolic_dims_of_a_reshape_of_runtime_zeros():
    """Reshape(ConstantOfShape([1, Shape(t)[1], 6]), [-1, 6]) → [1, -1, 6] over tokens t [1, H·W, 3]:
    folding.symbolic_dims takes the dims onnxrep.symbolic derives (H·W), equal to ORT's at two sizes
    (what lets the attention's head split fold once loralib's zero padding is merged)."""
    import onnx_graphsurgeon as gs
    from tests.helpers import GraphBuilder, run_model

    b = GraphBuilder(3)
    x = b.input([1, 3, "H", "W"], name="x")
    t = b.op("Transpose", [b.op("Reshape", [x, b.ints([0, 3, -1])])], perm=[0, 2, 1])
    n = b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", [t]), b.ints(1)], axis=0), b.ints([0])])
    z = b.op("Reshape", [b.op("ConstantOfShape", [b.op("Concat", [b.ints([1]), n, b.ints([6])], axis=0)]),
                         b.ints([-1, 6])])
    y = b.op("Reshape", [z, b.ints([1, -1, 6])])
    model = b.build(y)
    dims = F.symbolic_dims(gs.import_onnx(model).tensors()[y])
    assert dims == [F.Dim(1), F.Dim(1, ("H", "W")), F.Dim(6)]
    for hw in ((2, 3), (4, 4)):
        got = run_model(model, {"x": np.zeros((1, 3, *hw), np.float32)})[y].shape
        assert got == (1, hw[0] * hw[1], 6)
