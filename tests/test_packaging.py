"""Packaging: ``qwamos --version`` names what is really loaded, the dependency lock pins and hashes everything
CI installs, and the wheel and sdist carry the package and its entry point.

The lock test reads requirements/ci.lock as pip does (one ``name==version`` per requirement, each followed by
``--hash=sha256:`` lines), so that a dependency added to pyproject.toml without ``make lock`` fails here rather
than being fetched unpinned by some later install.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import qwamos

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "ci.lock"
BUILD_IN = ROOT / "requirements" / "build.in"


def _qwamos(*argv: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "qwamos.cli.main", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


# --- --version ------------------------------------------------------------------------------------------


def test_version_reports_package_crypto_and_openssl():
    proc = _qwamos("--version")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"qwamos {importlib.metadata.version('qwamos')}"
    # The crypto library's installed version (its distribution metadata, independent of qwamos.crypto).
    assert lines[1] == f"cryptography {importlib.metadata.version('cryptography')}"
    assert re.fullmatch(r"OpenSSL \d+\.\d+\.\d+\S* .+", lines[2]), lines[2]
    # make venv builds the C extension (and insists on it), so here the runs are native
    assert re.fullmatch(r"block runs native \(OpenSSL \d+\.\d+\.\d+\S* .+\)", lines[3]), lines[3]
    assert len(lines) == 4
    proc = _qwamos("--version", env_extra={"QWAMOS_AEAD_RUNS": "python"})
    assert proc.stdout.splitlines()[3] == "block runs python"


def test_package_version_matches_distribution_metadata():
    assert qwamos.__version__ == importlib.metadata.version("qwamos")


# --- the lock ---------------------------------------------------------------------------------------------


def _parse_lock() -> dict[str, tuple[str, list[str]]]:
    """name -> (pinned version, its hashes), from the lock's logical lines (``\\`` continuations joined)."""
    text = LOCK.read_text(encoding="utf-8")
    logical = re.sub(r"\\\n", " ", text)
    pins: dict[str, tuple[str, list[str]]] = {}
    for line in logical.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        head = line.split(" --hash=", 1)[0]
        req = Requirement(head.replace(" ;", ";"))
        (spec,) = req.specifier
        assert spec.operator == "==", f"{req} is not pinned with =="
        hashes = re.findall(r"--hash=(\S+)", line)
        pins[canonicalize_name(req.name)] = (spec.version, hashes)
    return pins


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    for line in BUILD_IN.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            reqs.append(line)
    return [Requirement(r) for r in reqs]


def test_lock_pins_every_declared_dependency_with_hashes():
    pins = _parse_lock()
    assert pins, "empty lock"
    for name, (version, hashes) in pins.items():
        assert hashes, f"{name}=={version} has no --hash"
        assert all(h.startswith("sha256:") and len(h) == 7 + 64 for h in hashes), (name, hashes)
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is declared but not in {LOCK.name}: run `make lock`"
        assert req.specifier.contains(pins[name][0], prereleases=True), (
            f"{req} is declared but the lock pins {pins[name][0]}: run `make lock`"
        )


def test_lock_covers_every_supported_python():
    """--universal: one lock for 3.11-3.13, so no pin is conditional on a Python version we test."""
    text = LOCK.read_text(encoding="utf-8")
    assert "python_full_version" not in text and "python_version" not in text
    assert "--universal" in (ROOT / "Makefile").read_text(encoding="utf-8")


def test_runtime_dependencies_installed_are_the_locked_ones():
    """The venv running the suite was built from the lock (``make venv``), not from whatever PyPI served."""
    pins = _parse_lock()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for dep in project["dependencies"]:
        name = canonicalize_name(Requirement(dep).name)
        installed = importlib.metadata.version(name)
        assert installed == pins[name][0], f"{name} {installed} installed, lock pins {pins[name][0]}: make venv"


