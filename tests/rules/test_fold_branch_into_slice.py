"""fold_branch_into_slice: LoRA on q and v of a fused qkv Linear merges into the qkv columns."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import assert_equivalent, assert_idempotent, declined_by, GraphBuilder, ops, run_rules

RULE = "fold_branch_into_slice"
C = 8


def lora(b, x, cin, cout, rank=2, scale=0.5):
    return b.mul(b.matmul(b.matmul(x, cin, rank), rank, cout), b.const(np.float32(scale)))


def qkv_model(split="Split", adapt=(True, False, True), bias=True, seed=0, reader=None, branch_input=None):
    b = GraphBuilder(seed)
    x = b.relu(b.input([2, 5, C]))
    t = b.matmul(x, C, 3 * C)
    if bias:
        t = b.add(t, b.randn((3 * C,)))
    if split == "Split":
        parts = b.op("Split", [t, b.ints([C, C, C])], n_out=3, axis=-1)
    else:
        parts = [b.op("Slice", [t, b.ints([i * C]), b.ints([(i + 1) * C]), b.ints([-1]), b.ints([1])]) for i in range(3)]
    outs = []
    src = branch_input(b) if branch_input is not None else x
    for p, a in zip(parts, adapt):
        outs.append(b.relu(b.add(p, lora(b, src, C, C))) if a else b.relu(p))
    if reader is not None:
        outs.append(reader(b, t))
    return b.build(*outs)


@pytest.mark.parametrize("split", ["Split", "Slice"])
def test_lora_on_q_and_v_merges_into_qkv(split):
    """q and v adapters vanish: one MatMul left (the qkv), as without adapters."""
    m = qkv_model(split)
    out, report = run_rules(m)
    assert ops(out)["MatMul"] == 1 and "Mul" not in ops(out)
    assert report.rule_counts.get(RULE) == 2
    assert_equivalent(m, out)
    assert_idempotent(out)


def test_qkv_without_bias():
    """A bias-free qkv Linear (no bias Add) takes a bias-free branch."""
    m = qkv_model(bias=False)
    out, report = run_rules(m, RULE)
    assert ops(out)["MatMul"] == 1
    assert_equivalent(m, out)


def test_whole_reader_of_qkv_declines():
    """qkv is also read whole (a Relu of all columns): changing q's columns would change it."""
    m = qkv_model(reader=lambda b, t: b.relu(t))
    declined_by(RULE, m, "read whole")


def test_overlapping_slice_declines():
    """Another Slice reads columns [4, 12) overlapping q's [0, 8)."""
    m = qkv_model(split="Slice", adapt=(True, False, False),
                  reader=lambda b, t: b.relu(b.op("Slice", [t, b.ints([4]), b.ints([12]), b.ints([-1]), b.ints([1])])))
    declined_by(RULE, m, "overlap")


def test_branch_reading_another_tensor_declines():
    """The adapter reads a different tensor than the qkv Linear."""
    m = qkv_model(branch_input=lambda b: b.relu(b.input([2, 5, C])), adapt=(True, False, False))
    declined_by(RULE, m, "reads")


def test_nonlinear_branch_declines():
    """Relu between the adapter's A and B: the linear part reads the Relu, not x; left alone."""
    b = GraphBuilder(6)
    x = b.relu(b.input([2, 5, C]))
    t = b.add(b.matmul(x, C, 2 * C), b.randn((2 * C,)))
    q, k = b.op("Split", [t, b.ints([C, C])], n_out=2, axis=-1)
    br = b.matmul(b.relu(b.matmul(x, C, 2)), 2, C)
    m = b.build(b.relu(b.add(q, br)), b.relu(k))
    declined_by(RULE, m, "the branch reads")


def test_shared_qkv_weight_declines():
    """The qkv weight is also used by another MatMul: declined (it would be duplicated)."""
    b = GraphBuilder(7)
    x = b.relu(b.input([2, 5, C]))
    w = b.randn((C, 2 * C))
    t = b.op("MatMul", [x, w])
    q, k = b.op("Split", [t, b.ints([C, C])], n_out=2, axis=-1)
    m = b.build(b.relu(b.add(q, lora(b, x, C, C))), b.relu(k), b.op("MatMul", [b.relu(b.input([2, 5, C])), w]))
    declined_by(RULE, m, "shared")


def test_branch_read_elsewhere_declines():
    """The adapter's output is also a graph output (fan-out): folding it would lose that reader."""
    b = GraphBuilder(8)
    x = b.relu(b.input([2, 5, C]))
    t = b.add(b.matmul(x, C, 2 * C), b.randn((2 * C,)))
    q, k = b.op("Split", [t, b.ints([C, C])], n_out=2, axis=-1)
    br = lora(b, x, C, C)
    m = b.build(b.relu(b.add(q, br)), b.relu(k), br)
    declined_by(RULE, m, "private")


def test_biased_branch_needs_the_linears_bias_add():
    """A branch with a bias of its own, added to a bias-free qkv: no bias Add to take it, declined."""
    b = GraphBuilder(9)
    x = b.relu(b.input([2, 5, C]))
    t = b.matmul(x, C, 2 * C)
    q, k = b.op("Split", [t, b.ints([C, C])], n_out=2, axis=-1)
    br = b.add(lora(b, x, C, C), b.randn((C,)))
    m = b.build(b.relu(b.add(q, br)), b.relu(k))
    declined_by(RULE, m, "bias")
