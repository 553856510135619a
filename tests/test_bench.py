"""onnxrep bench: table, JSON schema, providers, input validation, metrics, plot, int8.

Models are built with onnx.helper right here (a Conv-ReLU-GAP-Gemm classifier and a MatMul
"classifier" whose outputs are known exactly), so every number checked is computed independently.
Most runs are in-process (`--in-process`) with a handful of timed runs, to stay fast; the JSON test
and the CLI tests go through the default child-process path.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxrep import bench as B
from onnxrep.bench import runner
from onnxrep.bench.metrics import Agreement, class_scores, latency_stats, summarize_agreement
from onnxrep.bench.progress import Progress
from onnxrep.errors import InputError, UsageError

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--runs", "3", "--warmup", "1", "--no-progress"]


# -- model builders ------------------------------------------------------------------------------
def _finish(graph) -> onnx.ModelProto:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def conv_model(scale=1.0, batch="N", hw=8, classes=10, name="x", elem=TensorProto.FLOAT) -> onnx.ModelProto:
    """Conv3x3 -> ReLU -> GlobalAveragePool -> Flatten -> Gemm; `scale` multiplies the logits."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    fc = rng.standard_normal((classes, 8)).astype(np.float32) * np.float32(scale)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.full(8, 0.1, np.float32), "b"),
             numpy_helper.from_array(fc, "fc"), numpy_helper.from_array(np.zeros(classes, np.float32), "fcb")]
    nodes = [] if elem == TensorProto.FLOAT else [helper.make_node("Cast", [name], [name + "_f"], to=TensorProto.FLOAT)]
    src = name if elem == TensorProto.FLOAT else name + "_f"
    nodes += [
        helper.make_node("Conv", [src, "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1),
    ]
    g = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info(name, elem, [batch, 3, hw, hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, classes])], inits)
    return _finish(g)


def matmul_model(w: np.ndarray, batch="N") -> onnx.ModelProto:
    """y = x @ w: outputs known exactly for any x."""
    k, c = w.shape
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, c])],
                          [numpy_helper.from_array(w.astype(np.float32), "w")])
    return _finish(g)


