"""remove_dead_channels: exactly-zero conv outputs are dropped with the readers' inputs."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from tests.helpers import (GraphBuilder, assert_declined, assert_equivalent, assert_idempotent,
                           assert_untouched, nodes_of, ops, run_rules)

RULE = "remove_dead_channels"


def _zero_rows(model: onnx.ModelProto, conv_index: int, rows, bias=True):
    """Zero output rows of the conv_index-th Conv (weights, and bias when `bias`)."""
    conv = nodes_of(model, "Conv")[conv_index]
    inits = {t.name: t for t in model.graph.initializer}
    for pos in (1, 2) if bias else (1,):
        if pos >= len(conv.input):
            continue
        t = inits[conv.input[pos]]
        a = numpy_helper.to_array(t).copy()
        a[list(rows)] = 0
        t.CopyFrom(numpy_helper.from_array(a, t.name))
    return model


def chain(seed=0, act="Relu", reader_group=1, second_reader=None, out_of_act=False):
    b = GraphBuilder(seed)
    x = b.input((1, 4, 8, 8))
    h = b.conv(x, 4, 8)
    a = b.op(act, [h]) if act else h
    y = b.conv(a, 8, 8, group=reader_group)
    outs = [y]
    if second_reader == "conv":
        outs.append(b.conv(a, 8, 6, k=1))
    elif second_reader == "add":
        outs.append(b.add(a, a))
    if out_of_act:
        outs.append(a)
    return b.build(*outs)


# -- positive ------------------------------------------------------------------------------------
def test_drops_zero_rows_through_relu():
    """Two zero rows (weights and bias) of a Conv → Relu → Conv are dropped on both sides."""
    m = _zero_rows(chain(), 0, [1, 5])
    out, report = run_rules(m, RULE)
    assert report.rule_counts == {RULE: 1}
    convs = nodes_of(out, "Conv")
    shapes = {n.name: [d for d in numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == n.input[1])).shape]
              for n in convs}
    assert sorted(s[:2] for s in shapes.values()) == [[6, 4], [8, 6]]
    assert_equivalent(m, out)
    assert_idempotent(out, RULE)


def test_drops_through_leaky_relu_and_two_readers():
    """LeakyRelu keeps zeros; both reader convs lose the matching input channels."""
    m = _zero_rows(chain(act="LeakyRelu", second_reader="conv"), 0, [0, 3, 7])
    out, report = run_rules(m, RULE)
    assert report.rule_counts == {RULE: 1}
    assert ops(out) == {"Conv": 3, "LeakyRelu": 1}
    assert_equivalent(m, out)


def test_resrep_compactor_merged_then_pruned():
    """conv-BN → 1×1 compactor with zero rows → Relu → conv: merge then prune (default rules)."""
    b = GraphBuilder(3)
    x = b.input((1, 4, 8, 8))
    h = b.bn(b.conv(x, 4, 8), 8)
    q = b.conv(h, 8, 8, k=1, bias=False, name="compactor")
    y = b.conv(b.relu(q), 8, 8)
    m = b.build(y)
    comp = nodes_of(m, "Conv")[1]
    w = next(t for t in m.graph.initializer if t.name == comp.input[1])
    a = numpy_helper.to_array(w).copy()
    a[[2, 6]] = 0
    w.CopyFrom(numpy_helper.from_array(a, w.name))
    out, report = run_rules(m)
    assert report.rule_counts.get(RULE) == 1
    first = nodes_of(out, "Conv")[0]
    wt = next(t for t in out.graph.initializer if t.name == first.input[1])
    assert list(wt.dims)[0] == 6
    assert_equivalent(m, out)


# -- negative ------------------------------------------------------------------------------------
def test_nonzero_bias_is_not_dead():
    """Zero weights but a nonzero bias: the channel is constant, not zero — untouched."""
    m = _zero_rows(chain(), 0, [1], bias=False)
    out, report = run_rules(m, RULE)
    assert_untouched(m, out, report)


def test_small_but_nonzero_rows_are_kept():
    """Rows scaled to 1e-12 are not pruned: only exact zeros are equivalent."""
    m = chain()
    conv = nodes_of(m, "Conv")[0]
    for pos in (1, 2):
        t = next(t for t in m.graph.initializer if t.name == conv.input[pos])
        a = numpy_helper.to_array(t).copy()
        a[1] *= 1e-12
        t.CopyFrom(numpy_helper.from_array(a, t.name))
    out, report = run_rules(m, RULE)
    assert_untouched(m, out, report)


def test_reader_is_add_declined():
    """An Add reads the channels: shapes elsewhere would change — declined."""
    m = _zero_rows(chain(second_reader="add"), 0, [1])
    out, report = run_rules(m, RULE)
    assert_untouched(m, out, report)
    assert_declined(report, RULE, "Add")


def test_graph_output_declined():
    """The activation is a graph output — declined."""
    m = _zero_rows(chain(out_of_act=True), 0, [1])
    out, report = run_rules(m, RULE)
    assert_untouched(m, out, report)
    assert_declined(report, RULE, "graph output")


def test_grouped_reader_declined():
    """A grouped reader conv — declined."""
    m = _zero_rows(chain(reader_group=2), 0, [1])
    out, report = run_rules(m, RULE)
    assert_untouched(m, out, report)
    assert_declined(report, RULE, "grouped")


def test_sigmoid_does_not_keep_zero():
    """Sigmoid(0) = 0.5: the channel is not dead after it — declined."""
    m = _zero_rows(chain(act="Sigmoid"), 0, [1])
    out, report = run_rules(m, RULE)
    assert_untouched(m, out, report)
    assert_declined(report, RULE, "Sigmoid")
