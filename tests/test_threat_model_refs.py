"""docs/threat-model.md names, for every "cannot", the test that performs the attack: each named test exists.

A reference is `` `tests/test_x.py::test_name` ``; a following `` `::test_other` `` means the same file.  A
renamed or deleted test would otherwise leave the threat model pointing at nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REF = re.compile(r"`(tests/test_[\w]+\.py)?::(test_\w+)(?:\[[^`]*\])?`")


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_test_the_threat_model_names_exists() -> None:
    text = (REPO / "docs" / "threat-model.md").read_text()
    current: str | None = None
    refs: list[tuple[str, str]] = []
    for m in REF.finditer(text):
        current = m.group(1) or current
        assert current is not None, f"`::{m.group(2)}` names no file before it"
        refs.append((current, m.group(2)))
    assert len(refs) >= 40, "the threat model should name the tests that perform its attacks"
    cache: dict[str, set[str]] = {}
    missing = []
    for file, name in refs:
        if file not in cache:
            path = REPO / file
            cache[file] = _tests_in(path) if path.exists() else set()
        if name not in cache[file]:
            missing.append(f"{file}::{name}")
    assert not missing, f"docs/threat-model.md names tests that do not exist: {missing}"
