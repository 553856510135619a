"""onnxrep.verify: one verification entry (check) with one set of defaults (VerifyOptions), used by
the CLI, onnxrep.optimize, onnxrep.optimize_file and the culprit search; the strict comparison,
the noise floor, the run as deployed (ORT's default optimization level) and the culprit, constant
folding included."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxrep
from onnxrep import folding as F
from onnxrep import cli
from onnxrep import optimizer as O
from onnxrep import verify as V
from onnxrep.errors import VerificationError
from onnxrep.lean import LeanModel
from tests.malformed_corpus import conv_bn_model
from tests.helpers import break_fuse_conv_bn


def split_convs_model(value_info_dims=None) -> onnx.ModelProto:
    """x[1,6,8,8] → SplitToSequence [2,1,3] → SequenceAt ×3 → Conv3×3 each → Concat: the form the
    dynamo exporter (optimize=False) gives torch.split([2,1,3]) → convs → cat. value_info_dims:
    the dims to declare for the three pieces (a lie when they are all [1, 'unk__0', 8, 8])."""
    r = np.random.default_rng(0)
    nodes = [helper.make_node("SplitToSequence", ["x", "split"], ["seq"], axis=1)]
    inits = [numpy_helper.from_array(np.array([2, 1, 3], np.int64), "split")]
    outs = []
    for i, c in enumerate((2, 1, 3)):
        inits.append(numpy_helper.from_array(np.array(i, np.int64), f"i{i}"))
        inits.append(numpy_helper.from_array(r.standard_normal((c, c, 3, 3)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("SequenceAt", ["seq", f"i{i}"], [f"p{i}"]))
        nodes.append(helper.make_node("Conv", [f"p{i}", f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        outs.append(f"c{i}")
    nodes.append(helper.make_node("Concat", outs, ["y"], axis=1))
    g = helper.make_graph(nodes, "split_convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8, 8])], inits)
    if value_info_dims is not None:
        g.value_info.extend(helper.make_tensor_value_info(f"p{i}", TensorProto.FLOAT, value_info_dims) for i in range(3))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def ref_of(model: onnx.ModelProto, options=V.VerifyOptions()) -> V.Reference:
    return V.reference(LeanModel.wrap(model), options)


# -- one set of defaults ---------------------------------------------------------------------------
def test_defaults_live_in_verify_options_only():
    """The CLI's verification flags default to 'not given' and optimize()'s to None: the values
    come from VerifyOptions, so a default changes in one place."""
    d = V.VerifyOptions()
    assert (d.rtol, d.atol, d.seed, d.noise_floor, d.deployed, d.culprit) == (None, 0.0, 0, True, True, True)
    args = cli.build_parser().parse_args(["optimize", "a.onnx", "b.onnx"])
    assert (args.rtol, args.atol, args.seed) == (None, None, None)
    assert O._verify_options(None, None, None, None) == d
    assert O._verify_options(V.VerifyOptions(seed=3, deployed=False), 1e-3, None, None) == V.VerifyOptions(1e-3, 0.0, 3, deployed=False)


def test_compare_has_no_default_of_its_own():
    """Per-dtype tolerances come from model_rtol alone; compare takes the tolerance it is given."""
    ref = {"y": np.array([1.0, 2.0], np.float16)}
    got = {"y": np.array([1.0, 2.001], np.float16)}
    (d,) = V.compare(ref, got, 0.0, 0.0)
    assert not d.ok and d.tolerance == 0.0
    (d,) = V.compare(ref, got, 2e-3, 0.0)
    assert d.ok


# -- one entry ---------------------------------------------------------------------------------------
@pytest.fixture
def calls(monkeypatch):
    seen = []
    real = V.check

    def spy(ref, candidate, options, rebuild=None, fired=()):
        seen.append((type(candidate).__name__, options))
        return real(ref, candidate, options, rebuild, fired)

    monkeypatch.setattr(V, "check", spy)
    return seen


def test_cli_optimize_and_optimize_file_all_verify_through_check(tmp_path, calls):
    """One entry for all three: the CLI (through optimize_file) checks the written file, by path,
    with the flags' options; optimize() checks the rewritten model in memory."""
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), str(src))
    assert cli.main(["optimize", str(src), str(tmp_path / "a.onnx"), "-q", "--seed", "5", "--atol", "1e-7"]) == 0
    assert [c[0] for c in calls] == ["PosixPath"] and calls[0][1] == V.VerifyOptions(atol=1e-7, seed=5)
    assert cli.main(["optimize", str(src), str(tmp_path / "c.onnx"), "-q", "--no-deployed-check"]) == 0
    assert calls.pop()[1] == V.VerifyOptions(deployed=False)
    onnxrep.optimize_file(src, tmp_path / "b.onnx", rtol=1e-4)
    assert calls[1][0] == "PosixPath" and calls[1][1] == V.VerifyOptions(rtol=1e-4)
    onnxrep.optimize(str(src), verify_options=V.VerifyOptions(deployed=False))
    assert calls[2][0] == "Rewritten" and calls[2][1] == V.VerifyOptions(deployed=False)
    assert len(calls) == 3


