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
        raise InputError(f"input file not found: {p}")
    if p.is_dir():
        raise InputError(f"input is a directory, not an ONNX file: {p}")
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
    """onnx.checker on the model (in-memory, so external data needs no path)."""
    try:
        if model.ByteSize() < PROTOBUF_LIMIT:
            onnx.checker.check_model(model)
        else:  # the checker cannot serialize it; check the graph without initializer payloads
            onnx.checker.check_model(_strip_weights(model))
    except (onnx.checker.ValidationError, ValueError) as e:
        raise InputError(f"model fails onnx.checker: {origin}: {_first_line(e)}") from e


def _strip_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for t in onnx.external_data_helper._get_all_tensors(light):
        if t.raw_data:
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            t.external_data.add(key="location", value="stripped")
    return light


def check_output_path(input_path: str | os.PathLike | None, output_path: str | os.PathLike) -> Path:
    """Refuse outputs that would overwrite the input or cannot be written; nothing is created."""
    out = Path(output_path)
    if input_path is not None:
        inp = Path(input_path)
        same = out.resolve() == inp.resolve()
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
        raise OutputError(f"output directory does not exist: {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output directory is not writable: {parent}")
    return out


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external: bool | None = None) -> list[Path]:
    """Write `model` atomically; return the files written.

    external=None keeps weights inline unless the model is too large for one protobuf
    (then they go to `<name>.data` beside it). The in-memory model is left unchanged.
    """
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if external is None:
        external = _payload_bytes(model) > EXTERNAL_THRESHOLD
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
    return sum(len(t.raw_data) for t in onnx.external_data_helper._get_all_tensors(model))


def _save_external(model: onnx.ModelProto, tmp_model: Path, data_name: str) -> None:
    """Write weights >= 1 KiB to data_name beside tmp_model, without mutating `model`.

    Tensors are moved out of the proto one at a time and restored afterwards, so peak memory stays
    near one copy of the weights instead of two.
    """
    moved = []
    offset = 0
    with open(tmp_model.parent / data_name, "wb") as data:
        for t in onnx.external_data_helper._get_all_tensors(model):
            if not t.HasField("raw_data") or len(t.raw_data) < 1024:
                continue
            pad = (-offset) % 4096
            if pad:
                data.write(b"\0" * pad)
                offset += pad
            raw = t.raw_data
            data.write(raw)
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                t.external_data.add(key=k, value=v)
            moved.append((t, raw))
            offset += len(raw)
    try:
        with open(tmp_model, "wb") as f:
            f.write(model.SerializeToString())
    finally:
        for t, raw in moved:
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = raw


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
