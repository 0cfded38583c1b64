"""Fixtures every test module may use, and the one in-memory key provider.

* :class:`MemoryKeys` — a ``KeyProvider`` (``qwamos.volume.KeyProvider``) holding keys in a dict, for tests
  of everything that needs volume keys but not the real keystore (which has its own tests).  Subclass it to
  misbehave (``from conftest import MemoryKeys``).
* ``keys`` — a fresh :class:`MemoryKeys`.
* ``short_dir`` — a private directory directly under /tmp, for UNIX sockets (``tmp_path`` can exceed the
  107-byte socket path limit); removed afterwards.
* ``no_ambient_env`` — ``QWAMOS_PASSPHRASE``, ``QWAMOS_KEYSTORE`` and ``QWAMOS_ROOT`` unset, so that the
  developer's own settings never leak into a test.
* ``crasher`` — a :class:`crash_helpers.Crasher` for kill tests (kill -9 before the n-th chosen os call, in a
  child forked by a fresh single-threaded interpreter); its server is ended after the test.
* ``aead_runs`` — parametrized ``native`` / ``python``: the test runs once with each implementation of the
  crypto module's record runs (the C extension, and the Python loop it stands in for); see
  tests/test_crypto_runs.py.  ``native`` skips, saying so, only where the extension is not built.
* ``no_process_outlives_the_session`` (session, autouse) — fails the run loudly, and kills them, if processes
  the session started (QEMU, exports, daemons, qemu-nbd) are still alive at its end (tests/processes.py).
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import crash_helpers
import processes
from qwamos.errors import KeyNotFoundError

if TYPE_CHECKING:
    from qwamos.keystore import PQCKeystore


class MemoryKeys:
    """A KeyProvider holding keys in a dict.  Key ids are ``vm-<vm>-<n>`` and keys are derived from ``seed``
    and the counter, so runs are repeatable; two providers with different seeds never share a key."""

    def __init__(self, seed: bytes = b"test") -> None:
        self.keys: dict[str, bytes] = {}
        self.discarded: list[str] = []
        self._seed = seed
        self._n = 0

    def new_volume_key(self, vm_name: str, volume_name: str) -> tuple[str, bytes]:
        self._n += 1
        key_id = f"vm-{vm_name or volume_name or 'x'}-{self._n:04d}"
        self.keys[key_id] = hashlib.sha256(self._seed + str(self._n).encode()).digest()
        return key_id, self.keys[key_id]

    def volume_key(self, key_id: str) -> bytes:
        try:
            return self.keys[key_id]
        except KeyError:
            raise KeyNotFoundError(key_id=key_id, keystore="<memory>") from None

    def discard_key(self, key_id: str) -> None:
        """Undo a failed create (the KeyProvider contract)."""
        self.discarded.append(key_id)
        self.keys.pop(key_id, None)

    def delete_key(self, key_id: str) -> None:
        """What migration calls for a key it no longer needs (the keystore's ``delete_key``)."""
        self.keys.pop(key_id, None)


@pytest.fixture
def keys() -> MemoryKeys:
    return MemoryKeys()


@pytest.fixture(params=["native", "python"])
def aead_runs(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    from qwamos import crypto

    if request.param == "python":
        monkeypatch.setenv("QWAMOS_AEAD_RUNS", "python")
        assert crypto.runs_implementation() == "python"
    else:
        monkeypatch.delenv("QWAMOS_AEAD_RUNS", raising=False)
        if crypto.runs_implementation() == "python":
            pytest.skip("qwamos._aead_runs is not built here (make venv builds it: C compiler, OpenSSL headers)")
    return request.param


@pytest.fixture
def qvol(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """A new encrypted volume and its keystore, ``(tmp_path/disk.qvol, tmp_path/keystore)``, of the test
    module's ``SIZE`` (64 MiB if it has none)."""
    from qwamos.keystore import PQCKeystore
    from qwamos.volume import PQCVolume

    ks = tmp_path / "keystore"
    vol = tmp_path / "disk.qvol"
    size = getattr(request.module, "SIZE", 64 << 20)
    PQCVolume(vol, keystore=PQCKeystore(ks)).create("disk", "vm", size_bytes=size)
    return vol, ks


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A VM root ``tmp_path/root`` (not created) with the keystore beside it and no ambient passphrase or
    root from the environment.  (Modules that need another kind of root define their own ``root``.)"""
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(tmp_path / "keystore"))
    monkeypatch.delenv("QWAMOS_PASSPHRASE", raising=False)
    monkeypatch.delenv("QWAMOS_ROOT", raising=False)
    return tmp_path / "root"


@pytest.fixture
def backup_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No ambient passphrase; the keystore and the backup state (file caches) under the test's directory."""
    monkeypatch.delenv("QWAMOS_PASSPHRASE", raising=False)
    monkeypatch.delenv("QWAMOS_RECOVERY_PASSPHRASE", raising=False)
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(tmp_path / "ks"))
    monkeypatch.setenv("QWAMOS_BACKUP_STATE", str(tmp_path / "state"))
    return tmp_path


@pytest.fixture
def ks(tmp_path: Path) -> PQCKeystore:
    """The keystore the CLI finds through $QWAMOS_KEYSTORE (backup_env), with cheap Argon2 parameters."""
    from backup_helpers import CHEAP
    from qwamos.keystore import PQCKeystore

    return PQCKeystore(tmp_path / "ks", argon2_params=CHEAP)


@pytest.fixture
def idle_kernel(tmp_path: Path) -> Path:
    """An aarch64 'kernel' that waits for interrupts forever (``wfi; b .``): the VM runs, idles, and costs
    no CPU."""
    k = tmp_path / "idle.bin"
    k.write_bytes(struct.pack("<II", 0xD503207F, 0x17FFFFFF) + bytes(4088))
    return k


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="qw", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def no_ambient_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("QWAMOS_PASSPHRASE", "QWAMOS_KEYSTORE", "QWAMOS_ROOT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def crasher() -> Iterator[crash_helpers.Crasher]:
    c = crash_helpers.Crasher()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fail loudly if a process the session started (QEMU, an export, a daemon, qemu-nbd) is still alive at
    the end, and kill it: a test that fails must still clean up what it started (tests/processes.py)."""
    marker = processes.mark_session()
    base = tmp_path_factory.getbasetemp()
    yield
    left = processes.wait_gone(marker, [base], grace=15)
    if left:
        processes.kill_all(left)
        listing = "\n".join(f"  pid {p.pid}: {p.cmdline[:300]}" for p in left)
        pytest.fail(
            f"{len(left)} process(es) started by this test session were still running (now killed):\n{listing}"
        )


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[object]:
    """The one-node test Ceph cluster (tests/ceph_helpers.py): started on first use, stopped at the end."""
    import ceph_helpers

    yield from ceph_helpers.start_cluster()
