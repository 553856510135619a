"""respell_gelu: a GELU written the way ONNX Runtime does not fuse becomes the spelling it fuses.

Positive: the dynamo exporter's spelling (hand-built and exported), Mul by 1/√2 with the constants
first, CastLike-wrapped constants, float16 -- each rewritten once, outputs equal (ORT, optimizations
off), full checker, and ORT's own optimized graph has a Gelu where it had none. Negative: the two
spellings ORT already fuses, a GELU whose pieces are read elsewhere (not a pattern), tanh-GELU and
bfloat16 are left untouched.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests.helpers import (GraphBuilder, assert_equivalent, assert_idempotent, assert_untouched, ops,
                           run_model, run_rules)
from tests.rules.fusion_cases import SQRT2, fused_ops, gelu_dynamo, gelu_half_first, gelu_legacy, gelu_tanh

RULE = "respell_gelu"


def sandwich(gelu, dtype=np.float32, opset=17, seed=0):
    b = GraphBuilder(seed, opset=opset, dtype=dtype)
    x = b.input([1, 4, 6, 6], name="x")
    return b.build(b.conv(b.conv(x, 4, 8, k=1) if gelu is None else gelu(b, b.conv(x, 4, 8, k=1)), 8, 4, k=1))


def gelu_cast_constants(b, x):
    """dynamo with optimize=False: the constants arrive through CastLike(c, x)."""
    def c(v):
        return b.op("CastLike", [b.const(v), x])
    a = b.add(b.op("Erf", [b.op("Div", [x, c(SQRT2)])]), c(1.0))
    return b.mul(x, b.mul(a, c(0.5)))


def gelu_legacy_half_first(b, x):
    """`x*0.5` first, then Mul by (1 + erf(x/√2)): the other spelling ORT fuses."""
    a = b.add(b.op("Erf", [b.op("Div", [x, b.const(SQRT2)])]), b.const(1.0))
    return b.mul(b.mul(x, b.const(0.5)), a)


def respelled(model):
    out, report = run_rules(model, RULE)
    assert report.rule_counts == {RULE: 1}
    assert_equivalent(model, out)  # full checker, ORT with its optimizations off
    assert fused_ops(model) == {} and fused_ops(out) == {"Gelu": 1}
    assert_idempotent(out, RULE)
    return out


# -- positive --------------------------------------------------------------------------------------
@pytest.mark.parametrize("gelu", [gelu_dynamo, gelu_half_first, gelu_cast_constants], ids=lambda f: f.__name__)
def test_unfusable_spelling_becomes_fusable(gelu):
    out = respelled(sandwich(gelu))
    assert {op: n for op, n in ops(out).items() if op != "Conv"} == {"Mul": 2, "Div": 1, "Erf": 1, "Add": 1}


def test_dynamo_spelling_is_bit_exact():
    """Only the place of the 0.5 moves: x·(0.5·s) and (0.5·x)·s are the same floats."""
    model = sandwich(gelu_dynamo)
    out = respelled(model)
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 4, 6, 6)).astype(np.float32) * 4}
    a, b = run_model(model, feeds), run_model(out, feeds)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_respelled_gelu_matches_torch():
    """The respelled graph computes torch's exact (erf) GELU."""
    torch = pytest.importorskip("torch")
    b = GraphBuilder(0)
    x = b.input([2, 64], name="x")
    model = b.build(gelu_dynamo(b, x))
    out, report = run_rules(model, RULE)
    assert report.rule_counts == {RULE: 1}
    v = np.linspace(-8, 8, 128, dtype=np.float32).reshape(2, 64)
    got = next(iter(run_model(out, {"x": v}).values()))
    ref = torch.nn.functional.gelu(torch.from_numpy(v)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_float16_keeps_its_dtype():
    model = sandwich(gelu_dynamo, dtype=np.float16)
    out, report = run_rules(model, RULE)
    assert report.rule_counts == {RULE: 1}
    assert_equivalent(model, out)
    inits = {i.name: i for i in out.graph.initializer}
    scalars = [inits[n.input[1]] for n in out.graph.node if n.op_type in ("Mul", "Div", "Add") and n.input[1] in inits]
    assert scalars and all(t.data_type == onnx.TensorProto.FLOAT16 for t in scalars)
    assert_idempotent(out, RULE)  # √2 held as float16 still counts as √2


def test_exported_dynamo_gelu_is_fused_after_optimize():
    """The dynamo exporter's nn.GELU (optimize on and off): ORT fuses it only after onnxrep."""
    pytest.importorskip("torch")
    from tests.rules.test_fusion_patterns import exported
    for exporter in ("dynamo", "dynamo-opt"):
        model, _ = exported("gelu", exporter, 18)
        out, report = run_rules(model, verify=True)
        assert report.verification["ok"] and report.rule_counts.get(RULE) == 1
        assert fused_ops(model).get("Gelu") is None and fused_ops(out) == {"Gelu": 1}


# -- negative --------------------------------------------------------------------------------------
@pytest.mark.parametrize("gelu", [gelu_legacy, gelu_legacy_half_first, gelu_tanh], ids=lambda f: f.__name__)
def test_fusable_or_other_spellings_are_untouched(gelu):
    """The two spellings ORT fuses, and tanh-GELU, are not matches: no rewrite, no decline."""
    model = sandwich(gelu)
    out, report = run_rules(model, RULE)
    assert_untouched(model, out, report)
    assert not [d for d in report.declines if d["rule"] == RULE]


def test_gelu_read_elsewhere_is_not_a_pattern():
    """An intermediate of the GELU is also a graph output: runtimes cannot fuse it, so it is left."""
    b = GraphBuilder(0)
    x = b.conv(b.input([1, 4, 6, 6]), 4, 8, k=1)
    erf = b.op("Erf", [b.op("Div", [x, b.const(SQRT2)])])
    y = b.mul(x, b.mul(b.add(erf, b.const(1.0)), b.const(0.5)))
    model = b.build(b.conv(y, 8, 4, k=1), erf)
    out, report = run_rules(model, RULE)
    assert_untouched(model, out, report)


def test_bfloat16_gelu_is_untouched():
    """bfloat16 holds √2 as 1.4140625 and ORT's CPU fusion does not take it: left as written."""
    bf16 = onnx.TensorProto.BFLOAT16
    b = GraphBuilder(0)
    x = b.op("Cast", [b.conv(b.input([1, 4, 6, 6]), 4, 8, k=1)], to=bf16)

    def c(v):
        return b.op("Cast", [b.const(v)], to=bf16)
    a = b.add(b.op("Erf", [b.op("Div", [x, c(SQRT2)])]), c(1.0))
    y = b.op("Cast", [b.mul(x, b.mul(a, c(0.5)))], to=onnx.TensorProto.FLOAT)
    model = b.build(b.conv(y, 8, 4, k=1))
    out, report = run_rules(model, RULE)
    assert_untouched(model, out, report)


def test_non_float_input_declines_with_its_reason():
    """The precondition check() states: the respelled constants are written in x's dtype, and only
    float16/32/64 are respelled (a bfloat16 √2 is 1.4140625). A pattern whose input is not one of
    them is declined with that reason, before anything is rewritten."""
    import onnx_graphsurgeon as gs

    from onnxrep.patterns import Pattern
    from onnxrep.rules.respell_gelu import RespellGelu

    for dtype in (np.int32, None):
        x = gs.Variable("x", dtype=dtype, shape=[1, 8])
        p = Pattern("gelu", x, gs.Variable("y", dtype=dtype, shape=[1, 8]), [])
        assert "not float16/32/64" in RespellGelu().check(p, None)
    x = gs.Variable("x", dtype=np.float32, shape=[1, 8])
    assert RespellGelu().check(Pattern("gelu", x, x, []), None) is None
