"""The command line on valid input: `onnxrep optimize | rules | demo`, its flags and its guarantees.

Most tests call onnxrep.cli.main(argv) in-process (fast); a few run `python -m onnxrep` for real to
check that a success prints nothing unexpected and --version works as a process. The bad-input
corpus lives in tests/test_malformed.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxrep
from onnxrep import cli
from tests.malformed_corpus import conv_bn_model, make_model
from tests.helpers import break_fuse_conv_bn

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "onnxrep" / "data" / "demo.onnx"
CORE_RULES = ["remove_identities", "canonicalize_border_fill", "fuse_conv_bn", "fuse_bn_conv", "merge_linear_regions"]
C = 16  # channels: 16×16×3×3 fp32 = 9 KiB, above save_model's 1 KiB external-data threshold


# -- models ----------------------------------------------------------------------------------------
def repvgg_block_model(c: int = C, hw: int = 8, batch: int | str = 1) -> onnx.ModelProto:
    """x → [Conv3×3 → BN] + [Conv1×1 → BN] + [BN] → Identity → Relu → y: a RepVGG training block
    plus an exporter Identity; every default rule that applies has something to do."""
    r = np.random.default_rng(0)

    def f32(a):
        return np.asarray(a, np.float32)

    inits, nodes = [], []

    def bn(name, x, y):
        inits.extend([
            numpy_helper.from_array(f32(r.uniform(0.5, 1.5, c)), f"{name}.gamma"),
            numpy_helper.from_array(f32(r.standard_normal(c) * 0.1), f"{name}.beta"),
            numpy_helper.from_array(f32(r.standard_normal(c) * 0.1), f"{name}.mean"),
            numpy_helper.from_array(f32(r.uniform(0.5, 1.5, c)), f"{name}.var"),
        ])
        nodes.append(helper.make_node("BatchNormalization", [x, f"{name}.gamma", f"{name}.beta", f"{name}.mean", f"{name}.var"],
                                      [y], name=name, epsilon=1e-5))

    inits.append(numpy_helper.from_array(f32(r.standard_normal((c, c, 3, 3)) * 0.1), "w3"))
    inits.append(numpy_helper.from_array(f32(r.standard_normal((c, c, 1, 1)) * 0.1), "w1"))
    nodes.append(helper.make_node("Conv", ["x", "w3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]))
    bn("bn3", "c3", "b3")
    nodes.append(helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"))
    bn("bn1", "c1", "b1")
    bn("bnid", "x", "bid")
    nodes += [
        helper.make_node("Add", ["b3", "b1"], ["s1"], name="add1"),
        helper.make_node("Add", ["s1", "bid"], ["s2"], name="add2"),
        helper.make_node("Identity", ["s2"], ["s3"], name="identity"),
        helper.make_node("Relu", ["s3"], ["y"], name="relu"),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, hw, hw])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, c, hw, hw])], inits)


def data_file(out: Path) -> Path:
    """The one external data file the output `out` references (OUTPUT.<token>.data)."""
    light = onnx.load(str(out), load_external_data=False)
    names = {e.value for t in light.graph.initializer for e in t.external_data if e.key == "location"}
    assert len(names) == 1 and onnxrep.io.is_data_file_of(out.name, next(iter(names))), names
    return out.parent / names.pop()


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def assert_same(original: Path, optimized: Path, shape=(1, C, 8, 8)) -> None:
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    want, got = ort_run(original, x), ort_run(optimized, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


@pytest.fixture
def block(tmp_path, out) -> Path:
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "block.onnx"
    onnx.save(repvgg_block_model(), str(path))
    return path


@pytest.fixture
def out(tmp_path) -> Path:
    (tmp_path / "out").mkdir(exist_ok=True)
    return tmp_path / "out" / "block.opt.onnx"


def run(capfd, *argv) -> tuple[int, str, str]:
    capfd.readouterr()
    rc = cli.main([str(a) for a in argv])
    o, e = capfd.readouterr()
    return rc, o, e


def optimize_with_report(capfd, block, out, *extra) -> dict:
    report = out.parent / "report.json"
    rc, o, e = run(capfd, "optimize", block, out, "--report", report, *extra)
    assert rc == 0, e
    return json.loads(report.read_text())


# -- rules ---------------------------------------------------------------------------------------
def test_rules_lists_every_rule_in_order(capfd):
    rc, o, e = run(capfd, "rules")
    assert rc == 0 and e == ""
    listed = [line.split()[0] for line in o.splitlines() if line.strip()]
    assert listed == [r.name for r in onnxrep.engine.all_rules()]
    assert [n for n in listed if n in CORE_RULES] == CORE_RULES  # present, in this relative order
    for line in o.splitlines():
        assert len(line.split(None, 1)) == 2, f"rule without a description: {line!r}"


# -- optimize: output, report, flags ---------------------------------------------------------------
def test_optimize_writes_verified_output_and_leaves_input_alone(capfd, block, out):
    before = sha(block)
    in_dir_before = sorted(os.listdir(block.parent))
    rc, o, e = run(capfd, "optimize", block, out)
    assert rc == 0, e
    assert e == ""
    assert sha(block) == before
    assert sorted(os.listdir(block.parent)) == in_dir_before
    assert sorted(os.listdir(out.parent)) == [out.name], "temp files or extra outputs left behind"
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert "BatchNormalization" not in ops(out) and "Identity" not in ops(out)
    assert ops(out).count("Conv") == 1
    assert_same(block, out)
    assert "verification: max relative error" in o
    assert f"wrote {out}" in o.splitlines()[-1]


def test_report_json_has_before_after_counts_and_verification(capfd, block, out):
    report = optimize_with_report(capfd, block, out)
    for key in ("before", "after", "rule_counts", "verification", "rewrites", "declines", "seconds"):
        assert key in report, key
    assert report["before"]["ops"]["BatchNormalization"] == 3
    assert "BatchNormalization" not in report["after"]["ops"]
    assert report["before"]["nodes"] > report["after"]["nodes"]
    assert report["after"]["file_bytes"] == out.stat().st_size
    assert report["rule_counts"]["remove_identities"] == 1
    assert report["rule_counts"].get("merge_linear_regions", 0) >= 1
    assert report["verification"]["ok"] is True
    assert report["verification"]["max_rel_error"] < 1e-5
    assert 0 < report["verification"]["seconds"] < report["seconds"]
    assert sum(report["rule_counts"].values()) == len(report["rewrites"])
    assert sorted(os.listdir(out.parent)) == sorted([out.name, "report.json"]), "temp files left behind"


def test_rules_flag_applies_only_the_named_rules(capfd, block, out):
    report = optimize_with_report(capfd, block, out, "--rules", "fuse_conv_bn")
    assert set(report["rule_counts"]) == {"fuse_conv_bn"}
    assert report["rule_counts"]["fuse_conv_bn"] == 2  # the two Conv → BN; the identity BN stays
    after = ops(out)
    assert after.count("Conv") == 2 and "Identity" in after and after.count("BatchNormalization") == 1
    assert_same(block, out)


def test_rules_flag_takes_a_comma_list(capfd, block, out):
    report = optimize_with_report(capfd, block, out, "--rules", "remove_identities, fuse_conv_bn")
    assert set(report["rule_counts"]) == {"remove_identities", "fuse_conv_bn"}


def test_skip_flag_removes_rules(capfd, block, out):
    report = optimize_with_report(capfd, block, out, "--skip", "merge_linear_regions,remove_identities")
    assert "merge_linear_regions" not in report["rule_counts"]
    assert "remove_identities" not in report["rule_counts"]
    assert report["rule_counts"].get("fuse_conv_bn", 0) >= 1
    assert "Identity" in ops(out) and "Add" in ops(out)
    assert_same(block, out)


def test_quiet_prints_nothing_on_success(capfd, block, out):
    rc, o, e = run(capfd, "optimize", block, out, "-q")
    assert (rc, o, e) == (0, "", "")
    assert out.is_file()


def test_explain_lists_every_rewrite(capfd, block, out):
    report = optimize_with_report(capfd, block, out)
    out.unlink()
    rc, o, e = run(capfd, "optimize", block, out, "--explain")
    assert rc == 0, e
    lines = o.splitlines()
    assert "rewrites:" in lines
    listed = lines[lines.index("rewrites:") + 1:]
    rewrite_lines = [line for line in listed if line.startswith("  ") and ":" in line and "->" in line]
    assert len(rewrite_lines) == len(report["rewrites"]) > 0
    for rule in report["rule_counts"]:
        assert any(line.strip().startswith(f"{rule}:") for line in rewrite_lines), rule


def test_no_verify_skips_verification(capfd, block, out, monkeypatch):
    import onnxrep.verify as V

    def boom(*a, **k):
        raise AssertionError("ONNX Runtime must not run with --no-verify")

    monkeypatch.setattr(V, "run", boom)
    monkeypatch.setattr(V, "run_file", boom)
    monkeypatch.setattr(V, "session", boom)
    monkeypatch.setattr(V, "check", boom)
    report = optimize_with_report(capfd, block, out, "--no-verify")
    assert report["verification"] is None
    monkeypatch.undo()
    assert_same(block, out)
    rc, o, e = run(capfd, "optimize", block, out, "--no-verify")
    assert rc == 0 and "verification: skipped (--no-verify)" in o


def test_input_shape_pins_a_symbolic_batch(capfd, tmp_path):
    src, dst = tmp_path / "dyn.onnx", tmp_path / "dyn.opt.onnx"
    onnx.save(repvgg_block_model(batch="N"), str(src))
    report = tmp_path / "r.json"
    rc, o, e = run(capfd, "optimize", src, dst, "--input-shape", "x:3,16,8,8", "--report", report, "-q")
    assert rc == 0, e
    assert json.loads(report.read_text())["verification"]["input_shapes"]["x"] == [3, 16, 8, 8]
    assert_same(src, dst, shape=(3, C, 8, 8))


def test_existing_output_is_replaced_atomically(capfd, block, out):
    out.write_bytes(b"old output")
    (out.parent / "other.txt").write_text("unrelated")
    rc, o, e = run(capfd, "optimize", block, out, "-q")
    assert rc == 0, e
    assert sorted(os.listdir(out.parent)) == sorted([out.name, "other.txt"])
    assert (out.parent / "other.txt").read_text() == "unrelated"
    assert_same(block, out)


def test_failed_write_keeps_the_old_output_and_leaves_no_temp_files(capfd, block, out, monkeypatch):
    """The write goes to a temp dir and os.replace moves it into place: when that move fails, the old
    output is intact and the temp dir is gone."""
    import onnxrep.io as io_mod

    out.write_bytes(b"old output")
    real_replace = os.replace

    def failing_replace(src, dst, *a, **k):
        if Path(dst) == out:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(io_mod.os, "replace", failing_replace)
    rc, o, e = run(capfd, "optimize", block, out)
    assert rc == 5
    assert o == ""
    assert e.splitlines() == [f"onnxrep: error: cannot write {out}: No space left on device"]
    assert out.read_bytes() == b"old output"
    assert sorted(os.listdir(out.parent)) == [out.name]


def test_external_data_yes_writes_a_data_file_that_loads_and_runs(capfd, block, out):
    rc, o, e = run(capfd, "optimize", block, out, "--external-data", "yes", "-q")
    assert rc == 0, e
    data = data_file(out)
    assert data.stat().st_size > 0
    assert sorted(os.listdir(out.parent)) == sorted([out.name, data.name])
    light = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in light.graph.initializer)
    assert out.stat().st_size < data.stat().st_size
    onnx.checker.check_model(str(out), full_check=True)  # path form: resolves the data file
    assert_same(block, out)


def test_external_data_input_gives_external_output_by_default(capfd, tmp_path, out):
    src = tmp_path / "in" / "ext.onnx"
    src.parent.mkdir(exist_ok=True)
    onnx.save_model(repvgg_block_model(), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    hashes = {p.name: sha(p) for p in src.parent.iterdir()}
    rc, o, e = run(capfd, "optimize", src, out, "-q")
    assert rc == 0, e
    assert {p.name: sha(p) for p in src.parent.iterdir()} == hashes, "input or its data file changed"
    assert data_file(out).is_file()
    assert_same(src, out)


def test_external_data_no_keeps_weights_inline(capfd, block, out):
    rc, o, e = run(capfd, "optimize", block, out, "--external-data", "no", "-q")
    assert rc == 0, e
    assert sorted(os.listdir(out.parent)) == [out.name]


def test_report_is_written_without_temp_files(capfd, block, out):
    report = out.parent / "r.json"
    report.write_text("old")
    rc, o, e = run(capfd, "optimize", block, out, "-q", "--report", report)
    assert rc == 0, e
    assert json.loads(report.read_text())["schema_version"] == 1
    assert sorted(os.listdir(out.parent)) == sorted([out.name, report.name])


def test_report_has_the_models_permissions(capfd, block, out):
    """The --report JSON is as readable as the model written beside it (was 0600 from mkstemp)."""
    old = os.umask(0o022)
    try:
        report = out.parent / "r.json"
        rc, o, e = run(capfd, "optimize", block, out, "-q", "--report", report)
    finally:
        os.umask(old)
    assert rc == 0, e
    assert oct(report.stat().st_mode & 0o777) == oct(out.stat().st_mode & 0o777) == oct(0o644)


def test_version(capfd):
    rc, o, e = run(capfd, "--version")
    assert rc == 0
    assert o.strip() == f"onnxrep {onnxrep.__version__}"


def test_debug_adds_the_traceback(capfd, tmp_path):
    rc, o, e = run(capfd, "optimize", tmp_path / "missing.onnx", tmp_path / "o.onnx", "--debug")
    assert rc == 3
    assert "Traceback" in e
    assert e.strip().splitlines()[-1].startswith("onnxrep: error: input file not found")


# -- verification failure ------------------------------------------------------------------------
def test_verification_failure_exits_4_and_names_the_rule(capfd, tmp_path, monkeypatch):
    """A deliberately broken fuse_conv_bn (its folded bias off by 0.5) must be caught by
    verification, blamed on fuse_conv_bn, and leave no output (nor report) behind.

    Only fuse_conv_bn's view of the kernels is broken: merge_linear_regions folds Conv → BN with
    the same kernels.affine_after, so breaking that function for everyone leaves no single rule
    whose absence makes the outputs match, and no culprit can be named."""
    break_fuse_conv_bn(monkeypatch)
    src, dst = tmp_path / "m.onnx", tmp_path / "out" / "m.opt.onnx"
    dst.parent.mkdir()
    onnx.save(conv_bn_model(), str(src))
    before = sha(src)
    rc, o, e = run(capfd, "optimize", src, dst, "--report", dst.parent / "r.json")
    assert rc == 4, e
    lines = e.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxrep: error: verification failed")
    assert "'fuse_conv_bn'" in lines[0]
    assert "Traceback" not in e and o == ""
    assert os.listdir(dst.parent) == [], "output, report or temp files written on a failed verification"
    assert sha(src) == before


# -- demo ----------------------------------------------------------------------------------------
@pytest.mark.skipif(not DEMO.is_file(), reason="onnxrep/data/demo.onnx not created yet")
def test_demo_runs_and_writes(capfd, tmp_path):
    before = sha(DEMO)
    dst = tmp_path / "demo.opt.onnx"
    rc, o, e = run(capfd, "demo", "--out", dst)
    assert rc == 0, e
    assert "verification: max relative error" in o
    assert "BatchNormalization" not in ops(dst)
    assert sha(DEMO) == before
    assert sorted(os.listdir(tmp_path)) == [dst.name]


# -- the real process --------------------------------------------------------------------------------
def _proc(*argv, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, "-m", "onnxrep", *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd, env=env, stdin=subprocess.DEVNULL, timeout=300)


def test_subprocess_quiet_success_prints_nothing(block, out):
    before = sha(block)
    p = _proc("optimize", block, out, "-q", cwd=block.parent)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    assert sha(block) == before
    assert sorted(os.listdir(out.parent)) == [out.name]
    assert_same(block, out)


def test_subprocess_version(tmp_path):
    p = _proc("--version", cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.strip() == f"onnxrep {onnxrep.__version__}" and p.stderr == ""


def test_report_path_that_is_the_input_is_worded_as_the_report(capfd, block, out):
    """--report INPUT: exit 2, and the error names the report path, not the output path."""
    before = sha(block)
    rc, o, e = run(capfd, "optimize", block, out, "--report", block)
    assert rc == 2
    assert e.splitlines() == [f"onnxrep: error: report path is the input file: {block} (onnxrep never modifies its input)"]
    assert sha(block) == before and not out.exists()
