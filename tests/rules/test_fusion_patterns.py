"""Runtime-fusable patterns survive `optimize` whole, and ONNX Runtime still fuses them afterwards.

Folding GELU's Mul(0.5) into the next conv is exact but leaves ORT five element-wise kernels where
its GeluFusion made one. Every pattern onnxrep.patterns names is built here by hand (each operand
order and spelling) and exported from torch (legacy and dynamo exporters, where they write it out);
each test checks the pattern's nodes are all still there after the default rules, the outputs are
equal, and ORT's optimized graph (ORT_ENABLE_ALL) has the same fused ops after onnxrep as before.
"""
from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest

from onnxrep import graph as G
from onnxrep import patterns as P
from tests.helpers import (GraphBuilder, assert_declined, assert_equivalent, declined_by, ops, run_rules)
from tests.rules.fusion_cases import ALL, SQRT2, fused_ops, gelu_legacy, sandwich

torch = pytest.importorskip("torch")
nn = torch.nn


def kinds(model) -> list[str]:
    """The pattern kinds found in the model (shapes inferred first, as optimize does)."""
    return sorted(p.kind for p in P.find(G.import_graph(onnx.shape_inference.infer_shapes(model))))


def by_name(model) -> dict[str, str]:
    return {n.name: n.op_type for n in model.graph.node}


# -- hand-built patterns ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(ALL))
def test_pattern_is_recognized(case):
    """Each spelling is found as its pattern, and as nothing else."""
    model, _ = sandwich(case)
    assert kinds(model) == [ALL[case][1]]


# GELU spellings ORT does not fuse: respell_gelu rewrites them (tests/rules/test_respell_gelu.py)
RESPELLED = {"gelu_dynamo", "gelu_half_first"}


@pytest.mark.parametrize("case", sorted(set(ALL) - RESPELLED))
def test_pattern_survives_optimize_whole(case):
    """The default rules leave every node of the pattern in place; outputs equal; ORT fuses as before."""
    model, names = sandwich(case)
    out, report = run_rules(model)
    after = by_name(out)
    before = by_name(model)
    assert {n: before[n] for n in names} == {n: after.get(n) for n in names}
    assert_equivalent(model, out)
    assert fused_ops(out) == fused_ops(model)


@pytest.mark.parametrize("case", sorted(RESPELLED))
def test_unfusable_gelu_spelling_survives_as_fusable_gelu(case):
    """A GELU written the way ORT does not fuse is still one GELU pattern after optimize, nothing
    else took a piece of it, and ORT now fuses it (it did not before)."""
    model, names = sandwich(case)
    out, report = run_rules(model)
    assert report.rule_counts == {"respell_gelu": 1}
    assert kinds(out) == kinds(model) == ["gelu"]
    assert_equivalent(model, out)
    assert fused_ops(model) == {} and fused_ops(out) == {"Gelu": 1}


@pytest.mark.parametrize("case", ["gelu_legacy", "silu", "layernorm"])
def test_ort_fuses_these_after_onnxrep(case):
    """The spellings ORT's CPU fusions match (Gelu, QuickGelu, LayerNormalization) are still fused
    in ORT's graph of onnxrep's output. (ORT 1.32 does not fuse the others' spellings here: `x*0.5`
    first, tanh-GELU, x·HardSigmoid(x), Mish, the Reciprocal RMSNorm, Softmax; the test above checks
    their ORT graph is the same before and after.)"""
    model, _ = sandwich(case)
    out, _ = run_rules(model)
    fused = fused_ops(out)
    assert fused and fused == fused_ops(model)


def test_without_protection_ort_loses_gelu(monkeypatch):
    """Control: with the pattern index switched off (the old behaviour) fuse_bn_conv takes GELU's
    Mul(0.5) and ORT's Gelu is gone, so the tests above would catch a regression."""
    model, _ = sandwich("gelu_legacy")
    monkeypatch.setattr(P.Index, "of", lambda self, node: None)
    out, report = run_rules(model)
    assert report.rule_counts.get("fuse_bn_conv") == 1
    assert "Gelu" not in fused_ops(out) and fused_ops(model) == {"Gelu": 1}
    assert_equivalent(model, out)


