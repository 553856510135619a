"""The measuring half of `onnxrep bench`: ONNX Runtime sessions, agreement/accuracy, timing.

The runner (onnxrep.bench.runner) prepares everything (models on disk, input arrays, which
variant runs at which batch) and hands one execution provider at a time to `execute`, normally in
a fresh child process:

    python -m onnxrep.bench.worker REQUEST.pkl RESULT.pkl

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

This module is what the child imports: numpy, onnxruntime and the small bench modules, never
onnx, onnx-graphsurgeon or the optimizer (`import onnxrep` is lazy about those).
"""
from __future__ import annotations

import os
import pickle
import sys
import time
import traceback

import numpy as np

from .metrics import Accuracy, Agreement, class_scores, summarize_agreement
from .protocol import VariantSpec, VariantStatus, WorkerRequest, WorkerResult, first_line
from .settings import OPT_LEVELS


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


# ---- sessions ----------------------------------------------------------------------------------
def _session_options(ort, req: WorkerRequest, shared_pool: bool):
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[req.ort_opt])
    so.log_severity_level = 3
    if shared_pool:
        so.use_per_session_threads = False
    else:
        if req.threads:
            so.intra_op_num_threads = int(req.threads)
        if req.threads != 1:
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


def _thread_pool(ort, req: WorkerRequest, res: WorkerResult, shared_pool: bool) -> bool:
    """Set up the shared pool when asked; record which kind of pool the sessions use."""
    problem = _setup_shared_pool(ort, req.threads) if shared_pool else None
    if problem:
        res.notes.append(f"could not create a shared thread pool ({problem}); "
                         "used per-session pools without spinning")
        shared_pool = False
    res.thread_pool = "shared" if shared_pool else ("single-threaded" if req.threads == 1 else "per-session, spinning off")
    return shared_pool


def _open_sessions(ort, req: WorkerRequest, so, res: WorkerResult, tick: _Ticker) -> dict:
    """One session per variant; a variant whose session fails or falls back to the CPU is marked."""
    sessions = {}
    for v in req.variants:
        tick.step(label=f"{req.provider}: loading {v.label}")
        try:
            sess = ort.InferenceSession(v.path, so, providers=req.ep_chain, enable_fallback=0)
        except Exception as e:
            res.variants[v.key] = _failed(v, f"session creation failed: {first_line(e)}")
            continue
        got = sess.get_providers()
        if req.ep not in got:
            res.variants[v.key] = VariantStatus("skipped", f"{req.ep} was not used: the session fell back to "
                                                           f"{', '.join(got)} (no device, or the provider's "
                                                           "libraries failed to load)")
            continue
        sessions[v.key] = sess
        res.session_providers = res.session_providers or got
    return sessions


def _failed(v: VariantSpec, reason: str) -> VariantStatus:
    return VariantStatus("error" if v.required else "skipped", reason)


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
            p = a if k in unbatched else a[i:i + m]
            if k not in unbatched and m < s:
                p = np.concatenate([p, np.repeat(p[-1:], s - m, axis=0)])
            piece[k] = p
        outs = sess.run(None, piece)
        parts.append([(o[:m], True) if (o.ndim and o.shape[0] == s) else (o, False) for o in outs])
    return [np.concatenate([p[j][0] for p in parts]) if batched else first
            for j, (first, batched) in enumerate(parts[0])]


# ---- agreement and accuracy, chunk by chunk -----------------------------------------------------
def _match_outputs(names: list[str], ref_names: list[str]) -> tuple[list[tuple[int, int]] | None, str | None]:
    """Pairs (candidate index, reference index): by name, else by position."""
    if set(ref_names) <= set(names):
        return [(names.index(r), j) for j, r in enumerate(ref_names)], None
    if len(names) == len(ref_names):
        return [(j, j) for j in range(len(names))], None
    return None, (f"outputs differ: {', '.join(names)} vs reference {', '.join(ref_names)}")


class _Quality:
    """Streaming agreement (against each variant's reference) and accuracy (against labels)."""

    def __init__(self, req: WorkerRequest, sessions: dict):
        self.labels = req.eval.labels
        self.by_key = {v.key: v for v in req.variants}
        self.out_names = {k: [o.name for o in s.get_outputs()] for k, s in sessions.items()}
        self.agreements: dict[str, list | None] = {}
        self.agree_reason: dict[str, str] = {}
        self.accuracy: dict[str, tuple[int, Accuracy]] = {}
        self.acc_reason: dict[str, str] = {}

    def update(self, outs: dict, status: dict, start: int, n: int) -> None:
        for key, o in outs.items():
            ref = self.by_key[key].reference
            if ref is not None and key not in self.agree_reason:
                self._agree(key, ref, o, outs, status, n)
            if self.labels is not None and key not in self.acc_reason:
                self._accuracy(key, o, self.labels[start:start + n], n)

    def _agree(self, key, ref, o, outs, status, n) -> None:
        if ref not in outs:
            why = status[ref].reason if ref in status else "not run"
            self.agree_reason[key] = f"reference {self.by_key[ref].label} did not run: {why}"
            self.agreements[key] = None
            return
        if key not in self.agreements:
            pairs, why = _match_outputs(self.out_names[key], self.out_names[ref])
            if pairs is None:
                self.agree_reason[key] = why
                self.agreements[key] = None
                return
            self.agreements[key] = [(i, j, Agreement(self.out_names[key][i], self.out_names[ref][j])) for i, j in pairs]
        for i, j, acc in self.agreements[key]:
            acc.update(o[i], outs[ref][j], n)

    def _accuracy(self, key, o, labels, n) -> None:
        if key not in self.accuracy:
            idx = next((i for i, a in enumerate(o) if class_scores(a, n) is not None), None)
            if idx is None:
                self.acc_reason[key] = "no output with a class axis (N, C)"
                return
            self.accuracy[key] = (idx, Accuracy(self.out_names[key][idx]))
        idx, acc = self.accuracy[key]
        scores = class_scores(o[idx], n)
        if scores is None:
            self.acc_reason[key] = f"output {acc.name!r} has no class axis in every chunk"
            return
        acc.update(scores, labels)

    def result(self, v: VariantSpec, num: int) -> dict:
        q: dict = {"num_samples": num}
        if v.reference is not None:
            if self.agreements.get(v.key):
                q["agreement"] = summarize_agreement([a.result() for _, _, a in self.agreements[v.key]])
            else:
                q["agreement"] = None
                q["agreement_reason"] = self.agree_reason.get(v.key, "no samples")
        if self.labels is not None:
            if v.key in self.accuracy and v.key not in self.acc_reason:
                q["accuracy"] = self.accuracy[v.key][1].result()
                q["accuracy_output"] = self.accuracy[v.key][1].name
            else:
                q["accuracy"] = None
                q["accuracy_reason"] = self.acc_reason.get(v.key, "no samples")
        return q


