"""The arrays a bench feeds: --input-shape, --data, --labels, random inputs.

Input shapes use optimize's grammar and checks (onnxrep.shapes) and random inputs optimize's
generator (onnxrep.verify.random_inputs), so both commands mean the same thing by them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from .. import shapes as S
from ..errors import InputError, UsageError
from ..verify import random_inputs as _verify_random_inputs
from .models import InputSpec, shape_view
from .protocol import first_line


def resolve_shapes(shapes: Mapping[str, list[int]], specs: list[InputSpec], api: bool) -> dict[str, list[int]]:
    """Requested shapes checked against the models' inputs, in optimize's words."""
    S.check_against(shapes, shape_view(specs), api=api)
    return {name: list(dims) for name, dims in shapes.items()}


def sample_shape(spec: InputSpec, overrides: dict) -> tuple[int, ...]:
    """Shape of one input without its batch axis (axes 1..), or UsageError naming the missing dims."""
    if spec.name in overrides:
        return tuple(overrides[spec.name][1:])
    if spec.rank is None:
        raise UsageError(f"input {spec.name!r} has no shape in the model; give it with --input-shape {spec.name}:D1,D2,...")
    axes = range(1, spec.rank)
    missing = [ax for ax in axes if ax not in spec.static]
    if missing:
        example = ",".join(["1"] + [str(spec.static[ax]) if ax in spec.static else f"<{spec.symbols.get(ax, f'D{ax}')}>"
                                    for ax in axes])
        what = ", ".join(f"axis {ax}" + (f" ({spec.symbols[ax]!r})" if ax in spec.symbols else "") for ax in missing)
        raise UsageError(f"input {spec.name!r} has dynamic {what}: give the size with --input-shape {spec.name}:{example} "
                         "or pass --data")
    return tuple(spec.static[ax] for ax in axes)


def random_inputs(specs: list[InputSpec], sample_shapes: dict, n: int, seed) -> dict[str, np.ndarray]:
    """`n` samples per input, from optimize's verification generator (floats standard normal)."""
    shaped = {s.name: ((() if s.rank == 0 else (n, *sample_shapes[s.name])), s.dtype.type) for s in specs}
    return _verify_random_inputs(shaped, seed)


def take(arrays: dict, n_have: int, n: int, unbatched: set) -> dict:
    """The first n samples (cycling when there are fewer)."""
    if n <= n_have:
        return {k: a if k in unbatched else a[:n] for k, a in arrays.items()}
    idx = np.arange(n) % n_have
    return {k: a if k in unbatched else np.ascontiguousarray(np.take(a, idx, axis=0)) for k, a in arrays.items()}


# ---- files ---------------------------------------------------------------------------------------
def load_arrays(path, what: str) -> dict[str, np.ndarray] | np.ndarray:
    """An .npz (→ dict) or .npy (→ array); InputError naming `what` ('data', 'labels', ...)."""
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
        if isinstance(obj, np.ndarray):
            return obj
        with obj:
            return {k: obj[k] for k in obj.files}
    except Exception as e:
        raise InputError(f"cannot read {what} file {p}: {first_line(e)}") from e


def _coerce(arr: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    if arr.dtype == spec.dtype:
        return arr
    kinds = {"f": "f", "i": "iu", "u": "iu", "b": "b"}
    if arr.dtype.kind in kinds.get(spec.dtype.kind, ""):  # float64 -> float32, int32 -> int64, ...
        return arr.astype(spec.dtype)
    hint = " (convert and normalize it as the model expects)" if spec.dtype.kind == "f" else ""
    raise InputError(f"{where} is {arr.dtype} but input {spec.name!r} is {spec.dtype_name}{hint}")


def _by_input(raw, names: list[str], src: str) -> dict:
    """The arrays of a data file keyed by input name (a lone array serves a single-input model)."""
    if isinstance(raw, np.ndarray):
        if len(names) != 1:
            raise InputError(f"{src} holds a single array but the model has {len(names)} inputs "
                             f"({', '.join(names)}): use an .npz keyed by input name")
        return {names[0]: raw}
    raw = dict(raw)
    if not raw:
        raise InputError(f"{src} holds no arrays")
    missing = [n for n in names if n not in raw]
    if not missing:
        return {n: raw[n] for n in names}
    if len(names) == 1 and len(raw) == 1:
        return {names[0]: next(iter(raw.values()))}
    raise InputError(f"{src} has no array for input {missing[0]!r} (arrays: {', '.join(raw)}; "
                     f"expected keys: {', '.join(names)})")


def _check_array(a: np.ndarray, spec: InputSpec, overrides: dict, where: str) -> np.ndarray:
    """One input's data, cast and checked against the model (samples along axis 0)."""
    if a.dtype.kind not in "biuf":
        raise InputError(f"{where} has dtype {a.dtype}, not numeric")
    a = _coerce(a, spec, where)
    if spec.rank == 0:
        if a.ndim != 0:
            raise InputError(f"{where} has shape {list(a.shape)} but input {spec.name!r} is a scalar")
        return a
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
    return np.ascontiguousarray(a)


def prepare_data(data, specs: list[InputSpec], overrides: dict, label: str) -> tuple[dict[str, np.ndarray], int]:
    """Arrays keyed by input name, validated against the model; returns (arrays, number of samples)."""
    if isinstance(data, (str, os.PathLike)):
        raw, src = load_arrays(data, label), str(data)
    else:
        raw, src = data, label
    arrays = _by_input(raw, [s.name for s in specs], src)
    counts = {}
    for spec in specs:
        arrays[spec.name] = _check_array(np.asarray(arrays[spec.name]), spec, overrides, f"{src}[{spec.name!r}]")
        if spec.rank != 0:
            counts[spec.name] = arrays[spec.name].shape[0]
    if len(set(counts.values())) > 1:
        raise InputError(f"arrays in {src} have different sample counts: "
                         + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return arrays, next(iter(counts.values())) if counts else 1


def prepare_labels(labels, n: int) -> np.ndarray:
    """Class indices, shape (n,): from integers, one-hot rows or probabilities."""
    if isinstance(labels, (str, os.PathLike)):
        raw, src = load_arrays(labels, "labels"), str(labels)
    else:
        raw, src = labels, "labels"
    if isinstance(raw, dict):
        keys = [k for k in ("labels", "label", "y", "targets", "target") if k in raw]
        if len(raw) != 1 and not keys:
            raise InputError(f"{src} holds several arrays ({', '.join(raw)}); expected one, or one named 'labels'")
        raw = next(iter(raw.values())) if len(raw) == 1 else raw[keys[0]]
    y = np.asarray(raw)
    if y.dtype.kind not in "biuf":
        raise InputError(f"{src}: labels must be numeric, got {y.dtype}")
    if y.ndim == 2 and y.shape[1] > 0:  # one-hot or probabilities, or a column of indices
        y = y.argmax(axis=1) if y.shape[1] > 1 else y[:, 0]
    if y.ndim != 1:
        raise InputError(f"{src}: labels must have shape (N,) or (N, C), got {list(y.shape)}")
    if y.dtype.kind == "f" and (not np.all(np.isfinite(y)) or not np.all(y == np.round(y))):
        raise InputError(f"{src}: labels must be integer class indices")
    y = y.astype(np.int64)
    if len(y) != n:
        raise InputError(f"{src} has {len(y)} labels but the data has {n} samples")
    if (y < 0).any():
        raise InputError(f"{src}: negative label {int(y.min())}")
    return y
