"""bench(): load, plan, quantize, measure each provider (in a child process), assemble the result.

Every model gets an ONNX Runtime session per execution provider, with ORT's graph optimizations at
the level users deploy with (ORT_ENABLE_ALL unless --ort-opt says otherwise). After a warm-up, the
timed runs are interleaved round-robin across the models (starting with a different model each
round), so slow drifts of the machine hit every model alike. The first model is the reference:
ratios and agreement are relative to it; --int8 rows are compared with the same model in fp32.

A provider that is not installed, has no device, or whose session silently falls back to the CPU is
reported as skipped with the reason; a static-batch model asked for another batch is skipped with
the reason. The measuring itself happens in onnxrep.bench.worker (see there why in a child).
"""
from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import onnx

from ..errors import InputError
from . import inputs as I
from . import plan as P
from .models import check_signatures, load_models, merged_specs
from .protocol import EvalSpec, TimingSpec, VariantSpec, WorkerRequest, WorkerResult
from .quantize import Calibration, quantize
from .report import ProviderEntry, assemble
from .settings import BenchSettings, ep_name

log = logging.getLogger("onnxrep.bench")

_GPU_HINT = {
    "CUDAExecutionProvider": "install onnxruntime-gpu (in place of onnxruntime) and a matching CUDA/cuDNN",
    "TensorrtExecutionProvider": "install onnxruntime-gpu (in place of onnxruntime) and TensorRT",
}


@dataclass
class ProviderRun:
    entry: ProviderEntry
    result: WorkerResult | None  # None: the provider was skipped (entry.reason says why)


def bench(models: Sequence[str | os.PathLike | onnx.ModelProto] | str | os.PathLike | onnx.ModelProto,
          settings: BenchSettings | None = None, **options) -> dict:
    """Benchmark `models` (paths or ModelProtos); return the result dict (the --json document).

    Options are the fields of BenchSettings, as keywords (providers=, batches=, runs=, data=, ...)
    or as one `settings` object. Raises UsageError / InputError / OutputError (one-line messages).
    """
    started = time.perf_counter()
    if settings is not None and options:
        raise TypeError("bench() takes a BenchSettings or keyword options, not both")
    s = (settings or BenchSettings.from_options(**options)).checked()
    if isinstance(models, (str, os.PathLike, onnx.ModelProto)):
        models = [models]
    loaded = load_models(models, s.names)
    check_signatures(loaded)
    plan = P.make_plan(s, loaded, merged_specs(loaded))
    with tempfile.TemporaryDirectory(prefix="onnxrep-bench-") as tmpdir:
        tmp = Path(tmpdir)
        _files_for_ort(plan, tmp)
        if s.int8:
            _quantize_all(plan, tmp)
        plan.variants = P.make_variants(plan.models)
        plan.timing = P.make_timing(plan)
        available = available_providers()
        try:
            runs = [_run_provider(plan, p, available, tmp) for p in s.providers]
        finally:
            if s.progress is not None and hasattr(s.progress, "close"):
                s.progress.close()
    result = assemble(plan, runs, available)
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def _files_for_ort(plan: P.BenchPlan, tmp: Path) -> None:
    """ORT (and the quantizer) read files: an in-memory model is saved to the temporary directory."""
    from ..io import save_model

    for m in plan.models:
        if m.path is None:
            m.run_path = str(tmp / f"m{m.index}.onnx")
            save_model(m.proto, m.run_path)
        else:
            m.run_path = m.path


def _calibration(plan: P.BenchPlan) -> Calibration:
    s = plan.settings
    if s.calib_data is not None:
        arrays, n = I.prepare_data(s.calib_data, plan.specs, plan.input_shapes, "calib-data")
        plan.calib_source = "calib-data"
    elif s.data is not None:
        arrays, n = plan.eval_inputs, plan.num_eval
        plan.calib_source = "data"
    else:
        n = s.calib_samples
        arrays = I.random_inputs(plan.specs, plan.sample_shapes, n, [s.seed, 7])
        plan.calib_source = "random"
        plan.notes.append("int8 calibrated on random inputs: its accuracy is indicative only, calibrate with --data")
    n = min(n, s.calib_samples)
    if plan.calib_source == "data":
        plan.notes.append(f"int8 calibrated on the first {n} samples of --data, which are also evaluated "
                          "(use --calib-data for a separate calibration set)")
    return Calibration(I.take(arrays, n, n, plan.unbatched), n, plan.unbatched, s.per_channel, s.calib_method)


