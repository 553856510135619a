"""remove_identities: Identity, inference Dropout, Add/Sub 0, Mul/Div 1 and all-zero Pad are dropped."""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from tests.helpers import (assert_equivalent, assert_idempotent, declined_by, GraphBuilder, ops,
                           run_rules)

RULE = "remove_identities"


def removed(model, expected_ops, count=1):
    out, report = run_rules(model, RULE)
    assert ops(out) == expected_ops
    assert report.rule_counts == {RULE: count}
    assert_equivalent(model, out)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    return out


def between_relus(make, seed=0, shape=(1, 4, 6, 6)):
    """x → Relu → <op under test> → Relu."""
    b = GraphBuilder(seed)
    x = b.input(shape)
    return b.build(b.relu(make(b, b.relu(x))))


# -- positive ------------------------------------------------------------------------------------
def test_identity():
    """Identity between two Relus."""
    removed(between_relus(lambda b, t: b.op("Identity", [t])), {"Relu": 2})


def test_identity_chain():
    """Three Identities in a row: all three go."""
    model = between_relus(lambda b, t: b.op("Identity", [b.op("Identity", [b.op("Identity", [t])])]))
    removed(model, {"Relu": 2}, count=3)


def test_dropout_inference():
    """Dropout with no training_mode input (inference)."""
    removed(between_relus(lambda b, t: b.op("Dropout", [t, b.const(np.float32(0.5))])), {"Relu": 2})


def test_dropout_training_mode_false():
    """Dropout with training_mode = constant false."""
    model = between_relus(lambda b, t: b.op("Dropout", [t, b.const(np.float32(0.3)), b.const(np.bool_(False), dtype=np.bool_)]))
    removed(model, {"Relu": 2})


def test_dropout_mask_unused():
    """Dropout whose mask output is declared but unread."""
    model = between_relus(lambda b, t: b.op("Dropout", [t], outputs=["d", "mask"])[0])
    removed(model, {"Relu": 2})


@pytest.mark.parametrize("shape", [(), (1,), (1, 4, 1, 1), (4, 1, 1), (1, 4, 6, 6)])
def test_add_zero(shape):
    """Add(x, 0) for zero constants that do not broadcast x."""
    removed(between_relus(lambda b, t: b.add(t, b.const(np.zeros(shape)))), {"Relu": 2})


def test_add_zero_constant_first():
    """Add(0, x)."""
    removed(between_relus(lambda b, t: b.add(b.const(np.zeros((1, 4, 1, 1))), t)), {"Relu": 2})


def test_sub_zero():
    """Sub(x, 0)."""
    removed(between_relus(lambda b, t: b.sub(t, b.const(np.zeros(4).reshape(4, 1, 1)))), {"Relu": 2})


@pytest.mark.parametrize("first", [False, True])
def test_mul_one(first):
    """Mul(x, 1) and Mul(1, x)."""
    def make(b, t):
        one = b.const(np.ones((1, 4, 1, 1)))
        return b.mul(one, t) if first else b.mul(t, one)
    removed(between_relus(make), {"Relu": 2})


def test_div_one():
    """Div(x, 1)."""
    removed(between_relus(lambda b, t: b.op("Div", [t, b.const(np.float32(1.0))])), {"Relu": 2})


def test_pad_all_zero():
    """Pad with all-zero amounts."""
    removed(between_relus(lambda b, t: b.pad(t, [0] * 8)), {"Relu": 2})


def test_pad_all_zero_reflect():
    """Reflect Pad with all-zero amounts."""
    removed(between_relus(lambda b, t: b.pad(t, [0] * 8, mode="reflect")), {"Relu": 2})


def test_pad_all_zero_opset10_attribute():
    """Opset-10 Pad with an all-zero `pads` attribute."""
    b = GraphBuilder(4, opset=10)
    x = b.input([1, 4, 6, 6])
    y = b.op("Pad", [b.relu(x)], pads=[0] * 8)
    removed(b.build(b.relu(y)), {"Relu": 2})


def test_identity_to_graph_output():
    """Relu → Identity → graph output: Relu writes the output name directly."""
    b = GraphBuilder(1)
    x = b.input([1, 4, 6, 6])
    y = b.op("Identity", [b.relu(x)], outputs=["y"])
    removed(b.build(y), {"Relu": 1})


def test_mul_one_before_conv():
    """Mul(x, 1) in front of a Conv: the Conv then reads x."""
    b = GraphBuilder(2)
    x = b.input([1, 4, 6, 6])
    y = b.conv(b.mul(x, b.const(np.float32(1.0))), 4, 4)
    removed(b.build(y), {"Conv": 1})


