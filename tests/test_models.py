"""Tests for the training-time model zoo (models/), its exporter wrapper and the demo file.

Every zoo entry must build deterministically, have every BN perturbed away from identity by
``calibrate``, and export in every form to an ONNX file that passes the full checker and that ONNX
Runtime (graph optimizations off) evaluates to torch's output.  The dynamo exporter takes a few
seconds per model, so by default it runs on a representative subset (``DYNAMO_FAST``); the rest of
the zoo's dynamo exports are marked ``slow``.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import models
from models.common import batchnorms
from models.export import DEFAULT_OPSET, FORMS, data_path, export_onnx

REPO = Path(__file__).resolve().parents[1]
NAMES = sorted(models.ZOO)
RTOL, ATOL = 1e-4, 1e-5

#: dynamo exports run by default: GAP->ReduceMean/Flatten->Reshape (repvgg), slice assignment ->
#: ScatterND (dbb_slice), chunk -> Split (split_concat), BN-only branches + layer scale (fastvit).
DYNAMO_FAST = {"repvgg", "dbb_slice", "split_concat", "fastvit"}


@functools.lru_cache(maxsize=None)
def _model(name: str) -> torch.nn.Module:
    return models.ZOO[name].build()


@functools.lru_cache(maxsize=None)
def _reference(name: str) -> tuple[np.ndarray, np.ndarray]:
    entry = models.ZOO[name]
    x = entry.example_input()
    with torch.no_grad():
        y = _model(name)(x)
    return x.numpy(), y.numpy()


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    assert [o.name for o in sess.get_outputs()] == ["output"]
    return sess.run(None, {"input": x})[0]


def _export_params():
    for name in NAMES:
        for form in FORMS:
            marks = [pytest.mark.slow] if form.startswith("dynamo") and name not in DYNAMO_FAST else []
            yield pytest.param(name, form, marks=marks, id=f"{name}-{form}")


# ---------------------------------------------------------------------------------------------
# registry

def test_registry_entries_are_well_formed():
    assert {"dbb_slice", "dbb_subpadadd", "resnet18", "resnet50", "resrep"} <= set(models.ZOO)
    for name, entry in models.ZOO.items():
        assert entry.name == name
        assert entry.description and "\n" not in entry.description
        assert entry.notes
        assert entry.input_shape[0] == 1 and len(entry.input_shape) == 4
        assert entry.deploy_ops and all(n > 0 for n in entry.deploy_ops.values())
        assert not set(entry.deploy_ops) & set(models.OP_ALIASES), "use canonical op names"
        with pytest.raises(Exception):
            entry.name = "x"  # frozen


def test_check_deploy_ops_rules():
    want = {"Conv": 2, "Relu": 2, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
    legacy = {"Conv": 2, "Relu": 2, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
    dynamo = {"Conv": 2, "Relu": 2, "ReduceMean": 1, "Reshape": 1, "Gemm": 1}
    assert models.check_deploy_ops(want, legacy) == []
    assert models.check_deploy_ops(want, dynamo) == []
    problems = models.check_deploy_ops(want, {**legacy, "Conv": 3, "Identity": 1})
    assert any(p.startswith("Conv: expected 2, found 3") for p in problems)
    assert any(p.startswith("Identity: 1 present") for p in problems)
    assert models.check_deploy_ops(want, {k: v for k, v in legacy.items() if k != "Gemm"}) \
        == ["Gemm: expected 1, found 0"]


# ---------------------------------------------------------------------------------------------
# build + calibrate

@pytest.mark.parametrize("name", NAMES)
def test_build_is_deterministic_and_well_conditioned(name):
    entry = models.ZOO[name]
    a, b = entry.build(), entry.build()
    assert not a.training and not b.training
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    x = entry.example_input(batch=2)
    with torch.no_grad():
        y1, y2 = a(x), a(x)
    assert torch.equal(y1, y2)
    assert torch.isfinite(y1).all()
    assert 0.05 < float(y1.std()) < 20.0, "output badly scaled"


@pytest.mark.parametrize("name", NAMES)
def test_calibrate_perturbs_every_bn(name):
    model = _model(name)
    bns = list(batchnorms(model))
    if name == "expandnet":
        assert not bns
    for bn_name, bn in bns:
        assert not torch.all(bn.weight == 1), f"{bn_name} still has gamma = 1"
        assert not torch.all(bn.bias == 0), f"{bn_name} still has beta = 0"
        assert not torch.all(bn.running_var == 1), f"{bn_name} running_var untouched"
        assert not torch.all(bn.running_mean == 0), f"{bn_name} running_mean untouched"
        assert bn.momentum is not None
    for p_name, p in model.named_parameters():
        if p_name.endswith("layer_scale"):
            assert float(p.detach().min()) >= 0.3, "layer scale left at its tiny init"


def test_calibrate_stats_match_activations():
    """Running stats are estimated from real activations, not left at (0, 1)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.bias.copy_(torch.tensor([2.0, -1.0, 0.5, 0.0]))
    bn = torch.nn.BatchNorm2d(4)
    model = models.calibrate(torch.nn.Sequential(conv, bn), (1, 3, 8, 8), seed=3, steps=4)
    assert not model.training and bn.momentum == 0.1
    with torch.no_grad():
        h = conv(torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(9)))
    torch.testing.assert_close(bn.running_mean, h.mean(dim=(0, 2, 3)), atol=0.05, rtol=0)
    torch.testing.assert_close(bn.running_var, h.var(dim=(0, 2, 3)), rtol=0.15, atol=0)


