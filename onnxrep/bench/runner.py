"""`onnxrep bench`: what a rewrite bought -- latency, agreement and accuracy, before and after.

    python -m onnxrep bench train.onnx deploy.onnx [--providers cpu,cuda] [--batch 1,8,32]
                            [--data inputs.npz --labels labels.npy] [--int8] [--json F] [--plot F.png]

Every model gets an ONNX Runtime session per execution provider, with ORT's graph optimizations at
the level users deploy with (ORT_ENABLE_ALL unless --ort-opt says otherwise). After a warm-up, the
timed runs are interleaved round-robin across the models (starting with a different model each
round), so slow drifts of the machine hit every model alike. The first model is the reference:
ratios and agreement are relative to it; --int8 rows are compared with the same model in fp32.

A provider that is not installed, has no device, or whose session silently falls back to the CPU is
reported as skipped with the reason; a static-batch model asked for another batch is skipped with
the reason. See docs/bench.md for every flag and the JSON schema.

The measuring itself happens in onnxrep.bench_worker, normally in a child process (see there why).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import math
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import onnx

from . import __version__, units
from .bench_metrics import latency_stats
from .bench_worker import OPT_LEVELS, first_line
from .errors import InputError, OutputError, UsageError
from .io import check_model, check_output_path, load_model
from .shapes import from_api, parse_specs

SCHEMA_VERSION = 1

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "qnn": "QNNExecutionProvider",
}
_SHORT = {"TensorrtExecutionProvider": "tensorrt", "DmlExecutionProvider": "dml"}
_GPU_HINT = {
    "CUDAExecutionProvider": "install onnxruntime-gpu (in place of onnxruntime) and a matching CUDA/cuDNN",
    "TensorrtExecutionProvider": "install onnxruntime-gpu (in place of onnxruntime) and TensorRT",
}

DEFAULT_WARMUP = 10
DEFAULT_RUNS = 100
DEFAULT_SAMPLES = 32
DEFAULT_EVAL_BATCH = 32
DEFAULT_CALIB_SAMPLES = 64
CALIB_METHODS = ("minmax", "entropy", "percentile")

log = logging.getLogger("onnxrep.bench")


# ================================================================================================
# CLI
# ================================================================================================
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="compare latency, agreement and accuracy of models in ONNX Runtime",
        description="Time ONNX models in ONNX Runtime (interleaved runs, median/p90/min), check that "
                    "they agree with the first model, and measure accuracy on labelled data.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL.onnx",
                   help="models to compare; the first is the reference (same input names, dtypes and ranks)")
    p.add_argument("--providers", default="cpu", metavar="LIST",
                   help="execution providers, comma-separated: cpu, cuda, tensorrt (also rocm, openvino, dml, "
                        "coreml, ... or a full ONNX Runtime name); default cpu")
    p.add_argument("--batch", default=None, metavar="B1,B2",
                   help="batch sizes to time, e.g. 1,8,32 (models with a dynamic batch axis); "
                        "default: the batch of --input-shape, else the model's static batch, else 1")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="intra-op threads (ONNX Runtime default: one per physical core)")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, metavar="N",
                   help=f"untimed runs per model before timing (default {DEFAULT_WARMUP})")
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS, metavar="N",
                   help=f"timed runs per model, provider and batch (default {DEFAULT_RUNS})")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:D1,D2,...",
                   help="shape of an input with dynamic axes, e.g. input:1,3,224,224 (repeatable, as for "
                        "optimize); its first axis is the default batch")
    p.add_argument("--data", metavar="INPUTS.npz",
                   help="inputs for agreement/accuracy (and timing): .npz with one array per input name "
                        "(a single array for a single-input model, .npy too), samples along axis 0")
    p.add_argument("--labels", metavar="LABELS.npy",
                   help="integer class labels for --data (.npy, or .npz with one array): reports top-1 accuracy")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, metavar="N",
                   help=f"random samples for agreement when there is no --data (default {DEFAULT_SAMPLES})")
    p.add_argument("--seed", type=int, default=0, help="seed for random inputs (default 0)")
    p.add_argument("--eval-batch", type=int, default=DEFAULT_EVAL_BATCH, metavar="N",
                   help=f"batch size for agreement/accuracy passes over the data (default {DEFAULT_EVAL_BATCH})")
    p.add_argument("--ort-opt", choices=tuple(OPT_LEVELS), default="all",
                   help="ONNX Runtime graph optimization level (default all, as deployed)")
    p.add_argument("--int8", action="store_true",
                   help="also quantize each model (static, QDQ, int8) and report its latency and accuracy drop")
    p.add_argument("--calib-data", metavar="CALIB.npz",
                   help="calibration inputs for --int8 (default: --data, else random inputs)")
    p.add_argument("--calib-samples", type=int, default=DEFAULT_CALIB_SAMPLES, metavar="N",
                   help=f"calibration samples for --int8 (default {DEFAULT_CALIB_SAMPLES})")
    p.add_argument("--calib-method", choices=CALIB_METHODS, default="minmax",
                   help="calibration method for --int8 (default minmax)")
    p.add_argument("--per-tensor", action="store_true",
                   help="--int8 with per-tensor weight scales (default: per-channel)")
    p.add_argument("--json", metavar="FILE.json", help="write the full results as JSON (schema in docs/bench.md)")
    p.add_argument("--plot", metavar="FILE.png", help="write a latency bar chart (needs matplotlib)")
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process (per-session thread pools, spinning off) instead of a child process")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing (use with --json/--plot)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    providers = _parse_providers(args.providers)
    batches = _parse_batches(args.batch) if args.batch is not None else None
    shapes = parse_specs(args.input_shape or [])
    if args.plot:
        _require_matplotlib()
    for out in (args.json, args.plot):
        if out:
            for m in args.models:
                check_output_path(m, out)
    progress = None if args.no_progress or args.quiet else _Progress.for_stderr()
    result = bench(
        args.models, providers=providers, batches=batches, threads=args.threads,
        warmup=args.warmup, runs=args.runs, data=args.data, labels=args.labels,
        input_shapes=shapes, samples=args.samples, seed=args.seed, eval_batch=args.eval_batch,
        ort_opt=args.ort_opt, int8=args.int8, calib_data=args.calib_data,
        calib_samples=args.calib_samples, calib_method=args.calib_method,
        per_channel=not args.per_tensor, isolate=not args.in_process, progress=progress,
    )
    if not args.quiet:
        print(format_table(result), flush=True)
    if args.json:
        write_json(result, args.json)
    if args.plot:
        write_plot(result, args.plot)
    if not args.quiet:
        for path in (args.json, args.plot):
            if path:
                print(f"wrote {path}")
    return 0


def _parse_providers(spec: str | Sequence[str]) -> list[str]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names = []
    for raw in items:
        s = raw.strip()
        if not s:
            continue
        key = s.lower()
        if key in PROVIDERS:
            names.append(key)
        elif s.endswith("ExecutionProvider"):
            short = next((k for k, v in PROVIDERS.items() if v == s), s)
            names.append(short)
        else:
            raise UsageError(f"unknown execution provider {s!r} (known: cpu, cuda, tensorrt, rocm, migraphx, "
                             "openvino, dml, coreml, xnnpack, qnn, or a full name like CUDAExecutionProvider)")
    if not names:
        raise UsageError("--providers is empty")
    return list(dict.fromkeys(names))


def _ep_name(provider: str) -> str:
    return PROVIDERS.get(provider, provider)


def _parse_batches(spec: str | Iterable[int]) -> list[int]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for raw in items:
        s = str(raw).strip()
        if not s:
            continue
        try:
            b = int(s)
        except ValueError:
            raise UsageError(f"--batch: not an integer: {s!r} (expected e.g. 1,8,32)") from None
        if b < 1:
            raise UsageError(f"--batch: batch sizes must be >= 1, got {b}")
        out.append(b)
    if not out:
        raise UsageError("--batch is empty")
    return list(dict.fromkeys(out))


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None


# ================================================================================================
# Models and their input signatures
# ================================================================================================
@dataclass
class _Input:
    name: str
    elem_type: int
    dims: list | None  # per axis: int (static), str (symbolic) or None (unknown); None = rank unknown

    @property
    def dtype(self) -> np.dtype | None:
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.elem_type))
        except Exception:
            return None

    @property
    def dtype_name(self) -> str:
        if self.dtype is not None:
            return str(self.dtype)
        return onnx.TensorProto.DataType.Name(self.elem_type).lower() if self.elem_type else "?"

    def shape_str(self) -> str:
        if self.dims is None:
            return "[?]"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.dims) + "]"


@dataclass
class _Model:
    index: int
    name: str
    path: str | None
    proto: onnx.ModelProto
    inputs: list[_Input]
    outputs: list[_Input]
    size_bytes: int
    static_batch: int | None = None
    run_path: str | None = None
    int8: dict | None = None
    int8_path: str | None = None


def _value_infos(model: onnx.ModelProto, items, label: str, skip: set) -> list[_Input]:
    out = []
    for vi in items:
        if vi.name in skip:
            continue
        if not vi.type.HasField("tensor_type"):
            raise InputError(f"{label}: {vi.name!r} is not a tensor (sequence/map inputs and outputs are not supported)")
        tt = vi.type.tensor_type
        dims = None
        if tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        out.append(_Input(vi.name, tt.elem_type, dims))
    return out


def _load(models: Sequence, names: Sequence[str] | None) -> list[_Model]:
    if not models:
        raise UsageError("bench needs at least one model")
    loaded = []
    labels = list(names) if names else []
    for i, m in enumerate(models):
        if isinstance(m, onnx.ModelProto):
            check_model(m, f"model {i}")
            proto, path, size = m, None, m.ByteSize()
            label = labels[i] if i < len(labels) else f"model{i}"
        else:
            p = Path(m)
            proto = load_model(p)
            path, size = str(p), _file_bytes(p)
            label = labels[i] if i < len(labels) else p.name
        inits = {t.name for t in proto.graph.initializer}
        ins = _value_infos(proto, proto.graph.input, label, inits)
        outs = _value_infos(proto, proto.graph.output, label, set())
        if not ins:
            raise InputError(f"{label}: the model has no inputs")
        loaded.append(_Model(i, label, path, proto, ins, outs, size))
    counts = Counter(m.name for m in loaded)
    for m in loaded:  # the same file name twice (a/model.onnx, b/model.onnx): show the path
        if counts[m.name] > 1:
            m.name = f"{m.path}" if m.path and Counter(x.path for x in loaded)[m.path] == 1 else f"{m.name}#{m.index}"
    for m in loaded:
        m.static_batch = _static_batch(m)
    return loaded


def _file_bytes(p: Path) -> int:
    size = p.stat().st_size
    data = p.with_name(p.name + ".data")
    return size + (data.stat().st_size if data.exists() else 0)


def _static_batch(m: _Model) -> int | None:
    statics = [i.dims[0] for i in m.inputs if i.dims and isinstance(i.dims[0], int)]
    return max(statics) if statics else None


def _check_signatures(models: list[_Model]) -> None:
    """Same input names, dtypes, ranks and (non-batch) static dims, or one InputError line."""
    ref = models[0]
    ref_in = {i.name: i for i in ref.inputs}
    for m in models[1:]:
        got = {i.name: i for i in m.inputs}
        if set(got) != set(ref_in):
            raise InputError(
                f"input signatures differ: {ref.name} has inputs ({', '.join(ref_in)}) "
                f"but {m.name} has ({', '.join(got)})")
        for name, a in ref_in.items():
            b = got[name]
            if a.elem_type != b.elem_type:
                raise InputError(f"input signatures differ: input {name!r} is {a.dtype_name} in {ref.name} "
                                 f"but {b.dtype_name} in {m.name}")
            if a.dims is not None and b.dims is not None:
                if len(a.dims) != len(b.dims):
                    raise InputError(f"input signatures differ: input {name!r} has rank {len(a.dims)} in {ref.name} "
                                     f"{a.shape_str()} but rank {len(b.dims)} in {m.name} {b.shape_str()}")
                for ax in range(1, len(a.dims)):
                    da, db = a.dims[ax], b.dims[ax]
                    if isinstance(da, int) and isinstance(db, int) and da != db:
                        raise InputError(f"input signatures differ: input {name!r} axis {ax} is {da} in {ref.name} "
                                         f"{a.shape_str()} but {db} in {m.name} {b.shape_str()}")


@dataclass
class _Spec:
    """The merged view of one input across all models."""

    name: str
    dtype: np.dtype
    dtype_name: str
    rank: int | None
    static: dict = field(default_factory=dict)  # axis -> static size (axes >= 1)
    symbols: dict = field(default_factory=dict)  # axis -> symbolic name


def _merged_specs(models: list[_Model]) -> list[_Spec]:
    specs = []
    for inp in models[0].inputs:
        dtype = inp.dtype
        if dtype is None or dtype.kind not in "biuf":
            raise InputError(f"input {inp.name!r} has type {inp.dtype_name}, which bench cannot generate or load")
        spec = _Spec(inp.name, dtype, inp.dtype_name, None)
        for m in models:
            d = next(i for i in m.inputs if i.name == inp.name).dims
            if d is None:
                continue
            spec.rank = len(d)
            for ax in range(1, len(d)):
                if isinstance(d[ax], int):
                    spec.static[ax] = d[ax]
                elif d[ax] and ax not in spec.symbols:
                    spec.symbols[ax] = d[ax]
        specs.append(spec)
    return specs


# ================================================================================================
# Inputs: shapes, --data, --labels, random
# ================================================================================================
def _resolve_shape_overrides(shapes: dict, specs: list[_Spec]) -> dict[str, list[int]]:
    names = [s.name for s in specs]
    out = {}
    for key, dims in (shapes or {}).items():
        if key is None:
            if len(specs) != 1:
                raise UsageError(f"--input-shape without a name needs a single-input model (inputs: {', '.join(names)})")
            key = names[0]
        if key not in names:
            raise UsageError(f"--input-shape: no input named {key!r} (inputs: {', '.join(names)})")
        spec = specs[names.index(key)]
        if spec.rank is not None and len(dims) != spec.rank:
            raise UsageError(f"--input-shape {key}: {len(dims)} dims given, the input has rank {spec.rank}")
        for ax, v in spec.static.items():
            if dims[ax] != v:
                raise UsageError(f"--input-shape {key}: axis {ax} is fixed to {v} in the model, not {dims[ax]}")
        out[key] = list(dims)
    return out


def _sample_shape(spec: _Spec, overrides: dict) -> tuple[int, ...]:
    """Shape of one input without its batch axis (axes 1..), or UsageError naming the missing dims."""
    if spec.name in overrides:
        return tuple(overrides[spec.name][1:])
    if spec.rank is None:
        raise UsageError(f"input {spec.name!r} has no shape in the model; give it with --input-shape {spec.name}:D1,D2,...")
    dims = []
    missing = []
    for ax in range(1, spec.rank):
        if ax in spec.static:
            dims.append(spec.static[ax])
        else:
            dims.append(None)
            missing.append(ax)
    if missing:
        example = ",".join(["1"] + [str(d) if d is not None else f"<{spec.symbols.get(ax, 'D' + str(ax))}>"
                                    for ax, d in zip(range(1, spec.rank), dims)])
        what = ", ".join(f"axis {ax}" + (f" ({spec.symbols[ax]!r})" if ax in spec.symbols else "") for ax in missing)
        raise UsageError(f"input {spec.name!r} has dynamic {what}: give the size with --input-shape {spec.name}:{example} "
                         "or pass --data")
    return tuple(dims)


def _load_arrays(path, what: str) -> dict[str, np.ndarray] | np.ndarray:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} file not found: {p}")
    if p.is_dir():
        raise InputError(f"{what} path is a directory: {p}")
    try:
        with open(p, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise InputError(f"cannot read {what} file {p}: {e.strerror or e}") from e
    if not (magic.startswith(b"PK") or magic == b"\x93NUMPY"):
        raise InputError(f"{what} file {p} is not a NumPy .npz or .npy file")
    try:
        obj = np.load(p, allow_pickle=False)
    except Exception as e:
        raise InputError(f"cannot read {what} file {p}: {first_line(e)}") from e
    if isinstance(obj, np.ndarray):
        return obj
    try:
        with obj:
            return {k: obj[k] for k in obj.files}
    except Exception as e:
        raise InputError(f"cannot read {what} file {p}: {first_line(e)}") from e


def _coerce(arr: np.ndarray, spec: _Spec, where: str) -> np.ndarray:
    if arr.dtype == spec.dtype:
        return arr
    kinds = {"f": "f", "i": "iu", "u": "iu", "b": "b"}
    if arr.dtype.kind in kinds.get(spec.dtype.kind, ""):  # float64 -> float32, int32 -> int64, ...
        return arr.astype(spec.dtype)
    hint = " (convert and normalize it as the model expects)" if spec.dtype.kind == "f" else ""
    raise InputError(f"{where} is {arr.dtype} but input {spec.name!r} is {spec.dtype_name}{hint}")


def _prepare_data(data, specs: list[_Spec], overrides: dict, label: str) -> tuple[dict[str, np.ndarray], int]:
    """Arrays keyed by input name, validated against the model; returns (arrays, number of samples)."""
    names = [s.name for s in specs]
    if isinstance(data, (str, os.PathLike)):
        raw = _load_arrays(data, label)
        src = str(data)
    else:
        raw, src = data, label
    if isinstance(raw, np.ndarray):
        if len(specs) != 1:
            raise InputError(f"{src} holds a single array but the model has {len(specs)} inputs "
                             f"({', '.join(names)}): use an .npz keyed by input name")
        arrays = {names[0]: raw}
    else:
        raw = dict(raw)
        if not raw:
            raise InputError(f"{src} holds no arrays")
        missing = [n for n in names if n not in raw]
        if missing:
            if len(specs) == 1 and len(raw) == 1:
                arrays = {names[0]: next(iter(raw.values()))}
            else:
                raise InputError(f"{src} has no array for input {missing[0]!r} (arrays: {', '.join(raw)}; "
                                 f"expected keys: {', '.join(names)})")
        else:
            arrays = {n: raw[n] for n in names}
    counts = {}
    for spec in specs:
        a = np.asarray(arrays[spec.name])
        where = f"{src}[{spec.name!r}]"
        if a.dtype.kind not in "biuf":
            raise InputError(f"{where} has dtype {a.dtype}, not numeric")
        a = _coerce(a, spec, where)
        if spec.rank == 0:
            if a.ndim != 0:
                raise InputError(f"{where} has shape {list(a.shape)} but input {spec.name!r} is a scalar")
            arrays[spec.name] = a
            continue
        rank = spec.rank if spec.rank is not None else (len(overrides[spec.name]) if spec.name in overrides else a.ndim)
        if a.ndim != rank:
            raise InputError(f"{where} has shape {list(a.shape)} (rank {a.ndim}) but input {spec.name!r} has rank {rank} "
                             f"(samples along axis 0)")
        for ax, v in spec.static.items():
            if a.shape[ax] != v:
                raise InputError(f"{where} has shape {list(a.shape)} but input {spec.name!r} needs {v} on axis {ax}")
        if spec.name in overrides and list(a.shape[1:]) != overrides[spec.name][1:]:
            raise UsageError(f"--input-shape {spec.name} disagrees with {where} shape {list(a.shape)}")
        if a.shape[0] == 0:
            raise InputError(f"{where} is empty (0 samples)")
        counts[spec.name] = a.shape[0]
        arrays[spec.name] = np.ascontiguousarray(a)
    if len(set(counts.values())) > 1:
        raise InputError(f"arrays in {src} have different sample counts: "
                         + ", ".join(f"{k} {v}" for k, v in counts.items()))
    n = next(iter(counts.values())) if counts else 1
    return arrays, n


def _prepare_labels(labels, n: int) -> np.ndarray:
    if isinstance(labels, (str, os.PathLike)):
        raw = _load_arrays(labels, "labels")
        src = str(labels)
    else:
        raw, src = labels, "labels"
    if isinstance(raw, dict):
        keys = [k for k in ("labels", "label", "y", "targets", "target") if k in raw]
        if len(raw) == 1:
            raw = next(iter(raw.values()))
        elif keys:
            raw = raw[keys[0]]
        else:
            raise InputError(f"{src} holds several arrays ({', '.join(raw)}); expected one, or one named 'labels'")
    y = np.asarray(raw)
    if y.dtype.kind not in "biuf":
        raise InputError(f"{src}: labels must be numeric, got {y.dtype}")
    if y.ndim == 2 and y.shape[1] > 1:  # one-hot or probabilities
        y = y.argmax(axis=1)
    elif y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise InputError(f"{src}: labels must have shape (N,) or (N, C), got {list(y.shape)}")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise InputError(f"{src}: labels must be integer class indices")
    y = y.astype(np.int64)
    if len(y) != n:
        raise InputError(f"{src} has {len(y)} labels but the data has {n} samples")
    if (y < 0).any():
        raise InputError(f"{src}: negative label {int(y.min())}")
    return y


def _random_array(dtype: np.dtype, shape, rng: np.random.Generator) -> np.ndarray:
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 10, size=shape).astype(dtype)
    return rng.random(shape) < 0.5


def _random_inputs(specs: list[_Spec], sample_shapes: dict, n: int, rng) -> dict[str, np.ndarray]:
    out = {}
    for s in specs:
        shape = () if s.rank == 0 else (n, *sample_shapes[s.name])
        out[s.name] = _random_array(s.dtype, shape, rng)
    return out


def _take(arrays: dict, n_have: int, n: int, unbatched: set) -> dict:
    """The first n samples (cycling when there are fewer)."""
    if n <= n_have:
        return {k: a if k in unbatched else a[:n] for k, a in arrays.items()}
    idx = np.arange(n) % n_have
    return {k: a if k in unbatched else np.ascontiguousarray(np.take(a, idx, axis=0)) for k, a in arrays.items()}


# ================================================================================================
# int8
# ================================================================================================
class _Reader:
    """onnxruntime.quantization CalibrationDataReader over in-memory arrays."""

    def __init__(self, arrays: dict, n: int, chunk: int, unbatched: set, pad: bool):
        self.arrays, self.n, self.chunk, self.unbatched, self.pad = arrays, n, chunk, unbatched, pad
        self.pos = 0

    def get_next(self):
        if self.pos >= self.n:
            return None
        m = min(self.chunk, self.n - self.pos)
        feeds = {}
        for k, a in self.arrays.items():
            if k in self.unbatched:
                feeds[k] = a
                continue
            piece = a[self.pos:self.pos + m]
            if m < self.chunk and self.pad:  # static batch: pad the last piece
                piece = np.concatenate([piece, np.repeat(piece[-1:], self.chunk - m, axis=0)])
            feeds[k] = piece
        self.pos += m
        return feeds

    def rewind(self):
        self.pos = 0


@contextlib.contextmanager
def _quiet_quantizer():
    """onnxruntime.quantization logs warnings on the root logger and ORT's C++ log: keep them out of the table."""
    import onnxruntime as ort

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    ort.set_default_logger_severity(3)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            yield
    finally:
        logging.disable(previous)
        ort.set_default_logger_severity(2)


