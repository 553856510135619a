#!/usr/bin/env python
"""How does optimize time grow with the node count? (issue 12, item 7: the engine must be linear)

    python tools/bench_engine.py                              # 1k, 5k, 10k, 25k, 50k nodes
    python tools/bench_engine.py --sizes 1,5,50 --verify      # thousands of nodes; with ORT check
    python tools/bench_engine.py --kind plain --sizes 5,50    # a chain with nothing to rewrite
    python tools/bench_engine.py --sizes 5,50 --walk          # the price of touching a node

Each size is a generated chain of small blocks (8 channels at 8×8, so weights and ONNX Runtime
cost little and the graph bookkeeping is what is measured), written to a temp file and optimized
in a fresh subprocess with `onnxrep.optimize_file` (verification off unless --verify). Kinds:

  mixed   repeating units of RepVGG blocks (3×3+BN, 1×1+BN, BN identity → Add, Add → Relu),
          Conv→Relu, Conv→BN→Relu and Identity: 16 nodes per unit, 8 after optimizing
  plain   Conv→Relu only: nothing for the rules to do, every node still visited

Printed per size: nodes before/after, seconds for the whole optimize, for the rules (engine.run),
for prepare (import, shape inference, constant folding), the rest (open, statistics, export,
checker, save), seconds per 1k nodes, the fastest run, and the CPU seconds of the whole optimize
(the process's own CPU time: on a shared machine it leaves out the time spent waiting for a core,
which wall time includes). With --repeat N every size runs N times, rounds interleaved, and the
median (--stat median, the default) or the fastest (--stat min) of each column is shown (the
machine this was written on is shared and noisy). The goal lines compare the largest size with
the one nearest 10× smaller (issue: 50k nodes in ≤ 10× the time of 5k), for the whole optimize,
its CPU time and the rules alone.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

C, HW = 8, 8


# -- the generated models ------------------------------------------------------------------------
class _Chain:
    def __init__(self, seed: int):
        from onnx import helper

        self.helper = helper
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.n = [], [], 0

    def _name(self, hint):
        self.n += 1
        return f"{hint}_{self.n}"

    def _const(self, arr):
        from onnx import numpy_helper

        name = self._name("w")
        self.inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    def op(self, op, inputs, **attrs):
        name = self._name(op)
        self.nodes.append(self.helper.make_node(op, inputs, [name + "_out"], name=name, **attrs))
        return name + "_out"

    def conv(self, x, k):
        w = self._const(self.rng.standard_normal((C, C, k, k)) / np.sqrt(C * k * k))
        b = self._const(self.rng.standard_normal(C) * 0.1)
        p = k // 2
        return self.op("Conv", [x, w, b], kernel_shape=[k, k], pads=[p, p, p, p])

    def bn(self, x):
        params = [self._const(self.rng.uniform(0.5, 1.5, C)), self._const(self.rng.standard_normal(C) * 0.1),
                  self._const(self.rng.standard_normal(C) * 0.1), self._const(self.rng.uniform(0.5, 2.0, C))]
        return self.op("BatchNormalization", [x] + params, epsilon=1e-5)

    # units: (builder, nodes before, nodes after)
    def repvgg(self, x):
        y = self.op("Add", [self.op("Add", [self.bn(self.conv(x, 3)), self.bn(self.conv(x, 1))]), self.bn(x)])
        return self.op("Relu", [y])

    def conv_relu(self, x):
        return self.op("Relu", [self.conv(x, 3)])

    def conv_bn_relu(self, x):
        return self.op("Relu", [self.bn(self.conv(x, 3))])

    def identity(self, x):
        return self.op("Identity", [x])


KINDS = {  # unit: (method names, nodes per unit)
    "mixed": (("repvgg", "conv_relu", "conv_bn_relu", "conv_relu", "identity"), 16),
    "plain": (("conv_relu",), 2),
}


def make_chain(path: Path, nodes: int, kind: str = "mixed", seed: int = 0) -> int:
    """Write a chain of about `nodes` nodes of `kind` to `path`; returns the exact node count."""
    import onnx
    from onnx import TensorProto, helper

    b = _Chain(seed)
    parts, per_unit = KINDS[kind]
    x = "input"
    for _ in range(max(1, round(nodes / per_unit))):
        for part in parts:
            x = getattr(b, part)(x)
    graph = helper.make_graph(b.nodes, f"chain_{kind}",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, C, HW, HW])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, C, HW, HW])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench_engine")
    model.ir_version = 8
    onnx.save(model, str(path))
    return len(b.nodes)


# -- the worker (a fresh process per size) -------------------------------------------------------
def _walk_worker(src: str) -> dict:
    """The price of touching a node: a read-only walk over a prepared graph (every node, the
    reader and producer counts of its tensors; the same work per node at any size), fastest of 5.
    Where its time per node rises with the graph's size, so does every pass's (the CPU caches)."""
    import time

    import onnxrep.rules  # noqa: F401
    from onnxrep import optimizer as O
    from onnxrep.io import open_model

    _, graph = O.prepare(open_model(src))

    def walk():
        k = 0
        for n in graph.nodes:
            for t in n.inputs:
                k += len(t.inputs) + len(t.outputs)
            for t in n.outputs:
                k += len(t.outputs)
        return k

    def fastest(fn) -> float:
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    import onnx

    n = len(graph.nodes)
    row = {"nodes": n, "walk_us_per_node": 1e6 * fastest(walk) / n}
    # onnx's own passes over the input model (C++, no onnxrep code): the same effect, outside it
    model = onnx.load(src)
    m = len(model.graph.node)
    row["serialize_us_per_node"] = 1e6 * fastest(model.SerializeToString) / m
    row["infer_us_per_node"] = 1e6 * fastest(lambda: onnx.shape_inference.infer_shapes(
        model, check_type=True, strict_mode=True)) / m
    row["checker_us_per_node"] = 1e6 * fastest(lambda: onnx.checker.check_model(model)) / m
    return row


def _worker(src: str, dst: str, verify: bool, profile: str | None) -> dict:
    import onnxruntime  # noqa: F401  (imports are not part of the measured work)

    import onnxrep
    import onnxrep.rules  # noqa: F401
    from onnxrep import engine as E, optimizer as O

    spent = {"engine": 0.0, "prepare": 0.0}

    def timed(key, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
        return wrapper

    E.run = timed("engine", E.run)  # the optimizer looks both up at call time
    O.prepare = timed("prepare", O.prepare)
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t, cpu = time.perf_counter(), time.process_time()
    report = onnxrep.optimize_file(src, dst, verify=verify)
    total, cpu = time.perf_counter() - t, time.process_time() - cpu
    if prof is not None:
        prof.disable()
        prof.dump_stats(profile)
    return {"seconds": total, "cpu": cpu, "engine": spent["engine"], "prepare": spent["prepare"],
            "before": report.before["nodes"], "after": report.after["nodes"],
            "verify": (report.verification or {}).get("seconds")}


def measure(src: Path, verify: bool, profile: str | None = None) -> dict:
    dst = src.with_name(src.stem + "_opt.onnx")
    cmd = [sys.executable, __file__, "--worker", str(src), str(dst)] + (["--verify"] if verify else []) \
        + (["--profile", profile] if profile else [])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise SystemExit(f"worker failed on {src.name}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,5,10,25,50", help="node counts in thousands, comma-separated")
    ap.add_argument("--kind", choices=sorted(KINDS), default="mixed")
    ap.add_argument("--verify", action="store_true", help="include the ONNX Runtime verification")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds over all sizes (interleaved: each round runs every size once); medians shown")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="how the rounds of a size are summed up, column by column")
    ap.add_argument("--profile", metavar="PREFIX", help="write a cProfile of each size to PREFIX_<nodes>.prof")
    ap.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    ap.add_argument("--walk", action="store_true",
                    help="instead: time a read-only walk over each prepared graph (µs per node, fastest of 5)")
    ap.add_argument("--worker", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(_walk_worker(a.worker[0]) if a.walk else _worker(*a.worker, a.verify, a.profile)))
        return 0
    if a.walk:
        return _walks(a)
    sizes = [int(float(s) * 1000) for s in a.sizes.split(",") if s.strip()]
    print(f"kind {a.kind}, verification {'on' if a.verify else 'off'}, "
          f"{a.repeat} round{'s' if a.repeat > 1 else ''} ({a.stat + 's' if a.stat == 'median' else 'fastest'})")
    with tempfile.TemporaryDirectory() as tmp:
        models = []
        for n in sizes:
            src = Path(tmp) / f"chain_{a.kind}_{n}.onnx"
            make_chain(src, n, a.kind)
            models.append(src)
        runs: list[list[dict]] = [[] for _ in sizes]
        for _ in range(a.repeat):
            for i, src in enumerate(models):
                prof = f"{a.profile}_{sizes[i]}.prof" if a.profile else None
                runs[i].append(measure(src, a.verify, prof))
    rows = []
    print(f"{'nodes':>7} {'after':>7} {'total s':>8} {'rules s':>8} {'prepare s':>9} {'rest s':>7}"
          f" {'s / 1k nodes':>12} {'min s':>7} {'CPU s':>7}")
    stat = statistics.median if a.stat == "median" else min
    for n, rs in zip(sizes, runs):
        med = {k: stat(r[k] for r in rs) for k in ("seconds", "engine", "prepare", "cpu")}
        r = {"requested": n, "before": rs[0]["before"], "after": rs[0]["after"], **med,
             "min_seconds": min(x["seconds"] for x in rs), "runs": rs}
        rows.append(r)
        rest = r["seconds"] - r["engine"] - r["prepare"]
        print(f"{r['before']:>7} {r['after']:>7} {r['seconds']:>8.2f} {r['engine']:>8.2f} {r['prepare']:>9.2f}"
              f" {rest:>7.2f} {1000 * r['seconds'] / r['before']:>12.3f} {r['min_seconds']:>7.2f} {r['cpu']:>7.2f}")
    big = rows[-1]
    small = min(rows, key=lambda r: abs(r["before"] * 10 - big["before"]))
    if small is not big:
        scale = big["before"] / small["before"]
        for what, key in (("optimize", "seconds"), ("optimize, CPU time", "cpu"), ("the rules (engine.run)", "engine")):
            ratio = big[key] / small[key]
            print(f"{what}: {big['before']} nodes take {ratio:.1f}× the time of {small['before']} "
                  f"({scale:.1f}× the nodes; goal ≤ {scale:.0f}×): {'met' if ratio <= scale else 'NOT met'}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


def _walks(a) -> int:
    sizes = [int(float(s) * 1000) for s in a.sizes.split(",") if s.strip()]
    rows: list[list[dict]] = [[] for _ in sizes]
    with tempfile.TemporaryDirectory() as tmp:
        models = []
        for n in sizes:
            models.append(Path(tmp) / f"chain_{a.kind}_{n}.onnx")
            make_chain(models[-1], n, a.kind)
        for _ in range(a.repeat):
            for i, src in enumerate(models):
                cmd = [sys.executable, __file__, "--walk", "--worker", str(src), str(src)]
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
                if out.returncode:
                    raise SystemExit(f"worker failed on {src.name}:\n{out.stderr[-2000:]}")
                rows[i].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"kind {a.kind}: read-only walk over the prepared graph, fastest of 5 per process, "
          f"fastest of {a.repeat} processes")
    cols = [("walk_us_per_node", "walk"), ("serialize_us_per_node", "onnx save"),
            ("infer_us_per_node", "onnx infer"), ("checker_us_per_node", "onnx check")]
    print("µs per node; the onnx columns are onnx's own C++ passes over the input model")
    print(f"{'nodes':>7} " + " ".join(f"{label:>11}" for _, label in cols))
    best = [{k: min(r[k] for r in rs) for k, _ in cols} for rs in rows]
    for rs, b in zip(rows, best):
        print(f"{rs[0]['nodes']:>7} " + " ".join(f"{b[k]:>11.3f}" for k, _ in cols))
    if len(rows) > 1:
        ratio = rows[-1][0]["nodes"] / rows[0][0]["nodes"]
        print(f"time for {ratio:.1f}x the nodes: " + ", ".join(
            f"{label} {ratio * best[-1][k] / best[0][k]:.1f}x" for k, label in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