@pytest.mark.parametrize("rule", ["fuse_bn_conv", "fuse_conv_bn", "merge_linear_regions"])
def test_decline_names_the_pattern(rule):
    """Each BN-folding rule declines on GELU's constants and says why."""
    model, _ = sandwich("gelu_legacy")
    report = declined_by(rule, model)
    assert_declined(report, rule, "constant belongs to a GELU pattern")


def test_layernorm_affine_on_tokens_is_not_folded_into_gemm():
    """LayerNorm's γ/β on [N, C] tokens are per-channel constants on axis 1: fuse_bn_conv would
    fold the Add(β) into the next Gemm; it declines, naming the LayerNorm."""
    model, _ = sandwich("layernorm")
    report = declined_by("fuse_bn_conv", model)
    assert_declined(report, "fuse_bn_conv", "LayerNorm pattern")


def test_explain_prints_the_decline(tmp_path, capfd):
    """`optimize --explain` lists the decline with the pattern's name."""
    from onnxrep import cli

    model, _ = sandwich("gelu_legacy")
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    assert cli.main(["optimize", str(src), str(dst), "--explain"]) == 0
    out = capfd.readouterr().out
    assert "constant belongs to a GELU pattern" in out


# -- negative: what is not a pattern is folded as before -------------------------------------------
def _gelu_like(add_one: float = 1.0, escape: bool = False):
    b = GraphBuilder(3)
    x = b.input([1, 4, 6, 6])
    h = b.conv(x, 4, 8, k=1)
    erf = b.op("Erf", [b.op("Div", [h, b.const(SQRT2)])])
    y = b.mul(b.mul(h, b.add(erf, b.const(add_one))), b.const(0.5))
    outs = [b.conv(y, 8, 4, k=1)] + ([erf] if escape else [])
    return b.build(*outs)


def test_wrong_constant_is_not_gelu():
    """Add(1.1) instead of Add(1): not a GELU, so the Mul(0.5) folds into the conv as before."""
    model = _gelu_like(add_one=1.1)
    assert kinds(model) == []
    out, report = run_rules(model, "fuse_bn_conv")
    assert report.rule_counts == {"fuse_bn_conv": 1}
    assert ops(out)["Mul"] == 1
    assert_equivalent(model, out)


def test_escaping_intermediate_is_not_protected():
    """Erf's output is also a graph output: no runtime fuses that GELU, so it is not atomic."""
    model = _gelu_like(escape=True)
    assert kinds(model) == []
    out, report = run_rules(model, "fuse_bn_conv")
    assert report.rule_counts == {"fuse_bn_conv": 1}
    assert_equivalent(model, out)


def test_plain_scale_still_folds():
    """A per-channel Mul between convs (no pattern around it) still folds."""
    b = GraphBuilder(4)
    x = b.input([1, 4, 6, 6])
    y = b.mul(b.relu(b.conv(x, 4, 8, k=1)), b.channel(np.linspace(0.5, 1.5, 8)))
    model = b.build(b.conv(y, 8, 4, k=1))
    assert kinds(model) == []
    out, report = run_rules(model)
    assert report.rule_counts.get("fuse_bn_conv") == 1
    assert_equivalent(model, out)


def test_two_patterns_in_a_row():
    """GELU feeding SiLU: two patterns, neither swallows the other."""
    b = GraphBuilder(5)
    x = b.input([1, 4, 6, 6])
    from tests.rules.fusion_cases import silu

    y = silu(b, gelu_legacy(b, b.conv(x, 4, 8, k=1)))
    model = b.build(b.conv(y, 8, 4, k=1))
    assert kinds(model) == ["gelu", "silu"]
    out, _ = run_rules(model)
    assert ops(out) == ops(model)
    assert_equivalent(model, out)


