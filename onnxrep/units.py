"""Human-readable counts and sizes, shared by the optimize report, bench and the tools."""
from __future__ import annotations


def count(v) -> str:
    """1234567 → '1.23M'; None → '?'."""
    if v is None:
        return "?"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return str(v)


def nbytes(v) -> str:
    """1536 → '1.50 KB' (binary units); None → '?'."""
    if v is None:
        return "?"
    for unit, div in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if v >= div:
            return f"{v / div:.2f} {unit}"
    return f"{v} B"
