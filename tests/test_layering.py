"""The layering rules, checked (docs/design.md):

* a module never imports a layer above it;
* only ``qwamos.crypto`` touches the crypto library (or its own C extension ``qwamos._aead_runs``) or draws
  randomness: no ``secrets``, ``random``,
  ``os.urandom``/``os.getrandom`` elsewhere, and no use of crypto's generic random function outside it —
  callers use the named draws (``new_volume_key``, ``new_nonce``, ``new_uuid``, ...);
* the NBD protocol module stays sans-IO: no ``asyncio``, ``socket``, ``selectors``.

Each checker is a function of (module path, source text), and each is shown to fail on a planted violation
(the ``test_checker_*`` tests), so a rule cannot silently stop checking anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "qwamos"

# Lowest first.  A module may import its own layer and any layer listed before it.
LAYERS = [
    ("errors", "fsutil", "strictjson", "pidfile", "nodump", "logs"),
    ("crypto", "blockdev"),
    ("storage",),
    ("volume",),
    ("keystore",),
    ("nbd",),
    ("hypervisor",),
    ("migrate",),
    ("backup",),
    ("cli",),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
# Compiled modules, which have no .py file to be checked themselves, and the layer each belongs to.
EXTENSIONS = {"_aead_runs": "crypto"}

CRYPTO = "crypto.py"
RANDOM_MODULES = ("secrets", "random")
OS_RANDOM = ("urandom", "getrandom")
CRYPTO_GENERIC_RANDOM = ("random_bytes", "_random_bytes")
_NO_IO = ("asyncio", "socket", "selectors", "select")
SANS_IO = {"nbd/protocol.py": _NO_IO, "nbd/control_protocol.py": _NO_IO}


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent != SRC)


def _rel(path: Path) -> str:
    return str(path.relative_to(SRC))


def _imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
    """(module, names imported from it) for every absolute import anywhere in the module (lazy ones too)."""
    out: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
    return out


def own_layer(rel: str) -> str:
    return rel.split("/")[0].removesuffix(".py")


# --- the checkers: (relative path, source) -> list of violations ----------------------------------------


def layer_violations(rel: str, source: str) -> list[str]:
    own = own_layer(rel)
    if own not in RANK:
        return [f"{rel}: module not assigned to a layer in this test"]
    found = []
    for name, names in _imports(ast.parse(source)):
        targets = [name] if name != "qwamos" else [f"qwamos.{n}" for n in names if not n.startswith("__")]
        for target in targets:
            if not target.startswith("qwamos."):
                continue
            layer = target.split(".")[1]
            layer = EXTENSIONS.get(layer, layer)
            if RANK.get(layer, len(LAYERS)) > RANK[own]:
                found.append(f"{rel} imports {target} (layer {layer} is above {own})")
    return found


def randomness_violations(rel: str, source: str) -> list[str]:
    if rel == CRYPTO:
        return []
    found = []
    tree = ast.parse(source)
    for name, names in _imports(tree):
        root = name.split(".")[0]
        if root == "cryptography":
            found.append(f"{rel} imports {name}")
        if name == "qwamos._aead_runs" or (name == "qwamos" and "_aead_runs" in names):
            found.append(f"{rel} imports the C extension of qwamos.crypto (go through crypto.Aead)")
        if root in RANDOM_MODULES:
            found.append(f"{rel} imports {name} (randomness comes from qwamos.crypto)")
        if name == "os" and set(names) & set(OS_RANDOM):
            found.append(f"{rel} imports os.{sorted(set(names) & set(OS_RANDOM))[0]}")
        if name in ("qwamos.crypto", "qwamos") and set(names) & set(CRYPTO_GENERIC_RANDOM):
            found.append(f"{rel} imports crypto's generic random function")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if node.attr in OS_RANDOM:
                found.append(f"{rel} calls os.{node.attr} (line {node.lineno})")
            if node.attr in CRYPTO_GENERIC_RANDOM:
                found.append(f"{rel} uses crypto.{node.attr} (line {node.lineno}); use a named draw")
    return found


def sans_io_violations(rel: str, source: str) -> list[str]:
    banned = SANS_IO.get(rel, ())
    return [
        f"{rel} imports {name} (the protocol is sans-IO)"
        for name, _ in _imports(ast.parse(source))
        if name.split(".")[0] in banned
    ]


# --- the rules over the tree ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", _modules(), ids=_rel)
def test_no_import_from_a_higher_layer(path):
    assert layer_violations(_rel(path), path.read_text()) == []


@pytest.mark.parametrize("path", _modules(), ids=_rel)
def test_only_the_crypto_module_touches_primitives_and_randomness(path):
    assert randomness_violations(_rel(path), path.read_text()) == []


@pytest.mark.parametrize("rel", sorted(SANS_IO))
def test_the_nbd_protocol_is_sans_io(rel):
    path = SRC / rel
    assert path.is_file(), f"{rel} moved: update SANS_IO"
    assert sans_io_violations(rel, path.read_text()) == []


def test_every_layer_exists():
    present = {own_layer(_rel(p)) for p in _modules()}
    assert present == set(RANK), f"layers without modules or modules without a layer: {present ^ set(RANK)}"


# --- each checker fails on a planted violation ----------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "source"),
    [
        ("volume/x.py", "from qwamos.keystore import PQCKeystore\n"),
        ("nbd/x.py", "def f():\n    import qwamos.hypervisor.manager\n"),  # a lazy import counts too
        ("hypervisor/x.py", "from qwamos.migrate import run\n"),  # migration is above the hypervisor
        ("hypervisor/x.py", "from qwamos import migrate\n"),
        ("pidfile.py", "from qwamos.crypto import sha256\n"),
        ("newlayer/x.py", "x = 1\n"),
    ],
)
def test_checker_catches_a_layer_violation(rel, source):
    assert layer_violations(rel, source)


def test_checker_allows_same_and_lower_layers():
    assert layer_violations("migrate/x.py", "from qwamos.hypervisor import tools\nimport qwamos.errors\n") == []
    assert layer_violations("cli/x.py", "from qwamos.migrate import run\n") == []


@pytest.mark.parametrize(
    "source",
    [
        "import secrets\n",
        "from secrets import token_bytes\n",
        "import random\n",
        "import os\nx = os.urandom(16)\n",
        "from os import urandom\n",
        "import os\nx = os.getrandom(16)\n",
        "from qwamos import crypto\nx = crypto.random_bytes(16)\n",
        "from qwamos.crypto import random_bytes\n",
        "from qwamos import crypto\nx = crypto._random_bytes(16)\n",
        "from cryptography.hazmat.primitives.ciphers.aead import AESGCM\n",
        "from qwamos import _aead_runs\n",
        "import qwamos._aead_runs\n",
    ],
)
def test_checker_catches_randomness_outside_crypto(source):
    assert randomness_violations("volume/x.py", source)
    assert randomness_violations(CRYPTO, source) == []  # the crypto module itself may


def test_checker_allows_named_draws():
    src = "from qwamos import crypto\nk = crypto.new_volume_key()\nu = crypto.new_uuid()\n"
    assert randomness_violations("volume/x.py", src) == []


@pytest.mark.parametrize("source", ["import asyncio\n", "import socket\n", "from selectors import X\n"])
def test_checker_catches_io_in_the_protocol(source):
    assert sans_io_violations("nbd/protocol.py", source)
    assert sans_io_violations("nbd/control_protocol.py", source)
    assert sans_io_violations("nbd/server.py", source) == []
