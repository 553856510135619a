"""The rewrite engine: fixed point, iteration cap, no-op detection, provenance, rule selection."""
from __future__ import annotations

import onnx
import pytest

import onnxrep
from onnxrep import engine as E
from onnxrep import graph as G
from onnxrep.errors import UsageError
from tests.helpers import GraphBuilder


def _model():
    b = GraphBuilder(0)
    x = b.input((1, 4, 6, 6))
    return b.build(b.relu(b.bn(b.conv(x, 4, 4), 4)))


def _graph(model):
    return G.import_graph(onnx.shape_inference.infer_shapes(model))


class RenameForever(E.Rule):
    """Always 'changes' the graph by renaming: never reaches a fixed point."""

    name = "rename_forever"
    anchors = ("Relu",)

    def match(self, node, ctx):
        return node

    def rewrite(self, node, ctx):
        node.name = node.name + "x"
        return E.Rewrite("", [node.name], [node.name])


class ClaimsButDoesNothing(E.Rule):
    name = "claims_but_does_nothing"
    anchors = ("Relu",)

    def match(self, node, ctx):
        return node

    def rewrite(self, node, ctx):
        return E.Rewrite("", [node.name], [node.name])


class AlwaysDeclines(E.Rule):
    name = "always_declines"
    anchors = ("Conv",)

    def match(self, node, ctx):
        return node

    def check(self, node, ctx):
        return "because the test says so"


def test_non_termination_is_reported():
    """A rule that keeps firing hits the sweep cap and raises EngineError."""
    g = _graph(_model())
    with pytest.raises(E.EngineError, match="fixed point"):
        E.run(g, [RenameForever()], E.Context(g), max_sweeps=3)


def test_rewrite_that_changes_nothing_is_a_bug():
    """A rule claiming a rewrite while leaving the graph's signature unchanged raises."""
    g = _graph(_model())
    with pytest.raises(E.EngineError, match="changed nothing"):
        E.run(g, [ClaimsButDoesNothing()], E.Context(g))


def test_declines_are_recorded_once_with_counts():
    """A decline is recorded per (rule, node, reason), counted across sweeps."""
    g = _graph(_model())
    ctx = E.run(g, [AlwaysDeclines()], E.Context(g))
    assert [k[2] for k in ctx.declines] == ["because the test says so"]
    assert ctx.rewrites == []


def test_provenance_is_written_to_doc_string():
    """Nodes a rule makes carry onnxrep:<rule> in their doc_string."""
    out = onnxrep.optimize(_model())
    conv = [n for n in out.graph.node if n.op_type == "Conv"][0]
    assert conv.doc_string == "onnxrep:fuse_conv_bn"


def test_select_rules_order_and_opt_in():
    """Registry order is kept; opt-in rules need enable; unknown names are usage errors."""
    names = [r.name for r in E.select_rules()]
    assert "rm_residual" not in names
    assert names.index("fuse_conv_bn") < names.index("merge_linear_regions")
    assert "rm_residual" in [r.name for r in E.select_rules(enable=["rm_residual"])]
    assert [r.name for r in E.select_rules(only=["fuse_conv_bn"])] == ["fuse_conv_bn"]
    assert "fuse_conv_bn" not in [r.name for r in E.select_rules(skip=["fuse_conv_bn"])]
    with pytest.raises(UsageError, match="unknown rule"):
        E.select_rules(skip=["no_such_rule"])


def test_registry_rules_are_documented():
    """Every registered rule has a unique name, a description and a module docstring with its math."""
    import sys

    rules = E.all_rules()
    assert len({r.name for r in rules}) == len(rules)
    for r in rules:
        assert r.name and r.description
        doc = sys.modules[type(r).__module__].__doc__ or ""
        assert r.name in doc and ("⇒" in doc or "→" in doc), r.name


def test_model_identity_is_kept():
    """Opsets, IR version, producer, metadata and graph input/output names and dtypes survive."""
    model = _model()
    onnx.helper.set_model_props(model, {"author": "tests", "license": "MIT"})
    model.producer_name, model.model_version, model.doc_string = "trainer", 7, "a doc"
    out = onnxrep.optimize(model)
    assert list(out.opset_import) == list(model.opset_import)
    assert out.ir_version == model.ir_version
    assert (out.producer_name, out.model_version, out.doc_string) == ("trainer", 7, "a doc")
    assert {p.key: p.value for p in out.metadata_props} == {"author": "tests", "license": "MIT"}
    for a, b in ((out.graph.input, model.graph.input), (out.graph.output, model.graph.output)):
        assert [(v.name, v.type.tensor_type.elem_type) for v in a] == [(v.name, v.type.tensor_type.elem_type) for v in b]


def test_context_knows_the_sweep_order():
    """run() records the rules it applies, so a rule can tell whether another sees a match it
    leaves alone later in the same sweep."""
    rules = E.select_rules()
    g = _graph(_model())
    ctx = E.run(g, rules, E.Context(g))
    assert ctx.rules == tuple(r.name for r in rules)
    assert ctx.runs_after("fuse_conv_bn", "merge_linear_regions")
    assert not ctx.runs_after("merge_linear_regions", "fuse_conv_bn")
    g = _graph(_model())
    ctx = E.run(g, E.select_rules(skip=["merge_linear_regions"]), E.Context(g))
    assert not ctx.runs_after("fuse_conv_bn", "merge_linear_regions")
    assert not E.Context(g).runs_after("fuse_conv_bn", "merge_linear_regions")