# -- the deployed cost model -------------------------------------------------------------------------
def test_region_cost_counts_conv_add_as_fused():
    """Conv + Add: ORT runs the Add inside the conv (FusedConv's Sum input), so the region costs
    the two convs plus reading the other operand; after Gemms the Add is a kernel of its own."""
    from rules.merge_linear_regions import _numel, node_cost, region_cost

    for lin, expect_fused in (("conv", True), ("gemm", False)):
        b = GraphBuilder(6)
        if lin == "conv":
            x = b.input([1, 4, 6, 6])
            y = b.add(b.conv(x, 4, 4, k=3), b.conv(x, 4, 4, k=1))
        else:
            x = b.input([3, 4])
            y = b.add(b.gemm(x, 4, 4), b.gemm(x, 4, 4))
        graph = G.import_graph(onnx.shape_inference.infer_shapes(b.build(y)))
        nodes = list(graph.nodes)
        add = nodes[-1]
        first, second = nodes[0], nodes[1]
        separate = sum(node_cost(n) for n in nodes)
        fused = node_cost(first) + node_cost(second) + _numel(first.outputs[0])
        assert region_cost(nodes) == (fused if expect_fused else separate)
        assert add.op == "Add"


# -- torch exports: both exporters, where they write the pattern out ---------------------------------
class RMSNorm(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.w = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w


class Softmax(nn.Module):
    def forward(self, x):
        e = torch.exp(x - x.max(-1, keepdim=True).values)
        return e / e.sum(-1, keepdim=True)


class LayerNormWrittenOut(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c))

    def forward(self, x):
        d = x - x.mean(-1, keepdim=True)
        return d / torch.sqrt(d.pow(2).mean(-1, keepdim=True) + 1e-5) * self.w + self.b


class HardSwishWrittenOut(nn.Module):
    def forward(self, x):
        return x * torch.clamp(x + 3, 0, 6) / 6


class HardSigmoidWrittenOut(nn.Module):
    def forward(self, x):
        return torch.clamp(x + 3, 0, 6) / 6


class ConvFFN(nn.Module):
    """1×1 conv → BN → activation → 1×1 conv → BN (FastViT's ConvFFN, RepViT's channel mixer)."""

    def __init__(self, act, c=4, h=8):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(c, h, 1), nn.BatchNorm2d(h))
        self.act = act
        self.c2 = nn.Sequential(nn.Conv2d(h, c, 1), nn.BatchNorm2d(c))

    def forward(self, x):
        return self.c2(self.act(self.c1(x)))


class TokenMixer(nn.Module):
    """Linear → normalization → Linear on [N, C] tokens."""

    def __init__(self, norm, c=8):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(c, c), norm, nn.Linear(c, 6)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


def _randomize_bn(m):
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.3)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
    return m.eval()


ACTS = {"gelu": (lambda: nn.GELU(), "gelu"), "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), "gelu_tanh"),
        "silu": (lambda: nn.SiLU(), "silu"), "mish": (lambda: nn.Mish(), "mish"),
        "hardswish": (HardSwishWrittenOut, "hardswish"), "hardsigmoid": (HardSigmoidWrittenOut, "hardsigmoid")}
TOKENS = {"layernorm": (LayerNormWrittenOut, "layernorm"), "rmsnorm": (RMSNorm, "rmsnorm"),
          "softmax": (Softmax, "softmax"), "nn.LayerNorm": (lambda: nn.LayerNorm(8), "layernorm")}
# where each exporter writes the pattern out: (exporter, opset); nn.Mish is one Mish op in dynamo
# exports and nn.LayerNorm a LayerNormalization from opset 17 on, so those are exported where
# they decompose
EXPORTS = [(name, "legacy", 17) for name in ACTS] + [(name, "dynamo", 18) for name in ACTS if name != "mish"] \
    + [(name, "legacy", 17) for name in TOKENS if name != "nn.LayerNorm"] + [("nn.LayerNorm", "legacy", 16)] \
    + [(name, "dynamo", 18) for name in TOKENS if name != "nn.LayerNorm"] \
    + [(name, "dynamo-opt", 18) for name in ("gelu", "silu", "layernorm", "rmsnorm")]

# linear layers, and exporter bookkeeping that constant folding removes (Cast of a constant, Reshape of axes)
LINEAR_OPS = {"Conv", "Gemm", "MatMul", "BatchNormalization", "Constant", "Identity", "Transpose", "Cast", "CastLike",
              "Reshape"}