def _quantize(m: _Model, src: str, tmp: Path, calib: dict, n: int, chunk: int, unbatched: set,
              per_channel: bool, method: str) -> tuple[str | None, dict]:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_Reader, CalibrationDataReader):
        pass

    t0 = time.perf_counter()
    info: dict = {"status": "ok", "reason": None}
    pre = tmp / f"m{m.index}.pre.onnx"
    out = tmp / f"m{m.index}.int8.onnx"
    big = m.size_bytes > (1 << 30)
    try:
        with _quiet_quantizer():
            try:
                quant_pre_process(src, str(pre), save_as_external_data=big)
            except Exception:  # symbolic shape inference gives up on some graphs; ONNX shape inference alone
                quant_pre_process(src, str(pre), skip_symbolic_shape=True, save_as_external_data=big)
            quantize_static(
                str(pre), str(out), Reader(calib, n, chunk, unbatched, pad=m.static_batch is not None),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                per_channel=per_channel, use_external_data_format=big,
                calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                  "percentile": CalibrationMethod.Percentile}[method],
            )
    except Exception as e:
        info.update(status="skipped", reason=f"quantization failed: {first_line(e)}")
        return None, info
    info["seconds"] = round(time.perf_counter() - t0, 3)
    qm = onnx.load(str(out), load_external_data=False)
    info["nodes"] = len(qm.graph.node)
    info["size_bytes"] = _file_bytes(out)
    info["op_counts"] = dict(Counter(n.op_type for n in qm.graph.node).most_common())
    return str(out), info


