"""Typed errors and the process exit codes they map to.

The CLI turns each of these into one line on stderr and its exit code; the Python API raises them.

    0  success
    1  internal error (a bug in onnxrep: please report it with --debug output)
    2  usage error (bad flag, unknown rule, output path equal to input, ...)
    3  input error (missing, unreadable, truncated or invalid model; bad data file)
    4  verification failed (the rewritten graph does not match the original)
    5  output error (cannot write the output file)
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_VERIFY = 4
EXIT_OUTPUT = 5


class OnnxrepError(Exception):
    """Base class: every error onnxrep raises on purpose carries an exit code."""

    exit_code = EXIT_INTERNAL


class UsageError(OnnxrepError):
    exit_code = EXIT_USAGE


class InputError(OnnxrepError):
    exit_code = EXIT_INPUT


class VerificationError(OnnxrepError):
    """The optimized graph's outputs differ from the original's beyond tolerance."""

    exit_code = EXIT_VERIFY

    def __init__(self, message: str, culprit: str | None = None, max_error: float | None = None):
        super().__init__(message)
        self.culprit = culprit
        self.max_error = max_error


class OutputError(OnnxrepError):
    exit_code = EXIT_OUTPUT
