"""`onnxrep bench`: what a rewrite bought -- latency, agreement and accuracy, before and after.

    python -m onnxrep bench train.onnx deploy.onnx [--providers cpu,cuda] [--batch 1,8,32]
                            [--data inputs.npz --labels labels.npy] [--int8] [--json F] [--plot F.png]

    from onnxrep.bench import bench, format_table, write_json, write_plot
    result = bench(["train.onnx", "deploy.onnx"], batches=(1, 8), runs=100)

The package, one concern a module:

    settings   BenchSettings: every option, checked once (pure Python)
    cli        the subparser and the command
    models     loading, input signatures, the merged view of each input
    inputs     --input-shape (optimize's grammar), --data, --labels, random inputs
    plan       BenchPlan: shapes, arrays, batches, variants, timing feeds
    quantize   --int8 with onnxruntime.quantization
    runner     bench(): plan, quantize, one worker per provider (a child process)
    protocol   the worker's request and result (dataclasses, pickled)
    worker     ONNX Runtime sessions, agreement/accuracy, interleaved timing
    metrics    streaming agreement, accuracy and latency statistics (NumPy only)
    report     the result document (schema in docs/bench.md) and its JSON
    table      the text report
    plot       the latency chart (matplotlib)
    progress   the progress bar

Names are imported on first use, so `python -m onnxrep.bench.worker` and the CLI parser load
only what they need.
"""
from __future__ import annotations

_LAZY = {
    "bench": "runner", "available_providers": "runner",
    "BenchSettings": "settings", "PROVIDERS": "settings", "OPT_LEVELS": "settings", "CALIB_METHODS": "settings",
    "DEFAULT_WARMUP": "settings", "DEFAULT_RUNS": "settings", "DEFAULT_SAMPLES": "settings",
    "DEFAULT_EVAL_BATCH": "settings", "DEFAULT_CALIB_SAMPLES": "settings",
    "add_parser": "cli", "run": "cli",
    "format_table": "table", "write_json": "report", "SCHEMA_VERSION": "report", "write_plot": "plot",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
