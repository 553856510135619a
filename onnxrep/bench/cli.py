"""`onnxrep bench` on the command line: the subparser and the command.

Importing this module costs argparse and the settings constants only; onnx, onnxruntime and numpy
are imported when the command runs.
"""
from __future__ import annotations

import argparse

from ..shapes import parse_specs
from .settings import (CALIB_METHODS, DEFAULT_CALIB_SAMPLES, DEFAULT_EVAL_BATCH, DEFAULT_RUNS, DEFAULT_SAMPLES,
                       DEFAULT_WARMUP, OPT_LEVELS, BenchSettings, parse_batches, parse_providers)

_ARGS = [  # (flags, keywords): the order of --help
    (("--providers",), dict(default="cpu", metavar="LIST",
                            help="execution providers, comma-separated: cpu, cuda, tensorrt (also rocm, openvino, dml, "
                                 "coreml, ... or a full ONNX Runtime name); default cpu")),
    (("--batch",), dict(default=None, metavar="B1,B2",
                        help="batch sizes to time, e.g. 1,8,32 (models with a dynamic batch axis); "
                             "default: the batch of --input-shape, else the model's static batch, else 1")),
    (("--threads",), dict(type=int, default=None, metavar="N",
                          help="intra-op threads (ONNX Runtime default: one per physical core)")),
    (("--warmup",), dict(type=int, default=DEFAULT_WARMUP, metavar="N",
                         help=f"untimed runs per model before timing (default {DEFAULT_WARMUP})")),
    (("--runs",), dict(type=int, default=DEFAULT_RUNS, metavar="N",
                       help=f"timed runs per model, provider and batch (default {DEFAULT_RUNS})")),
    (("--input-shape",), dict(action="append", default=[], metavar="NAME:D1,D2,...",
                              help="shape of an input with dynamic axes, e.g. input:1,3,224,224 (repeatable, as for "
                                   "optimize); its first axis is the default batch")),
    (("--data",), dict(metavar="INPUTS.npz",
                       help="inputs for agreement/accuracy (and timing): .npz with one array per input name "
                            "(a single array for a single-input model, .npy too), samples along axis 0")),
    (("--labels",), dict(metavar="LABELS.npy",
                         help="integer class labels for --data (.npy, or .npz with one array): reports top-1 accuracy")),
    (("--samples",), dict(type=int, default=DEFAULT_SAMPLES, metavar="N",
                          help=f"random samples for agreement when there is no --data (default {DEFAULT_SAMPLES})")),
    (("--seed",), dict(type=int, default=0, help="seed for random inputs (default 0)")),
    (("--eval-batch",), dict(type=int, default=DEFAULT_EVAL_BATCH, metavar="N",
                             help=f"batch size for agreement/accuracy passes over the data (default {DEFAULT_EVAL_BATCH})")),
    (("--ort-opt",), dict(choices=tuple(OPT_LEVELS), default="all",
                          help="ONNX Runtime graph optimization level (default all, as deployed)")),
    (("--int8",), dict(action="store_true",
                       help="also quantize each model (static, QDQ, int8) and report its latency and accuracy drop")),
    (("--calib-data",), dict(metavar="CALIB.npz", help="calibration inputs for --int8 (default: --data, else random inputs)")),
    (("--calib-samples",), dict(type=int, default=DEFAULT_CALIB_SAMPLES, metavar="N",
                                help=f"calibration samples for --int8 (default {DEFAULT_CALIB_SAMPLES})")),
    (("--calib-method",), dict(choices=CALIB_METHODS, default="minmax", help="calibration method for --int8 (default minmax)")),
    (("--per-tensor",), dict(action="store_true", help="--int8 with per-tensor weight scales (default: per-channel)")),
    (("--json",), dict(metavar="FILE.json", help="write the full results as JSON (schema in docs/bench.md)")),
    (("--plot",), dict(metavar="FILE.png", help="write a latency bar chart (needs matplotlib)")),
    (("--in-process",), dict(action="store_true", help="measure in this process (per-session thread pools, "
                                                       "spinning off) instead of a child process")),
    (("--no-progress",), dict(action="store_true", help="no progress bar on stderr")),
    (("-q", "--quiet"), dict(action="store_true", help="print nothing (use with --json/--plot)")),
]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="compare latency, agreement and accuracy of models in ONNX Runtime",
        description="Time ONNX models in ONNX Runtime (interleaved runs, median/p90/min), check that "
                    "they agree with the first model, and measure accuracy on labelled data.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL.onnx",
                   help="models to compare; the first is the reference (same input names, dtypes and ranks)")
    for flags, kwargs in _ARGS:
        p.add_argument(*flags, **kwargs)
    p.set_defaults(func=run)
    return p


def settings_from_args(args, progress=None) -> BenchSettings:
    """The command line's options as BenchSettings; usage errors before any file is read."""
    parse_specs(args.input_shape)
    return BenchSettings(
        providers=parse_providers(args.providers),
        batches=parse_batches(args.batch) if args.batch is not None else None, threads=args.threads,
        warmup=args.warmup, runs=args.runs, data=args.data, labels=args.labels, int8=args.int8,
        input_shapes=list(args.input_shape), samples=args.samples, seed=args.seed, eval_batch=args.eval_batch,
        ort_opt=args.ort_opt, calib_data=args.calib_data, calib_samples=args.calib_samples,
        calib_method=args.calib_method, per_channel=not args.per_tensor, isolate=not args.in_process,
        progress=progress)


def run(args) -> int:
    from ..io import check_output_path
    from .plot import require_matplotlib, write_plot
    from .progress import Progress
    from .report import write_json
    from .runner import bench
    from .table import format_table

    settings = settings_from_args(args)
    if args.plot:
        require_matplotlib()
    for out in (args.json, args.plot):
        if out:
            for m in args.models:
                check_output_path(m, out)
    settings.progress = None if args.no_progress or args.quiet else Progress.for_stderr()
    result = bench(args.models, settings)
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