def _evaluate(req: WorkerRequest, sessions: dict, res: WorkerResult, tick: _Ticker) -> None:
    ev = req.eval
    chunk = max(1, int(ev.chunk))
    unbatched = set(ev.unbatched)
    quality = _Quality(req, sessions)
    for start in range(0, ev.num, chunk):
        n = min(chunk, ev.num - start)
        feeds = {k: (a if k in unbatched else a[start:start + n]) for k, a in ev.inputs.items()}
        outs = {}
        for v in req.variants:
            if res.variants[v.key].status == "ok":
                try:
                    outs[v.key] = _run(sessions[v.key], feeds, n, v.static_batch, unbatched)
                except Exception as e:
                    res.variants[v.key] = _failed(v, f"run failed: {first_line(e)}")
                    sessions.pop(v.key, None)
            tick.step(label=f"{req.provider}: comparing outputs")
        quality.update(outs, res.variants, start, n)
    for v in req.variants:
        res.quality[v.key] = quality.result(v, ev.num) if res.variants[v.key].status == "ok" else {"num_samples": ev.num}


# ---- timing: warm-up, then interleaved round-robin ---------------------------------------------
def _time_batch(req: WorkerRequest, tb, sessions: dict, res: WorkerResult, tick: _Ticker) -> None:
    warmup, runs, b = req.warmup, req.runs, tb.batch
    skipped: dict[str, str] = {}
    keys = []
    for key in tb.variants:
        if res.variants[key].status == "ok":
            keys.append(key)
        else:
            skipped[key] = res.variants[key].reason
            tick.step(warmup + runs)
    label = f"{req.provider}: batch {b}"

    def attempt(key) -> int | None:
        run, feeds, clock = sessions[key].run, tb.feeds, time.perf_counter_ns
        try:
            t0 = clock()
            run(None, feeds)
            return clock() - t0
        except Exception as e:
            skipped[key] = f"run failed at batch {b}: {first_line(e)}"
            keys.remove(key)
            return None

    for _ in range(warmup):
        for key in list(keys):
            tick.step(1 if attempt(key) is not None else warmup + runs, label=f"{label}: warm-up")
    times = {key: np.zeros(runs, dtype=np.int64) for key in keys}
    for r in range(runs):
        if not keys:
            break
        k = r % len(keys)  # the model that goes first rotates from round to round
        for key in keys[k:] + keys[:k]:
            ns = attempt(key)
            if ns is None:
                tick.step(runs - r)
            else:
                times[key][r] = ns
        tick.step(len(keys), label=f"{label}: timed runs")
    res.timing[b] = {key: times[key] for key in keys}
    res.timing_skipped[b] = skipped


def execute(req: WorkerRequest, progress=None, shared_pool: bool = True) -> WorkerResult:
    """Benchmark every variant of `req` on one execution provider."""
    import onnxruntime as ort

    res = WorkerResult(variants={v.key: VariantStatus("ok") for v in req.variants})
    shared_pool = _thread_pool(ort, req, res, shared_pool)
    so = _session_options(ort, req, shared_pool)
    n_chunks = -(-req.eval.num // max(1, int(req.eval.chunk)))
    total = len(req.variants) * (1 + n_chunks) + sum((req.warmup + req.runs) * len(t.variants) for t in req.timing)
    tick = _Ticker(progress, total, f"{req.provider}: loading")
    sessions = _open_sessions(ort, req, so, res, tick)
    _evaluate(req, sessions, res, tick)
    for tb in req.timing:
        _time_batch(req, tb, sessions, res, tick)
    return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m onnxrep.bench.worker REQUEST.pkl RESULT.pkl", file=sys.stderr)
        return 2
    req_path, res_path = argv
    with open(req_path, "rb") as f:
        req = pickle.load(f)

    def progress(done, total, label):
        print(f"@progress {done} {total} {label}", flush=True)

    try:
        res = execute(req, progress, shared_pool=True)
    except BaseException as e:  # reported to the parent, which decides what it means
        res = WorkerResult(fatal=f"{type(e).__name__}: {first_line(e)}", traceback=traceback.format_exc())
    tmp = res_path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(res, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, res_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
