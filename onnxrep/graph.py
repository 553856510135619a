"""Graph helpers on onnx-graphsurgeon: import/export, constants, consumers, shapes, cleanup.

Rules see the graph only through these helpers and `onnxrep.linear`, so the questions every
rewrite must ask ("is this a constant?", "does anyone else read this tensor?") have one answer.
"""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import InputError

log = logging.getLogger("onnxrep")

# onnx-graphsurgeon logs every folding attempt at INFO/WARNING; onnxrep reports what matters itself.
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR


def quiet_onnxruntime() -> None:
    """ORT's own warnings (printed by sessions that graphsurgeon builds to fold constants) are noise
    to onnxrep's users."""
    try:
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        pass


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    try:
        return gs.import_onnx(model)
    except Exception as e:  # graphsurgeon raises bare Exceptions for malformed graphs
        raise InputError(f"cannot read graph: {str(e).strip().splitlines()[0][:300]}") from e


def export_graph(graph: gs.Graph, template: onnx.ModelProto, provenance: dict[str, str] | None = None) -> onnx.ModelProto:
    """Export `graph` as a model that keeps the template's opsets, IR version and metadata."""
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = template.ir_version
    del model.opset_import[:]
    model.opset_import.extend(template.opset_import)
    model.producer_name = template.producer_name
    model.producer_version = template.producer_version
    model.domain = template.domain
    model.model_version = template.model_version
    model.doc_string = template.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    if template.functions and not model.functions:
        model.functions.extend(template.functions)
    if provenance:
        for n in model.graph.node:
            rule = provenance.get(n.name)
            if rule:
                n.doc_string = f"onnxrep:{rule}"
    return model


def opset(graph: gs.Graph) -> int:
    return int(graph.opset or 0)


def const(t: gs.Tensor | None) -> np.ndarray | None:
    """The value of a tensor if it is constant, else None."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    return None


def producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if len(t.inputs) == 1 else None


def consumers(t: gs.Tensor) -> list[gs.Node]:
    return list(t.outputs)


def is_graph_output(graph: gs.Graph, t: gs.Tensor) -> bool:
    return any(o is t for o in graph.outputs)


def private_to(graph: gs.Graph, t: gs.Tensor, node: gs.Node) -> bool:
    """True when `node` is the only reader of `t` (and t is not a graph output), so a rewrite
    may absorb the op producing `t` into `node` without changing what anyone else sees."""
    if is_graph_output(graph, t):
        return False
    readers = t.outputs
    return len(readers) >= 1 and all(r is node for r in readers)


def fan_out_reason(graph: gs.Graph, t: gs.Tensor) -> str | None:
    if is_graph_output(graph, t):
        return f"intermediate '{t.name}' is a graph output"
    if len(t.outputs) > 1:
        return f"intermediate '{t.name}' has {len(t.outputs)} readers (fan-out)"
    return None


def shared_constant_reason(t: gs.Tensor) -> str | None:
    """Constants read by more than one node must not be rewritten in place."""
    if isinstance(t, gs.Constant) and len(t.outputs) > 1:
        return f"weight '{t.name}' is shared by {len(t.outputs)} nodes"
    return None


def rank(t: gs.Tensor) -> int | None:
    shape = t.shape
    return None if shape is None else len(shape)


def static_shape(t: gs.Tensor) -> tuple[int, ...] | None:
    shape = t.shape
    if shape is None or any(not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        return None
    return tuple(int(d) for d in shape)


def dtype_of(t: gs.Tensor) -> np.dtype | None:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values).dtype
    if t.dtype is None:
        return None
    try:
        return np.dtype(t.dtype)
    except TypeError:
        return None


def histogram(graph: gs.Graph) -> Counter:
    return histogram_of(graph.nodes)


def histogram_of(nodes) -> Counter:
    return Counter(n.op for n in nodes)


def remove_node(node: gs.Node) -> None:
    """Detach a node; its outputs are left without a producer (cleanup drops them if unused)."""
    node.inputs.clear()
    node.outputs.clear()


def bypass(node: gs.Node, keep_input: gs.Tensor, graph: gs.Graph) -> None:
    """Replace every use of node's output by `keep_input` (or, when the output is a graph output,
    hand the output name to the input's producer) and detach the node."""
    out = node.outputs[0]
    if is_graph_output(graph, out):
        # graph outputs keep their names: make the upstream producer write `out` directly
        up = producer(keep_input)
        if up is None or is_graph_output(graph, keep_input) or len(keep_input.outputs) > 1:
            # cannot rename safely: keep an Identity-free path by leaving the node
            return
        idx = [i for i, t in enumerate(up.outputs) if t is keep_input][0]
        node.inputs.clear()
        node.outputs.clear()
        up.outputs[idx] = out
        return
    for reader in list(out.outputs):
        for i, t in enumerate(reader.inputs):
            if t is out:
                reader.inputs[i] = keep_input
    remove_node(node)


def new_constant(graph: gs.Graph, hint: str, values: np.ndarray) -> gs.Constant:
    name = _unique(graph, hint)
    return gs.Constant(name, np.ascontiguousarray(values))


def new_variable(graph: gs.Graph, hint: str, dtype=None, shape=None) -> gs.Variable:
    return gs.Variable(_unique(graph, hint), dtype=dtype, shape=shape)


def _unique(graph: gs.Graph, hint: str) -> str:
    taken = vars(graph).get("_onnxrep_names")  # gs.Graph.__getattr__ would look up a graph function
    if taken is None:
        taken = set(graph.tensors().keys()) | {n.name for n in graph.nodes}
        graph._onnxrep_names = taken
    name = hint
    i = 1
    while name in taken:
        name = f"{hint}_{i}"
        i += 1
    taken.add(name)
    return name


def unique_node_name(graph: gs.Graph, hint: str) -> str:
    return _unique(graph, hint)


def tidy(graph: gs.Graph) -> None:
    graph.cleanup(remove_unused_graph_inputs=False)
    graph.toposort()