def _quantize_all(plan: P.BenchPlan, tmp: Path) -> None:
    calib = _calibration(plan)
    progress = plan.settings.progress
    for m in plan.models:
        if progress is not None:
            progress.update(m.index, len(plan.models), f"quantizing {m.name}")
        chunk = m.static_batch or min(plan.settings.eval_batch, calib.num)
        m.int8_path, m.int8 = quantize(m, tmp, calib, chunk)


# ---- providers ---------------------------------------------------------------------------------
def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def _unavailable_reason(ep: str, available: list[str]) -> str:
    import onnxruntime as ort

    have = ", ".join(a.replace("ExecutionProvider", "") for a in available) or "none"
    hint = _GPU_HINT.get(ep)
    return (f"{ep} is not available in this onnxruntime {ort.__version__} build (available: {have})"
            + (f"; {hint}" if hint else ""))


def _request(plan: P.BenchPlan, provider: str, ep: str, available: list[str]) -> WorkerRequest:
    s = plan.settings
    chain = [ep]
    if ep == "TensorrtExecutionProvider" and "CUDAExecutionProvider" in available:
        chain.append("CUDAExecutionProvider")  # what TensorRT cannot take runs on CUDA, as deployed
    variants = [VariantSpec(v.key, v.label, v.path, v.static_batch, v.reference,
                            required=ep == "CPUExecutionProvider" and v.precision == "fp32")
                for v in plan.variants if v.path]
    return WorkerRequest(
        provider=provider, ep=ep, ep_chain=chain, ort_opt=s.ort_opt, threads=s.threads, warmup=s.warmup,
        runs=s.runs, variants=variants,
        eval=EvalSpec(plan.eval_inputs, plan.num_eval, s.eval_batch, plan.labels, sorted(plan.unbatched)),
        timing=[TimingSpec(t.batch, t.feeds, t.variants) for t in plan.timing])


def _run_provider(plan: P.BenchPlan, provider: str, available: list[str], tmp: Path) -> ProviderRun:
    ep = ep_name(provider)
    entry = ProviderEntry(provider, ep)
    if ep not in available:
        entry.skip(_unavailable_reason(ep, available))
        return ProviderRun(entry, None)
    res = _dispatch(_request(plan, provider, ep, available), tmp, plan.settings)
    if res.fatal:  # a Python exception in the worker: a bug, not a property of the provider
        log.debug("benchmark worker traceback:\n%s", res.traceback or "")
        raise RuntimeError(f"benchmark worker failed on {ep}: {res.fatal}")
    if res.crashed:  # the process died (an execution provider crashed it)
        entry.skip(res.crashed)
        return ProviderRun(entry, None)
    for v in plan.variants:
        st = res.variants.get(v.key)
        if st and st.status == "error":
            raise InputError(f"onnxruntime cannot run {v.label}: {st.reason}")
    entry.session_providers = res.session_providers
    entry.thread_pool = res.thread_pool
    plan.notes.extend(n for n in dict.fromkeys(res.notes) if n not in plan.notes)
    return ProviderRun(entry, res)


def _dispatch(req: WorkerRequest, tmp: Path, s: BenchSettings) -> WorkerResult:
    def cb(done, total, label):
        if s.progress is not None:
            s.progress.update(done, total, label)

    if not s.isolate or not sys.executable:  # no interpreter to start (embedded Python): measure here
        from .worker import execute

        return execute(req, cb, shared_pool=False)
    return _in_child(req, tmp, cb)


def _in_child(req: WorkerRequest, tmp: Path, cb) -> WorkerResult:
    """Run the worker in `python -m onnxrep.bench.worker`; relay its progress lines."""
    tag = req.provider
    req_path, res_path, err_path = tmp / f"req-{tag}.pkl", tmp / f"res-{tag}.pkl", tmp / f"worker-{tag}.log"
    with open(req_path, "wb") as f:
        pickle.dump(req, f, protocol=pickle.HIGHEST_PROTOCOL)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # this source tree first: the child runs this very code
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(err_path, "w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "onnxrep.bench.worker", str(req_path), str(res_path)],
                                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True, env=env)
        try:
            for line in proc.stdout:
                _relay(line, cb)
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if res_path.exists():
            with open(res_path, "rb") as f:
                return pickle.load(f)
        err.seek(0)
        tail = [ln.strip() for ln in err.read().splitlines() if ln.strip()][-3:]
    how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
    return WorkerResult(crashed=f"the benchmark process for {req.ep} died ({how})"
                                + (": " + " | ".join(tail) if tail else ""))


def _relay(line: str, cb) -> None:
    if not line.startswith("@progress "):
        return
    parts = line.rstrip("\n").split(" ", 3)
    try:
        cb(int(parts[1]), int(parts[2]), parts[3] if len(parts) > 3 else "")
    except (ValueError, IndexError):
        pass
