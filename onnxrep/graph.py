"""Graph helpers on onnx-graphsurgeon: import/export, constants, consumers, shapes, cleanup.

Rules see the graph only through these helpers and `onnxrep.linear`, so the questions every
rewrite must ask ("is this a constant?", "does anyone else read this tensor?") have one answer.
"""
from __future__ import annotations

import contextlib
import logging
from collections import Counter

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from .errors import InputError, OnnxrepError
from .lean import PAYLOAD_MIN, RELEASED, LeanModel, on_disk, point_stub, stub_index, tensor_array

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


# -- weights: lazy import, payload-free export ----------------------------------------------------
# Weights are the only large thing in a model, and protobuf (upb) makes every touch of them a copy:
# reading raw_data copies it, CopyFrom/extend copy it, clearing a field frees nothing until the whole
# message goes, ByteSize()/SerializeToString() serialize it all. So the graph keeps the input's
# tensors as LazyValues (read on first use, released after the rules ran), and export writes a
# payload-free skeleton first (checked, shape-inferred, verified with weights fed as arrays), then
# fills each payload once, dropping the graph's array as it goes.


class DiskValues(LazyValues):
    """LazyValues of a payload still in the input file (lean.on_disk): graphsurgeon's own load()
    (constant folding reads `.values`) must not resolve its location, onnxrep reads it."""

    def load(self):
        return np.array(tensor_array(self.tensor))


def lazy(t: onnx.TensorProto) -> LazyValues:
    return DiskValues(t) if on_disk(t) is not None else LazyValues(t)


def read_folded_weights(graph: gs.Graph) -> None:
    """Read the on-disk weights that constant folding will compute with (inputs of nodes whose
    inputs are all constant, or computed from constants only). graphsurgeon folds by exporting
    that subgraph to ONNX Runtime with the LazyValues' tensors as they are, and ORT refuses an
    on-disk payload's absolute external-data path: the fold would silently not happen. Read like
    `const` reads (release_loaded returns the ones no rule changed to the file)."""
    constant = {id(t) for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    folded: set[int] = set()
    grew = True
    while grew:
        grew = False
        for n in graph.nodes:
            if id(n) not in folded and n.inputs and all(id(t) in constant for t in n.inputs if t.name):
                folded.add(id(n))
                constant.update(id(t) for t in n.outputs)
                grew = True
    for n in graph.nodes:
        if id(n) in folded:
            for t in n.inputs:
                if isinstance(t, gs.Constant) and isinstance(t._values, DiskValues):
                    const(t)


def attach_payloads(graph: gs.Graph, sources: list[onnx.TensorProto]) -> None:
    """Point the graph's stub constants (imported from a without_payload copy whose stubs carry an
    index into `sources`) at the real tensors, without reading them."""
    for c in all_constants(graph):
        v = c._values
        if isinstance(v, LazyValues) and isinstance(v.tensor, onnx.TensorProto):
            i = stub_index(v.tensor)
            if i is not None:
                if not 0 <= i < len(sources):
                    raise InputError(f"tensor '{c.name}' has external data that was not loaded")
                c._values = lazy(sources[i])
                c.data_location = None


def all_constants(graph: gs.Graph) -> list[gs.Constant]:
    """Every Constant of the graph: its tensors, Constant-valued attributes, and subgraphs'."""
    seen: dict[int, gs.Constant] = {}

    def visit(g):
        for t in g.tensors().values():
            if isinstance(t, gs.Constant):
                seen[id(t)] = t
        for n in g.nodes:
            for v in n.attrs.values():
                for x in v if isinstance(v, (list, tuple)) else (v,):
                    if isinstance(x, gs.Constant):
                        seen[id(x)] = x
                    elif isinstance(x, gs.Graph):
                        visit(x)

    visit(graph)
    return list(seen.values())


def load_values(lazy: LazyValues) -> np.ndarray:
    """The array of a lazily imported tensor: one copy (lean.tensor_array), where graphsurgeon's
    LazyValues.load makes three."""
    t = lazy.tensor
    if isinstance(t, onnx.TensorProto):
        if stub_index(t) is not None:
            raise _released(t.name) if stub_index(t) == RELEASED else OnnxrepError(
                f"internal error: weight '{t.name}' is a payload-free stub (not attached to its data)")
        return tensor_array(t)
    arr = lazy.load()
    arr.flags.writeable = False
    return arr


_ACTIVE: list = []  # graphs being rewritten (engine.run): weights loaded by `const` are tracked there


@contextlib.contextmanager
def tracking(graph: gs.Graph):
    """Within this block, weights that `const` loads are tracked for release_dead on `graph`."""
    _ACTIVE.append(graph)
    try:
        yield
    finally:
        _ACTIVE.pop()


def _track(graph: gs.Graph, c: gs.Constant) -> None:
    tracked = vars(graph).get("_onnxrep_weights")  # gs.Graph.__getattr__ would look up a graph function
    if tracked is None:
        tracked = graph._onnxrep_weights = []
    tracked.append(c)


def release_dead(graph: gs.Graph) -> None:
    """Drop the arrays of tracked weights (loaded by `const` or made by `new_constant`) that no node
    reads any more. Every graphsurgeon tensor sits in a reference cycle (its input/output lists point
    back at it), so a weight a rewrite replaced would otherwise stay in memory until Python's cycle
    collector happens to run: a RepVGG model would hold its input weights, the BN-fused ones and the
    merged ones at once. Called by the engine after each rewrite."""
    tracked = vars(graph).get("_onnxrep_weights")
    if not tracked:
        return
    outputs = {id(t) for t in graph.outputs}
    alive = []
    for c in tracked:
        if c.outputs or id(c) in outputs:
            alive.append(c)
            continue
        loaded = vars(c).pop("_onnxrep_lazy", None)
        if loaded is not None and c._values is loaded[1]:
            c._values = loaded[0]  # still readable: the input's own tensor
        elif isinstance(c._values, np.ndarray):
            c._values = LazyValues(_stub(c.name, dtype_to_onnx(c._values.dtype), c._values.shape, RELEASED))
    graph._onnxrep_weights = alive


def preload(graph: gs.Graph, arrays: dict[str, np.ndarray]) -> None:
    """Give the graph's lazily imported weights values already read (by name), as `const` would
    have read them; tracked like those, so release_dead/release_loaded drop them the same way.
    Empties `arrays`: the graph owns them now, and a caller's reference would keep them all alive."""
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues) and t.name in arrays:
            arr = arrays.pop(t.name)
            if arr.shape != tuple(t._values.shape) or arr.dtype != t._values.dtype or arr.flags.writeable:
                continue
            t._onnxrep_lazy = (t._values, arr)
            t._values = arr
            if arr.nbytes >= PAYLOAD_MIN:
                _track(graph, t)
    arrays.clear()


