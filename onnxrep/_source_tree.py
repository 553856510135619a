"""Make `onnxrep.rules` importable from a source checkout exactly as from an install.

The rules live in the top-level `rules/` folder (the design card's layout) and setup.cfg installs
them as the subpackage `onnxrep.rules` (package_dir), so no top-level `rules` module lands in
site-packages. In a checkout, though, `onnxrep/` has no `rules/` inside it, and `python -m onnxrep`
run from the clone root imports that source `onnxrep/` first (the current directory leads
sys.path), installed or not.

A finder at the front of sys.meta_path answers for `onnxrep.rules` only, and only when this
`onnxrep` package has no `rules/` of its own: it loads the `rules/` beside it, the one belonging to
the very source tree this package was imported from (an editable install's own finder would point
at the tree that was installed, which in a second worktree is the wrong one). An installed package
has `onnxrep/rules/`, so there the finder is not even registered. Submodules then resolve through
`onnxrep.rules.__path__` with Python's ordinary machinery.

Chosen over a symlink (not portable, and copied twice into a wheel) and over adding the checkout
root to `onnxrep.__path__` (which would make `onnxrep.tests`, `onnxrep.tools`, ... importable).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_RULES = _PACKAGE.parent / "rules"
NAME = __package__ + ".rules"


class _SourceTreeRules(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != NAME:
            return None
        return importlib.util.spec_from_file_location(
            fullname, _RULES / "__init__.py", submodule_search_locations=[str(_RULES)])


def _install() -> None:
    if (_PACKAGE / "rules").is_dir() or not (_RULES / "__init__.py").is_file():
        return  # installed layout, or a tree without rules: nothing to add
    if not any(isinstance(f, _SourceTreeRules) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceTreeRules())


_install()
