"""The rewrite engine: fixed point, iteration cap, no-op detection, provenance, rule selection."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import onnxrep
from onnxrep import engine as E
from onnxrep import graph as G
from onnxrep.errors import UsageError
from tests.helpers import GraphBuilder, assert_equivalent, ops, run_rules


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


# -- the linear-time bookkeeping (issue 12 item 7) --------------------------------------------------
def _chain(units: int, seed: int = 0):
    """`units` RepVGG-ish blocks (3×3+BN, 1×1+BN, BN identity, Add, Add, Relu), each with an
    Identity and a Conv→BN→Relu behind it; 16 channels so the 3×3 weights are over PAYLOAD_MIN."""
    b = GraphBuilder(seed)
    x = b.input((1, 16, 4, 4))
    for _ in range(units):
        y = b.add(b.add(b.bn(b.conv(x, 16, 16, 3), 16), b.bn(b.conv(x, 16, 16, 1), 16)), b.bn(x, 16))
        x = b.relu(b.bn(b.conv(b.op("Identity", [b.relu(y)]), 16, 16, 3), 16))
    return b.build(x)


def test_fixed_point_matches_the_full_pipeline_and_a_second_run_changes_nothing():
    """Every block collapses (3 Conv + 4 BN + 2 Add + Identity → 2 Conv), outputs equal in ORT
    with its optimizations off, and running the rules again on the result fires nothing."""
    model = _chain(6)
    out, report = run_rules(model, *[r.name for r in E.select_rules()])
    assert ops(out) == {"Conv": 12, "Relu": 12}
    assert_equivalent(model, out)
    g = _graph(out)
    ctx = E.run(g, E.select_rules(), E.Context(g))
    assert ctx.rewrites == []


class ChangesOutsideItsMatch(E.Rule):
    """Its match is an opaque string; the rewrite marks the Conv feeding the Relu (a node the
    match does not hold), after which the Relu no longer matches."""

    name = "changes_outside_its_match"
    anchors = ("Relu",)

    def match(self, node, ctx):
        up = G.producer(node.inputs[0])
        return None if up is None or "marked" in up.attrs else "opaque"

    def rewrite(self, match, ctx):
        relu = next(n for n in ctx.graph.nodes if n.op == "Relu")
        G.producer(relu.inputs[0]).attrs["marked"] = 1
        return E.Rewrite("", [], [])


def test_a_change_outside_the_match_is_not_called_a_no_op():
    """The no-op check looks at the match's nodes; when they are unchanged it asks the rule to
    match again, and a rule that no longer matches did change something."""
    model = _model()
    g = _graph(model)
    ctx = E.run(g, [ChangesOutsideItsMatch()], E.Context(g))
    assert len(ctx.rewrites) == 1
    assert len(model.graph.node) == len(g.nodes)


class ClaimsWithTensorMatch(E.Rule):
    """Matches (node, its output tensor) and changes neither."""

    name = "claims_with_tensor_match"
    anchors = ("Conv",)

    def match(self, node, ctx):
        return {"node": node, "out": [node.outputs[0]]}

    def rewrite(self, match, ctx):
        return E.Rewrite("", [match["node"].name], [])


def test_no_op_is_caught_whatever_the_match_holds():
    """Nodes and tensors are found in dicts and lists of the match too."""
    g = _graph(_model())
    with pytest.raises(E.EngineError, match="changed nothing"):
        E.run(g, [ClaimsWithTensorMatch()], E.Context(g))


class _CountingList(list):
    """graph.nodes that counts the walks over it."""

    walks = 0

    def __iter__(self):
        _CountingList.walks += 1
        return super().__iter__()


def test_engine_work_per_rewrite_does_not_grow_with_the_graph(monkeypatch):
    """No whole-graph pass per rewrite: the walks over graph.nodes and the tensor maps are as many
    for 4 blocks as for 16, while the rewrites grow 4×."""
    calls = {"tensors": 0}
    tensors, tidy = gs.Graph.tensors, G.tidy

    def count_tensors(self, *a, **k):
        calls["tensors"] += 1
        return tensors(self, *a, **k)

    def tidy_and_count(graph, *a):
        tidy(graph, *a)
        graph.nodes = _CountingList(graph.nodes)

    monkeypatch.setattr(gs.Graph, "tensors", count_tensors)
    monkeypatch.setattr(G, "tidy", tidy_and_count)
    seen = []
    for units in (4, 16):
        g = _graph(_chain(units))
        g.nodes = _CountingList(g.nodes)
        calls["tensors"] = _CountingList.walks = 0
        ctx = E.run(g, E.select_rules(), E.Context(g))
        seen.append((len(ctx.rewrites), calls["tensors"], _CountingList.walks))
    (small, *small_passes), (big, *big_passes) = seen
    assert big == 4 * small > 0
    assert big_passes == small_passes


def test_replaced_weights_are_freed_by_the_rewrite_not_the_sweep(monkeypatch):
    """Each weight a rewrite stops using goes back to its lazy tensor right after the rewrite;
    nothing is left for the end-of-sweep net (Releaser.late stays 0)."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    from onnxrep import weights as W

    releasers = []
    init = W.Releaser.__init__

    def keep(self, graph):
        init(self, graph)
        releasers.append(self)

    monkeypatch.setattr(W.Releaser, "__init__", keep)
    g = _graph(_chain(3))
    kernels = [t for n in g.nodes if n.op == "Conv" for t in n.inputs[1:2]]
    assert all(isinstance(t._values, LazyValues) for t in kernels)
    E.run(g, E.select_rules(), E.Context(g))
    assert [r.late for r in releasers] == [0]
    live = {id(t) for n in g.nodes for t in n.inputs}
    replaced = [t for t in kernels if id(t) not in live]
    assert len(replaced) == len(kernels)  # every input kernel was merged away ...
    assert all(isinstance(t._values, LazyValues) for t in replaced)  # ... and none is held