def test_culprit_search_goes_through_check_and_names_the_rule(tmp_path, calls, monkeypatch):
    """A broken fuse_conv_bn (folded bias off by 0.5): the failing check, then one check per
    variant (no rule at all first, which passes, so constant folding is not blamed), each without
    a culprit search of its own; fuse_conv_bn is named."""
    break_fuse_conv_bn(monkeypatch)
    with pytest.raises(VerificationError) as e:
        onnxrep.optimize(conv_bn_model())
    assert e.value.culprit == "fuse_conv_bn"
    assert "rule 'fuse_conv_bn' is responsible" in str(e.value)
    assert calls[0][1].culprit and len(calls) >= 3 and all(not c[1].culprit for c in calls[1:])


def test_constant_folding_is_named_when_the_graph_with_no_rule_differs(tmp_path, monkeypatch):
    """Verification fails because of what prepare() (constant folding) made of the graph: the
    graph rebuilt with no rule differs too, and the error names constant folding (exit 4)."""
    real = O.prepare

    def corrupting_prepare(model, input_shapes=None, folding=None, *rest):
        template, graph = real(model, input_shapes, folding, *rest)
        for t in graph.tensors().values():
            if t.name == "W" and hasattr(t, "values"):
                t.values = np.asarray(t.values) + 1.0
        return template, graph

    monkeypatch.setattr(O, "prepare", corrupting_prepare)
    src = tmp_path / "m.onnx"
    onnx.save(conv_bn_model(), str(src))
    assert any(t.name == "W" for t in onnx.load(str(src)).graph.initializer)
    with pytest.raises(VerificationError) as e:
        onnxrep.optimize(str(src))
    assert e.value.culprit == V.CONSTANT_FOLDING
    rc = cli.main(["optimize", str(src), str(tmp_path / "o.onnx"), "-q"])
    assert rc == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# -- strict, noise floor, deployed ------------------------------------------------------------------
def test_check_passes_an_equal_model_and_reports_both_runs():
    model = split_convs_model()
    summary = V.check(ref_of(model), model, V.VerifyOptions())
    assert summary["ok"] and summary["max_rel_error"] == 0.0
    assert summary["deployed"]["ok"] and summary["deployed"]["max_rel_error"] <= 1e-5
    assert summary["input_shapes"] == {"x": [1, 6, 8, 8]}


def test_check_refuses_a_different_model():
    model = split_convs_model()
    other = onnx.ModelProto()
    other.CopyFrom(model)
    w = other.graph.initializer[2]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.01, w.name))
    with pytest.raises(VerificationError, match=r"verification failed: output 'y' differs by"):
        V.check(ref_of(model), other, V.VerifyOptions())


def test_deployed_run_catches_what_only_ort_default_level_rejects():
    """One symbolic channel dim declared for three pieces of different sizes: ORT with its
    optimizations off runs it, at its default level it reuses a buffer of the wrong size and
    fails. The strict check alone passes it; the deployed run refuses it, naming the node."""
    good = split_convs_model()
    bad = split_convs_model(value_info_dims=[1, "unk__0", 8, 8])
    ref = ref_of(good)
    assert V.check(ref, bad, V.VerifyOptions(deployed=False))["ok"]
    with pytest.raises(VerificationError, match="ONNX Runtime at its default optimization level cannot run the "
                                                "optimized model: SequenceAt node .*Shape mismatch"):
        V.check(ref, bad, V.VerifyOptions())