def export(module, x, exporter, opset) -> onnx.ModelProto:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter.startswith("dynamo"):  # "dynamo": optimize=False; "dynamo-opt": onnxscript's optimizer on
            return torch.onnx.export(module, (x,), dynamo=True, optimize=exporter == "dynamo-opt",
                                     opset_version=opset).model_proto
        f = io.BytesIO()
        torch.onnx.export(module, (x,), f, dynamo=False, opset_version=opset)
        return onnx.load_from_string(f.getvalue())


def exported(name, exporter, opset):
    torch.manual_seed(0)
    if name in ACTS:
        m, x = _randomize_bn(ConvFFN(ACTS[name][0]())), torch.randn(1, 4, 6, 6)
    else:
        m, x = TokenMixer(TOKENS[name][0]()).eval(), torch.randn(5, 8)
    return export(m, x, exporter, opset), (ACTS.get(name) or TOKENS[name])[1]


def pattern_ops(model) -> Counter:
    """Ops other than the linear layers and the exporter's bookkeeping; a Gemm's bias Add (dynamo
    writes Linear as MatMul + Add) is counted with the linear layer."""
    names = {i.name for i in model.graph.initializer}
    c = Counter()
    for n in model.graph.node:
        if n.op_type in LINEAR_OPS:
            continue
        if n.op_type == "Add" and any(i in names for i in n.input) and any(
                m.op_type == "MatMul" and m.output[0] in n.input for m in model.graph.node):
            continue
        c[n.op_type] += 1
    return c


@pytest.mark.parametrize("name,exporter,opset", EXPORTS, ids=[f"{n}-{e}{o}" for n, e, o in EXPORTS])
def test_exported_pattern_survives(name, exporter, opset):
    """The exporter's spelling is recognized, survives optimize (verified) whole, the linear layers
    around it fold to plain Conv/Gemm (no depthwise conv made of its constants), and ORT fuses the
    output as it fuses the input."""
    model, kind = exported(name, exporter, opset)
    out, report = run_rules(model, verify=True)
    assert report.verification["ok"]
    assert kind in kinds(out)
    assert pattern_ops(out) == pattern_ops(model)
    linear_before = sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in model.graph.node)
    linear_after = sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in out.graph.node)
    assert linear_after <= linear_before == 2
    # the dynamo exporter's GELU spelling is one ORT does not fuse; respell_gelu makes it fusable
    respelled = name == "gelu" and exporter.startswith("dynamo")
    assert fused_ops(out) == ({"Gelu": 1} if respelled else fused_ops(model))


@pytest.mark.parametrize("name,exporter,opset,fused", [
    ("gelu", "legacy", 17, "Gelu"), ("silu", "legacy", 17, "QuickGelu"), ("silu", "dynamo", 18, "QuickGelu"),
    ("rmsnorm", "legacy", 17, "SimplifiedLayerNormalization"), ("layernorm", "legacy", 17, "LayerNormalization"),
    ("layernorm", "dynamo", 18, "LayerNormalization"), ("nn.LayerNorm", "legacy", 16, "LayerNormalization")])
def test_exported_pattern_is_fused_by_ort_after_onnxrep(name, exporter, opset, fused):
    """Where ORT's CPU fusions match the exporter's spelling, its graph of onnxrep's output has the
    fused op."""
    model, _ = exported(name, exporter, opset)
    out, _ = run_rules(model)
    assert fused_ops(out).get(fused) == fused_ops(model).get(fused) == 1


def test_dynamo_gelu_makes_no_depthwise_conv():
    """Issue 12: dynamo with optimize=False writes GELU as Add(1) → Mul(0.5) → Mul(x), which
    merge_linear_regions made a depthwise 1×1 conv (three Convs); the pattern keeps two."""
    model, _ = exported("gelu", "dynamo", 18)
    out, _ = run_rules(model)
    assert ops(out).get("Conv") == 2
    assert_declined(run_rules(model, "merge_linear_regions")[1], "merge_linear_regions", "GELU pattern")