def test_cycle_collection_state_is_restored(monkeypatch):
    """run() (and graph import/export) pause the cycle collector and restore it, also when a rule
    fails."""
    import gc

    g = _graph(_model())  # import_graph pauses it too
    assert gc.isenabled()
    with pytest.raises(E.EngineError):
        E.run(g, [ClaimsButDoesNothing()], E.Context(g))
    assert gc.isenabled()
    gc.disable()
    try:
        E.run(g, [AlwaysDeclines()], E.Context(g))
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize("seed", range(6))
def test_tidy_gives_graphsurgeons_order(seed):
    """graph.tidy drops unused nodes and sorts like graphsurgeon's cleanup + toposort, from any
    node order: diamonds, fan-out, a dead branch, two outputs."""
    import random

    b = GraphBuilder(seed)
    x = b.input((1, 4, 6, 6))
    y1, y2 = b.conv(x, 4, 4), b.conv(x, 4, 4, 1)
    s = b.add(y1, y2)
    b.relu(y1)  # dead: no output depends on it
    z = b.relu(b.add(s, b.bn(x, 4)))
    model = b.build(z, b.conv(s, 4, 4))
    ours, theirs = _graph(model), _graph(model)
    for g in (ours, theirs):
        random.Random(seed).shuffle(g.nodes)
    G.tidy(ours)
    theirs.cleanup(remove_unused_graph_inputs=False)
    theirs.toposort()
    assert [n.name for n in ours.nodes] == [n.name for n in theirs.nodes]
    assert len(ours.nodes) == len(model.graph.node) - 1


def test_unique_names_from_one_hint():
    """Names made from one hint are hint, hint_1, hint_2, ..., skipping names already taken."""
    g = _graph(_model())
    taken = g.nodes[0].name
    names = [G.unique_node_name(g, taken) for _ in range(3)] + [G.unique_node_name(g, "fresh") for _ in range(3)]
    assert names == [f"{taken}_1", f"{taken}_2", f"{taken}_3", "fresh", "fresh_1", "fresh_2"]


