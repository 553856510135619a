#!/usr/bin/env python
"""Latency of every zoo model before and after `onnxrep optimize`, measured side by side.

    python tools/bench_zoo.py [--models a,b] [--batches 1,8] [--runs 200] [--threads 1]

Each model is exported in its training-time form (legacy exporter, no constant folding, dynamic
batch), optimized, and both graphs are timed with `onnxrep.bench` (ONNX Runtime CPU, graph
optimizations at their deployed default, `--threads` intra-op threads, warm-up then interleaved
round-robin runs, medians). Prints a Markdown table: median ms before and after per batch, the
speedup (before / after), and the max relative disagreement of the outputs.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import onnxrep  # noqa: E402
from onnxrep.bench import bench  # noqa: E402
from models import ZOO  # noqa: E402
from models.export import export_onnx  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(sorted(ZOO)))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--form", default="legacy-nofold")
    ap.add_argument("--rm", action="store_true", help="also enable rm_residual")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    root = Path(tempfile.mkdtemp(prefix="onnxrep-benchzoo-"))
    head = " | ".join(f"b{b} before ms | b{b} after ms | b{b} speedup" for b in batches)
    print(f"| model | nodes | {head} | rel err |")
    print("|---|---|" + "---|" * (3 * len(batches)) + "---|")
    for name in args.models.split(","):
        entry = ZOO[name]
        train = export_onnx(entry.build(), entry.input_shape, root / name / "train.onnx", args.form, dynamic_batch=True)
        deploy = root / name / "deploy.onnx"
        model, report = onnxrep.optimize(str(train), enable=["rm_residual"] if args.rm else None, return_report=True)
        onnxrep.io.save_model(model, deploy)
        res = bench([str(train), str(deploy)], providers=("cpu",), batches=batches, threads=args.threads,
                    warmup=args.warmup, runs=args.runs, input_shapes={"input": list(entry.input_shape)})
        cells = []
        for b in batches:
            rows = {r["model"]: r for r in res["latency"] if r["batch"] == b and r["precision"] == "fp32" and r["status"] == "ok"}
            before, after = rows.get(0, {}).get("median_ms"), rows.get(1, {}).get("median_ms")
            speed = f"{before / after:.2f}×" if before and after else "-"
            cells.append(f"{before:.3f} | {after:.3f} | {speed}" if before and after else "- | - | -")
        rel = next(((q.get("agreement") or {}).get("rel_err") for q in res["quality"]
                    if q.get("model") == 1 and q.get("precision") == "fp32"), None)
        nodes = f"{report.before['nodes']} → {report.after['nodes']}"
        print(f"| {name} | {nodes} | {' | '.join(cells)} | {rel:.1e} |" if rel is not None else f"| {name} | {nodes} | {' | '.join(cells)} | - |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
