"""Export a training-time model to ONNX in each of the forms users produce.

Forms (``FORMS``):

- ``"legacy"``: TorchScript exporter (``dynamo=False``), opset 17, ``do_constant_folding=True``.
  Conv -> BN pairs whose conv weight is an initializer arrive already fused; every other BN stays.
- ``"legacy-nofold"``: the same with ``do_constant_folding=False``: every BN is a node, derived
  constants (DBB's border fill value) stay as Sub/Mul/Div/Sqrt subgraphs over initializers, and
  ``Identity`` nodes carry shared initializers.
- ``"legacy18"``, ``"legacy18-nofold"``: the same two at opset 18 (BN and Pad change form, Split
  takes its sizes as an input, Reduce* take axes as an input).
- ``"dynamo"``: torch.export-based exporter (``dynamo=True``, needs onnxscript), opset 18, weights
  in external data (``<path>.data`` beside the model, via ``ONNXProgram.save(external_data=True)``).
  Its optimizer fuses Conv+BN, writes GlobalAveragePool as ReduceMean and Flatten as Reshape.
- ``"dynamo-noopt"``: the same with ``optimize=False``: bias-free convs carry
  ``Expand(CastLike(0, x), Shape(W))`` as bias, splits are SplitToSequence/SequenceAt, every BN
  is a node.

Axes (``AXES``): ``"static"``; ``"batch"``: axis 0 symbolic ("batch"); ``"hw"``: axes 2 and 3
symbolic ("height", "width"; models whose graph fixes the spatial size, ``FIXED_HW``, cannot).
All forms name the input ``"input"`` and the output ``"output"``.  Everything runs offline.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

__all__ = ["FORMS", "AXES", "FIXED_HW", "DEFAULT_OPSET", "export_onnx", "data_path"]

FORMS: tuple[str, ...] = ("legacy", "legacy-nofold", "legacy18", "legacy18-nofold", "dynamo", "dynamo-noopt")
DEFAULT_OPSET = {"legacy": 17, "legacy-nofold": 17, "legacy18": 18, "legacy18-nofold": 18, "dynamo": 18,
                 "dynamo-noopt": 18}
AXES: tuple[str, ...] = ("static", "batch", "hw")
#: zoo models whose graph fixes the input's spatial size (a fully connected layer over the map)
FIXED_HW: frozenset[str] = frozenset({"repmlp", "mobileone_se", "mlp_mixer"})  # an FC on the map; SE pooling by
# the traced size; token mixing over a fixed token count


def data_path(path: str | os.PathLike) -> Path:
    """Where the dynamo form's external weights land: ``<path>.data`` (e.g. model.onnx.data)."""
    p = Path(path)
    return p.with_name(p.name + ".data")


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress prints, deprecation warnings and registration logs."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        logger.setLevel(level)


def export_onnx(model: nn.Module, input_shape: Sequence[int], path: str | os.PathLike,
                form: str, opset: int | None = None, dynamic_batch: bool = False,
                example: torch.Tensor | None = None, axes: str | None = None) -> Path:
    """Export ``model`` (put in eval mode) to ``path`` in the given ``form``; return the path.

    Args:
        model: the network; exported in eval mode (BN uses running statistics).
        input_shape: shape of the example input (a seeded N(0,1) tensor unless ``example`` given).
        path: destination ``.onnx`` file; the dynamo form also writes ``data_path(path)``.
        form: one of ``FORMS``.
        opset: override the form's default opset (17 legacy, 18 dynamo; below 18 dynamo may emit
            an invalid Split).
        dynamic_batch: make axis 0 of input and output symbolic (the same as ``axes="batch"``).
        example: the example input to trace with (for a dynamic batch in the dynamo form, give it
            a batch of at least 2: torch.export specializes size-1 dimensions).
        axes: one of ``AXES`` (default "batch" with dynamic_batch, else "static").
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    axes = axes or ("batch" if dynamic_batch else "static")
    if axes not in AXES:
        raise ValueError(f"axes must be one of {AXES}, got {axes!r}")
    dynamic_batch = axes == "batch"
    opset = DEFAULT_OPSET[form] if opset is None else opset
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    if example is None:
        shape = tuple(input_shape)
        if dynamic_batch and form.startswith("dynamo") and shape[0] < 2:
            # torch.export specializes a size-1 dimension; trace a symbolic batch with batch 2.
            shape = (2, *shape[1:])
        example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    names = dict(input_names=["input"], output_names=["output"])

    with _quiet(), torch.no_grad():
        if form.startswith("legacy"):
            dyn = {"batch": {"input": {0: "batch"}, "output": {0: "batch"}},
                   "hw": {"input": {2: "height", 3: "width"}}}.get(axes)
            torch.onnx.export(model, (example,), str(path), dynamo=False,
                              do_constant_folding=not form.endswith("-nofold"), opset_version=opset,
                              dynamic_axes=dyn, **names)
        else:
            dyn = {"batch": ({0: torch.export.Dim("batch")},),
                   "hw": ({2: torch.export.Dim("height", min=2), 3: torch.export.Dim("width", min=2)},)}.get(axes)
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                        dynamic_shapes=dyn, verbose=False,
                                        optimize=form != "dynamo-noopt", **names)
            dp = data_path(path)
            if dp.exists():
                dp.unlink()
            program.save(str(path), external_data=True)
    return path
