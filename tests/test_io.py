"""Lean models: weights read where they lie (io.open_model) and streamed out (io.save_model).

open_model walks the protobuf wire format instead of parsing the file, and leaves each large
initializer's bytes in the .onnx file or its external data file; save_model writes the model field
by field. Both must agree exactly with protobuf and onnx's own loader and writer, on every model:
these tests compare them on models with the awkward parts (Constant nodes, subgraphs, typed
fields, small tensors, fields in unusual order, repeated raw_data, fp16, doc strings).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxrep
from onnxrep import cli, io, lean, wire
from onnxrep.errors import InputError
from tests.helpers import GraphBuilder, run_model
from tests.helpers import without_default_locations as _normal
from tools.make_large_model import make_model


def _repvgg(seed: int = 0, dtype=np.float32) -> onnx.ModelProto:
    b = GraphBuilder(seed=seed, dtype=dtype)
    x = b.input([1, 16, 8, 8])
    y = b.add(b.bn(b.conv(x, 16, 16, 3), 16), b.bn(b.conv(x, 16, 16, 1), 16))
    return b.build(b.relu(y))


def _awkward() -> onnx.ModelProto:
    """Large and small initializers, a typed-field (float_data) weight, a Constant node holding a
    large tensor, an If whose branches carry their own large initializers, doc strings."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), "w")
    w.doc_string = "a weight with a doc string"
    typed = helper.make_tensor("typed", TensorProto.FLOAT, [8, 8, 3, 3], rng.standard_normal(576).tolist())
    small = numpy_helper.from_array(np.ones(8, np.float32), "small")
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
        rng.standard_normal((1, 8, 8, 8)).astype(np.float32), "cval"))

    def branch(name, scale):
        k = numpy_helper.from_array((scale * rng.standard_normal((8, 8, 3, 3))).astype(np.float32), f"{name}_k")
        return helper.make_graph([helper.make_node("Conv", ["y", f"{name}_k"], [f"{name}_out"], pads=[1, 1, 1, 1])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [1, 8, 8, 8])], [k])

    nodes = [
        const,
        helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "typed"], ["b"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["b", "c"], ["b2"]),
        helper.make_node("Mul", ["b2", "small_b"], ["y"]),
        helper.make_node("ReduceSum", ["y"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["out"], then_branch=branch("then", 1.0), else_branch=branch("else", 2.0)),
    ]
    small_b = numpy_helper.from_array(np.full((1, 8, 1, 1), 0.5, np.float32), "small_b")
    zero = numpy_helper.from_array(np.array(0, np.float32), "zero")
    graph = helper.make_graph(nodes, "awkward", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 8, 8])],
                              [w, typed, small, small_b, zero])
    graph.doc_string = "graph doc"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


MODELS = {"repvgg": _repvgg, "repvgg_fp16": lambda: _repvgg(dtype=np.float16), "awkward": _awkward}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_open_model_is_onnx_load(tmp_path, name, external):
    """What open_model leaves on disk and materialize() reads back is exactly what onnx.load reads."""
    model = MODELS[name]()
    # raw initializers of 1 KiB or more; typed fields (float_data) stay in the protobuf
    large = sum(len(t.raw_data) >= 1024 for t in model.graph.initializer)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=external, size_threshold=1024)  # (moves model's data out)
    lm = io.open_model(path)
    assert _normal(lm.materialize()) == _normal(onnx.load(str(path)))
    assert all(lean.on_disk(p) for p in lm.payloads)  # nothing read yet
    assert {lean.on_disk(p)[0] for p in lm.payloads} == {str((path.parent / ("m.onnx" if not external else
                                                         next(iter(_locations(path))))).resolve())}
    assert len(lm.payloads) == large


def _locations(path: Path) -> set[str]:
    m = onnx.load(str(path), load_external_data=False)
    return {e.value for t in onnx.external_data_helper._get_all_tensors(m) for e in t.external_data if e.key == "location"}