# ================================================================================================
# The API
# ================================================================================================
def bench(
    models: Sequence[str | os.PathLike | onnx.ModelProto],
    providers: Sequence[str] | str = ("cpu",),
    batches: Sequence[int] | str | None = None,
    threads: int | None = None,
    warmup: int = DEFAULT_WARMUP,
    runs: int = DEFAULT_RUNS,
    data: str | os.PathLike | dict | np.ndarray | None = None,
    labels: str | os.PathLike | np.ndarray | None = None,
    int8: bool = False,
    input_shapes: dict | Sequence[str] | None = None,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    eval_batch: int = DEFAULT_EVAL_BATCH,
    ort_opt: str = "all",
    calib_data: str | os.PathLike | dict | np.ndarray | None = None,
    calib_samples: int = DEFAULT_CALIB_SAMPLES,
    calib_method: str = "minmax",
    per_channel: bool = True,
    isolate: bool = True,
    names: Sequence[str] | None = None,
    progress: Any = None,
) -> dict:
    """Benchmark `models` (paths or ModelProtos); return the result dict (the --json document).

    batches=None: the batch of `input_shapes`, else the models' static batch, else 1.
    input_shapes: {'x': [1, 3, 224, 224]} or ['x:1,3,224,224'].
    isolate: measure in a child process with one shared thread pool (see onnxrep.bench_worker);
    False measures in this process with per-session pools, spinning off.
    progress: an object with update(done, total, label) and close(), or None.
    Raises UsageError / InputError / OutputError with one-line messages.
    """
    started = time.perf_counter()
    if isinstance(models, (str, os.PathLike, onnx.ModelProto)):
        models = [models]
    providers = _parse_providers(providers)
    if isinstance(input_shapes, dict):
        shapes = from_api(input_shapes)
    else:
        shapes = parse_specs(input_shapes or [])
    for flag, v, lo in (("runs", runs, 1), ("warmup", warmup, 0), ("samples", samples, 1),
                        ("eval-batch", eval_batch, 1), ("calib-samples", calib_samples, 1)):
        if not isinstance(v, (int, np.integer)) or v < lo:
            raise UsageError(f"--{flag} must be an integer >= {lo}, got {v!r}")
    if threads is not None and (not isinstance(threads, (int, np.integer)) or threads < 1):
        raise UsageError(f"--threads must be an integer >= 1, got {threads!r}")
    if ort_opt not in OPT_LEVELS:
        raise UsageError(f"--ort-opt must be one of {', '.join(OPT_LEVELS)}, got {ort_opt!r}")
    if calib_method not in CALIB_METHODS:
        raise UsageError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}, got {calib_method!r}")
    if labels is not None and data is None:
        raise UsageError("--labels needs --data (accuracy is measured on the given inputs)")
    if calib_data is not None and not int8:
        raise UsageError("--calib-data is only used with --int8")

    loaded = _load(models, names)
    _check_signatures(loaded)
    specs = _merged_specs(loaded)
    overrides = _resolve_shape_overrides(shapes, specs)
    unbatched = {s.name for s in specs if s.rank == 0}

    # -- evaluation inputs
    notes: list[str] = []
    if data is not None:
        eval_inputs, n_eval = _prepare_data(data, specs, overrides, "data")
        sample_shapes = {s.name: tuple(eval_inputs[s.name].shape[1:]) for s in specs if s.rank != 0}
        source = "data"
    else:
        sample_shapes = {s.name: _sample_shape(s, overrides) for s in specs if s.rank != 0}
        n_eval = samples
        eval_inputs = _random_inputs(specs, sample_shapes, n_eval, np.random.default_rng(seed))
        source = "random"
    y = _prepare_labels(labels, n_eval) if labels is not None else None

    # -- batches
    if batches is None:
        dyn0 = [overrides[s.name][0] for s in specs if s.name in overrides and s.rank]
        statics = {m.static_batch for m in loaded if m.static_batch is not None}
        if dyn0:
            batches = [dyn0[0]]
        elif statics and len(statics) == 1 and all(m.static_batch is not None for m in loaded):
            batches = [statics.pop()]
        else:
            batches = [1]
    else:
        batches = _parse_batches(batches)
    if all(s.rank == 0 for s in specs) and batches != [1]:
        raise UsageError("the model has only scalar inputs: there is no batch axis to vary")

    # -- variants: each model in fp32, and int8 if asked
    with tempfile.TemporaryDirectory(prefix="onnxrep-bench-") as tmpdir:
        tmp = Path(tmpdir)
        for m in loaded:
            if m.path is None:
                m.run_path = str(tmp / f"m{m.index}.onnx")
                _save_for_ort(m.proto, m.run_path)
            else:
                m.run_path = m.path
        calib_source = None
        if int8:
            if calib_data is not None:
                calib, n_calib = _prepare_data(calib_data, specs, overrides, "calib-data")
                calib_source = "calib-data"
            elif data is not None:
                calib, n_calib = eval_inputs, n_eval
                calib_source = "data"
            else:
                n_calib = calib_samples
                calib = _random_inputs(specs, sample_shapes, n_calib, np.random.default_rng([seed, 7]))
                calib_source = "random"
                notes.append("int8 calibrated on random inputs: its accuracy is indicative only, calibrate with --data")
            n_calib = min(n_calib, calib_samples)
            calib = _take(calib, n_calib, n_calib, unbatched)
            if calib_source == "data":
                notes.append(f"int8 calibrated on the first {n_calib} samples of --data, which are also evaluated "
                             "(use --calib-data for a separate calibration set)")
            for m in loaded:
                _progress(progress, m.index, len(loaded), f"quantizing {m.name}")
                chunk = m.static_batch or min(eval_batch, n_calib)
                m.int8_path, m.int8 = _quantize(m, m.run_path, tmp, calib, n_calib, chunk, unbatched,
                                                per_channel, calib_method)

        variants = _variants(loaded)
        timing_plan = _timing_plan(loaded, variants, specs, batches, eval_inputs if data is not None else None,
                                   n_eval, sample_shapes, seed, unbatched)

        # -- one provider at a time
        available = _available_providers()
        provider_results = []
        try:
            provider_results = _run_providers(providers, available, variants, timing_plan, eval_inputs, n_eval,
                                              eval_batch, y, unbatched, ort_opt, threads, warmup, runs, tmp,
                                              isolate, progress, notes)
        finally:
            _progress_close(progress)

    result = _assemble(loaded, variants, specs, sample_shapes, provider_results, timing_plan, dict(
        providers=providers, batches=batches, threads=threads, warmup=int(warmup), runs=int(runs), ort_opt=ort_opt,
        seed=seed, samples=samples, eval_batch=eval_batch, input_shapes=overrides, isolate=isolate, int8=int8,
        per_channel=per_channel, calib_method=calib_method, calib_samples=calib_samples, calib_source=calib_source,
        data=data, labels=labels, source=source, n_eval=n_eval, calib_data=calib_data,
    ), notes)
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def _run_providers(providers, available, variants, timing_plan, eval_inputs, n_eval, eval_batch, y, unbatched,
                   ort_opt, threads, warmup, runs, tmp, isolate, progress, notes) -> list:
    provider_results = []
    for prov in providers:
        ep = _ep_name(prov)
        entry = {"name": prov, "ep": ep, "status": "ok", "reason": None, "session_providers": None,
                 "thread_pool": None}
        if ep not in available:
            entry.update(status="skipped", reason=_unavailable_reason(ep, available))
            provider_results.append((entry, None))
            continue
        chain = [ep]
        if ep == "TensorrtExecutionProvider" and "CUDAExecutionProvider" in available:
            chain.append("CUDAExecutionProvider")  # what TensorRT cannot take runs on CUDA, as deployed
        req = {
            "provider": prov, "ep": ep, "ep_chain": chain, "ort_opt": ort_opt, "threads": threads,
            "warmup": int(warmup), "runs": int(runs),
            "variants": [
                {"key": v["key"], "label": v["label"], "path": v["path"], "static_batch": v["static_batch"],
                 "reference": v["reference"], "required": ep == "CPUExecutionProvider" and v["precision"] == "fp32"}
                for v in variants if v["path"]],
            "eval": {"inputs": eval_inputs, "num": n_eval, "chunk": eval_batch, "labels": y,
                     "unbatched": sorted(unbatched)},
            "timing": [{"batch": t["batch"], "feeds": t["feeds"], "variants": t["variants"]} for t in timing_plan],
        }
        res = _dispatch(req, tmp, isolate, progress)
        if "fatal" in res:  # a Python exception in the worker: a bug, not a property of the provider
            log.debug("benchmark worker traceback:\n%s", res.get("traceback", ""))
            raise RuntimeError(f"benchmark worker failed on {ep}: {res['fatal']}")
        if "crashed" in res:  # the process died (an execution provider crashed it)
            entry.update(status="skipped", reason=res["crashed"])
            provider_results.append((entry, None))
            continue
        for v in variants:
            st = res["variants"].get(v["key"])
            if st and st["status"] == "error":
                raise InputError(f"onnxruntime cannot run {v['label']}: {st['reason']}")
        entry["session_providers"] = res.get("session_providers")
        entry["thread_pool"] = res.get("thread_pool")
        for note in res.get("notes", []):
            if note not in notes:
                notes.append(note)
        provider_results.append((entry, res))
    return provider_results


