"""SECURITY.md names a test for every promise: each one must exist, so a renamed or deleted test is noticed."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_that_security_md_names_exists():
    text = (ROOT / "SECURITY.md").read_text(encoding="utf-8")
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)", text)
    assert len(named) >= 30, "SECURITY.md should list its promises with their tests"
    missing = []
    for file, test in named:
        path = ROOT / file
        functions = (
            {node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)}
            if path.is_file()
            else set()
        )
        if test not in functions:
            missing.append(f"{file}::{test}")
    assert missing == []
