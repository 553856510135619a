"""fuse_activations (opt-in): a written-out pattern becomes the opset's standard op, verified."""
from __future__ import annotations

import contextlib
import io
import math
import warnings

import numpy as np
import onnx
import pytest

import onnxrep
from tests.helpers import (GraphBuilder, assert_equivalent, assert_idempotent, attr, declined_by, nodes_of, ops,
                           run_rules)
from tests.rules.fusion_cases import ALL, layernorm, sandwich

RULE = "fuse_activations"

# case -> (standard op, first opset, attributes to expect)
EXPECT = {
    "gelu_legacy": ("Gelu", 20, {"approximate": b"none"}), "gelu_dynamo": ("Gelu", 20, {"approximate": b"none"}),
    "gelu_half_first": ("Gelu", 20, {"approximate": b"none"}), "gelu_tanh": ("Gelu", 20, {"approximate": b"tanh"}),
    "hardswish_hsig": ("HardSwish", 14, {}), "hardswish_clip": ("HardSwish", 14, {}),
    "hardswish_maxmin": ("HardSwish", 14, {}), "hardsigmoid": ("HardSigmoid", 6, {}), "mish": ("Mish", 18, {}),
    "layernorm": ("LayerNormalization", 17, {"axis": 1}), "softmax": ("Softmax", 13, {"axis": 1}),
    "rmsnorm": ("RMSNormalization", 23, {"axis": 1}), "silu": ("Swish", 24, {"alpha": 1.0}),
}
LINEAR = {"Conv", "Gemm"}


def fused(model, op, count=1):
    out, report = run_rules(model, RULE)
    assert report.rule_counts == {RULE: count}
    after = ops(out)
    assert after.get(op) == count
    assert set(after) - LINEAR == {op}, after
    assert_equivalent(model, out)  # full checker, ORT with its optimizations off
    return out


# -- positive --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(EXPECT))
def test_pattern_becomes_standard_op(case):
    """Each spelling, at the first opset that has the op, becomes that one op."""
    op, opset, attrs = EXPECT[case]
    model, _ = sandwich(case, opset=max(opset, 13))
    out = fused(model, op)
    node = nodes_of(out, op)[0]
    for k, v in attrs.items():
        assert attr(node, k) == pytest.approx(v) if isinstance(v, float) else attr(node, k) == v
    assert_idempotent(out, RULE)


def test_hardsigmoid_constants():
    """HardSigmoid carries HardSwish's α = 1/6, β = 1/2, not the op's defaults (0.2, 0.5)."""
    model, _ = sandwich("hardsigmoid", opset=13)
    node = nodes_of(fused(model, "HardSigmoid"), "HardSigmoid")[0]
    assert attr(node, "alpha") == pytest.approx(1 / 6) and attr(node, "beta") == pytest.approx(0.5)


def test_layernorm_without_affine_gets_unit_scale():
    """A LayerNorm written without γ/β becomes LayerNormalization(Scale=1, B=0) with its ε."""
    b = GraphBuilder(1, opset=17)
    x = b.input([3, 5, 8])
    model = b.build(layernorm(b, x, affine=False))
    out = fused(model, "LayerNormalization")
    node = nodes_of(out, "LayerNormalization")[0]
    assert attr(node, "epsilon") == pytest.approx(1e-5) and attr(node, "axis") == 2


def test_layernorm_over_two_trailing_axes():
    """Reduced over the last two axes: axis = rank − 2, γ/β at the normalized shape."""
    b = GraphBuilder(2, opset=18)
    x = b.input([2, 3, 4, 5])
    model = b.build(layernorm(b, x, affine=False, axes=(-2, -1)))
    out = fused(model, "LayerNormalization")
    assert attr(nodes_of(out, "LayerNormalization")[0], "axis") == 2


def test_with_default_rules_everything_still_folds():
    """fuse_activations enabled beside the default rules: the BNs fold and the GELU is a Gelu."""
    b = GraphBuilder(3, opset=20)
    x = b.input([1, 4, 6, 6])
    from tests.rules.fusion_cases import gelu_legacy

    y = gelu_legacy(b, b.bn(b.conv(x, 4, 8, k=1), 8))
    model = b.build(b.bn(b.conv(y, 8, 4, k=1), 4))
    out, report = onnxrep.optimize(model, enable=[RULE], return_report=True)
    assert ops(out) == {"Conv": 2, "Gelu": 1}
    assert report.verification["ok"]