def test_pattern_math_matches_references():
    """The references the recognizer compares against are the definitions (spot values)."""
    refs = P._references(np.array([-1.0, 0.0, 1.0, 3.5]))
    assert np.allclose(refs["gelu"], [-0.15865525, 0.0, 0.84134475, 3.49918599])
    assert np.allclose(refs["silu"], [-0.26894142, 0.0, 0.73105858, 3.39740719])
    assert np.allclose(refs["hardswish"], [-1 / 3, 0.0, 2 / 3, 3.5])
    assert np.allclose(refs["mish"][2], 1.0 * math.tanh(math.log1p(math.e)))


@pytest.mark.parametrize("case,kind", [("gelu_legacy", "gelu"), ("gelu_tanh", "gelu_tanh"), ("layernorm", "layernorm")])
def test_half_precision_pattern(case, kind):
    """In fp16 (√2 is 1.4140625) the pattern is still found, as the nearest reference (erf-GELU and
    tanh-GELU differ by less than fp16's tolerance), and survives optimize whole."""
    fn = ALL[case][0]
    b = GraphBuilder(7, dtype=np.float16)
    if case == "layernorm":
        x = b.input([5, 8])
        h = b.gemm(x, 8, 8)
    else:
        x = b.input([1, 4, 6, 6])
        h = b.conv(x, 4, 8, k=1)
    start = len(b.nodes)
    y = fn(b, h)
    names = [n.name for n in b.nodes[start:]]
    model = b.build(b.gemm(y, 8, 6) if case == "layernorm" else b.conv(y, 8, 4, k=1))
    assert kinds(model) == [kind]
    out, _ = run_rules(model)
    assert set(names) <= set(by_name(out))
    assert_equivalent(model, out, rtol=2e-3)


def test_pattern_revealed_by_a_rewrite_is_protected_in_the_same_run():
    """Erf → Dropout → Add(1): a GELU only once remove_identities drops the Dropout. The index is
    rebuilt after that sweep's rewrite, so the BN-folding rules then leave the Mul(0.5) alone."""
    b = GraphBuilder(8)
    x = b.input([1, 4, 6, 6])
    h = b.conv(b.mul(x, b.const(1.0)), 4, 8, k=1)  # remove_identities asks for the index here first
    erf = b.op("Dropout", [b.op("Erf", [b.op("Div", [h, b.const(SQRT2)])])])
    y = b.mul(b.mul(h, b.add(erf, b.const(1.0))), b.const(0.5))
    model = b.build(b.conv(y, 8, 4, k=1))
    assert kinds(model) == []
    out, report = run_rules(model)
    assert report.rule_counts == {"remove_identities": 2}
    assert ops(out) == {"Conv": 2, "Div": 1, "Erf": 1, "Add": 1, "Mul": 2}
    assert fused_ops(out) == {"Gelu": 1}
    assert_equivalent(model, out)


@pytest.mark.parametrize("case", ["gelu_legacy", "layernorm", "hardswish_clip"])
def test_second_run_changes_nothing(case):
    """Optimizing onnxrep's output again changes nothing (the protected pattern stays as it is)."""
    from tests.helpers import assert_idempotent

    model, _ = sandwich(case)
    out, _ = run_rules(model)
    assert_idempotent(out)


def test_layernorm_unit_affine_is_not_removed():
    """LayerNorm with γ = 1 and β = 0 (nn.LayerNorm at init): remove_identities keeps the Mul(1)
    and Add(0), without which ORT does not fuse LayerNormalization; the decline names the pattern."""
    b = GraphBuilder(9)
    x = b.input([5, 8])
    h = b.gemm(x, 8, 8)
    d = b.sub(h, b.op("ReduceMean", [h], axes=[-1], keepdims=1))
    v = b.op("ReduceMean", [b.op("Pow", [d, b.const(2.0)])], axes=[-1], keepdims=1)
    n = b.op("Div", [d, b.op("Sqrt", [b.add(v, b.const(1e-5))])])
    y = b.add(b.mul(n, b.const(np.ones(8))), b.const(np.zeros(8)))
    model = b.build(b.gemm(y, 8, 6))
    assert kinds(model) == ["layernorm"]
    report = declined_by("remove_identities", model)
    assert_declined(report, "remove_identities", "LayerNorm pattern")
    out, _ = run_rules(model)
    assert fused_ops(out) == fused_ops(model) == {"LayerNormalization": 1}