def release_loaded(graph: gs.Graph) -> None:
    """Forget the arrays `const` loaded for constants that are still the input's own tensors, so the
    graph holds no second copy of weights the rules did not change."""
    for c in all_constants(graph):
        loaded = vars(c).get("_onnxrep_lazy")
        if loaded is not None:
            lazy, arr = loaded
            if c._values is arr:
                c._values = lazy
            del c._onnxrep_lazy


def _stub(name: str, data_type: int, dims, index: int) -> onnx.TensorProto:
    t = onnx.TensorProto(name=name, data_type=data_type, dims=[int(d) for d in dims])
    point_stub(t, index)
    return t


def _released(name: str):
    return OnnxrepError(f"internal error: weight '{name}' is read after the graph stopped using it")


def export_skeleton(graph: gs.Graph, template: onnx.ModelProto, provenance: dict[str, str] | None = None) -> LeanModel:
    """Export `graph` as a LeanModel: every top-level constant of PAYLOAD_MIN bytes or more is a
    stub whose payload is the graph's own array or the input's tensor (nothing is copied). The
    skeleton is a few KB whatever the weights, for the checker, shape inference and ORT (which
    gets the weights as arrays); save_model streams it out, fill_payloads builds the ModelProto."""
    payloads: list = []
    swapped = []
    for t in graph.tensors().values():
        if not isinstance(t, gs.Constant) or t._export_dtype is not None and t._export_dtype != t.dtype:
            continue
        v = t._values
        if isinstance(v, LazyValues) and not isinstance(v.tensor, onnx.TensorProto):
            continue  # sparse
        if isinstance(v, LazyValues):
            data_type, dims, nbytes = v.tensor.data_type, v.tensor.dims, v.nbytes
        elif isinstance(v, np.ndarray):
            try:
                data_type = dtype_to_onnx(v.dtype)
            except Exception:  # a dtype ONNX has no name for: let graphsurgeon deal with it
                continue
            dims, nbytes = v.shape, v.nbytes
        else:
            continue
        if nbytes < PAYLOAD_MIN:
            continue
        swapped.append((t, v))
        payloads.append(v.tensor if isinstance(v, LazyValues) else v)
        t._values = LazyValues(_stub(t.name, data_type, dims, len(payloads) - 1))
    try:
        skeleton = export_graph(graph, template, provenance)
    finally:
        for t, v in swapped:
            t._values = v
    lean = LeanModel(skeleton, payloads)
    for t in onnx.external_data_helper._get_all_tensors(skeleton):
        if on_disk(t) is not None:  # an input weight graphsurgeon exported where stubs are not
            lean.fill(t, _adopt(lean, t))  # made (a subgraph reading it): never a file path out
    return lean


