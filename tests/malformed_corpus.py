"""A corpus of malformed (and awkward-but-valid) inputs for `onnxrep optimize`, generated in code.

Every case writes its files into a fresh workspace (the test's tmp dir) and returns the argv to run:

    <root>/in/   the input model and anything beside it (external data, ...)
    <root>/out/  the output directory (empty unless the case says otherwise)

The tests in tests/test_malformed.py run each case through the real CLI and check the contract in
onnxrep.errors: the documented exit code, one `onnxrep: error:` line on stderr, nothing written,
the input untouched. Cases with `exit_code == 0` are awkward inputs onnxrep must optimize without
corrupting them; the test then compares the output with the input in ONNX Runtime.

Nothing here is random at import time and every builder is deterministic (fixed seeds), so a
failure reproduces with `python -c "from tests.malformed_corpus import CASES; ..."`.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INPUT, EXIT_VERIFY, EXIT_OUTPUT = 0, 1, 2, 3, 4, 5


# -- workspace -----------------------------------------------------------------------------------
@dataclass
class Workspace:
    root: Path

    def __post_init__(self):
        self.in_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def in_dir(self) -> Path:
        return self.root / "in"

    @property
    def out_dir(self) -> Path:
        return self.root / "out"

    @property
    def input(self) -> Path:
        return self.in_dir / "model.onnx"

    @property
    def output(self) -> Path:
        return self.out_dir / "out.onnx"

    def write_model(self, model: onnx.ModelProto, path: Path | None = None) -> Path:
        """Serialize without any checking (the point is to write models onnx would refuse)."""
        path = path or self.input
        path.write_bytes(model.SerializeToString())
        return path

    def optimize(self, *extra: str, input: Path | str | None = None, output: Path | str | None = None) -> list[str]:
        return ["optimize", str(input or self.input), str(output or self.output), *extra]


@dataclass
class Setup:
    """What a builder returns: the argv (after `onnxrep`) and where the output would go."""

    argv: list[str]
    # paths that must not exist after the run (besides the workspace snapshot staying the same);
    # used when the output lies outside the workspace
    must_not_exist: list[Path] = field(default_factory=list)


@dataclass
class Case:
    name: str
    build: Callable[[Workspace], Setup]
    exit_code: int
    doc: str = ""
    xfail: str | None = None  # "BUG: ..." while the library gets the case wrong
    # for exit_code 0: words that must (not) appear in the optimized model's op types
    expect_ops_absent: tuple[str, ...] = ()
    expect_ops_present: tuple[str, ...] = ()
    verify_equal: bool = True  # exit 0: compare output with input in ORT
    needs_nonroot: bool = False


# -- model builders ------------------------------------------------------------------------------
def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def conv_bn_nodes(x: str, y: str, cin: int = 3, cout: int = 4, prefix: str = "", seed: int = 0,
                  relu: bool = True) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """x → Conv3×3(pad 1) → BatchNormalization → Relu → y, with deterministic weights."""
    r = _rng(seed)
    p = prefix
    inits = [
        numpy_helper.from_array(_f32(r.standard_normal((cout, cin, 3, 3)) * 0.3), f"{p}W"),
        numpy_helper.from_array(_f32(r.standard_normal(cout) * 0.1), f"{p}B"),
        numpy_helper.from_array(_f32(r.uniform(0.5, 1.5, cout)), f"{p}gamma"),
        numpy_helper.from_array(_f32(r.standard_normal(cout) * 0.1), f"{p}beta"),
        numpy_helper.from_array(_f32(r.standard_normal(cout) * 0.1), f"{p}mean"),
        numpy_helper.from_array(_f32(r.uniform(0.5, 1.5, cout)), f"{p}var"),
    ]
    bn_out = y if not relu else f"{p}bn_out"
    nodes = [
        helper.make_node("Conv", [x, f"{p}W", f"{p}B"], [f"{p}conv_out"], name=f"{p}conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", [f"{p}conv_out", f"{p}gamma", f"{p}beta", f"{p}mean", f"{p}var"],
                         [bn_out], name=f"{p}bn", epsilon=1e-5),
    ]
    if relu:
        nodes.append(helper.make_node("Relu", [bn_out], [y], name=f"{p}relu"))
    return nodes, inits


def make_model(nodes, inputs, outputs, inits=(), opset: int = OPSET, extra_opsets=(), ir_version: int = IR_VERSION,
               value_info=()) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(inits), value_info=list(value_info))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="onnxrep-tests")
    model.ir_version = ir_version
    return model


def conv_bn_model(cin: int = 3, cout: int = 4, hw: int = 8) -> onnx.ModelProto:
    """The reference valid model: x[1,3,8,8] → Conv → BN → Relu → y[1,4,8,8]. onnx.checker passes."""
    nodes, inits = conv_bn_nodes("x", "y", cin, cout)
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, hw, hw])],
        inits,
    )


def valid_bytes() -> bytes:
    return conv_bn_model().SerializeToString()


def _external(model: onnx.ModelProto, ws: Workspace, data_name: str = "model.onnx.data") -> Path:
    """Save `model` to ws.input with every initializer in `data_name` beside it."""
    onnx.save_model(model, str(ws.input), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=0, convert_attribute=False)
    return ws.in_dir / data_name


# -- cases: the input file itself ----------------------------------------------------------------
def _missing_file(ws):
    return Setup(ws.optimize(input=ws.in_dir / "does_not_exist.onnx"))


def _input_is_directory(ws):
    d = ws.in_dir / "a_directory.onnx"
    d.mkdir()
    return Setup(ws.optimize(input=d))


def _empty_file(ws):
    ws.input.write_bytes(b"")
    return Setup(ws.optimize())


def _random_bytes(ws):
    ws.input.write_bytes(_rng(1234).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return Setup(ws.optimize())


def _truncated(fraction: float | None = None, keep: int | None = None):
    def build(ws):
        data = valid_bytes()
        n = keep if keep is not None else int(len(data) * fraction)
        if n < 0:
            n = len(data) + n
        ws.input.write_bytes(data[:n])
        return Setup(ws.optimize())
    return build


def _text_file(ws):
    ws.input.write_text("This is not an ONNX model.\nIt is a README that someone renamed.\n")
    return Setup(ws.optimize())


def _json_file(ws):
    ws.input.write_text('{"graph": {"node": [{"op_type": "Conv"}]}, "ir_version": 8}\n')
    return Setup(ws.optimize())


def _tensor_proto_file(ws):
    """A serialized TensorProto (e.g. an ORT test-data .pb) passed as a model."""
    t = numpy_helper.from_array(_f32(_rng(2).standard_normal((4, 3, 3, 3))), "W")
    ws.input.write_bytes(t.SerializeToString())
    return Setup(ws.optimize())


def _no_graph(ws):
    m = onnx.ModelProto()
    m.ir_version = IR_VERSION
    m.opset_import.add(domain="", version=OPSET)
    m.producer_name = "onnxrep-tests"
    ws.write_model(m)
    return Setup(ws.optimize())


def _ir_version_zero(ws):
    m = conv_bn_model()
    m.ir_version = 0
    ws.write_model(m)
    return Setup(ws.optimize())


def _no_nodes(ws):
    m = make_model([], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])])
    ws.write_model(m)
    return Setup(ws.optimize())


def _opset_from_the_future(ws):
    m = conv_bn_model()
    m.opset_import[0].version = 999
    ws.write_model(m)
    return Setup(ws.optimize())


def _input_symlink_loop(ws):
    ws.input.symlink_to(ws.input.name)
    return Setup(ws.optimize())


def _input_is_fifo(ws):
    """A named pipe with no writer: opening it for reading would block forever."""
    os.mkfifo(ws.input)
    return Setup(ws.optimize())


def _input_unreadable(ws):
    ws.write_model(conv_bn_model())
    ws.input.chmod(0)
    return Setup(ws.optimize())


# -- cases: onnx.checker failures ----------------------------------------------------------------
def _node_missing_input_name(ws):
    """Conv's required X input is the empty string."""
    m = conv_bn_model()
    m.graph.node[0].input[0] = ""
    ws.write_model(m)
    return Setup(ws.optimize())


