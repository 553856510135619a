"""An output with external data is a pair: io.save_model / io.StagedOutput make the .onnx and its
data file visible together or not at all, whatever kills the writer, and clean up after it.

The writers here are forked children of the test process (no interpreter start-up: a fork costs
milliseconds), killed with SIGKILL or SIGTERM at random points of an ~8 MiB external-data write, or
racing another writer to the same output. After each round the output must be the old pair or one
writer's complete new pair, judged by running it in ONNX Runtime: never a mix, nothing stray.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxrep import io
from onnxrep.errors import OutputError

N = 1 << 17  # elements per weight: 512 KiB each
WEIGHTS = 16  # 8 MiB of external data per model


def sum_model(seed: int) -> tuple[onnx.ModelProto, np.ndarray]:
    """y = x + w0 + ... + w15 and what it computes on x = 0, so the run identifies the weights."""
    r = np.random.default_rng(seed)
    ws = [r.standard_normal(N).astype(np.float32) for _ in range(WEIGHTS)]
    nodes, prev = [], "x"
    for i in range(WEIGHTS):
        nodes.append(helper.make_node("Add", [prev, f"w{i}"], [f"s{i}"]))
        prev = f"s{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(nodes, "sum", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [N])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [N])],
                              [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    expected = np.zeros(N, np.float32)
    for w in ws:
        expected = expected + w
    return model, expected


def which(out: Path, candidates: dict[str, np.ndarray]) -> str:
    """The name of the model `out` computes (loaded as any reader would: ORT from the path)."""
    so = ort.SessionOptions()
    so.log_severity_level = 4
    sess = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.zeros(N, np.float32)})[0]
    hits = [k for k, v in candidates.items() if np.array_equal(y, v)]
    assert len(hits) == 1, "the output computes none of the models written: a mixed or partial pair"
    return hits[0]


def referenced(out: Path) -> set[str]:
    light = onnx.load(str(out), load_external_data=False)
    return {e.value for t in light.graph.initializer for e in t.external_data if e.key == "location"}


def assert_clean_pair(out: Path) -> None:
    """Exactly the .onnx and the one data file it references: no temp directory, no other data."""
    assert stray(out) == set(), f"stray files: {stray(out)}"


def stray(out: Path) -> set[str]:
    """Everything in the output's directory but the .onnx and the data file it references."""
    return set(os.listdir(out.parent)) - {out.name} - referenced(out)


def child(fn) -> int:
    """Run fn in a forked child that never returns into pytest; its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            fn()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            code = 1
        os._exit(code)
    return pid


def wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture(scope="module")
def models():
    return {f"m{i}": sum_model(i) for i in range(3)}


def test_killed_writers_leave_the_old_pair_or_the_new_one(tmp_path, models):
    """60 writes of a new model over an existing pair, each killed (SIGKILL or SIGTERM, alternating)
    at a random moment between fork and a little past the write's usual end. After each: the
    output is the old model or the new one, complete, and no data file but its own. A SIGTERMed
    writer leaves no temp directory; a SIGKILLed one may, and a later write removes it."""
    out = tmp_path / "deploy.onnx"
    (old, old_y), (new, new_y) = models["m0"], models["m1"]
    io.save_model(old, out, external=True)

    def child_span() -> float:
        """How long a whole write takes in a child, fork included, on this machine right now (a
        loaded CI machine forks and writes several times slower than an idle one)."""
        t = time.perf_counter()
        assert wait(child(lambda: io.save_model(new, tmp_path / "probe.onnx", external=True))) == 0
        span = time.perf_counter() - t
        for f in tmp_path.glob("probe.onnx*"):
            f.unlink()
        return span

    rng = np.random.default_rng(0)
    seen = {"old": 0, "new": 0}
    current = "old"
    for i in range(60):
        if i % 10 == 0:  # the window follows the machine's load: kills land before, during and after
            span = child_span()
        sig = signal.SIGKILL if i % 2 else signal.SIGTERM
        before = stray(out)
        pid = child(lambda: io.save_model(new if current == "old" else old, out, external=True))
        time.sleep(rng.uniform(0, 1.3 * span))
        os.kill(pid, sig)
        wait(pid)
        got = which(out, {"old": old_y, "new": new_y})
        assert got in ("old", "new")
        if got != current:
            seen["new"] += 1
            current = got
        else:
            seen["old"] += 1
        # a SIGKILLed writer may leave its temp dir and (killed between its two renames) its data
        # file, until a later write sweeps them; a SIGTERMed writer leaves nothing of its own
        strays = stray(out)
        assert len(strays - before) <= (2 if sig == signal.SIGKILL else 0), strays - before
        assert sig == signal.SIGKILL or not any(n.startswith(f"{io.TEMP_PREFIX}{pid}-") for n in strays)
    # the next completed write removes every temp directory and data file killed writers left
    pid = child(lambda: io.save_model(new, out, external=True))
    assert wait(pid) == 0
    assert which(out, {"new": new_y}) == "new"
    assert_clean_pair(out)
    assert seen["old"] and seen["new"], f"the kills never hit both sides of the commit: {seen}"


def test_concurrent_writers_leave_one_complete_pair(tmp_path, models):
    """20 rounds of two writers racing to write different models to one output: afterwards the
    output is one writer's complete pair, and no data file of the other, nor a temp directory."""
    out = tmp_path / "deploy.onnx"
    (a, a_y), (b, b_y) = models["m1"], models["m2"]
    io.save_model(models["m0"][0], out, external=True)
    winners = set()
    for _ in range(20):
        pids = [child(lambda m=m: io.save_model(m, out, external=True)) for m in (a, b)]
        assert [wait(p) for p in pids] == [0, 0]
        winners.add(which(out, {"a": a_y, "b": b_y}))
        assert_clean_pair(out)
    assert winners  # which one wins is the scheduler's business