def test_resrep_zero_rows_are_exact():
    model = _model("resrep")
    q = model.compactor.weight.detach()[:, :, 0, 0]
    zero = (q == 0).all(dim=1)
    assert int(zero.sum()) == 4 == len(model.zero_rows)
    assert torch.equal(torch.nonzero(zero).flatten(), model.zero_rows)
    # merged conv-BN-compactor: those output channels have weight and bias exactly zero
    conv, bn = model.conv.conv, model.conv.bn
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    k = conv.weight.double() * s.double().view(-1, 1, 1, 1)
    b = (bn.bias - bn.running_mean * s).double()
    k2 = torch.einsum("om,mikl->oikl", q.double(), k)
    b2 = q.double() @ b
    assert torch.all(k2[zero] == 0) and torch.all(b2[zero] == 0)
    assert torch.all(k2[~zero].flatten(1).abs().sum(1) > 0)
    assert model.kept_channels == 12 == models.ZOO["resrep"].deploy_conv_out_channels[0]


def test_dbb_pad_modes_agree():
    a, b = models.ZOO["dbb_slice"].build(), models.ZOO["dbb_subpadadd"].build()
    x = models.ZOO["dbb_slice"].example_input(batch=2)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-6)


def test_bn_and_pad_commutes_with_zero_padding():
    """BNAndPad(y) == BN(pad0(y)) -- the property that makes DBB's branches exact."""
    from models.common import BNAndPad

    for mode in ("slice", "subpadadd"):
        layer = BNAndPad(5, 2, mode)
        models.calibrate(layer, (1, 5, 6, 6), seed=1)
        y = torch.randn(2, 5, 6, 6)
        with torch.no_grad():
            want = layer.bn(torch.nn.functional.pad(y, [2, 2, 2, 2]))
            assert torch.allclose(layer(y), want, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# export

@pytest.mark.parametrize("name,form", list(_export_params()))
def test_export_checks_and_matches_torch(name, form, tmp_path):
    entry = models.ZOO[name]
    path = export_onnx(_model(name), entry.input_shape, tmp_path / f"{form}.onnx", form)
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path), load_external_data=False)
    opset = {o.domain: o.version for o in proto.opset_import}[""]
    assert opset == DEFAULT_OPSET[form]
    if form.startswith("dynamo"):
        assert data_path(path).exists()
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    hist = models.op_histogram(proto)
    if form.endswith("-nofold"):  # nothing folded: every BN module is a node
        assert hist["BatchNormalization"] == len(list(batchnorms(_model(name))))
    x, y = _reference(name)
    got = _ort(path, x)
    assert got.shape == y.shape
    np.testing.assert_allclose(got, y, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("form", FORMS)
def test_export_dynamic_batch(form, tmp_path):
    name = "dbb_slice"
    entry = models.ZOO[name]
    model = _model(name)
    path = export_onnx(model, entry.input_shape, tmp_path / "m.onnx", form, dynamic_batch=True)
    x = entry.example_input(seed=1, batch=3)
    with torch.no_grad():
        y = model(x).numpy()
    np.testing.assert_allclose(_ort(path, x.numpy()), y, rtol=RTOL, atol=ATOL)


def test_export_rejects_unknown_form(tmp_path):
    with pytest.raises(ValueError):
        export_onnx(_model("acnet"), (1, 8, 16, 16), tmp_path / "m.onnx", "tflite")


# ---------------------------------------------------------------------------------------------
# tools and the bundled demo

def test_export_zoo_tool(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_zoo", REPO / "tools" / "export_zoo.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    md = tmp_path / "EXPORTS.md"
    md.write_text("# notes kept\n\n" + tool.BEGIN + "\nSTALE-LINE\n" + tool.END + "\n\ntail kept\n")
    assert tool.main([str(tmp_path / "out"), "--models", "acnet,fastvit", "--forms",
                      "legacy,legacy-nofold", "--verify", "--histogram", str(md)]) == 0
    for name in ("acnet", "fastvit"):
        d = tmp_path / "out" / name
        assert (d / "legacy.onnx").exists() and (d / "legacy-nofold.onnx").exists()
        for form in ("legacy", "legacy-nofold"):  # the hand-written deploy form, beside it
            dep = d / f"{form}.deploy.onnx"
            onnx.checker.check_model(str(dep), full_check=True)
            assert models.op_histogram(dep)["Conv"] == models.ZOO[name].deploy_ops["Conv"]
            np.testing.assert_allclose(_ort(dep, _reference(name)[0]), _reference(name)[1],
                                       rtol=RTOL, atol=ATOL)
        io = np.load(d / "io.npz")
        np.testing.assert_array_equal(io["input"], models.ZOO[name].example_input().numpy())
        np.testing.assert_array_equal(io["output"], _reference(name)[1])
    text = md.read_text()
    assert text.startswith("# notes kept") and text.rstrip().endswith("tail kept")
    assert "STALE-LINE" not in text and "### acnet" in text and "| BatchNormalization |" in text


def test_demo_file_is_the_calibrated_repvgg():
    demo = REPO / "onnxrep" / "data" / "demo.onnx"
    assert demo.exists(), "run tools/make_demo.py"
    assert demo.stat().st_size < 1_000_000
    onnx.checker.check_model(str(demo), full_check=True)
    proto = onnx.load(str(demo))
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    hist = models.op_histogram(proto)
    assert hist["BatchNormalization"] == len(list(batchnorms(_model("repvgg"))))
    assert hist["Conv"] == 12 and hist["Relu"] == 6
    x, y = _reference("repvgg")
    np.testing.assert_allclose(_ort(demo, x), y, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# hand-written deploy forms (each block's switch_to_deploy, the paper's conversion)

#: where the paper's own deploy form keeps more than onnxrep's deploy_ops (see the model docs):
#: RepLKNet's structural_reparam leaves the pre-BN; FastViT keeps the ConvFFN's layer scale;
#: PaddleClas's rep() keeps PP-LCNetV3's four scalar affines (Mul, Add), where onnxrep folds three
#: and writes the last as a depthwise 1x1 Conv (hence one Conv fewer).
HANDWRITTEN_EXTRA = {"replknet": {"BatchNormalization": 1}, "fastvit_stage": {"Mul": 2},
                     "pplcnet": {"Conv": -1, "Mul": 4, "Add": 4},
                     "pplcnet_s2": {"Conv": -1, "Mul": 3, "Add": 3}}
#: transformer entries: the exporters write a hand-converted Linear's bias and shape arithmetic in
#: their own way (Gemm or MatMul + Add, Concat of shapes), so the op-by-op comparison with LeViT's
#: fuse() and loralib's merge() exports lives in tests/rules/test_matmul_zoo.py, where it is
#: cleaned of that arithmetic first.
STRUCTURE_COMPARED_ELSEWHERE = {"levit", "vit_layerscale", "convnext", "lora_mlp", "lora_attention", "lora_qkv",
                                "lora_merged", "lora_inplace", "mlp_mixer"}


@functools.lru_cache(maxsize=None)
def _deployed(name: str) -> torch.nn.Module:
    return models.ZOO[name].build_deploy()


@pytest.mark.parametrize("name", NAMES)
def test_handwritten_deploy_matches_training_module(name):
    """build_deploy() computes what the training module computes (eval mode, fp32 rounding)."""
    entry = models.ZOO[name]
    train, deploy = _model(name), _deployed(name)
    assert not deploy.training
    x = entry.example_input(seed=3, batch=2)
    with torch.no_grad():
        want, got = train(x), deploy(x)
    scale = float(want.abs().max())
    # fp32 rounding of a different summation order; ResNet-50's 16 blocks reach ~4e-6
    assert float((got - want).abs().max()) <= 1e-5 * scale
    n_bn = len(list(batchnorms(deploy)))
    assert n_bn == HANDWRITTEN_EXTRA.get(name, {}).get("BatchNormalization", 0)
    # the deploy module really is smaller: the branches are gone, not bypassed
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_params(deploy) <= n_params(train)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in STRUCTURE_COMPARED_ELSEWHERE])
def test_handwritten_deploy_exports_to_its_documented_structure(name, tmp_path):
    """Exported like the training form (legacy, folding on), the hand-written deploy form has the
    entry's deploy_ops (plus what the paper's code keeps), passes the checker and equals torch."""
    entry = models.ZOO[name]
    path = export_onnx(_deployed(name), entry.input_shape, tmp_path / "deploy.onnx", "legacy")
    onnx.checker.check_model(str(path), full_check=True)
    hist = models.op_histogram(path)
    hist.pop("Constant", None)
    want = dict(entry.deploy_ops)
    for op, n in HANDWRITTEN_EXTRA.get(name, {}).items():
        want[op] = want.get(op, 0) + n
    assert models.check_deploy_ops(want, hist) == []
    x, y = _reference(name)
    np.testing.assert_allclose(_ort(path, x), y, rtol=RTOL, atol=ATOL)


def test_deploy_convert_leaves_the_training_model_alone_and_is_idempotent():
    entry = models.ZOO["repvgg"]
    train = entry.build()
    before = {k: v.clone() for k, v in train.state_dict().items()}
    deploy = models.to_deploy(train)
    after = train.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(hasattr(b, "rbr_dense") for b in train.body)
    assert all(not hasattr(b, "rbr_dense") and hasattr(b, "rbr_reparam") for b in deploy.body)
    state = {k: v.clone() for k, v in deploy.state_dict().items()}
    for m in deploy.modules():
        if hasattr(m, "switch_to_deploy"):
            m.switch_to_deploy()  # second call: nothing left to convert
    assert all(torch.equal(state[k], v) for k, v in deploy.state_dict().items())


def test_grouped_identity_kernel_is_per_group():
    """bn_kernel puts the identity at o mod (C/g), not at o (YOLOv7's fill_diagonal_ bug)."""
    from models.deploy import bn_kernel

    bn = torch.nn.BatchNorm2d(8).eval()
    models.calibrate(bn, (1, 8, 4, 4), seed=2)
    k, b = bn_kernel(bn, groups=4, kernel_size=3)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        got = torch.nn.functional.conv2d(x, k, b, padding=1, groups=4)
        want = bn.double()(x)
    torch.testing.assert_close(got, want)


def test_dbb_deploy_is_exact_at_the_border():
    """The composed 1x1 -> KxK and 1x1 -> avg kernels hold at the border only because BN-and-pad
    fills it with the BN's bias: compare border pixels separately."""
    entry = models.ZOO["dbb_subpadadd"]
    x = entry.example_input(seed=5, batch=2)
    with torch.no_grad():
        want, got = _model("dbb_subpadadd")(x), _deployed("dbb_subpadadd")(x)
    border = torch.ones_like(want, dtype=torch.bool)
    border[..., 1:-1, 1:-1] = False
    scale = float(want.abs().max())
    assert float((got - want)[border].abs().max()) <= 2e-6 * scale


def test_resrep_deploy_drops_the_dead_channels():
    deploy = _deployed("resrep")
    assert deploy.conv.out_channels == 12 == deploy.following.in_channels
    assert deploy.compactor is None


def _tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_bench_zoo_tool_compares_with_the_handwritten_deploy(capsys):
    tool = _tool("bench_zoo")
    assert tool.main(["--models", "acnet", "--forms", "legacy", "--batches", "1", "--runs", "5",
                      "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| acnet | legacy |"))
    cells = [c.strip() for c in row.strip().strip("|").split("|")]
    assert cells[2] == "5 → 1 (1)"         # train → ours (hand-written deploy): one Conv each
    assert cells[3] == "2 / 2"             # and the same graph once ORT has optimized it
    assert 0.3 < float(cells[5]) < 3.0     # vs deploy: a ratio near 1 (timing is not tested)
    a_dep, a_ours = (float(v) for v in cells[6].split(","))
    assert a_dep > 0 and a_ours > 0
    assert "Noise band: 90th percentile" in out and "Geometric mean" in out


def test_bench_zoo_tool_refuses_unknown_names(capsys):
    assert _tool("bench_zoo").main(["--models", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model or form: nope") and len(err.splitlines()) == 1


def test_bench_zoo_why_names_the_differing_ops():
    from collections import Counter

    why = _tool("bench_zoo").why
    assert why(Counter(Conv=2, Erf=1, Mul=2), Counter(Conv=2, Gelu=1)) == \
        "ORT graph: Erf 1 vs 0, Gelu 0 vs 1, Mul 2 vs 0"
    assert why(Counter(Conv=2), Counter(Conv=2)) == "same ORT graph: noise"
