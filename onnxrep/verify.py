"""Numerical verification with ONNX Runtime: the one place its policy lives.

    ref = reference(original, VerifyOptions())        # the original's outputs on seeded inputs
    summary = check(ref, "out.onnx", options, rebuild, fired)   # or raises VerificationError

The strict comparison runs ORT with its graph optimizations disabled: its fusions (Conv+BN,
Conv+Add, ...) would otherwise run on the original too and could hide a wrong fold. Then the
optimized model runs once more at ORT's default level, as deployed. Inputs are random with a fixed
seed, in the model's real shapes and dtypes. Tolerances per dtype, the noise floor, the deployed
run and the culprit search are VerifyOptions and the functions below; the CLI, onnxrep.optimize,
onnxrep.optimize_file and the culprit search all go through check().
"""
from __future__ import annotations

import math
import os
import re
import tempfile
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from .errors import InputError, VerificationError
from .io import PROTOBUF_LIMIT, save_model
from .lean import LeanModel, payload_bytes, stub_index, without_payload

_NP = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}
_NP_DTYPES = frozenset(np.dtype(t) for t in _NP.values())

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


def _guessed_dims_hint(model: onnx.ModelProto, pinned: dict | None, feeds: dict) -> str:
    """When the run used guessed sizes for symbolic dims, say which, and how to pin the right ones.

    An exporter that bakes the traced size into the graph (torch's legacy exporter does, for slice
    assignment) writes a model with symbolic dims that only runs at that size."""
    pinned = pinned or {}
    guessed = []
    for vi in model.graph.input:
        if vi.name in feeds and vi.name not in pinned:
            dims = vi.type.tensor_type.shape.dim
            if any(not d.HasField("dim_value") for d in dims):
                shape = ",".join(str(v) for v in feeds[vi.name].shape)
                guessed.append(f"{vi.name}:{shape}")
    if not guessed:
        return ""
    return (f" (its symbolic dims were run as {' '.join(guessed)}; if the model only runs at the size it "
            "was exported with, pin that size with --input-shape)")


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
        # by dtype, not by scalar type: numpy.longlong is int64 too but a different type object
        if arr is not None and arr.dtype in _NP_DTYPES:
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


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], rtol: float, atol: float) -> list[OutputDiff]:
    """Per output: max |a−b| against atol + rtol·max|a| (integers: exact; non-finite values must match)."""
    diffs = []
    for name, ref in reference.items():
        got = candidate.get(name)
        if got is None or got.shape != ref.shape:
            diffs.append(OutputDiff(name, float("inf"), 0.0, 0.0))
            continue
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
        diffs.append(OutputDiff(name, err, scale, atol + rtol * scale))
    return diffs


# -- the policy ------------------------------------------------------------------------------------
NOISE_FACTOR = 2.0  # a strict failure passes when within this multiple of ORT's own fusion noise...
NOISE_CAP = 10.0  # ...but never beyond this multiple of the tolerance; also the deployed run's tolerance
CONSTANT_FOLDING = "constant folding"  # the culprit named when the graph prepared with no rule differs


@dataclass(frozen=True)
class VerifyOptions:
    """Every verification setting, with its one default (the CLI, optimize and optimize_file take
    theirs from here).

    rtol: relative tolerance of each output's largest magnitude; None: by the least precise float
        type the model computes in (model_rtol: 1e-5 fp32, 2e-3 fp16, 1e-9 fp64).
    atol: absolute tolerance added to it. seed: of the random inputs.
    noise_floor: where the strict check fails, measure how much ORT's own fusions move the
        original's outputs and accept up to NOISE_FACTOR times that, never more than NOISE_CAP
        times the tolerance (deep fp32 graphs carry rounding noise of their own).
    deployed: after the strict check, run the optimized model once at ORT's default optimization
        level (as it will be deployed) and compare it within NOISE_CAP times the tolerance: some
        outputs (wrong value_info dims breaking ORT's buffer reuse) fail only there.
    culprit: on failure, rebuild without each rule that fired (and with no rule at all, which
        names constant folding) to name the one responsible."""

    rtol: float | None = None
    atol: float = 0.0
    seed: int = 0
    noise_floor: bool = True
    deployed: bool = True
    culprit: bool = True