def test_open_model_reads_no_weights(tmp_path):
    """The lean proto of a model is a few KB; its payloads point into the file (all but the BN
    vectors, which are below PAYLOAD_MIN)."""
    info = make_model(tmp_path / "ext.onnx", channels=32, blocks=3, hw=8)
    inline = tmp_path / "inline.onnx"
    inline.write_bytes(onnx.load(info["path"]).SerializeToString())
    for path in (Path(info["path"]), inline):
        lm = io.open_model(path)
        assert len(lm.proto.SerializeToString()) < 16 * 1024
        assert sum(lean.on_disk(p)[2] for p in lm.payloads) >= 0.95 * info["weight_bytes"]


def test_wire_walk_follows_protobuf_semantics(tmp_path):
    """Fields out of the usual order (initializers after everything else, the graph after the
    opsets) and a raw_data field given twice (the last one wins), as protobuf parses them."""
    model = _repvgg()
    w = model.graph.initializer[0]
    stale = onnx.TensorProto()
    stale.CopyFrom(w)
    stale.raw_data = np.zeros(len(w.raw_data) // 4, np.float32).tobytes()
    head = onnx.ModelProto()
    head.CopyFrom(model)
    head.ClearField("graph")
    rest = onnx.GraphProto()
    rest.CopyFrom(model.graph)
    del rest.initializer[:]
    # the tensor with two raw_data fields: the stale one first, then the real one
    twice = stale.SerializeToString() + wire.key(wire.RAW_DATA) + wire.varint(len(w.raw_data)) + w.raw_data
    inits = b"".join(wire.key(wire.INITIALIZER) + wire.varint(len(b)) + b for b in
                     [twice] + [t.SerializeToString() for t in model.graph.initializer[1:]])
    graph = rest.SerializeToString() + inits
    data = head.SerializeToString() + wire.key(wire.GRAPH) + wire.varint(len(graph)) + graph
    path = tmp_path / "odd.onnx"
    path.write_bytes(data)
    parsed = onnx.load(str(path))
    assert numpy_helper.to_array(parsed.graph.initializer[0]).any()  # protobuf's reading: the real one
    lm = io.open_model(path)
    assert _normal(lm.materialize()) == _normal(parsed)


def test_not_wire_format_falls_back_to_protobuf(tmp_path):
    """Bytes the walk cannot follow are left to protobuf, which words the error."""
    path = tmp_path / "bad.onnx"
    good = _repvgg().SerializeToString()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(InputError, match="protobuf decode failed"):
        io.open_model(path)
    assert io._scan(path) is None


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_save_streams_what_onnx_save_writes(tmp_path, external):
    """save_model's field-by-field output parses to the same model onnx.save's does, passes the
    full checker, and runs in ORT; from a ModelProto and from a lean model alike."""
    model = _awkward()
    src = tmp_path / "src.onnx"
    onnx.save(model, str(src))
    for i, m in enumerate((model, io.open_model(src))):
        out = tmp_path / f"out{i}.onnx"
        written = io.save_model(m, out, external=external)
        assert written[0] == out and len(written) == 1 + external
        assert not external or io.is_data_file_of(out.name, written[1].name)
        assert _normal(onnx.load(str(out))) == _normal(model)
        onnx.checker.check_model(str(out), full_check=True)
        x = {"x": np.random.default_rng(1).standard_normal((1, 8, 8, 8)).astype(np.float32)}
        np.testing.assert_array_equal(run_model(onnx.load(str(out)), x)["out"], run_model(model, x)["out"])


def test_optimize_from_an_inline_file_equals_optimize_in_memory(tmp_path):
    """The CLI's path (open_model → reparameterize → streamed save) writes the model the
    in-memory API returns."""
    model = _repvgg(seed=3)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    assert cli.main(["optimize", str(src), str(out), "-q"]) == 0
    expected = onnxrep.optimize(model)
    got = onnx.load(str(out))
    assert [n.op_type for n in got.graph.node] == ["Conv", "Relu"]
    for a, b in zip(sorted(got.graph.initializer, key=lambda t: t.name),
                    sorted(expected.graph.initializer, key=lambda t: t.name)):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def test_input_changed_under_a_lean_model_is_a_clear_error(tmp_path):
    """A weight file cut short after it was opened: reading the weight says so (no garbage)."""
    info = make_model(tmp_path / "m.onnx", channels=16, blocks=1, hw=4)
    lm = io.open_model(info["path"])
    os.truncate(tmp_path / "m.onnx.data", 1024)
    with pytest.raises(InputError, match="shorter"):
        lm.weights()


def test_external_data_symlink_out_of_the_directory_is_refused(tmp_path):
    """A location inside the directory that is a symlink to a file outside it escapes all the same."""
    (tmp_path / "in").mkdir()
    model = _repvgg()
    onnx.save(model, str(tmp_path / "in" / "m.onnx"), save_as_external_data=True, location="w.bin")
    os.replace(tmp_path / "in" / "w.bin", tmp_path / "w.bin")
    os.symlink(tmp_path / "w.bin", tmp_path / "in" / "w.bin")
    with pytest.raises(InputError, match="not a file inside the model's directory"):
        io.open_model(tmp_path / "in" / "m.onnx")


def test_optimize_file_api(tmp_path):
    """onnxrep.optimize_file: the CLI's file-to-file path as an API; external data follows the
    input unless told, the input is untouched, the report lists what was written."""
    info = make_model(tmp_path / "in.onnx", channels=16, blocks=2, hw=4)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    report = onnxrep.optimize_file(info["path"], tmp_path / "out.onnx")
    assert report.written[0] == str(tmp_path / "out.onnx") and len(report.written) == 2
    assert io.is_data_file_of("out.onnx", Path(report.written[1]).name)
    assert report.verification["ok"] and report.after["file_bytes"] == sum(Path(p).stat().st_size for p in report.written)
    report = onnxrep.optimize_file(info["path"], tmp_path / "inline.onnx", external_data=False, verify=False)
    assert report.written == [str(tmp_path / "inline.onnx")] and report.verification is None
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before} == before
    with pytest.raises(onnxrep.UsageError, match="external_data"):
        onnxrep.optimize_file(info["path"], tmp_path / "x.onnx", external_data="yes")
    with pytest.raises(onnxrep.UsageError, match="is the input"):
        onnxrep.optimize_file(info["path"], info["path"])


