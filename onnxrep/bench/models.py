"""The models a bench compares: loading, their input signatures, and the merged view of each input.

All models must take the same inputs (names, dtypes, ranks, fixed non-batch sizes): the same
arrays are fed to each. `merged_specs` combines what every model says about an input.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from ..errors import InputError, UsageError
from ..io import check_model, load_model, open_model


@dataclass
class TensorInfo:
    """A graph input or output."""

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

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype_name, "shape": self.dims}


@dataclass
class BenchModel:
    index: int
    name: str
    path: str | None
    proto: onnx.ModelProto
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    size_bytes: int
    static_batch: int | None = None
    run_path: str | None = None  # the file ORT loads (a temporary copy for an in-memory model)
    int8: dict | None = None  # the result document's models[].int8
    int8_path: str | None = None


@dataclass
class InputSpec:
    """The merged view of one input across all models."""

    name: str
    dtype: np.dtype
    dtype_name: str
    rank: int | None
    static: dict = field(default_factory=dict)  # axis -> static size (axes >= 1)
    symbols: dict = field(default_factory=dict)  # axis -> symbolic name
    batch: int | None = None  # axis 0, when every model fixes it to the same size


def file_bytes(p: Path) -> int:
    """Size of a model file plus the external data files it names (whatever they are called:
    onnxrep writes `OUTPUT.<token>.data`, torch's dynamo exporter `OUTPUT.data`)."""
    info: dict = {}
    open_model(p, check=False, info=info)
    return info["file_bytes"]


def _tensors(items, label: str, skip: set) -> list[TensorInfo]:
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
        out.append(TensorInfo(vi.name, tt.elem_type, dims))
    return out


def _load_one(i: int, m, label: str | None) -> BenchModel:
    if isinstance(m, onnx.ModelProto):
        check_model(m, f"model {i}")
        proto, path, size = m, None, m.ByteSize()
        label = label or f"model{i}"
    else:
        p = Path(m)
        info: dict = {}
        proto = load_model(p, info=info)
        path, size = str(p), info["file_bytes"]
        label = label or p.name
    inits = {t.name for t in proto.graph.initializer}
    ins = _tensors(proto.graph.input, label, inits)
    if not ins:
        raise InputError(f"{label}: the model has no inputs")
    model = BenchModel(i, label, path, proto, ins, _tensors(proto.graph.output, label, set()), size)
    statics = [t.dims[0] for t in ins if t.dims and isinstance(t.dims[0], int)]
    model.static_batch = max(statics) if statics else None
    return model


def load_models(models: Sequence, names: Sequence[str] | None) -> list[BenchModel]:
    """Paths or ModelProtos → BenchModels with unique display names."""
    if not models:
        raise UsageError("bench needs at least one model")
    labels = list(names or [])
    loaded = [_load_one(i, m, labels[i] if i < len(labels) else None) for i, m in enumerate(models)]
    counts = Counter(m.name for m in loaded)
    paths = Counter(m.path for m in loaded)
    for m in loaded:  # the same file name twice (a/model.onnx, b/model.onnx): show the path
        if counts[m.name] > 1:
            m.name = m.path if m.path and paths[m.path] == 1 else f"{m.name}#{m.index}"
    return loaded


def check_signatures(models: list[BenchModel]) -> None:
    """Same input names, dtypes, ranks and (non-batch) static dims, or one InputError line."""
    ref = models[0]
    ref_in = {i.name: i for i in ref.inputs}
    for m in models[1:]:
        got = {i.name: i for i in m.inputs}
        if set(got) != set(ref_in):
            raise InputError(f"input signatures differ: {ref.name} has inputs ({', '.join(ref_in)}) "
                             f"but {m.name} has ({', '.join(got)})")
        for name, a in ref_in.items():
            _check_pair(name, a, ref.name, got[name], m.name)


def _check_pair(name: str, a: TensorInfo, a_model: str, b: TensorInfo, b_model: str) -> None:
    differ = f"input signatures differ: input {name!r}"
    if a.elem_type != b.elem_type:
        raise InputError(f"{differ} is {a.dtype_name} in {a_model} but {b.dtype_name} in {b_model}")
    if a.dims is None or b.dims is None:
        return
    if len(a.dims) != len(b.dims):
        raise InputError(f"{differ} has rank {len(a.dims)} in {a_model} {a.shape_str()} "
                         f"but rank {len(b.dims)} in {b_model} {b.shape_str()}")
    for ax in range(1, len(a.dims)):
        da, db = a.dims[ax], b.dims[ax]
        if isinstance(da, int) and isinstance(db, int) and da != db:
            raise InputError(f"{differ} axis {ax} is {da} in {a_model} {a.shape_str()} "
                             f"but {db} in {b_model} {b.shape_str()}")


def merged_specs(models: list[BenchModel]) -> list[InputSpec]:
    specs = []
    for inp in models[0].inputs:
        dtype = inp.dtype
        if dtype is None or dtype.kind not in "biuf":
            raise InputError(f"input {inp.name!r} has type {inp.dtype_name}, which bench cannot generate or load")
        spec = InputSpec(inp.name, dtype, inp.dtype_name, None)
        batches = set()
        for m in models:
            d = next(i for i in m.inputs if i.name == inp.name).dims
            if d is None:
                batches.add(None)
                continue
            spec.rank = len(d)
            batches.add(d[0] if d and isinstance(d[0], int) else None)
            for ax in range(1, len(d)):
                if isinstance(d[ax], int):
                    spec.static[ax] = d[ax]
                elif d[ax] and ax not in spec.symbols:
                    spec.symbols[ax] = d[ax]
        spec.batch = batches.pop() if len(batches) == 1 and spec.rank else None
        specs.append(spec)
    return specs


def shape_view(specs: list[InputSpec]) -> dict[str, list | None]:
    """{name: dims} in the form shapes.check_against reads: int for a size every model fixes,
    None for a dynamic axis; None for an input of unknown rank. Axis 0 is fixed only when every
    model fixes it to the same batch (a static-batch model beside a dynamic one is skipped at
    other batches, not refused)."""
    view: dict[str, list | None] = {}
    for s in specs:
        if s.rank is None:
            view[s.name] = None
            continue
        view[s.name] = [s.batch if ax == 0 else s.static.get(ax) for ax in range(s.rank)]
    return view