def save(model, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def _cpu_only() -> list[str]:
    return ["CPUExecutionProvider"]


HAS_GPU_EP = bool({"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()))


@pytest.fixture
def ab(tmp_path):
    """Two equivalent-up-to-scale conv models on disk."""
    return save(conv_model(), tmp_path / "a.onnx"), save(conv_model(1.001), tmp_path / "b.onnx")


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="onnxrep")
    sub = p.add_subparsers(dest="command")
    B.add_parser(sub)
    return p.parse_args(["bench", *argv])


def cli(*argv, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "onnxrep", "bench", *argv], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


# -- table, JSON -----------------------------------------------------------------------------------
def test_table_prints(ab, capsys):
    assert B.run(parse([*ab, "--batch", "1,2", "--in-process", *FAST])) == 0
    out = capsys.readouterr().out
    assert "latency" in out and "median ms" in out and "speedup" in out
    assert "a.onnx" in out and "b.onnx" in out
    lat = [ln for ln in out.splitlines() if ln.startswith("cpu ")]
    assert len(lat) == 2 * 2 + 2  # 2 models x 2 batches, then 2 agreement rows
    assert "agreement" in out and "(reference)" in out


SCHEMA_TOP = {"schema_version": int, "tool": dict, "created_utc": str, "environment": dict, "settings": dict,
              "inputs": dict, "models": list, "providers": list, "latency": list, "quality": list, "notes": list,
              "seconds": float}
NUM = (int, float)
OPT_NUM = (int, float, type(None))
OPT_STR = (str, type(None))
SCHEMA_LATENCY = {"provider": str, "batch": int, "model": int, "model_name": str, "precision": str, "status": str,
                  "reason": OPT_STR, "runs": (int, type(None)), "median_ms": OPT_NUM, "p90_ms": OPT_NUM,
                  "min_ms": OPT_NUM, "mean_ms": OPT_NUM, "std_ms": OPT_NUM, "throughput_per_s": OPT_NUM,
                  "ratio_to_first": OPT_NUM, "speedup_vs_first": OPT_NUM, "speedup_vs_fp32": OPT_NUM}
SCHEMA_QUALITY = {"provider": str, "model": int, "model_name": str, "precision": str, "status": str,
                  "reason": OPT_STR, "reference": (dict, type(None)), "num_samples": int,
                  "agreement": (dict, type(None)), "agreement_reason": OPT_STR, "accuracy": OPT_NUM,
                  "accuracy_output": OPT_STR, "accuracy_reason": OPT_STR, "accuracy_drop": OPT_NUM}
SCHEMA_AGREEMENT = {"max_abs_err": OPT_NUM, "rel_err": OPT_NUM, "cosine_mean": OPT_NUM, "cosine_min": OPT_NUM,
                    "top1_agreement": OPT_NUM, "outputs": list}
SCHEMA_PROVIDER = {"name": str, "ep": str, "status": str, "reason": OPT_STR, "session_providers": (list, type(None)),
                   "thread_pool": OPT_STR}
SCHEMA_MODEL = {"index": int, "name": str, "path": OPT_STR, "size_bytes": int, "nodes": int, "params": int,
                "macs": (int, type(None)),
                "op_counts": dict, "opset": (int, type(None)), "static_batch": (int, type(None)), "inputs": list,
                "outputs": list, "int8": (dict, type(None))}
SCHEMA_SETTINGS = {"providers": list, "batches": list, "threads": (int, type(None)), "warmup": int, "runs": int,
                   "interleaved": bool, "isolated": bool, "ort_opt": str, "seed": int, "samples": int,
                   "eval_batch": int, "input_shapes": dict, "int8": (dict, type(None))}


def check(obj: dict, schema: dict, where: str) -> None:
    assert set(obj) == set(schema), f"{where}: keys {sorted(set(obj) ^ set(schema))} differ from the schema"
    for k, t in schema.items():
        assert isinstance(obj[k], t) and not (t in (int, NUM) and isinstance(obj[k], bool)), \
            f"{where}.{k} is {type(obj[k]).__name__}"


def test_json_schema(ab, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "available_providers", _cpu_only)  # cuda skipped even where it is installed
    out = tmp_path / "r.json"
    # default path: measured in a child process
    assert B.run(parse([*ab, "--batch", "1,4", "--providers", "cpu,cuda", "--json", str(out), "-q", *FAST])) == 0
    doc = json.loads(out.read_text())
    check(doc, SCHEMA_TOP, "doc")
    assert doc["schema_version"] == B.SCHEMA_VERSION == 1
    check(doc["settings"], SCHEMA_SETTINGS, "settings")
    assert doc["settings"]["isolated"] is True and doc["settings"]["batches"] == [1, 4]
    for m in doc["models"]:
        check(m, SCHEMA_MODEL, "model")
        assert m["inputs"][0] == {"name": "x", "dtype": "float32", "shape": ["N", 3, 8, 8]}
    for p in doc["providers"]:
        check(p, SCHEMA_PROVIDER, "provider")
    assert [p["status"] for p in doc["providers"]] == ["ok", "skipped"]
    assert doc["providers"][0]["thread_pool"] == "shared"
    assert len(doc["latency"]) == 2 * 2 * 2  # providers x batches x models
    for r in doc["latency"]:
        check(r, SCHEMA_LATENCY, "latency")
        if r["provider"] == "cpu":
            assert r["status"] == "ok" and r["runs"] == 3
            assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"]
            assert r["throughput_per_s"] == pytest.approx(r["batch"] * 1e3 / r["median_ms"])
        else:
            assert r["status"] == "skipped" and "CUDAExecutionProvider" in r["reason"]
    first = {r["batch"]: r["median_ms"] for r in doc["latency"] if r["model"] == 0 and r["provider"] == "cpu"}
    for r in doc["latency"]:
        if r["provider"] == "cpu":
            assert r["ratio_to_first"] == pytest.approx(r["median_ms"] / first[r["batch"]])
            assert r["speedup_vs_first"] == pytest.approx(first[r["batch"]] / r["median_ms"])
    for q in doc["quality"]:
        check(q, SCHEMA_QUALITY, "quality")
        if q["agreement"] is not None:
            check(q["agreement"], SCHEMA_AGREEMENT, "agreement")
    q1 = next(q for q in doc["quality"] if q["provider"] == "cpu" and q["model"] == 1)
    assert q1["reference"] == {"model": 0, "precision": "fp32"} and q1["num_samples"] == B.DEFAULT_SAMPLES


# -- providers -----------------------------------------------------------------------------------
def test_missing_provider_is_skipped(ab, capsys, monkeypatch):
    monkeypatch.setattr(runner, "available_providers", _cpu_only)
    assert B.run(parse([*ab, "--providers", "cuda", "--in-process", *FAST])) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "CUDAExecutionProvider is not available" in out
    r = B.bench(list(ab), providers="cpu,tensorrt", runs=2, warmup=0, isolate=False)
    assert [p["status"] for p in r["providers"]] == ["ok", "skipped"]
    assert "TensorrtExecutionProvider" in r["providers"][1]["reason"]
    assert all(row["status"] == "skipped" for row in r["latency"] if row["provider"] == "tensorrt")


@pytest.mark.skipif(HAS_GPU_EP, reason="needs a CPU-only onnxruntime to provoke the fallback")
def test_silent_cpu_fallback_is_skipped(ab, monkeypatch):
    # pretend CUDA is installed: ORT then builds the session on the CPU, which must be caught
    monkeypatch.setattr(runner, "available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.warns(UserWarning):  # onnxruntime's own "not in available provider names"
        r = B.bench(list(ab), providers=["cuda"], runs=2, warmup=0, isolate=False)
    rows = [row for row in r["latency"] if row["provider"] == "cuda"]
    assert rows and all(row["status"] == "skipped" for row in rows)
    assert all("fell back to CPUExecutionProvider" in row["reason"] for row in rows)


def test_unknown_provider_is_a_usage_error(ab):
    with pytest.raises(UsageError, match="unknown execution provider 'gpu'"):
        B.run(parse([*ab, "--providers", "gpu", *FAST]))


# -- input signatures and data ---------------------------------------------------------------------
@pytest.mark.parametrize("other, expect", [
    (conv_model(name="z"), "inputs (x) but"),
    (conv_model(elem=TensorProto.FLOAT16), "is float32 in a.onnx but float16"),
    (matmul_model(np.eye(3, 10)), "rank 4 in a.onnx"),
    (conv_model(hw=16), "axis 2 is 8 in a.onnx"),
])
def test_mismatched_signatures(tmp_path, other, expect):
    a = save(conv_model(), tmp_path / "a.onnx")
    b = save(other, tmp_path / "b.onnx")
    with pytest.raises(InputError) as e:
        B.run(parse([a, b, *FAST]))
    assert e.value.exit_code == 3
    msg = str(e.value)
    assert msg.startswith("input signatures differ") and expect in msg and "\n" not in msg


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("kind, expect", [
    ("missing_key", "has no array for input 'x' (arrays: q, r; expected keys: x)"),
    ("wrong_shape", "needs 8 on axis 2"),
    ("wrong_rank", "(rank 3) but input 'x' has rank 4"),
    ("not_zip", "is not a NumPy .npz or .npy file"),
    ("bad_zip", "cannot read data file"),
    ("not_found", "data file not found"),
    ("wrong_dtype", "is float64 but input 'x' is int64"),
    ("counts", "different sample counts"),
])
def test_bad_data(tmp_path, kind, expect):
    a = conv_model()
    path = tmp_path / "d.npz"
    if kind == "missing_key":
        _write_npz(path, q=np.zeros((2, 3, 8, 8), np.float32), r=np.zeros(2))
    elif kind == "wrong_shape":
        _write_npz(path, x=np.zeros((2, 3, 4, 8), np.float32))
    elif kind == "wrong_rank":
        _write_npz(path, x=np.zeros((3, 8, 8), np.float32))
    elif kind == "not_zip":
        path.write_text("not numpy at all")
    elif kind == "bad_zip":
        path.write_bytes(b"PK\x03\x04 truncated")
    elif kind == "wrong_dtype":
        a = matmul_model(np.eye(3, 4))
        g = a.graph
        g.input[0].type.tensor_type.elem_type = TensorProto.INT64
        g.node.insert(0, helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT))
        g.node[1].input[0] = "xf"
        _write_npz(path, x=np.zeros((2, 3)))
    elif kind == "counts":
        two = helper.make_graph(
            [helper.make_node("Add", ["x", "t"], ["y"])], "two",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
             helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
        a = _finish(two)
        _write_npz(path, x=np.zeros((2, 4), np.float32), t=np.zeros((3, 4), np.float32))
    model = save(a, tmp_path / "a.onnx")
    data = str(path) if kind != "not_found" else str(tmp_path / "nope.npz")
    with pytest.raises(InputError) as e:
        B.run(parse([model, "--data", data, "--in-process", *FAST]))
    assert e.value.exit_code == 3 and expect in str(e.value) and "\n" not in str(e.value)


def test_single_array_data_and_npy(tmp_path):
    a = save(conv_model(), tmp_path / "a.onnx")
    x = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "one.npz", x)  # key arr_0
    np.save(tmp_path / "one.npy", x.astype(np.float64))  # float64 data for a float32 input is cast
    for f in ("one.npz", "one.npy"):
        r = B.bench([a], data=str(tmp_path / f), runs=2, warmup=0, isolate=False)
        assert r["inputs"]["num_samples"] == 5 and r["inputs"]["source"] == "data"


def test_dynamic_dims_need_a_shape(tmp_path):
    m = conv_model()
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    a = save(m, tmp_path / "hw.onnx")
    with pytest.raises(UsageError, match=r"dynamic axis 2 \('H'\), axis 3 \('W'\).*--input-shape x:1,3,<H>,<W>"):
        B.bench([a], runs=1, warmup=0, isolate=False)
    r = B.bench([a], input_shapes=["x:2,3,6,6"], runs=1, warmup=0, isolate=False)
    assert r["settings"]["batches"] == [2]  # the batch of --input-shape
    assert r["inputs"]["specs"][0]["sample_shape"] == [3, 6, 6]
    with pytest.raises(InputError, match="--input-shape y names 'y', which is not a model input"):
        B.bench([a], input_shapes=["y:1,3,6,6"], isolate=False)


def test_static_batch_skipped_at_other_batches(tmp_path):
    a = save(conv_model(), tmp_path / "a.onnx")
    s = save(conv_model(batch=1), tmp_path / "s.onnx")
    r = B.bench([a, s], batches=[1, 3], runs=2, warmup=0, isolate=False)
    row = next(x for x in r["latency"] if x["model"] == 1 and x["batch"] == 3)
    assert row["status"] == "skipped" and row["reason"].startswith("static batch 1")
    assert next(x for x in r["latency"] if x["model"] == 1 and x["batch"] == 1)["status"] == "ok"
    # the static-batch model is still compared on all samples (fed one at a time)
    q = next(x for x in r["quality"] if x["model"] == 1)
    assert q["num_samples"] == B.DEFAULT_SAMPLES and q["agreement"]["max_abs_err"] == 0.0


# -- metrics on constructed cases ----------------------------------------------------------------
def _classifier_data(tmp_path):
    """10 samples, 5 classes; argmax of each row is known; labels match 7 of them."""
    x = np.full((10, 5), 0.1, np.float32)
    argmax = np.array([0, 1, 2, 3, 4, 2, 3, 4, 2, 3])
    x[np.arange(10), argmax] = np.linspace(1.0, 2.0, 10, dtype=np.float32)
    labels = argmax.copy()
    labels[[1, 4, 7]] = (labels[[1, 4, 7]] + 1) % 5  # 3 wrong -> accuracy 0.7
    np.savez(tmp_path / "x.npz", x=x)
    np.save(tmp_path / "y.npy", labels)
    return x, argmax, labels


def test_accuracy_and_agreement_on_a_constructed_case(tmp_path):
    x, argmax, labels = _classifier_data(tmp_path)
    eye = np.eye(5, dtype=np.float32)
    swap = eye[:, [1, 0, 2, 3, 4]]  # swaps classes 0 and 1: flips the 2 samples whose argmax is 0 or 1
    a = save(matmul_model(eye), tmp_path / "a.onnx")
    b = save(matmul_model(eye * np.float32(1.01)), tmp_path / "b.onnx")
    c = save(matmul_model(swap), tmp_path / "c.onnx")
    r = B.bench([a, b, c], data=str(tmp_path / "x.npz"), labels=str(tmp_path / "y.npy"), runs=2, warmup=0,
                eval_batch=4, isolate=False)  # eval_batch 4: three chunks, streamed
    q = {row["model"]: row for row in r["quality"]}
    assert q[0]["accuracy"] == pytest.approx(0.7) and q[0]["accuracy_output"] == "y"
    assert q[0]["agreement"] is None and q[0]["reference"] is None
    # B = 1.01 A: error 1% of the output scale, cosine 1, same argmax everywhere
    ag = q[1]["agreement"]
    assert ag["max_abs_err"] == pytest.approx(0.01 * 2.0, rel=1e-5)
    assert ag["rel_err"] == pytest.approx(0.01, rel=1e-5)
    assert ag["cosine_min"] == pytest.approx(1.0, abs=1e-12) and ag["top1_agreement"] == 1.0
    assert q[1]["accuracy"] == pytest.approx(0.7) and q[1]["accuracy_drop"] == pytest.approx(0.0)
    # C swaps two classes: samples 0 and 1 change their argmax
    ag = q[2]["agreement"]
    assert ag["top1_agreement"] == pytest.approx(0.8)
    pred_c = np.where(argmax == 0, 1, np.where(argmax == 1, 0, argmax))
    acc_c = float((pred_c == labels).mean())
    assert q[2]["accuracy"] == pytest.approx(acc_c)
    assert q[2]["accuracy_drop"] == pytest.approx(0.7 - acc_c)
    yc = x @ swap
    cos = (yc * x).sum(1) / (np.linalg.norm(yc, axis=1) * np.linalg.norm(x, axis=1))
    assert ag["cosine_min"] == pytest.approx(cos.min(), rel=1e-6)
    assert ag["cosine_mean"] == pytest.approx(cos.mean(), rel=1e-6)


def test_outputs_matched_by_name(tmp_path):
    """Several outputs, listed in another order by the second model: compared name by name."""
    def two_outputs(order, scale):
        w = np.eye(4, dtype=np.float32) * np.float32(scale)
        nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"]), helper.make_node("Relu", ["x"], ["feat"])]
        outs = {"logits": helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4]),
                "feat": helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["N", 4])}
        g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [outs[k] for k in order], [numpy_helper.from_array(w, "w")])
        return _finish(g)

    a = save(two_outputs(["logits", "feat"], 1.0), tmp_path / "a.onnx")
    b = save(two_outputs(["feat", "logits"], 1.5), tmp_path / "b.onnx")
    r = B.bench([a, b], runs=1, warmup=0, isolate=False)
    ag = next(q for q in r["quality"] if q["model"] == 1)["agreement"]
    per = {o["name"]: o for o in ag["outputs"]}
    assert per["feat"]["max_abs_err"] == 0.0 and per["feat"]["reference_name"] == "feat"
    assert per["logits"]["rel_err"] == pytest.approx(0.5, rel=1e-6)
    assert ag["rel_err"] == pytest.approx(0.5, rel=1e-6)  # the summary is the worst output


