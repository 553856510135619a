"""Loading and saving models: clear errors in, atomic writes out.

The input file is only ever opened for reading, and its weights are left in it (open_model gives
a LeanModel). The output is streamed into a temporary directory beside its destination
(stage_model), checked there by the caller if it wishes (optimize_file verifies it), and committed:
the .onnx and its data file become visible together or not at all, and a failure or a kill leaves
nothing behind that the next run does not remove (StagedOutput; docs/architecture-io.md).
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

try:
    import fcntl
except ImportError:  # not POSIX: no flock; commits are then not serialized between processes
    fcntl = None

from . import wire
from .errors import InputError, OutputError, UsageError
from .lean import (PAYLOAD_MIN, STRIPPED, LeanModel, all_tensors, copy_fields, expected_bytes, on_disk_tensor,
                   payload_bytes, stub_index, without_payload)

# protobuf refuses to serialize a single message above 2 GiB; leave headroom for the graph itself.
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_THRESHOLD = 1 << 30


def _has_external_data(model: onnx.ModelProto) -> bool:
    """Whether the model's own tensors point at external data files (stubs do not count)."""
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL and stub_index(t) is None
        for t in onnx.external_data_helper._get_all_tensors(model)
    )


def open_model(path: str | os.PathLike, check: bool = True, info: dict | None = None) -> "LeanModel":
    """Read an ONNX model without reading its weights; raise InputError with a one-line reason.

    The main graph's initializers of PAYLOAD_MIN bytes or more stay where they are, inline in the
    .onnx file (found by walking the protobuf wire format) or in its external data files, and are
    read when a rule or ONNX Runtime needs them (see LeanModel): opening costs a few KB of memory
    whatever the model's size. `info`, when given, receives {'external_data': bool,
    'file_bytes': int, 'files': [the model file and its external data files, resolved]}."""
    p = Path(path)
    if not p.exists():
        if p.is_symlink():
            raise InputError(f"input is a dangling symlink or a symlink loop: {p}")
        raise InputError(f"input file not found: {p}")
    if p.is_dir():
        raise InputError(f"input is a directory, not an ONNX file: {p}")
    if not p.is_file():  # a FIFO or device would block or stream: onnxrep reads a file twice
        raise InputError(f"input is not a regular file: {p}")
    if p.stat().st_size == 0:
        raise InputError(f"input file is empty: {p}")
    try:
        lean = _scan(p)
    except OSError as e:
        raise InputError(f"cannot read {p}: {e.strerror or e}") from e
    if lean is None:  # not plain wire format: let protobuf parse it (and word the error)
        try:
            lean = LeanModel.wrap(onnx.load(str(p), load_external_data=False))
        except (DecodeError, RuntimeError, ValueError) as e:
            raise InputError(f"not a valid ONNX model (protobuf decode failed): {p}: {_first_line(e)}") from e
        except OSError as e:
            raise InputError(f"cannot read {p}: {e.strerror or e}") from e
    model = lean.proto
    if not model.HasField("graph") or model.ir_version == 0:
        raise InputError(f"not an ONNX model (no graph or IR version): {p}")
    external = _has_external_data(model)
    if info is not None:
        data = {_resolve(p.parent / e.value) for t in onnx.external_data_helper._get_all_tensors(model)
                for e in t.external_data if e.key == "location" and e.value != STRIPPED}
        data = {f for f in data if f.is_file()}
        info["external_data"] = external
        info["file_bytes"] = p.stat().st_size + sum(f.stat().st_size for f in data)
        info["files"] = [_resolve(p)] + sorted(data)
    if external:
        _resolve_external(lean, p)
    if check:
        lean.checked_inference = check_model(model, p)
    return lean


def load_model(path: str | os.PathLike, check: bool = True, info: dict | None = None) -> onnx.ModelProto:
    """open_model, then every weight read into one in-memory ModelProto."""
    return open_model(path, check, info).materialize()


