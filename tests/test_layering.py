"""The layering rule, checked: a module never imports a layer above it, and only ``qwamos.crypto`` touches
the crypto library or the OS random source (docs/design.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "qwamos"

# Lowest first.  A module may import its own layer and any layer listed before it.
LAYERS = [
    ("errors", "fsutil", "strictjson", "pidfile"),
    ("crypto", "blockdev"),
    ("storage",),
    ("volume",),
    ("keystore",),
    ("nbd",),
    ("hypervisor", "migrate"),
    ("cli",),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _layer(module: str) -> str:
    return module.split(".")[1] if module.startswith("qwamos.") else module


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent != SRC)


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _own_layer(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_import_from_a_higher_layer(path):
    own = _own_layer(path)
    assert own in RANK, f"{path}: module not assigned to a layer in this test"
    for name in _imports(path):
        if not name.startswith("qwamos.") and name != "qwamos":
            continue
        if name == "qwamos":
            continue
        target = _layer(name)
        assert RANK[target] <= RANK[own], f"{path.relative_to(SRC)} imports {name} (layer {target} is above {own})"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_only_the_crypto_module_touches_primitives(path):
    if path == SRC / "crypto.py":
        return
    text = path.read_text()
    for name in _imports(path):
        assert not name.startswith("cryptography"), f"{path.relative_to(SRC)} imports {name}"
    assert "os.urandom" not in text, f"{path.relative_to(SRC)} calls os.urandom"