def test_labels_validation(tmp_path):
    _classifier_data(tmp_path)
    a = save(matmul_model(np.eye(5)), tmp_path / "a.onnx")
    np.save(tmp_path / "short.npy", np.zeros(3, np.int64))
    with pytest.raises(InputError, match="has 3 labels but the data has 10 samples"):
        B.bench([a], data=str(tmp_path / "x.npz"), labels=str(tmp_path / "short.npy"), isolate=False)
    with pytest.raises(UsageError, match="--labels needs --data"):
        B.bench([a], labels=str(tmp_path / "y.npy"), isolate=False)
    onehot = np.eye(5)[np.load(tmp_path / "y.npy")]
    r = B.bench([a], data=str(tmp_path / "x.npz"), labels=onehot, runs=1, warmup=0, isolate=False)
    assert r["quality"][0]["accuracy"] == pytest.approx(0.7)


def test_agreement_metric_units():
    ref = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], np.float32)
    out = np.array([[3.0, 4.5], [0.0, 0.0], [0.0, 1.0]], np.float32)
    a = Agreement("y", "y")
    a.update(out, ref, 3)
    res = a.result()
    assert res["max_abs_err"] == pytest.approx(1.0)
    assert res["rel_err"] == pytest.approx(1.0 / 4.0)
    cos0 = (9 + 18) / (5 * math.hypot(3, 4.5))
    assert res["cosine_min"] == pytest.approx(0.0)  # orthogonal third row
    assert res["cosine_mean"] == pytest.approx((cos0 + 1.0 + 0.0) / 3)  # zero vs zero counts as 1
    assert res["top1_agreement"] == pytest.approx(2 / 3)
    assert class_scores(np.zeros((4, 10, 1, 1), np.float32), 4).shape == (4, 10)
    assert class_scores(np.zeros((4, 10, 7, 7), np.float32), 4) is None  # a feature map, not classes
    assert class_scores(np.zeros((4, 1), np.float32), 4) is None
    s = summarize_agreement([res, {**res, "max_abs_err": 3.0, "problem": None}])
    assert s["max_abs_err"] == 3.0 and s["cosine_min"] == pytest.approx(0.0)
    st = latency_stats(np.array([1_000_000, 2_000_000, 3_000_000, 10_000_000]), batch=2)
    assert st["median_ms"] == 2.5 and st["min_ms"] == 1.0 and st["throughput_per_s"] == pytest.approx(800.0)