# -- whole-graph passes around the engine (issue 12: 50k nodes in <= 10x the time of 5k) ---------
def _foldable_model():
    """A Conv whose bias is Add(c1, c2) of two initializers: one node for constant folding."""
    import numpy as np

    b = GraphBuilder(0)
    x = b.input((1, 4, 6, 6))
    bias = b.add(b.const(np.ones(4, np.float32)), b.const(np.full(4, 2.0, np.float32)))
    w = b.randn((4, 4, 3, 3))
    return b.build(b.relu(b.op("Conv", [x, w, bias], kernel_shape=[3, 3], pads=[1, 1, 1, 1])))


def _count_graphsurgeon_folds(monkeypatch) -> dict:
    calls = {"fold": 0, "copy": 0}
    fold, copy = gs.Graph.fold_constants, gs.Graph.copy

    def counting_fold(self, *a, **k):
        calls["fold"] += 1
        return fold(self, *a, **k)

    def counting_copy(self, *a, **k):
        calls["copy"] += 1
        return copy(self, *a, **k)

    monkeypatch.setattr(gs.Graph, "fold_constants", counting_fold)
    monkeypatch.setattr(gs.Graph, "copy", counting_copy)
    return calls


def test_folding_copies_the_graph_only_when_something_folds(monkeypatch):
    """graphsurgeon's fold_constants copies the whole graph before it looks; prepare calls it only
    when a node can fold (and then the result is folded as before)."""
    from onnxrep import optimizer as O

    calls = _count_graphsurgeon_folds(monkeypatch)
    _, g = O.prepare(_chain(3))
    assert calls == {"fold": 0, "copy": 0}
    assert len(g.nodes) == len(_chain(3).graph.node)

    _, g = O.prepare(_foldable_model())
    assert calls["fold"] >= 1 and calls["copy"] >= 1
    assert sorted(n.op for n in g.nodes) == ["Conv", "Relu"]
    bias = next(n for n in g.nodes if n.op == "Conv").inputs[2]
    assert isinstance(bias, gs.Constant) and G.const(bias).tolist() == [3.0] * 4


def _would_fold_cases():
    import numpy as np
    from onnx import TensorProto, helper

    def case(nodes, inits):
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    mk = helper.make_node
    f32 = np.float32
    return {
        "nothing constant": (case([mk("Relu", ["x"], ["y"])], {}), False),
        "add of constants": (case([mk("Add", ["a", "b"], ["s"]), mk("Add", ["x", "s"], ["y"])],
                                  {"a": f32([1, 2]), "b": f32([3, 4])}), True),
        "random op (guard)": (case([mk("RandomNormalLike", ["a"], ["r"]), mk("Add", ["x", "r"], ["y"])],
                                   {"a": f32([1, 2])}), False),
        "dequantize (never folded)": (case([mk("DequantizeLinear", ["q", "s"], ["d"]), mk("Add", ["x", "d"], ["y"])],
                                           {"q": np.int8([1, 2]), "s": f32(0.5)}), False),
        "constant node": (case([mk("Constant", [], ["c"], value=onnx.numpy_helper.from_array(f32([1, 1]))),
                                mk("Add", ["x", "c"], ["y"])], {}), True),
    }


@pytest.mark.parametrize("name", list(_would_fold_cases()))
def test_graphsurgeon_would_fold_agrees_with_graphsurgeon(name):
    """The precheck that spares the copy says 'would change' exactly where graphsurgeon's
    fold_constants (called as folding calls it) changes the graph."""
    from onnxrep import folding as F

    model, expected = _would_fold_cases()[name]
    g = _graph(model)
    guard = F._guard(F.DEFAULT_FOLD_LIMIT, F.FoldLog())
    assert F._graphsurgeon_would_fold(g, guard) is expected
    before = G.export_graph(g, model).SerializeToString()
    g.fold_constants(fold_shapes=False, recurse_subgraphs=False, error_ok=True,
                     size_threshold=F.DEFAULT_FOLD_LIMIT, should_exclude_node=guard)
    G.tidy(g)
    assert (G.export_graph(g, model).SerializeToString() != before) is expected


