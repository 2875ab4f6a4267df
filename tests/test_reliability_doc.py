"""docs/reliability.md's fault table: every row names tests, and every named test exists."""

from __future__ import annotations

import ast
import re

from conftest import REPO_ROOT


def _rows() -> list[str]:
    text = (REPO_ROOT / "docs/reliability.md").read_text()
    table = text.split("## Fault table", 1)[1]
    return [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| fault")]


def test_every_fault_row_names_existing_tests():
    rows = _rows()
    assert len(rows) >= 20
    defined: dict[str, set[str]] = {}
    for path in (REPO_ROOT / "tests").glob("test_*.py"):
        tree = ast.parse(path.read_text())
        defined[path.name] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    for row in rows:
        test_cell = row.rstrip(" |").rsplit("|", 1)[-1]
        refs = re.findall(r"`([\w.]*?)(?:::(\w+))?`", test_cell)
        assert refs, f"row without a test: {row[:80]}"
        current = None
        for file, name in refs:
            if file.endswith(".py"):
                current = file
            assert current in defined, f"{row[:60]}: unknown test file {file or current}"
            if name:
                assert name in defined[current], f"{current}::{name} does not exist"
