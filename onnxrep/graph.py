"""Graph helpers on onnx-graphsurgeon: import/export, constants, readers, shapes, new tensors, cleanup.

Rules see the graph only through these helpers and `onnxrep.linear`, so the questions every
rewrite must ask ("is this a constant?", "does anyone else read this tensor?") have one answer.
How weights are stored, read, freed and written is `onnxrep.weights`' business: here `const`
reads one (read-only) and `new_weight`/`new_constant` make one.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import sys

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import weights as W
from .errors import InputError
from .lean import PAYLOAD_MIN, LeanModel  # noqa: F401  (PAYLOAD_MIN: graph.PAYLOAD_MIN is used)
# the pipeline's weight steps, re-exported so `graph.X` keeps working for existing callers
from .weights import (DiskValues, all_constants, attach_payloads, fill_payloads, lazy, load_values,  # noqa: F401
                      preload, read_folded_weights, release_loaded, tensor_map)

log = logging.getLogger("onnxrep")

# onnx-graphsurgeon logs every folding attempt at INFO/WARNING; onnxrep reports what matters itself.
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR


@contextlib.contextmanager
def cycle_collection_paused():
    """Python's automatic cycle collection off for the block (as it was after it). optimize and
    optimize_file run whole under it, and graph import, export and engine.run (callable on their
    own) too. A collection walks every object alive, the whole graph: at 50k nodes each full one
    costs about a CPU second and the young ones that promote the graph another, and the pipeline
    allocates enough to trigger several (docs/engine.md), at 5k nodes hardly any. Nothing the
    pipeline drops needs the collector: graphsurgeon's nodes and tensors sit in reference cycles
    (their input and output lists point back at them), which `tidy` breaks for the nodes and
    tensors a rewrite or the tidy dropped (`release_dropped`) and `dispose` for the whole graph
    once the pipeline is done with it, so refcounting frees them; the one pass that makes cyclic
    garbage in bulk, graphsurgeon's constant folding (it copies the graph), is followed by a
    collection (folding.fold_constants). Pausing it during the old policy's pipeline, when the
    cycles were left to the collector, raised peak RSS by a third (796 → 1070 MB at 50k nodes)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def _untie(x) -> None:
    """Break the reference cycles of a node or tensor: empty its input and output lists without
    graphsurgeon's synchronization (the other side is dead or already detached) and take their
    back-reference (parent_obj): refcounting then frees it. A dead list's mutators raise
    AttributeError, so a use after this fails loudly instead of corrupting a live graph."""
    d = vars(x)
    for field in ("inputs", "outputs"):
        lst = d.get(field)
        if isinstance(lst, list):
            list.clear(lst)
            vars(lst).clear()


def _alone_refcount() -> int:
    """sys.getrefcount of a node or tensor referenced only by its own input/output lists, as seen
    by release_dropped's loop (a dict value, the loop variable, getrefcount's argument)."""
    counts = []
    for probe in ({0: gs.Variable("probe")}, {0: gs.Node("Identity")}):
        for x in probe.values():
            counts.append(sys.getrefcount(x))
    return min(counts)


_ALONE = _alone_refcount()


def release_dropped(dropped: dict[int, object]) -> int:
    """Break the cycles of the nodes and tensors in `dropped` (id → object: what a rewrite or tidy
    detached) that nothing references but their own lists: so refcounting frees them, where
    graphsurgeon's cycles would otherwise wait for the cycle collector. One still referenced
    anywhere (a live node reads it, a graph input or output, a rule's cache, a caller's variable)
    is left alone: the refcount says so, whoever holds it. Empties `dropped`; returns how many
    were released."""
    released = 0
    for x in dropped.values():
        if sys.getrefcount(x) <= _ALONE and not x.inputs and not x.outputs:
            _untie(x)
            released += 1
    dropped.clear()
    return released


