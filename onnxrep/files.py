"""Atomic writes of the small files onnxrep produces (JSON reports, plots).

A file appears complete or not at all: it is written to a temporary file beside the destination
and moved into place with os.replace. The temporary file is created by mkstemp, which makes it
0600; it is given the mode a plain `open(path, "w")` would have given it (0o666 minus the process
umask) before it is moved, so a report is as readable as the model written beside it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import OutputError


def process_umask() -> int:
    """The process umask. Read from /proc where it exists, since the portable way (set it and set
    it back) changes it for other threads for an instant."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def creation_mode() -> int:
    """The permission bits of a newly created regular file: 0o666 & ~umask."""
    return 0o666 & ~process_umask()


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path) on a temporary file beside `path`, then move it into place.

    OutputError (one line) when the directory or the file cannot be written; whatever `write`
    raises leaves nothing behind."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".onnxrep-", suffix=target.suffix, dir=parent)
    except OSError as e:
        raise OutputError(f"cannot write {target}: {e.strerror or e}") from e
    try:
        try:
            os.fchmod(fd, creation_mode())
        finally:
            os.close(fd)
        write(tmp)
        os.replace(tmp, target)
    except OSError as e:
        raise OutputError(f"cannot write {target}: {e.strerror or e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return write_atomic(path, write)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return write_bytes_atomic(path, text.encode(encoding))
