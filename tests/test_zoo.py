"""End to end over the model zoo: every model, in every exporter form, with static, dynamic-batch
and dynamic-H/W axes, reaches its deploy form.

The matrix (models.ZOO x models.export.FORMS x AXES): export with torch once per cell into a
session-scoped directory, optimize it as the CLI does (onnxrep.optimize_file: streamed, verified as
written), then check the output with onnx.checker (full), compare it with torch, check that the
symbolic axes stayed symbolic, that every linear region left unmerged has a decline reason, and
compare its op histogram with the entry's documented deploy_ops. Static cells always run; the
dynamic-axes cells run for a representative subset by default and for the rest under `slow`
(the dynamo exporter takes seconds per export). The CLI itself runs once per form.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from models import ZOO, check_deploy_ops  # noqa: E402
from models.export import AXES, FIXED_HW, FORMS, export_onnx  # noqa: E402
from onnxrep import verify as V  # noqa: E402
from onnxrep.errors import InputError  # noqa: E402

LINEAR = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
#: dynamic-axes cells that run by default (legacy forms / dynamo forms); the rest are `slow`
DYNAMIC_FAST = {"repvgg", "split_concat", "dbb_subpadadd", "mobileone", "repmlp", "fastvit"}
DYNAMO_DYNAMIC_FAST = {"repvgg", "split_concat"}

#: cells that do not reach the deploy form, and why; each still optimizes (or is refused) correctly,
#: and a cell that starts reaching it fails, so this list only shrinks
KNOWN_GAPS: dict[tuple[str, str, str], str] = {}
#: cells whose export runs only at the traced size although its H/W are symbolic: the legacy
#: exporter bakes the traced 16x16 into the slice assignment's Expand. onnxrep refuses them unpinned
#: (exit 3, with the hint to pin) and reaches the deploy form with the traced size pinned, as a user
#: is told to; test_size_baked_exports_only_run_at_the_traced_size shows ORT itself fails elsewhere.
PIN_TRACED_SIZE = {(name, form, "hw") for name in ("dbb_slice", "ecb") for form in FORMS if form.startswith("legacy")}


def _cells():
    for name in sorted(ZOO):
        for form in FORMS:
            for axes in AXES:
                if axes == "hw" and name in FIXED_HW:
                    continue
                fast = axes == "static" or name in (DYNAMO_DYNAMIC_FAST if form.startswith("dynamo") else DYNAMIC_FAST)
                yield pytest.param(name, form, axes, marks=[] if fast else [pytest.mark.slow],
                                   id=f"{name}-{form}-{axes}")


@pytest.fixture(scope="session")
def zoo_exports(tmp_path_factory):
    """get(name, form, axes) -> (path, x, torch output); each cell exported once per session."""
    root = tmp_path_factory.mktemp("zoo")
    cache, models = {}, {}

    def get(name, form, axes="static"):
        key = (name, form, axes)
        if key not in cache:
            entry = ZOO[name]
            if name not in models:
                models[name] = entry.build()
            model = models[name]
            try:
                path = export_onnx(model, entry.input_shape, root / name / f"{form}-{axes}.onnx", form, axes=axes)
            except Exception as e:  # noqa: BLE001 - recorded, reported by the test that needs it
                cache[key] = e
                return e
            shape = (2, *entry.input_shape[1:]) if axes == "batch" else entry.input_shape
            x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
            with torch.no_grad():
                ref = model(torch.from_numpy(x)).numpy()
            cache[key] = (path, x, ref)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def exports(zoo_exports):
    return lambda name, form: zoo_exports(name, form, "static")


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


def _unexplained(model: onnx.ModelProto, declines: list[dict]) -> list[str]:
    """Linear ops left next to each other (a BN, Pad or AveragePool, or a sum with a linear term)
    that no rule gave a reason for leaving."""
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    named = {d["node"] for d in declines}
    linear = LINEAR | {"BatchNormalization", "Pad", "AveragePool"}
    out = []
    for n in model.graph.node:
        leftover = n.op_type in ("BatchNormalization", "Pad", "AveragePool")
        if n.op_type in ("Add", "Sub", "Sum"):
            leftover = any(producer.get(i) is not None and producer[i].op_type in linear for i in n.input)
        if not leftover:
            continue
        # a rule anchors its decline at the region's head, which may sit downstream behind plumbing
        # (a slice assignment is Transpose → ScatterND → Transpose, four times for DBB's border),
        # or names a tensor of the region in its reason; the walk stops at the next linear op
        near, tensors, frontier = {n.name}, set(n.output), [n]
        near |= {producer[i].name for i in n.input if i in producer}
        for _ in range(16):
            frontier = [r for f in frontier if f is n or f.op_type not in LINEAR
                        for o in f.output for r in readers.get(o, [])]
            near |= {f.name for f in frontier}
            tensors |= {o for f in frontier for o in f.output}
        mentioned = any(f"'{t}'" in d["reason"] for d in declines for t in tensors)
        if not near & named and not mentioned:
            out.append(f"{n.op_type} {n.name}")
    return out


@pytest.mark.parametrize("name,form,axes", list(_cells()))
def test_zoo_reaches_deploy_form(zoo_exports, tmp_path, name, form, axes):
    """optimize_file writes a verified model that passes the full checker, equals torch, keeps its
    symbolic axes, explains every region it left, and has the entry's deploy_ops."""
    import onnxrep

    gap = KNOWN_GAPS.get((name, form, axes))
    got = zoo_exports(name, form, axes)
    if isinstance(got, Exception):
        if gap:
            pytest.xfail(f"{gap} (export: {type(got).__name__})")
        raise got
    path, x, ref = got
    out = tmp_path / "deploy.onnx"
    pin = (name, form, axes) in PIN_TRACED_SIZE
    try:
        report = onnxrep.optimize_file(path, out, input_shapes={"input": list(x.shape)} if pin else None)
    except InputError:
        if gap:
            pytest.xfail(gap)
        raise
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    y = V.run(model, {"input": x})["output"]
    # torch and ORT differ by fp32 rounding; deep nets (ResNet-50) accumulate ~1e-5 of it
    assert np.abs(y - ref).max() <= 3e-5 * float(np.abs(ref).max())
    dims = model.graph.input[0].type.tensor_type.shape.dim
    symbolic = [] if pin else {"static": [], "batch": [0], "hw": [2, 3]}[axes]
    assert [i for i, d in enumerate(dims) if not d.HasField("dim_value")] == symbolic
    assert _unexplained(model, report.declines) == []
    problems = check_deploy_ops(ZOO[name].deploy_ops, report.after["ops"]) + _bn_next_to_linear(model)
    if gap:
        if problems:
            pytest.xfail(gap)
        pytest.fail(f"known gap now reaches the deploy form: remove {(name, form, axes)} from KNOWN_GAPS")
    assert problems == []