def _save_for_ort(proto: onnx.ModelProto, path: str) -> None:
    from .io import save_model

    save_model(proto, path)


def _variants(loaded: list[_Model]) -> list[dict]:
    out = []
    for m in loaded:
        out.append({"key": f"m{m.index}", "model": m.index, "label": m.name, "precision": "fp32",
                    "path": m.run_path, "static_batch": m.static_batch,
                    "reference": None if m.index == 0 else "m0"})
    for m in loaded:
        if m.int8 is not None:
            out.append({"key": f"m{m.index}.int8", "model": m.index, "label": f"{m.name} int8", "precision": "int8",
                        "path": m.int8_path, "static_batch": m.static_batch, "reference": f"m{m.index}",
                        "reason": m.int8.get("reason")})
    return out


def _timing_plan(loaded, variants, specs, batches, data_inputs, n_data, sample_shapes, seed, unbatched) -> list[dict]:
    plan = []
    by_model = {m.index: m for m in loaded}
    for b in batches:
        if data_inputs is not None:
            feeds = _take(data_inputs, n_data, b, unbatched)
        else:
            feeds = _random_inputs(specs, sample_shapes, b, np.random.default_rng([seed, 1, b]))
        runnable, skipped = [], {}
        for v in variants:
            m = by_model[v["model"]]
            if not v["path"]:
                skipped[v["key"]] = v.get("reason") or "not available"
            elif m.static_batch is not None and m.static_batch != b:
                inp = next(i for i in m.inputs if i.dims and isinstance(i.dims[0], int))
                skipped[v["key"]] = (f"static batch {m.static_batch} (input {inp.name!r} has shape {inp.shape_str()}); "
                                     f"re-export with a dynamic batch axis to time batch {b}")
            else:
                runnable.append(v["key"])
        plan.append({"batch": b, "feeds": feeds, "variants": runnable, "skipped": skipped})
    return plan