def test_identity_on_graph_input_before_conv():
    """Graph input → Identity → Conv."""
    b = GraphBuilder(3)
    x = b.input([1, 4, 6, 6])
    removed(b.build(b.conv(b.op("Identity", [x]), 4, 4)), {"Conv": 1})


# -- negative ------------------------------------------------------------------------------------
declined = partial(declined_by, RULE)


def test_zero_minus_x_kept():
    """Sub(0, x) is −x, not x: kept."""
    declined(between_relus(lambda b, t: b.sub(b.const(np.zeros((1, 4, 1, 1))), t)))


def test_one_over_x_kept():
    """Div(1, x) is 1/x: kept."""
    declined(between_relus(lambda b, t: b.op("Div", [b.const(np.float32(1.0)), t])))


def test_add_nonzero_kept():
    """Add(x, c) with one nonzero entry: kept."""
    c = np.zeros((1, 4, 1, 1))
    c[0, 2] = 1e-3
    declined(between_relus(lambda b, t: b.add(t, b.const(c))))


def test_pad_nonzero_kept():
    """Pad with a nonzero amount: kept."""
    declined(between_relus(lambda b, t: b.pad(t, [0, 0, 0, 1, 0, 0, 0, 0])))


def test_add_zero_broadcasting_kept():
    """Add(x[1,4,6,6], zeros[2,4,6,6]) broadcasts x to a larger shape: declined."""
    declined(between_relus(lambda b, t: b.add(t, b.const(np.zeros((2, 4, 6, 6))))), "broadcasts")


def test_mul_one_rank_growing_kept():
    """Mul(x[4,6], ones[1,1,1]) raises the rank: declined."""
    b = GraphBuilder(10)
    x = b.input([4, 6])
    declined(b.build(b.relu(b.mul(b.relu(x), b.const(np.ones((1, 1, 1)))))), "shape")


def test_mul_one_channel_broadcast_kept():
    """Mul(x[1,1,6,6], ones[1,4,1,1]) broadcasts channels: declined."""
    declined(between_relus(lambda b, t: b.mul(t, b.const(np.ones((1, 4, 1, 1)))), shape=(1, 1, 6, 6)),
             "broadcasts")


def test_dropout_mask_used_declined():
    """Dropout whose mask output is read: declined."""
    b = GraphBuilder(11)
    x = b.input([1, 4, 6, 6])
    d, mask = b.op("Dropout", [b.relu(x)], outputs=["d", "mask"])
    model = b.build(b.relu(d), b.op("Not", [mask]))
    declined(model, "mask")


def test_dropout_training_true_declined():
    """Dropout with training_mode = constant true: declined."""
    b = GraphBuilder(12)
    x = b.input([1, 4, 6, 6])
    d = b.op("Dropout", [b.relu(x), b.const(np.float32(0.0)), b.const(np.bool_(True), dtype=np.bool_)])
    declined(b.build(b.relu(d)), "training_mode")


def test_dropout_training_mode_input_declined():
    """Dropout whose training_mode is a graph input: declined."""
    b = GraphBuilder(13)
    x = b.input([1, 4, 6, 6])
    t = b.input([], name="training", dtype=np.bool_)
    d = b.op("Dropout", [b.relu(x), b.const(np.float32(0.5)), t])
    declined(b.build(b.relu(d)), "training_mode")


def test_graph_input_to_graph_output_declined():
    """Graph input → Identity → graph output: the output name cannot move, declined."""
    b = GraphBuilder(14)
    x = b.input([1, 4, 6, 6])
    declined(b.build(b.op("Identity", [x], outputs=["y"])), "graph output")


def test_shared_tensor_to_graph_output_declined():
    """Relu output read by Identity (→ graph output) and by another node: declined."""
    b = GraphBuilder(15)
    x = b.input([1, 4, 6, 6])
    r = b.relu(x)
    declined(b.build(b.op("Identity", [r], outputs=["y"]), b.relu(r)), "graph output")


# -- idempotence ---------------------------------------------------------------------------------
def test_idempotent():
    """A graph with every kind of no-op: one run removes them all, a second changes nothing."""
    b = GraphBuilder(20)
    x = b.input([1, 4, 6, 6])
    t = b.op("Identity", [b.relu(x)])
    t = b.op("Dropout", [t])
    t = b.add(t, b.const(np.zeros((1, 4, 1, 1))))
    t = b.mul(t, b.const(np.float32(1.0)))
    t = b.pad(t, [0] * 8)
    model = b.build(b.relu(t))
    out = removed(model, {"Relu": 2}, count=5)
    assert_idempotent(out, RULE)
