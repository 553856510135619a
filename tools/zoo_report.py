#!/usr/bin/env python
"""Optimize every zoo model in every exporter form and print the results as a Markdown table.

    python tools/zoo_report.py [--models a,b] [--forms legacy,dynamo] [--rm] [--out DIR]

For each (model, form): nodes before → after, the op histogram after, parameters and MACs
before → after, the verification error against the input graph (ONNX Runtime, optimizations
off), whether the entry's documented deploy_ops were reached, and the optimize time.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import onnxrep  # noqa: E402
from onnxrep import units  # noqa: E402
from models import ZOO, check_deploy_ops  # noqa: E402
from models.export import FORMS, export_onnx  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(sorted(ZOO)))
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--rm", action="store_true", help="enable rm_residual and compare with extra_deploy_ops['rm']")
    ap.add_argument("--out", help="keep the exports here (default: a temporary directory)")
    args = ap.parse_args(argv)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="onnxrep-zoo-"))
    print("| model | form | nodes | ops after | params | MACs | max rel err | deploy form | time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        entry = ZOO[name]
        model = entry.build()
        for form in args.forms.split(","):
            path = export_onnx(model, entry.input_shape, root / name / f"{form}.onnx", form)
            t0 = time.perf_counter()
            enable = ["rm_residual"] if args.rm else None
            out, rep = onnxrep.optimize(str(path), enable=enable, return_report=True)
            dt = time.perf_counter() - t0
            want = entry.extra_deploy_ops.get("rm") if args.rm and "rm" in entry.extra_deploy_ops else entry.deploy_ops
            ok = "yes" if not check_deploy_ops(want, rep.after["ops"]) else "NO"
            ops = " ".join(f"{k}×{v}" for k, v in sorted(rep.after["ops"].items()))
            b, a = rep.before, rep.after
            print(f"| {name} | {form} | {b['nodes']} → {a['nodes']} | {ops} | {units.count(b['parameters'])} → {units.count(a['parameters'])} "
                  f"| {units.count(b['macs'])} → {units.count(a['macs'])} | {rep.verification['max_rel_error']:.1e} | {ok} | {dt:.2f} s |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
