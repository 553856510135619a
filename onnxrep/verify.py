"""Numerical verification with ONNX Runtime, its own graph optimizations disabled.

ORT's fusions (Conv+BN, Conv+Add, ...) would otherwise run on the original graph too and could
hide a wrong fold. Inputs are random with a fixed seed, in the model's real shapes and dtypes.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import onnx

from .errors import InputError
from .io import PROTOBUF_LIMIT, save_model
from .lean import LeanModel, payload_bytes, stub_index, without_payload

_NP = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}

# a random verification input larger than this is refused rather than allocated
MAX_INPUT_BYTES = 4 << 30

# fp32 rounding is ~6e-8 per op; merged kernels reorder sums, deep nets accumulate it.
# fp16: 2e-3 is about two ulps (2^-10) at the output's largest magnitude.
DEFAULT_RTOL = {np.float32: 1e-5, np.float64: 1e-9, np.float16: 2e-3}
_FLOATS = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
           onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.BFLOAT16: np.float16}


def model_rtol(model: onnx.ModelProto) -> float:
    """The default tolerance for a model: that of the least precise float type it computes in
    (weights, inputs, outputs, intermediate types, Cast targets), so fp32 outputs of a graph that
    works in fp16 inside get the fp16 tolerance. bf16 counts as fp16 (it is coarser still; pass
    --rtol for it)."""
    g = model.graph
    types = {t.data_type for t in g.initializer}
    types |= {vi.type.tensor_type.elem_type for vi in list(g.input) + list(g.output) + list(g.value_info)
              if vi.type.HasField("tensor_type")}
    for n in g.node:
        if n.op_type in ("Cast", "CastLike"):
            types |= {a.i for a in n.attribute if a.name == "to"}
        if n.op_type == "Constant":
            types |= {a.t.data_type for a in n.attribute if a.HasField("t")}
    rtols = [DEFAULT_RTOL[_FLOATS[t]] for t in types if t in _FLOATS]
    return max(rtols, default=DEFAULT_RTOL[np.float32])


@dataclass
class OutputDiff:
    name: str
    max_abs: float
    scale: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(self.max_abs <= self.tolerance)

    @property
    def rel(self) -> float:
        return self.max_abs / self.scale if self.scale else (0.0 if self.max_abs == 0 else float("inf"))


@dataclass
class VerifyResult:
    outputs: list[OutputDiff] = field(default_factory=list)
    input_shapes: dict = field(default_factory=dict)
    noise_floor: dict | None = None  # per output: how much ORT's own fusions move it

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def max_rel(self) -> float:
        return max((o.rel for o in self.outputs), default=0.0)


def input_specs(model: onnx.ModelProto, pinned: dict | None = None) -> dict[str, tuple[tuple[int, ...], type]]:
    """Shape and numpy dtype per real graph input; symbolic dims: pinned value, else 1 for the
    first axis (batch) and 32 elsewhere."""
    pinned = pinned or {}
    inits = {t.name for t in model.graph.initializer}
    specs = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise InputError(f"input '{vi.name}' is not a tensor")
        dtype = _NP.get(tt.elem_type)
        if dtype is None:
            raise InputError(f"input '{vi.name}' has unsupported element type {onnx.TensorProto.DataType.Name(tt.elem_type)}")
        if vi.name in pinned:
            shape = tuple(pinned[vi.name])
        else:
            shape = tuple(
                d.dim_value if d.HasField("dim_value") else (1 if i == 0 else 32)
                for i, d in enumerate(tt.shape.dim)
            )
        need = math.prod(shape) * np.dtype(dtype).itemsize
        if need > MAX_INPUT_BYTES:
            raise InputError(f"input '{vi.name}' of shape {list(shape)} needs {need / (1 << 30):.1f} GiB to verify; "
                             "pin a smaller shape with --input-shape or pass --no-verify")
        specs[vi.name] = (shape, dtype)
    return specs


def random_inputs(specs, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (shape, dtype) in specs.items():
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[name] = np.zeros(shape, dtype=bool)
        else:
            feeds[name] = np.zeros(shape, dtype=dtype)
    return feeds


def session(model: "onnx.ModelProto | LeanModel | str | os.PathLike", providers=("CPUExecutionProvider",),
            optimize: bool = False, threads: int | None = None):
    """An ORT session for a model file, or for an in-memory model (written to a temp dir when it
    exceeds 2 GB, or when it is a LeanModel: its weights are streamed there, never gathered)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 4  # errors reach the user as one onnxrep line, not ORT's own log
    if threads:
        so.intra_op_num_threads = threads
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(model), so, providers=list(providers))
    if not isinstance(model, LeanModel) and payload_bytes(model) < PROTOBUF_LIMIT - (64 << 20):  # ByteSize() would serialize it all
        return ort.InferenceSession(model.SerializeToString(), so, providers=list(providers))
    with tempfile.TemporaryDirectory(prefix="onnxrep-verify-") as d:
        path = os.path.join(d, "model.onnx")
        save_model(model, path, external=True)
        return ort.InferenceSession(path, so, providers=list(providers))


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], weights: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Outputs of `model` on `feeds` in ORT, optimizations off.

    The weights go to ORT as extra graph inputs, numpy arrays it reads in place, not as serialized
    initializers: a session built from a serialized model costs several copies of the weights and
    seconds per GB (and a temp file above 2 GB); one fed its weights costs nothing. The kernels are
    the same with optimizations off. `model` may be a payload-free skeleton whose stubs `weights`
    supplies (optimizer.Rewritten); without `weights`, large initializers are read out of `model`."""
    if weights is None:
        model, weights = split_weights(model)
    else:
        model = without_payload(model, initializers_only=True)  # a copy: `model` stays as it is
    sess = session(_weights_as_inputs(model, weights))
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {**feeds, **weights})))


def run_file(path: str | os.PathLike, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of the model file `path` on `feeds` in ORT, optimizations off, as ORT loads it."""
    sess = session(path)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def split_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A payload-free copy of `model` and its large initializers as (read-only) arrays, each read
    out of the proto once."""
    return split_lean(LeanModel.wrap(model))


def split_lean(lean: LeanModel) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The skeleton of `lean` and its main-graph weights as arrays, each read once from wherever
    it is. A weight numpy cannot hold as ORT takes it (bfloat16, int4, ...) goes back into the
    skeleton as an initializer."""
    light = onnx.ModelProto()
    light.CopyFrom(lean.proto)  # a few KB: every large tensor is a stub
    weights = {}
    for t in light.graph.initializer:
        i = stub_index(t)
        if i is None:
            continue
        try:
            arr = lean.array(i)
        except (ValueError, TypeError):
            arr = None
        if arr is not None and arr.dtype.type in _NP.values():
            weights[t.name] = arr
        else:
            lean.fill(t, i)
    return light, weights