def _scan(p: Path) -> "LeanModel | None":
    """Open an ONNX file without reading its weights: walk the protobuf wire format of ModelProto →
    GraphProto → initializer TensorProtos, keep every field except the raw_data of initializers of
    PAYLOAD_MIN bytes or more, and point those at their bytes in the file (on_disk). None where
    the bytes are not plain wire format (protobuf then parses the whole file and reports why)."""
    with open(p, "rb", buffering=0) as f:
        buf = wire.Reader(f.fileno(), os.fstat(f.fileno()).st_size)
        try:
            head, graph, inits = bytearray(), bytearray(), []
            for field, wt, start, vs, ve in wire.fields(buf, 0, len(buf)):
                if field == wire.GRAPH and wt == 2:
                    for gf, gwt, gstart, gvs, gve in wire.fields(buf, vs, ve):
                        if gf == wire.INITIALIZER and gwt == 2:
                            inits.append(_scan_tensor(buf, gvs, gve))
                        else:
                            graph += buf[gstart:gve]
                else:
                    head += buf[start:ve]
            model = onnx.ModelProto.FromString(bytes(head))
            g = onnx.GraphProto.FromString(bytes(graph))
        except (ValueError, IndexError, DecodeError, RuntimeError):
            return None
    model.graph.CopyFrom(g)
    lean = LeanModel(model, [])
    path = str(p.resolve())
    for kept, raw in inits:
        t = model.graph.initializer.add()
        try:
            t.ParseFromString(kept)
        except (DecodeError, RuntimeError):
            return None
        if raw is not None:
            lean.add(t, on_disk_tensor(t, path, raw[0], raw[1] - raw[0]))
    return lean


def _scan_tensor(buf, start: int, end: int) -> tuple[bytes, tuple[int, int] | None]:
    """A TensorProto's bytes without a large raw_data, and that raw_data's (start, end), if any.
    A payload whose length disagrees with the dims stays inline, for the checker to report."""
    kept, raw = bytearray(), None
    for field, wt, fstart, vs, ve in wire.fields(buf, start, end):
        if field == wire.RAW_DATA and wt == 2:
            raw = (fstart, vs, ve)  # given twice, the last one wins (as in protobuf)
        else:
            kept += buf[fstart:ve]
    if raw is None:
        return bytes(kept), None
    header = onnx.TensorProto.FromString(bytes(kept))
    n = raw[2] - raw[1]
    if n < PAYLOAD_MIN or expected_bytes(header) != n or header.data_location == onnx.TensorProto.EXTERNAL:
        return bytes(buf[start:end]), None
    return bytes(kept), (raw[1], raw[2])


def _resolve_external(lean: LeanModel, p: Path) -> None:
    """Point the external tensors of a model at their files: main-graph initializers become
    on-disk payloads (read when needed), the rest (Constant nodes, subgraphs) are read now.
    Every location must name a regular file inside the model's directory, and every range must
    lie in its file and match the tensor's dims."""
    base = p.parent.resolve()
    for top, t in all_tensors(lean.proto):
        if t.data_location != onnx.TensorProto.EXTERNAL or stub_index(t) is not None:
            continue
        kv = {e.key: e.value for e in t.external_data}
        loc = kv.get("location", "")
        where = (base / loc).resolve() if loc else base
        if not loc or os.path.isabs(loc) or not where.is_relative_to(base):
            raise InputError(f"cannot load external weights of {p}: tensor '{t.name}' has external data "
                             f"location '{loc}', which is not a file inside the model's directory")
        if not where.is_file():
            raise InputError(f"cannot load external weights of {p}: '{loc}' (tensor '{t.name}') does not exist")
        try:
            offset = int(kv.get("offset", 0))
            size = where.stat().st_size
            length = int(kv["length"]) if "length" in kv else size - offset
        except ValueError:
            raise InputError(f"cannot load external weights of {p}: tensor '{t.name}' has a non-integer "
                             "offset or length") from None
        need = expected_bytes(t)
        if offset < 0 or length < 0 or offset + length > size:
            raise InputError(f"cannot load external weights of {p}: tensor '{t.name}' needs bytes "
                             f"{offset}..{offset + length} of '{loc}', which has {size}")
        if need is not None and length != need:
            raise InputError(f"cannot load external weights of {p}: tensor '{t.name}' has {length} bytes "
                             f"of external data, its dims need {need}")
        disk = on_disk_tensor(t, str(where), offset, length)
        if top and need is not None and need >= PAYLOAD_MIN:
            lean.add(t, disk)
        else:  # small, or in a node or subgraph: read it into the model now
            with open(where, "rb") as f:
                f.seek(offset)
                data = f.read(length)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = data


