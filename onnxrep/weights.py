"""The lifecycle of a graph's weights while onnxrep rewrites it: read lazily, freed early, written once.

Weights are the only large thing in a model, and protobuf (upb) makes every touch of them a copy:
reading raw_data copies it, CopyFrom/extend copy it, clearing a field frees nothing until the whole
message goes, ByteSize()/SerializeToString() serialize it all. So the graph keeps the input's
tensors as LazyValues (read on first use), the engine frees each weight a rewrite stopped using
right after that rewrite, and export writes a payload-free skeleton first (checked,
shape-inferred, verified with weights fed as arrays), then fills each payload once.

Who calls what:

    rules       graph.const / graph.new_weight / graph.new_constant (read(), new() here): arrays
                are read-only; a rule never frees, restores or swaps a tensor's storage itself.
    engine      Releaser: watch() the nodes a rewrite touches, release() after it, and a
                begin_sweep()/end_sweep() net for anything a rewrite left outside its match.
    optimizer   attach_payloads, read_folded_weights, preload, release_loaded, fill_payloads
                (through their re-exports in onnxrep.graph); graph.export_skeleton uses stubbed
                and lean_model.

Everything that knows about graphsurgeon's private `_values` and onnxrep's own per-tensor state
lives in this module; that state is one `_Held` record per Constant (its array, and the lazy
tensor it came from, if any) plus the float32 copy of a half-precision weight a rule computed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from .errors import InputError, OnnxrepError
from .lean import PAYLOAD_MIN, RELEASED, LeanModel, on_disk, point_stub, stub_index, tensor_array

_HELD = "_onnxrep_held"  # per-Constant state, set only here
_PRECISE = "_onnxrep_precise"


@dataclass
class _Held:
    """A Constant whose array onnxrep holds: read from `lazy` (None: made by a rule)."""

    array: np.ndarray
    lazy: LazyValues | None = None


# -- import ----------------------------------------------------------------------------------------
class DiskValues(LazyValues):
    """LazyValues of a payload still in the input file (lean.on_disk): graphsurgeon's own load()
    (constant folding reads `.values`) must not resolve its location, onnxrep reads it."""

    def load(self):
        return np.array(tensor_array(self.tensor))


def lazy(t: onnx.TensorProto) -> LazyValues:
    return DiskValues(t) if on_disk(t) is not None else LazyValues(t)


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


def tensor_map(graph: gs.Graph) -> dict[str, gs.Tensor]:
    """What graph.tensors() returns (graphsurgeon 0.6.1): name → tensor for every tensor with a
    name among the graph's inputs, each node's inputs and outputs, and the graph's outputs, in
    that order, a later tensor of the same name taking the earlier one's place. The same dict,
    without graphsurgeon's closure call and two list copies per node (about 3× faster; a
    whole-graph pass the pipeline makes several times), and without its warning on a duplicate
    name, which onnxrep silences anyway."""
    m: dict[str, gs.Tensor] = {}
    for t in graph.inputs:
        if t.name != "":
            m[t.name] = t
    for n in graph.nodes:
        for t in n.inputs:
            if t.name != "":
                m[t.name] = t
        for t in n.outputs:
            if t.name != "":
                m[t.name] = t
    for t in graph.outputs:
        if t.name != "":
            m[t.name] = t
    return m


def all_constants(graph: gs.Graph) -> list[gs.Constant]:
    """Every Constant of the graph: its tensors, Constant-valued attributes, and subgraphs'."""
    seen: dict[int, gs.Constant] = {}

    def visit(g):
        for t in tensor_map(g).values():
            if isinstance(t, gs.Constant):
                seen[id(t)] = t
        for n in g.nodes:
            for v in n.attrs.values():
                for x in v if isinstance(v, (list, tuple)) else (v,):
                    if isinstance(x, gs.Constant):
                        seen[id(x)] = x
                    elif isinstance(x, gs.Graph):
                        visit(x)

    try:
        visit(graph)
    finally:
        del visit  # a recursive closure is a reference cycle, and `seen` would stay alive with it
    return list(seen.values())