def test_input_shapes_are_inferred_once_for_the_report(monkeypatch):
    """The input's MACs come from prepare's shape inference (the same model, nothing pinned): one
    inference for the input, one for the output's statistics; equal to stats.macs' own count.
    With a symbolic batch (counted as 1) the count infers its own, as before."""
    from onnxrep import stats

    calls = []
    infer = onnx.shape_inference.infer_shapes

    def counting(model, *a, **k):
        calls.append(len(model.graph.node))
        return infer(model, *a, **k)

    model = _chain(2)
    expected = stats.macs(model)
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", counting)
    _, report = onnxrep.optimize(model, verify=False, return_report=True)
    n_in, n_out = len(model.graph.node), report.after["nodes"]
    assert calls == [n_in, n_out]
    assert report.before["macs"] == expected > 0

    batch = onnx.ModelProto()
    batch.CopyFrom(model)
    batch.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    calls.clear()
    _, report = onnxrep.optimize(batch, verify=False, return_report=True)
    assert calls.count(n_in) == 2  # prepare's (batch symbolic) and the count's (batch 1)
    assert report.before["macs"] == expected


def test_a_sweep_that_rewrites_nothing_takes_no_weight_net(monkeypatch):
    """The Releaser's end-of-sweep net looks at the graph only in rule sweeps that rewrote
    something; the net still frees nothing late (every rewrite freed its own)."""
    from onnxrep import weights as W

    releasers = []
    init = W.Releaser.__init__

    def keep(self, graph):
        init(self, graph)
        releasers.append(self)

    fired_sweeps = []
    sweep = E._sweep_rule

    def counting_sweep(*a, **k):
        fired = sweep(*a, **k)
        fired_sweeps.append(fired)
        return fired

    monkeypatch.setattr(W.Releaser, "__init__", keep)
    monkeypatch.setattr(E, "_sweep_rule", counting_sweep)
    g = _graph(_chain(3))
    E.run(g, E.select_rules(), E.Context(g))
    (r,) = releasers
    assert 0 < r.scans == sum(1 for f in fired_sweeps if f) < len(fired_sweeps)
    assert r.late == 0


def test_pipeline_pauses_the_collector_and_restores_it(tmp_path, monkeypatch):
    """optimize and optimize_file run with automatic cycle collection off (the rules run under it)
    and leave it as they found it, also when they fail."""
    import gc

    from onnxrep import optimizer as O
    from onnxrep.errors import InputError

    seen = []
    run = E.run
    monkeypatch.setattr(E, "run", lambda *a, **k: seen.append(gc.isenabled()) or run(*a, **k))
    assert gc.isenabled()
    model = _chain(2)
    onnxrep.optimize(model, verify=False)
    path = tmp_path / "in.onnx"
    onnx.save(model, str(path))
    onnxrep.optimize_file(path, tmp_path / "out.onnx", verify=False)
    assert seen == [False, False] and gc.isenabled()
    path.write_bytes(b"not a model")
    with pytest.raises(InputError):
        onnxrep.optimize_file(path, tmp_path / "out2.onnx")
    assert gc.isenabled()
    gc.disable()
    try:
        onnxrep.optimize(model, verify=False)
        assert not gc.isenabled()
    finally:
        gc.enable()
    assert O.optimize_file.__doc__.startswith("Optimize the model file")


def _weak(objs):
    import weakref

    return [weakref.ref(x) for x in objs]


def test_removed_nodes_and_tensors_are_freed_without_a_collection():
    """With the cycle collector off, the nodes and tensors the rules remove (and the weights they
    replace) are freed by refcounting as the engine goes: tidy breaks their reference cycles."""
    import gc

    g = _graph(_chain(3))
    before = {id(n): n for n in g.nodes}
    before.update((id(t), t) for t in g.tensors().values())
    refs = _weak(before.values())
    gc.collect()
    gc.disable()
    try:
        del before
        E.run(g, E.select_rules(), E.Context(g))
        live = {id(n) for n in g.nodes} | {id(t) for t in g.tensors().values()}
        alive = [r() for r in refs if r() is not None]
        assert len(alive) < len(refs) // 2  # 3 blocks: 33 nodes → 6, most tensors gone
        assert all(id(x) in live for x in alive), [getattr(x, "name", x) for x in alive if id(x) not in live]
    finally:
        gc.enable()