def _node_input_undefined(ws):
    """Relu reads a tensor no node produces and no input or initializer defines."""
    m = conv_bn_model()
    m.graph.node[2].input[0] = "ghost"
    ws.write_model(m)
    return Setup(ws.optimize())


def _missing_initializer(ws):
    """The Conv weight initializer was dropped but the node still references it."""
    m = conv_bn_model()
    keep = [t for t in m.graph.initializer if t.name != "W"]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    ws.write_model(m)
    return Setup(ws.optimize())


def _wrong_attribute_type(ws):
    """Conv `group` given as a string."""
    m = conv_bn_model()
    conv = m.graph.node[0]
    conv.attribute.append(helper.make_attribute("group", "one"))
    ws.write_model(m)
    return Setup(ws.optimize())


def _wrong_attribute_type_float_pads(ws):
    m = conv_bn_model()
    conv = m.graph.node[0]
    del conv.attribute[:]
    conv.attribute.append(helper.make_attribute("pads", [1.0, 1.0, 1.0, 1.0]))
    ws.write_model(m)
    return Setup(ws.optimize())


def _duplicate_output_names(ws):
    """Two nodes write the same tensor (the graph is not SSA)."""
    m = conv_bn_model()
    m.graph.node.append(helper.make_node("Identity", ["x"], ["conv_out"], name="dup"))
    ws.write_model(m)
    return Setup(ws.optimize())


