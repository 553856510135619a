"""End to end over the model zoo: every model, in every exporter form, reaches its deploy form.

For each (model, form): export with torch, run `python -m onnxrep optimize` for real, then check
the output with onnx.checker (full), compare it with the torch output, and compare its op
histogram with the entry's documented deploy_ops.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from models import ZOO, check_deploy_ops  # noqa: E402
from models.export import FORMS, export_onnx  # noqa: E402
from onnxrep import verify as V  # noqa: E402

LINEAR = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    cache = {}

    def get(name, form):
        if (name, form) not in cache:
            entry = ZOO[name]
            model = entry.build()
            path = export_onnx(model, entry.input_shape, root / name / f"{form}.onnx", form)
            x = np.random.default_rng(1).standard_normal(entry.input_shape).astype(np.float32)
            with torch.no_grad():
                ref = model(torch.from_numpy(x)).numpy()
            cache[name, form] = (path, x, ref)
        return cache[name, form]

    return get


def _bn_next_to_linear(model: onnx.ModelProto) -> list[str]:
    producer = {o: n for n in model.graph.node for o in n.output}
    readers = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    bad = []
    for n in model.graph.node:
        if n.op_type != "BatchNormalization":
            continue
        up = producer.get(n.input[0])
        if up is not None and up.op_type in LINEAR:
            bad.append(f"{up.op_type}->{n.name}")
        if any(r.op_type in LINEAR for r in readers.get(n.output[0], [])):
            bad.append(f"{n.name}->linear")
    return bad


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_reaches_deploy_form(exports, tmp_path, name, form):
    """optimize exits 0, the output passes the full checker, equals torch, and has deploy_ops."""
    path, x, ref = exports(name, form)
    out = tmp_path / "deploy.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxrep", "optimize", str(path), str(out), "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    got = V.run(model, {"input": x})["output"]
    scale = float(np.abs(ref).max())
    # torch and ORT differ by fp32 rounding; deep nets (ResNet-50) accumulate ~1e-5 of it
    assert np.abs(got - ref).max() <= 3e-5 * scale
    assert _bn_next_to_linear(model) == []
    hist = {}
    for n in model.graph.node:
        hist[n.op_type] = hist.get(n.op_type, 0) + 1
    assert check_deploy_ops(ZOO[name].deploy_ops, hist) == []


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_open_model_reads_every_export_as_onnx_does(exports, name, form):
    """onnxrep walks the wire format of what torch's exporters write (inline, or external data for
    dynamo) and reads back exactly the model onnx.load parses."""
    from onnxrep import io
    from tests.helpers import without_default_locations

    path, _, _ = exports(name, form)
    lean = io.open_model(path)
    model = onnx.load(str(path))
    assert len(lean.payloads) == sum(len(t.raw_data) >= 1024 for t in model.graph.initializer)  # left on disk
    assert without_default_locations(lean.materialize()) == without_default_locations(model)


@pytest.mark.parametrize("name", ["repvgg", "dbb_slice", "mobileone"])
def test_all_forms_reach_the_same_graph(exports, tmp_path, name):
    """The three exporter forms of one model optimize to the same op histogram and outputs."""
    import onnxrep

    outs = []
    for form in FORMS:
        path, x, ref = exports(name, form)
        model = onnxrep.optimize(str(path))
        hist = sorted((n.op_type for n in model.graph.node))
        outs.append((hist, V.run(model, {"input": x})["output"]))
    norm = [sorted({"ReduceMean": "GlobalAveragePool", "Reshape": "Flatten"}.get(o, o) for o in h) for h, _ in outs]
    assert norm[0] == norm[1] == norm[2]
    scale = float(np.abs(outs[0][1]).max())
    for _, y in outs[1:]:
        assert np.abs(y - outs[0][1]).max() <= 1e-5 * scale


def test_second_run_changes_nothing(exports):
    """Optimizing an optimized zoo model applies no rule."""
    import onnxrep

    path, _, _ = exports("dbb_slice", "legacy")
    once = onnxrep.optimize(str(path))
    twice, report = onnxrep.optimize(once, return_report=True)
    assert report.rule_counts == {}
    assert [n.op_type for n in twice.graph.node] == [n.op_type for n in once.graph.node]


@pytest.mark.parametrize("name", ["split_concat", "dbb_subpadadd", "repvgg", "repmlp"])
def test_dynamic_batch_reaches_deploy_form(tmp_path, name):
    """With a symbolic batch the model still reaches its deploy form, and the batch stays symbolic."""
    import onnxrep

    entry = ZOO[name]
    path = export_onnx(entry.build(), entry.input_shape, tmp_path / "train.onnx", "legacy-nofold", dynamic_batch=True)
    out, report = onnxrep.optimize(str(path), return_report=True)
    assert check_deploy_ops(entry.deploy_ops, report.after["ops"]) == []
    dim = out.graph.input[0].type.tensor_type.shape.dim[0]
    assert not dim.HasField("dim_value") and dim.dim_param
    x = np.random.default_rng(0).standard_normal((3,) + tuple(entry.input_shape[1:])).astype(np.float32)
    ref = V.run(onnx.load(str(path)), {"input": x})["output"]
    got = V.run(out, {"input": x})["output"]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