def test_a_dropped_node_someone_still_holds_is_left_intact():
    """release_dropped frees only what nothing else references: a node a caller (or a rule's
    cache) still holds keeps its lists working, and one nobody holds is released."""
    kept = gs.Node("Relu", "kept")
    a, b = gs.Variable("a"), gs.Variable("b")
    dropped = {id(kept): kept, id(a): a}
    a_ref = _weak([a])[0]
    del a
    assert G.release_dropped(dropped) == 1 and dropped == {}
    assert a_ref() is None  # nobody held it: freed at once, no collector involved
    kept.inputs.append(b)  # still synchronized
    assert b.outputs == [kept]


def test_optimize_leaves_nothing_for_the_cycle_collector(tmp_path):
    """After optimize_file (and optimize) the graph, everything the rules dropped and the fusion
    index are freed by refcounting: a collection afterwards finds no graphsurgeon object (so
    running the pipeline with the collector off holds no memory back)."""
    import gc

    model = _chain(3)
    path = tmp_path / "in.onnx"
    onnx.save(model, str(path))
    for go in (lambda: onnxrep.optimize_file(path, tmp_path / "out.onnx", verify=False),
               lambda: onnxrep.optimize(model, verify=False),
               lambda: onnxrep.optimize_file(path, tmp_path / "out.onnx")):
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            go()
            gc.collect()
            left = [x for x in gc.garbage if isinstance(x, (gs.Node, gs.Tensor, gs.Graph))]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert left == []


def test_disposed_graph_is_freed_at_once():
    """graph.dispose breaks every cycle of a graph its user is done with: with the collector off,
    dropping the last reference frees every node and tensor."""
    import gc

    g = _graph(_chain(2))
    refs = _weak(list(g.nodes) + list(g.tensors().values()))
    gc.collect()
    gc.disable()
    try:
        G.dispose(g)
        assert g.nodes == [] and g.inputs == [] and g.outputs == []
        del g
        assert [r for r in refs if r() is not None] == []
    finally:
        gc.enable()


@pytest.mark.parametrize("rules", ["all", "none"])
def test_rewritten_graph_is_already_tidy(rules):
    """rewrite_graph does not tidy after the engine: the engine tidies after every rule sweep that
    changed the graph and prepare's folding ends with a tidy, so one more would change nothing
    (a dead branch and a shuffled node order in the input included)."""
    import random

    from onnxrep import optimizer as O

    model = _chain(2)
    model.graph.node.append(onnx.helper.make_node("Relu", [model.graph.input[0].name], ["dead_out"], name="dead"))
    nodes = list(model.graph.node)
    random.Random(0).shuffle(nodes)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    chosen = E.select_rules() if rules == "all" else []
    r = O.rewrite_graph(model, chosen, E.Options())
    order = list(r.graph.nodes)
    assert "dead" not in {n.name for n in order}
    assert ops(O.Rewritten.model(r)).get("BatchNormalization", 0) == (0 if rules == "all" else 8)
    G.tidy(r.graph)
    assert r.graph.nodes == order


def _broken_models():
    """(what is wrong, model): each fails onnx's full check, at a different step of it."""
    from onnx import TensorProto, helper

    def model(nodes, inits=(), out_type=TensorProto.FLOAT):
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", out_type, None)], list(inits))
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    w3 = onnx.numpy_helper.from_array(np.ones((2, 2, 3), np.float32), "w")
    i64 = onnx.numpy_helper.from_array(np.ones((1,), np.int64), "c")
    return [
        ("unknown op (checker)", model([helper.make_node("NoSuchOp", ["x"], ["y"])])),
        ("not topologically sorted (checker)", model([helper.make_node("Relu", ["t"], ["y"]),
                                                       helper.make_node("Relu", ["x"], ["t"])])),
        ("conv weight rank (strict inference)", model([helper.make_node("Conv", ["x", "w"], ["y"])], [w3])),
        ("float + int64 (type check)", model([helper.make_node("Add", ["x", "c"], ["y"])], [i64])),
        ("output declared int64 (type check)", model([helper.make_node("Relu", ["x"], ["y"])], (), TensorProto.INT64)),
    ]