def _available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def _unavailable_reason(ep: str, available: list[str]) -> str:
    import onnxruntime as ort

    have = ", ".join(a.replace("ExecutionProvider", "") for a in available) or "none"
    hint = _GPU_HINT.get(ep)
    return (f"{ep} is not available in this onnxruntime {ort.__version__} build (available: {have})"
            + (f"; {hint}" if hint else ""))


def _dispatch(req: dict, tmp: Path, isolate: bool, progress) -> dict:
    def cb(done, total, label):
        if progress is not None:
            progress.update(done, total, label)

    if not isolate or not sys.executable:  # no interpreter to start (embedded Python): measure here
        from .bench_worker import execute

        return execute(req, cb, shared_pool=False)

    tag = req["provider"]
    req_path, res_path, err_path = tmp / f"req-{tag}.pkl", tmp / f"res-{tag}.pkl", tmp / f"worker-{tag}.log"
    with open(req_path, "wb") as f:
        pickle.dump(req, f, protocol=pickle.HIGHEST_PROTOCOL)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(err_path, "w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "onnxrep.bench_worker", str(req_path), str(res_path)],
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True, env=env,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("@progress "):
                    parts = line.rstrip("\n").split(" ", 3)
                    try:
                        cb(int(parts[1]), int(parts[2]), parts[3] if len(parts) > 3 else "")
                    except (ValueError, IndexError):
                        pass
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if res_path.exists():
            with open(res_path, "rb") as f:
                return pickle.load(f)
        err.seek(0)
        tail = [ln.strip() for ln in err.read().splitlines() if ln.strip()][-3:]
    how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
    return {"crashed": f"the benchmark process for {req['ep']} died ({how})" + (": " + " | ".join(tail) if tail else "")}


# ================================================================================================
# The result document
# ================================================================================================
def _assemble(loaded, variants, specs, sample_shapes, provider_results, plan, s: dict, notes: list[str]) -> dict:
    import onnxruntime as ort

    models = []
    for m in loaded:
        models.append({
            "index": m.index,
            "name": m.name,
            "path": m.path,
            "size_bytes": m.size_bytes,
            "nodes": len(m.proto.graph.node),
            "params": _param_count(m.proto),
            "op_counts": dict(Counter(n.op_type for n in m.proto.graph.node).most_common()),
            "opset": next((o.version for o in m.proto.opset_import if o.domain in ("", "ai.onnx")), None),
            "static_batch": m.static_batch,
            "inputs": [{"name": i.name, "dtype": i.dtype_name, "shape": i.dims} for i in m.inputs],
            "outputs": [{"name": o.name, "dtype": o.dtype_name, "shape": o.dims} for o in m.outputs],
            "int8": m.int8,
        })
    latency, quality, prov_entries = [], [], []
    for entry, res in provider_results:
        prov_entries.append(entry)
        prov = entry["name"]
        for t in plan:
            b = t["batch"]
            rows = {}
            for v in variants:
                row = {"provider": prov, "batch": b, "model": v["model"], "model_name": loaded[v["model"]].name,
                       "precision": v["precision"], "status": "ok", "reason": None}
                if res is None:
                    row.update(status="skipped", reason=entry["reason"])
                elif v["key"] in t["skipped"]:
                    row.update(status="skipped", reason=t["skipped"][v["key"]])
                elif v["key"] in res["timing_skipped"].get(b, {}):
                    row.update(status="skipped", reason=res["timing_skipped"][b][v["key"]])
                elif v["key"] in res["timing"].get(b, {}):
                    row.update(latency_stats(res["timing"][b][v["key"]], b))
                else:
                    st = res["variants"].get(v["key"], {})
                    row.update(status="skipped", reason=st.get("reason") or "not run")
                rows[v["key"]] = row
            first = rows.get("m0")
            for v in variants:
                row = rows[v["key"]]
                base = first.get("median_ms") if first and first["status"] == "ok" else None
                own = rows.get(f"m{v['model']}")
                fp32 = own.get("median_ms") if own and own["status"] == "ok" else None
                med = row.get("median_ms")
                row["ratio_to_first"] = med / base if (med and base) else None
                row["speedup_vs_first"] = base / med if (med and base) else None
                row["speedup_vs_fp32"] = (fp32 / med if (med and fp32) else None) if v["precision"] == "int8" else None
                for k in ("runs", "median_ms", "p90_ms", "min_ms", "mean_ms", "std_ms", "throughput_per_s"):
                    row.setdefault(k, None)
                latency.append(row)
        qrows = {}
        for v in variants:
            ref = None
            if v["reference"] is not None:
                rv = next(x for x in variants if x["key"] == v["reference"])
                ref = {"model": rv["model"], "precision": rv["precision"]}
            row = {"provider": prov, "model": v["model"], "model_name": loaded[v["model"]].name,
                   "precision": v["precision"], "status": "ok", "reason": None, "reference": ref,
                   "num_samples": s["n_eval"], "agreement": None, "agreement_reason": None,
                   "accuracy": None, "accuracy_output": None, "accuracy_reason": None, "accuracy_drop": None}
            st = res["variants"].get(v["key"]) if res is not None else None
            if res is None:
                row.update(status="skipped", reason=entry["reason"])
            elif not v["path"]:
                row.update(status="skipped", reason=v.get("reason") or "not available")
            elif st is None or st["status"] != "ok":
                row.update(status="skipped", reason=(st or {}).get("reason") or "not run")
            else:
                q = res["quality"].get(v["key"], {})
                for k in ("agreement", "agreement_reason", "accuracy", "accuracy_output", "accuracy_reason"):
                    if k in q:
                        row[k] = q[k]
                if ref is None:
                    row["agreement_reason"] = "reference model"
                if s["labels"] is None:
                    row["accuracy_reason"] = "no --labels"
            qrows[v["key"]] = row
        for v in variants:
            row = qrows[v["key"]]
            ref_row = qrows.get(v["reference"]) if v["reference"] else None
            if ref_row and row["accuracy"] is not None and ref_row["accuracy"] is not None:
                row["accuracy_drop"] = ref_row["accuracy"] - row["accuracy"]
            quality.append(row)

    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "onnxrep bench", "version": __version__},
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "onnxruntime": ort.__version__,
            "onnx": onnx.__version__,
            "numpy": np.__version__,
            "available_providers": _available_providers(),
        },
        "settings": {
            "providers": s["providers"],
            "batches": s["batches"],
            "threads": s["threads"],
            "warmup": s["warmup"],
            "runs": s["runs"],
            "interleaved": True,
            "isolated": s["isolate"],
            "ort_opt": s["ort_opt"],
            "seed": s["seed"],
            "samples": s["samples"],
            "eval_batch": s["eval_batch"],
            "input_shapes": s["input_shapes"],
            "int8": {
                "format": "QDQ", "activations": "int8", "weights": "int8",
                "per_channel": s["per_channel"], "calibration_method": s["calib_method"],
                "calibration_samples": s["calib_samples"], "calibration_source": s["calib_source"],
                "calibration_data": _pathish(s["calib_data"]),
            } if s["int8"] else None,
        },
        "inputs": {
            "source": s["source"],
            "data": _pathish(s["data"]),
            "labels": _pathish(s["labels"]),
            "num_samples": s["n_eval"],
            "specs": [{"name": sp.name, "dtype": sp.dtype_name,
                       "sample_shape": list(sample_shapes.get(sp.name, ()))} for sp in specs],
        },
        "models": models,
        "providers": prov_entries,
        "latency": latency,
        "quality": quality,
        "notes": notes,
    }


