#!/usr/bin/env python
"""Build ``onnxrep/data/demo.onnx``: the bundled training-time network ``onnxrep`` can be tried on.

The demo is the zoo's ``repvgg`` entry (``models.repvgg.RepVGG``: stride-2 stem, two stages, six
RepVGG blocks -- two of them grouped (g=4), three with an identity BN -- global average pool and
a Linear head), seeded and calibrated so that every BN has real statistics, exported with the
``legacy-nofold`` form (TorchScript exporter, opset 17, ``do_constant_folding=False``) so that every
BatchNormalization and every branch is visible as trained.  Input ``input`` 1x3x32x32, output
``output`` 1x10.  The file is self-contained (no external data), well under 1 MB, and byte-for-byte
reproducible; optimizing it needs only onnx/onnxruntime, not torch.

Deploy form that ``onnxrep optimize`` should reach: 6 Conv + 6 Relu, GlobalAveragePool, Flatten,
Gemm (``models.ZOO["repvgg"].deploy_ops``).

Usage: ``python tools/make_demo.py [OUT]`` (default onnxrep/data/demo.onnx).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import onnx  # noqa: E402

import models  # noqa: E402
from models.export import export_onnx  # noqa: E402

DEFAULT_OUT = REPO / "onnxrep" / "data" / "demo.onnx"
ENTRY = "repvgg"


def build_demo(out: Path = DEFAULT_OUT) -> Path:
    entry = models.ZOO[ENTRY]
    model = entry.build()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / "demo.onnx"
        export_onnx(model, entry.input_shape, tmp_path, "legacy-nofold")
        proto = onnx.load(str(tmp_path))
    proto.graph.name = "repvgg_demo"
    proto.doc_string = (
        "onnxrep demo: training-time RepVGG (6 blocks of 3x3 conv-BN + 1x1 conv-BN [+ identity "
        "BN] -> ReLU, 2 grouped), calibrated BNs, exported by torch.onnx (TorchScript, opset 17, "
        "no constant folding). Built by tools/make_demo.py.")
    onnx.checker.check_model(proto, full_check=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else DEFAULT_OUT
    path = build_demo(out)
    hist = models.op_histogram(path)
    print(f"wrote {path} ({path.stat().st_size} bytes): "
          + ", ".join(f"{op} {n}" for op, n in sorted(hist.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