@pytest.mark.parametrize("case", range(5))
def test_check_and_infer_is_the_full_check(case):
    """io.check_and_infer (checker, then strict shape inference with type checks) fails exactly
    where onnx's full check does, with the same error type and message; on a valid model it
    passes and returns the inferred model."""
    from onnxrep import io

    what, model = _broken_models()[case]
    with pytest.raises(Exception) as full:
        io.run_checker(model, full_check=True)
    with pytest.raises(Exception) as ours:
        io.check_and_infer(model)
    assert type(ours.value) is type(full.value), what
    assert str(ours.value).splitlines()[0] == str(full.value).splitlines()[0], what

    good = _chain(1)
    io.run_checker(good, full_check=True)
    inferred = io.check_and_infer(good)
    assert len(inferred.graph.value_info) > 0


def test_output_is_checked_and_shape_inferred_once(monkeypatch):
    """The output goes through one shape inference, the full check's, whose shapes the report's
    MACs reuse (equal to stats.macs' own count); the checker itself runs without its own."""
    from onnxrep import io, stats

    calls, checks = [], []
    infer, check = onnx.shape_inference.infer_shapes, onnx.checker.check_model
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes",
                        lambda m, *a, **k: calls.append((len(m.graph.node), a, k)) or infer(m, *a, **k))
    monkeypatch.setattr(onnx.checker, "check_model", lambda m, *a, **k: checks.append((a, k)) or check(m, *a, **k))
    model = _chain(2)
    out, report = onnxrep.optimize(model, verify=False, return_report=True)
    n_out = report.after["nodes"]
    assert [c for c in calls if c[0] == n_out] == [(n_out, (), {"check_type": True, "strict_mode": True})]
    assert checks[-1] == ((), {"full_check": False})
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", infer)
    assert report.after["macs"] == stats.macs(out) > 0


def test_tensor_map_is_graphsurgeons_tensors():
    """weights.tensor_map gives graph.tensors()'s dict: same names in the same order, the same
    tensor objects; with an optional (empty-named) input, a graph input read by nobody, a graph
    output that is also read, and two distinct tensors of one name (the later one wins)."""
    from onnxrep import weights as W

    g = _graph(_chain(2))
    assert list(W.tensor_map(g).items()) == list(g.tensors().items())
    conv = next(n for n in g.nodes if n.op == "Conv")
    conv.inputs.append(gs.Variable(""))  # an omitted optional input
    g.inputs.append(gs.Variable("unread", dtype=np.float32, shape=[1]))
    twin = gs.Variable(g.nodes[0].outputs[0].name)
    g.nodes.append(gs.Node("Relu", "twin_reader", inputs=[g.outputs[0]], outputs=[twin]))
    g.outputs.append(g.nodes[2].outputs[0])
    mine, theirs = W.tensor_map(g), g.tensors()
    assert list(mine) == list(theirs) and all(mine[k] is theirs[k] for k in theirs)
    assert mine[twin.name] is twin and "" not in mine


@pytest.mark.parametrize("case", range(5))
def test_input_check_fails_as_the_full_check_does(case):
    """io.check_model (checker, then strict inference with data propagation, falling back to the
    full check's own inference for the verdict) reports each broken model with the InputError
    the full check gives."""
    from onnxrep import io
    from onnxrep.errors import InputError

    what, model = _broken_models()[case]
    try:
        io.run_checker(io._strip_weights(model), full_check=True)
    except onnx.shape_inference.InferenceError as e:
        expected = f"model fails ONNX shape inference: model: {io._inference_reason(e)}"
    except (onnx.checker.ValidationError, ValueError) as e:
        expected = f"model fails onnx.checker: model: {io._checker_reason(e, model)}"
    with pytest.raises(InputError) as got:
        io.check_model(model)
    assert str(got.value) == expected, what