# -- negative --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["gelu_legacy", "gelu_tanh", "layernorm", "hardswish_clip", "mish", "rmsnorm",
                                  "silu"])
def test_opset_too_old_is_declined(case):
    """Below the op's opset the pattern stays as written, and the decline names the opset needed."""
    op, opset, _ = EXPECT[case]
    model, _ = sandwich(case, opset=max(opset - 1, 13) if opset > 13 else 12)
    declined_by(RULE, model, "opset", op)


def test_channels_first_layernorm_is_declined():
    """LayerNorm over the channel axis of NCHW (ConvNeXt/FastViT's LayerNorm2d): LayerNormalization
    normalizes trailing axes only, so it is declined (and still protected as a pattern)."""
    b = GraphBuilder(4, opset=18)
    x = b.input([1, 4, 3, 3])
    model = b.build(layernorm(b, x, affine=False, axes=(1,)))
    declined_by(RULE, model, "not the trailing ones")


def test_escaping_intermediate_is_not_fused():
    """An intermediate that is also a graph output: no pattern, nothing to rewrite."""
    b = GraphBuilder(5, opset=20)
    x = b.input([1, 4, 6, 6])
    sig = b.op("Sigmoid", [x])
    model = b.build(b.mul(x, sig), sig)
    out, report = run_rules(model, RULE)
    assert report.rule_counts == {} and ops(out) == ops(model)


def test_off_by_default():
    """Without enable, the default rules keep the pattern as written (same op set as the input)."""
    model, _ = sandwich("gelu_legacy", opset=20)
    out, report = run_rules(model)
    assert RULE not in report.rule_counts and "Gelu" not in ops(out)


# -- an opset-20 export through the CLI ------------------------------------------------------------
def _opset20_export(tmp_path):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Block(nn.Module):
        """A transformer MLP block whose code writes LayerNorm and GELU out (as many models do)."""

        def __init__(self, c=16):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
            self.w, self.b = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c))

        def forward(self, x):
            d = x - x.mean(-1, keepdim=True)
            y = d / torch.sqrt((d * d).mean(-1, keepdim=True) + 1e-6) * self.w + self.b
            h = self.fc1(y)
            h = h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))
            return x + self.fc2(h)

    torch.manual_seed(0)
    path = tmp_path / "block20.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(Block().eval(), (torch.randn(2, 10, 16),), str(path), dynamo=False, opset_version=20)
    return path


def test_cli_fuse_activations_on_opset20_export(tmp_path, capfd):
    """`optimize --fuse-activations` on an opset-20 legacy export: Gelu and LayerNormalization,
    verified (the CLI verifies the written file in ORT); without the flag the ops stay."""
    from onnxrep import cli

    src = _opset20_export(tmp_path)
    dst, plain = tmp_path / "fused.onnx", tmp_path / "plain.onnx"
    assert cli.main(["optimize", str(src), str(dst), "--fuse-activations", "--report", str(tmp_path / "r.json")]) == 0
    assert cli.main(["optimize", str(src), str(plain)]) == 0
    capfd.readouterr()
    out, before = onnx.load(dst), onnx.load(src)
    assert ops(out).get("Gelu") == 1 and ops(out).get("LayerNormalization") == 1
    assert "Erf" not in ops(out) and "ReduceMean" not in ops(out)
    assert out.opset_import[0].version == 20
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verification"]["ok"] and report["rule_counts"][RULE] == 2
    assert "Gelu" not in ops(onnx.load(plain)) and ops(onnx.load(plain)).get("Erf") == 1
    feeds = {"onnx::ReduceMean_0": np.random.default_rng(0).standard_normal((2, 10, 16)).astype(np.float32)}
    feeds = {before.graph.input[0].name: feeds.popitem()[1]}
    assert_equivalent(before, out, feeds=feeds)


def test_rule_is_listed_as_opt_in(capfd):
    from onnxrep import cli

    assert cli.main(["rules"]) == 0
    line = next(l for l in capfd.readouterr().out.splitlines() if l.startswith(RULE))
    assert "[opt-in]" in line


def test_every_case_has_an_expectation():
    assert set(EXPECT) == set(ALL)