@dataclass
class Reference:
    """The original model's outputs on the verification inputs, and what produced them."""

    original: object  # the input file's path, or the LeanModel (ORT fed its weights as arrays)
    feeds: dict
    outputs: dict
    rtol: float
    weights: dict | None = None  # arrays read out of a LeanModel for the run (the rules may reuse them)
    _noise: dict | None = None

    def noise(self) -> dict | None:
        """Per output, how far ORT's own fusions move the original's outputs (None: ORT could not
        say); measured once."""
        if self._noise is None:
            try:
                fused = _outputs(self.original, self.feeds, optimize=True)
            except Exception:  # no second opinion: the strict verdict stands
                return None
            self._noise = {d.name: d.max_abs for d in compare(self.outputs, fused, 0.0, 0.0)}
        return self._noise


def reference(original: LeanModel, options: VerifyOptions, pinned: dict | None = None,
              path: str | os.PathLike | None = None) -> Reference:
    """Run the original once: `original` gives the input shapes and dtypes (pinned overrides symbolic
    dims) and, without `path`, the weights (fed to ORT as arrays, kept in Reference.weights); with
    `path`, ORT loads that file. InputError when ORT cannot run it."""
    feeds = random_inputs(input_specs(original.proto, pinned), options.seed)
    weights = None
    try:
        if path is not None:
            outputs = run_file(path, feeds)
        else:
            light, weights = split_lean(original)
            outputs = run(light, feeds, weights)
    except Exception as e:
        raise InputError(f"ONNX Runtime cannot run the input model: {_first_line(e)}"
                         f"{_guessed_dims_hint(original.proto, pinned, feeds)}") from e
    rtol = options.rtol if options.rtol is not None else model_rtol(original.proto)
    return Reference(path if path is not None else original, feeds, outputs, rtol, weights)


def check(ref: Reference, candidate, options: VerifyOptions, rebuild=None, fired=()) -> dict:
    """The verification: `candidate` (a model file's path, a LeanModel or a ModelProto) against
    `ref`, strictly (ORT optimizations off), widened to the noise floor where that fails, then as
    deployed (ORT's default level). Returns the summary for the report; raises VerificationError
    with the reason and, given rebuild(without) → a candidate without rule `without` (None: without
    any rule) and the names of the rules that `fired`, the culprit."""
    shapes = {k: list(v.shape) for k, v in ref.feeds.items()}
    summary = {"ok": False, "max_rel_error": None, "outputs": [], "input_shapes": shapes, "noise_floor": None,
               "deployed": None}
    try:
        got = _outputs(candidate, ref.feeds)
    except Exception as e:
        return _fail(ref, f"ONNX Runtime cannot run the optimized model: {_first_line(e)}", None, options, rebuild, fired)
    result = VerifyResult(compare(ref.outputs, got, ref.rtol, options.atol), shapes)
    del got
    if not result.ok and options.noise_floor:
        _widen_to_noise_floor(result, ref.noise())
    summary.update(ok=result.ok, max_rel_error=result.max_rel, noise_floor=result.noise_floor,
                   outputs=[{"name": o.name, "max_abs": o.max_abs, "scale": o.scale, "tolerance": o.tolerance}
                            for o in result.outputs])
    if not result.ok:
        worst = max(result.outputs, key=lambda o: o.rel)
        return _fail(ref, f"output '{worst.name}' differs by {worst.max_abs:.3g} (relative {worst.rel:.3g}, "
                          f"tolerance {worst.tolerance:.3g})", worst.rel, options, rebuild, fired)
    if options.deployed:
        try:
            deployed = _outputs(candidate, ref.feeds, optimize=True)
        except Exception as e:
            reason = _first_line(e)
            if _fails_deployed(ref.original, ref.feeds):  # not onnxrep's doing: say so, do not refuse
                summary["deployed"] = {"ok": False, "max_rel_error": None,
                                       "note": f"the input fails at ORT's default level too: {reason}"}
                return summary
            summary["ok"] = False
            return _fail(ref, f"ONNX Runtime at its default optimization level cannot run the optimized model: {reason}",
                         None, options, rebuild, fired)
        diffs = compare(ref.outputs, deployed, NOISE_CAP * ref.rtol, NOISE_CAP * options.atol)
        del deployed
        summary["deployed"] = {"ok": all(d.ok for d in diffs), "max_rel_error": max((d.rel for d in diffs), default=0.0)}
        bad = [d for d in diffs if not d.ok]
        if bad:
            worst = max(bad, key=lambda o: o.rel)
            summary["ok"] = False
            return _fail(ref, f"at ONNX Runtime's default optimization level, output '{worst.name}' differs by "
                              f"{worst.max_abs:.3g} (relative {worst.rel:.3g}, tolerance {worst.tolerance:.3g})",
                         worst.rel, options, rebuild, fired)
    return summary