def _cycle(ws):
    """a = Add(x, b); b = Relu(a): a cycle, not expressible in a valid ONNX graph."""
    nodes = [
        helper.make_node("Add", ["x", "b"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
    ]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                   [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4])])
    ws.write_model(m)
    return Setup(ws.optimize())


def _unknown_op_default_domain(ws):
    m = conv_bn_model()
    m.graph.node[2].op_type = "FrobnicateRelu"
    ws.write_model(m)
    return Setup(ws.optimize())


def _graph_output_not_produced(ws):
    m = conv_bn_model()
    m.graph.output.append(helper.make_tensor_value_info("nowhere", TensorProto.FLOAT, [1]))
    ws.write_model(m)
    return Setup(ws.optimize())


def _tensor_data_size_mismatch(ws):
    """The Conv weight claims dims 4×3×3×3 but carries 10 bytes of raw data."""
    m = conv_bn_model()
    w = next(t for t in m.graph.initializer if t.name == "W")
    w.ClearField("float_data")
    w.raw_data = b"\x00" * 10
    ws.write_model(m)
    return Setup(ws.optimize())


# -- cases: external data ------------------------------------------------------------------------
def _external_data_missing(ws):
    data = _external(conv_bn_model(), ws)
    data.unlink()
    return Setup(ws.optimize())


def _external_data_truncated(ws):
    data = _external(conv_bn_model(), ws)
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 2])
    return Setup(ws.optimize())


