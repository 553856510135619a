"""What the bench runner hands a worker, and what the worker hands back.

One `WorkerRequest` per execution provider; one `WorkerResult` back. Both are pickled between
our own processes (in our own temporary directory), so they hold only numbers, strings, NumPy
arrays and these dataclasses. Kept free of onnx and onnxruntime: the worker imports it first.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def first_line(e: BaseException) -> str:
    """An exception as one line of at most 400 characters (ORT errors run to many lines)."""
    text = str(e).strip() or type(e).__name__
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line[:400]
    return type(e).__name__


@dataclass
class VariantSpec:
    """One model file to run: a model in fp32 (key 'm0', 'm1', ...) or its int8 copy ('m0.int8')."""

    key: str
    label: str
    path: str
    static_batch: int | None
    reference: str | None  # key of the variant it is compared with; None for the reference model
    required: bool  # a failure is the model's fault (fp32 on the CPU), not the provider's


@dataclass
class EvalSpec:
    """The agreement/accuracy pass: `num` samples fed `chunk` at a time."""

    inputs: dict[str, np.ndarray]
    num: int
    chunk: int
    labels: np.ndarray | None
    unbatched: list[str]  # scalar inputs: fed whole, never sliced


@dataclass
class TimingSpec:
    batch: int
    feeds: dict[str, np.ndarray]
    variants: list[str]  # keys of the variants that can run at this batch


@dataclass
class WorkerRequest:
    provider: str  # short name, e.g. 'cuda'
    ep: str  # ONNX Runtime's name, e.g. 'CUDAExecutionProvider'
    ep_chain: list[str]  # the providers list of every session
    ort_opt: str
    threads: int | None
    warmup: int
    runs: int
    variants: list[VariantSpec]
    eval: EvalSpec
    timing: list[TimingSpec]


@dataclass
class VariantStatus:
    status: str  # 'ok', 'skipped' (the provider's fault) or 'error' (the model cannot run on the CPU)
    reason: str | None = None


@dataclass
class WorkerResult:
    variants: dict[str, VariantStatus] = field(default_factory=dict)
    quality: dict[str, dict] = field(default_factory=dict)  # key -> agreement/accuracy fields
    timing: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # batch -> key -> ns per run
    timing_skipped: dict[int, dict[str, str]] = field(default_factory=dict)  # batch -> key -> reason
    notes: list[str] = field(default_factory=list)
    session_providers: list[str] | None = None
    thread_pool: str | None = None
    fatal: str | None = None  # a Python exception in the worker (a bug), with its traceback
    traceback: str | None = None
    crashed: str | None = None  # set by the runner when the worker process died