def _pathish(v):
    if v is None:
        return None
    if isinstance(v, (str, os.PathLike)):
        return str(v)
    return "<array>"


def _param_count(proto: onnx.ModelProto) -> int:
    total = 0
    for t in proto.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        total += n
    return total


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ================================================================================================
# Output: table, JSON, plot
# ================================================================================================
def _fmt(v, spec: str, none: str = "-") -> str:
    if v is None:
        return none
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


def _fmt_ms(v) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.3f}"
    return f"{v:.4f}"


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def format_table(result: dict) -> str:
    """The human-readable report of a bench() result."""
    s, env = result["settings"], result["environment"]
    out = []
    threads = s["threads"] if s["threads"] else "default"
    out.append(f"onnxrep bench {result['tool']['version']}: onnxruntime {env['onnxruntime']}, {env['cpu']} "
               f"({env['cpu_count']} cpus), graph optimizations: {s['ort_opt']}, threads: {threads}")
    src = result["inputs"]
    what = f"{src['num_samples']} samples of {src['data']}" if src["source"] == "data" else \
        f"{src['num_samples']} random samples (seed {s['seed']})"
    out.append(f"timing: {s['warmup']} warm-up + {s['runs']} timed runs per model, interleaved round-robin; "
               f"agreement on {what}")
    out.append("")
    rows = []
    for m in result["models"]:
        rows.append([str(m["index"]), m["name"], str(m["nodes"]), units.count(m["params"]), units.nbytes(m["size_bytes"]),
                     "dynamic" if m["static_batch"] is None else str(m["static_batch"])])
        if m["int8"] is not None:
            i8 = m["int8"]
            if i8["status"] == "ok":
                rows.append(["", "  int8 (QDQ)", str(i8["nodes"]), "", units.nbytes(i8["size_bytes"]), ""])
            else:
                rows.append(["", "  int8", "", "", "", ""])
    out += _table(["#", "model", "nodes", "params", "size", "batch"], rows, {0, 2, 3, 4})
    out.append("")

    int8 = s["int8"] is not None
    ok_prov = [p["name"] for p in result["providers"] if p["status"] == "ok"]
    rows = []
    skipped_rows = []
    skipped_variants = set()
    for r in result["latency"]:
        if r["provider"] not in ok_prov:
            continue
        name = r["model_name"]
        if r["status"] != "ok":
            skipped_rows.append(f"{r['provider']} batch {r['batch']} {name} {r['precision']}: {r['reason']}")
            skipped_variants.add((r["provider"], r["model"], r["precision"]))
            continue
        row = [r["provider"], str(r["batch"]), name, r["precision"], _fmt_ms(r["median_ms"]), _fmt_ms(r["p90_ms"]),
               _fmt_ms(r["min_ms"]), _fmt(r["throughput_per_s"], ".1f"),
               _fmt(r["speedup_vs_first"], ".2f") + ("x" if r["speedup_vs_first"] is not None else "")]
        if int8:
            row.append(_fmt(r["speedup_vs_fp32"], ".2f") + ("x" if r["speedup_vs_fp32"] is not None else ""))
        rows.append(row)
    headers = ["provider", "batch", "model", "prec", "median ms", "p90 ms", "min ms", "samples/s", "speedup"]
    if int8:
        headers.append("vs fp32")
    if rows:
        out.append("latency (speedup: median of the first model / median of this one)")
        out += _table(headers, rows, {1, 4, 5, 6, 7, 8, 9})
        noisy = [r for r in result["latency"] if r["status"] == "ok" and r["p90_ms"] and r["median_ms"]
                 and r["p90_ms"] > 1.5 * r["median_ms"]]
        if noisy:
            out.append("note: p90 > 1.5x median on some rows: the machine was noisy; more --runs or fewer --threads may help")
        out.append("")

    rows = []
    has_acc = result["inputs"]["labels"] is not None
    for q in result["quality"]:
        if q["provider"] not in ok_prov:
            continue
        name = q["model_name"]
        if q["status"] != "ok":
            continue
        ref = q["reference"]
        if ref is None:
            vs = "(reference)"
        else:
            vs = f"{result['models'][ref['model']]['name']} {ref['precision']}"
        a = q["agreement"] or {}
        row = [q["provider"], name, q["precision"], vs, _fmt(a.get("max_abs_err"), ".2e"), _fmt(a.get("rel_err"), ".2e"),
               _fmt(a.get("cosine_min"), ".6f"),
               _fmt(a.get("top1_agreement") * 100 if a.get("top1_agreement") is not None else None, ".2f")
               + ("%" if a.get("top1_agreement") is not None else "")]
        if ref is not None and q["agreement"] is None and q["agreement_reason"]:
            row[4] = f"({q['agreement_reason']})"
        if has_acc:
            acc = q["accuracy"]
            cell = _fmt(acc * 100 if acc is not None else None, ".2f") + ("%" if acc is not None else "")
            if q["accuracy_drop"] is not None:
                delta = -q["accuracy_drop"] * 100
                cell += f" ({0.0 if abs(delta) < 0.005 else delta:+.2f} pt)"
            row.append(cell)
        rows.append(row)
    if rows and (has_acc or any(q["reference"] is not None and q["status"] == "ok" for q in result["quality"])):
        headers = ["provider", "model", "prec", "compared with", "max abs err", "rel err", "cos min", "top-1 agree"]
        if has_acc:
            headers.append("accuracy")
        out.append("agreement (rel err = max abs err / max |reference|; cos min = worst per-sample cosine)")
        out += _table(headers, rows, {4, 5, 6, 7, 8})
        out.append("")

    skipped = [f"{p['name']}: {p['reason']}" for p in result["providers"] if p["status"] != "ok"]
    skipped += skipped_rows
    skipped += [f"{q['provider']} {q['model_name']} {q['precision']}: {q['reason']}"
                for q in result["quality"] if q["status"] != "ok" and q["provider"] in ok_prov
                and (q["provider"], q["model"], q["precision"]) not in skipped_variants]
    if skipped:
        out.append("skipped")
        out += [f"  {line}" for line in dict.fromkeys(skipped)]
    for n in result["notes"]:
        out.append(f"note: {n}")
    return "\n".join(out).rstrip()


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