def check_model(model: onnx.ModelProto, origin: object = "model") -> onnx.ModelProto | None:
    """onnx.checker on the model (in-memory, so external data needs no path), with strict shape
    inference when the model fits in one protobuf: the rewritten model gets the same full check, so
    an input that fails it could never be written and is reported as bad input, not as a bug.

    Returns the check's shape inference, run with data propagation (as optimizer.prepare infers):
    prepare reuses it for the model as given instead of inferring a second time (the largest
    whole-model pass: 0.5 s at 50k nodes). Data propagation only makes more dims known, so where
    it fails the check is decided by the full check's own inference (no data propagation), with
    its error; the result is then None."""
    _check_opsets(model, origin)
    try:
        # the checker serializes what it is given (and cannot above 2 GB): give it the model with
        # weight payloads left out; their sizes are checked by _strip_weights itself
        light = _strip_weights(model)
        run_checker(light, full_check=False)
        return _strict_inference(light)
    except onnx.shape_inference.InferenceError as e:
        raise InputError(f"model fails ONNX shape inference: {origin}: {_inference_reason(e)}") from e
    except (onnx.checker.ValidationError, ValueError) as e:
        raise InputError(f"model fails onnx.checker: {origin}: {_checker_reason(e, model)}") from e


def _strict_inference(light: onnx.ModelProto) -> onnx.ModelProto | None:
    """The shape-inference half of onnx's full check (strict, with type checks; see
    check_and_infer), with data propagation when that passes too: the inferred model, or None."""
    try:
        return onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError:
        onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True)  # the full check's verdict
        return None


def _check_opsets(model: onnx.ModelProto, origin: object) -> None:
    newest = onnx.defs.onnx_opset_version()
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version > newest:
            raise InputError(f"model imports ONNX opset {op.version}, newer than any this onnx "
                             f"{onnx.__version__} knows (up to {newest}): {origin}")


def _checker_reason(e: BaseException, model: onnx.ModelProto) -> str:
    text = _first_line(e)
    if "Field 'shape' of 'type' is required" in text:
        missing = [v.name for v in list(model.graph.input) + list(model.graph.output)
                   if v.type.HasField("tensor_type") and not v.type.tensor_type.HasField("shape")]
        if missing:
            return f"graph input/output '{missing[0]}' has no shape (ONNX requires one, even if all dims are symbolic)"
    return text


def _inference_reason(e: BaseException) -> str:
    """InferenceError text is '[ShapeInferenceError] Inference error(s): (op ...): [ShapeInferenceError] detail';
    keep the node and the detail on one line."""
    text = " ".join(str(e).split())
    return text.replace("[ShapeInferenceError] Inference error(s): ", "")[:300] or type(e).__name__


def _strip_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every raw payload of 1 KiB or more left out (see without_payload); a payload
    whose length disagrees with its tensor's dims stays, so the checker reports that tensor."""
    return without_payload(model, validate=True)


def run_checker(light: onnx.ModelProto, full_check: bool = True) -> None:
    """onnx.checker.check_model on a without_payload() copy. By path, from a temp dir holding an
    empty STRIPPED file: the checker insists that external data locations are regular files."""
    with tempfile.TemporaryDirectory(prefix="onnxrep-check-") as d:
        open(os.path.join(d, STRIPPED), "wb").close()
        path = os.path.join(d, "model.onnx")
        with open(path, "wb") as f:
            f.write(light.SerializeToString())
        onnx.checker.check_model(path, full_check=full_check)


def check_and_infer(light: onnx.ModelProto) -> onnx.ModelProto:
    """run_checker(light, full_check=True), returning the shape inference it runs. onnx's full
    check is check_model followed by shape inference with type checks in strict mode, without
    data propagation (ShapeInferenceOptions{check_type=true, error_mode=1, data_prop=false} in
    onnx/checker.cc, both for a path and for a proto); here it is done in those two steps, with
    the same errors (ValidationError, InferenceError), so the inferred model is there for the
    statistics (stats.macs(known=...)) instead of inferring a second time."""
    run_checker(light, full_check=False)
    return onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True)