def test_timed_runs_are_interleaved(ab, monkeypatch):
    calls = []
    real = ort.InferenceSession

    class Spy(real):
        def __init__(self, path, *a, **k):
            super().__init__(path, *a, **k)
            self.tag = Path(path).name

        def run(self, *a, **k):
            calls.append(self.tag)
            return super().run(*a, **k)

    monkeypatch.setattr(ort, "InferenceSession", Spy)
    B.bench(list(ab), runs=6, warmup=2, samples=4, eval_batch=4, isolate=False)
    timed = calls[-12:]  # 6 rounds x 2 models
    assert sorted(timed) == ["a.onnx"] * 6 + ["b.onnx"] * 6
    rounds = [timed[i:i + 2] for i in range(0, 12, 2)]
    assert all(sorted(r) == ["a.onnx", "b.onnx"] for r in rounds)  # every round runs each model once
    assert {r[0] for r in rounds} == {"a.onnx", "b.onnx"}  # and the round's first model rotates


# -- plot, progress, JSON safety -------------------------------------------------------------------
def test_plot_writes_png(ab, tmp_path):
    pytest.importorskip("matplotlib")  # an optional dependency (extra [plot])
    png = tmp_path / "lat.png"
    assert B.run(parse([*ab, "--batch", "1,2", "--plot", str(png), "--in-process", "-q", *FAST])) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_plot_without_matplotlib(ab, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UsageError, match="--plot needs matplotlib"):
        B.run(parse([*ab, "--plot", str(tmp_path / "p.png"), *FAST]))