def read_folded_weights(graph: gs.Graph) -> None:
    """Read the on-disk weights that constant folding will compute with (inputs of nodes whose
    inputs are all constant, or computed from constants only). graphsurgeon folds by exporting
    that subgraph to ONNX Runtime with the LazyValues' tensors as they are, and ORT refuses an
    on-disk payload's absolute external-data path: the fold would silently not happen. Read like
    `read` reads (release_loaded returns the ones no rule changed to the file)."""
    constant = {id(t) for t in tensor_map(graph).values() if isinstance(t, gs.Constant)}
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
                    read(t)


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


def preload(graph: gs.Graph, arrays: dict[str, np.ndarray]) -> None:
    """Give the graph's lazily imported weights values already read (by name), as `read` would
    have read them, and held like those. Empties `arrays`: the graph owns them now, and a
    caller's reference would keep them all alive."""
    for t in tensor_map(graph).values():
        if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues) and t.name in arrays:
            arr = arrays.pop(t.name)
            if arr.shape != tuple(t._values.shape) or arr.dtype != t._values.dtype or arr.flags.writeable:
                continue
            _hold(t, arr, t._values)
    arrays.clear()


# -- what rules see --------------------------------------------------------------------------------
def read(t: gs.Tensor | None) -> np.ndarray | None:
    """The value of a tensor if it is constant, else None. Read-only: a weight is never changed in
    place (release_loaded relies on that), rules build new arrays."""
    if not isinstance(t, gs.Constant):
        return None
    precise = vars(t).get(_PRECISE)
    if precise is not None:  # a rule computed this half-precision weight: use its exact value
        return precise
    v = t._values
    if isinstance(v, LazyValues) and not isinstance(v, SparseValues):
        arr = load_values(v)
        _hold(t, arr, v)
        return arr
    arr = np.asarray(t.values).view()
    arr.flags.writeable = False
    return arr


def new(name: str, values: np.ndarray, dtype=None) -> gs.Constant:
    """A Constant named `name` (unique: the caller's business) holding `values`, cast to `dtype`.

    For a half-precision dtype the value is also kept in float32 on the tensor, so a later rule
    that rewrites this weight again starts from it, not from the rounded copy: a chain of
    rewrites rounds to fp16 once (float32 carries 13 more bits than fp16, so its own rounding
    never shows)."""
    values = np.asarray(values)
    stored = values if dtype is None else values.astype(np.dtype(dtype))
    c = gs.Constant(name, np.ascontiguousarray(stored))
    _hold(c, c._values, None)
    if dtype is not None and np.issubdtype(np.dtype(dtype), np.floating) and np.dtype(dtype).itemsize < 4:
        precise = values.astype(np.float32)
        precise.flags.writeable = False
        setattr(c, _PRECISE, precise)
    return c


def _hold(c: gs.Constant, arr: np.ndarray, lazy_values: LazyValues | None) -> None:
    c._values = arr
    setattr(c, _HELD, _Held(arr, lazy_values))


