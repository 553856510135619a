"""--int8: static QDQ quantization of each model with onnxruntime.quantization.

`quant_pre_process` (shape inference and ORT's own graph cleanup), then `quantize_static` in QDQ
format, int8 activations and weights, calibrated on the calibration arrays. A model that cannot be
quantized gets int8 status "skipped" with the reason; the others go on.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .models import BenchModel, file_bytes
from .protocol import first_line


@dataclass
class Calibration:
    arrays: dict[str, np.ndarray]
    num: int
    unbatched: set
    per_channel: bool
    method: str  # 'minmax', 'entropy' or 'percentile'


class _Reader:
    """onnxruntime.quantization CalibrationDataReader over in-memory arrays."""

    def __init__(self, arrays: dict, n: int, chunk: int, unbatched: set, pad: bool):
        self.arrays, self.n, self.chunk, self.unbatched, self.pad = arrays, n, chunk, unbatched, pad
        self.pos = 0

    def get_next(self):
        if self.pos >= self.n:
            return None
        m = min(self.chunk, self.n - self.pos)
        feeds = {}
        for k, a in self.arrays.items():
            if k in self.unbatched:
                feeds[k] = a
                continue
            piece = a[self.pos:self.pos + m]
            if m < self.chunk and self.pad:  # static batch: pad the last piece
                piece = np.concatenate([piece, np.repeat(piece[-1:], self.chunk - m, axis=0)])
            feeds[k] = piece
        self.pos += m
        return feeds

    def rewind(self):
        self.pos = 0


@contextlib.contextmanager
def _quiet_quantizer():
    """onnxruntime.quantization logs warnings on the root logger and ORT's C++ log: keep them out of the table."""
    import onnxruntime as ort

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    ort.set_default_logger_severity(3)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            yield
    finally:
        logging.disable(previous)
        ort.set_default_logger_severity(2)


def _quantize_files(src: str, pre: Path, out: Path, reader, calib: Calibration, big: bool) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    with _quiet_quantizer():
        try:
            quant_pre_process(src, str(pre), save_as_external_data=big)
        except Exception:  # symbolic shape inference gives up on some graphs; ONNX shape inference alone
            quant_pre_process(src, str(pre), skip_symbolic_shape=True, save_as_external_data=big)
        quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, per_channel=calib.per_channel, use_external_data_format=big,
                        calibrate_method=methods[calib.method])


def quantize(m: BenchModel, tmp: Path, calib: Calibration, chunk: int) -> tuple[str | None, dict]:
    """Quantize m.run_path into `tmp`; return (int8 path or None, the models[].int8 entry)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(_Reader, CalibrationDataReader):
        pass

    t0 = time.perf_counter()
    info: dict = {"status": "ok", "reason": None}
    out = tmp / f"m{m.index}.int8.onnx"
    reader = Reader(calib.arrays, calib.num, chunk, calib.unbatched, pad=m.static_batch is not None)
    try:
        _quantize_files(m.run_path, tmp / f"m{m.index}.pre.onnx", out, reader, calib, m.size_bytes > (1 << 30))
    except Exception as e:
        info.update(status="skipped", reason=f"quantization failed: {first_line(e)}")
        return None, info
    info["seconds"] = round(time.perf_counter() - t0, 3)
    qm = onnx.load(str(out), load_external_data=False)
    info["nodes"] = len(qm.graph.node)
    info["size_bytes"] = file_bytes(out)
    info["op_counts"] = dict(Counter(n.op_type for n in qm.graph.node).most_common())
    return str(out), info