def test_progress_bar_only_on_a_terminal(monkeypatch):
    buf = io.StringIO()
    p = Progress(buf)
    p.update(5, 10, "cpu: batch 1")
    p.close()
    assert "[############............]  50% cpu: batch 1" in buf.getvalue()
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a TTY
    assert Progress.for_stderr() is None


def test_json_is_strict(tmp_path):
    out = tmp_path / "n.json"
    B.write_json({"a": float("nan"), "b": [float("inf"), 1.5], "c": np.float32(2.0)}, out)
    assert json.loads(out.read_text()) == {"a": None, "b": [None, 1.5], "c": 2.0}


# -- int8 ---------------------------------------------------------------------------------------
def test_int8(ab, tmp_path):
    x = np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    r = B.bench(list(ab), int8=True, data=str(tmp_path / "x.npz"), calib_samples=8, runs=3, warmup=1,
                isolate=False)
    for m in r["models"]:
        assert m["int8"]["status"] == "ok" and m["int8"]["op_counts"].get("QuantizeLinear", 0) > 0
    rows = [row for row in r["latency"] if row["precision"] == "int8"]
    assert len(rows) == 2
    for row in rows:
        assert row["status"] == "ok" and row["median_ms"] > 0 and row["speedup_vs_fp32"] > 0
    for q in (q for q in r["quality"] if q["precision"] == "int8"):
        assert q["reference"] == {"model": q["model"], "precision": "fp32"}  # vs the same model in fp32
        ag = q["agreement"]
        assert 0 < ag["rel_err"] < 0.2 and ag["cosine_min"] > 0.95
    assert r["settings"]["int8"]["calibration_source"] == "data"
    assert any("calibrated on the first 8 samples" in n for n in r["notes"])


