"""The rewrite rules, in the order the engine applies them within a sweep.

A new rule is one module here named after the rule (`rules/<name>.py` defining one `Rule` subclass
whose `name` is `<name>`), one test module `tests/rules/test_<name>.py`, and one line in ORDER.
ORDER is the only place the sweep order is written down; a rule that needs to know whether
another runs after it asks the run (`Context.runs_after`), which follows this order.
"""
from __future__ import annotations

import importlib

from onnxrep.engine import Rule

ORDER = (
    "remove_identities",
    "canonicalize_border_fill",
    "fuse_activations",
    "respell_gelu",
    "fuse_conv_bn",
    "fuse_bn_conv",
    "merge_linear_regions",
    "fold_conv_into_fc",
    "fold_linear_affine",
    "fold_branch_into_slice",
    "fold_attention_scale",
    "remove_dead_channels",
    "rm_residual",
)


def _rule_class(name: str) -> type[Rule]:
    module = importlib.import_module(f"{__name__}.{name}")
    found = [c for c in vars(module).values()
             if isinstance(c, type) and issubclass(c, Rule) and c.__module__ == module.__name__ and c.name == name]
    if len(found) != 1:
        raise ImportError(f"rules/{name}.py must define exactly one Rule subclass named '{name}', found {len(found)}")
    return found[0]


REGISTRY: list[type[Rule]] = [_rule_class(name) for name in ORDER]
