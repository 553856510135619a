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

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from .errors import InputError, OnnxrepError, OutputError, UsageError

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
    read when a rule or ONNX Runtime needs them (see LeanModel). Nothing else is read twice.
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
        info["external_data"] = external
        info["file_bytes"] = p.stat().st_size + sum(
            f.stat().st_size for f in {p.parent / e.value for t in onnx.external_data_helper._get_all_tensors(model)
                                       for e in t.external_data if e.key == "location" and e.value != STRIPPED}
            if f.is_file())
    if external:
        _resolve_external(lean, p)
    if check:
        check_model(model, p)
    return lean


def load_model(path: str | os.PathLike, check: bool = True, info: dict | None = None) -> onnx.ModelProto:
    """open_model, then every weight read into one in-memory ModelProto."""
    return open_model(path, check, info).materialize()


# -- lean models: weights left where they are ------------------------------------------------------
PAYLOAD_MIN = 1024  # tensors smaller than this stay inside the protobuf (shape values, scalars)
STRIPPED = "stripped"  # external_data location of a stub: a tensor whose payload is kept elsewhere
RELEASED = -1  # stub index of a weight whose array was dropped (graph.release_dead)


def stub_index(t: onnx.TensorProto) -> int | None:
    """The payload index of a stub (see LeanModel), RELEASED, or None for any other tensor."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return None
    kv = {e.key: e.value for e in t.external_data}
    if kv.get("location") != STRIPPED:
        return None
    return int(kv["offset"]) if kv.get("offset", "").isdigit() else RELEASED


class LeanModel:
    """A model whose large tensors are not inside its protobuf.

    `proto` holds a stub in place of each (data_location EXTERNAL, location STRIPPED, offset = an
    index into `payloads`), and payloads[i] is that tensor's data: a numpy array, an in-memory
    TensorProto, or a TensorProto whose bytes are still in the input file (see on_disk). The
    checker, shape inference and ORT (weights fed as arrays) work on `proto` alone, and save_model
    streams the payloads into the output: a model is never assembled in memory to be written.

    Protobuf (upb) makes every touch of a payload a copy (reading raw_data, CopyFrom, extend), frees
    a cleared field only with its whole message, and serializes everything to answer ByteSize():
    so the weights live outside the protobuf, once."""

    def __init__(self, proto: onnx.ModelProto, payloads: list):
        self.proto, self.payloads = proto, payloads

    @classmethod
    def wrap(cls, model: onnx.ModelProto, initializers_only: bool = True) -> "LeanModel":
        """`model` as a LeanModel whose payloads are its own tensors (nothing is copied; `model`
        must stay unchanged while the result is used). initializers_only: stub only the main
        graph's initializers (what ORT can be fed as arrays)."""
        payloads: list = []

        def keep(src, stub):
            del stub.external_data[:]
            stub.external_data.add(key="location", value=STRIPPED)
            stub.external_data.add(key="offset", value=str(len(payloads)))
            payloads.append(src)

        return cls(without_payload(model, PAYLOAD_MIN, on_stub=keep, initializers_only=initializers_only), payloads)

    def source(self, i: int):
        src = self.payloads[i] if i >= 0 else None
        if src is None or isinstance(src, onnx.TensorProto) and stub_index(src) is not None:
            raise OnnxrepError(f"internal error: payload {i} was released before the model was written")
        return src

    def nbytes(self, i: int) -> int:
        src = self.source(i)
        if isinstance(src, np.ndarray):
            return src.nbytes
        n = _expected_bytes(src)
        return n if n is not None else tensor_array(src).nbytes

    def array(self, i: int) -> np.ndarray:
        src = self.source(i)
        return src if isinstance(src, np.ndarray) else tensor_array(src)

    def weights(self) -> dict[str, np.ndarray]:
        """Main-graph stubs by name → arrays (read once; arrays already held are not copied)."""
        return {t.name: self.array(i) for t in self.proto.graph.initializer if (i := stub_index(t)) is not None}

    def fill(self, stub: onnx.TensorProto, i: int) -> None:
        """Turn `stub` into the whole tensor (its payload copied in)."""
        src = self.source(i)
        name = stub.name
        if isinstance(src, onnx.TensorProto) and on_disk(src) is None:
            stub.CopyFrom(src)
        else:
            arr = self.array(i)
            del stub.external_data[:]
            stub.ClearField("data_location")
            if np.little_endian and stub.data_type in _RAW_TYPES:
                stub.raw_data = np.ascontiguousarray(arr).tobytes()
            else:
                stub.CopyFrom(onnx.numpy_helper.from_array(arr, name))
        stub.name = name

    def materialize(self) -> onnx.ModelProto:
        """A whole in-memory ModelProto: the skeleton with every payload copied in."""
        model = onnx.ModelProto()
        model.CopyFrom(self.proto)
        for t in onnx.external_data_helper._get_all_tensors(model):
            i = stub_index(t)
            if i is not None:
                self.fill(t, i)
        return model

    def write_payload(self, i: int, f) -> None:
        """Append payload i's bytes (little-endian raw data) to the unbuffered file `f`."""
        src = self.source(i)
        if isinstance(src, onnx.TensorProto):
            where = on_disk(src)
            if where is not None:
                _copy_range(where, f)
                return
            if src.HasField("raw_data") and _expected_bytes(src) == len(src.raw_data):
                _write_all(f, src.raw_data)
                return
        arr = np.ascontiguousarray(self.array(i))
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        _write_all(f, arr.reshape(-1).view(np.uint8) if arr.size else b"")