def test_an_input_that_fails_deployed_itself_is_not_blamed_on_the_rewrite():
    """Negative case of the deployed run: when the input itself fails at ORT's default level, the
    output failing there too is not onnxrep's doing; the summary says so and the check passes."""
    bad = split_convs_model(value_info_dims=[1, "unk__0", 8, 8])
    summary = V.check(ref_of(bad), bad, V.VerifyOptions())
    assert summary["ok"] and summary["deployed"]["ok"] is False
    assert "the input fails at ORT's default level too" in summary["deployed"]["note"]


def test_noise_floor_widens_up_to_the_cap_only():
    """Strict failure within NOISE_FACTOR × ORT's own fusion noise passes; the widening never
    exceeds NOISE_CAP × the tolerance; no noise measurement leaves the strict verdict."""
    r = V.VerifyResult([V.OutputDiff("y", 3e-5, 1.0, 1e-5)])
    V._widen_to_noise_floor(r, {"y": 2e-5})
    assert r.ok and r.outputs[0].tolerance == pytest.approx(4e-5)
    r = V.VerifyResult([V.OutputDiff("y", 3e-4, 1.0, 1e-5)])
    V._widen_to_noise_floor(r, {"y": 1.0})
    assert not r.ok and r.outputs[0].tolerance == pytest.approx(V.NOISE_CAP * 1e-5)
    r = V.VerifyResult([V.OutputDiff("y", 3e-5, 1.0, 1e-5)])
    V._widen_to_noise_floor(r, None)
    assert not r.ok


# -- value_info: only dims known to be right ---------------------------------------------------------
def test_keep_known_dims_clears_invented_symbols_only():
    """Positive: the invented unk__0 goes (the dim becomes unknown), numbers stay. Negative: a
    symbol the inputs declare (batch) stays, and graph inputs/outputs are not touched."""
    m = split_convs_model(value_info_dims=["batch", "unk__0", 8, 8])
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    m.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "unk__9"
    O.keep_known_dims(m)
    for vi in m.graph.value_info:
        d = vi.type.tensor_type.shape.dim
        assert d[0].dim_param == "batch" and not d[1].HasField("dim_param") and not d[1].HasField("dim_value")
        assert d[2].dim_value == 8 and d[3].dim_value == 8
    assert m.graph.output[0].type.tensor_type.shape.dim[1].dim_param == "unk__9"
    onnx.checker.check_model(m, full_check=True)


def export_unequal_split(torch, path) -> None:
    """torch.split([2, 1, 3]) → one conv per piece → cat, dynamo exporter with optimize=False:
    the issue's reproduction (SplitToSequence/SequenceAt, pieces of unequal width)."""

    class SplitConvs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = torch.nn.ModuleList(torch.nn.Conv2d(k, k, 3, padding=1) for k in (2, 1, 3))

        def forward(self, x):
            return torch.cat([c(p) for c, p in zip(self.convs, torch.split(x, [2, 1, 3], dim=1))], 1)

    torch.onnx.export(SplitConvs().eval(), (torch.randn(1, 6, 8, 8),), str(path), dynamo=True, optimize=False)


def test_dynamo_unequal_split_output_runs_at_ort_default_level(tmp_path):
    """Issue 12 item 3 as reported: torch.split([2,1,3]) → convs → cat, dynamo exporter with
    optimize=False. The output passed verification, yet ORT at its default level failed on it
    (shape inference gave all pieces one symbolic channel dim). Now it runs there and agrees; and
    with the old value_info back, verification refuses it (exit 4, constant folding named)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    import onnxruntime as ort

    torch.manual_seed(0)
    src, dst = tmp_path / "split.onnx", tmp_path / "out" / "split.opt.onnx"
    dst.parent.mkdir()
    export_unequal_split(torch, src)
    assert cli.main(["optimize", str(src), str(dst), "-q"]) == 0
    x = np.random.default_rng(1).standard_normal((1, 6, 8, 8)).astype(np.float32)
    so = ort.SessionOptions()
    so.log_severity_level = 4  # default optimization level: ORT_ENABLE_ALL
    got = ort.InferenceSession(str(dst), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_wrong_value_info_fails_verification_with_exit_4(tmp_path, monkeypatch, capfd):
    """Without keep_known_dims (the output as main wrote it), the deployed run refuses it: exit 4,
    the reason on one line, and constant folding named (no rule fired; prepare made the dims)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")

    src, dst = tmp_path / "split.onnx", tmp_path / "out" / "split.opt.onnx"
    dst.parent.mkdir()
    export_unequal_split(torch, src)
    capfd.readouterr()
    # keep the exporter's SplitToSequence/SequenceAt (folding.py now rewrites it to a Split, which
    # removes the trigger) and write the value_info as main did: the deployed run must refuse it
    monkeypatch.setattr(F, "_sequence_to_split", lambda graph, node: 0)
    monkeypatch.setattr(O, "keep_known_dims", lambda model: None)
    assert cli.main(["optimize", str(src), str(dst)]) == 4
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and "default optimization level" in err[0] and "Shape mismatch" in err[0]
    assert "constant folding is responsible" in err[0]
    assert list(dst.parent.iterdir()) == []


