"""The measuring half of `onnxrep bench`: ONNX Runtime sessions, agreement/accuracy, timing.

`onnxrep.bench` prepares everything (models on disk, input arrays, which variant runs at which
batch) and hands one execution provider at a time to `execute`, normally in a fresh child process:

    python -m onnxrep.bench_worker REQUEST.pkl RESULT.pkl

Why a child process: timed runs are interleaved round-robin across the models, so that machine
noise hits all of them equally. With ONNX Runtime's default per-session thread pools, the intra-op
threads of the session that just ran keep spinning (busy-waiting for more work) while the next
session runs, and steal its cores: interleaved CPU latencies came out 1.5-2x higher than the same
session timed alone. One pool shared by all sessions removes that interference and keeps spinning
on, as in deployment. But a process-wide pool is one-way: once it exists, every later session in
that process that asks for its own threads (the default) fails to load. So the shared pool lives in
a throw-away process, never in the caller's. In-process mode (`isolate=False`) uses per-session
pools with spinning turned off instead, and says so.

A child also turns an execution provider that crashes the process into a skipped provider.

Requests and results are plain dicts of numbers, strings and NumPy arrays (pickled between our own
processes, in our own temporary directory).
"""
from __future__ import annotations

import os
import pickle
import sys
import time
import traceback

import numpy as np

from .bench_metrics import Accuracy, Agreement, class_scores, summarize_agreement

OPT_LEVELS = {
    "all": "ORT_ENABLE_ALL",
    "extended": "ORT_ENABLE_EXTENDED",
    "basic": "ORT_ENABLE_BASIC",
    "disable": "ORT_DISABLE_ALL",
}


def first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line[:400]
    return type(e).__name__


class _Ticker:
    """Progress callback throttled to ~10 updates a second."""

    def __init__(self, callback, total: int, label: str):
        self.callback = callback
        self.total = max(total, 1)
        self.label = label
        self.done = 0
        self.last = 0.0

    def step(self, n: int = 1, label: str | None = None) -> None:
        self.done += n
        if label:
            self.label = label
        if self.callback is None:
            return
        now = time.monotonic()
        if now - self.last >= 0.1 or self.done >= self.total:
            self.last = now
            self.callback(min(self.done, self.total), self.total, self.label)


def _session_options(ort, req: dict, shared_pool: bool):
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[req["ort_opt"]])
    so.log_severity_level = 3
    threads = req.get("threads")
    if shared_pool:
        so.use_per_session_threads = False
    else:
        if threads:
            so.intra_op_num_threads = int(threads)
        if threads != 1:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def _setup_shared_pool(ort, threads) -> str | None:
    """Create the process-wide intra-op pool; return None on success, else the reason it failed."""
    setter = getattr(ort, "set_global_thread_pool_sizes", None)
    if setter is None:
        try:
            from onnxruntime.capi._pybind_state import set_global_thread_pool_sizes as setter
        except ImportError:
            return "this onnxruntime has no global thread pool API"
    try:
        setter(int(threads or 0), 1)
    except Exception as e:  # pools already exist in this process
        return first_line(e)
    return None


def _run(sess, feeds: dict, n: int, static_batch: int | None, unbatched: set) -> list:
    """Run `n` samples; a static-batch model gets them in pieces of its batch (last one padded)."""
    if static_batch is None or static_batch == n:
        return sess.run(None, feeds)
    s = static_batch
    parts = []
    for i in range(0, n, s):
        m = min(s, n - i)
        piece = {}
        for k, a in feeds.items():
            if k in unbatched:
                piece[k] = a
                continue
            p = a[i:i + m]
            if m < s:
                p = np.concatenate([p, np.repeat(p[-1:], s - m, axis=0)])
            piece[k] = p
        outs = sess.run(None, piece)
        parts.append([(o[:m], True) if (o.ndim and o.shape[0] == s) else (o, False) for o in outs])
    result = []
    for j, (first, batched) in enumerate(parts[0]):
        result.append(np.concatenate([p[j][0] for p in parts]) if batched else first)
    return result