# -- freeing, as the rules go ----------------------------------------------------------------------
class Releaser:
    """Frees the arrays of weights that no node of `graph` reads any more, as the engine asks.

    Every graphsurgeon tensor sits in a reference cycle (its input/output lists point back at it),
    so a weight a rewrite replaced would otherwise stay in memory until Python's cycle collector
    happens to run: a RepVGG model would hold its input weights, the BN-fused ones and the merged
    ones at once. Freed means: a weight read from the input goes back to its lazy tensor (still
    readable), a weight a rule made becomes a stub that raises if anything reads it.

    Cost: watch/release are proportional to the rewrite, not the graph. The sweep net
    (begin_sweep/before_rewrite/end_sweep) is one pass over the graph per rule sweep that rewrote
    something (a sweep without a rewrite drops nothing, so it is not looked at); it frees what a
    rewrite dropped outside the nodes it was watched on (`late` counts those; a rule whose match
    names every node it changes leaves it at 0)."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.late = 0
        self._sweep: list[gs.Constant] = []
        self._nodes = None  # the graph's nodes at begin_sweep, until the first rewrite looks at them
        self.scans = 0  # sweep nets taken (passes over the graph's nodes)

    @staticmethod
    def watch(nodes) -> list[gs.Constant]:
        """The constants `nodes` read now (call before the rewrite)."""
        return [t for n in nodes for t in n.inputs if isinstance(t, gs.Constant)]

    def release(self, watched: list[gs.Constant], added=()) -> int:
        """After a rewrite: free the watched constants nobody reads any more, and remember the
        added nodes' constants for the sweep net. Returns how many were freed."""
        extra = self.watch(added)
        self._sweep.extend(extra)
        return sum(self._free_if_dead(c) for c in watched + extra)

    def begin_sweep(self, nodes, lazy: bool = False) -> None:
        """A rule sweep starts over `nodes`. lazy (the engine's way): `nodes` is graph.nodes itself,
        read at the sweep's first rewrite (before_rewrite), when it is still what it is now
        (matching changes nothing); a sweep that rewrites nothing never reads it."""
        self._sweep = []
        self._nodes = nodes
        if not lazy:
            self.before_rewrite()

    def before_rewrite(self) -> None:
        """Call before each rewrite of the sweep: the first takes the net's snapshot of the
        constants the graph's nodes read."""
        if self._nodes is not None:
            self._sweep = self.watch(self._nodes) + self._sweep
            self._nodes = None
            self.scans += 1

    def end_sweep(self) -> int:
        self._nodes = None
        freed = sum(self._free_if_dead(c) for c in self._sweep)
        self._sweep = []
        self.late += freed
        return freed

    def _free_if_dead(self, c: gs.Constant) -> bool:
        held = vars(c).get(_HELD)
        if held is None or c.outputs or c._values is not held.array or held.array.nbytes < PAYLOAD_MIN:
            return False
        if any(o is c for o in self.graph.outputs):
            return False
        if held.lazy is not None:
            c._values = held.lazy  # still readable: the input's own tensor
        else:
            arr = held.array
            c._values = LazyValues(_stub(c.name, dtype_to_onnx(arr.dtype), arr.shape, RELEASED))
        del c.__dict__[_HELD]
        c.__dict__.pop(_PRECISE, None)
        return True


def release_loaded(graph: gs.Graph) -> None:
    """Forget the arrays `read` loaded for constants that are still the input's own tensors, so the
    graph holds no second copy of weights the rules did not change."""
    for c in all_constants(graph):
        held = vars(c).get(_HELD)
        if held is not None and held.lazy is not None:
            if c._values is held.array:
                c._values = held.lazy
            del c.__dict__[_HELD]


def _stub(name: str, data_type: int, dims, index: int) -> onnx.TensorProto:
    t = onnx.TensorProto(name=name, data_type=data_type, dims=[int(d) for d in dims])
    point_stub(t, index)
    return t


def _released(name: str):
    return OnnxrepError(f"internal error: weight '{name}' is read after the graph stopped using it")


# -- export ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def stubbed(graph: gs.Graph):
    """Within this block every top-level constant of PAYLOAD_MIN bytes or more is a stub whose
    payload is the graph's own array or the input's tensor (nothing is copied); yields the
    payload list the stubs index. Exporting the graph inside gives a skeleton of a few KB."""
    payloads: list = []
    swapped = []
    for t in tensor_map(graph).values():
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
        yield payloads
    finally:
        for t, v in swapped:
            t._values = v


def lean_model(skeleton: onnx.ModelProto, payloads: list) -> LeanModel:
    """The LeanModel of a skeleton exported under `stubbed`."""
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
        by_name = {t.name: t for t in tensor_map(graph).values() if isinstance(t, gs.Constant)}
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