def _atomic_write(path, write) -> None:
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".onnxrep-", suffix=target.suffix, dir=parent)
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        raise OutputError(f"cannot write {target}: {e.strerror or e}") from e


def write_json(result: dict, path) -> None:
    check_output_path(None, path)
    text = json.dumps(_json_safe(result), indent=2, allow_nan=False)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text + "\n")

    _atomic_write(path, write)


def write_plot(result: dict, path) -> None:
    """Median latency bars per model, one panel per provider and batch; whiskers min..p90; speedup on top."""
    check_output_path(None, path)
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    groups: dict = {}
    for r in result["latency"]:
        groups.setdefault((r["provider"], r["batch"]), []).append(r)
    panels = [(k, rows) for k, rows in groups.items() if any(r["status"] == "ok" for r in rows)]
    if not panels:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.axis("off")
        ax.text(0.5, 0.5, "no latency measured\n(every provider or batch was skipped)", ha="center", va="center")
    else:
        n = len(panels)
        fig, axes = plt.subplots(1, n, figsize=(max(4.5, 1.2 + 1.1 * max(len(r) for _, r in panels)) * n, 4.2), squeeze=False)
        colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3"])
        for ax, ((prov, b), rows) in zip(axes[0], panels):
            labels, med, lo, hi, col, notes = [], [], [], [], [], []
            for r in rows:
                labels.append(f"{r['model_name']}\n{r['precision']}")
                ok = r["status"] == "ok"
                med.append(r["median_ms"] if ok else 0.0)
                lo.append((r["median_ms"] - r["min_ms"]) if ok else 0.0)
                hi.append((r["p90_ms"] - r["median_ms"]) if ok else 0.0)
                col.append(colors[r["model"] % len(colors)])
                if not ok:
                    notes.append("skipped")
                elif r["speedup_vs_first"] is not None:
                    notes.append(f"{r['speedup_vs_first']:.2f}x")
                else:
                    notes.append("")
            x = np.arange(len(rows))
            bars = ax.bar(x, med, color=col, yerr=[lo, hi], capsize=4, error_kw={"elinewidth": 1})
            for r, bar in zip(rows, bars):
                if r["precision"] == "int8":
                    bar.set_hatch("//")
            top = max([m + h for m, h in zip(med, hi)] + [1e-9])
            for xi, m, h, t in zip(x, med, hi, notes):
                ax.text(xi, m + h + top * 0.02, t, ha="center", va="bottom", fontsize=9)
            ax.set_ylim(0, top * 1.15)
            ax.set_xticks(x)
            ax.set_xticklabels(labels, fontsize=8)
            ax.set_ylabel("median latency (ms)")
            ax.set_title(f"{prov}, batch {b}")
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle("onnxrep bench: median latency, whiskers min..p90, label = speedup vs the first model", fontsize=10)
        fig.tight_layout()

    def write(tmp):
        fig.savefig(tmp, format="png", dpi=120)

    try:
        _atomic_write(path, write)
    finally:
        plt.close(fig)


# ================================================================================================
# Progress bar (stderr, only on a terminal)
# ================================================================================================
class _Progress:
    """A one-line progress bar on stderr; does nothing unless stderr is a terminal."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.width = 0

    @classmethod
    def for_stderr(cls):
        try:
            return cls() if sys.stderr.isatty() else None
        except (AttributeError, ValueError):
            return None

    def update(self, done: int, total: int, label: str = "") -> None:
        frac = min(max(done / total if total else 1.0, 0.0), 1.0)
        n = 24
        fill = int(frac * n)
        text = f"\r[{'#' * fill}{'.' * (n - fill)}] {frac * 100:3.0f}% {label}"[:100]
        pad = max(0, self.width - len(text))
        self.width = len(text)
        self.stream.write(text + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        if self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


def _progress(progress, done, total, label) -> None:
    if progress is not None:
        progress.update(done, total, label)


def _progress_close(progress) -> None:
    if progress is not None and hasattr(progress, "close"):
        progress.close()
