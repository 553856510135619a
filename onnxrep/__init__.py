"""onnxrep: structural re-parameterization of ONNX graphs."""
from . import _source_tree  # noqa: F401  (onnxrep.rules from a checkout; first, before any rule import)
from .errors import InputError, OnnxrepError, OutputError, UsageError, VerificationError
from .optimizer import Report, optimize, optimize_file

__version__ = "0.1.0"

__all__ = ["optimize", "optimize_file", "Report", "OnnxrepError", "InputError", "OutputError", "UsageError", "VerificationError", "__version__"]
