#!/usr/bin/env python
"""The README's two set-up commands, read out of README.md so that CI runs exactly what it says.

    python tools/readme_commands.py quickstart   # prints the install-and-demo command
    python tools/readme_commands.py tests        # prints the install-and-test command

The README's "## Quick start" section holds exactly two fenced code blocks of one line each: the
first installs onnxrep and runs the demo, the second installs the test extra and runs the tests.
.ci/run executes them verbatim; tests/test_readme.py checks their shape. Standard library only.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Quick start"


def commands(text: str) -> dict[str, str]:
    """{'quickstart': ..., 'tests': ...} from the README's Quick start section; ValueError if the
    section is missing or does not hold exactly two one-line code blocks."""
    start = text.find(SECTION + "\n")
    if start < 0:
        raise ValueError(f"README has no '{SECTION}' section")
    body = text[start + len(SECTION):]
    end = re.search(r"^## ", body, flags=re.M)
    body = body[: end.start()] if end else body
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", body, flags=re.M | re.S)
    lines = [[ln for ln in b.splitlines() if ln.strip()] for b in blocks]
    if len(lines) != 2 or any(len(b) != 1 for b in lines):
        raise ValueError(f"'{SECTION}' must hold exactly two one-line code blocks, found {[len(b) for b in lines]}")
    return {"quickstart": lines[0][0].strip(), "tests": lines[1][0].strip()}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("quickstart", "tests"):
        print("usage: readme_commands.py quickstart|tests", file=sys.stderr)
        return 2
    try:
        print(commands(README.read_text(encoding="utf-8"))[argv[0]])
    except ValueError as e:
        print(f"readme_commands: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