# -- through the real CLI (needs onnxrep/cli.py) ---------------------------------------------------
@pytest.mark.skipif(HAS_GPU_EP, reason="this onnxruntime has a GPU provider: cuda is not missing here")
def test_cli_table_and_missing_provider(ab):
    p = cli(*ab, "--providers", "cpu,cuda", *FAST)
    assert p.returncode == 0, p.stderr
    assert "latency" in p.stdout and "CUDAExecutionProvider is not available" in p.stdout


def test_cli_mismatch_exits_3_with_one_line(tmp_path):
    a = save(conv_model(), tmp_path / "a.onnx")
    b = save(conv_model(name="z"), tmp_path / "b.onnx")
    p = cli(a, b, *FAST)
    assert p.returncode == 3
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxrep: error: input signatures differ")


def test_cli_bad_npz_exits_3(ab, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_text("hello")
    p = cli(*ab, "--data", str(bad), *FAST)
    assert p.returncode == 3
    assert p.stderr.strip().splitlines() == [f"onnxrep: error: data file {bad} is not a NumPy .npz or .npy file"]


# -- tools/train_digits.py -------------------------------------------------------------------------
@pytest.mark.slow
def test_train_digits_smoke(tmp_path, capsys):
    """One short epoch: the script trains, exports the training-time graph and writes the test split."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "tools" / "train_digits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path), "--epochs", "1", "--widths", "8,8,16", "--depths", "1,1",
                     "--size", "16"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy (ONNX Runtime" in out
    model = onnx.load(str(tmp_path / "digits_train.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") > 3 and "Add" in ops  # multi-branch, as trained
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.HasField("dim_value")  # dynamic batch
    x = np.load(tmp_path / "inputs.npz")["input"]
    y = np.load(tmp_path / "labels.npy")
    assert x.shape == (360, 1, 16, 16) and x.dtype == np.float32 and y.shape == (360,)
    r = B.bench([str(tmp_path / "digits_train.onnx")], data=str(tmp_path / "inputs.npz"),
                labels=str(tmp_path / "labels.npy"), runs=1, warmup=0, isolate=False)
    acc = r["quality"][0]["accuracy"]
    assert f"test accuracy (ONNX Runtime, digits_train.onnx): {acc:.4f}" in out


# -- --input-shape: one grammar, one set of words for optimize, bench and the API ----------------
BAD_SHAPES = [  # (flags, exit code, words of the error)
    (["input:1,3,x,32,32"], 2, "bad --input-shape 'input:1,3,x,32,32': expected NAME:D1,D2,..."),
    (["1x3x32x32"], 2, "bad --input-shape '1x3x32x32': expected NAME:D1,D2,..."),
    (["input:"], 2, "bad --input-shape 'input:': expected NAME:D1,D2,..."),
    ([":1,2"], 2, "bad --input-shape ':1,2': expected NAME:D1,D2,..."),
    (["input:0,3"], 2, "bad --input-shape 'input:0,3': dimensions must be positive integers"),
    (["input:1,3,32,32", "input:2,3,32,32"], 2, "--input-shape given twice for 'input'"),
    (["x:1,3,32,32"], 3, "--input-shape x names 'x', which is not a model input (inputs: input)"),
    (["input:1,3,32"], 3, "--input-shape input has rank 3, the model input 'input' has rank 4"),
    (["input:1,4,32,32"], 3, "--input-shape input: axis 1 is fixed to 3 in the model, not 4"),
]


def _main(capsys, *argv) -> tuple[int, list[str]]:
    from onnxrep.cli import main

    rc = main(list(argv))
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("flags, code, words", BAD_SHAPES, ids=[" ".join(f) for f, _, _ in BAD_SHAPES])
def test_input_shape_errors_are_the_same_in_optimize_and_bench(tmp_path, capsys, flags, code, words):
    """The same bad --input-shape gets the same exit code and line from both commands, with the
    options before or after the positional paths."""
    src = save(conv_model(name="input", hw=32), tmp_path / "a.onnx")
    opts = [a for f in flags for a in ("--input-shape", f)]
    out = str(tmp_path / "out.onnx")
    seen = []
    for argv in (["optimize", src, out, *opts], ["optimize", *opts, src, out],
                 ["bench", src, *opts, *FAST, "--in-process"], ["bench", *opts, *FAST, "--in-process", src]):
        rc, err = _main(capsys, *argv)
        assert rc == code, (argv, err)
        assert len(err) == 1 and err[0].startswith("onnxrep: error: ") and words in err[0], (argv, err)
        seen.append(err[0])
    assert len(set(seen)) == 1  # word for word
    assert not Path(out).exists()


API_SHAPES = [  # the dict forms of the mistakes above, as the API words them
    ({"input": [1, 3, 0, 32]}, UsageError, "bad input_shapes['input'] = [1, 3, 0, 32]: dimensions must be positive"),
    ({"input": "1,3,32,32"}, UsageError, "bad input_shapes['input'] = '1,3,32,32': expected a list of positive"),
    ({"x": [1, 3, 32, 32]}, InputError, "input_shapes['x'] names 'x', which is not a model input (inputs: input)"),
    ({"input": [1, 3, 32]}, InputError, "input_shapes['input'] has rank 3, the model input 'input' has rank 4"),
    ({"input": [1, 4, 32, 32]}, InputError, "input_shapes['input']: axis 1 is fixed to 3 in the model, not 4"),
]


@pytest.mark.parametrize("shapes, error, words", API_SHAPES, ids=[str(s) for s, _, _ in API_SHAPES])
def test_input_shapes_api_words_match_optimize(tmp_path, shapes, error, words):
    import onnxrep

    model = conv_model(name="input", hw=32)
    messages = []
    for call in (lambda: onnxrep.optimize(model, input_shapes=shapes),
                 lambda: B.bench([model], input_shapes=shapes, runs=1, warmup=0, isolate=False)):
        with pytest.raises(error) as e:
            call()
        assert words in str(e.value) and "--input-shape" not in str(e.value)
        messages.append(str(e.value))
    assert messages[0] == messages[1]


def test_input_shape_accepted_alike(tmp_path, capsys):
    """What optimize accepts, bench accepts: a pinned batch becomes bench's default batch."""
    src = save(conv_model(name="input", hw=32), tmp_path / "a.onnx")
    rc, err = _main(capsys, "optimize", "--input-shape", "input:2,3,32,32", src, str(tmp_path / "o.onnx"), "-q")
    assert rc == 0, err
    rc, err = _main(capsys, "bench", "--input-shape", "input:2,3,32,32", src, *FAST, "--in-process", "-q",
                    "--json", str(tmp_path / "r.json"))
    assert rc == 0, err
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["settings"]["batches"] == [2] and doc["settings"]["input_shapes"] == {"input": [2, 3, 32, 32]}


# -- issue 10 item 5: why agreement is missing, plot title, file permissions ----------------------
def test_table_says_why_agreement_is_missing(tmp_path, capsys):
    """A shape mismatch and a different set of outputs are named in the table, not only the JSON."""
    a = save(conv_model(), tmp_path / "a.onnx")
    b = save(conv_model(classes=5), tmp_path / "b.onnx")  # y is (N, 5), the reference's (N, 10)
    c = conv_model()
    c.graph.node[-1].output[0] = "logits"  # outputs (logits, f): neither by name nor by position
    c.graph.output[0].name = "logits"
    c.graph.output.append(helper.make_tensor_value_info("f", TensorProto.FLOAT, ["N", 8]))
    c = save(c, tmp_path / "c.onnx")
    assert B.run(parse([a, b, c, "--in-process", "--samples", "4", *FAST])) == 0
    out = capsys.readouterr().out
    rows = {ln.split()[1]: ln for ln in out.splitlines() if ln.startswith("cpu ") and "fp32  " in ln and "(reference)" not in ln
            and "a.onnx fp32" in ln}
    assert set(rows) == {"b.onnx", "c.onnx"} and all("n/a" in r for r in rows.values())
    assert ("  not compared: cpu b.onnx fp32: output 'y' has shape [4, 5], reference 'y' has [4, 10]"
            in out.splitlines())
    assert "  not compared: cpu c.onnx fp32: outputs differ: logits, f vs reference y" in out.splitlines()
    r = B.bench([a, b], samples=4, runs=1, warmup=0, isolate=False)
    assert "not compared" in B.format_table(r)
    q = next(q for q in r["quality"] if q["model"] == 1)
    assert q["agreement"]["outputs"][0]["problem"].startswith("output 'y' has shape")


def test_plot_title_fits_one_panel(ab):
    """One pair at one batch size makes the narrowest figure: the title must stay inside it."""
    pytest.importorskip("matplotlib")
    from onnxrep.bench import plot

    r = B.bench(list(ab), batches=[1], runs=2, warmup=0, isolate=False)
    fig = plot.build_figure(r)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        box = fig._suptitle.get_window_extent(renderer)
        assert 0 <= box.x0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height
        one_line = fig.text(0, 0, plot.TITLE, fontsize=plot.TITLE_SIZE).get_window_extent(renderer)
        assert one_line.width > fig.bbox.width  # unwrapped, this title would be clipped
        for ax in fig.axes:  # and the wrapped title does not run into the panel title
            assert ax.title.get_window_extent(renderer).y1 <= box.y0 + 1
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield 0o640
    finally:
        os.umask(old)


def test_outputs_get_umask_permissions(ab, tmp_path, umask_027):
    """JSON and PNG are created like any file (0o666 & ~umask), not 0600 like a mkstemp file."""
    from onnxrep import files

    assert files.creation_mode() == umask_027
    js, png = tmp_path / "r.json", tmp_path / "p.png"
    args = [*ab, "--json", str(js), "-q", "--in-process", *FAST]
    if __import__("importlib").util.find_spec("matplotlib"):
        args += ["--plot", str(png)]
    assert B.run(parse(args)) == 0
    assert (js.stat().st_mode & 0o777) == umask_027
    if png.exists():
        assert (png.stat().st_mode & 0o777) == umask_027
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".onnxrep-")] == []