def _fails_deployed(original, feeds) -> bool:
    try:
        _outputs(original, feeds, optimize=True)
    except Exception:
        return True
    return False


def _fail(ref, reason, max_error, options, rebuild, fired):
    culprit = find_culprit(ref, rebuild, fired, options) if options.culprit and rebuild is not None else None
    who = ""
    if culprit == CONSTANT_FOLDING:
        who = "; constant folding is responsible (the graph prepared with no rule already differs)"
    elif culprit:
        who = f"; rule '{culprit}' is responsible (passes without it)"
    raise VerificationError(f"verification failed: {reason}{who}", culprit=culprit, max_error=max_error)


def find_culprit(ref: Reference, rebuild, fired, options: VerifyOptions) -> str | None:
    """What made the candidate fail: CONSTANT_FOLDING when the graph rebuilt with no rule at all
    fails too, else the first rule that fired whose absence makes it pass, else None."""
    quiet = replace(options, culprit=False)

    def passes(without):
        try:
            check(ref, rebuild(without), quiet)
            return True
        except VerificationError:
            return False
        except Exception:  # a variant that fails to build says nothing either way
            return None

    if passes(None) is False:
        return CONSTANT_FOLDING
    return next((name for name in fired if passes(name)), None)


def _widen_to_noise_floor(result: VerifyResult, noise: dict | None) -> None:
    """Deep fp32 graphs carry rounding noise of their own: an exactly equivalent graph with its ops
    in a different order differs by more than 1e-5 of the output scale (ResNet-50: ~1.3e-5, while
    both are equally far from the float64 result). Accept up to NOISE_FACTOR times the noise of
    ORT's own fusions on the original, never more than NOISE_CAP times the tolerance."""
    if noise is None:
        return
    for diff in result.outputs:
        n = noise.get(diff.name, float("inf"))
        if diff.scale and n < float("inf"):
            diff.tolerance = max(diff.tolerance, min(NOISE_FACTOR * n, NOISE_CAP * diff.tolerance))
    result.noise_floor = noise


def _outputs(model, feeds: dict, optimize: bool = False) -> dict[str, np.ndarray]:
    """Outputs of a model file, LeanModel or ModelProto on `feeds`; optimize: at ORT's default level
    (ORT_ENABLE_ALL), from the model as a file would hold it (initializers, not fed arrays)."""
    if isinstance(model, (str, os.PathLike)):
        sess = session(model, optimize=optimize)
    elif not optimize:
        if isinstance(model, LeanModel):
            light, weights = split_lean(model)
            return run(light, feeds, weights)
        return run(model, feeds)
    else:
        sess = session(model, optimize=True)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def _first_line(e: BaseException) -> str:
    """One line for the user. ORT's run errors bury the reason after a source location and a C++
    signature: keep the op, the node and the reason."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    line = text.splitlines()[0]
    m = re.search(r"running (\S+) node\. Name:'([^']*)' Status Message: (.*)", line)
    if m:
        reason = re.sub(r"^\d+ : \w+ : ", "", m.group(3).split("[ONNXRuntimeError] : ")[-1]).strip()
        line = f"{m.group(1)} node '{m.group(2)}': {reason}"
    return line[:300]
