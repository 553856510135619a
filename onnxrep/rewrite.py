"""The record of one rewrite, shared by the engine (which collects them) and the graph-building
helpers rules use (linear.replace_with_conv returns one): kept apart so those helpers need not
import the engine."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Rewrite:
    rule: str  # filled in by the engine
    replaced: list[str]  # names of the nodes the rewrite removed
    created: list[str]  # names of the nodes it made
    detail: str = ""
