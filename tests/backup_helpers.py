"""Shared pieces for the backup tests (test_backup, test_backup_compact, test_backup_tamper): the isolated
environment each test runs in, a keystore with cheap Argon2 parameters, a backup made through the API, a
volume's content and a CLI run.

Their fixtures (``backup_env``, ``ks``) are conftest's, so that a test's ``ks`` argument is not a
redefinition of an imported name; a module uses ``pytestmark = pytest.mark.usefixtures("backup_env")``."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwamos.backup import engine
from qwamos.backup.repo import Repository
from qwamos.cli.main import main
from qwamos.keystore import Argon2Params, PQCKeystore
from qwamos.volume import PQCVolume

CHEAP = Argon2Params(memory_kib=8, iterations=1, lanes=1)
MIB = 1 << 20


def content(path: Path, ks: PQCKeystore) -> bytes:
    """Every byte of a volume, read through its key."""
    with PQCVolume(path, keystore=ks, read_only=True) as v:
        return v.read(0, v.size)


def backup_volume(repo_path: Path, vol: Path, ks: PQCKeystore, name: str) -> dict:
    """Back ``vol`` up as archive ``name`` through the API, initialising the repository on first use."""
    if not repo_path.exists():
        Repository.init(repo_path, ks)
    with Repository(repo_path, ks).open(exclusive=True) as repo:
        src = engine.VolumeSource.open(vol, ks)
        try:
            return engine.create(repo, src, name=name)
        finally:
            src.close()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The CLI in-process: exit code, stdout, stderr."""
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err
