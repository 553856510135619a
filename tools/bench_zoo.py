#!/usr/bin/env python
"""Latency of every zoo model: training export, onnxrep's output, and the hand-written deploy form.

    python tools/bench_zoo.py [--models a,b] [--forms legacy,legacy-nofold,dynamo]
                              [--batches 1,8] [--runs 100] [--warmup 20] [--threads 1]
                              [--static-batch]

For each model and exporter form (symbolic batch; ``--static-batch``: one export per batch with
that batch fixed), three graphs are exported or made:

- ``train``: the training-time model as that exporter writes it;
- ``ours``: ``onnxrep.optimize`` of ``train``;
- ``deploy``: the model's hand-written deploy conversion (every block's own ``switch_to_deploy``,
  the paper's code; ``ZooEntry.build_deploy``) exported the same way.

Timing: ``onnxrep.bench``, ONNX Runtime CPU at its default graph optimizations (what deployments
run), ``--threads`` intra-op threads, warm-up, then interleaved round-robin runs, medians, per
batch.  Two calls per row:

1. ``[train, ours]`` gives ``speedup`` = train / ours (the before/after of optimize);
2. ``[ours, deploy, ours', deploy']``, where the primed graphs are byte-identical copies, gives
   ``vs deploy`` = the geometric mean of ours / deploy and ours' / deploy' (below 1: onnxrep's
   output is faster than the hand-written deploy).  The round-robin order is cyclic, so each
   graph always runs right after the same predecessor; in this order every ours-run follows a
   deploy-run and vice versa, and no large training graph sits in the cycle to evict the caches
   of whichever graph follows it.

Noise band, A/A: the same graph timed against its own copy in that same interleaving.  ``A/A``
shows deploy' / deploy and ours' / ours; their distance from 1 is the noise of one ratio.  The
run's band is the 90th percentile of |A/A - 1| over every row, batch and twin (the largest is
printed too); a ``vs deploy`` ratio at most ``1 + band`` counts as "<= 1.00 within noise".

Nodes: raw node counts train -> ours (deploy), and the node counts of ours / deploy after ONNX
Runtime's own optimizer (read back from ``SessionOptions.optimized_model_filepath`` at the default
level), with the number of fused ``Gelu`` kernels in each where there are any.  Where a ``vs
deploy`` ratio is above 1.00 the ``why`` column lists how the two ORT-optimized graphs differ (op
types with different counts), or says they are the same graph (noise).  The last lines give the
noise band and the geometric means of the ratios.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import onnxrep  # noqa: E402
from onnxrep.bench import bench  # noqa: E402
from models import ZOO  # noqa: E402
from models.export import FORMS, export_onnx  # noqa: E402

VS_DEPLOY = ("ours", "deploy", "ours'", "deploy'")


def ort_optimized_ops(path: Path, threads: int) -> Counter:
    """Op histogram of the graph ONNX Runtime actually runs (CPU, default optimization level)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    out = path.with_name(path.stem + ".ort.onnx")
    so.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node)


def why(ours: Counter, deploy: Counter) -> str:
    """The op types whose counts differ between the two ORT-optimized graphs ("same ORT graph"
    means the same op-type counts; attributes are not compared)."""
    diff = [f"{op} {ours.get(op, 0)} vs {deploy.get(op, 0)}"
            for op in sorted(set(ours) | set(deploy)) if ours.get(op, 0) != deploy.get(op, 0)]
    return "ORT graph: " + ", ".join(diff) if diff else "same ORT graph: noise"


def prepare(name: str, form: str, root: Path, threads: int, batch: int | None) -> dict:
    """Export train and deploy (static ``batch``, or a symbolic batch when None), optimize train;
    return paths and node counts."""
    entry = ZOO[name]
    d = root / name / form / f"b{batch or 'N'}"
    shape = entry.input_shape if batch is None else (batch, *entry.input_shape[1:])
    train = export_onnx(entry.build(), shape, d / "train.onnx", form,
                        dynamic_batch=batch is None)
    deploy = export_onnx(entry.build_deploy(), shape, d / "deploy.onnx", form,
                         dynamic_batch=batch is None)
    ours = d / "ours.onnx"
    model, report = onnxrep.optimize(str(train), return_report=True)
    onnxrep.io.save_model(model, ours)
    nodes = {"train": report.before["nodes"], "ours": report.after["nodes"],
             "deploy": len(onnx.load(str(deploy), load_external_data=False).graph.node)}
    ort_ops = {"ours": ort_optimized_ops(ours, threads), "deploy": ort_optimized_ops(deploy, threads)}
    return {"train": train, "vs_deploy": [ours, deploy, _twin(ours), _twin(deploy)],
            "nodes": nodes, "ort_ops": ort_ops}


