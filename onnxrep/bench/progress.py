"""A one-line progress bar on stderr, drawn only when stderr is a terminal."""
from __future__ import annotations

import sys


class Progress:
    """update(done, total, label) redraws the bar; close() erases it."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.width = 0

    @classmethod
    def for_stderr(cls):
        try:
            return cls() if sys.stderr.isatty() else None
        except (AttributeError, ValueError):
            return None

    def update(self, done: int, total: int, label: str = "") -> None:
        frac = min(max(done / total if total else 1.0, 0.0), 1.0)
        n = 24
        fill = int(frac * n)
        text = f"\r[{'#' * fill}{'.' * (n - fill)}] {frac * 100:3.0f}% {label}"[:100]
        pad = max(0, self.width - len(text))
        self.width = len(text)
        self.stream.write(text + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        if self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0
