#!/usr/bin/env python
"""Transformer zoo before/after: latency, nodes, MatMul/Gemm and BatchNormalization counts.

    python tools/bench_transformers.py [--models levit,...] [--batches 1,8] [--runs 200] [--threads 1]

Each model of models/transformers.py is exported in its training-time form (legacy exporter, no
constant folding, dynamic batch), optimized by onnxrep, and, where the paper's code has a deploy
conversion (LeViT's Linear_BN.fuse, loralib's merge), that hand-converted model is exported too.
All are timed side by side with `onnxrep.bench` (ONNX Runtime CPU, deployed optimization level,
interleaved runs, medians). Prints Markdown tables; speedups are training-time median / this one.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import onnx  # noqa: E402

import onnxrep  # noqa: E402
from onnxrep.bench import bench  # noqa: E402
from models import ZOO  # noqa: E402
from models.export import export_onnx  # noqa: E402

FOLDS = ("fold_linear_affine", "fold_branch_into_slice", "fold_attention_scale")  # the "folds" column
MODELS = ("levit", "vit_layerscale", "convnext", "lora_mlp", "lora_attention", "lora_qkv", "lora_merged", "mlp_mixer")


def wide(name: str, dim: int, side: int):
    """The zoo block at width `dim` on side×side tokens (the zoo's own are 16 wide, 16–64 tokens)."""
    from functools import partial

    from models.common import calibrate
    from models import transformers as T

    import torch

    make = {"levit": partial(T.LeViTBlock, dim, heads=dim // 32, key_dim=16),
            "vit_layerscale": partial(T.ViTLayerScaleBlock, dim, heads=dim // 64, mlp_ratio=4),
            "convnext": partial(T.ConvNeXtBlock, dim),
            "lora_mlp": partial(T.LoRAMLP, dim, 4 * dim),
            "lora_attention": partial(T.LoRAAttention, dim, heads=dim // 64),
            "lora_qkv": partial(T.LoRAQKVAttention, dim, heads=dim // 64),
            "lora_merged": partial(T.LoRAMergedAttention, dim, heads=dim // 64),
            "mlp_mixer": partial(T.MixerBlock, dim, tokens=side * side, token_hidden=side * side // 2,
                                 channel_hidden=4 * dim)}[name]
    shape = (1, dim, side, side)
    torch.manual_seed(0)
    return calibrate(make(), shape), shape


def hand_converted(name, model):
    """The model after its paper's own deploy conversion, or None when the code has none."""
    m = copy.deepcopy(model)
    if hasattr(m, "switch_to_deploy"):
        m.switch_to_deploy()
    elif hasattr(m, "merge"):
        m.merge()
    else:
        return None
    return m


def counts(path) -> tuple[int, int, int, int]:
    """Nodes, MatMul+Gemm, BatchNormalization and Mul nodes."""
    h = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    return sum(h.values()), h["MatMul"] + h["Gemm"], h["BatchNormalization"], h["Mul"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dim", type=int, default=0, help="width (e.g. 192); default: the zoo's own small blocks")
    ap.add_argument("--side", type=int, default=14, help="with --dim: side×side tokens")
    ap.add_argument("--ort-opt", default="all", help="ORT optimization level while timing (all = as deployed)")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    root = Path(tempfile.mkdtemp(prefix="onnxrep-benchtr-"))
    structure, latency = [], []
    for name in args.models.split(","):
        if args.dim:
            model, input_shape = wide(name, args.dim, args.side)
        else:
            model, input_shape = ZOO[name].build(), ZOO[name].input_shape
        d = root / name
        train = export_onnx(model, input_shape, d / "train.onnx", "legacy-nofold", dynamic_batch=True)
        deploy = d / "deploy.onnx"
        report = onnxrep.optimize_file(str(train), str(deploy))  # verified in ORT before it is written
        paths = [train, deploy]
        hand_model = hand_converted(name, model)
        if hand_model is not None:
            paths.append(export_onnx(hand_model, input_shape, d / "hand.onnx", "legacy-nofold",
                                     dynamic_batch=True))
        c = [counts(p) for p in paths]
        hand = lambda i: f" ({c[2][i]})" if len(c) > 2 else ""  # noqa: E731
        structure.append(f"| {name} | {c[0][0]} → {c[1][0]}{hand(0)} | {c[0][1]} → {c[1][1]}{hand(1)} | "
                         f"{c[0][2]} → {c[1][2]}{hand(2)} | {c[0][3]} → {c[1][3]}{hand(3)} | "
                         f"{sum(report.rule_counts.get(r, 0) for r in FOLDS)} |")
        res = bench([str(p) for p in paths], providers=("cpu",), batches=batches, threads=args.threads,
                    warmup=args.warmup, runs=args.runs, input_shapes={"input": list(input_shape)},
                    ort_opt=args.ort_opt)
        cells = []
        for b in batches:
            rows = {r["model"]: r["median_ms"] for r in res["latency"]
                    if r["batch"] == b and r["precision"] == "fp32" and r["status"] == "ok"}
            t0, t1, t2 = rows.get(0), rows.get(1), rows.get(2)
            cell = f"{t0:.3f} | {t1:.3f} ({t0 / t1:.2f}×)"
            cell += f" | {t2:.3f} ({t0 / t2:.2f}×)" if t2 else " | -"
            cells.append(cell)
        rel = next(((q.get("agreement") or {}).get("rel_err") for q in res["quality"]
                    if q.get("model") == 1 and q.get("precision") == "fp32"), None)
        latency.append(f"| {name} | {' | '.join(cells)} | {rel:.1e} |" if rel is not None else
                       f"| {name} | {' | '.join(cells)} | - |")
        print(f"{name} done", file=sys.stderr, flush=True)
    print("| model | nodes | MatMul+Gemm | BatchNormalization | Mul | folds |")
    print("|---|---|---|---|---|---|")
    print("\n".join(structure))
    print()
    head = " | ".join(f"b{b} train ms | b{b} onnxrep ms (speedup) | b{b} hand ms (speedup)" for b in batches)
    print(f"| model | {head} | rel err |")
    print("|---|" + "---|" * (3 * len(batches)) + "---|")
    print("\n".join(latency))
    return 0


if __name__ == "__main__":
    sys.exit(main())