def dispose(graph: gs.Graph) -> None:
    """Break every reference cycle of `graph` (its nodes and tensors, and its subgraphs'), which
    the caller is done with: refcounting then frees it, without a cycle collection walking it (a
    CPU second at 50k nodes). The graph is left empty; its nodes and tensors must not be used."""
    seen: dict[int, object] = {}
    stack = [graph]
    while stack:
        g = stack.pop()
        for t in list(g.inputs) + list(g.outputs):
            seen[id(t)] = t
        for n in g.nodes:
            seen[id(n)] = n
            for t in n.inputs:
                seen[id(t)] = t
            for t in n.outputs:
                seen[id(t)] = t
            for v in n.attrs.values():
                for x in v if isinstance(v, (list, tuple)) else (v,):
                    if isinstance(x, gs.Graph):
                        stack.append(x)
        g.nodes = []
        g.inputs = []
        g.outputs = []
    for x in seen.values():
        if isinstance(x, (gs.Node, gs.Tensor)):
            _untie(x)


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    try:
        with cycle_collection_paused():
            return gs.import_onnx(model)
    except Exception as e:  # graphsurgeon raises bare Exceptions for malformed graphs
        raise InputError(f"cannot read graph: {str(e).strip().splitlines()[0][:300]}") from e


# -- export ----------------------------------------------------------------------------------------
def export_skeleton(graph: gs.Graph, template: onnx.ModelProto, provenance: dict[str, str] | None = None) -> LeanModel:
    """Export `graph` as a LeanModel: every top-level constant of PAYLOAD_MIN bytes or more is a
    stub whose payload is the graph's own array or the input's tensor (nothing is copied). The
    skeleton is a few KB whatever the weights, for the checker, shape inference and ORT (which
    gets the weights as arrays); save_model streams it out, fill_payloads builds the ModelProto."""
    # a stub per weight, then the export: objects that stay alive (as import's), so no collection
    # is worth running over the whole heap meanwhile (50k nodes: 2.5 CPU s of full collections otherwise)
    with cycle_collection_paused():
        with W.stubbed(graph) as payloads:
            skeleton = export_graph(graph, template, provenance)
        return W.lean_model(skeleton, payloads)


def export_graph(graph: gs.Graph, template: onnx.ModelProto, provenance: dict[str, str] | None = None) -> onnx.ModelProto:
    """Export `graph` as a model that keeps the template's opsets, IR version and metadata."""
    with cycle_collection_paused():
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
    if model.ir_version < 4:
        # before IR 4 every initializer must also be listed as a graph input
        listed = {i.name for i in model.graph.input}
        for t in model.graph.initializer:
            if t.name not in listed:
                model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    if provenance:
        for n in model.graph.node:
            rule = provenance.get(n.name)
            if rule:
                n.doc_string = f"onnxrep:{rule}"
    return model


def update_shapes(graph: gs.Graph, inferred: onnx.ModelProto) -> None:
    """Take dtypes and shapes of the graph's variables from an inferred export of it (instead of
    re-importing, which would copy every weight)."""
    from onnx_graphsurgeon.importers.onnx_importer import get_onnx_tensor_dtype, get_onnx_tensor_shape

    g = inferred.graph
    infos = {vi.name: vi for vi in list(g.value_info) + list(g.output) + list(g.input)}
    for t in tensor_map(graph).values():
        vi = infos.get(t.name)
        if isinstance(t, gs.Variable) and vi is not None and vi.type.HasField("tensor_type"):
            if vi.type.tensor_type.elem_type:
                t.dtype = get_onnx_tensor_dtype(vi)
            if vi.type.tensor_type.HasField("shape"):
                t.shape = get_onnx_tensor_shape(vi)


def opset(graph: gs.Graph) -> int:
    """The graph's default-domain opset (0 when unknown)."""
    return int(graph.opset or 0)


def const(t: gs.Tensor | None) -> np.ndarray | None:
    """The value of a tensor if it is constant, else None. Read-only: a weight is never changed in
    place, rules build new arrays (new_weight)."""
    return W.read(t)


def producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if len(t.inputs) == 1 else None


def is_graph_output(graph: gs.Graph, t: gs.Tensor) -> bool:
    return any(o is t for o in graph.outputs)


def private_to(graph: gs.Graph, t: gs.Tensor, node: gs.Node) -> bool:
    """True when `node` is the only reader of `t` (and t is not a graph output), so a rewrite
    may absorb the op producing `t` into `node` without changing what anyone else sees."""
    if is_graph_output(graph, t):
        return False
    readers = t.outputs
    return len(readers) >= 1 and all(r is node for r in readers)


