"""The weight lifecycle (onnxrep.weights): lazy reads, held arrays, early release, restore."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxrep import graph as G
from onnxrep import weights as W
from onnxrep.errors import OnnxrepError
from onnxrep.lean import PAYLOAD_MIN
from tests.helpers import GraphBuilder


def _graph():
    """x → Conv(16→16, 3×3: 9 KiB weight, lazy) → Relu → y."""
    b = GraphBuilder(0)
    x = b.input((1, 16, 4, 4))
    return G.import_graph(onnx.shape_inference.infer_shapes(b.build(b.relu(b.conv(x, 16, 16)))))


def _conv(g):
    return next(n for n in g.nodes if n.op == "Conv")


def test_read_holds_a_read_only_array_and_release_loaded_gives_the_tensor_back():
    """const reads a lazy weight once (read-only); release_loaded returns it to the input's tensor."""
    g = _graph()
    w = _conv(g).inputs[1]
    lazy = w._values
    assert isinstance(lazy, LazyValues)
    arr = G.const(w)
    assert not arr.flags.writeable and w._values is arr and np.shares_memory(G.const(w), arr)
    W.release_loaded(g)
    assert w._values is lazy
    np.testing.assert_array_equal(G.const(w), arr)


def test_releaser_frees_what_no_node_reads():
    """A replaced input weight goes back to its lazy tensor; a replaced weight a rule made becomes
    a stub that names the bug if read; live weights stay."""
    g = _graph()
    conv = _conv(g)
    old = conv.inputs[1]
    G.const(old)
    releaser = W.Releaser(g)
    watched = releaser.watch([conv])
    made = G.new_weight(g, "w2", np.ones(old.shape), np.float32)
    conv.inputs[1] = made
    assert releaser.release(watched) == 1
    assert isinstance(old._values, LazyValues) and isinstance(made._values, np.ndarray)
    watched = releaser.watch([conv])
    conv.inputs[1] = G.new_weight(g, "w3", np.zeros(old.shape), np.float32)
    assert releaser.release(watched) == 1
    with pytest.raises(OnnxrepError, match="read after the graph stopped using it"):
        G.const(made)


def test_releaser_keeps_small_weights_and_graph_outputs():
    """Weights under PAYLOAD_MIN are not worth a stub; a constant that is a graph output is used."""
    g = _graph()
    small = G.new_constant(g, "small", np.ones(4, np.float32))
    big = G.new_constant(g, "big", np.ones(PAYLOAD_MIN, np.float32))
    g.outputs.append(big)
    releaser = W.Releaser(g)
    releaser.begin_sweep([])
    releaser.release([small, big])
    assert releaser.end_sweep() == 0
    assert isinstance(small._values, np.ndarray) and isinstance(big._values, np.ndarray)


def test_sweep_net_frees_what_a_rewrite_dropped_outside_its_watch():
    """A weight detached by a rewrite the engine did not watch it in is freed at the sweep's end."""
    g = _graph()
    conv = _conv(g)
    old = conv.inputs[1]
    G.const(old)
    releaser = W.Releaser(g)
    releaser.begin_sweep(g.nodes)
    conv.inputs[1] = G.new_weight(g, "w2", np.ones(old.shape), np.float32)
    releaser.release([])
    assert isinstance(old._values, np.ndarray)
    assert releaser.end_sweep() == 1 and releaser.late == 1
    assert isinstance(old._values, LazyValues)


def test_half_precision_weight_keeps_its_float32_value_until_released():
    """new_weight in fp16 stores fp16 and reads back the float32 value; releasing drops both."""
    g = _graph()
    values = np.full((16, 16, 3, 3), 1 + 2 ** -12)  # not representable in fp16
    c = G.new_weight(g, "h", values, np.float16)
    assert c._values.dtype == np.float16
    assert G.const(c).dtype == np.float32 and G.const(c)[0, 0, 0, 0] == np.float32(1 + 2 ** -12)
    W.Releaser(g).release([c])
    with pytest.raises(OnnxrepError, match="read after"):
        G.const(c)


def test_rule_facing_names_of_graph_still_work():
    """Rules (merged from other branches) import these from onnxrep.graph."""
    for name in ("const", "new_weight", "new_constant", "new_variable", "producer", "private_to",
                 "fan_out_reason", "shared_constant_reason", "is_graph_output", "remove_node", "bypass",
                 "unique_node_name", "rank", "channels", "static_shape", "spatial_shape", "same_shape",
                 "dtype_of", "tidy", "PAYLOAD_MIN", "export_skeleton", "fill_payloads", "preload",
                 "release_loaded", "attach_payloads", "read_folded_weights", "import_graph"):
        assert callable(getattr(G, name)) or name == "PAYLOAD_MIN", name
    assert isinstance(G.new_constant(_graph(), "c", np.ones(3)), gs.Constant)