@pytest.mark.parametrize("name,form,axes", sorted(PIN_TRACED_SIZE))
def test_size_baked_exports_only_run_at_the_traced_size(zoo_exports, tmp_path, name, form, axes):
    """Why PIN_TRACED_SIZE is pinned: ONNX Runtime itself cannot run the export at another H/W, and
    onnxrep refuses it unpinned with exit 3 and the hint to pin. If a torch release stops baking the
    size, this fails: move the cell back to the plain matrix."""
    path, x, ref = zoo_exports(name, form, axes)
    big = np.zeros((*x.shape[:2], 2 * x.shape[2], 2 * x.shape[3]), np.float32)
    with pytest.raises(Exception, match="(?i)expand"):
        V.run_file(path, {"input": big})
    proc = subprocess.run([sys.executable, "-m", "onnxrep", "optimize", str(path), str(tmp_path / "o.onnx")],
                          capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert "pin that size with --input-shape" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("form", FORMS)
def test_cli_optimizes_every_form(exports, tmp_path, form):
    """`python -m onnxrep optimize -q` on each exporter form: exit 0, silent, deploy form."""
    path, x, ref = exports("repvgg", form)
    out = tmp_path / "deploy.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxrep", "optimize", str(path), str(out), "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    model = onnx.load(str(out))
    hist = {}
    for n in model.graph.node:
        hist[n.op_type] = hist.get(n.op_type, 0) + 1
    assert check_deploy_ops(ZOO["repvgg"].deploy_ops, hist) == []
    y = V.run(model, {"input": x})["output"]
    assert np.abs(y - ref).max() <= 3e-5 * float(np.abs(ref).max())


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


@pytest.mark.parametrize("name", ["repvgg", "dbb_slice", "mobileone", "pplcnet", "orepa", "ecb"])
def test_all_forms_reach_the_same_graph(exports, tmp_path, name):
    """Every exporter form of one model optimizes to the same op histogram and outputs."""
    import onnxrep

    outs = []
    for form in FORMS:
        path, x, ref = exports(name, form)
        model = onnxrep.optimize(str(path))
        hist = sorted((n.op_type for n in model.graph.node))
        outs.append((hist, V.run(model, {"input": x})["output"]))
    norm = [sorted({"ReduceMean": "GlobalAveragePool", "Reshape": "Flatten"}.get(o, o) for o in h) for h, _ in outs]
    assert all(h == norm[0] for h in norm), dict(zip(FORMS, norm))
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