def _external_data_outside_dir(ws):
    """An external-data location that escapes the model's directory (path traversal)."""
    data = _external(conv_bn_model(), ws)
    secret = ws.root / "secret.bin"
    shutil.move(str(data), secret)
    m = onnx.load(str(ws.input), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret.bin"
    ws.write_model(m)
    return Setup(ws.optimize())


# -- cases: structurally valid, numerically or semantically broken -------------------------------
def _conv_weight_rank_mismatch(ws):
    """Conv weight of rank 3 for a 4-D input: passes onnx.checker, ORT refuses it."""
    m = conv_bn_model()
    w = next(t for t in m.graph.initializer if t.name == "W")
    w.CopyFrom(numpy_helper.from_array(_f32(_rng(3).standard_normal((4, 3, 3))), "W"))
    ws.write_model(m)
    return Setup(ws.optimize())


def _bn_channel_mismatch(ws):
    """BatchNormalization parameters for 5 channels after a 4-channel conv."""
    m = conv_bn_model()
    for t in m.graph.initializer:
        if t.name in ("gamma", "beta", "mean", "var"):
            t.CopyFrom(numpy_helper.from_array(np.ones(5, np.float32), t.name))
    ws.write_model(m)
    return Setup(ws.optimize())


def _custom_domain_op(ws):
    """Conv → BN → com.example.MyRelu: ORT cannot run it, so it cannot be verified."""
    m = conv_bn_model()
    m.graph.node[2].op_type = "MyRelu"
    m.graph.node[2].domain = "com.example"
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    ws.write_model(m)
    return Setup(ws.optimize())


def _custom_domain_op_no_verify(ws):
    _custom_domain_op(ws)
    return Setup(ws.optimize("--no-verify"))


def _string_input(ws):
    """A graph input of element type STRING: no random input can be made for it."""
    nodes = [helper.make_node("Identity", ["s"], ["t"], name="id")]
    m = make_model(nodes, [helper.make_tensor_value_info("s", TensorProto.STRING, [2])],
                   [helper.make_tensor_value_info("t", TensorProto.STRING, [2])])
    ws.write_model(m)
    return Setup(ws.optimize())


def _input_without_shape(ws):
    """x has an element type but no shape at all: onnxrep cannot guess a rank-4 input."""
    m = conv_bn_model()
    m.graph.input[0].type.tensor_type.ClearField("shape")
    ws.write_model(m)
    return Setup(ws.optimize())


def _input_without_shape_pinned(ws):
    _input_without_shape(ws)
    return Setup(ws.optimize("--input-shape", "x:1,3,8,8"))


def _huge_input_dims(ws):
    """A static input shape of 3e12 elements: verification must not die allocating it."""
    m = conv_bn_model()
    dims = m.graph.input[0].type.tensor_type.shape.dim
    out_dims = m.graph.output[0].type.tensor_type.shape.dim
    for d in (dims[2], dims[3], out_dims[2], out_dims[3]):
        d.dim_value = 1_000_000
    ws.write_model(m)
    return Setup(ws.optimize())


def _output_rank_contradicts_inference(ws):
    """The declared graph output is a scalar, but Relu of a 4-D tensor is 4-D: onnx.checker's default
    check passes, full shape inference (and ORT) reject it."""
    m = conv_bn_model()
    del m.graph.output[0].type.tensor_type.shape.dim[:]
    ws.write_model(m)
    return Setup(ws.optimize())


def _symbolic_dims(ws):
    """Every input dim symbolic (N, C, H, W): onnxrep's guess (1, 32, 32, 32) does not fit the
    3-channel conv, so without --input-shape the model cannot be verified."""
    m = conv_bn_model()
    for d, name in zip(m.graph.input[0].type.tensor_type.shape.dim, "NCHW"):
        d.dim_param = name
    for d, name in zip(m.graph.output[0].type.tensor_type.shape.dim, ("N", "C2", "H", "W")):
        d.dim_param = name
    ws.write_model(m)
    return Setup(ws.optimize())


def _symbolic_dims_pinned(ws):
    _symbolic_dims(ws)
    return Setup(ws.optimize("--input-shape", "x:2,3,8,8"))


# -- cases: valid but awkward models onnxrep must handle (exit 0, verified equal) ---------------
def _odd_names(ws):
    """Tensor and node names with spaces, unicode, slashes, colons and dots."""
    nodes, inits = conv_bn_nodes("input image/0", "out: ÿ ✓", prefix="blk 1/ünï.cødé:")
    m = make_model(nodes,
                   [helper.make_tensor_value_info("input image/0", TensorProto.FLOAT, [1, 3, 8, 8])],
                   [helper.make_tensor_value_info("out: ÿ ✓", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    ws.write_model(m)
    return Setup(ws.optimize())


def _odd_file_names(ws):
    """Input and output paths with spaces and unicode."""
    src = ws.in_dir / "my model ✓.onnx"
    ws.write_model(conv_bn_model(), src)
    return Setup(ws.optimize(input=src, output=ws.out_dir / "résultat final.onnx"))


def _int64_gather_input(ws):
    """int64 indices → Gather(embedding table) → Reshape → Conv → BN."""
    r = _rng(5)
    nodes, inits = conv_bn_nodes("img", "y")
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="gather", axis=0),
        helper.make_node("Reshape", ["emb", "shape"], ["img"], name="reshape"),
    ] + nodes
    inits += [
        numpy_helper.from_array(_f32(r.standard_normal((16, 192))), "table"),
        numpy_helper.from_array(np.array([1, 3, 8, 8], np.int64), "shape"),
    ]
    m = make_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    ws.write_model(m)
    return Setup(ws.optimize())


def _zero_size_tensors(ws):
    """A zero-element initializer concatenated onto the activations (a no-op Concat)."""
    nodes, inits = conv_bn_nodes("x", "c")
    nodes.append(helper.make_node("Concat", ["c", "empty"], ["y"], name="concat", axis=1))
    inits.append(numpy_helper.from_array(np.zeros((1, 0, 8, 8), np.float32), "empty"))
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    ws.write_model(m)
    return Setup(ws.optimize())


def _zero_batch_input(ws):
    """An input whose static batch dimension is 0."""
    m = conv_bn_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 0
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 0
    ws.write_model(m)
    return Setup(ws.optimize())


def _if_subgraph(ws):
    """Conv → BN outside, and an If whose branches each hold their own Conv → BN."""
    outer, inits = conv_bn_nodes("x", "h", prefix="outer_")
    then_nodes, then_inits = conv_bn_nodes("h", "then_y", cin=4, cout=4, prefix="then_", seed=1)
    else_nodes, else_inits = conv_bn_nodes("h", "else_y", cin=4, cout=4, prefix="else_", seed=2)
    then_g = helper.make_graph(then_nodes, "then", [], [helper.make_tensor_value_info("then_y", TensorProto.FLOAT, [1, 4, 8, 8])], then_inits)
    else_g = helper.make_graph(else_nodes, "else", [], [helper.make_tensor_value_info("else_y", TensorProto.FLOAT, [1, 4, 8, 8])], else_inits)
    nodes = outer + [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    m = make_model(nodes,
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
                    helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    ws.write_model(m)
    return Setup(ws.optimize())


def _if_reads_outer_intermediate(ws):
    """The then-branch reads the outer Conv's raw output (before BN) by outer-scope reference; a
    fold of that BN into the Conv would change what the branch sees. Only the then-branch reads it,
    and onnxrep's own verification feeds cond=False (zeros), so the test feeds cond=True too."""
    outer, inits = conv_bn_nodes("x", "h", prefix="outer_")
    then_g = helper.make_graph([helper.make_node("Sigmoid", ["outer_conv_out"], ["then_y"], name="then_sig")], "then", [],
                               [helper.make_tensor_value_info("then_y", TensorProto.FLOAT, [1, 4, 8, 8])])
    else_g = helper.make_graph([helper.make_node("Identity", ["h"], ["else_y"], name="else_id")], "else", [],
                               [helper.make_tensor_value_info("else_y", TensorProto.FLOAT, [1, 4, 8, 8])])
    nodes = outer + [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    m = make_model(nodes,
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
                    helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    ws.write_model(m)
    return Setup(ws.optimize())


def _loop_reads_outer_intermediate(ws):
    """A Loop body adds the outer Conv's raw output (before BN) to its carried state each trip."""
    outer, inits = conv_bn_nodes("x", "h", prefix="outer_")
    body = helper.make_graph(
        [helper.make_node("Add", ["state_in", "outer_conv_out"], ["state_out"], name="body_add"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
        "body",
        [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_in", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [1, 4, 8, 8])],
    )
    inits += [numpy_helper.from_array(np.array(2, np.int64), "trips"),
              numpy_helper.from_array(np.array(True), "true")]
    nodes = outer + [helper.make_node("Loop", ["trips", "true", "h"], ["y"], name="loop", body=body)]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    ws.write_model(m)
    return Setup(ws.optimize())


def _loop_subgraph(ws):
    """Conv → BN outside, then a 3-trip Loop whose body runs Conv → BN on the carried state."""
    outer, inits = conv_bn_nodes("x", "h", prefix="outer_")
    body_nodes, body_inits = conv_bn_nodes("state_in", "state_out", cin=4, cout=4, prefix="body_", seed=7)
    body_nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"))
    body = helper.make_graph(
        body_nodes, "body",
        [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_in", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [1, 4, 8, 8])],
        body_inits,
    )
    inits += [numpy_helper.from_array(np.array(3, np.int64), "trips"),
              numpy_helper.from_array(np.array(True), "true")]
    nodes = outer + [helper.make_node("Loop", ["trips", "true", "h"], ["y"], name="loop", body=body)]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    ws.write_model(m)
    return Setup(ws.optimize())


def _nan_weights(ws):
    """A BatchNormalization variance of NaN and one of +inf: the fold must keep NaN where the
    original makes NaN (verification compares NaN positions)."""
    m = conv_bn_model()
    var = next(t for t in m.graph.initializer if t.name == "var")
    v = numpy_helper.to_array(var).copy()
    v[0], v[1] = np.nan, np.inf
    var.CopyFrom(numpy_helper.from_array(v, "var"))
    ws.write_model(m)
    return Setup(ws.optimize())


def _initializer_as_graph_input(ws):
    """IR 3 style: every initializer is also a graph input, so a caller may feed another value
    (here, for the BN scale). Whether onnxrep folds such weights or not, the output must compute
    the same as the input for the default (initializer) values."""
    m = conv_bn_model()
    m.ir_version = 3
    m.opset_import[0].version = 9
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    ws.write_model(m)
    return Setup(ws.optimize())


def _bn_training_mode(ws):
    """BatchNormalization with training_mode=1 and its running-stat outputs exposed as graph outputs."""
    m = conv_bn_model()
    bn = m.graph.node[1]
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    bn.output.extend(["running_mean", "running_var"])
    m.graph.output.extend([helper.make_tensor_value_info("running_mean", TensorProto.FLOAT, [4]),
                           helper.make_tensor_value_info("running_var", TensorProto.FLOAT, [4])])
    ws.write_model(m)
    return Setup(ws.optimize())


# -- cases: output path --------------------------------------------------------------------------
def _output_is_input(ws):
    ws.write_model(conv_bn_model())
    return Setup(ws.optimize(output=ws.input))


def _output_is_input_other_spelling(ws):
    """The same file reached through `..` and a symlink."""
    ws.write_model(conv_bn_model())
    link = ws.out_dir / "link.onnx"
    link.symlink_to(ws.input)
    return Setup(ws.optimize(output=link))


def _output_is_directory(ws):
    ws.write_model(conv_bn_model())
    return Setup(ws.optimize(output=ws.out_dir))


def _output_dir_missing(ws):
    ws.write_model(conv_bn_model())
    return Setup(ws.optimize(output=ws.out_dir / "no" / "such" / "dir" / "out.onnx"))


def _output_dir_unwritable(ws):
    """A directory the process may not write: chmod 555 for a normal user; as root (chmod does not
    stop root) a path under /proc, which nobody can create files in."""
    ws.write_model(conv_bn_model())
    if os.geteuid() == 0:
        target = Path(f"/proc/onnxrep_out_{os.getpid()}.onnx")
        return Setup(ws.optimize(output=target), must_not_exist=[target, Path(str(target) + ".data")])
    locked = ws.out_dir / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return Setup(ws.optimize(output=locked / "out.onnx"))


def _output_under_a_file(ws):
    """The output's parent is a regular file."""
    ws.write_model(conv_bn_model())
    (ws.out_dir / "plainfile").write_text("x")
    return Setup(ws.optimize(output=ws.out_dir / "plainfile" / "out.onnx"))


# -- cases: flags --------------------------------------------------------------------------------
def _with_model(*extra: str):
    def build(ws):
        ws.write_model(conv_bn_model())
        return Setup(ws.optimize(*extra))
    return build


def _report_unwritable(ws):
    ws.write_model(conv_bn_model())
    return Setup(ws.optimize("--report", str(ws.out_dir / "missing_dir" / "report.json")))


def _report_is_input(ws):
    ws.write_model(conv_bn_model())
    return Setup(ws.optimize("--report", str(ws.input)))


def _report_is_output(ws):
    """--report pointing at the output model would overwrite the model with JSON."""
    ws.write_model(conv_bn_model())
    return Setup(ws.optimize("--report", str(ws.output)))


def _bad_flag(ws):
    ws.write_model(conv_bn_model())
    return Setup(ws.optimize("--frobnicate"))


def _bad_top_level_flag(ws):
    return Setup(["--frobnicate"])


def _missing_output_argument(ws):
    ws.write_model(conv_bn_model())
    return Setup(["optimize", str(ws.input)])


def _unknown_command(ws):
    return Setup(["optimise", str(ws.input), str(ws.output)])


CASES: list[Case] = [
    # the input file itself
    Case("missing_file", _missing_file, EXIT_INPUT),
    Case("input_is_directory", _input_is_directory, EXIT_INPUT),
    Case("empty_file", _empty_file, EXIT_INPUT),
    Case("random_bytes", _random_bytes, EXIT_INPUT),
    Case("truncated_10_bytes", _truncated(keep=10), EXIT_INPUT),
    Case("truncated_one_third", _truncated(fraction=1 / 3), EXIT_INPUT),
    Case("truncated_half", _truncated(fraction=0.5), EXIT_INPUT),
    Case("truncated_last_byte", _truncated(keep=-1), EXIT_INPUT),
    Case("text_file", _text_file, EXIT_INPUT),
    Case("json_file", _json_file, EXIT_INPUT),
    Case("tensor_proto_not_model", _tensor_proto_file, EXIT_INPUT),
    Case("model_without_graph", _no_graph, EXIT_INPUT),
    Case("ir_version_zero", _ir_version_zero, EXIT_INPUT),
    Case("graph_without_nodes", _no_nodes, EXIT_INPUT),
    Case("opset_from_the_future", _opset_from_the_future, EXIT_INPUT),
    Case("input_symlink_loop", _input_symlink_loop, EXIT_INPUT),
    Case("input_is_fifo", _input_is_fifo, EXIT_INPUT),
    Case("input_unreadable", _input_unreadable, EXIT_INPUT, needs_nonroot=True),
    # onnx.checker
    Case("node_missing_input_name", _node_missing_input_name, EXIT_INPUT),
    Case("node_input_undefined", _node_input_undefined, EXIT_INPUT),
    Case("missing_initializer", _missing_initializer, EXIT_INPUT),
    Case("wrong_attribute_type_string_group", _wrong_attribute_type, EXIT_INPUT),
    Case("wrong_attribute_type_float_pads", _wrong_attribute_type_float_pads, EXIT_INPUT),
    Case("duplicate_node_output_names", _duplicate_output_names, EXIT_INPUT),
    Case("cycle", _cycle, EXIT_INPUT),
    Case("unknown_op_default_domain", _unknown_op_default_domain, EXIT_INPUT),
    Case("graph_output_not_produced", _graph_output_not_produced, EXIT_INPUT),
    Case("tensor_data_size_mismatch", _tensor_data_size_mismatch, EXIT_INPUT),
    # external data
    Case("external_data_missing", _external_data_missing, EXIT_INPUT),
    Case("external_data_truncated", _external_data_truncated, EXIT_INPUT),
    Case("external_data_outside_model_dir", _external_data_outside_dir, EXIT_INPUT),
    # checker passes, ORT or onnxrep cannot run it
    Case("conv_weight_rank_mismatch", _conv_weight_rank_mismatch, EXIT_INPUT),
    Case("bn_channel_mismatch", _bn_channel_mismatch, EXIT_INPUT),
    Case("custom_domain_op", _custom_domain_op, EXIT_INPUT,
         doc="ORT cannot run the model, so the result cannot be verified: a clear input error"),
    Case("custom_domain_op_no_verify", _custom_domain_op_no_verify, EXIT_OK, verify_equal=False,
         expect_ops_absent=("BatchNormalization",), expect_ops_present=("MyRelu",),
         doc="with --no-verify the rest of the graph is still optimized around the unknown op"),
    Case("string_input", _string_input, EXIT_INPUT),
    Case("input_without_shape", _input_without_shape, EXIT_INPUT),
    Case("input_without_shape_pinned", _input_without_shape_pinned, EXIT_INPUT,
         doc="onnx.checker requires a shape on graph inputs; --input-shape does not repair an invalid model"),
    Case("huge_input_dims", _huge_input_dims, EXIT_INPUT),
    Case("output_rank_contradicts_inference", _output_rank_contradicts_inference, EXIT_INPUT),
    Case("symbolic_dims_unguessable", _symbolic_dims, EXIT_INPUT),
    Case("symbolic_dims_pinned", _symbolic_dims_pinned, EXIT_OK, expect_ops_absent=("BatchNormalization",)),
    # awkward but valid: optimized and verified equal
    Case("odd_tensor_and_node_names", _odd_names, EXIT_OK, expect_ops_absent=("BatchNormalization",)),
    Case("odd_file_names", _odd_file_names, EXIT_OK, expect_ops_absent=("BatchNormalization",)),
    Case("int64_input_gather_conv", _int64_gather_input, EXIT_OK, expect_ops_absent=("BatchNormalization",)),
    Case("zero_size_initializer", _zero_size_tensors, EXIT_OK),
    Case("zero_batch_input", _zero_batch_input, EXIT_OK),
    Case("if_subgraphs", _if_subgraph, EXIT_OK, expect_ops_present=("If",)),
    Case("loop_subgraph", _loop_subgraph, EXIT_OK, expect_ops_present=("Loop",)),
    Case("if_branch_reads_outer_intermediate", _if_reads_outer_intermediate, EXIT_OK, expect_ops_present=("If",)),
    Case("loop_body_reads_outer_intermediate", _loop_reads_outer_intermediate, EXIT_OK, expect_ops_present=("Loop",)),
    Case("nan_and_inf_bn_variance", _nan_weights, EXIT_OK),
    Case("initializer_as_graph_input", _initializer_as_graph_input, EXIT_OK),
    Case("bn_training_mode", _bn_training_mode, EXIT_OK, expect_ops_present=("BatchNormalization",)),
    # output path
    Case("output_is_input", _output_is_input, EXIT_USAGE),
    Case("output_is_symlink_to_input", _output_is_input_other_spelling, EXIT_USAGE),
    Case("output_is_directory", _output_is_directory, EXIT_USAGE),
    Case("output_dir_missing", _output_dir_missing, EXIT_OUTPUT),
    Case("output_dir_unwritable", _output_dir_unwritable, EXIT_OUTPUT),
    Case("output_parent_is_a_file", _output_under_a_file, EXIT_OUTPUT),
    # flags
    Case("input_shape_no_colon", _with_model("--input-shape", "x"), EXIT_USAGE),
    Case("input_shape_not_integers", _with_model("--input-shape", "x:1,three,8,8"), EXIT_USAGE),
    Case("input_shape_zero_dim", _with_model("--input-shape", "x:1,3,0,8"), EXIT_USAGE),
    Case("input_shape_empty_name", _with_model("--input-shape", ":1,3,8,8"), EXIT_USAGE),
    Case("input_shape_unknown_input", _with_model("--input-shape", "nosuch:1,3,8,8"), EXIT_INPUT),
    Case("input_shape_rank_mismatch", _with_model("--input-shape", "x:1,3,8"), EXIT_INPUT),
    Case("input_shape_contradicts_static", _with_model("--input-shape", "x:1,3,16,16"), EXIT_INPUT),
    Case("unknown_rule_in_rules", _with_model("--rules", "fuse_conv_bn,no_such_rule"), EXIT_USAGE),
    Case("unknown_rule_in_skip", _with_model("--skip", "no_such_rule"), EXIT_USAGE),
    Case("unknown_rule_in_enable", _with_model("--enable", "no_such_rule"), EXIT_USAGE),
    Case("rtol_not_a_number", _with_model("--rtol", "tight"), EXIT_USAGE),
    Case("rtol_negative", _with_model("--rtol=-1e-5"), EXIT_USAGE),
    Case("atol_negative", _with_model("--atol=-1"), EXIT_USAGE),
    Case("rtol_nan", _with_model("--rtol", "nan"), EXIT_USAGE),
    Case("external_data_bad_choice", _with_model("--external-data", "maybe"), EXIT_USAGE),
    Case("report_unwritable", _report_unwritable, EXIT_OUTPUT),
    Case("report_is_input", _report_is_input, EXIT_USAGE),
    Case("report_is_output", _report_is_output, EXIT_USAGE),
    Case("bad_flag", _bad_flag, EXIT_USAGE),
    Case("bad_top_level_flag", _bad_top_level_flag, EXIT_USAGE),
    Case("missing_output_argument", _missing_output_argument, EXIT_USAGE),
    Case("unknown_command", _unknown_command, EXIT_USAGE),
]

CASE_BY_NAME = {c.name: c for c in CASES}
assert len(CASE_BY_NAME) == len(CASES), "case names must be unique"