_RAW_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
              onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
              onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}


def on_disk(t: onnx.TensorProto) -> tuple[str, int, int] | None:
    """(path, offset, length) of a payload that open_model left in a file, else None. Such a
    tensor is EXTERNAL with an absolute location (a model's own locations are relative)."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return None
    kv = {e.key: e.value for e in t.external_data}
    loc = kv.get("location", "")
    if not os.path.isabs(loc):
        return None
    return loc, int(kv["offset"]), int(kv["length"])


def _on_disk_tensor(header: onnx.TensorProto, path: str, offset: int, length: int) -> onnx.TensorProto:
    t = onnx.TensorProto(name=header.name, data_type=header.data_type, dims=header.dims)
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", path), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=k, value=v)
    return t


def tensor_array(t: onnx.TensorProto) -> np.ndarray:
    """A TensorProto's values as a read-only array, with one copy: raw data is wrapped where it is
    (protobuf hands it out as a new bytes object), an on-disk payload is read straight into it."""
    where = on_disk(t)
    size = _ITEMSIZE.get(t.data_type)
    if (where is not None or t.HasField("raw_data")) and t.data_type in _RAW_TYPES and size is not None:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).newbyteorder("<")
        shape = tuple(t.dims)
        count = int(np.prod(shape, dtype=np.int64))
        if where is not None:
            path, offset, length = where
            if length != count * size:
                raise InputError(f"tensor '{t.name}' has {length} bytes of data, its dims need {count * size}")
            try:
                arr = np.fromfile(path, dtype=dtype, count=count, offset=offset) if count else np.zeros(0, dtype)
            except OSError as e:
                raise InputError(f"cannot read weights of '{t.name}' from {path}: {e.strerror or e}") from e
            if arr.size != count:
                raise InputError(f"cannot read weights of '{t.name}' from {path}: the file is shorter than it was")
            arr = arr.reshape(shape)
            arr.flags.writeable = False
            return arr.astype(arr.dtype.newbyteorder("=")) if not np.little_endian else arr
        raw = t.raw_data
        if len(raw) == count * size and np.little_endian:
            return np.frombuffer(raw, dtype=dtype).reshape(shape)
    if where is not None:  # a type numpy cannot read raw (int4, ...): let onnx decode the bytes
        path, offset, length = where
        m = onnx.TensorProto()
        m.CopyFrom(t)
        del m.external_data[:]
        m.data_location = onnx.TensorProto.DEFAULT
        with open(path, "rb") as f:
            f.seek(offset)
            m.raw_data = f.read(length)
        t = m
    arr = onnx.numpy_helper.to_array(t)
    arr.flags.writeable = False
    return arr


def _copy_range(where: tuple[str, int, int], f) -> None:
    """Copy `length` bytes at `offset` of `path` to the end of the unbuffered file `f`, in the
    kernel where it can (copy_file_range), else through a 16 MiB buffer."""
    path, offset, length = where
    with open(path, "rb", buffering=0) as src:
        if hasattr(os, "copy_file_range"):
            try:
                while length:
                    n = os.copy_file_range(src.fileno(), f.fileno(), length, offset)
                    if n <= 0:
                        break
                    offset += n
                    length -= n
            except OSError:  # a filesystem or kernel without it: fall through to plain reads
                pass
        while length:
            buf = os.pread(src.fileno(), min(length, 16 << 20), offset)
            if not buf:
                raise OutputError(f"cannot copy weights from {path}: the file is shorter than it was")
            _write_all(f, buf)
            offset += len(buf)
            length -= len(buf)


def _scan(p: Path) -> "LeanModel | None":
    """Open an ONNX file without reading its weights: walk the protobuf wire format of ModelProto →
    GraphProto → initializer TensorProtos, keep every field except the raw_data of initializers of
    PAYLOAD_MIN bytes or more, and point those at their bytes in the file (on_disk). None where
    the bytes are not plain wire format (protobuf then parses the whole file and reports why)."""
    with open(p, "rb", buffering=0) as f:
        mm = _Reader(f.fileno(), os.fstat(f.fileno()).st_size)
        try:
            head, graph, inits = bytearray(), bytearray(), []
            for field, wt, start, vs, ve in _fields(mm, 0, len(mm)):
                if field == _GRAPH and wt == 2:
                    for gf, gwt, gstart, gvs, gve in _fields(mm, vs, ve):
                        if gf == _INITIALIZER and gwt == 2:
                            inits.append(_scan_tensor(mm, gvs, gve))
                        else:
                            graph += mm[gstart:gve]
                else:
                    head += mm[start:ve]
            model = onnx.ModelProto.FromString(bytes(head))
            g = onnx.GraphProto.FromString(bytes(graph))
        except (ValueError, IndexError, DecodeError, RuntimeError):
            return None
    payloads = []
    path = str(p.resolve())
    for kept, raw in inits:
        t = g.initializer.add()
        try:
            t.ParseFromString(kept)
        except (DecodeError, RuntimeError):
            return None
        if raw is not None:
            payloads.append(_on_disk_tensor(t, path, raw[0], raw[1] - raw[0]))
            t.data_location = onnx.TensorProto.EXTERNAL
            t.external_data.add(key="location", value=STRIPPED)
            t.external_data.add(key="offset", value=str(len(payloads) - 1))
    model.graph.CopyFrom(g)
    return LeanModel(model, payloads)


class _Reader:
    """Bytes of a file by index and slice, read with pread 64 KiB at a time: walking the wire format
    touches only the bytes around each field's key, and (unlike an mmap, whose mapped pages count
    as the process's memory) holds one block."""

    BLOCK = 64 << 10

    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size
        self.start, self.block = 0, b""

    def __len__(self) -> int:
        return self.size

    def _read(self, start: int, n: int) -> bytes:
        data = os.pread(self.fd, n, start)
        if len(data) != n:
            raise ValueError("file changed while it was read")
        return data

    def __getitem__(self, k):
        if isinstance(k, slice):
            if self.start <= k.start and k.stop <= self.start + len(self.block):
                return self.block[k.start - self.start:k.stop - self.start]
            return self._read(k.start, k.stop - k.start)
        if not self.start <= k < self.start + len(self.block):
            if not 0 <= k < self.size:
                raise IndexError(k)
            self.start = k
            self.block = self._read(k, min(self.BLOCK, self.size - k))
        return self.block[k - self.start]


