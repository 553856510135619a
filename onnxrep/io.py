"""Loading and saving models: clear errors in, atomic writes out.

The input file is only ever opened for reading. The output is written into a temporary directory
beside its destination and moved into place with os.replace, so a reader never sees half a file and
a failure leaves nothing behind.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import InputError, OutputError, UsageError

# protobuf refuses to serialize a single message above 2 GiB; leave headroom for the graph itself.
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_THRESHOLD = 1 << 30


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(
        t.data_location == onnx.TensorProto.EXTERNAL
        for t in onnx.external_data_helper._get_all_tensors(model)
    )


def load_model(path: str | os.PathLike, check: bool = True, info: dict | None = None) -> onnx.ModelProto:
    """Read an ONNX model with its external data; raise InputError with a one-line reason.
    `info`, when given, receives {'external_data': bool, 'file_bytes': int}."""
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
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise InputError(f"not a valid ONNX model (protobuf decode failed): {p}: {_first_line(e)}") from e
    except OSError as e:
        raise InputError(f"cannot read {p}: {e.strerror or e}") from e
    if not model.HasField("graph") or model.ir_version == 0:
        raise InputError(f"not an ONNX model (no graph or IR version): {p}")
    external = _has_external_data(model)
    if info is not None:
        info["external_data"] = external
        info["file_bytes"] = p.stat().st_size + sum(
            f.stat().st_size for f in {p.parent / e.value for t in onnx.external_data_helper._get_all_tensors(model)
                                       for e in t.external_data if e.key == "location"} if f.is_file())
    if external:
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as e:
            raise InputError(f"cannot load external weights of {p}: {_first_line(e)}") from e
    if check:
        check_model(model, p)
    return model


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


STRIPPED = "stripped"  # external_data location of a tensor whose payload without_payload left out
_TP = onnx.TensorProto
# bytes per element of the fixed-width types; strings and sub-byte types (int4, ...) are left out
_ITEMSIZE = {_TP.FLOAT: 4, _TP.DOUBLE: 8, _TP.FLOAT16: 2, _TP.BFLOAT16: 2, _TP.INT8: 1, _TP.UINT8: 1,
             _TP.INT16: 2, _TP.UINT16: 2, _TP.INT32: 4, _TP.UINT32: 4, _TP.INT64: 8, _TP.UINT64: 8,
             _TP.BOOL: 1, _TP.COMPLEX64: 8, _TP.COMPLEX128: 16}
_ITEMSIZE.update({getattr(_TP, n): 1 for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")
                  if hasattr(_TP, n)})


def _expected_bytes(t: onnx.TensorProto) -> int | None:
    """Payload bytes a tensor's dims and type call for; None for strings and sub-byte types."""
    size = _ITEMSIZE.get(t.data_type)
    if size is None:
        return None
    n = size
    for d in t.dims:
        n *= d
    return n


def payload_bytes(model: onnx.ModelProto) -> int:
    """Raw weight bytes of a model, from tensor dims (reading raw_data would copy it)."""
    return sum(_expected_bytes(t) or 0 for t in onnx.external_data_helper._get_all_tensors(model)
               if t.HasField("raw_data"))