def test_int64_payload_of_any_numpy_spelling_is_fed_as_a_weight():
    """A rule may hold an int64 payload as numpy.longlong (the same dtype, another scalar type):
    verification must still feed it to ORT. It used to be put back into the skeleton, stubbed again,
    and ORT refused the model ("External data path ... escapes working directory"): a correct
    rewrite (ScatterND indices folded from a qkv slice assignment) was reported as failing."""
    indices = np.zeros((2, 128, 1), dtype=np.longlong)
    indices[:, :, 0] = np.arange(128)
    if np.longlong is np.int64:
        pytest.skip("numpy.longlong is numpy.int64 on this platform")
    assert indices.dtype.type is np.longlong  # the spelling under test
    graph = helper.make_graph(
        [helper.make_node("ScatterND", ["x", "idx", "upd"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [128]),
         helper.make_tensor_value_info("upd", TensorProto.FLOAT, [2, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [128])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((2, 128, 1), np.int64), "idx"))
    lean = LeanModel.wrap(model)
    i = next(n for n, t in enumerate(lean.proto.graph.initializer) if t.name == "idx")
    stub = lean.proto.graph.initializer[i]
    lean.payloads[int(stub.external_data[1].value)] = indices
    light, weights = V.split_lean(lean)
    assert "idx" in weights and weights["idx"].dtype == np.int64
    feeds = {"x": np.zeros(128, np.float32), "upd": np.ones((2, 128), np.float32)}
    out = V.run(light, feeds, weights)
    assert np.array_equal(out["y"], np.ones(128, np.float32))


# -- an input ORT cannot run ------------------------------------------------------------------------
def _fixed_size_reshape(dims) -> onnx.ModelProto:
    """x[N, 2] -> Reshape to the constant [2, 2]: runs only when N is 2, as the legacy
    exporter's baked slice-assignment shapes do only at the traced size."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    shape = numpy_helper.from_array(np.array([2, 2], np.int64), "shape")
    g = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "g", [x], [y], [shape])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_input_ort_cannot_run_names_the_guessed_sizes_and_how_to_pin():
    """Symbolic dims run at guessed sizes (1 for the batch, 32 elsewhere); when ORT then fails, the
    one-line error says which sizes were used and that --input-shape pins the right ones."""
    with pytest.raises(onnxrep.InputError) as e:
        ref_of(_fixed_size_reshape(["n", 2]))
    msg = str(e.value)
    assert msg.startswith("ONNX Runtime cannot run the input model: ") and "\n" not in msg
    assert "its symbolic dims were run as x:1,2" in msg and "--input-shape" in msg
    assert V.reference(LeanModel.wrap(_fixed_size_reshape(["n", 2])), V.VerifyOptions(), {"x": [2, 2]}).outputs


def test_input_ort_cannot_run_without_guessed_dims_has_no_pin_hint():
    """Static or pinned dims were not guessed: the error is ORT's alone."""
    with pytest.raises(onnxrep.InputError) as static:
        ref_of(_fixed_size_reshape([3, 2]))
    with pytest.raises(onnxrep.InputError) as pinned:
        V.reference(LeanModel.wrap(_fixed_size_reshape(["n", 2])), V.VerifyOptions(), {"x": [3, 2]})
    for e in (static, pinned):
        assert str(e.value).startswith("ONNX Runtime cannot run the input model: ")
        assert "--input-shape" not in str(e.value)