def _scan_tensor(mm, start: int, end: int) -> tuple[bytes, tuple[int, int] | None]:
    """A TensorProto's bytes without a large raw_data, and that raw_data's (start, end), if any.
    A payload whose length disagrees with the dims stays inline, for the checker to report."""
    kept, raw = bytearray(), None
    for field, wt, fstart, vs, ve in _fields(mm, start, end):
        if field == _RAW_DATA and wt == 2:
            raw = (fstart, vs, ve)  # a repeated field: the last one wins
        else:
            kept += mm[fstart:ve]
    if raw is None:
        return bytes(kept), None
    header = onnx.TensorProto.FromString(bytes(kept))
    n = raw[2] - raw[1]
    if n < PAYLOAD_MIN or _expected_bytes(header) != n or header.data_location == onnx.TensorProto.EXTERNAL:
        return bytes(mm[start:end]), None
    return bytes(kept), (raw[1], raw[2])


def _fields(buf, start: int, end: int):
    """(field number, wire type, start of key, start of value, end of value) of each field of
    the message in buf[start:end]; ValueError where the bytes are not wire format."""
    pos = start
    while pos < end:
        key_start = pos
        key, pos = _read_varint(buf, pos, end)
        field, wt = key >> 3, key & 7
        if field == 0:
            raise ValueError("field number 0")
        if wt == 0:
            _, vend = _read_varint(buf, pos, end)
        elif wt == 1:
            vend = pos + 8
        elif wt == 2:
            n, pos = _read_varint(buf, pos, end)
            vend = pos + n
        elif wt == 5:
            vend = pos + 4
        else:  # groups (3, 4) are not used by onnx.proto; 6, 7 do not exist
            raise ValueError(f"wire type {wt}")
        if vend > end:
            raise ValueError("truncated")
        yield field, wt, key_start, pos, vend
        pos = vend


