"""Detector blocks (models/detectors.py) beyond the zoo matrix: the spellings the zoo entries do
not cover, and the facts the entries rely on."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

import onnxrep  # noqa: E402
from models import ZOO, calibrate, check_deploy_ops, op_histogram  # noqa: E402
from models.detectors import RepNCSPELAN4  # noqa: E402
from models.export import export_onnx  # noqa: E402
from onnxrep import verify as V  # noqa: E402

ELAN_BODY = {"Conv": 14, "Sigmoid": 14, "Mul": 14, "Add": 2, "Concat": 3}


@pytest.mark.parametrize("form,axes,split_ops", [("legacy", "static", {"Slice": 2}),
                                                  ("legacy", "hw", {"Slice": 2}),
                                                  ("dynamo", "static", {"Split": 1})])
def test_repncspelan_chunk_forward(tmp_path, form, axes, split_ops):
    """YOLOv9's default forward (chunk(2, 1)) reaches the same deploy graph as the zoo's
    forward_split entry; only the chunk's spelling differs: the legacy exporter writes two Slices
    (their Shape/Gather/Div bounds fold to constants), dynamo one Split."""
    shape = ZOO["yolov9_repncspelan"].input_shape
    torch.manual_seed(0)
    model = calibrate(RepNCSPELAN4(split=False), shape)
    path = export_onnx(model, shape, tmp_path / "elan.onnx", form, axes=axes)
    report = onnxrep.optimize_file(path, tmp_path / "out.onnx")
    out = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(out, full_check=True)
    assert check_deploy_ops({**ELAN_BODY, **split_ops}, report.after["ops"]) == []
    x = np.random.default_rng(1).standard_normal((1, 16, 24, 20) if axes == "hw" else shape).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    y = V.run(out, {"input": x})["output"]
    assert np.abs(y - ref).max() <= 3e-5 * float(np.abs(ref).max())


def test_yolo_blocks_export_yolo_epsilon(tmp_path):
    """The YOLO entries' BNs carry eps 1e-3 into the export (what YOLO's initialize_weights sets), so
    a fold that assumed 1e-5 would fail their zoo cells; RT-DETR's keep 1e-5."""
    for name, eps in (("yolov7_repconv", 1e-3), ("qarepvgg", 1e-3), ("repc3", 1e-5)):
        entry = ZOO[name]
        path = export_onnx(entry.build(), entry.input_shape, tmp_path / f"{name}.onnx", "legacy-nofold")
        m = onnx.load(str(path))
        got = {round(a.f, 8) for n in m.graph.node if n.op_type == "BatchNormalization"
               for a in n.attribute if a.name == "epsilon"}
        assert got == {round(float(np.float32(eps)), 8)}, (name, got)
        assert op_histogram(m)["BatchNormalization"] > 0


def test_qarepvgg_bn_after_sum_is_exported_as_a_node(tmp_path):
    """QARepVGG's BN reads the Add of the three branches: even the folding exporters cannot fuse it
    (its producer is no Conv), so the zoo cell really exercises the BN-after-sum fold."""
    entry = ZOO["qarepvgg"]
    path = export_onnx(entry.build(), entry.input_shape, tmp_path / "q.onnx", "legacy")
    m = onnx.load(str(path))
    producer = {o: n for n in m.graph.node for o in n.output}
    bns = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == 2 and all(producer[n.input[0]].op_type == "Add" for n in bns)
