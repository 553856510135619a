"""The transformer zoo (models/transformers.py) against the papers' own deploy conversions.

Each training-time block is exported (legacy exporter, opset 17), optimized with every default
rule, and compared with what the model's hand-written conversion (LeViT's Linear_BN.fuse,
loralib's merge) exports, or with the property the issue asks for (no layer-scale Mul left)."""
from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

import onnxrep  # noqa: E402
from models import ZOO  # noqa: E402
from models.export import export_onnx  # noqa: E402
from tests.helpers import run_model  # noqa: E402

LINEAR = ("MatMul", "Gemm")


def export(model, entry, path):
    return onnx.load(str(export_onnx(model, entry.input_shape, path, "legacy")))


def cleaned(model):
    """The hand-converted export with only constant folding and identities removed (the legacy
    exporter leaves some shape arithmetic unfolded), and the attention's q·kᵀ scale folded into q
    (fold_attention_scale: no paper's conversion does it, onnxrep does it to both sides); no
    re-parameterization rule runs."""
    return onnxrep.optimize(model, rules=["remove_identities", "fold_attention_scale"])


def optimized(name, tmp_path):
    entry = ZOO[name]
    model = entry.build()
    train = export(model, entry, tmp_path / "train.onnx")
    out, report = onnxrep.optimize(train, return_report=True)  # verified in ORT by optimize itself
    x = entry.example_input().numpy()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = run_model(out, {"input": x})["output"]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    return model, train, out, report


def hist(model) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def constant_muls(model) -> list[tuple[str, tuple]]:
    """Mul nodes with a constant operand, with that constant's shape."""
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return [(n.name, inits[i]) for n in model.graph.node if n.op_type == "Mul" for i in n.input if i in inits]


def test_levit_matches_its_own_fuse(tmp_path):
    """LeViT: 0 BatchNormalization, no Flatten, the same ops as the Linear_BN.fuse() export."""
    model, train, out, report = optimized("levit", tmp_path)
    assert hist(train)["BatchNormalization"] == 6
    deploy = copy.deepcopy(model)
    deploy.switch_to_deploy()
    hand = cleaned(export(deploy, ZOO["levit"], tmp_path / "hand.onnx"))
    assert hist(out)["BatchNormalization"] == 0 and hist(out)["Flatten"] == 0
    assert hist(out) == hist(hand)
    x = ZOO["levit"].example_input().numpy()
    a, b = run_model(out, {"input": x})["output"], run_model(hand, {"input": x})["output"]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert report.rule_counts.get("fold_linear_affine") == 6


@pytest.mark.parametrize("name, gammas", [("vit_layerscale", 2), ("convnext", 1)])
def test_no_layer_scale_mul_left(tmp_path, name, gammas):
    """ViT / ConvNeXt: every Mul by a per-channel constant (the layer scales) is folded; only
    scalar Muls (GELU's 0.5) remain (the attention scale folds into q)."""
    _, train, out, _ = optimized(name, tmp_path)
    per_channel = lambda m: [c for c in constant_muls(m) if int(np.prod(c[1])) > 1]  # noqa: E731
    assert len(per_channel(train)) == gammas
    assert per_channel(out) == []


@pytest.mark.parametrize("name", ["lora_mlp", "lora_attention", "lora_qkv", "lora_merged", "lora_inplace"])
def test_lora_as_many_matmuls_as_without_adapters(tmp_path, name):
    """LoRA: the optimized graph has the MatMul/Gemm count and ops of loralib's merged export."""
    model, train, out, _ = optimized(name, tmp_path)
    merged = copy.deepcopy(model)
    merged.merge()
    hand = cleaned(export(merged, ZOO[name], tmp_path / "merged.onnx"))
    count = lambda m: sum(hist(m)[op] for op in LINEAR)  # noqa: E731
    assert count(train) > count(hand)
    assert count(out) == count(hand)
    assert hist(out) == hist(hand)
    x = ZOO[name].example_input().numpy()
    a, b = run_model(out, {"input": x})["output"], run_model(hand, {"input": x})["output"]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_mlp_mixer_matches_its_hand_conversion(tmp_path):
    """MLP-Mixer with W_tok·X token mixing: the token BN folds into the left weight's rows, the
    channel layer scale into fc2; the histogram and outputs are those of its switch_to_deploy()."""
    model, train, out, report = optimized("mlp_mixer", tmp_path)
    deploy = copy.deepcopy(model)
    deploy.switch_to_deploy()
    hand = cleaned(export(deploy, ZOO["mlp_mixer"], tmp_path / "hand.onnx"))
    assert hist(train)["BatchNormalization"] == 1 and hist(out)["BatchNormalization"] == 0
    assert hist(out) == hist(hand)
    x = ZOO["mlp_mixer"].example_input().numpy()
    a, b = run_model(out, {"input": x})["output"], run_model(hand, {"input": x})["output"]
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_second_run_changes_nothing(tmp_path):
    """The optimized LeViT block is a fixed point."""
    _, _, out, _ = optimized("levit", tmp_path)
    again, report = onnxrep.optimize(out, return_report=True)
    assert report.rule_counts == {}
    assert hist(again) == hist(out)


@pytest.mark.parametrize("name, form", [("levit", "legacy"), ("levit", "dynamo"), ("lora_mlp", "legacy"),
                                        ("vit_layerscale", "legacy"), ("lora_qkv", "legacy")])
def test_dynamic_batch_exports_fold_too(tmp_path, name, form):
    """With a symbolic batch the legacy exporter writes reshape_as as Reshape(y, Shape(x)) and loses
    the token count in shape inference; dynamo fuses reshape_as with the head split. Every BN,
    layer scale and adapter still folds (left: the exporter's own shape arithmetic)."""
    entry = ZOO[name]
    model = entry.build()
    path = export_onnx(model, entry.input_shape, tmp_path / "train.onnx", form, dynamic_batch=True)
    out, report = onnxrep.optimize(str(path), return_report=True)
    h = hist(out)
    assert h["BatchNormalization"] == 0
    for op in ("MatMul", "Add", "Mul", "LayerNormalization", "Softmax", "HardSwish", "Transpose", "Erf"):
        assert h[op] == entry.deploy_ops.get(op, 0), op
    x = np.random.default_rng(0).standard_normal((3,) + tuple(entry.input_shape[1:])).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    got = run_model(out, {"input": x})["output"]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