def check_not_input(input_files: list[Path], output_path: str | os.PathLike, *others) -> None:
    """Refuse an output whose model file, external data file (OUTPUT.data) or other file the
    caller will write (`others`, e.g. a report) is one of the input's files (see open_model's
    `info`): writing it would overwrite the input's weights."""
    out = Path(output_path)
    for name in (out, out.with_name(out.name + ".data"), *map(Path, others)):
        if _resolve(name) in input_files:
            raise UsageError(f"{name} is one of the input's files: writing it would overwrite the input "
                             "(onnxrep never modifies its input)")
    here = _resolve(out).parent
    for f in input_files:  # committing the output removes data files named like its own
        if f.parent == here and is_data_file_of(out.name, f.name):
            raise UsageError(f"{f} is one of the input's files and is named like {out.name}'s data files, which "
                             "writing it replaces (onnxrep never modifies its input)")


def check_output_path(input_path: str | os.PathLike | None, output_path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse outputs that would overwrite the input or cannot be written; nothing is created.
    `what` names the file in the errors ("output", "report")."""
    out = Path(output_path)
    if input_path is not None:
        inp = Path(input_path)
        same = _resolve(out) == _resolve(inp)
        if not same and out.exists():
            try:
                same = os.path.samefile(out, inp)
            except OSError:
                same = False
        if same:
            raise UsageError(f"{what} path is the input file: {out} (onnxrep never modifies its input)")
    if out.is_dir():
        raise UsageError(f"{what} path is a directory: {out}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        if parent.exists():
            raise OutputError(f"{what} directory is not a directory: {parent}")
        raise OutputError(f"{what} directory does not exist: {parent}")
    _probe_writable(parent, what)
    return out


def _resolve(p: Path) -> Path:
    """Path.resolve without the RuntimeError/OSError a symlink loop raises (the loop is reported
    as a missing input by load_model)."""
    try:
        return p.resolve()
    except (OSError, RuntimeError):
        return p.absolute()


def _probe_writable(parent: Path, what: str = "output") -> None:
    """Create and remove a temporary file in `parent`: os.access says yes to root on read-only
    mounts, /proc and files chattr'ed immutable, and the optimization should not run for minutes
    before the write fails."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".onnxrep-probe-", dir=parent)
    except OSError as e:
        raise OutputError(f"{what} directory is not writable: {parent} ({e.strerror or e})") from e
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass


def save_model(model: "onnx.ModelProto | LeanModel", path: str | os.PathLike, external: bool | None = None) -> list[Path]:
    """Write `model` atomically (see stage_model and StagedOutput.commit); return the files written.

    external=None keeps weights inline unless the model is too large for one protobuf (then they
    go to a data file beside it). `model` is left unchanged."""
    with stage_model(model, path, external) as staged:
        return staged.commit()


def stage_model(model: "onnx.ModelProto | LeanModel", path: str | os.PathLike, external: bool | None = None) -> "StagedOutput":
    """Write `model` for `path` into a temporary directory beside it and return the StagedOutput:
    the complete file (and its data file) there, fsynced, to be checked (optimize_file verifies
    it) and then committed or discarded. Nothing at `path` changes until commit().

    The weights are streamed to the file one tensor at a time, from wherever they are (arrays, the
    input file, in-memory tensors): the model is never serialized as a whole."""
    lean = model if isinstance(model, LeanModel) else LeanModel.wrap(model, initializers_only=False)
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    size = payload_bytes(lean.proto) + sum(lean.nbytes(i) for i in range(len(lean.payloads)))
    if external is None:
        external = size > EXTERNAL_THRESHOLD
    elif not external and size >= PROTOBUF_LIMIT:
        raise OutputError(f"cannot write {out} without external data: its weights exceed the 2 GB a "
                          "single protobuf can hold (use --external-data auto or yes)")
    staged = StagedOutput(out, parent, data_file_name(out) if external else None)
    try:
        try:
            if external:
                _save_external(lean, staged.path, staged.data_name)
            elif not _save_inline(lean, staged.path):
                staged.references = set()  # an inline file naming no data file: commit need not read it back
            if external and (staged.dir / staged.data_name).stat().st_size == 0:
                os.unlink(staged.dir / staged.data_name)  # no weight went there: nothing names it
                staged.data_name = None
        except OSError as e:
            raise OutputError(f"cannot write {out}: {e.strerror or e}") from e
    except BaseException:
        staged.discard()
        raise
    return staged


def data_file_name(out: Path) -> str:
    """The name of a new external data file for the output `out`: OUTPUT.<16 hex>.data, unique to
    this write, so that it can be moved into place before the .onnx that names it (see StagedOutput)."""
    return f"{out.name}.{secrets.token_hex(8)}.data"


def is_data_file_of(out_name: str, name: str) -> bool:
    """Whether `name` is an external data file save_model writes for an output called `out_name`
    (OUTPUT.<16 hex>.data)."""
    return name.startswith(out_name + ".") and _DATA_TOKEN.fullmatch(name[len(out_name):]) is not None


_DATA_TOKEN = re.compile(r"\.[0-9a-f]{16}\.data")
TEMP_PREFIX = ".onnxrep-"


class StagedOutput:
    """An output written completely into a temporary directory beside its destination, not yet
    visible. commit() makes it visible, discard() removes it; either way the directory goes.

    How the pair is made atomic (docs/architecture-io.md): the external data file has a name
    unique to this write (OUTPUT.<token>.data), written and fsynced first; the .onnx naming it is
    written and fsynced too. Commit, under an exclusive flock on the destination directory (so
    concurrent writers to it commit one after the other): the data file is renamed into place
    (nothing references it yet, so no reader can see it), the directory fsynced, the .onnx renamed
    over OUTPUT (the one atomic step: a reader sees the old pair or the new one, never a mix), the
    directory fsynced, and then the data files of this output nothing references any more (the
    superseded one, and orphans of a writer killed between its two renames) are removed. SIGTERM and
    SIGINT are blocked during the commit, so it completes or never starts.

    While staged, the temporary directory is flocked (shared) by this process and SIGTERM/SIGINT
    remove it before the process exits (with 143 or KeyboardInterrupt). A directory left by a process
    killed with SIGKILL is removed by the next write to the same directory: one whose lock nobody
    holds, older than that process's start or made by a process that no longer exists."""

    def __init__(self, out: Path, parent: Path, data_name: str | None):
        self.out, self.parent, self.data_name = out, parent, data_name
        self.references: set[str] | None = None  # data files the staged .onnx names, when known without reading it
        self._fd = None
        self.committed = False
        _sweep_stale(parent)
        blocked = _block_signals()  # a signal between mkdtemp and _live.add would leave the directory
        try:
            try:
                self.dir = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=parent))
            except OSError as e:
                raise OutputError(f"cannot write to {parent}: {e.strerror or e}") from e
            _live.add(self.dir)
            _install_signal_handlers()
            self._fd = os.open(self.dir, os.O_RDONLY)
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_SH)  # alive: _sweep_stale leaves it alone
        finally:
            _unblock_signals(blocked)
        self.path = self.dir / out.name

    def commit(self) -> list[Path]:
        """Move the staged output into place (see the class docstring); return its files."""
        if self.committed:
            return self.files
        blocked = _block_signals()
        try:
            with _directory_lock(self.parent):
                # read only to know whether OUTPUT.data was the replaced model's (a 50k-node file
                # takes a second to scan); without that file there is nothing it could decide
                legacy = self.parent / (self.out.name + ".data")
                old_refs = _data_references(self.out) if legacy.is_file() else set()
                try:
                    if self.data_name:
                        os.replace(self.dir / self.data_name, self.parent / self.data_name)
                        _fsync_dir(self.parent)
                    os.replace(self.path, self.out)
                    _fsync_dir(self.parent)
                except OSError as e:
                    if self.data_name:  # not referenced by anything: take it back out
                        _unlink(self.parent / self.data_name)
                    raise OutputError(f"cannot write {self.out}: {e.strerror or e}") from e
                self.committed = True
                _remove_superseded(self.out, self.parent, old_refs, keep=self.data_name, current=self.references)
        finally:
            _unblock_signals(blocked)
            self.discard()
        return self.files

    @property
    def files(self) -> list[Path]:
        return [self.out, self.parent / self.data_name] if self.data_name else [self.out]

    def discard(self) -> None:
        """Remove the temporary directory (and whatever was not committed from it)."""
        if self._fd is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            os.close(self._fd)
            self._fd = None
            _live.discard(self.dir)
            if not _live:
                _restore_signal_handlers()

    def __del__(self):
        try:
            self.discard()
        except Exception:  # at interpreter exit the modules it needs may be gone
            pass

    def __enter__(self) -> "StagedOutput":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