def _match_outputs(names: list[str], ref_names: list[str]) -> tuple[list[tuple[int, int]] | None, str | None]:
    """Pairs (candidate index, reference index): by name, else by position."""
    if set(ref_names) <= set(names):
        return [(names.index(r), j) for j, r in enumerate(ref_names)], None
    if len(names) == len(ref_names):
        return [(j, j) for j in range(len(names))], None
    return None, (f"outputs differ: {', '.join(names)} vs reference {', '.join(ref_names)}")


def execute(req: dict, progress=None, shared_pool: bool = True) -> dict:
    """Benchmark every variant of `req` on one execution provider. See onnxrep.bench for the request."""
    import onnxruntime as ort

    res: dict = {"variants": {}, "quality": {}, "timing": {}, "timing_skipped": {}, "notes": []}
    pool_problem = _setup_shared_pool(ort, req.get("threads")) if shared_pool else "not isolated"
    if shared_pool and pool_problem:
        res["notes"].append(f"could not create a shared thread pool ({pool_problem}); "
                            "used per-session pools without spinning")
        shared_pool = False
    res["thread_pool"] = "shared" if shared_pool else ("single-threaded" if req.get("threads") == 1 else "per-session, spinning off")
    so = _session_options(ort, req, shared_pool)
    target = req["ep"]
    chain = req["ep_chain"]
    variants = req["variants"]
    status = {v["key"]: ["ok", None] for v in variants}
    sessions = {}
    session_providers = None

    n_eval = req["eval"]["num"]
    chunk = max(1, int(req["eval"]["chunk"]))
    n_chunks = -(-n_eval // chunk)
    total = len(variants) * (1 + n_chunks) + sum(
        (req["warmup"] + req["runs"]) * len(t["variants"]) for t in req["timing"])
    tick = _Ticker(progress, total, f"{req['provider']}: loading")

    for v in variants:
        key = v["key"]
        tick.step(label=f"{req['provider']}: loading {v['label']}")
        try:
            sess = ort.InferenceSession(v["path"], so, providers=chain, enable_fallback=0)
        except Exception as e:
            status[key] = ["error" if v.get("required") else "skipped", f"session creation failed: {first_line(e)}"]
            continue
        got = sess.get_providers()
        if target not in got:
            status[key] = ["skipped", f"{target} was not used: the session fell back to {', '.join(got)} "
                                      "(no device, or the provider's libraries failed to load)"]
            continue
        sessions[key] = sess
        session_providers = session_providers or got
    res["session_providers"] = session_providers

    # ---- agreement and accuracy, chunk by chunk ------------------------------------------------
    ev = req["eval"]
    labels = ev.get("labels")
    unbatched = set(ev.get("unbatched", ()))
    by_key = {v["key"]: v for v in variants}
    agreements: dict[str, list | None] = {}
    agree_reason: dict[str, str] = {}
    accuracy: dict[str, Accuracy | None] = {}
    acc_reason: dict[str, str] = {}
    out_names = {k: [o.name for o in s.get_outputs()] for k, s in sessions.items()}
    for start in range(0, n_eval, chunk):
        n = min(chunk, n_eval - start)
        feeds = {k: (a if k in unbatched else a[start:start + n]) for k, a in ev["inputs"].items()}
        outs = {}
        for v in variants:
            key = v["key"]
            if status[key][0] != "ok":
                tick.step()
                continue
            try:
                outs[key] = _run(sessions[key], feeds, n, v.get("static_batch"), unbatched)
            except Exception as e:
                status[key] = ["error" if v.get("required") else "skipped", f"run failed: {first_line(e)}"]
                sessions.pop(key, None)
            tick.step(label=f"{req['provider']}: comparing outputs")
        for key, o in outs.items():
            v = by_key[key]
            ref = v.get("reference")
            if ref is not None and key not in agree_reason:
                if ref not in outs:
                    agree_reason[key] = f"reference {by_key[ref]['label']} did not run: {status[ref][1]}"
                    agreements[key] = None
                else:
                    if key not in agreements:
                        pairs, why = _match_outputs(out_names[key], out_names[ref])
                        if pairs is None:
                            agree_reason[key] = why
                            agreements[key] = None
                        else:
                            agreements[key] = [(i, j, Agreement(out_names[key][i], out_names[ref][j])) for i, j in pairs]
                    for i, j, acc in agreements[key] or ():
                        acc.update(o[i], outs[ref][j], n)
            if labels is not None and key not in acc_reason:
                if key not in accuracy:
                    idx = next((i for i, a in enumerate(o) if class_scores(a, n) is not None), None)
                    if idx is None:
                        acc_reason[key] = "no output with a class axis (N, C)"
                        continue
                    accuracy[key] = (idx, Accuracy(out_names[key][idx]))
                idx, acc = accuracy[key]
                scores = class_scores(o[idx], n)
                if scores is None:
                    acc_reason[key] = f"output {acc.name!r} has no class axis in every chunk"
                    continue
                acc.update(scores, labels[start:start + n])

    for v in variants:
        key = v["key"]
        q: dict = {"num_samples": n_eval}
        if status[key][0] == "ok":
            if v.get("reference") is not None:
                if agreements.get(key):
                    q["agreement"] = summarize_agreement([a.result() for _, _, a in agreements[key]])
                else:
                    q["agreement"] = None
                    q["agreement_reason"] = agree_reason.get(key, "no samples")
            if labels is not None:
                if key in accuracy and key not in acc_reason:
                    q["accuracy"] = accuracy[key][1].result()
                    q["accuracy_output"] = accuracy[key][1].name
                else:
                    q["accuracy"] = None
                    q["accuracy_reason"] = acc_reason.get(key, "no samples")
        res["quality"][key] = q

    # ---- timing: warm-up, then interleaved round-robin -----------------------------------------
    warmup, runs = int(req["warmup"]), int(req["runs"])
    for tb in req["timing"]:
        b = tb["batch"]
        feeds = tb["feeds"]
        skipped: dict[str, str] = {}
        keys = []
        for key in tb["variants"]:
            if status[key][0] == "ok":
                keys.append(key)
            else:
                skipped[key] = status[key][1]
                tick.step(warmup + runs)
        label = f"{req['provider']}: batch {b}"

        def fail(key, e, keys=keys, skipped=skipped, b=b):
            skipped[key] = f"run failed at batch {b}: {first_line(e)}"
            keys.remove(key)

        for _ in range(warmup):
            for key in list(keys):
                try:
                    sessions[key].run(None, feeds)
                except Exception as e:
                    fail(key, e)
                    tick.step(warmup + runs)
                    continue
                tick.step(label=f"{label}: warm-up")
        times = {key: np.zeros(runs, dtype=np.int64) for key in keys}
        perf = time.perf_counter_ns
        for r in range(runs):
            if not keys:
                break
            k = r % len(keys)
            for key in keys[k:] + keys[:k]:
                sess = sessions[key]
                try:
                    t0 = perf()
                    sess.run(None, feeds)
                    t1 = perf()
                except Exception as e:
                    fail(key, e)
                    tick.step(runs - r)
                    continue
                times[key][r] = t1 - t0
            tick.step(len(keys), label=f"{label}: timed runs")
        res["timing"][b] = {key: times[key] for key in keys}
        res["timing_skipped"][b] = skipped

    res["variants"] = {k: {"status": s, "reason": r} for k, (s, r) in status.items()}
    return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m onnxrep.bench_worker REQUEST.pkl RESULT.pkl", file=sys.stderr)
        return 2
    req_path, res_path = argv
    with open(req_path, "rb") as f:
        req = pickle.load(f)

    def progress(done, total, label):
        print(f"@progress {done} {total} {label}", flush=True)

    try:
        res = execute(req, progress, shared_pool=True)
    except BaseException as e:  # reported to the parent, which decides what it means
        res = {"fatal": f"{type(e).__name__}: {first_line(e)}", "traceback": traceback.format_exc()}
    tmp = res_path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(res, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, res_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