def _twin(path: Path) -> Path:
    """A byte-identical copy of ``path`` (and its external data) in a sibling folder, same name,
    so that the dynamo form's relative ``.data`` reference still resolves."""
    twin = path.parent / "twin" / path.name
    twin.parent.mkdir(exist_ok=True)
    for f in path.parent.glob(path.name + "*"):
        if f.is_file():
            shutil.copyfile(f, twin.parent / f.name)
    return twin


def medians(paths, names, args, shape, batches) -> dict:
    """{(batch, index): median ms} of one interleaved bench call."""
    res = bench([str(p) for p in paths], providers=("cpu",), batches=batches,
                threads=args.threads, warmup=args.warmup, runs=args.runs,
                input_shapes={"input": list(shape)}, names=list(names))
    return {(r["batch"], r["model"]): r.get("median_ms") for r in res["latency"]
            if r["precision"] == "fp32" and r["status"] == "ok"}


def geomean(xs) -> float:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(sorted(ZOO)))
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--static-batch", action="store_true",
                    help="export every graph once per batch with that batch fixed (default: one "
                         "export with a symbolic batch)")
    args = ap.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    forms = [f for f in args.forms.split(",") if f]
    bad = [n for n in names if n not in ZOO] + [f for f in forms if f not in FORMS]
    if bad:
        print(f"error: unknown model or form: {', '.join(bad)}", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",")]
    root = Path(tempfile.mkdtemp(prefix="onnxrep-benchzoo-"))

    head = " | ".join(f"b{b} speedup | b{b} vs deploy | b{b} A/A" for b in batches)
    print(f"| model | form | nodes train → ours (deploy) | ORT nodes ours / deploy (Gelu) | {head} "
          f"| why |")
    print("|---|---|---|---|" + "---:|" * (3 * len(batches)) + "---|")
    node_ratios, ratios, aa = [], {b: [] for b in batches}, []
    try:
        for name in names:
            for form in forms:
                shape = ZOO[name].input_shape
                before, vs, info = {}, {}, None
                for group in ([[b] for b in batches] if args.static_batch else [batches]):
                    info_b = prepare(name, form, root, args.threads,
                                     group[0] if args.static_batch else None)
                    info = info or info_b
                    # a static-batch export has that batch fixed in its input: the shape must say so
                    shp = (group[0], *shape[1:]) if args.static_batch else shape
                    before.update(medians([info_b["train"], info_b["vs_deploy"][0]],
                                          ("train", "ours"), args, shp, group))
                    vs.update(medians(info_b["vs_deploy"], VS_DEPLOY, args, shp, group))
                n, o = info["nodes"], info["ort_ops"]
                node_ratios.append(n["ours"] / n["deploy"])
                cells, over = [], False
                for b in batches:
                    t = [vs.get((b, i)) for i in range(4)]
                    t_train, t_after = before.get((b, 0)), before.get((b, 1))
                    if not all(t) or not (t_train and t_after):
                        cells.append("- | - | -")
                        continue
                    r = math.sqrt(t[0] / t[1] * t[2] / t[3])
                    aa_dep, aa_ours = t[3] / t[1], t[2] / t[0]
                    ratios[b].append(r)
                    aa += [aa_dep, aa_ours]
                    over = over or r > 1.0
                    cells.append(f"{t_train / t_after:.2f}× | {r:.3f} | {aa_dep:.3f}, {aa_ours:.3f}")
                gelu = f"{o['ours'].get('Gelu', 0)}/{o['deploy'].get('Gelu', 0)}"
                ort_nodes = (f"{sum(o['ours'].values())} / {sum(o['deploy'].values())}"
                             + (f" ({gelu})" if gelu != "0/0" else ""))
                note = why(o["ours"], o["deploy"]) if over else ""
                print(f"| {name} | {form} | {n['train']} → {n['ours']} ({n['deploy']}) | "
                      f"{ort_nodes} | {' | '.join(cells)} | {note} |", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    dev = sorted(abs(a - 1) for a in aa)
    band = dev[min(len(dev) - 1, int(math.ceil(0.9 * len(dev))) - 1)] if dev else float("nan")
    every = [r for b in batches for r in ratios[b]]
    print()
    print(f"Noise band: 90th percentile of |A/A - 1| over {len(dev)} A/A ratios = {band:.3f} "
          f"(largest {max(dev, default=float('nan')):.3f}).  vs deploy above 1 + band: "
          f"{sum(r > 1 + band for r in every)} of {len(every)}; above 1.00: "
          f"{sum(r > 1 for r in every)}.")
    per_batch = ", ".join(f"b{b} {geomean(ratios[b]):.3f}" for b in batches)
    print(f"Geometric mean, ours / hand-written deploy: latency {geomean(every):.3f} "
          f"({per_batch}); nodes {geomean(node_ratios):.3f}; A/A {geomean(aa):.3f}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