# temporary directories of this process, removed by the SIGTERM/SIGINT handler
_live: set = set()
_previous_handlers: dict = {}
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _on_signal(signum, frame):
    """SIGTERM/SIGINT while an output is staged. Where the signal would end the process (the
    default action, or Python's KeyboardInterrupt), remove the temporary directories first, then
    end it as it would have ended: SystemExit(128 + signum), or KeyboardInterrupt. A handler of the
    caller's own decides for itself (if it raises, StagedOutput's discard runs as the stack unwinds);
    an ignored signal stays ignored."""
    previous = _previous_handlers.get(signum)
    if previous is signal.SIG_IGN:
        return
    if callable(previous) and previous is not signal.default_int_handler:
        previous(signum, frame)
        return
    for d in list(_live):
        shutil.rmtree(d, ignore_errors=True)
    _restore_signal_handlers()
    if previous is signal.default_int_handler:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def _install_signal_handlers() -> None:
    if _previous_handlers or threading.current_thread() is not threading.main_thread():
        return
    for s in _SIGNALS:
        _previous_handlers[s] = signal.getsignal(s)
        signal.signal(s, _on_signal)


def _restore_signal_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for s, h in list(_previous_handlers.items()):
        signal.signal(s, h if h is not None else signal.SIG_DFL)
    _previous_handlers.clear()