def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("bad varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _resolve_external(lean: LeanModel, p: Path) -> None:
    """Point the external tensors of a model at their files: main-graph initializers become
    on-disk payloads (read when needed), the rest (Constant nodes, subgraphs) are read now.
    Every location must name a regular file inside the model's directory, and every range must
    lie in its file and match the tensor's dims."""
    base = p.parent.resolve()
    for top, t in _tensors(lean.proto):
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
        need = _expected_bytes(t)
        if offset < 0 or length < 0 or offset + length > size:
            raise InputError(f"cannot load external weights of {p}: tensor '{t.name}' needs bytes "
                             f"{offset}..{offset + length} of '{loc}', which has {size}")
        if need is not None and length != need:
            raise InputError(f"cannot load external weights of {p}: tensor '{t.name}' has {length} bytes "
                             f"of external data, its dims need {need}")
        disk = _on_disk_tensor(t, str(where), offset, length)
        if top and need is not None and need >= PAYLOAD_MIN:
            lean.payloads.append(disk)
            del t.external_data[:]
            t.external_data.add(key="location", value=STRIPPED)
            t.external_data.add(key="offset", value=str(len(lean.payloads) - 1))
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


def save_model(model: "onnx.ModelProto | LeanModel", path: str | os.PathLike, external: bool | None = None) -> list[Path]:
    """Write `model` atomically; return the files written.

    external=None keeps weights inline unless the model is too large for one protobuf
    (then they go to `<name>.data` beside it). The weights are streamed to the file one tensor at a
    time, from wherever they are (arrays, the input file, in-memory tensors): the model is never
    serialized as a whole, so writing costs no copy of it. `model` is left unchanged.
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
    written = []
    try:
        tmp_model = tmpdir / out.name
        if external:
            _save_external(lean, tmp_model, data_name)
            os.replace(tmpdir / data_name, parent / data_name)
            written.append(parent / data_name)
        else:
            _save_inline(lean, tmp_model)
        os.replace(tmp_model, out)
        written.insert(0, out)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return written


def _save_external(lean: "LeanModel", tmp_model: Path, data_name: str) -> None:
    """Payloads (stubs anywhere in the model, and raw tensors of 1 KiB or more still inside it)
    to data_name beside tmp_model, 4 KiB aligned; the .onnx file is the skeleton pointing at them."""
    offset = 0
    with open(tmp_model.parent / data_name, "wb", buffering=0) as data:

        def place(stub, n):
            nonlocal offset
            pad = (-offset) % 4096
            if pad:
                _write_all(data, b"\0" * pad)
                offset += pad
            del stub.external_data[:]
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(n))):
                stub.external_data.add(key=k, value=v)
            offset += n

        def write(src, stub):  # a raw tensor still inside the model
            place(stub, len(src.raw_data))
            _write_all(data, src.raw_data)

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
    if any(not top and stub_index(t) is not None for top, t in _tensors(proto)):  # rare: fill those in a copy
        proto = onnx.ModelProto()
        proto.CopyFrom(lean.proto)
        for top, t in _tensors(proto):
            i = stub_index(t)
            if i is not None and not top:
                lean.fill(t, i)
    head = onnx.ModelProto()
    _copy_fields(head, proto, skip=("graph",))
    rest = onnx.GraphProto()
    _copy_fields(rest, proto.graph, skip=("initializer",))
    parts = []  # (tensor header bytes, payload index or None, payload bytes)
    for t in proto.graph.initializer:
        i = stub_index(t)
        if i is None:
            parts.append((t.SerializeToString(), None, 0))
            continue
        h = onnx.TensorProto()
        _copy_fields(h, t, skip=("external_data", "data_location", "raw_data"))
        parts.append((h.SerializeToString(), i, lean.nbytes(i)))
    sizes = [len(h) + (0 if i is None else _field_size(_RAW_DATA, n)) for h, i, n in parts]
    graph_size = len(rest_bytes := rest.SerializeToString()) + sum(_field_size(_INITIALIZER, s) for s in sizes)
    if graph_size + len(head_bytes := head.SerializeToString()) >= PROTOBUF_LIMIT:
        raise OutputError("the model exceeds the 2 GB a single protobuf can hold; write it with external data")
    with open(tmp_model, "wb", buffering=0) as f:
        _write_all(f, head_bytes + _key(_GRAPH) + _varint(graph_size) + rest_bytes)
        for (h, i, n), s in zip(parts, sizes):
            _write_all(f, _key(_INITIALIZER) + _varint(s) + h)
            if i is not None:
                _write_all(f, _key(_RAW_DATA) + _varint(n))
                lean.write_payload(i, f)


# protobuf field numbers (onnx.proto): ModelProto.graph, GraphProto.initializer, TensorProto.raw_data
_GRAPH, _INITIALIZER, _RAW_DATA = 7, 5, 9


def _tensors(model: onnx.ModelProto):
    """(is a main-graph initializer, tensor) for every tensor of the model: the main graph's
    initializers, then Constant-node and other attribute tensors and subgraphs' tensors, then
    functions'. (Protobuf hands out a new wrapper per access, so identity cannot tell them apart.)"""
    for t in model.graph.initializer:
        yield True, t

    def graph(g, initializers):
        if initializers:
            for t in g.initializer:
                yield False, t
        for n in g.node:
            for a in n.attribute:
                if a.HasField("t"):
                    yield False, a.t
                for t in a.tensors:
                    yield False, t
                if a.HasField("g"):
                    yield from graph(a.g, True)
                for sub in a.graphs:
                    yield from graph(sub, True)

    yield from graph(model.graph, False)
    for f in model.functions:
        yield from graph(f, False)


def _varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _key(field: int) -> bytes:
    return _varint(field << 3 | 2)  # wire type 2: length-delimited


def _field_size(field: int, n: int) -> int:
    return len(_key(field)) + len(_varint(n)) + n


def _write_all(f, buf) -> None:
    """Raw (unbuffered) file writes may be short; write until all of `buf` is out."""
    view = memoryview(buf).cast("B")
    while view:
        n = f.write(view)
        view = view[n:]


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
