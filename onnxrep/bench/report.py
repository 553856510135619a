"""The result document of a bench (schema in docs/bench.md) and its JSON form.

`assemble` turns the plan and the workers' results into the document: typed rows (ProviderEntry,
LatencyRow, QualityRow, ModelEntry) written out with dataclasses.asdict, so a row has every field
of the schema whether it was measured or skipped. The text table is in onnxrep.bench.table.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .. import __version__
from ..files import write_text_atomic
from ..io import check_output_path
from ..stats import macs, parameter_count
from .metrics import latency_stats
from .settings import pathish

if TYPE_CHECKING:
    from .plan import BenchPlan, Variant
    from .runner import ProviderRun

SCHEMA_VERSION = 1


@dataclass
class ProviderEntry:
    name: str
    ep: str
    status: str = "ok"
    reason: str | None = None
    session_providers: list[str] | None = None
    thread_pool: str | None = None

    def skip(self, reason: str) -> None:
        self.status, self.reason = "skipped", reason


@dataclass
class LatencyRow:
    provider: str
    batch: int
    model: int
    model_name: str
    precision: str
    status: str = "ok"
    reason: str | None = None
    runs: int | None = None
    median_ms: float | None = None
    p90_ms: float | None = None
    min_ms: float | None = None
    mean_ms: float | None = None
    std_ms: float | None = None
    throughput_per_s: float | None = None
    ratio_to_first: float | None = None  # median / median of model 0 fp32 (< 1: faster)
    speedup_vs_first: float | None = None  # the inverse
    speedup_vs_fp32: float | None = None  # int8 rows: the same model's fp32 median / this median


@dataclass
class QualityRow:
    provider: str
    model: int
    model_name: str
    precision: str
    status: str = "ok"
    reason: str | None = None
    reference: dict | None = None  # {"model": int, "precision": str}; None for model 0 fp32
    num_samples: int = 0
    agreement: dict | None = None
    agreement_reason: str | None = None  # why agreement is None
    accuracy: float | None = None
    accuracy_output: str | None = None
    accuracy_reason: str | None = None
    accuracy_drop: float | None = None  # reference accuracy - this accuracy


@dataclass
class ModelEntry:
    index: int
    name: str
    path: str | None
    size_bytes: int
    nodes: int
    params: int  # as optimize counts them: elements of floating-point initializers and Constants
    macs: int | None  # per sample, as optimize counts them; None when a non-batch axis is symbolic
    op_counts: dict
    opset: int | None
    static_batch: int | None
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    int8: dict | None = None


# ---- assembly ----------------------------------------------------------------------------------
def _model_entry(m) -> ModelEntry:
    p = m.proto
    return ModelEntry(
        index=m.index, name=m.name, path=m.path, size_bytes=m.size_bytes, nodes=len(p.graph.node),
        params=parameter_count(p), macs=macs(p),
        op_counts=dict(Counter(n.op_type for n in p.graph.node).most_common()),
        opset=next((o.version for o in p.opset_import if o.domain in ("", "ai.onnx")), None),
        static_batch=m.static_batch, inputs=[i.to_dict() for i in m.inputs], outputs=[o.to_dict() for o in m.outputs],
        int8=m.int8)


def _latency_row(plan: "BenchPlan", run: "ProviderRun", t, v: "Variant") -> LatencyRow:
    row = LatencyRow(run.entry.name, t.batch, v.model, plan.models[v.model].name, v.precision)
    res = run.result
    if res is None:
        row.status, row.reason = "skipped", run.entry.reason
    elif v.key in t.skipped:
        row.status, row.reason = "skipped", t.skipped[v.key]
    elif v.key in res.timing_skipped.get(t.batch, {}):
        row.status, row.reason = "skipped", res.timing_skipped[t.batch][v.key]
    elif v.key in res.timing.get(t.batch, {}):
        for k, val in latency_stats(res.timing[t.batch][v.key], t.batch).items():
            setattr(row, k, val)
    else:
        st = res.variants.get(v.key)
        row.status, row.reason = "skipped", (st.reason if st else None) or "not run"
    return row


def _latency_rows(plan: "BenchPlan", run: "ProviderRun") -> list[LatencyRow]:
    out = []
    for t in plan.timing:
        rows = {v.key: _latency_row(plan, run, t, v) for v in plan.variants}
        base = rows["m0"].median_ms if rows["m0"].status == "ok" else None
        for v in plan.variants:
            row, own = rows[v.key], rows[f"m{v.model}"]
            fp32 = own.median_ms if own.status == "ok" else None
            med = row.median_ms
            row.ratio_to_first = med / base if (med and base) else None
            row.speedup_vs_first = base / med if (med and base) else None
            if v.precision == "int8":
                row.speedup_vs_fp32 = fp32 / med if (med and fp32) else None
            out.append(row)
    return out


def _quality_row(plan: "BenchPlan", run: "ProviderRun", v: "Variant") -> QualityRow:
    ref = None
    if v.reference is not None:
        rv = next(x for x in plan.variants if x.key == v.reference)
        ref = {"model": rv.model, "precision": rv.precision}
    row = QualityRow(run.entry.name, v.model, plan.models[v.model].name, v.precision, reference=ref,
                     num_samples=plan.num_eval)
    res = run.result
    st = res.variants.get(v.key) if res is not None else None
    if res is None:
        row.status, row.reason = "skipped", run.entry.reason
    elif not v.path:
        row.status, row.reason = "skipped", v.reason or "not available"
    elif st is None or st.status != "ok":
        row.status, row.reason = "skipped", (st.reason if st else None) or "not run"
    else:
        q = res.quality.get(v.key, {})
        for k in ("agreement", "agreement_reason", "accuracy", "accuracy_output", "accuracy_reason"):
            if k in q:
                setattr(row, k, q[k])
        if ref is None:
            row.agreement_reason = "reference model"
        if plan.settings.labels is None:
            row.accuracy_reason = "no --labels"
    return row


def _quality_rows(plan: "BenchPlan", run: "ProviderRun") -> list[QualityRow]:
    rows = {v.key: _quality_row(plan, run, v) for v in plan.variants}
    for v in plan.variants:
        row, ref = rows[v.key], rows.get(v.reference) if v.reference else None
        if ref and row.accuracy is not None and ref.accuracy is not None:
            row.accuracy_drop = ref.accuracy - row.accuracy
    return list(rows.values())


def _environment(available: list[str]) -> dict:
    import onnxruntime as ort

    return {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
            "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "onnxruntime": ort.__version__,
            "onnx": onnx.__version__, "numpy": np.__version__, "available_providers": list(available)}


def _settings(plan: "BenchPlan") -> dict:
    s = plan.settings
    int8 = {"format": "QDQ", "activations": "int8", "weights": "int8", "per_channel": s.per_channel,
            "calibration_method": s.calib_method, "calibration_samples": s.calib_samples,
            "calibration_source": plan.calib_source, "calibration_data": pathish(s.calib_data)}
    return {"providers": s.providers, "batches": plan.batches, "threads": s.threads, "warmup": s.warmup,
            "runs": s.runs, "interleaved": True, "isolated": s.isolate, "ort_opt": s.ort_opt, "seed": s.seed,
            "samples": s.samples, "eval_batch": s.eval_batch, "input_shapes": plan.input_shapes,
            "int8": int8 if s.int8 else None}


def assemble(plan: "BenchPlan", runs: list["ProviderRun"], available: list[str]) -> dict:
    """The result document (schema_version 1, docs/bench.md)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "onnxrep bench", "version": __version__},
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "environment": _environment(available),
        "settings": _settings(plan),
        "inputs": {
            "source": plan.source, "data": pathish(plan.settings.data), "labels": pathish(plan.settings.labels),
            "num_samples": plan.num_eval,
            "specs": [{"name": sp.name, "dtype": sp.dtype_name, "sample_shape": list(plan.sample_shapes.get(sp.name, ()))}
                      for sp in plan.specs],
        },
        "models": [asdict(_model_entry(m)) for m in plan.models],
        "providers": [asdict(r.entry) for r in runs],
        "latency": [asdict(row) for r in runs for row in _latency_rows(plan, r)],
        "quality": [asdict(row) for r in runs for row in _quality_rows(plan, r)],
        "notes": plan.notes,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- JSON --------------------------------------------------------------------------------------
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


def write_json(result: dict, path) -> None:
    """Strict JSON (NaN and inf become null), written atomically with the umask's permissions."""
    check_output_path(None, path)
    write_text_atomic(path, json.dumps(_json_safe(result), indent=2, allow_nan=False) + "\n")
