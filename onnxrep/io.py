"""Loading and saving models: clear errors in, atomic writes out.

The input file is only ever opened for reading, and its weights are left in it (open_model gives
a LeanModel). The output is streamed into a temporary directory beside its destination, checked
there by the caller if it wishes (save_model's before_commit), and moved into place with
os.replace, so a reader never sees half a file and a failure leaves nothing behind.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

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
        check_model(model, p)
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


def check_model(model: onnx.ModelProto, origin: object = "model") -> None:
    """onnx.checker on the model (in-memory, so external data needs no path), with strict shape
    inference when the model fits in one protobuf: the rewritten model gets the same full check, so
    an input that fails it could never be written and is reported as bad input, not as a bug."""
    _check_opsets(model, origin)
    try:
        # the checker serializes what it is given (and cannot above 2 GB): give it the model with
        # weight payloads left out; their sizes are checked by _strip_weights itself
        run_checker(_strip_weights(model), full_check=True)
    except onnx.shape_inference.InferenceError as e:
        raise InputError(f"model fails ONNX shape inference: {origin}: {_inference_reason(e)}") from e
    except (onnx.checker.ValidationError, ValueError) as e:
        raise InputError(f"model fails onnx.checker: {origin}: {_checker_reason(e, model)}") from e


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


def check_not_input(input_files: list[Path], output_path: str | os.PathLike, *others) -> None:
    """Refuse an output whose model file, external data file (OUTPUT.data) or other file the
    caller will write (`others`, e.g. a report) is one of the input's files (see open_model's
    `info`): writing it would overwrite the input's weights."""
    out = Path(output_path)
    for name in (out, out.with_name(out.name + ".data"), *map(Path, others)):
        if _resolve(name) in input_files:
            raise UsageError(f"{name} is one of the input's files: writing it would overwrite the input "
                             "(onnxrep never modifies its input)")


def check_output_path(input_path: str | os.PathLike | None, output_path: str | os.PathLike) -> Path:
    """Refuse outputs that would overwrite the input or cannot be written; nothing is created."""
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
            raise UsageError(f"output path is the input file: {out} (onnxrep never modifies its input)")
    if out.is_dir():
        raise UsageError(f"output path is a directory: {out}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        if parent.exists():
            raise OutputError(f"output directory is not a directory: {parent}")
        raise OutputError(f"output directory does not exist: {parent}")
    _probe_writable(parent)
    return out


def _resolve(p: Path) -> Path:
    """Path.resolve without the RuntimeError/OSError a symlink loop raises (the loop is reported
    as a missing input by load_model)."""
    try:
        return p.resolve()
    except (OSError, RuntimeError):
        return p.absolute()


def _probe_writable(parent: Path) -> None:
    """Create and remove a temporary file in `parent`: os.access says yes to root on read-only
    mounts, /proc and files chattr'ed immutable, and the optimization should not run for minutes
    before the write fails."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".onnxrep-probe-", dir=parent)
    except OSError as e:
        raise OutputError(f"output directory is not writable: {parent} ({e.strerror or e})") from e
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass


def save_model(model: "onnx.ModelProto | LeanModel", path: str | os.PathLike, external: bool | None = None,
               before_commit=None) -> list[Path]:
    """Write `model` atomically; return the files written.

    external=None keeps weights inline unless the model is too large for one protobuf
    (then they go to `<name>.data` beside it). The weights are streamed to the file one tensor at a
    time, from wherever they are (arrays, the input file, in-memory tensors): the model is never
    serialized as a whole, so writing costs no copy of it. `model` is left unchanged.

    before_commit(path): called with the complete file, still in its temporary directory (its
    .data beside it), before anything is moved into place; whatever it raises leaves nothing
    written. optimize_file verifies the written model there.
    """
    lean = model if isinstance(model, LeanModel) else LeanModel.wrap(model, initializers_only=False)
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    size = payload_bytes(lean.proto) + sum(lean.nbytes(i) for i in range(len(lean.payloads)))
    if external is None:
        external = size > EXTERNAL_THRESHOLD
    elif not external and size >= PROTOBUF_LIMIT:
        raise OutputError(f"cannot write {out} without external data: its weights exceed the 2 GB a "
                          "single protobuf can hold (use --external-data auto or yes)")
    data_name = out.name + ".data"
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=".onnxrep-", dir=parent))
    except OSError as e:
        raise OutputError(f"cannot write to {parent}: {e.strerror or e}") from e
    tmp_model = tmpdir / out.name
    try:
        try:
            (_save_external(lean, tmp_model, data_name) if external else _save_inline(lean, tmp_model))
        except OSError as e:
            raise OutputError(f"cannot write {out}: {e.strerror or e}") from e
        if before_commit is not None:
            before_commit(tmp_model)
        try:
            if external:
                os.replace(tmpdir / data_name, parent / data_name)
            os.replace(tmp_model, out)
        except OSError as e:
            raise OutputError(f"cannot write {out}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return [out, parent / data_name] if external else [out]


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
    with open(tmp_model, "wb") as f:
        f.write(skeleton.SerializeToString())


def _save_inline(lean: "LeanModel", tmp_model: Path) -> None:
    """One protobuf file, written field by field: the model without its graph, then the graph
    without its initializers, then each initializer, its payload streamed after its header.
    Protobuf readers accept fields in any order, and a message's length is known from the sizes
    alone. Stubs outside the main graph's initializers (Constant nodes, subgraphs) are filled in
    memory first: they are small, and nested lengths would otherwise need a second pass."""
    proto = lean.proto
    if any(not top and stub_index(t) is not None for top, t in all_tensors(proto)):  # rare: fill those in a copy
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
