"""Lean models: a payload-free protobuf plus the weights, wherever they are.

Weights are the only large thing in a model, and protobuf (upb) makes every touch of them a copy:
reading raw_data copies it, CopyFrom/extend copy it, clearing a field frees nothing until the whole
message goes, ByteSize()/SerializeToString() serialize it all. So onnxrep keeps each large tensor
out of the protobuf: a *stub* takes its place (same name, type and dims; data_location EXTERNAL at
location STRIPPED, offset = an index into a payload list) and the payload is a numpy array, an
in-memory TensorProto, or a range of the input file (on_disk). The checker, shape inference and
ORT (weights fed as arrays) need the stub only.
"""
from __future__ import annotations

import os

import numpy as np
import onnx

from . import wire
from .errors import InputError, OnnxrepError, OutputError

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


def point_stub(t: onnx.TensorProto, index: int) -> None:
    """Make `t` the stub of payload `index` (RELEASED: of a payload that is gone)."""
    t.data_location = onnx.TensorProto.EXTERNAL
    del t.external_data[:]
    t.external_data.add(key="location", value=STRIPPED)
    t.external_data.add(key="offset", value=str(index) if index >= 0 else "released")


class LeanModel:
    """A model whose large tensors are not inside its protobuf.

    `proto` holds a stub in place of each (data_location EXTERNAL, location STRIPPED, offset = an
    index into `payloads`), and payloads[i] is that tensor's data: a numpy array, an in-memory
    TensorProto, or a TensorProto whose bytes are still in the input file (see on_disk). The
    checker, shape inference and ORT (weights fed as arrays) work on `proto` alone, and save_model
    streams the payloads into the output: a model is never assembled in memory to be written.

    Protobuf (upb) makes every touch of a payload a copy (reading raw_data, CopyFrom, extend), frees
    a cleared field only with its whole message, and serializes everything to answer ByteSize()
    (see the module docstring): so the weights live outside the protobuf, once."""

    def __init__(self, proto: onnx.ModelProto, payloads: list):
        self.proto, self.payloads = proto, payloads

    def add(self, stub: onnx.TensorProto, payload) -> None:
        """Append `payload` and make `stub` (a tensor of `proto`) point at it."""
        self.payloads.append(payload)
        point_stub(stub, len(self.payloads) - 1)

    @classmethod
    def wrap(cls, model: onnx.ModelProto, initializers_only: bool = True) -> "LeanModel":
        """`model` as a LeanModel whose payloads are its own tensors (nothing is copied; `model`
        must stay unchanged while the result is used). initializers_only: stub only the main
        graph's initializers (what ORT can be fed as arrays)."""
        lean = cls(onnx.ModelProto(), [])
        lean.proto = without_payload(model, PAYLOAD_MIN, on_stub=lambda src, stub: lean.add(stub, src),
                                     initializers_only=initializers_only)
        return lean

    def source(self, i: int):
        src = self.payloads[i] if i >= 0 else None
        if src is None or isinstance(src, onnx.TensorProto) and stub_index(src) is not None:
            raise OnnxrepError(f"internal error: payload {i} was released before the model was written")
        return src

    def nbytes(self, i: int) -> int:
        src = self.source(i)
        if isinstance(src, np.ndarray):
            return src.nbytes
        n = expected_bytes(src)
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
                copy_range(where, f)
                return
            if src.HasField("raw_data") and expected_bytes(src) == len(src.raw_data):
                wire.write_all(f, src.raw_data)
                return
        arr = np.ascontiguousarray(self.array(i))
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        wire.write_all(f, arr.reshape(-1).view(np.uint8) if arr.size else b"")


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


def on_disk_tensor(header: onnx.TensorProto, path: str, offset: int, length: int) -> onnx.TensorProto:
    t = onnx.TensorProto(name=header.name, data_type=header.data_type, dims=header.dims)
    t.data_location = onnx.TensorProto.EXTERNAL  # with an absolute location: see on_disk
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
            arr = np.empty(count, dtype)
            try:
                got = _read_into(path, offset, memoryview(arr).cast("B"))
            except OSError as e:
                raise InputError(f"cannot read weights of '{t.name}' from {path}: {e.strerror or e}") from e
            if got != length:
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


def _read_into(path: str, offset: int, buf: memoryview) -> int:
    """Fill `buf` from `path` at `offset` straight into its memory (np.fromfile goes through stdio
    in small pieces: 8× slower); returns the bytes read, fewer where the file ends first."""
    done = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while done < len(buf):
            n = f.readinto(buf[done:])
            if not n:
                break
            done += n
    return done


def copy_range(where: tuple[str, int, int], f) -> None:
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
            wire.write_all(f, buf)
            offset += len(buf)
            length -= len(buf)


_TP = onnx.TensorProto
# bytes per element of the fixed-width types; strings and sub-byte types (int4, ...) are left out
_ITEMSIZE = {_TP.FLOAT: 4, _TP.DOUBLE: 8, _TP.FLOAT16: 2, _TP.BFLOAT16: 2, _TP.INT8: 1, _TP.UINT8: 1,
             _TP.INT16: 2, _TP.UINT16: 2, _TP.INT32: 4, _TP.UINT32: 4, _TP.INT64: 8, _TP.UINT64: 8,
             _TP.BOOL: 1, _TP.COMPLEX64: 8, _TP.COMPLEX128: 16}
_ITEMSIZE.update({getattr(_TP, n): 1 for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")
                  if hasattr(_TP, n)})


def expected_bytes(t: onnx.TensorProto) -> int | None:
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
    return sum(expected_bytes(t) or 0 for t in onnx.external_data_helper._get_all_tensors(model)
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
        n = expected_bytes(src) if src.HasField("raw_data") and src.data_location != onnx.TensorProto.EXTERNAL else None
        if n is None or n < min_bytes or (validate and len(src.raw_data) != n):
            dst.CopyFrom(src)
            return
        copy_fields(dst, src, skip=("raw_data", "external_data", "data_location"))
        dst.data_location = onnx.TensorProto.EXTERNAL
        dst.external_data.add(key="location", value=STRIPPED)
        if on_stub is not None:
            on_stub(src, dst)

    def graph(dst, src):
        copy_fields(dst, src, skip=("node", "initializer"))
        for t in src.initializer:
            tensor(dst.initializer.add(), t)
        for n in src.node:
            node(dst.node.add(), n)

    def node(dst, src):
        if initializers_only or not any(a.HasField("t") or len(a.tensors) or a.HasField("g") or len(a.graphs) for a in src.attribute):
            dst.CopyFrom(src)
            return
        copy_fields(dst, src, skip=("attribute",))
        for a in src.attribute:
            d = dst.attribute.add()
            copy_fields(d, a, skip=("t", "tensors", "g", "graphs"))
            if a.HasField("t"):
                tensor(d.t, a.t)
            for t in a.tensors:
                tensor(d.tensors.add(), t)
            if a.HasField("g"):
                graph(d.g, a.g)
            for g in a.graphs:
                graph(d.graphs.add(), g)

    light = onnx.ModelProto()
    copy_fields(light, model, skip=("graph",))
    if model.HasField("graph"):
        graph(light.graph, model.graph)
    tensor = graph = node = None  # noqa: F841  break the closures' cycle: it would keep on_stub's data alive
    return light


def copy_fields(dst, src, skip=()) -> None:
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


def all_tensors(model: onnx.ModelProto):
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