def _block_signals():
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)


def _unblock_signals(previous) -> None:
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _directory_lock:
    """An exclusive flock on a directory: commits to one directory happen one at a time. The
    kernel drops it when the process dies, however it dies."""

    def __init__(self, parent: Path):
        self.parent = parent

    def __enter__(self):
        try:
            self.fd = os.open(self.parent, os.O_RDONLY)
        except OSError as e:
            raise OutputError(f"cannot write to {self.parent}: {e.strerror or e}") from e
        if fcntl is not None:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # closing releases the lock


def _process_start() -> float:
    """This process's start time (epoch seconds, to a clock tick): after fork, the child's own."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return _IMPORTED


_IMPORTED = time.time()


def _sweep_stale(parent: Path) -> None:
    """Remove what killed writers left in `parent`: temporary directories whose lock nobody holds
    and that are older than this process or whose process is gone, and (under the directory lock)
    data files of an output that its .onnx does not reference."""
    start = _process_start() - 0.05  # /proc/uptime has a 10 ms resolution
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    outputs = set()
    for e in entries:
        if e.name.startswith(TEMP_PREFIX) and e.is_dir(follow_symlinks=False):
            try:
                if e.stat(follow_symlinks=False).st_mtime >= start and _owner_alive(e.name):
                    continue
                fd = os.open(e.path, os.O_RDONLY)
            except OSError:
                continue
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its writer is alive
            else:
                shutil.rmtree(e.path, ignore_errors=True)
            finally:
                os.close(fd)
        elif e.name.endswith(".data") and _DATA_TOKEN.search(e.name):
            outputs.add(e.name[:-len(".0123456789abcdef.data")])
    if outputs:
        with _directory_lock(parent):
            for name in outputs:
                _remove_superseded(parent / name, parent, set(), keep=None)


def _owner_alive(name: str) -> bool:
    """Whether the process that made the temp directory `name` (.onnxrep-<pid>-...) may still run
    (True where the name carries no pid: then only age and the lock decide)."""
    pid = name[len(TEMP_PREFIX):].split("-", 1)[0]
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _data_references(out: Path) -> set[str]:
    """External data locations the model file `out` names (empty when it does not exist or cannot
    be read: then nothing it referenced is removed but this output's own orphans)."""
    if not out.is_file():
        return set()
    try:
        info: dict = {}
        open_model(out, check=False, info=info)
        return {f.name for f in info["files"][1:] if f.parent == _resolve(out.parent)}
    except Exception:
        return set()


def _remove_superseded(out: Path, parent: Path, old_refs: set[str], keep: str | None,
                       current: set[str] | None = None) -> None:
    """Remove the output's data files that its current .onnx does not reference: those save_model
    named for it (OUTPUT.<token>.data), and OUTPUT.data where the replaced .onnx referenced it.
    `current`: what the current .onnx references, when the caller knows (read from it otherwise).
    Call with the directory lock held."""
    if keep is not None:
        current = {keep}
    elif current is None:
        current = _data_references(out)
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if name in current:
            continue
        if is_data_file_of(out.name, name) or (name == out.name + ".data" and name in old_refs):
            _unlink(parent / name)


def _unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_external(lean: "LeanModel", tmp_model: Path, data_name: str) -> None:
    """Payloads (stubs anywhere in the model, and raw tensors of 1 KiB or more still inside it)
    to data_name beside tmp_model, 4 KiB aligned; the .onnx file is the skeleton pointing at them."""
    offset = 0
    with open(tmp_model.parent / data_name, "wb", buffering=0) as data:

        def place(stub, n):
            nonlocal offset
            pad = (-offset) % 4096
            if pad:
                wire.write_all(data, b"\0" * pad)
                offset += pad
            del stub.external_data[:]
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(n))):
                stub.external_data.add(key=k, value=v)
            offset += n

        def write(src, stub):  # a raw tensor still inside the model
            place(stub, len(src.raw_data))
            wire.write_all(data, src.raw_data)

        skeleton = without_payload(lean.proto, on_stub=write)
        for t in onnx.external_data_helper._get_all_tensors(skeleton):
            i = stub_index(t)
            if i is not None:
                place(t, lean.nbytes(i))
                lean.write_payload(i, data)
        os.fsync(data.fileno())  # on disk before any .onnx that names it can be
    with open(tmp_model, "wb") as f:
        f.write(skeleton.SerializeToString())
        f.flush()
        os.fsync(f.fileno())


