"""The rule contract's bookkeeping: one module per rule, named after it, in ORDER, with a test module."""
from __future__ import annotations

from pathlib import Path

import pytest

from onnxrep.engine import all_rules
from onnxrep.rules import ORDER, REGISTRY, _rule_class

RULES_DIR = Path(__file__).resolve().parents[2] / "rules"
TESTS_DIR = Path(__file__).resolve().parent


def test_every_rule_module_is_registered_once():
    modules = sorted(p.stem for p in RULES_DIR.glob("*.py") if p.stem != "__init__")
    assert sorted(ORDER) == modules
    assert len(set(ORDER)) == len(ORDER)


@pytest.mark.parametrize("name", ORDER)
def test_module_name_is_rule_name_and_documented(name):
    cls = _rule_class(name)
    assert cls.name == name and cls.description
    doc = (RULES_DIR / f"{name}.py").read_text(encoding="utf-8").split('"""')[1]
    assert doc.split(":")[0].split(" ")[0] == name, f"rules/{name}.py docstring must start with '{name}'"
    assert (TESTS_DIR / f"test_{name}.py").is_file()


def test_engine_sees_the_registry_in_order():
    assert [r.name for r in all_rules()] == list(ORDER) == [c.name for c in REGISTRY]


def test_a_module_without_its_rule_is_refused(monkeypatch):
    """A module whose Rule subclass is named differently is an import error, not a silent skip."""
    import sys
    import types

    from onnxrep.engine import Rule

    bogus = types.ModuleType("onnxrep.rules.bogus_rule")
    bogus.Misnamed = type("Misnamed", (Rule,), {"name": "other_name", "__module__": bogus.__name__})
    monkeypatch.setitem(sys.modules, bogus.__name__, bogus)
    with pytest.raises(ImportError, match="exactly one Rule subclass"):
        _rule_class("bogus_rule")