def _shape_arithmetic_model(batch):
    """x[batch,4,6,6] → Reshape(x, [Shape(x)[0], -1]) → Relu: data propagation makes the output's
    second dim (144) known; with a value_info the input already declared."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "zero"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus_one"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["r"]),
             helper.make_node("Relu", ["r"], ["y"])]
    inits = [onnx.numpy_helper.from_array(np.array(0, np.int64), "zero"),
             onnx.numpy_helper.from_array(np.array([-1], np.int64), "minus_one")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])], inits,
                          value_info=[helper.make_tensor_value_info("s", TensorProto.INT64, [4])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("make, pinned", [(lambda: _chain(2), 3), (lambda: _shape_arithmetic_model(1), 2),
                                          (lambda: _shape_arithmetic_model("N"), 2)],
                         ids=["chain", "static", "symbolic"])
def test_prepare_reuses_the_input_checks_inference(make, pinned, monkeypatch):
    """prepare takes the input check's shape inference for the model as given: the same model as
    its own inference would make, byte for byte (data propagation and symbolic dims included);
    the input is then inferred once. With a pinned input shape prepare infers its own (and the
    input's MACs, where there are Convs, one more)."""
    from onnxrep import io, lean as L
    from onnxrep import optimizer as O

    model = make()
    checked = io.check_model(model)
    assert checked is not None
    work = L.without_payload(model, min_bytes=G.PAYLOAD_MIN)
    own = O.infer_shapes(onnx.ModelProto.FromString(work.SerializeToString()))
    assert O._shapes_from(work, checked).SerializeToString() == own.SerializeToString()

    calls = []
    infer = onnx.shape_inference.infer_shapes
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes",
                        lambda m, *a, **k: calls.append(len(m.graph.node)) or infer(m, *a, **k))
    onnxrep.optimize(model, verify=False)
    assert calls.count(len(model.graph.node)) == 1
    calls.clear()
    onnxrep.optimize(model, verify=False, input_shapes={model.graph.input[0].name: [1, *
                     [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]]})
    assert calls.count(len(model.graph.node)) == pinned


def test_linear_of_recognizes_an_exported_linear_and_nothing_else():
    """graph.linear_of, shared by fold_branch_into_slice and fold_attention_scale: MatMul by a
    constant, alone or with a constant bias Add that alone reads it."""
    x = gs.Variable("x", np.float32, (2, 4))
    w = gs.Constant("w", np.ones((4, 3), np.float32))
    b = gs.Constant("b", np.zeros(3, np.float32))
    y, z, v = (gs.Variable(n, np.float32, (2, 3)) for n in ("y", "z", "v"))
    mm = gs.Node("MatMul", inputs=[x, w], outputs=[y])
    add = gs.Node("Add", inputs=[y, b], outputs=[z])
    g = gs.Graph(nodes=[mm, add], inputs=[x], outputs=[z])
    assert G.linear_of(g, y) == (mm, None)
    assert G.linear_of(g, z) == (mm, add)
    assert G.linear_of(g, x) is None
    # the MatMul's output read by another node too: the Add is not that Linear's private bias
    g.nodes.append(gs.Node("Relu", inputs=[y], outputs=[v]))
    g.outputs.append(v)
    assert G.linear_of(g, z) is None and G.linear_of(g, y) == (mm, None)
    # a weight computed at run time is not a Linear's
    x2 = gs.Variable("x2", np.float32, (4, 3))
    y2 = gs.Variable("y2", np.float32, (2, 3))
    g2 = gs.Graph(nodes=[gs.Node("MatMul", inputs=[x, x2], outputs=[y2])], inputs=[x, x2], outputs=[y2])
    assert G.linear_of(g2, y2) is None