def linear_of(graph: gs.Graph, t: gs.Tensor) -> tuple[gs.Node, gs.Node | None] | None:
    """(matmul, bias_add or None) when `t` is a Linear's output as exported: MatMul(x, W) with W
    constant, or Add(MatMul(x, W), b) with b constant and the MatMul's output read by that Add
    only; else None."""
    n = producer(t)
    add = None
    if n is not None and n.op == "Add" and len(n.inputs) == 2:
        consts = [i for i in n.inputs if isinstance(i, gs.Constant)]
        data = [i for i in n.inputs if not isinstance(i, gs.Constant)]
        if len(consts) != 1 or len(data) != 1 or not private_to(graph, data[0], n):
            return None
        add, n = n, producer(data[0])
    if n is None or n.op != "MatMul" or not isinstance(n.inputs[1], gs.Constant):
        return None
    return n, add


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


def channels(t: gs.Tensor) -> int | None:
    """Size of axis 1 when it is known, whatever the other dims are."""
    shape = t.shape
    if shape is None or len(shape) < 2 or not isinstance(shape[1], (int, np.integer)) or shape[1] < 0:
        return None
    return int(shape[1])


def spatial_shape(t: gs.Tensor) -> tuple[int, ...] | None:
    """Axes 2.. when all are known: enough for padding arithmetic on a dynamic-batch tensor."""
    shape = t.shape
    if shape is None or len(shape) < 2:
        return None
    sp = shape[2:]
    if any(not isinstance(d, (int, np.integer)) or d < 0 for d in sp):
        return None
    return tuple(int(d) for d in sp)


def same_shape(a: gs.Tensor, b: gs.Tensor) -> bool:
    """Provably equal shapes: equal known dims, and symbolic dims with the same name."""
    sa, sb = a.shape, b.shape
    if sa is None or sb is None or len(sa) != len(sb):
        return False
    return all(x == y and x is not None and not (isinstance(x, str) and not x) for x, y in zip(sa, sb))


#: ops whose (first) output has the shape of their first input: the shape derivations of
#: folding.symbolic_dims and symbolic.Evaluator both follow them (one list, so they agree)
SAME_SHAPE_OPS = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Erf", "HardSwish", "HardSigmoid", "Gelu", "Softmax",
    "LogSoftmax", "LayerNormalization", "BatchNormalization", "InstanceNormalization", "Identity", "Cast",
    "CastLike", "Neg", "Sqrt", "Exp", "Abs", "Dropout", "Elu", "Selu", "Softplus", "Mish", "Clip", "Not",
    "Reciprocal", "ScatterND"})


def dtype_of(t: gs.Tensor) -> np.dtype | None:
    if isinstance(t, gs.Constant):  # from the tensor's type: reading the values would load them
        try:
            return np.dtype(t.dtype)
        except TypeError:
            return None
    if t.dtype is None:
        return None
    try:
        return np.dtype(t.dtype)
    except TypeError:
        return None


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
    """A constant holding `values` as they are (dtype included), named after `hint`."""
    return W.new(_unique(graph, hint), values)


def new_weight(graph: gs.Graph, hint: str, values: np.ndarray, dtype) -> gs.Constant:
    """A weight a rule computed (in float64), stored in the model's dtype (see weights.new: a
    half-precision weight keeps its float32 value for the rules that rewrite it again)."""
    return W.new(_unique(graph, hint), values, dtype)


def new_variable(graph: gs.Graph, hint: str, dtype=None, shape=None) -> gs.Variable:
    return gs.Variable(_unique(graph, hint), dtype=dtype, shape=shape)


def _unique(graph: gs.Graph, hint: str) -> str:
    """`hint`, or `hint_<i>` with the first free i. The names taken are collected once per graph;
    the next i to try is kept per hint, so a thousand nodes named after one hint cost a thousand
    steps, not half a million."""
    names = vars(graph).get("_onnxrep_names")  # gs.Graph.__getattr__ would look up a graph function
    if names is None:
        names = graph._onnxrep_names = _Names(set(tensor_map(graph)) | {n.name for n in graph.nodes})
    return names.take(hint)


class _Names:
    def __init__(self, taken: set[str]):
        self.taken = taken
        self.next: dict[str, int] = {}

    def take(self, hint: str) -> str:
        name, i = hint, self.next.get(hint, 1)
        if hint in self.taken:
            while f"{hint}_{i}" in self.taken:
                i += 1
            name = f"{hint}_{i}"
            self.next[hint] = i + 1
        self.taken.add(name)
        return name


def unique_node_name(graph: gs.Graph, hint: str) -> str:
    return _unique(graph, hint)


