"""What one `onnxrep bench` run is asked to do: `BenchSettings`, checked once, in one place.

The CLI (onnxrep.bench.cli) and the Python API (onnxrep.bench.bench) both build a BenchSettings;
everything after that reads typed fields instead of a bag of keyword arguments.

Pure Python (no numpy, no onnx): the CLI parser imports the constants from here.
"""
from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping, Sequence

from .. import shapes as S
from ..errors import UsageError

DEFAULT_WARMUP = 10
DEFAULT_RUNS = 100
DEFAULT_SAMPLES = 32
DEFAULT_EVAL_BATCH = 32
DEFAULT_CALIB_SAMPLES = 64
CALIB_METHODS = ("minmax", "entropy", "percentile")

OPT_LEVELS = {
    "all": "ORT_ENABLE_ALL",
    "extended": "ORT_ENABLE_EXTENDED",
    "basic": "ORT_ENABLE_BASIC",
    "disable": "ORT_DISABLE_ALL",
}

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

Arrays = Any  # a path, a {name: array} dict or one array (numpy is not imported here)


@dataclass
class BenchSettings:
    """Every option of a bench run. `checked()` validates and normalizes a copy.

    input_shapes: {'x': [1, 3, 224, 224]} (the API's form; errors name input_shapes['x']) or
    ['x:1,3,224,224'] (the flag's form; errors name --input-shape). batches=None: the batch of
    `input_shapes`, else the models' shared static batch, else 1. isolate: measure in a child
    process with one shared thread pool (see onnxrep.bench.worker)."""

    providers: Sequence[str] | str = ("cpu",)
    batches: Sequence[int] | str | None = None
    threads: int | None = None
    warmup: int = DEFAULT_WARMUP
    runs: int = DEFAULT_RUNS
    data: Arrays | None = None
    labels: Arrays | None = None
    int8: bool = False
    input_shapes: Mapping[str, Sequence[int]] | Sequence[str] | None = None
    samples: int = DEFAULT_SAMPLES
    seed: int = 0
    eval_batch: int = DEFAULT_EVAL_BATCH
    ort_opt: str = "all"
    calib_data: Arrays | None = None
    calib_samples: int = DEFAULT_CALIB_SAMPLES
    calib_method: str = "minmax"
    per_channel: bool = True
    isolate: bool = True
    names: Sequence[str] | None = None
    progress: Any = None  # an object with update(done, total, label) and close(), or None
    shapes_from_api: bool = field(default=False, init=False)

    @classmethod
    def from_options(cls, **options) -> "BenchSettings":
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"bench() got unexpected keyword argument(s): {', '.join(unknown)}")
        return cls(**options)

    def checked(self) -> "BenchSettings":
        """A copy with providers, batches and input shapes parsed; UsageError on a bad value."""
        s = BenchSettings(**{f.name: getattr(self, f.name) for f in fields(self) if f.init})
        s.providers = parse_providers(s.providers)
        s.batches = parse_batches(s.batches) if s.batches is not None else None
        s.shapes_from_api = s.input_shapes is None or isinstance(s.input_shapes, Mapping)
        s.input_shapes = S.from_api(s.input_shapes)
        s._check_numbers()
        s._check_choices()
        return s

    def _check_numbers(self) -> None:
        for flag, v, lo in (("runs", self.runs, 1), ("warmup", self.warmup, 0), ("samples", self.samples, 1),
                            ("eval-batch", self.eval_batch, 1), ("calib-samples", self.calib_samples, 1)):
            if not _is_int(v) or v < lo:
                raise UsageError(f"--{flag} must be an integer >= {lo}, got {v!r}")
        if self.threads is not None and (not _is_int(self.threads) or self.threads < 1):
            raise UsageError(f"--threads must be an integer >= 1, got {self.threads!r}")
        self.runs, self.warmup, self.samples = int(self.runs), int(self.warmup), int(self.samples)
        self.eval_batch, self.calib_samples = int(self.eval_batch), int(self.calib_samples)

    def _check_choices(self) -> None:
        if self.ort_opt not in OPT_LEVELS:
            raise UsageError(f"--ort-opt must be one of {', '.join(OPT_LEVELS)}, got {self.ort_opt!r}")
        if self.calib_method not in CALIB_METHODS:
            raise UsageError(f"--calib-method must be one of {', '.join(CALIB_METHODS)}, got {self.calib_method!r}")
        if self.labels is not None and self.data is None:
            raise UsageError("--labels needs --data (accuracy is measured on the given inputs)")
        if self.calib_data is not None and not self.int8:
            raise UsageError("--calib-data is only used with --int8")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def parse_providers(spec: str | Sequence[str]) -> list[str]:
    """'cpu,cuda' or ['cpu', 'CUDAExecutionProvider'] → short names, deduplicated, in order."""
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
            names.append(next((k for k, v in PROVIDERS.items() if v == s), s))
        else:
            raise UsageError(f"unknown execution provider {s!r} (known: cpu, cuda, tensorrt, rocm, migraphx, "
                             "openvino, dml, coreml, xnnpack, qnn, or a full name like CUDAExecutionProvider)")
    if not names:
        raise UsageError("--providers is empty")
    return list(dict.fromkeys(names))


def ep_name(provider: str) -> str:
    """Short name → ONNX Runtime's execution provider name."""
    return PROVIDERS.get(provider, provider)


def parse_batches(spec: str | Iterable[int]) -> list[int]:
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


def pathish(v) -> str | None:
    """How a data argument appears in the result: its path, or '<array>' for in-memory data."""
    if v is None:
        return None
    if isinstance(v, (str, os.PathLike)):
        return str(v)
    return "<array>"