def test_sigterm_removes_the_temp_directory_and_exits_143(tmp_path, models):
    """SIGTERM while the output is staged (here: while the caller verifies it): the temporary
    directory is removed and the process exits with 128 + SIGTERM; the output never appears."""
    out = tmp_path / "deploy.onnx"

    def staged_then_wait():
        with io.stage_model(models["m1"][0], out, external=True):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)

    pid = child(staged_then_wait)
    assert wait(pid) == 143
    assert os.listdir(tmp_path) == []


def test_sigint_removes_the_temp_directory_and_raises_keyboard_interrupt(tmp_path, models):
    """SIGINT while staged: the temporary directory goes and KeyboardInterrupt reaches the caller
    (the CLI's exit 130); a handler of the caller's own is left to decide, and the output's
    temp directory is then removed as the stack unwinds."""
    out = tmp_path / "deploy.onnx"

    def staged_then_interrupted():
        # Python's own SIGINT handling, whatever pytest inherited: a shell starts background jobs
        # with SIGINT ignored, and an ignored signal stays ignored (next test)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            with io.stage_model(models["m1"][0], out, external=True):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
        except KeyboardInterrupt:
            raise SystemExit(130 if not os.listdir(tmp_path) else 1)

    assert wait(child(staged_then_interrupted)) == 130

    def own_handler():
        class Stop(Exception):
            pass

        def handler(signum, frame):
            raise Stop

        signal.signal(signal.SIGTERM, handler)
        try:
            with io.stage_model(models["m1"][0], out, external=True) as staged:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
        except Stop:
            raise SystemExit(7 if not staged.dir.exists() and signal.getsignal(signal.SIGTERM) is handler else 1)

    assert wait(child(own_handler)) == 7
    assert os.listdir(tmp_path) == []


def test_an_ignored_sigint_stays_ignored(tmp_path, models):
    """A process that ignores SIGINT (a background job of a shell) is not interrupted by staging an
    output: the signal is not turned into KeyboardInterrupt, and the write completes."""
    out = tmp_path / "deploy.onnx"

    def ignoring():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        io.save_model(models["m0"][0], out, external=True)  # a first write installs and restores
        with io.stage_model(models["m1"][0], out, external=True) as staged:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            staged.commit()
        raise SystemExit(0 if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else 1)

    assert wait(child(ignoring)) == 0
    assert which(out, {"m1": models["m1"][1]}) == "m1"
    assert_clean_pair(out)


def test_failed_commit_keeps_the_old_pair_and_removes_the_new_data(tmp_path, models, monkeypatch):
    """The .onnx rename fails (disk full) after the new data file was moved into place: an
    OutputError, the old pair intact and loadable, the new data file taken back out."""
    out = tmp_path / "deploy.onnx"
    (old, old_y), (new, _) = models["m0"], models["m1"]
    io.save_model(old, out, external=True)
    real = os.replace

    def failing(src, dst, *a, **k):
        if Path(dst) == out:
            raise OSError(28, "No space left on device")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(io.os, "replace", failing)
    with pytest.raises(OutputError, match="No space left on device"):
        io.save_model(new, out, external=True)
    monkeypatch.undo()
    assert which(out, {"old": old_y}) == "old"
    assert_clean_pair(out)


def test_superseded_data_files_are_removed(tmp_path, models):
    """Rewriting an output removes the data file the replaced .onnx referenced: the previous
    OUTPUT.<token>.data, or an OUTPUT.data written by onnx.save or an older onnxrep. An
    OUTPUT.data the replaced .onnx did not reference is not this output's and stays."""
    out = tmp_path / "deploy.onnx"
    (m0, _), (m1, y1), (m2, y2) = models["m0"], models["m1"], models["m2"]
    onnx.save(m0, str(out), save_as_external_data=True, location="deploy.onnx.data")
    io.save_model(m1, out, external=True)
    assert which(out, {"m1": y1}) == "m1"
    assert_clean_pair(out)  # deploy.onnx.data is gone
    io.save_model(m2, out, external=False)  # inline now: the token data file goes too
    assert which(out, {"m2": y2}) == "m2"
    assert os.listdir(tmp_path) == [out.name]
    (tmp_path / "deploy.onnx.data").write_bytes(b"someone else's")
    io.save_model(m1, out, external=True)
    assert (tmp_path / "deploy.onnx.data").read_bytes() == b"someone else's"


def test_stale_temp_directories_are_swept_but_live_ones_kept(tmp_path, models):
    """A temp directory older than this process whose lock nobody holds (its writer was killed) is
    removed by the next write to the directory, with any data file of an output that its .onnx
    does not reference; one still locked by a live writer stays, as does anything newer."""
    import fcntl

    out = tmp_path / "deploy.onnx"
    stale = tmp_path / ".onnxrep-999999-dead"
    stale.mkdir()
    (stale / "deploy.onnx.0123456789abcdef.data").write_bytes(b"partial")
    live = tmp_path / ".onnxrep-1-alive"
    live.mkdir()
    orphan = tmp_path / "deploy.onnx.fedcba9876543210.data"
    orphan.write_bytes(b"renamed in, never referenced")
    past = time.time() - 3600
    for p in (stale, live):
        os.utime(p, (past, past))
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # as a live writer holds it
    try:
        pid = child(lambda: io.save_model(models["m1"][0], out, external=True))  # another process
        assert wait(pid) == 0
    finally:
        os.close(fd)
    names = set(os.listdir(tmp_path))
    assert stale.name not in names and orphan.name not in names
    assert live.name in names
    shutil_rm(live)
    assert_clean_pair(out)


def shutil_rm(p: Path) -> None:
    import shutil

    shutil.rmtree(p)