def tidy(graph: gs.Graph, dropped: dict[int, object] | None = None) -> None:
    """Drop the nodes no graph output depends on, and sort the rest topologically: what
    graphsurgeon's cleanup(remove_unused_graph_inputs=False) + toposort() do, with the same
    resulting order, in two linear passes. graphsurgeon's own took 60–75 µs per node for the pair
    (name maps rebuilt, a recursive walk, per-node subgraph scans; these: ~13 µs), which the
    engine pays after every rule that fired. Graphs with subgraphs or local functions, or in a state graphsurgeon
    would reject (a cycle, a producer outside the graph), go to graphsurgeon itself.
    The nodes it drops, their tensors, and the nodes and tensors in `dropped` (id → object: what
    the engine's rewrites detached) are then released (release_dropped) where nothing else
    references them."""
    dropped = {} if dropped is None else dropped
    _tidy(graph, dropped)
    release_dropped(dropped)


def _tidy(graph: gs.Graph, dropped: dict[int, object]) -> None:
    if graph.functions or any(isinstance(v, gs.Graph) for n in graph.nodes for v in n.attrs.values()):
        return _gs_tidy(graph, dropped)
    for t in graph.inputs:  # as graphsurgeon's cleanup: a graph input has no producer
        t.inputs.clear()
    members = {id(n) for n in graph.nodes}
    # the nodes some graph output depends on, each with its producers (by input, once each):
    # what the sort needs too, so the producer links are followed once per tidy
    def producers_of(tensors) -> list[gs.Node] | None:  # None: a producer outside graph.nodes
        ps = []
        for t in tensors:
            for p in t.inputs:
                if id(p) not in members:
                    return None
                ps.append(p)
        return ps

    producers: dict[int, list[gs.Node]] = {}
    frontier = producers_of(graph.outputs)
    if frontier is None:
        return _gs_tidy(graph, dropped)
    while frontier:
        n = frontier.pop()
        if id(n) in producers:
            continue
        ps = producers_of(n.inputs)
        if ps is None:
            return _gs_tidy(graph, dropped)
        if len(ps) > 1:
            ps = list({id(p): p for p in ps}.values())
        producers[id(n)] = ps
        frontier.extend(ps)
    for n in graph.nodes:
        if id(n) not in producers:
            _drop(n, dropped)
    nodes = [n for n in graph.nodes if id(n) in producers]
    order = _topological(nodes, producers)
    if order is None:
        graph.nodes = nodes
        return _gs_tidy(graph, dropped)
    graph.nodes = order


def _drop(n: gs.Node, dropped: dict[int, object]) -> None:
    """Detach `n` (synchronized: its tensors forget it), remembering it and its tensors in `dropped`."""
    dropped[id(n)] = n
    for t in n.inputs:
        dropped[id(t)] = t
    for t in n.outputs:
        dropped[id(t)] = t
    n.inputs.clear()
    n.outputs.clear()


def _gs_tidy(graph: gs.Graph, dropped: dict[int, object]) -> None:
    before = list(graph.nodes)
    graph.cleanup(remove_unused_graph_inputs=False)
    graph.toposort()
    kept = {id(n) for n in graph.nodes}
    for n in before:
        if id(n) not in kept:
            dropped[id(n)] = n


def _topological(nodes: list[gs.Node], producers: dict[int, list[gs.Node]]) -> list[gs.Node] | None:
    """`nodes` by level (a node's level is one more than its producers' highest), ties in the order
    of a depth-first walk that visits each node's producers (by input) before the node: the order
    graphsurgeon's toposort gives. `producers`: each node's producers (all among `nodes`), by
    input, once each. None on a cycle."""
    level: dict[int, int] = {}
    walked: list[gs.Node] = []
    for root in nodes:
        if id(root) in level:
            continue
        stack = [(root, producers[id(root)], 0)]
        open_ = {id(root)}
        while stack:
            node, ps, i = stack[-1]
            while i < len(ps) and id(ps[i]) in level:
                i += 1
            if i < len(ps):
                p = ps[i]
                if id(p) in open_:
                    return None
                stack[-1] = (node, ps, i + 1)
                open_.add(id(p))
                stack.append((p, producers[id(p)], 0))
                continue
            stack.pop()
            open_.discard(id(node))
            level[id(node)] = 1 + max((level[id(p)] for p in ps), default=-1)
            walked.append(node)
    return sorted(walked, key=lambda n: level[id(n)])
