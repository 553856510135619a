#!/usr/bin/env python
"""Generate a large training-time RepVGG-style ONNX model with external data, streaming.

    python tools/make_large_model.py /tmp/big.onnx                       # > 2 GiB (default)
    python tools/make_large_model.py /tmp/mid.onnx --size-mb 500 --channels 1024
    python tools/make_large_model.py /tmp/tiny.onnx --channels 16 --blocks 2 --dtype fp16

Each block is the RepVGG training form on C channels at a fixed H×W:

    x ─┬─ Conv3×3(pad 1) ─ BN ─┐
       ├─ Conv1×1 ──────── BN ─┼─ Add ─ Add ─ Relu ─→ next block
       └──────────────────  BN ┘

so the optimized model is one Conv3×3 + Relu per block (about 9/10 of the input's weights).
The model is built directly with onnx.helper + numpy (no torch). Every tensor is generated,
appended to `<out>.data` (4 KiB aligned) and dropped before the next one, and the TensorProtos
only reference the data file, so the generator itself holds about one tensor in memory.

The batch dimension is symbolic ('batch'); H×W is static. `--dtype fp16` writes fp16 weights and
fp16 I/O; `--dtype mixed` writes fp16 weights with fp32 graph I/O (a Cast after the input and
before the output, fp16 inside).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ALIGN = 4096
_DT = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16),
       "mixed": (np.float16, TensorProto.FLOAT16)}


def block_bytes(channels: int, dtype: str = "fp32") -> int:
    """Weight bytes of one block: 3×3 and 1×1 kernels plus three BNs (4 vectors each)."""
    item = np.dtype(_DT[dtype][0]).itemsize
    return (channels * channels * 10 + 12 * channels) * item


class _Writer:
    """Appends arrays to one external data file and returns TensorProtos that point into it."""

    def __init__(self, data_path: Path):
        self.location = data_path.name
        self.f = open(data_path, "wb")
        self.offset = 0

    def tensor(self, name: str, array: np.ndarray, elem: int) -> TensorProto:
        pad = (-self.offset) % ALIGN
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        buf = memoryview(np.ascontiguousarray(array)).cast("B")
        self.f.write(buf)
        t = TensorProto(name=name, data_type=elem, dims=list(array.shape))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(self.offset)), ("length", str(buf.nbytes))):
            t.external_data.add(key=k, value=v)
        self.offset += buf.nbytes
        return t

    def close(self):
        self.f.close()


def make_model(out: str | os.PathLike, channels: int = 2048, blocks: int | None = None, hw: int = 8,
               dtype: str = "fp32", size_mb: float | None = None, seed: int = 0, opset: int = 17,
               batch: str | int = "batch") -> dict:
    """Write the model to `out` and its weights to `out`.data; return a summary dict.
    Either `blocks` or `size_mb` (weight megabytes to exceed, 2^20 bytes) picks the depth."""
    out = Path(out)
    np_dtype, elem = _DT[dtype]
    per_block = block_bytes(channels, dtype)
    if blocks is None:
        target = (size_mb if size_mb is not None else 2.2 * 1024) * 2**20
        blocks = max(1, math.ceil(target / per_block))
    rng = np.random.default_rng(seed)
    data_path = out.with_name(out.name + ".data")
    writer = _Writer(data_path)
    inits, nodes = [], []
    c = channels

    def randn(shape, scale):
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= scale
        return a.astype(np_dtype, copy=False)

    def uniform(lo, hi):
        return rng.uniform(lo, hi, c).astype(np_dtype)

    def bn(name, x, y, gamma):
        for suffix, arr in (("weight", uniform(*gamma)), ("bias", uniform(-0.1, 0.1)),
                            ("running_mean", uniform(-0.1, 0.1)), ("running_var", uniform(0.5, 1.5))):
            inits.append(writer.tensor(f"{name}.{suffix}", arr, elem))
        nodes.append(helper.make_node("BatchNormalization", [x, *(f"{name}.{s}" for s in ("weight", "bias", "running_mean", "running_var"))],
                                      [y], name=name, epsilon=1e-5, momentum=0.9))

    t0 = time.perf_counter()
    try:
        x = "input"
        if dtype == "mixed":
            nodes.append(helper.make_node("Cast", ["input"], ["input_fp16"], name="cast_in", to=TensorProto.FLOAT16))
            x = "input_fp16"
        for i in range(blocks):
            p = f"stage.{i}"
            # a residual stack: the BN scales keep activations O(1) through any depth
            inits.append(writer.tensor(f"{p}.rbr_dense.conv.weight", randn((c, c, 3, 3), 0.5 / math.sqrt(9 * c)), elem))
            nodes.append(helper.make_node("Conv", [x, f"{p}.rbr_dense.conv.weight"], [f"{p}.dense"], name=f"{p}.rbr_dense.conv",
                                          kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
            bn(f"{p}.rbr_dense.bn", f"{p}.dense", f"{p}.dense_bn", (0.3, 0.6))
            inits.append(writer.tensor(f"{p}.rbr_1x1.conv.weight", randn((c, c, 1, 1), 0.5 / math.sqrt(c)), elem))
            nodes.append(helper.make_node("Conv", [x, f"{p}.rbr_1x1.conv.weight"], [f"{p}.pw"], name=f"{p}.rbr_1x1.conv",
                                          kernel_shape=[1, 1]))
            bn(f"{p}.rbr_1x1.bn", f"{p}.pw", f"{p}.pw_bn", (0.3, 0.6))
            bn(f"{p}.rbr_identity", x, f"{p}.id_bn", (0.6, 0.9))
            nodes.append(helper.make_node("Add", [f"{p}.dense_bn", f"{p}.pw_bn"], [f"{p}.sum1"], name=f"{p}.add1"))
            nodes.append(helper.make_node("Add", [f"{p}.sum1", f"{p}.id_bn"], [f"{p}.sum"], name=f"{p}.add2"))
            y = f"{p}.out"
            nodes.append(helper.make_node("Relu", [f"{p}.sum"], [y], name=f"{p}.relu"))
            x = y
        if dtype == "mixed":
            nodes.append(helper.make_node("Cast", [x], ["output"], name="cast_out", to=TensorProto.FLOAT))
        else:
            nodes.append(helper.make_node("Identity", [x], ["output"], name="output_identity"))
    finally:
        writer.close()
    io_elem = TensorProto.FLOAT if dtype == "mixed" else elem
    shape = [batch, c, hw, hw]
    graph = helper.make_graph(nodes, "large_repvgg", [helper.make_tensor_value_info("input", io_elem, shape)],
                              [helper.make_tensor_value_info("output", io_elem, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="make_large_model")
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))  # what ORT reads
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(model.SerializeToString())
    os.replace(tmp, out)
    return {"path": str(out), "data": str(data_path), "blocks": blocks, "channels": c, "hw": hw, "dtype": dtype,
            "weight_bytes": per_block * blocks, "file_bytes": out.stat().st_size + data_path.stat().st_size,
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="model path; weights go to OUT.data beside it")
    p.add_argument("--channels", type=int, default=2048)
    p.add_argument("--blocks", type=int, default=None, help="number of blocks (default: enough for --size-mb)")
    p.add_argument("--size-mb", type=float, default=None, help="weight MiB to exceed (default 2253 = 2.2 GiB)")
    p.add_argument("--hw", type=int, default=8, help="spatial size (static)")
    p.add_argument("--dtype", choices=sorted(_DT), default="fp32")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    info = make_model(a.out, a.channels, a.blocks, a.hw, a.dtype, a.size_mb, a.seed, a.opset)
    print(f"wrote {info['path']} + {Path(info['data']).name}: {info['blocks']} blocks × {info['channels']} channels "
          f"({info['dtype']}), {info['file_bytes'] / 2**20:.1f} MiB in {info['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