def _save_inline(lean: "LeanModel", tmp_model: Path) -> bool:
    """One protobuf file, written field by field: the model without its graph, then the graph
    without its initializers, then each initializer, its payload streamed after its header.
    Protobuf readers accept fields in any order, and a message's length is known from the sizes
    alone. Stubs outside the main graph's initializers (Constant nodes, subgraphs) are filled in
    memory first: they are small, and nested lengths would otherwise need a second pass.
    Returns whether the file names external data (a tensor of the model's own, not a stub)."""
    proto = lean.proto
    nested_stubs = refers_outside = False
    for top, t in all_tensors(proto):
        if stub_index(t) is not None:
            nested_stubs = nested_stubs or not top
        elif t.data_location == onnx.TensorProto.EXTERNAL:
            refers_outside = True
    if nested_stubs:  # rare: fill those in a copy
        proto = onnx.ModelProto()
        proto.CopyFrom(lean.proto)
        for top, t in all_tensors(proto):
            i = stub_index(t)
            if i is not None and not top:
                lean.fill(t, i)
    head = onnx.ModelProto()
    copy_fields(head, proto, skip=("graph",))
    rest = onnx.GraphProto()
    copy_fields(rest, proto.graph, skip=("initializer",))
    parts = []  # (tensor header bytes, payload index or None, payload bytes)
    for t in proto.graph.initializer:
        i = stub_index(t)
        if i is None:
            parts.append((t.SerializeToString(), None, 0))
            continue
        h = onnx.TensorProto()
        copy_fields(h, t, skip=("external_data", "data_location", "raw_data"))
        parts.append((h.SerializeToString(), i, lean.nbytes(i)))
    sizes = [len(h) + (0 if i is None else wire.field_size(wire.RAW_DATA, n)) for h, i, n in parts]
    graph_size = len(rest_bytes := rest.SerializeToString()) + sum(wire.field_size(wire.INITIALIZER, s) for s in sizes)
    if graph_size + len(head_bytes := head.SerializeToString()) >= PROTOBUF_LIMIT:
        raise OutputError("the model exceeds the 2 GB a single protobuf can hold; write it with external data")
    with open(tmp_model, "wb", buffering=0) as f:
        wire.write_all(f, head_bytes + wire.key(wire.GRAPH) + wire.varint(graph_size) + rest_bytes)
        for (h, i, n), s in zip(parts, sizes):
            wire.write_all(f, wire.key(wire.INITIALIZER) + wire.varint(s) + h)
            if i is not None:
                wire.write_all(f, wire.key(wire.RAW_DATA) + wire.varint(n))
                lean.write_payload(i, f)
        os.fsync(f.fileno())
    return refers_outside


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
