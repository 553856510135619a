"""The bad-input contract of `onnxrep optimize`, over the generated corpus in tests/malformed_corpus.py.

    Bad input gets a clear one-line error and a documented exit code, never a traceback; nothing is
    written, and the input file is never modified. Output is written atomically.

Every case runs in-process through onnxrep.cli.main (fast; fd-level capture, so ONNX Runtime's
own C++ logging counts as stderr too). A representative subset also runs through the real CLI in a
subprocess (`python -m onnxrep optimize ...`), which is the only way to see interpreter-level
tracebacks, Python warnings printed at exit, and the process exit status itself.

For every failing case: the documented exit code, exactly one stderr line starting with
`onnxrep: error:`, nothing on stdout, and the whole workspace (input, external data, output dir)
byte-for-byte and entry-for-entry as before: no output, no out.onnx.data, no stray temp files.
For the awkward-but-valid cases (exit 0): the input is untouched, the output dir holds exactly the
output, and the output computes the same as the input in ONNX Runtime (checked here independently
of onnxrep's own verification, with bool inputs both True and False).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxrep import cli
from tests.malformed_corpus import CASE_BY_NAME, CASES, EXIT_OK, Case, Setup, Workspace

REPO = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

#: run through the real CLI in a subprocess as well: one per layer that can fail (argparse, path
#: checks, protobuf decode, checker, shape inference, external data, ORT, rule code, output write)
#: and the exit-0 paths with subgraphs and non-float inputs.
SUBPROCESS_CASES = [
    "missing_file",
    "truncated_half",
    "random_bytes",
    "node_input_undefined",
    "bn_channel_mismatch",
    "external_data_truncated",
    "custom_domain_op",
    "conv_weight_rank_mismatch",
    "symbolic_dims_unguessable",
    "zero_size_initializer",
    "output_is_input",
    "output_dir_unwritable",
    "rtol_negative",
    "bad_flag",
    "if_subgraphs",
    "int64_input_gather_conv",
]


def _marks(case: Case):
    marks = []
    if case.xfail:
        marks.append(pytest.mark.xfail(strict=True, reason=case.xfail))
    if case.needs_nonroot:
        marks.append(pytest.mark.skipif(IS_ROOT, reason="root reads and writes regardless of file modes"))
    return marks


def _params(cases):
    return [pytest.param(c, id=c.name, marks=_marks(c)) for c in cases]


# -- workspace snapshot --------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root: files by content hash, dirs, symlinks by target, others by kind."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                snap[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                snap[rel] = "dir"
            elif p.is_file():
                try:
                    snap[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
                except PermissionError:
                    snap[rel] = f"unreadable:{p.stat().st_size}:{p.stat().st_mtime_ns}"
            else:
                snap[rel] = f"special:{p.stat().st_mode:o}"
    return snap


def _prepare(case: Case, root: Path) -> tuple[Workspace, Setup, dict[str, str]]:
    ws = Workspace(root)
    setup = case.build(ws)
    return ws, setup, snapshot(ws.root)


def _restore_modes(ws: Workspace) -> None:
    """Undo chmods a case made, so pytest can clean the tmp dir."""
    for dirpath, dirnames, filenames in os.walk(ws.root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                p.chmod(0o755 if p.is_dir() else 0o644)


# -- the contract --------------------------------------------------------------------------------
def check_contract(case: Case, ws: Workspace, setup: Setup, before: dict[str, str],
                   rc: int, stdout: str, stderr: str) -> None:
    shown = f"\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    assert "Traceback" not in stderr + stdout, f"traceback printed{shown}"
    assert rc == case.exit_code, f"exit code {rc}, documented {case.exit_code}{shown}"
    after = snapshot(ws.root)
    if case.exit_code != EXIT_OK:
        lines = stderr.splitlines()
        assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}{shown}"
        assert lines[0].startswith("onnxrep: error: "), f"stderr line is not an onnxrep error{shown}"
        assert len(lines[0]) > len("onnxrep: error: ") + 10, f"error message too terse{shown}"
        assert stdout == "", f"a failed run printed to stdout{shown}"
        assert after == before, "the workspace changed (output written, temp file left or input modified)"
        for p in setup.must_not_exist:
            assert not os.path.lexists(p), f"{p} was created"
        return
    # exit 0 on an awkward input: input untouched, exactly the output written, same results
    assert stderr == "", f"a successful run printed to stderr{shown}"
    output = Path(setup.argv[2])
    assert output.is_file()
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed == {str(output.relative_to(ws.root))}, f"unexpected workspace changes: {sorted(changed)}"
    model = onnx.load(str(output))
    onnx.checker.check_model(model, full_check=True)
    ops = _all_ops(model.graph)
    for op in case.expect_ops_absent:
        assert op not in ops, f"{op} should have been optimized away: {sorted(ops)}"
    for op in case.expect_ops_present:
        assert op in ops, f"{op} should still be in the graph: {sorted(ops)}"
    if case.verify_equal:
        assert_same_results(Path(setup.argv[1]), output, _pinned(setup.argv))


def _all_ops(graph: onnx.GraphProto) -> set[str]:
    ops = set()
    for n in graph.node:
        ops.add(n.op_type)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                ops |= _all_ops(a.g)
            for g in a.graphs:
                ops |= _all_ops(g)
    return ops


def _pinned(argv: list[str]) -> dict[str, list[int]]:
    pinned = {}
    for i, a in enumerate(argv[:-1]):
        if a == "--input-shape":
            name, _, dims = argv[i + 1].rpartition(":")
            pinned[name] = [int(d) for d in dims.split(",")]
    return pinned


_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.INT64: np.int64, onnx.TensorProto.BOOL: np.bool_}


def _feeds(model: onnx.ModelProto, pinned: dict, seed: int, flag: bool) -> dict[str, np.ndarray]:
    """Random inputs independent of onnxrep.verify: floats normal, ints small non-negative
    (valid Gather indices), bools all `flag`."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = pinned.get(vi.name) or [d.dim_value for d in tt.shape.dim]
        dtype = _NP[tt.elem_type]
        if dtype is np.bool_:
            feeds[vi.name] = np.full(shape, flag)
        elif dtype is np.int64:
            feeds[vi.name] = rng.integers(0, 4, shape).astype(np.int64)
        else:
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _run(path: Path, feeds) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def assert_same_results(original: Path, optimized: Path, pinned: dict) -> None:
    model = onnx.load(str(original))
    for seed, flag in ((1, True), (2, False)):
        feeds = _feeds(model, pinned, seed, flag)
        want, got = _run(original, feeds), _run(optimized, feeds)
        assert len(want) == len(got)
        for w, g in zip(want, got):
            assert w.shape == g.shape and w.dtype == g.dtype
            scale = float(np.nanmax(np.abs(w[np.isfinite(w)]), initial=1.0)) if w.dtype.kind == "f" else 1.0
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale, equal_nan=True,
                                       err_msg=f"outputs differ (bool inputs = {flag})")