def test_atomic_write_failure_leaves_nothing(tmp_path):
    from onnxrep import files
    from onnxrep.errors import OutputError

    target = tmp_path / "t.json"
    target.write_text("old")

    def boom(tmp):
        Path(tmp).write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match=r"cannot write .*t.json: No space left on device"):
        files.write_atomic(target, boom)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["t.json"]
    with pytest.raises(OutputError, match="cannot write"):
        files.write_text_atomic(tmp_path / "missing" / "x.json", "{}")
    files.write_text_atomic(target, "new")
    assert target.read_text() == "new"


# -- the package: cheap worker, lazy onnxrep, typed settings, shared counters ---------------------
def test_worker_and_package_import_cheaply():
    """The worker child must not load the optimizer; `import onnxrep` keeps its public names."""
    code = ("import sys, onnxrep.bench.worker, onnxrep.bench; "
            "heavy = [m for m in ('onnx', 'onnx_graphsurgeon', 'onnxrep.optimizer', 'onnxrep.engine', "
            "'onnxrep.bench.runner', 'onnxruntime') if m in sys.modules]; print(heavy); "
            "import onnxrep; from onnxrep import optimize, optimize_file, Report, InputError, VerificationError; "
            "print(optimize.__module__, Report.__module__, 'optimize' in dir(onnxrep))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["[]", "onnxrep.optimizer onnxrep.optimizer True"]


def test_settings_object_and_unknown_options(ab):
    from onnxrep.bench.settings import BenchSettings

    r = B.bench(list(ab), BenchSettings(runs=2, warmup=0, isolate=False, batches="1,3"))
    assert r["settings"]["batches"] == [1, 3] and r["settings"]["runs"] == 2
    with pytest.raises(TypeError, match="unexpected keyword argument.*batch_sizes"):
        B.bench(list(ab), batch_sizes=[1])
    with pytest.raises(TypeError, match="not both"):
        B.bench(list(ab), BenchSettings(), runs=2)
    with pytest.raises(UsageError, match="--runs must be an integer >= 1"):
        B.bench(list(ab), runs=0)


def test_params_and_macs_are_optimizes(tmp_path):
    """models[].params and .macs are onnxrep.stats' figures: an int64 shape constant is no parameter."""
    from onnxrep import stats

    m = matmul_model(np.ones((3, 10), np.float32))
    m.graph.initializer.append(numpy_helper.from_array(np.array([-1, 10], np.int64), "shape"))
    m.graph.node.append(helper.make_node("Reshape", ["y", "shape"], ["z"]))
    m.graph.output[0].name = "z"
    r = B.bench([save(m, tmp_path / "m.onnx")], runs=1, warmup=0, isolate=False)
    entry = r["models"][0]
    assert entry["params"] == 30 == stats.parameter_count(m)  # not 32
    assert entry["macs"] == 30 == stats.macs(m)  # per sample: 3 x 10
    assert "MACs" in B.format_table(r)


def test_bench_does_not_load_the_rules(ab):
    """bench measures graphs; it never needs the rewrite rules, the engine or graphsurgeon."""
    code = ("import sys; from onnxrep.bench import bench; "
            f"bench({list(ab)!r}, runs=1, warmup=0, samples=2, isolate=False); "
            "print([m for m in ('onnx_graphsurgeon', 'onnxrep.rules', 'onnxrep.engine', 'onnxrep.optimizer') "
            "if m in sys.modules])")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == "[]"


def test_size_counts_the_data_files_a_model_names(tmp_path):
    """The size column is the .onnx plus the external data files its initializers name, whatever
    they are called: onnxrep writes OUTPUT.<token>.data, not OUTPUT.data."""
    import onnxrep
    from onnxrep.bench.models import load_models

    src = save(conv_model(classes=256), tmp_path / "a.onnx")  # a 8 KB fc weight: large enough to go external
    out = tmp_path / "b.onnx"
    report = onnxrep.optimize_file(src, out, external_data=True)
    data = [Path(p) for p in report.written if Path(p) != out]
    assert data and all(p.name != "b.onnx.data" for p in data)
    size = out.stat().st_size + sum(p.stat().st_size for p in data)
    assert [m.size_bytes for m in load_models([src, str(out)], None)] == [Path(src).stat().st_size, size]
