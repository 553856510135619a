"""rm_residual (opt-in): ReLU residual blocks become plain chains through Dirac channels."""
from __future__ import annotations

import pytest

from tests.helpers import (GraphBuilder, assert_declined, assert_equivalent, assert_idempotent,
                           assert_untouched, ops, run_rules)

RULE = "rm_residual"


def block(seed=0, kind="basic", shortcut="identity", stride=1, source="relu", inner="Relu", c=8, cout=None,
          group=1, extra_reader=False):
    """x → [Relu | MaxPool(Relu) | input] → residual block → Relu."""
    b = GraphBuilder(seed)
    x = b.input((1, c, 12, 12))
    if source == "relu":
        x = b.relu(x)
    elif source == "maxpool":
        x = b.op("MaxPool", [b.relu(x)], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
    elif source == "sigmoid":
        x = b.op("Sigmoid", [x])
    cout = cout or (c if shortcut == "identity" else 2 * c)
    act = (lambda t: b.relu(t)) if inner == "Relu" else (lambda t: b.op("Clip", [t, b.const(0.0), b.const(6.0)]))
    if kind == "basic":
        h = act(b.conv(x, c, cout, k=3, stride=stride))
        h = b.conv(h, cout, cout, k=3, group=group)
    else:  # bottleneck
        mid = c // 2
        h = act(b.conv(x, c, mid, k=1))
        h = act(b.conv(h, mid, mid, k=3, stride=stride))
        h = b.conv(h, mid, cout, k=1)
    if shortcut == "identity":
        s = x
    elif shortcut == "projection":
        s = b.conv(x, c, cout, k=1, stride=stride, pad=0)
    elif shortcut == "avgpool":  # ResNet-D: AvgPool then 1×1
        s = b.conv(b.op("AveragePool", [x], kernel_shape=[2, 2], strides=[2, 2]), c, cout, k=1, pad=0)
    y = b.relu(b.add(h, s))
    outs = [y] + ([h] if extra_reader else [])
    return b.build(*outs)


@pytest.mark.parametrize("kind,shortcut,stride", [
    ("basic", "identity", 1), ("basic", "projection", 2), ("basic", "projection", 1),
    ("bottleneck", "identity", 1), ("bottleneck", "projection", 2)])
def test_block_becomes_plain(kind, shortcut, stride):
    """Basic / bottleneck block with identity or projection shortcut: no Add left, equal outputs."""
    m = block(kind=kind, shortcut=shortcut, stride=stride)
    out, report = run_rules(m, RULE)
    assert report.rule_counts == {RULE: 1}
    assert "Add" not in ops(out)
    assert_equivalent(m, out)
    assert_idempotent(out, RULE)


def test_maxpool_of_relu_input():
    """Input from MaxPool(Relu) is non-negative too."""
    m = block(source="maxpool")
    out, report = run_rules(m, RULE)
    assert report.rule_counts == {RULE: 1}
    assert_equivalent(m, out)


def test_not_applied_by_default():
    """rm_residual is opt-in: the default rule set keeps the Add."""
    m = block()
    out, report = run_rules(m)
    assert "Add" in ops(out)
    assert RULE not in report.rule_counts


def test_input_not_provably_nonnegative_declined():
    """Pre-activation style: block input is a graph input — declined."""
    m = block(source=None)
    out, report = run_rules(m, RULE)
    assert_untouched(m, out, report)
    assert_declined(report, RULE, "≥ 0")


def test_sigmoid_input_declined():
    """Sigmoid output is ≥ 0 but not proven by the rule's conservative check — declined."""
    m = block(source="sigmoid")
    out, report = run_rules(m, RULE)
    assert_untouched(m, out, report)
    assert_declined(report, RULE, "Sigmoid", "≥ 0")


def test_inner_relu6_declined():
    """Inner activation Clip(0, 6) would cut carried values above 6 — declined."""
    m = block(inner="Clip")
    out, report = run_rules(m, RULE)
    assert_untouched(m, out, report)
    assert_declined(report, RULE, "Clip")


def test_grouped_branch_declined():
    """A grouped conv in the branch — declined."""
    m = block(group=2)
    out, report = run_rules(m, RULE)
    assert_untouched(m, out, report)
    assert_declined(report, RULE, "grouped")


def test_resnet_d_avgpool_shortcut_declined():
    """ResNet-D AvgPool shortcut: not a 1×1 projection of x — untouched."""
    m = block(shortcut="avgpool", stride=2)
    out, report = run_rules(m, RULE)
    assert_untouched(m, out, report)
    assert_declined(report, RULE, "shortcut", "AvgPool")


def test_branch_output_read_elsewhere_declined():
    """The branch's last conv output is also a graph output — declined."""
    m = block(extra_reader=True)
    out, report = run_rules(m, RULE)
    assert_untouched(m, out, report)
    assert_declined(report, RULE, "graph output")
