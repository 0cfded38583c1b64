"""No secret lives in a long-running process (issue 10, item 6), shown by performing the attacks.

A VM is started from a *sealed* keystore with ``QWAMOS_PASSPHRASE`` set, as a careless user or an old unit
file would.  Then, as an attacker with the victim's uid:

* ``/proc/<pid>/environ`` and ``cmdline`` of the supervisor, the block export and QEMU are read (with full
  privileges, so nothing hides them): neither the passphrase, nor its variable's name, nor the volume key
  (raw or hex) appears in any of them;
* the same files are read as a same-uid process *without* capabilities (what another process of the user
  is): the key-holding supervisor and export refuse (non-dumpable), while QEMU — which holds no key and stays
  dumpable — is readable, proving the attack itself works;
* QEMU's, the supervisor's and the export's open descriptors are listed: none is the key pipe.

Also: ``--passphrase-fd`` for ``vm start``, systemd credentials (``$CREDENTIALS_DIRECTORY``), a 0600
``--passphrase-file`` (a group/other-readable one is refused), and ``volume serve`` (its environment after
it has handed the key to the export program it becomes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import processes
from nbd_helpers import wait_answers
from qwamos.hypervisor.manager import VMManager
from qwamos.hypervisor.process import read_pidfile
from qwamos.keystore import Argon2Params, PQCKeystore
from vm_helpers import write_config

PASSPHRASE = b"correct horse battery staple 4711"
CHEAP = Argon2Params(memory_kib=8, iterations=1, lanes=1)
QWAMOS = [sys.executable, "-m", "qwamos.cli.main"]
# A process of the same uid without capabilities: what "another process of this user" can do.  As root the
# test drops every capability (setpriv); the VM is started the same way, so that the two are peers.
NO_CAPS = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"] if os.geteuid() == 0 else []

needs_setpriv = pytest.mark.skipif(
    os.geteuid() == 0 and shutil.which("setpriv") is None, reason="setpriv (util-linux) is needed as root"
)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A sealed keystore and a VM root; the environment a user would run ``qwamos`` with (passphrase unset)."""
    ks = tmp_path / "ks"
    PQCKeystore(ks, passphrase=PASSPHRASE, argon2_params=CHEAP).init_identity()
    for name in ("QWAMOS_PASSPHRASE", "QWAMOS_ROOT", "QWAMOS_KEYSTORE", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QWAMOS_KEYSTORE", str(ks))
    monkeypatch.setenv("QWAMOS_ROOT", str(tmp_path / "root"))
    return {k: v for k, v in os.environ.items()}


@pytest.fixture
def vm(env: dict[str, str], idle_kernel: Path, tmp_path: Path):
    """An encrypted VM "vm1" (its volume is created on first start); stopped afterwards whatever happens."""
    root = tmp_path / "root"
    write_config(root, "vm1", kernel=idle_kernel, encrypted=True)
    yield root
    mgr = VMManager(root)
    if mgr.status("vm1").state != "stopped":
        mgr.stop("vm1", force=True)


def qwamos(args: list[str], env: dict[str, str], *, prefix: list[str] | None = None, **kw):
    return subprocess.run(
        [*(prefix or []), *QWAMOS, *args],
        env=env,
        capture_output=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        **kw,
    )


def pids(root: Path) -> dict[str, int]:
    run = VMManager(root).run_dir("vm1").path
    refs = {name: read_pidfile(run / f"{name}.pid") for name in ("supervisor", "export", "qemu")}
    assert all(refs.values()), refs
    return {name: ref.pid for name, ref in refs.items()}


def volume_key(root: Path, ks: Path) -> bytes:
    from qwamos.hypervisor.config import VMConfig

    cfg = VMConfig.load(root / "vms" / "vm1" / "config.yaml")
    return PQCKeystore(ks, passphrase=PASSPHRASE).volume_key(cfg.key_id)


def read_as_peer(path: str) -> subprocess.CompletedProcess[bytes]:
    """``cat path`` as a same-uid process without capabilities."""
    return subprocess.run([*NO_CAPS, "cat", path], capture_output=True, timeout=30)


def fd_targets(pid: int) -> list[str]:
    d = Path(f"/proc/{pid}/fd")
    out = []
    for fd in d.iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            out.append(os.readlink(fd))
    return out


@pytest.mark.qemu
@needs_setpriv
def test_passphrase_and_key_are_in_no_vm_process_and_key_holders_are_not_dumpable(vm, env, tmp_path):
    root, ks = vm, tmp_path / "ks"
    start_env = dict(env, QWAMOS_PASSPHRASE=PASSPHRASE.decode())
    res = qwamos(["vm", "start", "vm1"], start_env, prefix=NO_CAPS)
    assert res.returncode == 0, res.stderr.decode()
    running = pids(root)
    key = volume_key(root, ks)
    secrets = [PASSPHRASE, b"QWAMOS_PASSPHRASE", key, key.hex().encode(), key.hex().upper().encode()]
    for name, pid in running.items():
        for what in ("environ", "cmdline"):
            data = Path(f"/proc/{pid}/{what}").read_bytes()  # full privileges: nothing is hidden from us
            assert data, f"{name}: /proc/{pid}/{what} is empty (process gone?)"
            for s in secrets:
                assert s not in data, f"the {name}'s {what} holds {s[:12]!r}..."
    # The key holders refuse a peer; QEMU holds no key, stays dumpable, and so shows the attack works.
    for name in ("supervisor", "export"):
        got = read_as_peer(f"/proc/{running[name]}/environ")
        assert got.returncode != 0 and b"Permission denied" in got.stderr, f"{name} is dumpable: {got}"
        got = read_as_peer(f"/proc/{running[name]}/mem")
        assert got.returncode != 0, name
    got = read_as_peer(f"/proc/{running['qemu']}/environ")
    assert got.returncode == 0 and b"PATH=" in got.stdout, got.stderr


@pytest.mark.qemu
def test_no_key_pipe_reaches_qemu_or_stays_open(vm, tmp_path, monkeypatch):
    """The key pipe: the export reads and closes it, the supervisor closes its copy, QEMU never has it."""
    import qwamos.nbd.keypipe as keypipe

    made: list[tuple[int, int]] = []
    real = keypipe.key_pipe

    def spy(key: bytes) -> int:
        fd = real(key)
        st = os.fstat(fd)
        made.append((st.st_dev, st.st_ino))
        return fd

    monkeypatch.setattr(keypipe, "key_pipe", spy)
    monkeypatch.setenv("QWAMOS_PASSPHRASE", PASSPHRASE.decode())
    mgr = VMManager(vm)
    mgr.start("vm1")
    assert len(made) == 1
    pipe = f"pipe:[{made[0][1]}]"
    running = pids(vm)
    for name in ("qemu", "supervisor", "export"):
        assert pipe not in fd_targets(running[name]), f"the {name} holds the key pipe"
    # ...and this (starting) process closed its end too.
    assert pipe not in fd_targets(os.getpid())


@pytest.mark.qemu
def test_vm_start_reads_the_passphrase_from_an_fd_and_refuses_a_wrong_one(vm, env):
    r, w = os.pipe()
    os.write(w, b"wrong passphrase\n")
    os.close(w)
    res = qwamos(["vm", "start", "vm1", "--passphrase-fd", str(r)], env, pass_fds=(r,))
    os.close(r)
    assert res.returncode != 0 and b"passphrase" in res.stderr.lower(), res.stderr
    assert not list((vm / "vms" / "vm1").glob("*.qvol"))  # nothing half-created
    for _ in range(2):  # first start creates the volume; the second unwraps the existing key
        r, w = os.pipe()
        os.write(w, PASSPHRASE + b"\n")
        os.close(w)
        res = qwamos(["vm", "start", "vm1", "--passphrase-fd", str(r)], env, pass_fds=(r,))
        os.close(r)
        assert res.returncode == 0, res.stderr.decode()
        assert VMManager(vm).status("vm1").state == "running"
        VMManager(vm).stop("vm1", force=True)
    # Without any source (no terminal, no variable, no credentials) the sealed keystore is not opened.
    res = qwamos(["vm", "start", "vm1"], env)
    assert res.returncode != 0 and b"passphrase" in res.stderr.lower(), res.stderr


@pytest.mark.qemu
def test_unattended_start_reads_systemd_credentials(vm, env, tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir(mode=0o700)
    cred = creds / "qwamos-passphrase"
    cred.write_bytes(PASSPHRASE)
    cred.chmod(0o444)  # readable by others: refused before it is read
    res = qwamos(["vm", "start", "vm1"], dict(env, CREDENTIALS_DIRECTORY=str(creds)))
    assert res.returncode == 2 and b"readable or writable by others" in res.stderr, res.stderr
    cred.chmod(0o400)  # what systemd makes
    res = qwamos(["vm", "start", "vm1"], dict(env, CREDENTIALS_DIRECTORY=str(creds)))
    assert res.returncode == 0, res.stderr.decode()
    assert VMManager(vm).status("vm1").state == "running"


def test_passphrase_file_must_be_private(env, tmp_path):
    vol = tmp_path / "v.qvol"
    pf = tmp_path / "pass"
    pf.write_bytes(PASSPHRASE + b"\n")
    pf.chmod(0o640)
    res = qwamos(["volume", "create", str(vol), "--size", "1M", "--passphrase-file", str(pf)], env)
    assert res.returncode == 2 and f"chmod 600 {pf}".encode() in res.stderr, res.stderr
    assert not vol.exists()
    pf.chmod(0o600)
    res = qwamos(["volume", "create", str(vol), "--size", "1M", "--passphrase-file", str(pf)], env)
    assert res.returncode == 0, res.stderr.decode()
    res = qwamos(["volume", "info", str(vol), "--passphrase-file", str(pf)], env)
    assert res.returncode == 0, res.stderr.decode()
    res = qwamos(["key", "list", "--passphrase-file", str(pf)], env)
    assert res.returncode == 0, res.stderr.decode()


@needs_setpriv
def test_volume_serve_keeps_no_passphrase_in_its_environment(env, tmp_path, short_dir):
    ks = tmp_path / "ks"
    vol = tmp_path / "v.qvol"
    res = qwamos(["volume", "create", str(vol), "--size", "1M"], dict(env, QWAMOS_PASSPHRASE=PASSPHRASE.decode()))
    assert res.returncode == 0, res.stderr.decode()
    sock = short_dir / "s"
    proc = processes.spawn(
        [*NO_CAPS, *QWAMOS, "volume", "serve", str(vol), "--socket", str(sock), "--keystore", str(ks)],
        env=dict(env, QWAMOS_PASSPHRASE=PASSPHRASE.decode()),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_answers(sock, proc)
        pid = proc.pid  # setpriv and `volume serve` exec: one process from start to end
        key = PQCKeystore(ks, passphrase=PASSPHRASE).volume_key(_key_id(vol))
        for what in ("environ", "cmdline"):
            data = Path(f"/proc/{pid}/{what}").read_bytes()
            for s in (PASSPHRASE, b"QWAMOS_PASSPHRASE", key, key.hex().encode()):
                assert s not in data, what
        got = read_as_peer(f"/proc/{pid}/environ")
        assert got.returncode != 0 and b"Permission denied" in got.stderr
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and b"volume flushed and closed" in err, err
    finally:
        processes.stop(proc)


def _key_id(vol: Path) -> str:
    from qwamos.volume import read_header

    return str(read_header(vol)["key_id"])


def _process_starts(tree) -> list[tuple[int, str, bool]]:
    """(line, call, passes an explicit environment) for every call that starts a program."""
    import ast

    starts = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        name = f"{owner}.{node.func.attr}"
        if owner == "subprocess" and node.func.attr in ("Popen", "run", "call", "check_call", "check_output"):
            starts.append((node.lineno, name, any(k.arg == "env" for k in node.keywords)))
        elif owner == "os" and (
            node.func.attr.startswith(("exec", "spawn", "posix_spawn")) or node.func.attr == "system"
        ):
            starts.append((node.lineno, name, node.func.attr in ("execve", "execvpe") and len(node.args) == 3))
    return starts


def test_every_program_the_tool_starts_gets_an_explicit_environment():
    """No child inherits the caller's environment (and with it QWAMOS_PASSPHRASE) by default: every place
    in src/ that starts a program names its environment (tools.environment(), the allow-list)."""
    import ast

    src = Path(__file__).resolve().parents[1] / "src" / "qwamos"
    found, leaks = 0, []
    for path in sorted(src.rglob("*.py")):
        for line, call, has_env in _process_starts(ast.parse(path.read_text())):
            found += 1
            if not has_env:
                leaks.append(f"{path.relative_to(src)}:{line} {call}")
    assert found >= 4 and leaks == []


def test_the_process_start_checker_sees_a_leak():
    import ast

    code = "import os, subprocess\nsubprocess.Popen(['x'])\nsubprocess.run(['x'], env={})\nos.execv('x', ['x'])\n"
    assert _process_starts(ast.parse(code)) == [(2, "subprocess.Popen", False), (3, "subprocess.run", True),
                                                (4, "os.execv", False)]  # fmt: skip


def test_the_starting_process_checks_the_key_commitment_the_export_cannot(env, tmp_path, short_dir):
    """The export opens its volume with a bare key and cannot check the header's key commitment (it needs
    the key file's secret): the starting process checks it while it unwraps.  A volume made by someone who
    knows the volume key but not the key file (test_keystore_attacks.py) is refused by `volume serve` and
    by the unwrap a VM start does, before any export runs."""
    from conftest import MemoryKeys
    from qwamos.errors import HeaderCorruptError
    from qwamos.volume import PQCVolume
    from qwamos.volume.unlock import unlock_key

    ks, vol = tmp_path / "ks", tmp_path / "v.qvol"
    res = qwamos(["volume", "create", str(vol), "--size", "1M"], dict(env, QWAMOS_PASSPHRASE=PASSPHRASE.decode()))
    assert res.returncode == 0, res.stderr.decode()
    key_id = _key_id(vol)
    key = PQCKeystore(ks, passphrase=PASSPHRASE).volume_key(key_id)

    class KnowsTheKey(MemoryKeys):
        def new_volume_key(self, vm_name: str, volume_name: str) -> tuple[str, bytes]:
            self.keys[key_id] = key
            return key_id, key

    forged = tmp_path / "forged.qvol"
    PQCVolume(forged, keystore=KnowsTheKey()).create("v", "", size_mb=1)
    os.replace(forged, vol)
    with pytest.raises(HeaderCorruptError, match="no key commitment"):
        unlock_key(vol, PQCKeystore(ks, passphrase=PASSPHRASE))
    sock = short_dir / "s"
    res = qwamos(
        ["volume", "serve", str(vol), "--socket", str(sock)], dict(env, QWAMOS_PASSPHRASE=PASSPHRASE.decode())
    )
    assert res.returncode == 12 and b"no key commitment" in res.stderr, res.stderr
    assert not sock.exists()
