"""README.md is a user's guide that stays true: its two set-up commands (the ones CI runs), its
rules table, its CLI flags, its length."""
from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from onnxrep.cli import build_parser, rules_markdown
from onnxrep.engine import all_rules
from tools.readme_commands import README, commands

ROOT = README.parent
TEXT = README.read_text(encoding="utf-8")


def _clean_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # run as a user would: no test-runner path tricks
    return env


def test_quick_start_commands_are_a_plain_install():
    """The two commands: a non-editable install of the package, then the demo; the test extra,
    then pytest. (CI runs them verbatim, in a fresh venv.)"""
    cmds = commands(TEXT)
    assert re.fullmatch(r"python -m pip install \. && python -m onnxrep demo", cmds["quickstart"])
    assert re.fullmatch(r'python -m pip install "\.\[test\]" && python -m pytest -q', cmds["tests"])


def test_commands_parser_rejects_a_broken_section():
    """A Quick start section without exactly two one-line blocks is an error, not a guess."""
    with pytest.raises(ValueError):
        commands("# x\n\n## Quick start\n\n```\na\nb\n```\n")
    with pytest.raises(ValueError):
        commands("# x\n\n## Usage\n")


def test_ci_runs_the_readme_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "tools/readme_commands.py quickstart" in ci and "tools/readme_commands.py tests" in ci
    assert "venv" in ci and "-e " not in ci


def test_demo_from_the_clone_root():
    """`python -m onnxrep demo` from the clone root imports the source tree, rules included."""
    out = subprocess.run([sys.executable, "-m", "onnxrep", "demo"], cwd=ROOT, env=_clean_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^demo: 45 -> 15 nodes, verified \(max relative error [0-9.e+-]+\)$", out.stdout, re.M), out.stdout


def test_demo_from_another_directory(tmp_path):
    """Installed (as CI installs it), the module runs from anywhere."""
    probe = subprocess.run([sys.executable, "-c", "import onnxrep"], cwd=tmp_path, env=_clean_env(),
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("onnxrep is not installed in this environment (CI installs it)")
    out = subprocess.run([sys.executable, "-m", "onnxrep", "demo"], cwd=tmp_path, env=_clean_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "demo: 45 -> 15 nodes, verified" in out.stdout


def test_rules_table_matches_the_registry():
    section = TEXT[TEXT.index("\n## Rules\n"):]
    section = section[: section.index("\n## ", 1)]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    assert table == rules_markdown(all_rules())


def test_every_optimize_flag_is_documented():
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    flags = [s for a in sub.choices["optimize"]._actions for s in a.option_strings
             if s.startswith("--") and s not in ("--help",)]
    missing = [f for f in flags if f"`{f}" not in TEXT and f" {f}" not in TEXT]
    assert not missing, f"README does not mention {missing}"


def test_test_extra_is_named_in_full():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extra = [re.split(r"[<>=!\[ ]", line.strip())[0] for line in cfg["options.extras_require"]["test"].splitlines()
             if line.strip()]
    section = TEXT[TEXT.index("## Quick start"): TEXT.index("## How it works")]
    assert extra and all(pkg in section for pkg in extra), (extra, section)


def test_readme_is_a_guide_not_a_lab_notebook():
    assert len(TEXT.splitlines()) <= 200
    for doc in re.findall(r"\]\((docs/[^)#]+)", TEXT):
        assert (ROOT / doc).is_file(), doc