def test_output_that_would_overwrite_the_inputs_weights_is_refused(tmp_path):
    """An input whose external data file is named what the output's would be (OUTPUT.data), an
    output named like the input's data file, or a --report there: exit 2, nothing written, the
    input untouched."""
    model = _repvgg()
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src), save_as_external_data=True, location="out.onnx.data")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for out in ("out.onnx", "out.onnx.data"):
        with pytest.raises(onnxrep.UsageError, match="overwrite the input"):
            onnxrep.optimize_file(src, tmp_path / out)
        assert cli.main(["optimize", str(src), str(tmp_path / out), "-q"]) == 2
    # a report written over the input's weights
    assert cli.main(["optimize", str(src), str(tmp_path / "x.onnx"), "-q", "--report", str(tmp_path / "out.onnx.data")]) == 2
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_weights_computed_from_on_disk_tensors_fold(tmp_path, external):
    """A conv weight computed in the graph (Mul of two initializers, as DO-Conv/OREPA exports do)
    from tensors still on disk: constant folding reads them through onnxrep (graph.DiskValues),
    never graphsurgeon's own external-data loader, and the block folds to one Conv."""
    rng = np.random.default_rng(0)
    a = numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), "a")
    b = numpy_helper.from_array(rng.uniform(0.5, 1.5, (8, 8, 3, 3)).astype(np.float32), "b")
    bn = [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
          (("g", rng.uniform(0.5, 2, 8)), ("be", rng.standard_normal(8)), ("m", rng.standard_normal(8)),
           ("v", rng.uniform(0.5, 2, 8)))]
    nodes = [helper.make_node("Mul", ["a", "b"], ["w"]),
             helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["y", "g", "be", "m", "v"], ["out"])]
    graph = helper.make_graph(nodes, "computed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 8, 6, 6])], [a, b, *bn])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src), save_as_external_data=external, size_threshold=1024)
    assert len(io.open_model(src).payloads) == 2  # a and b stay on disk
    report = onnxrep.optimize_file(src, tmp_path / "out.onnx")
    assert report.verification["ok"]
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert [n.op_type for n in out.graph.node] == ["Conv"]
    x = {"x": rng.standard_normal((1, 8, 6, 6)).astype(np.float32)}
    want, got = run_model(onnx.load(str(src)), x)["out"], run_model(out, x)["out"]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
