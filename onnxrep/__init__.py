"""onnxrep: structural re-parameterization of ONNX graphs.

`optimize`, `optimize_file` and `Report` are imported on first use (module-level __getattr__):
the optimizer pulls in onnx, onnx-graphsurgeon and the rules, which a bench worker process or
`onnxrep --help` has no use for. The error classes are plain Python and imported eagerly.
"""
from . import _source_tree  # noqa: F401  (onnxrep.rules from a checkout; first, before any rule import)
from .errors import InputError, OnnxrepError, OutputError, UsageError, VerificationError

__version__ = "0.1.0"

__all__ = ["optimize", "optimize_file", "Report", "OnnxrepError", "InputError", "OutputError", "UsageError", "VerificationError", "__version__"]

_LAZY = {"optimize": "optimizer", "optimize_file": "optimizer", "Report": "optimizer"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
