"""Does onnxrep's output still run as fused as the exported graph? A FastViT-like ConvFFN stack.

    python tools/bench_fusion.py [--blocks 4] [--channels 64] [--hw 28] [--rounds 15] [--runs 20]
                                 [--baseline-tree /work/main]

Exports `blocks` residual ConvFFN blocks (1×1 conv → BN → GELU → 1×1 conv → BN, + x) with the
legacy exporter (GELU written out as Div → Erf → Add → Mul → Mul(0.5)), then optimizes it:

  before   onnxrep from --baseline-tree (another checkout, run in a subprocess), or, without
           one, this tree with the pattern index switched off (what onnxrep did before GELU
           was atomic: fuse_bn_conv folds Mul(0.5) into the next conv)
  after    this tree's onnxrep, default rules

and prints node counts, the op histogram of each graph and of ORT's own optimized graph
(ORT_ENABLE_ALL, as deployed: how many Gelu kernels are left), and latency in ONNX Runtime CPU at
its default optimization level, one thread, the models interleaved round by round (first model
rotating) so machine noise hits all alike. Speedup = median of `export` / median of the model.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def export_convffn(path: str, blocks: int, c: int, hw: int) -> None:
    import torch
    from torch import nn

    class ConvFFN(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Sequential(nn.Conv2d(c, 4 * c, 1, bias=False), nn.BatchNorm2d(4 * c))
            self.act = nn.GELU()
            self.fc2 = nn.Sequential(nn.Conv2d(4 * c, c, 1, bias=False), nn.BatchNorm2d(c))

        def forward(self, x):
            return x + self.fc2(self.act(self.fc1(x)))

    torch.manual_seed(0)
    model = nn.Sequential(*[ConvFFN() for _ in range(blocks)])
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(1, c, hw, hw),), path, dynamo=False, opset_version=17,
                          input_names=["x"])


def optimize_here(src: str, dst: str, protect: bool) -> None:
    import onnxrep
    from onnxrep import patterns

    original = patterns.Index.of
    if not protect:
        patterns.Index.of = lambda self, node: None
    try:
        onnxrep.optimize_file(src, dst)
    finally:
        patterns.Index.of = original


def optimize_in(tree: str, src: str, dst: str) -> None:
    code = "import sys, onnxrep; onnxrep.optimize_file(sys.argv[1], sys.argv[2])"
    env = dict(os.environ, PYTHONPATH=tree)
    subprocess.run([sys.executable, "-c", code, src, dst], check=True, cwd=tree, env=env)


def histogram(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def ort_histogram(path: str) -> Counter:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory() as d:
        so.optimized_model_filepath = os.path.join(d, "o.onnx")
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        return histogram(onnx.load(so.optimized_model_filepath))


def latency(paths: dict[str, str], feeds: dict, rounds: int, runs: int, warmup: int = 10) -> dict[str, float]:
    sessions = {}
    for name, path in paths.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        sessions[name] = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        for _ in range(warmup):
            sessions[name].run(None, feeds)
    times = {name: [] for name in paths}
    names = list(paths)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            s = sessions[name]
            for _ in range(runs):
                t = time.perf_counter()
                s.run(None, feeds)
                times[name].append(time.perf_counter() - t)
    return {name: float(np.median(v)) * 1e3 for name, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--hw", type=int, default=28)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--baseline-tree", default=None, help="an onnxrep checkout to produce 'before' with")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        paths = {"export": os.path.join(d, "export.onnx"), "before": os.path.join(d, "before.onnx"),
                 "after": os.path.join(d, "after.onnx")}
        export_convffn(paths["export"], args.blocks, args.channels, args.hw)
        if args.baseline_tree:
            optimize_in(args.baseline_tree, paths["export"], paths["before"])
        else:
            optimize_here(paths["export"], paths["before"], protect=False)
        optimize_here(paths["export"], paths["after"], protect=True)
        before_label = f"before ({args.baseline_tree})" if args.baseline_tree else "before (patterns off)"
        print(f"ConvFFN ×{args.blocks}, {args.channels}→{4 * args.channels}→{args.channels} channels, "
              f"{args.hw}×{args.hw}, legacy export, opset 17")
        print(f"{'model':<28} {'nodes':>5}  ops  |  ORT_ENABLE_ALL graph")
        for name, path in paths.items():
            h = histogram(onnx.load(path))
            fused = ort_histogram(path)
            label = before_label if name == "before" else name
            print(f"{label:<28} {sum(h.values()):>5}  {dict(sorted(h.items()))}  |  {dict(sorted(fused.items()))}")
        feeds = {"x": np.random.default_rng(0).standard_normal((1, args.channels, args.hw, args.hw)).astype(np.float32)}
        ms = latency(paths, feeds, args.rounds, args.runs)
        print(f"\nlatency, ORT CPU default optimizations, 1 thread, {args.rounds} interleaved rounds × {args.runs} runs")
        print(f"{'model':<28} {'median ms':>10} {'vs export':>10} {'vs before':>10}")
        for name in paths:
            label = before_label if name == "before" else name
            print(f"{label:<28} {ms[name]:>10.3f} {ms['export'] / ms[name]:>9.2f}× {ms['before'] / ms[name]:>9.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