# --- wheel and sdist ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    """An sdist, and a wheel built FROM that sdist (``python -m build``'s default), so the wheel proves the
    sdist is complete.  ``--no-isolation``: the build backend is the locked one in this venv."""
    pytest.importorskip("build", reason="the `build` package is not in this venv (make venv installs the lock)")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("qwamos-*.whl")
    (sdist,) = out.glob("qwamos-*.tar.gz")
    return wheel, sdist


def test_wheel_holds_the_package_and_the_entry_point(dists):
    wheel, _ = dists
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for module in ("qwamos/__init__.py", "qwamos/crypto.py", "qwamos/cli/main.py", "qwamos/nbd/server.py"):
            assert module in names, module
        assert "pqc_keystore.py" in names and "pqc_volume.py" in names
        assert "qwamos/_aead_runs.abi3.so" in names  # the C extension, for Python's stable ABI (3.11 and later)
        meta_dir = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = z.read(f"{meta_dir}/entry_points.txt").decode()
        metadata = z.read(f"{meta_dir}/METADATA").decode()
    assert re.search(r"^\[console_scripts\]\nqwamos = qwamos\.cli\.main:run$", entry_points, re.M), entry_points
    assert re.search(r"^Requires-Dist: cryptography", metadata, re.M)


# Where the wheel's data files land under the environment's prefix (pip into a venv; pipx >= 1.4 then links
# the man page into ~/.local/share/man), and a word each must hold.
WHEEL_SHARE = {
    "share/man/man1/qwamos.1": ".TH QWAMOS",
    "share/bash-completion/completions/qwamos": "_shtab_qwamos",
    "share/zsh/site-functions/_qwamos": "#compdef qwamos",
}


def test_wheel_ships_man_page_and_completions(dists):
    """Generated from the parser at build time (setup.py), so every command is in them."""
    wheel, _ = dists
    with zipfile.ZipFile(wheel) as z:
        data = {n.split(".data/data/", 1)[1]: n for n in z.namelist() if ".data/data/" in n}
        assert set(WHEEL_SHARE) <= set(data), sorted(data)
        for path, marker in WHEEL_SHARE.items():
            text = z.read(data[path]).decode()
            assert marker in text, path
            assert "domxml" in text and "autostart" in text and "completion" in text, path


def test_wheel_in_a_venv_puts_shell_files_under_share(dists, tmp_path):
    """A real install of the wheel into a throw-away venv (what pipx does): the files are under its share/."""
    wheel, _ = dists
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin/python"),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    for path, marker in WHEEL_SHARE.items():
        installed = venv / path
        assert installed.is_file(), path
        assert marker in installed.read_text(encoding="utf-8"), path


def test_sdist_holds_sources_and_build_config(dists):
    _, sdist = dists
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for path in ("pyproject.toml", "README.md", "src/qwamos/crypto.py", "src/qwamos/cli/main.py"):
        assert path in names, path


def test_installed_wheel_runs_qwamos(dists, tmp_path):
    """The wheel's own files (not this tree's editable install) give a working ``qwamos`` command."""
    wheel, _ = dists
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), wheel],
        check=True,
        capture_output=True,
        timeout=120,
    )
    script = target / "bin" / "qwamos"
    assert script.is_file()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target)}
    argv = [sys.executable, str(script), "--version"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"qwamos {qwamos.__version__}\n")
    where = subprocess.run(
        [sys.executable, "-c", "import qwamos; print(qwamos.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    assert where.stdout.strip().startswith(str(target))


def test_an_install_without_a_c_compiler_falls_back_to_the_python_loop(dists, tmp_path):
    """pip on a machine without gcc (or without the OpenSSL headers) still installs a working qwamos: the C
    extension is optional, and the crypto module then opens and seals runs of blocks in Python."""
    _, sdist = dists
    target = tmp_path / "site"
    env = {**os.environ, "CC": "/bin/false", "LDSHARED": "/bin/false"}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
         "--target", str(target), str(sdist)],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not list(target.glob("qwamos/_aead_runs*.so"))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target)}
    code = "from qwamos import crypto, __file__ as f; print(crypto.runs_implementation(), f)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=True
    )
    implementation, where = out.stdout.split()
    assert implementation == "python" and where.startswith(str(target))