# -- in-process: every case ----------------------------------------------------------------------
def test_corpus_is_large_enough():
    assert len(CASES) >= 35
    failing = [c for c in CASES if c.exit_code != EXIT_OK]
    assert {c.exit_code for c in failing} >= {2, 3, 5}


@pytest.mark.parametrize("case", _params(CASES))
def test_malformed_in_process(case: Case, tmp_path, capfd):
    ws, setup, before = _prepare(case, tmp_path)
    capfd.readouterr()
    try:
        try:
            rc = cli.main(list(setup.argv))
        except BaseException as e:  # main must turn everything into an exit code
            out, err = capfd.readouterr()
            pytest.fail(f"cli.main raised {type(e).__name__}: {e}\n{out}\n{err}")
        out, err = capfd.readouterr()
        check_contract(case, ws, setup, before, rc, out, err)
    finally:
        _restore_modes(ws)


# -- subprocess: the real CLI for a representative subset ----------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("PYTHONWARNINGS", None)
    return env


@pytest.fixture(scope="module")
def subprocess_results(tmp_path_factory):
    """Build every subprocess case and run them concurrently (each is ~1 s of interpreter startup,
    mostly waiting), so the batch costs a few seconds instead of one second per case."""
    prepared = {}
    for name in SUBPROCESS_CASES:
        case = CASE_BY_NAME[name]
        prepared[name] = _prepare(case, tmp_path_factory.mktemp(name))

    def run(name):
        ws, setup, _ = prepared[name]
        return subprocess.run([sys.executable, "-m", "onnxrep", *setup.argv], capture_output=True, text=True,
                              cwd=ws.root, env=_env(), stdin=subprocess.DEVNULL, timeout=300)

    with ThreadPoolExecutor(max_workers=4) as pool:
        procs = dict(zip(SUBPROCESS_CASES, pool.map(run, SUBPROCESS_CASES)))
    yield {name: (*prepared[name], procs[name]) for name in SUBPROCESS_CASES}
    for ws, *_ in prepared.values():
        _restore_modes(ws)


@pytest.mark.parametrize("case", _params([CASE_BY_NAME[n] for n in SUBPROCESS_CASES]))
def test_malformed_subprocess(case: Case, subprocess_results):
    ws, setup, before, proc = subprocess_results[case.name]
    check_contract(case, ws, setup, before, proc.returncode, proc.stdout, proc.stderr)


def test_subprocess_cases_exist():
    assert set(SUBPROCESS_CASES) <= set(CASE_BY_NAME)
