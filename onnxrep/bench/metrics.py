"""Agreement, accuracy and latency statistics for `onnxrep bench` (NumPy only).

The accumulators are streaming: outputs arrive chunk by chunk, so a large --data set is never held
in memory all at once. Everything is computed in float64.

Definitions (also in docs/bench.md):
- max_abs_err: max |candidate - reference| over every element of the output.
- rel_err: max_abs_err / max |reference| (the error relative to the output's scale; near fp32
  rounding, ~1e-7..1e-6, for an exact rewrite).
- cosine_mean / cosine_min: cosine similarity per sample (the output flattened per batch row),
  averaged / worst over samples. Two all-zero rows count as 1, one all-zero row as 0.
- top1_agreement: for outputs with a class axis -- shape (N, C) with C > 1, after dropping trailing
  size-1 axes, e.g. (N, C, 1, 1) -- the fraction of samples whose argmax over C agrees.
- accuracy: fraction of samples whose argmax over the class axis equals the label.
"""
from __future__ import annotations

import math

import numpy as np


def class_scores(arr: np.ndarray, n: int) -> np.ndarray | None:
    """(n, C) view of an output with a class axis, else None."""
    if not isinstance(arr, np.ndarray) or arr.ndim < 2 or arr.shape[0] != n:
        return None
    if arr.dtype.kind != "f":
        return None
    shape = list(arr.shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    if len(shape) != 2 or shape[1] < 2:
        return None
    return arr.reshape(shape)


def _rows(arr: np.ndarray, n: int) -> np.ndarray:
    """One row per sample when the output is batched along axis 0, else the whole tensor as one row."""
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim >= 1 and a.shape[0] == n and n > 0:
        return a.reshape(n, -1)
    return a.reshape(1, -1)


class Agreement:
    """Streaming comparison of one output of a candidate model against the reference model's."""

    def __init__(self, name: str, ref_name: str):
        self.name = name
        self.ref_name = ref_name
        self.max_abs = 0.0
        self.max_ref = 0.0
        self.cos_sum = 0.0
        self.cos_min = math.inf
        self.cos_n = 0
        self.top1_match = 0
        self.top1_n = 0
        self.has_class_axis: bool | None = None
        self.nonfinite = False
        self.problem: str | None = None

    def update(self, out: np.ndarray, ref: np.ndarray, n: int) -> None:
        if self.problem:
            return
        out, ref = np.asarray(out), np.asarray(ref)
        if out.dtype.kind not in "biuf" or ref.dtype.kind not in "biuf":
            self.problem = f"output {self.name!r} is not numeric ({out.dtype})"
            return
        if out.shape != ref.shape:
            self.problem = f"output {self.name!r} has shape {list(out.shape)}, reference {self.ref_name!r} has {list(ref.shape)}"
            return
        a = out.astype(np.float64, copy=False)
        r = ref.astype(np.float64, copy=False)
        if not (np.isfinite(a).all() and np.isfinite(r).all()):
            self.nonfinite = True
        if a.size:
            diff = np.abs(a - r)
            self.max_abs = _nanmax(self.max_abs, float(diff.max()))
            self.max_ref = max(self.max_ref, float(np.nanmax(np.abs(r))) if np.isfinite(r).any() else 0.0)
        ra, rr = _rows(a, n), _rows(r, n)
        na = np.linalg.norm(ra, axis=1)
        nr = np.linalg.norm(rr, axis=1)
        dot = np.einsum("ij,ij->i", ra, rr)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.where((na == 0) & (nr == 0), 1.0, np.where((na == 0) | (nr == 0), 0.0, dot / (na * nr)))
        cos = np.clip(cos, -1.0, 1.0)
        self.cos_sum += float(cos.sum())
        self.cos_min = _nanmin(self.cos_min, float(cos.min()) if cos.size else math.inf)
        self.cos_n += cos.size
        cs_out, cs_ref = class_scores(out, n), class_scores(ref, n)
        if self.has_class_axis is None:
            self.has_class_axis = cs_out is not None and cs_ref is not None
        if self.has_class_axis and cs_out is not None and cs_ref is not None:
            self.top1_match += int((cs_out.argmax(axis=1) == cs_ref.argmax(axis=1)).sum())
            self.top1_n += n

    def result(self) -> dict:
        if self.problem:
            return {"name": self.name, "reference_name": self.ref_name, "problem": self.problem,
                    "max_abs_err": None, "rel_err": None, "cosine_mean": None, "cosine_min": None,
                    "top1_agreement": None, "nonfinite": self.nonfinite}
        if self.max_ref > 0:
            rel = self.max_abs / self.max_ref
        else:
            rel = 0.0 if self.max_abs == 0 else math.inf
        return {
            "name": self.name,
            "reference_name": self.ref_name,
            "max_abs_err": self.max_abs,
            "rel_err": rel,
            "cosine_mean": self.cos_sum / self.cos_n if self.cos_n else None,
            "cosine_min": self.cos_min if self.cos_n else None,
            "top1_agreement": (self.top1_match / self.top1_n) if self.has_class_axis and self.top1_n else None,
            "nonfinite": self.nonfinite,
            "problem": None,
        }


def summarize_agreement(outputs: list[dict]) -> dict:
    """Worst case over outputs: largest errors, smallest cosine and top-1 agreement."""
    ok = [o for o in outputs if not o.get("problem")]

    def worst(key, fn):
        vals = [o[key] for o in ok if o[key] is not None]
        return fn(vals) if vals else None

    return {
        "max_abs_err": worst("max_abs_err", _max_nan),
        "rel_err": worst("rel_err", _max_nan),
        "cosine_mean": worst("cosine_mean", _min_nan),
        "cosine_min": worst("cosine_min", _min_nan),
        "top1_agreement": worst("top1_agreement", min),
        "outputs": outputs,
    }


class Accuracy:
    """Streaming top-1 accuracy of one output against integer labels."""

    def __init__(self, name: str):
        self.name = name
        self.correct = 0
        self.n = 0

    def update(self, scores: np.ndarray, labels: np.ndarray) -> None:
        self.correct += int((scores.argmax(axis=1) == labels).sum())
        self.n += len(labels)

    def result(self) -> float | None:
        return self.correct / self.n if self.n else None


def latency_stats(ns: np.ndarray, batch: int) -> dict:
    """Latency statistics from per-run durations in nanoseconds."""
    ms = np.asarray(ns, dtype=np.float64) / 1e6
    median = float(np.median(ms))
    return {
        "runs": int(ms.size),
        "median_ms": median,
        "p90_ms": float(np.percentile(ms, 90)),
        "min_ms": float(ms.min()),
        "mean_ms": float(ms.mean()),
        "std_ms": float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
        "throughput_per_s": batch * 1e3 / median if median > 0 else None,
    }


def _nanmax(a: float, b: float) -> float:
    return math.nan if (math.isnan(a) or math.isnan(b)) else max(a, b)


def _nanmin(a: float, b: float) -> float:
    return math.nan if (math.isnan(a) or math.isnan(b)) else min(a, b)


def _max_nan(vals):
    return math.nan if any(math.isnan(v) for v in vals) else max(vals)


def _min_nan(vals):
    return math.nan if any(math.isnan(v) for v in vals) else min(vals)