def without_payload(model: onnx.ModelProto, min_bytes: int = 1024, validate: bool = False,
                    on_stub=None, initializers_only: bool = False) -> onnx.ModelProto:
    """A copy of `model` in which each tensor (initializers, Constant nodes, subgraphs) with a raw
    payload of at least `min_bytes` is a stub: same name, type and dims, data_location EXTERNAL at
    location STRIPPED. No payload is ever copied: protobuf (upb) frees a cleared field only with the
    whole message, so CopyFrom-then-clear would cost a full copy of the weights, and ByteSize() or
    SerializeToString() of a large model serialize all of it.

    validate: compare each payload's length with its dims (reads it once) and keep a mismatching
    tensor whole, so onnx.checker reports it. on_stub(tensor, stub) is called for each stub, in
    order (save_model writes the payload and points the stub at it). initializers_only: stub only
    the main graph's initializers (verification feeds those to ORT as inputs)."""

    def tensor(dst, src):
        n = _expected_bytes(src) if src.HasField("raw_data") and src.data_location != onnx.TensorProto.EXTERNAL else None
        if n is None or n < min_bytes or (validate and len(src.raw_data) != n):
            dst.CopyFrom(src)
            return
        _copy_fields(dst, src, skip=("raw_data", "external_data", "data_location"))
        dst.data_location = onnx.TensorProto.EXTERNAL
        dst.external_data.add(key="location", value=STRIPPED)
        if on_stub is not None:
            on_stub(src, dst)

    def graph(dst, src):
        _copy_fields(dst, src, skip=("node", "initializer"))
        for t in src.initializer:
            tensor(dst.initializer.add(), t)
        for n in src.node:
            node(dst.node.add(), n)

    def node(dst, src):
        if initializers_only or not any(a.HasField("t") or len(a.tensors) or a.HasField("g") or len(a.graphs) for a in src.attribute):
            dst.CopyFrom(src)
            return
        _copy_fields(dst, src, skip=("attribute",))
        for a in src.attribute:
            d = dst.attribute.add()
            _copy_fields(d, a, skip=("t", "tensors", "g", "graphs"))
            if a.HasField("t"):
                tensor(d.t, a.t)
            for t in a.tensors:
                tensor(d.tensors.add(), t)
            if a.HasField("g"):
                graph(d.g, a.g)
            for g in a.graphs:
                graph(d.graphs.add(), g)

    light = onnx.ModelProto()
    _copy_fields(light, model, skip=("graph",))
    if model.HasField("graph"):
        graph(light.graph, model.graph)
    tensor = graph = node = None  # noqa: F841  break the closures' cycle: it would keep on_stub's data alive
    return light


def _copy_fields(dst, src, skip=()) -> None:
    """Copy the fields of `src` into `dst` except `skip`, without reading the skipped ones."""
    for fd in src.DESCRIPTOR.fields:
        if fd.name in skip:
            continue
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        if repeated:
            values = getattr(src, fd.name)
            if len(values):
                getattr(dst, fd.name).extend(values)
        elif src.HasField(fd.name):
            if fd.message_type is not None:
                getattr(dst, fd.name).CopyFrom(getattr(src, fd.name))
            else:
                setattr(dst, fd.name, getattr(src, fd.name))


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


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external: bool | None = None) -> list[Path]:
    """Write `model` atomically; return the files written.

    external=None keeps weights inline unless the model is too large for one protobuf
    (then they go to `<name>.data` beside it). The in-memory model is left unchanged.
    """
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if external is None:
        external = _payload_bytes(model) > EXTERNAL_THRESHOLD
    elif not external and _payload_bytes(model) >= PROTOBUF_LIMIT:
        raise OutputError(f"cannot write {out} without external data: its weights exceed the 2 GB a "
                          "single protobuf can hold (use --external-data auto or yes)")
    data_name = out.name + ".data"
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=".onnxrep-", dir=parent))
    except OSError as e:
        raise OutputError(f"cannot write to {parent}: {e.strerror or e}") from e
    written = []
    try:
        tmp_model = tmpdir / out.name
        if external:
            _save_external(model, tmp_model, data_name)
            os.replace(tmpdir / data_name, parent / data_name)
            written.append(parent / data_name)
        else:
            with open(tmp_model, "wb") as f:
                f.write(model.SerializeToString())
        os.replace(tmp_model, out)
        written.insert(0, out)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return written


def _payload_bytes(model: onnx.ModelProto) -> int:
    return payload_bytes(model)


def _save_external(model: onnx.ModelProto, tmp_model: Path, data_name: str) -> None:
    """Write weights >= 1 KiB to data_name beside tmp_model, without mutating `model`.

    The payloads go to the data file one tensor at a time and the .onnx file is a payload-free copy
    (without_payload), so memory grows by one tensor, not by a copy of the weights. (Moving raw_data
    out of the proto and back, as this once did, costs two copies: upb frees cleared fields only
    with the whole message, and the restored bytes are a new allocation.)"""
    offset = 0
    with open(tmp_model.parent / data_name, "wb") as data:

        def write(src, stub):
            nonlocal offset
            pad = (-offset) % 4096
            if pad:
                data.write(b"\0" * pad)
                offset += pad
            raw = src.raw_data
            data.write(raw)
            del stub.external_data[:]
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                stub.external_data.add(key=k, value=v)
            offset += len(raw)

        light = without_payload(model, on_stub=write)
    with open(tmp_model, "wb") as f:
        f.write(light.SerializeToString())


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
