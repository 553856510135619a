"""Input shapes: one grammar and one check for `optimize`, `bench` and the Python API.

    CLI     --input-shape NAME:D1,D2,...     one value per flag, repeatable
    API     input_shapes={"NAME": [D1, D2, ...]}

Every dimension is a positive integer; a name may be given once. The same mistakes get the same
words everywhere; only the way the value is named differs ("--input-shape 'x:1'" on the command
line, "input_shapes['x']" in Python), so an API user is never told about a flag.

Pure Python: no onnx, no numpy, so the bench worker and the CLI parser can import it cheaply.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from .errors import InputError, UsageError

FLAG = "--input-shape"
GRAMMAR = "NAME:D1,D2,... with positive integers, e.g. input:1,3,224,224"


def _where(name: str | None, spec: str | None, api: bool) -> str:
    if api:
        return f"input_shapes[{name!r}]"
    return f"{FLAG} {spec!r}" if spec is not None else f"{FLAG} {name}"


def parse_spec(spec: str) -> tuple[str, list[int]]:
    """'x:1,3,224,224' → ('x', [1, 3, 224, 224]); UsageError worded for the command line.

    The name is everything before the last ':' (input names may contain ':')."""
    name, sep, dims = spec.rpartition(":")
    if not sep or not name:
        raise UsageError(f"bad {FLAG} {spec!r}: expected {GRAMMAR}")
    parts = dims.split(",")
    try:
        values = [int(p.strip()) for p in parts]
    except ValueError:
        raise UsageError(f"bad {FLAG} {spec!r}: expected {GRAMMAR}") from None
    if any(v <= 0 for v in values):
        raise UsageError(f"bad {FLAG} {spec!r}: dimensions must be positive integers")
    return name, values


def parse_specs(specs: Iterable[str] | None) -> dict[str, list[int]]:
    """Every `--input-shape` value of one command → {name: dims}; a name given twice is an error."""
    shapes: dict[str, list[int]] = {}
    for spec in specs or []:
        name, dims = parse_spec(spec)
        if name in shapes:
            raise UsageError(f"{FLAG} given twice for {name!r}")
        shapes[name] = dims
    return shapes


def from_api(shapes: Mapping[str, Sequence[int]] | Iterable[str] | None) -> dict[str, list[int]]:
    """The Python API's `input_shapes` argument, checked like the flag, worded for the API.

    Accepts {name: [d1, ...]} or, as a convenience for scripts that build CLI-like lists, an
    iterable of 'NAME:D1,...' strings (then worded like the flag, since that is what was given)."""
    if shapes is None:
        return {}
    if not isinstance(shapes, Mapping):
        if isinstance(shapes, (str, bytes)):
            raise UsageError("input_shapes must be a dict {name: [d1, d2, ...]}, not a string")
        return parse_specs(shapes)
    out: dict[str, list[int]] = {}
    for name, dims in shapes.items():
        if not isinstance(name, str) or not name:
            raise UsageError(f"input_shapes: keys must be input names (non-empty strings), got {name!r}")
        if isinstance(dims, (str, bytes)) or not isinstance(dims, Iterable):
            raise UsageError(f"bad input_shapes[{name!r}] = {dims!r}: expected a list of positive integers")
        values = list(dims)
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise UsageError(f"bad input_shapes[{name!r}] = {values!r}: dimensions must be positive integers")
        out[name] = values
    return out


def check_against(shapes: Mapping[str, Sequence[int]], inputs: Mapping[str, Sequence | None],
                  *, api: bool = False) -> None:
    """Check requested shapes against a model's inputs, {name: dims or None (rank unknown)} where
    each dim is an int (static) or anything else (symbolic / unknown). InputError on a mismatch."""
    names = ", ".join(inputs) or "none"
    for name, dims in shapes.items():
        where = _where(name, None, api)
        if name not in inputs:
            raise InputError(f"{where} names {name!r}, which is not a model input (inputs: {names})")
        model_dims = inputs[name]
        if model_dims is None:
            continue
        if len(model_dims) != len(dims):
            raise InputError(f"{where} has rank {len(dims)}, the model input {name!r} has rank {len(model_dims)}")
        for axis, (have, want) in enumerate(zip(model_dims, dims)):
            if isinstance(have, int) and not isinstance(have, bool) and have > 0 and have != want:
                raise InputError(f"{where}: axis {axis} is fixed to {have} in the model, not {want}")


def model_inputs(graph_inputs) -> dict[str, list | None]:
    """{name: dims} of an onnx GraphProto's inputs (a ValueInfoProto list): int for a static dim,
    the symbol (or None) for a dynamic one; None for an input whose rank is unknown."""
    out: dict[str, list | None] = {}
    for vi in graph_inputs:
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            out[vi.name] = None
            continue
        out[vi.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                        for d in tt.shape.dim]
    return out