def _weights_as_inputs(light: onnx.ModelProto, weights: dict) -> onnx.ModelProto:
    """`light` (modified in place) with the initializers named in `weights` turned into graph inputs."""
    g = light.graph
    if not any(t.name in weights for t in g.initializer):
        return light
    inputs = {i.name for i in g.input}
    kept = []
    for t in g.initializer:
        if t.name not in weights:
            kept.append(onnx.TensorProto())
            kept[-1].CopyFrom(t)  # small (stubs are never kept): copy before the list is cleared
        elif t.name not in inputs:  # IR < 4 lists initializers among the inputs already
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del g.initializer[:]
    g.initializer.extend(kept)
    return light


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], rtol: float | None, atol: float) -> list[OutputDiff]:
    diffs = []
    for name, ref in reference.items():
        got = candidate.get(name)
        if got is None or got.shape != ref.shape:
            diffs.append(OutputDiff(name, float("inf"), 0.0, 0.0))
            continue
        r = rtol if rtol is not None else DEFAULT_RTOL.get(ref.dtype.type, 1e-5)
        if not np.issubdtype(ref.dtype, np.floating):
            err = float(np.max(np.abs(ref.astype(np.int64) - got.astype(np.int64)), initial=0))
            diffs.append(OutputDiff(name, err, 1.0, atol))
            continue
        a, b = ref.astype(np.float64), got.astype(np.float64)
        if not (np.all(np.isfinite(a) == np.isfinite(b)) and np.array_equal(a[~np.isfinite(a)], b[~np.isfinite(b)], equal_nan=True)):
            diffs.append(OutputDiff(name, float("inf"), 0.0, 0.0))
            continue
        fin = np.isfinite(a)
        err = float(np.max(np.abs(a[fin] - b[fin]), initial=0.0))
        scale = float(np.max(np.abs(a[fin]), initial=0.0))
        diffs.append(OutputDiff(name, err, scale, atol + r * scale))
    return diffs


def verify(original: onnx.ModelProto, optimized: onnx.ModelProto, rtol: float | None = None, atol: float = 0.0,
           pinned: dict | None = None, seed: int = 0, reference: dict | None = None, feeds: dict | None = None) -> VerifyResult:
    specs = input_specs(original, pinned)
    feeds = feeds if feeds is not None else random_inputs(specs, seed)
    ref = reference if reference is not None else run(original, feeds)
    got = run(optimized, feeds)
    return VerifyResult(compare(ref, got, rtol, atol), {k: list(v[0]) for k, v in specs.items()})