def _adopt(lean: LeanModel, t: onnx.TensorProto) -> int:
    copy = onnx.TensorProto()
    copy.CopyFrom(t)
    lean.payloads.append(copy)
    return len(lean.payloads) - 1


def fill_payloads(lean: LeanModel, graph: gs.Graph | None = None) -> onnx.ModelProto:
    """The model itself: `lean`'s skeleton with each payload written in (in place). With `graph`,
    each constant filled from an array is pointed at its new tensor and the array dropped, so the
    weights exist once (in the model) rather than twice."""
    by_name = {}
    if graph is not None:
        by_name = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
    model = lean.proto
    for dst in model.graph.initializer:
        i = stub_index(dst)
        if i is None:
            continue
        src = lean.payloads[i]
        lean.fill(dst, i)
        if isinstance(src, np.ndarray):
            lean.payloads[i] = None
            c = by_name.get(dst.name)
            if c is not None and c._values is src:
                c._values = LazyValues(dst)
    return model


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
    for t in graph.tensors().values():
        vi = infos.get(t.name)
        if isinstance(t, gs.Variable) and vi is not None and vi.type.HasField("tensor_type"):
            if vi.type.tensor_type.elem_type:
                t.dtype = get_onnx_tensor_dtype(vi)
            if vi.type.tensor_type.HasField("shape"):
                t.shape = get_onnx_tensor_shape(vi)


def opset(graph: gs.Graph) -> int:
    return int(graph.opset or 0)


def const(t: gs.Tensor | None) -> np.ndarray | None:
    """The value of a tensor if it is constant, else None. Read-only: a weight is never changed in
    place (release_loaded relies on that), rules build new arrays."""
    if isinstance(t, gs.Constant):
        precise = t.__dict__.get("_onnxrep_precise")
        if precise is not None:  # a rule computed this half-precision weight: use its exact value
            return precise
        v = t._values
        if isinstance(v, LazyValues) and not isinstance(v, SparseValues):
            arr = load_values(v)
            t._values = arr
            if _ACTIVE and arr.nbytes >= PAYLOAD_MIN:
                _track(_ACTIVE[-1], t)
            t._onnxrep_lazy = (v, arr)
            return arr
        arr = np.asarray(t.values).view()
        arr.flags.writeable = False
        return arr
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
    c = gs.Constant(name, np.ascontiguousarray(values))
    if c._values.nbytes >= PAYLOAD_MIN:
        _track(graph, c)
    return c


def new_weight(graph: gs.Graph, hint: str, values: np.ndarray, dtype) -> gs.Constant:
    """A weight a rule computed (in float64), stored in the model's dtype.

    For half-precision models the value is also kept in float32 on the tensor, so a later rule
    that rewrites this weight again starts from it, not from the rounded copy: a chain of rewrites
    rounds to fp16 once (float32 carries 13 more bits than fp16, so its own rounding never shows)."""
    dtype = np.dtype(dtype)
    values = np.asarray(values)
    t = new_constant(graph, hint, values.astype(dtype))
    if np.issubdtype(dtype, np.floating) and dtype.itemsize < 4:
        precise = values.astype(np.float32)
        precise.flags.writeable = False
        t._onnxrep_precise = precise
    return t


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
