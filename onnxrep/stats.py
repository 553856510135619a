"""Model statistics for the before/after report: op counts, parameters, MACs, size."""
from __future__ import annotations

import math
from collections import Counter

import onnx

from .lean import without_payload


def op_histogram(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def parameter_count(model: onnx.ModelProto) -> int:
    """Elements of floating-point initializers and Constant-node tensors (the weights)."""
    total = 0
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    for t in model.graph.initializer:
        if t.data_type in floats:
            total += math.prod(t.dims)
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in floats:
                    total += math.prod(a.t.dims)
    return total


_COUNTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def batch_is_static(model: onnx.ModelProto) -> bool:
    """Whether no graph input (other than an initializer's) has a symbolic first dim, which the
    MAC count takes as 1: then the count's shape inference is that of the model as it is."""
    inits = {t.name for t in model.graph.initializer}
    return not any(vi.name not in inits and _symbolic_batch(vi) for vi in model.graph.input)


def _symbolic_batch(vi: onnx.ValueInfoProto) -> bool:
    dims = vi.type.tensor_type.shape.dim
    return bool(dims) and not dims[0].HasField("dim_value")


def _shapes(model: onnx.ModelProto, wanted: set[str] | None = None, inferred: bool = False) -> dict[str, list[int]]:
    """Static shapes of every tensor (of the `wanted` ones only, when given: reading a dim out of
    protobuf costs more than inferring it), by shape inference on a payload-free copy (inference
    serializes its input: a model with weights would cost a copy of them, and fail above 2 GB).
    inferred: `model` is that inference's result already (payload-free, batch_is_static)."""
    if inferred:
        light = inferred = model
    else:
        light = without_payload(model)
        inits = {t.name for t in light.graph.initializer}
        for vi in light.graph.input:  # a symbolic batch dim counts as 1: MACs are then per sample
            if vi.name not in inits and _symbolic_batch(vi):
                vi.type.tensor_type.shape.dim[0].dim_value = 1
        try:
            inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
        except Exception:
            inferred = light
    shapes = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if wanted is not None and vi.name not in wanted:
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    for t in g.initializer:
        if wanted is None or t.name in wanted:
            shapes[t.name] = list(t.dims)
    return shapes


def macs(model: onnx.ModelProto, inferred: bool = False, known: onnx.ModelProto | None = None) -> int | None:
    """Multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul for one inference at the
    model's static shapes (a symbolic batch dim counts as 1); None when other dims are symbolic.
    inferred: `model` is already shape-inferred (payload-free, with batch_is_static), so its
    value_info is read as it is instead of inferring again. known: a shape inference of `model`
    run anyway (the checker's, io.check_and_infer, without data propagation): where the batch is
    static and it gives every counted tensor a static shape, those are the shapes this count's
    own inference would find (data propagation only makes unknown dims known), so they are used;
    else the count infers as usual."""
    counted = [n for n in model.graph.node if n.op_type in _COUNTED]
    if not counted:
        return 0
    wanted = {name for n in counted for name in (*n.input[:2], *n.output[:1])}
    shapes = None
    if known is not None and batch_is_static(model):
        shapes = _shapes(known, wanted, inferred=True)
        if not wanted <= shapes.keys():
            shapes = None
    if shapes is None:
        shapes = _shapes(model, wanted, inferred)
    total = 0
    for n in counted:
        ins = [shapes.get(i) for i in n.input[:2]]
        out = shapes.get(n.output[0])
        if out is None or any(s is None for s in ins):
            return None
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "Conv":
            w = ins[1]
            total += math.prod(out) * math.prod(w[1:])
        elif n.op_type == "ConvTranspose":
            w = ins[1]
            total += math.prod(ins[0]) * w[1] * math.prod(w[2:])
        elif n.op_type == "Gemm":
            k = ins[0][0] if attrs.get("transA", 0) else ins[0][-1]
            total += math.prod(out) * k
        else:
            total += math.prod(out) * ins[0][-1]
    return int(total)


def summarize(model: onnx.ModelProto, file_bytes: int | None = None, with_macs: bool = True,
              known: onnx.ModelProto | None = None) -> dict:
    """The report's statistics. with_macs=False leaves "macs" None, for a caller that counts them from
    a shape inference it runs anyway (optimizer.rewrite_graph); known: see macs."""
    hist = op_histogram(model)
    return {
        "nodes": sum(hist.values()),
        "ops": dict(sorted(hist.items())),
        "parameters": parameter_count(model),
        "macs": macs(model, known=known) if with_macs else None,
        "file_bytes": file_bytes,
    }
